"""The evaluation harness end to end on a tiny saved model and generated data for every benchmark format."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

from unclutter.cli import app
from unclutter.evaluation import data as D
from unclutter.evaluation.report import write_comparison
from unclutter.evaluation.runner import PredictionLog, run_eval
from unclutter.ifeval.scoring import DataError

runner = CliRunner()


def write_bench(tmp_path, bench, n=4):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    recs = []
    for i in range(n):
        random_image(i).save(images / f"{i}.png")
        base = {"question_id": f"q{i}", "image": f"{i}.png", "question": "what is the color ?"}
        if bench in ("vqav2", "textvqa"):
            recs.append({**base, "answers": ["red"] * 10})
        elif bench == "gqa":
            recs.append({**base, "answer": "red"})
        elif bench == "mme":
            recs.append(
                {**base, "question_id": f"img{i // 2}", "answer": "Yes" if i % 2 else "No", "category": "color"}
            )
        elif bench == "mmbench":
            recs.append({**base, "options": {"A": "red", "B": "blue"}, "answer": "A", "category": "color"})
        elif bench == "if16":
            recs.append({
                "key": i, "image": f"{i}.png", "prompt": "what is the color ? In your entire response, refrain from the use of any commas.",
                "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "task": "T1",
            })  # fmt: skip
    path = tmp_path / f"{bench}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, images


@pytest.mark.parametrize(
    "bench, method, key",
    [
        ("vqav2", "stock", "accuracy"),
        ("textvqa", "vmtc", "accuracy"),
        ("gqa", "cmai", "accuracy"),
        ("mme", "vmtc+cmai", "perception"),
        ("mmbench", "spd", "circular_accuracy"),
        ("if16", "describe-then-answer", "if_avg_strict"),
    ],
)
def test_every_bench_format_runs(model_dir, tmp_path, bench, method, key):
    data, images = write_bench(tmp_path, bench)
    out = tmp_path / "run"
    overrides = ["spd.grid=4"] if method == "spd" else []
    m = run_eval(model_name=str(model_dir), method=method, bench=bench, data=data, images=images, out=out,
                 batch_size=3, max_new_tokens=4, device="cpu", overrides=overrides)  # fmt: skip
    assert key in m and m["num_errors"] == 0
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    expected = 8 if bench == "mmbench" else 4  # mmbench: 2 rotations per question
    assert len(rows) == expected == m["num_records"] and len({r["id"] for r in rows}) == expected
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["bench"] == bench
    if method == "spd":
        assert config["configs"]["spd"]["grid"] == 4
    if method == "describe-then-answer":
        assert all("description" in r for r in rows)
    assert (out / "metrics.md").read_text().startswith(f"# run: {bench}")


def test_corrupt_image_becomes_error_row(model_dir, tmp_path):
    data, images = write_bench(tmp_path, "gqa")
    (images / "2.png").write_bytes(b"not a png")
    m = run_eval(model_name=str(model_dir), method="stock", bench="gqa", data=data, images=images, out=tmp_path / "r",
                 batch_size=2, max_new_tokens=2, device="cpu")  # fmt: skip
    assert m["num_errors"] == 1 and m["num_records"] == 4
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "predictions.jsonl").open())}
    assert rows["q2"]["prediction"] is None and "cannot read image" in rows["q2"]["error"]


def test_bad_data_fails_before_the_run(tmp_path, model_dir):
    data, images = write_bench(tmp_path, "vqav2")
    (images / "1.png").unlink()
    with pytest.raises(DataError, match=r"vqav2.jsonl:2: image '1.png' not found"):
        D.load_records("vqav2", data, images)
    data.write_text(json.dumps({"question_id": 1, "image": "0.png", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"lacks \['answers'\]"):
        D.load_records("vqav2", data, images)
    with pytest.raises(ValueError, match="unknown benchmark"):
        D.load_records("coco", data, images)
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--method", "nope", "--bench", "gqa",
                                 "--data", str(data), "--images", str(images), "--out", str(tmp_path / "x")])  # fmt: skip
    assert result.exit_code == 2


@pytest.mark.parametrize(
    "bench, change, match",
    [
        ("vqav2", {"answers": [{"answer": "red"}] * 10}, "non-empty list of strings"),
        ("vqav2", {"answers": ["red", None]}, "non-empty list of strings"),
        ("gqa", {"answer": 2}, "'answer' must be a string"),
        ("mme", {"answer": "Maybe"}, "Yes or No"),
        ("mme", {"category": "Existence"}, "unknown MME category 'Existence'; MME's are existence, count"),
        ("mmbench", {"options": {"A": "red", "B": ""}, "answer": "B"}, "names no option"),
        ("if16", {"instruction_id_list": ["x:y"]}, "unknown instruction id"),
        ("if16", {"kwargs": [{}, {}]}, "equal length"),
        ("if16", {"kwargs": ["x"]}, "kwargs must be an object"),
        ("if16", {"instruction_id_list": [["punctuation:no_comma"]]}, "an instruction id is a string"),
        ("if16", {"task": 1}, "'task' must be a string"),
        ("if16", {"instruction_id_list": ["length_constraints:number_words"], "kwargs": [{}]}, r"needs kwargs"),
        (
            "if16",
            {
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"num_words": "5", "relation": "at least"}],
            },
            "must be an integer",
        ),  # fmt: skip
    ],
)
def test_malformed_fields_are_named_before_the_run(tmp_path, bench, change, match):
    data, images = write_bench(tmp_path, bench, n=2)
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    recs[1].update(change)
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=rf"{bench}.jsonl:2: .*{match}"):
        D.load_records(bench, data, images)


def test_if16_records_need_their_task(tmp_path):
    """Without ``task`` an eval had no headline (if_avg_strict) and `report` failed in matplotlib or dropped the run.
    IFEval's own format, without tasks, stays what `unclutter ifeval score` reads."""
    from unclutter.ifeval.scoring import read_inputs

    data, images = write_bench(tmp_path, "if16", n=2)
    recs = [{k: v for k, v in json.loads(line).items() if k != "task"} for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match=r"if16.jsonl:1: if16 record lacks \['task'\]"):
        D.load_records("if16", data, images)
    assert len(read_inputs(data)) == 2
    run = tmp_path / "old-run"  # a run from before the check: refused by report, named
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"bench": "if16", "if16": {}, "num_records": 2, "num_errors": 0}))
    with pytest.raises(ValueError, match=r"old-run/metrics.json: the if16 run has no if_avg_strict \(its if16 file"):
        write_comparison([run], tmp_path / "rep")
    assert runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")]).exit_code == 2
    assert not (tmp_path / "rep").exists()


def test_non_utf8_data_is_named_with_its_line(tmp_path):
    data, images = write_bench(tmp_path, "gqa", n=2)
    data.write_bytes(data.read_bytes().replace(b"color", b"colo\xff", 2))
    with pytest.raises(DataError, match=r"gqa.jsonl:1: not UTF-8 \(byte 0xff at character"):
        D.load_records("gqa", data, images)


def test_run_arguments_are_checked(model_dir, tmp_path):
    data, images = write_bench(tmp_path, "gqa", n=2)
    for bad in ({"limit": 0}, {"limit": -1}, {"batch_size": 0}, {"batch_size": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a positive integer"):
            run_eval(model_name=str(model_dir), method="stock", bench="gqa", data=data, images=images,
                     out=tmp_path / "r", device="cpu", **bad)  # fmt: skip
    for device, match in (("foo", "not a device name"), ("cuda:3", "CUDA device")):  # failed in torch, folder written
        with pytest.raises(ValueError, match=match):
            run_eval(model_name=str(model_dir), method="stock", bench="gqa", data=data, images=images,
                     out=tmp_path / "r", device=device)  # fmt: skip
    assert not (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "predictions.jsonl").exists()


def test_rerun_with_other_settings_is_refused(model_dir, tmp_path):
    data, images = write_bench(tmp_path, "gqa", n=2)
    kw = dict(
        model_name=str(model_dir),
        bench="gqa",
        data=data,
        images=images,
        out=tmp_path / "r",
        max_new_tokens=2,
        device="cpu",
    )
    run_eval(method="stock", **kw)
    with pytest.raises(ValueError, match="different settings"):
        run_eval(method="vmtc", **kw)


def test_killed_run_resumes_without_duplicates(model_dir, tmp_path):
    data, images = write_bench(tmp_path, "gqa", n=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "unclutter.cli", "eval", "--model", str(model_dir), "--method", "vmtc+cmai",
           "--bench", "gqa", "--data", str(data), "--images", str(images), "--out", str(out),
           "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "predictions.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(log.read_text().splitlines())
    assert 4 <= done_before < 40, "the run must be killed mid-way"
    with log.open("a") as f:  # a write torn by the kill
        f.write('{"id": "q39", "predic')
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(40))  # every id exactly once
    assert json.loads((out / "metrics.json").read_text())["num_records"] == 40


def test_prediction_log_repairs_torn_tail(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "pre')
    log = PredictionLog(p)
    assert set(log.rows) == {"a"} and p.read_text() == '{"id": "a", "prediction": "x"}\n'
    log.append([{"id": "b", "prediction": "y"}])
    assert set(PredictionLog(p).rows) == {"a", "b"}
    # answers with line separators other than "\n" (json.dumps leaves them unescaped) reopen as they were written
    odd = ["red\u2028blue", "a\u2029b", "c\x85d", "e\x1cf", "g\rh"]
    log.append([{"id": f"u{i}", "prediction": text} for i, text in enumerate(odd)])
    again = PredictionLog(p).rows
    assert [again[f"u{i}"]["prediction"] for i in range(len(odd))] == odd and len(again) == 2 + len(odd)


def test_images_become_8_bit_rgb_or_a_named_error(tmp_path):
    from unclutter.evaluation.images import open_image

    grey = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21  # 0 .. 64,491
    Image.fromarray(grey).save(tmp_path / "16.png")  # opens as I;16: Pillow's own convert("RGB") clips it to white
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode == "I;16"
    rgb = np.asarray(open_image(tmp_path / "16.png"))
    assert rgb.shape == (48, 64, 3) and np.abs(rgb[..., 0] - grey / 257.0).max() <= 0.5
    Image.fromarray(grey.astype(np.int32)).save(tmp_path / "32.tif")
    with pytest.raises(ValueError, match=r"32.tif.*'I' pixels"):
        open_image(tmp_path / "32.tif")
    Image.new("CMYK", (8, 8), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    assert open_image(tmp_path / "cmyk.jpg").mode == "RGB"


def test_report_compares_runs(model_dir, tmp_path):
    runs = []
    for bench, method in (("gqa", "stock"), ("gqa", "vmtc"), ("if16", "stock"), ("if16", "vmtc")):
        (tmp_path / f"{bench}-{method}").mkdir()
        data, images = write_bench(tmp_path / f"{bench}-{method}", bench, n=2)
        out = tmp_path / "runs" / f"{bench}-{method}"
        run_eval(
            model_name=str(model_dir),
            method=method,
            bench=bench,
            data=data,
            images=images,
            out=out,
            max_new_tokens=2,
            device="cpu",
        )
        runs.append(str(out))
    result = runner.invoke(app, ["report", *runs, "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    tab = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert tab["columns"] == ["IF", "GQA"] and [r["method"] for r in tab["rows"]] == ["stock", "vmtc"]
    assert (tmp_path / "rep" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    itab = json.loads((tmp_path / "rep" / "if_table.json").read_text())
    assert itab["tasks"] == ["T1"] and len(itab["rows"]) == 2


def test_report_keeps_runs_that_share_model_method_and_bench(tmp_path):
    """Two runs of one model and method on one benchmark (two data files, say) shared a row: one number vanished."""
    runs = []
    for folder, acc in (("a/run1", 30.0), ("b/run2", 70.0), ("c/run", 10.0), ("d/run", 20.0)):
        run = tmp_path / folder
        run.mkdir(parents=True)
        m = {"bench": "gqa", "accuracy": acc, "method": "stock", "label": "stock", "model": "m",
             "num_records": 1, "num_errors": 0}  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(m))
        runs.append(str(run))
    result = runner.invoke(app, ["report", *runs, "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    tab = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert [(r["method"], r["GQA"]) for r in tab["rows"]] == [
        ("stock (run1)", 30.0), ("stock (run2)", 70.0), ("stock (c/run)", 10.0), ("stock (d/run)", 20.0),
    ]  # fmt: skip


def test_report_refuses_files_that_are_not_run_metrics(tmp_path):
    summary = tmp_path / "score" / "summary.json"  # `ifeval score`'s: a KeyError 'bench' traceback
    summary.parent.mkdir()
    summary.write_text(json.dumps({"num_prompts": 1, "per_task": {}}))
    predictions = tmp_path / "predictions.jsonl"  # "Extra data: line 2 column 1" without the file
    predictions.write_text('{"id": "a"}\n{"id": "b"}\n')
    for path, message in (
        (summary, r"summary.json is not the metrics.json of an `unclutter eval` run"),
        (predictions, r"predictions.jsonl: cannot read it as JSON \(Extra data"),
    ):
        with pytest.raises(ValueError, match=message):
            write_comparison([path], tmp_path / "rep")
        assert runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "rep")]).exit_code == 2


def test_converters(tmp_path):
    import base64
    import io

    q = tmp_path / "q.jsonl"
    q.write_text(
        json.dumps(
            {
                "question_id": 7,
                "image": "a.jpg",
                "text": "Is it red?\nAnswer the question using a single word or phrase.",
            }
        )
        + "\n"
    )
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "yes"}] * 10}]}))
    assert D.convert_llava("vqav2", q, ann, tmp_path / "v.jsonl") == 1
    rec = json.loads((tmp_path / "v.jsonl").read_text())
    assert rec == {"question_id": 7, "image": "a.jpg", "question": "Is it red?", "answers": ["yes"] * 10}
    ann.write_text(json.dumps({"7": {"answer": "no"}}))
    D.convert_llava("gqa", q, ann, tmp_path / "g.jsonl")
    assert json.loads((tmp_path / "g.jsonl").read_text())["answer"] == "no"

    mme = tmp_path / "MME" / "color"
    mme.mkdir(parents=True)
    random_image(0).save(mme / "0001.png")
    (mme / "0001.txt").write_text(
        "Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n"
    )
    assert D.convert_mme(tmp_path / "MME", tmp_path / "mme.jsonl") == 2
    recs = D.load_records("mme", tmp_path / "mme.jsonl", tmp_path / "MME")
    assert [r["id"] for r in recs] == ["color/0001.png#0", "color/0001.png#1"]

    buf = io.BytesIO()
    random_image(1).save(buf, format="PNG")
    tsv = tmp_path / "mmb.tsv"
    picture = base64.b64encode(buf.getvalue()).decode()
    # the release's circular copy of question 5 (index 5 + 1e6, options rotated): our loader rotates by itself
    tsv.write_text("index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
                   f"5\tWhat color?\tnan\tred\tblue\t\t\tB\tcolor\t{picture}\n"
                   f"1000005\tWhat color?\tnan\tblue\tred\t\t\tA\tcolor\t{picture}\n")  # fmt: skip
    assert D.convert_mmbench_tsv(tsv, tmp_path / "mmb.jsonl", tmp_path / "mmb_images") == 1
    recs = D.load_records("mmbench", tmp_path / "mmb.jsonl", tmp_path / "mmb_images")
    assert [(r["id"], r["answer"]) for r in recs] == [("5@0", "B"), ("5@1", "A")]


def test_converters_name_bad_inputs(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 7, "image": "a.jpg", "text": "Is it red?"}) + "\n")
    gqa = tmp_path / "gqa.json"
    gqa.write_text(json.dumps({"7": {"answer": "no"}}))
    # the output's folder is created (a FileNotFoundError traceback)
    assert D.convert_llava("gqa", q, gqa, tmp_path / "new" / "g.jsonl") == 1
    tsv = tmp_path / "noq.tsv"
    tsv.write_text("index\tA\tB\tanswer\timage\n1\tred\tblue\tA\tx\n")
    (tmp_path / "empty").mkdir()
    for convert, match in [
        (lambda: D.convert_llava("gqa", q, tmp_path / "none.json", tmp_path / "o.jsonl"), r"none.json: no such file"),
        (lambda: D.convert_mme(tmp_path / "none", tmp_path / "o.jsonl"), r"none: no such folder"),
        (lambda: D.convert_mmbench_tsv(tmp_path / "none.tsv", tmp_path / "o.jsonl", tmp_path / "i"), "no such file"),
        # the bare KeyError text: "error: 'annotations'", "error: 'question'"
        (lambda: D.convert_llava("vqav2", q, gqa, tmp_path / "o.jsonl"),
         r"gqa.json lacks field 'annotations' \(is it the vqav2 answers file, v2_mscoco_val2014_annotations.json\?\)"),
        (lambda: D.convert_mmbench_tsv(tsv, tmp_path / "o.jsonl", tmp_path / "i"),
         r"noq.tsv lacks column\(s\) \['question'\] \(is it the MMBench TSV\?\)"),
        (lambda: D.convert_mme(tmp_path / "empty", tmp_path / "o.jsonl"), r"empty: no records found"),  # "wrote 0"
    ]:  # fmt: skip
        with pytest.raises(DataError, match=match):
            convert()
    assert not (tmp_path / "o.jsonl").exists()
    mme = tmp_path / "MME" / "color"
    mme.mkdir(parents=True)
    random_image(0).save(mme / "0001.png")
    (mme / "0001.txt").write_bytes(b"Is it r\xe9d?\tYes\n")
    with pytest.raises(DataError, match=r"0001.txt: not UTF-8 \(byte 0xe9 at offset 7\)"):
        D.convert_mme(tmp_path / "MME", tmp_path / "o.jsonl")
    result = runner.invoke(app, ["data", "convert", "--bench", "mme", "--mme-root", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "o.jsonl")])  # fmt: skip
    assert result.exit_code == 2 and "no records found" in " ".join(result.output.split())
    result = runner.invoke(app, ["data", "convert", "--bench", "mme", "--mme-root", str(tmp_path / "MME"),
                                 "--out", str(tmp_path / "empty")])  # fmt: skip
    assert result.exit_code == 2 and "must name a JSONL file" in " ".join(result.output.split())


def test_convert_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({
        "question_id": [1, 2], "question": ["q1", "q2"], "answers": [["a"] * 10, ["b"] * 10],
        "image": [random_image(0), random_image(1)],
    }).cast_column("image", datasets.Image())  # fmt: skip
    ds.save_to_disk(str(tmp_path / "hf"))
    assert D.convert_hf("textvqa", str(tmp_path / "hf"), tmp_path / "t.jsonl", tmp_path / "imgs") == 2
    recs = D.load_records("textvqa", tmp_path / "t.jsonl", tmp_path / "imgs")
    assert recs[1]["answers"] == ["b"] * 10
    # GQA keeps images in a separate config, joined on imageId
    questions = datasets.Dataset.from_dict({"id": ["g1"], "imageId": ["i9"], "question": ["left?"], "answer": ["yes"]})
    pictures = datasets.Dataset.from_dict({"id": ["i9"], "image": [random_image(3)]}).cast_column(
        "image", datasets.Image()
    )
    assert D.convert_hf("gqa", questions, tmp_path / "g.jsonl", tmp_path / "gimgs", image_dataset=pictures) == 1
    (rec,) = D.load_records("gqa", tmp_path / "g.jsonl", tmp_path / "gimgs")
    assert (rec["question_id"], rec["answer"]) == ("g1", "yes")


def test_lmms_eval_plugin_resolves_and_generates(model_dir):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    cls = get_model("unclutter")
    assert cls.__name__ == "UnclutterVLM"
    lm = cls.create_from_arg_string(
        f"pretrained={model_dir},method=vmtc+cmai,set=vmtc.num_tokens=16,device=cpu,batch_size=2"
    )
    assert lm.handle.num_image_tokens == 16
    docs = [{"image": random_image(i)} for i in range(3)]
    lm.task_dict = {"toy": {"test": docs}}
    reqs = [
        Instance("generate_until", ("<image>\nwhat is the color ?", {"max_new_tokens": 3, "until": ["</s>"]}, lambda d: [d["image"]], i, "toy", "test"),
                 idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})
        for i in range(3)
    ]  # fmt: skip
    outs = lm.generate_until(reqs)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    with pytest.raises(NotImplementedError, match="single-round"):
        lm.generate_until_multi_round(reqs)
    with pytest.raises(ValueError, match="continuation string or a doc_to_target function, got dict"):
        lm.loglikelihood(reqs)  # generation requests: their second field is the generation settings


# ---- every supported family through the harness -------------------------------------------------------------
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl", "idefics3",
            "smolvlm")  # fmt: skip
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# A chat template of the real checkpoints' kind: the image where the message puts it, as the family writes it.
CHAT = (
    "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
_saved = {}


def family_dir(tmp_path_factory, family):
    """The family's tiny model and processor (with a chat template) saved as a checkpoint, once per session."""
    if family not in _saved:
        from unclutter.models.tiny import tiny_vlm

        spec = tiny_vlm(family)
        d = tmp_path_factory.mktemp(family)
        processor = spec.processor()
        marker = QWEN_IMAGE if family.startswith("qwen") else processor.image_token
        processor.chat_template = CHAT.replace("IMAGE", marker)
        spec.model().save_pretrained(d)
        processor.save_pretrained(d)
        _saved[family] = d, marker
    return _saved[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_runs_every_family_in_its_chat_template(tmp_path_factory, tmp_path, family):
    from unclutter.evaluation.generation import build_prompt, load_model
    from unclutter.integrations import ADAPTERS

    path, marker = family_dir(tmp_path_factory, family)
    model, processor = load_model(str(path), device="cpu")
    assert build_prompt(processor, "what is it ?") == f"user : {marker} what is it ? assistant :"
    data, images = write_bench(tmp_path, "gqa", n=3)
    m = run_eval(model_name=str(path), method="vmtc+cmai", bench="gqa", data=data, images=images, out=tmp_path / "r",
                 batch_size=2, max_new_tokens=2, device="cpu", model_and_processor=(model, processor))  # fmt: skip
    assert m["num_errors"] == 0 and m["num_records"] == 3 and m["model"] == str(path)
    assert m["family"] in {a.family for a in ADAPTERS} and m["family"] == m["family"].strip()
    rows = [json.loads(line) for line in (tmp_path / "r" / "predictions.jsonl").open()]
    assert len(rows) == 3 and all(isinstance(r["prediction"], str) for r in rows)
    assert not hasattr(processor, "_unclutter_handle") and "replace_image_token" not in vars(processor)  # restored


def test_report_separates_models(tmp_path):
    runs = []
    for model, family, acc in (("hub/llava-next", "LLaVA-NeXT", 50.0), ("hub/qwen-vl", "Qwen2.5-VL", 60.0)):
        for method, delta in (("stock", 0.0), ("vmtc+cmai", 1.0)):
            run = tmp_path / f"{family}-{method}"
            run.mkdir()
            m = {"bench": "gqa", "accuracy": acc + delta, "method": method, "label": method, "model": model,
                 "family": family, "num_records": 1, "num_errors": 0}  # fmt: skip
            (run / "metrics.json").write_text(json.dumps(m))
            runs.append(str(run))
    result = runner.invoke(app, ["report", *runs, "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    tab = json.loads((tmp_path / "rep" / "comparison.json").read_text())
    assert [(r["method"], r["GQA"], r["family"]) for r in tab["rows"]] == [
        ("llava-next: stock", 50.0, "LLaVA-NeXT"), ("llava-next: vmtc+cmai", 51.0, "LLaVA-NeXT"),
        ("qwen-vl: stock", 60.0, "Qwen2.5-VL"), ("qwen-vl: vmtc+cmai", 61.0, "Qwen2.5-VL"),
    ]  # fmt: skip
    assert "| qwen-vl: vmtc+cmai | 61.0 |" in (tmp_path / "rep" / "comparison.md").read_text()
    # models whose folders end alike keep their own rows, named by the shortest end that tells them apart
    for model, acc in (("a/checkpoint", 33.3), ("b/checkpoint", 16.7), ("runs/llava-next", 40.0)):
        run = tmp_path / "same-end" / model.replace("/", "-")
        run.mkdir(parents=True)
        m = {"bench": "gqa", "accuracy": acc, "method": "stock", "label": "stock", "model": model,
             "num_records": 1, "num_errors": 0}  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(m))
    result = runner.invoke(app, ["report", *map(str, sorted((tmp_path / "same-end").iterdir())), runs[0],
                                 "--out", str(tmp_path / "rep2")])  # fmt: skip
    assert result.exit_code == 0, result.output
    tab = json.loads((tmp_path / "rep2" / "comparison.json").read_text())
    assert [(r["method"], r["GQA"]) for r in tab["rows"]] == [
        ("a/checkpoint: stock", 33.3), ("b/checkpoint: stock", 16.7), ("runs/llava-next: stock", 40.0),
        ("hub/llava-next: stock", 50.0),
    ]  # fmt: skip


def test_an_image_the_processor_refuses_becomes_an_error_row(tmp_path_factory, tmp_path):
    """Qwen2.5-VL's processor refuses an aspect ratio over 200: the whole eval stopped there, on every rerun."""
    path, _ = family_dir(tmp_path_factory, "qwen2_5_vl")
    data, images = write_bench(tmp_path, "gqa", n=3)
    Image.new("RGB", (2000, 1), (255, 0, 0)).save(images / "1.png")
    kw = dict(model_name=str(path), method="vmtc+cmai", bench="gqa", data=data, images=images, out=tmp_path / "r",
              batch_size=2, max_new_tokens=2, device="cpu")  # fmt: skip
    m = run_eval(**kw)
    assert m["num_errors"] == 1 and m["num_records"] == 3
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "r" / "predictions.jsonl").open())}
    assert rows["q1"]["prediction"] is None and "aspect ratio must be smaller than 200" in rows["q1"]["error"]
    assert f"refuses image {images / '1.png'}" in rows["q1"]["error"]
    assert isinstance(rows["q0"]["prediction"], str) and isinstance(rows["q2"]["prediction"], str)
    assert run_eval(**kw) == m  # the rerun resumes past it


def test_a_processor_failure_that_is_not_the_images_is_raised():
    from unclutter.evaluation.generation import generate

    def processor(images, text, **kw):  # fails whatever the image: the prompt's or the processor's fault
        raise ValueError("the prompt has no image token")

    with pytest.raises(ValueError, match="the prompt has no image token"):
        generate(None, processor, ["q"], [Image.new("RGB", (2000, 1))])


def test_eval_refuses_a_method_the_family_lacks(tmp_path_factory, tmp_path):
    path, _ = family_dir(tmp_path_factory, "qwen2_5_vl")
    data, images = write_bench(tmp_path, "gqa", n=1)
    result = runner.invoke(app, ["eval", "--model", str(path), "--method", "spd", "--bench", "gqa", "--data", str(data),
                                 "--images", str(images), "--out", str(tmp_path / "x"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "SPD is not available for Qwen2.5-VL" in " ".join(result.output.split())


def test_a_model_folder_under_home_loads_by_its_tilde_path(model_dir, tmp_path, monkeypatch):
    import shutil

    from unclutter.evaluation.generation import load_model

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model_dir, tmp_path / "ckpt")
    model, _ = load_model("~/ckpt", device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match="no model folder ~/nowhere"):
        load_model("~/nowhere", device="cpu")
