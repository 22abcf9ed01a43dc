"""Scoring files, the 16-task suite builder, the report, the CLI (the published GPT-4 result: tests_published/)."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from unclutter import ifeval
from unclutter.cli import app
from unclutter.ifeval import report, scoring, suite

runner = CliRunner()


def test_missing_responses_error_lists_keys_and_writes_nothing(tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        "".join(
            json.dumps({"key": k, "prompt": f"p{k}", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
            + "\n"
            for k in (1, 2, 3)
        )
    )
    responses = tmp_path / "resp.jsonl"
    responses.write_text(
        json.dumps({"prompt": "p1", "response": "ok"}) + "\n" + json.dumps({"key": 3, "response": "a, b"}) + "\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["ifeval", "score", "--input", str(inputs), "--responses", str(responses), "--out", str(out)]
    )
    assert result.exit_code == 2 and "no response for input key(s): 2" in result.output
    assert not out.exists()
    responses.write_text(responses.read_text() + json.dumps({"key": 2, "response": "fine"}) + "\n")
    result = runner.invoke(
        app, ["ifeval", "score", "--input", str(inputs), "--responses", str(responses), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompt_level_strict_count"] == 2 and summary["prompt_level_strict"] == pytest.approx(2 / 3)


def test_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "in.jsonl"
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": [], "kwargs": []}) + "\n{not json\n")
    with pytest.raises(scoring.DataError, match=r"in.jsonl:2: not valid JSON"):
        scoring.read_inputs(bad)
    bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]}) + "\n")
    with pytest.raises(scoring.DataError, match=r"in.jsonl:1: unknown instruction id"):
        scoring.read_inputs(bad)
    bad.write_text(json.dumps({"key": 1, "instruction_id_list": [], "kwargs": []}) + "\n")
    with pytest.raises(scoring.DataError, match=r"in.jsonl:1: missing field 'prompt'"):
        scoring.read_inputs(bad)
    for iid, kwargs, match in [  # values a checker would choke on, named with their line
        (
            "length_constraints:number_words",
            {"num_words": "5", "relation": "at least"},
            "'num_words' must be an integer",
        ),
        ("length_constraints:number_words", {"num_words": 5, "relation": "more than"}, "relation must be one of"),
        ("keywords:existence", {"keywords": ["(cat"]}, "not a valid regular expression"),
        ("keywords:forbidden_words", {"forbidden_words": "cat"}, "must be a list of strings"),
        ("detectable_content:postscript", {"postscript_marker": 1}, "must be a string"),
    ]:
        bad.write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": [iid], "kwargs": [kwargs]}) + "\n")
        with pytest.raises(scoring.DataError, match=rf"in.jsonl:1: {iid}: .*{match}"):
            scoring.read_inputs(bad)
    for change, match in [  # malformed containers: named with their line, not an AttributeError or TypeError
        ({"kwargs": ["x"]}, "punctuation:no_comma: kwargs must be an object"),
        ({"instruction_id_list": [["punctuation:no_comma"]]}, "an instruction id is a string"),
        ({"prompt": 5}, "'prompt' must be a string"),
    ]:
        line = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], **change}
        bad.write_text(json.dumps(line) + "\n")
        with pytest.raises(scoring.DataError, match=rf"in.jsonl:1: {match}"):
            scoring.read_inputs(bad)


def test_files_that_are_not_utf8_are_named_with_their_line(tmp_path):
    good = json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]})
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(good + "\n")
    responses = tmp_path / "resp.jsonl"
    responses.write_bytes(b'{"key": 1, "response": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(scoring.DataError, match=r"resp.jsonl:1: not UTF-8 \(byte 0xe9 at character 28\)"):
        scoring.read_responses(responses)
    result = runner.invoke(
        app, ["ifeval", "score", "--input", str(inputs), "--responses", str(responses), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "resp.jsonl:1: not UTF-8" in " ".join(result.output.split())
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(
        b'{"question_id": 1, "image": "a.png", "text": "ok"}\n{"question_id": 2, "image": "\xff.png"}\n'
    )
    with pytest.raises(scoring.DataError, match=r"q.jsonl:2: not UTF-8 \(byte 0xff"):
        suite.build_suite_file(questions, tmp_path / "s.jsonl", per_task=1, tasks=["T1"])


@pytest.fixture
def llava_questions(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(7):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(images / f"{i}.png")
        text = f"<image>\nWhat color is object {i}?\nAnswer the question using a single word or phrase."
        lines.append(json.dumps({"question_id": f"q{i}", "image": f"{i}.png", "text": text}))
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, images


def test_build_suite_deterministic_valid_and_complete(llava_questions, tmp_path):
    path, images = llava_questions
    a = suite.build_suite_file(path, tmp_path / "a.jsonl", images=images, per_task=10, seed=3)
    b = suite.build_suite_file(path, tmp_path / "b.jsonl", images=images, per_task=10, seed=3)
    c = suite.build_suite_file(path, tmp_path / "c.jsonl", images=images, per_task=10, seed=4)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a == b and a != c
    assert len(a) == 16 * 10 and [r["task"] for r in a[::10]] == list(suite.TASKS)
    for r in a:
        (iid,), (kw,) = r["instruction_id_list"], r["kwargs"]
        assert iid == suite.TASKS[r["task"]][0]
        assert r["prompt"].endswith(ifeval.describe(iid, kw))
        assert "single word" not in r["prompt"] and "<image>" not in r["prompt"]
        assert isinstance(ifeval.follows(iid, kw, "a plain answer."), bool)
    # 7 questions, 10 per task: every question used before any repeats
    t1 = [r["question_id"] for r in a if r["task"] == "T1"]
    assert len(set(t1[:7])) == 7
    # the file is valid scorer input
    assert len(scoring.read_inputs(tmp_path / "a.jsonl")) == 160


def test_build_suite_task_subset_and_errors(llava_questions, tmp_path):
    path, images = llava_questions
    recs = suite.build_suite_file(path, tmp_path / "s.jsonl", per_task=3, tasks=["T9", "T16"])
    assert [r["task"] for r in recs] == ["T9"] * 3 + ["T16"] * 3
    with pytest.raises(ValueError, match="unknown task"):
        suite.build_suite_file(path, tmp_path / "s.jsonl", tasks=["T17"])
    (images / "3.png").unlink()
    with pytest.raises(scoring.DataError, match="image '3.png' not found"):
        suite.build_suite_file(path, tmp_path / "s.jsonl", images=images)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "image": "0.png", "text": 5}) + "\n")
    with pytest.raises(scoring.DataError, match=r"bad.jsonl:1: 'text' must be a string, got 5"):
        suite.build_suite_file(bad, tmp_path / "s.jsonl")


def test_build_suite_refuses_sources_that_are_neither_jsonl_nor_a_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "q.json").write_text("[]")
    for source, match in [
        (tmp_path / "q.json", "must be LLaVA question JSONL ending in .jsonl"),  # it reached the hub as an id
        (tmp_path / "no" / "such", "no such file or folder"),  # a FileNotFoundError traceback
        (tmp_path / "nothing.parquet", "no such file or folder"),
    ]:
        with pytest.raises(scoring.DataError, match=match):
            suite.build_suite_file(str(source), tmp_path / "out" / "s.jsonl")
    (tmp_path / "empty").mkdir()  # a folder datasets cannot load: its error in one line, naming the source
    result = runner.invoke(
        app, ["ifeval", "build", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "s.jsonl")]
    )
    assert result.exit_code == 2, result.output
    assert "cannot load it as a Hugging Face dataset" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_build_suite_from_hf_dataset_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"question_id": ["a", "b"], "question": ["Is it red?", "How many?"], "image": [Image.new("RGB", (4, 4))] * 2}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    recs = suite.build_suite_file(str(tmp_path / "hf"), tmp_path / "out" / "suite.jsonl", per_task=2, tasks=["T1"])
    assert {r["question_id"] for r in recs} == {"a", "b"}
    assert (tmp_path / "out" / "images" / "a.png").is_file()


def _fake_run(tmp_path, name, passes):
    """Score a 16 x 4 suite whose first ``passes[task]`` records per task get an answer that follows."""
    recs = suite.build_suite([{"question_id": 1, "image": "x.png", "question": "What?"}], per_task=4)
    responses = [_passing_answer(r) if r["key"] % 4 < passes.get(r["task"], 0) else "" for r in recs]
    inputs, resp, out = tmp_path / f"{name}.in", tmp_path / f"{name}.resp", tmp_path / name
    scoring.write_jsonl_atomic(inputs, recs)
    scoring.write_jsonl_atomic(resp, [{"key": r["key"], "response": x} for r, x in zip(recs, responses, strict=True)])
    scoring.score_files(inputs, resp, out)
    return out


def _passing_answer(rec):
    task = rec["task"]
    answers = {
        "T1": "red", "T2": "the answer is red and it is round", "T3": "THE ANSWER IS RED AND IT IS ROUND",
        "T6": "<<Red>> red", "T9": '{"answer": "red"}', "T14": "red ****** crimson",
    }  # fmt: skip
    return answers[task]


def test_report_renders_table1_layout(tmp_path):
    a = _fake_run(tmp_path, "stock", {"T1": 4, "T2": 2})
    b = _fake_run(tmp_path, "vmtc+cmai", {"T1": 4, "T2": 4, "T9": 3})
    result = runner.invoke(app, ["ifeval", "report", str(a), str(b), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    tab = json.loads((tmp_path / "rep" / "if_table.json").read_text())
    assert tab["tasks"] == list(suite.TASKS)
    stock, ours = tab["rows"]
    assert (stock["name"], stock["T1"], stock["T2"], stock["T9"]) == ("stock", 100.0, 50.0, 0.0)
    assert (ours["T2"], ours["T9"]) == (100.0, 75.0)
    assert ours["AVG"] == pytest.approx((100 + 100 + 75) / 16)
    md = (tmp_path / "rep" / "if_table.md").read_text()
    assert md.splitlines()[0].startswith("| Method | T1 | T2 |") and "| vmtc+cmai | 100.0 | 100.0 |" in md
    assert (tmp_path / "rep" / "if_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no summary.json"):
        report.load_run(tmp_path / "nowhere")
    (tmp_path / "list.json").write_text("[1, 2]")  # an AttributeError traceback
    with pytest.raises(ValueError, match=r"list.json holds a JSON list, not an object; give the summary.json"):
        report.load_run(tmp_path / "list.json")
    (tmp_path / "p.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: cannot read it as JSON \(Extra data"):
        report.load_run(tmp_path / "p.jsonl")


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    a = _fake_run(tmp_path, "stock", {"T1": 4})
    taken = tmp_path / "taken"
    taken.write_text("")
    for args in (
        ["ifeval", "score", "--input", str(tmp_path / "stock.in"), "--responses", str(tmp_path / "stock.resp")],
        ["ifeval", "report", str(a)],
        ["report", str(a)],
    ):
        result = runner.invoke(app, [*args, "--out", str(taken)])
        assert result.exit_code == 2 and "is a file, not a folder" in " ".join(result.output.split()), args
