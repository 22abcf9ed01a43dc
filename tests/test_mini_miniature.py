"""The miniature's statistics and tables: bootstrap intervals over seeds and questions, paired differences,
and results written from finished harness run folders (pending rows labelled, not invented)."""

import json

import numpy as np
import pytest

from unclutter.evaluation.data import load_records
from unclutter.mini.miniature import BY_NAME, bootstrap, run_dir, write_results
from unclutter.shapes.dataset import build_shapes


def test_bootstrap_mean_and_interval():
    rng = np.random.default_rng(1)
    x = (rng.random((3, 400)) < 0.7).astype(float)
    mean, lo, hi = bootstrap(x, None)
    assert mean == pytest.approx(100 * x.mean())
    assert lo < mean < hi and 2 < hi - lo < 15  # about +-2 SE of a 1,200-sample proportion plus seed spread
    assert bootstrap(np.ones((1, 50)), None) == (100.0, 100.0, 100.0)
    # grouped: the statistic is the mean of the group means, whatever the group sizes
    groups = np.array([0] * 10 + [1] * 30)
    x = np.array([[1.0] * 10 + [0.0] * 30])
    assert bootstrap(x, groups)[0] == pytest.approx(50.0)


def test_paired_difference_is_tighter_than_the_unpaired_spread():
    rng = np.random.default_rng(2)
    base = (rng.random((3, 500)) < 0.6).astype(float)
    better = base.copy()
    better[:, :25] = 1.0  # a few questions fixed, the rest identical
    d_mean, d_lo, d_hi = bootstrap(better - base, None)
    assert d_mean == pytest.approx(100 * (better - base).mean())
    assert d_lo > 0  # paired: clearly positive even though the two unpaired intervals overlap
    _, b_lo, b_hi = bootstrap(base, None)
    assert d_hi - d_lo < b_hi - b_lo


def _fake_run(root, cond, seed, bench, records, answer):
    out = run_dir(root, cond, seed, bench)
    out.mkdir(parents=True)
    rows = [{"id": r["id"], "prediction": answer(r)} for r in records]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "metrics.json").write_text("{}")
    (out / "tokens.json").write_text(json.dumps({"image_tokens": 144 if cond.name == "stock" else 72}))


def _held_out(tmp_path):
    """A small held-out shapes set and its records, as the miniature loads them."""
    root = tmp_path / "mini"
    build_shapes(root / "test", 20, seed=1, if_per_task=2)
    records = {"gqa": load_records("gqa", root / "test" / "vqa.jsonl", None),
               "if16": load_records("if16", root / "test" / "if16.jsonl", None)}  # fmt: skip
    return root, records


def right(r):
    return r.get("answer", "")


def half(r):
    """Right on odd question ids only."""
    return r["answer"] if int(r["question_id"]) % 2 else "no idea"


def test_results_from_finished_runs_with_pending_rows(tmp_path):
    root, records = _held_out(tmp_path)
    for seed in (0, 1):
        _fake_run(root, BY_NAME["stock"], seed, "gqa", records["gqa"], half)
        _fake_run(root, BY_NAME["stock"], seed, "if16", records["if16"], right)
        _fake_run(root, BY_NAME["plugin"], seed, "gqa", records["gqa"], right)
    data = write_results(root, tmp_path / "out", [0, 1], records, {"trained": [0, 1]})
    stock, plugin = data["conditions"]["stock"], data["conditions"]["plugin"]
    assert stock["vqa"]["mean"] == pytest.approx(50.0) and stock["vqa"]["seeds"] == [0, 1]
    assert plugin["vqa"]["mean"] == pytest.approx(100.0)
    assert plugin["vqa"]["diff_vs_stock"]["mean"] == pytest.approx(50.0)
    assert 20 < plugin["vqa"]["diff_vs_stock"]["ci"][0] < 50
    assert "if_strict" not in plugin and set(stock["if_strict"]["per_task"]) == {f"T{i}" for i in range(1, 17)}
    assert stock["image_tokens"] == 144
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| VMTC + CMAI, trained in (ours) | pending |" in md
    assert "50.0 [" in md and "Pending (model not built yet): trained seeds [0, 1]" in md
    assert json.loads((tmp_path / "out" / "results.json").read_text())["pending"] == {"trained": [0, 1]}


def test_first_seed_tables_compare_every_row_on_the_first_seed(tmp_path):
    """Fig. 2 and Tables 4-5 ran on seed 0 only: their stock and plug-in rows must be seed 0's too, not the
    all-seed means of the headline (stock here scores 50 on seed 0 and 100 on seed 1)."""
    root, records = _held_out(tmp_path)
    for seed, answer in ((0, half), (1, right)):
        for bench in ("gqa", "if16"):
            _fake_run(root, BY_NAME["stock"], seed, bench, records[bench], answer if bench == "gqa" else right)
    for name in ("spd10", "t4-llp"):
        for bench in ("gqa", "if16"):
            _fake_run(root, BY_NAME[name], 0, bench, records[bench], half if bench == "gqa" else right)
    data = write_results(root, tmp_path / "out", [0, 1], records, {})
    assert data["conditions"]["stock"]["vqa"]["mean"] == pytest.approx(75.0)
    first = data["first_seed_conditions"]
    assert first["stock"]["vqa"]["mean"] == pytest.approx(50.0) and first["stock"]["vqa"]["seeds"] == [0]
    assert first["spd10"]["vqa"]["diff_vs_stock"]["mean"] == pytest.approx(0.0)
    md = (tmp_path / "out" / "results.md").read_text()
    fig2 = md.split("### Fig. 2")[1].split("###")[0]
    assert "| stock | 144 | " in fig2 and "| 50.0 [" in fig2 and "| 75.0 [" not in fig2
    table4 = md.split("### Table 4")[1].split("###")[0]
    assert "| 75.0 [" not in table4 and "| 1 | 72 | 50.0 [" in table4
    headline = md.split("### Headline")[1].split("###")[0]
    assert "| stock | 2 | 144 | 75.0 [" in headline


def test_seed_counts_follow_each_benchmark_and_arguments_are_checked(tmp_path):
    """An interrupted miniature can leave VQA on more seeds than IF: the row says so instead of one count for
    both; bad --seeds / --only stop the command with a usage error."""
    from unclutter.mini.miniature import main

    root, records = _held_out(tmp_path)
    for seed in (0, 1):
        _fake_run(root, BY_NAME["stock"], seed, "gqa", records["gqa"], half)
        _fake_run(root, BY_NAME["stock"], seed, "if16", records["if16"], right)
        _fake_run(root, BY_NAME["plugin"], seed, "gqa", records["gqa"], right)
    _fake_run(root, BY_NAME["plugin"], 0, "if16", records["if16"], right)
    write_results(root, tmp_path / "out", [0, 1], records, {})
    headline = (tmp_path / "out" / "results.md").read_text().split("### Headline")[1].split("###")[0]
    assert "| stock | 2 | " in headline and "| 2 VQA / 1 IF | " in headline
    for args in (["--seeds", ","], ["--seeds", "0,0"], ["--only", "bogus"]):
        with pytest.raises(SystemExit) as stop:
            main(["--root", str(root), "--report-only", *args])
        assert stop.value.code == 2


def test_the_ceiling_run_has_one_writer(tmp_path):
    from unclutter.mini.miniature import ceiling_eval
    from unclutter.runlock import RunLock, RunLocked

    out = tmp_path / "ceiling-gqa"
    with RunLock(out, what="another ceiling run"), pytest.raises(RunLocked, match="another ceiling run"):
        ceiling_eval(None, None, "gqa", [], {}, out, batch_size=1)
