"""Resume robustness: a training or evaluation run killed, rerun, or rerun with other settings or inputs."""

import json
import shutil

import pytest
import torch
from helpers import StopAt
from test_evaluation import write_bench
from test_training import make_data
from transformers import LlavaForConditionalGeneration

from unclutter.evaluation.runner import PredictionLog, run_eval
from unclutter.training.trainer import TrainConfig, train


def _config(base_dir, tmp_path, name, **kw):
    data, images = make_data(tmp_path, n=4, stage="pretrain")  # 5 records: 3 steps an epoch, so 4 steps end mid-epoch
    fields = dict(stage="pretrain", model=str(base_dir), data=str(data), images=str(images), output=str(tmp_path / name),
                  max_steps=4, batch_size=2, per_device_batch_size=2, save_steps=2, learning_rate=1e-3)  # fmt: skip
    return TrainConfig(**{**fields, **kw})


def _weights(path):
    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


def _same(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


def _steps(path):
    return [h["step"] for h in json.loads((path / "train_log.json").read_text())["log"]]


def test_rerunning_a_finished_training_trains_no_further(model_dir, tmp_path):
    out = train(_config(model_dir, tmp_path, "o"))
    first = _weights(out)
    for _ in range(2):  # Trainer resumed at max_steps still runs one more step (with a cosine lr above 0 from the 2nd)
        train(_config(model_dir, tmp_path, "o"))
        assert _steps(out) == [1, 2, 3, 4] and _same(_weights(out), first)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_a_checkpoint_whose_save_was_cut_short_is_skipped(model_dir, tmp_path):
    straight = _weights(train(_config(model_dir, tmp_path, "straight")))
    with pytest.raises(KeyboardInterrupt):
        train(_config(model_dir, tmp_path, "o"), callbacks=[StopAt(3)])
    cut = tmp_path / "o" / "checkpoint-4"  # a kill in the middle of saving step 4: weights written, no trainer state
    shutil.copytree(tmp_path / "o" / "checkpoint-2", cut)
    (cut / "trainer_state.json").unlink()
    (cut / "optimizer.pt").unlink()
    out = train(_config(model_dir, tmp_path, "o"))
    assert _steps(out) == [1, 2, 3, 4] and _same(_weights(out), straight)


def test_resuming_training_with_other_settings_is_refused(model_dir, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(_config(model_dir, tmp_path, "o"), callbacks=[StopAt(3)])
    with pytest.raises(ValueError, match="different settings.*method"):
        train(_config(model_dir, tmp_path, "o", method="stock"))
    assert not (tmp_path / "o" / "config.json").exists()
    train(_config(model_dir, tmp_path, "o"))  # the same settings resume


def _eval(model_dir, tmp_path, **kw):
    data, images = write_bench(tmp_path, "gqa", n=4)
    args = dict(model_name=str(model_dir), method="vmtc+cmai", bench="gqa", data=data, images=images,
                out=tmp_path / "r", max_new_tokens=3, device="cpu", batch_size=2)  # fmt: skip
    return run_eval(**{**args, **kw})


def test_eval_resumed_in_another_dtype_is_refused(model_dir, tmp_path):
    _eval(model_dir, tmp_path, limit=2, dtype="float32")
    lines = (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()
    (tmp_path / "r" / "predictions.jsonl").write_text(lines[0] + "\n")  # killed after one answer
    with pytest.raises(ValueError, match="different settings.*dtype"):
        _eval(model_dir, tmp_path, limit=2, dtype="bfloat16")
    _eval(model_dir, tmp_path, limit=2, dtype="auto")  # auto is float32 on the CPU: the same run


def test_eval_questions_changed_under_the_same_file_name_are_refused(model_dir, tmp_path):
    _eval(model_dir, tmp_path)
    data = tmp_path / "gqa.jsonl"
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    recs[0]["question"] = "how many shapes ?"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError, match="different settings.*inputs"):
        run_eval(model_name=str(model_dir), method="vmtc+cmai", bench="gqa", data=data, images=tmp_path / "images",
                 out=tmp_path / "r", max_new_tokens=3, device="cpu", batch_size=2)  # fmt: skip


def test_eval_killed_before_its_metrics_records_the_family(model_dir, tmp_path):
    first = _eval(model_dir, tmp_path)
    (tmp_path / "r" / "metrics.json").unlink()  # killed after the last answer, before metrics.json
    assert _eval(model_dir, tmp_path)["family"] == first["family"] == "LLaVA-1.5"


def test_a_corrupt_prediction_line_is_named(tmp_path):
    p = tmp_path / "predictions.jsonl"
    p.write_text('{"id": "a", "prediction": "x"}\n{"id": "b", "pre\n{"id": "c", "prediction": "z"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl, line 2: .*delete that line"):
        PredictionLog(p)


def test_a_first_attempt_that_trained_nothing_does_not_pin_its_settings(model_dir, tmp_path):
    """The data has images but --images was forgotten: the run stops before loading anything; the corrected command
    was refused ("different settings (images)") though nothing had been trained under the first settings."""
    from unclutter.ifeval.scoring import DataError

    with pytest.raises(DataError, match="give --images"):
        train(_config(model_dir, tmp_path, "o", images=None, max_steps=1))
    train(_config(model_dir, tmp_path, "o", max_steps=1))
    assert _steps(tmp_path / "o") == [1]


def test_eval_that_failed_before_its_first_answer_takes_other_settings(model_dir, tmp_path, monkeypatch):
    """A first attempt that runs out of memory loading the model leaves only config.json: the retry in another
    dtype was refused ("different settings (dtype)") though no answer could be mixed."""
    import unclutter.evaluation.generation as generation

    real = generation.load_model

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generation, "load_model", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        _eval(model_dir, tmp_path, dtype="float32")
    monkeypatch.setattr(generation, "load_model", real)
    _eval(model_dir, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["dtype"] == "bfloat16"


def test_rerunning_a_finished_training_whose_log_was_cut_short(model_dir, tmp_path):
    """A full disk while writing train_log.json leaves it empty (open("w") truncates first): the rerun that keeps the
    old summary failed on it (JSONDecodeError, naming no file), every time."""
    out = train(_config(model_dir, tmp_path, "o"))
    (out / "train_log.json").write_text("")
    train(_config(model_dir, tmp_path, "o"))
    assert _steps(out) == [1, 2, 3, 4]
