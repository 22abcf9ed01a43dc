"""One writer per run folder: a second writer is refused by name, a kill -9 leaves nothing to clean up."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import random_image

from unclutter import runlock
from unclutter.evaluation.runner import run_eval
from unclutter.runlock import RunLock, RunLocked, main_process_lock
from unclutter.training.trainer import TrainConfig, train

# The holder loads runlock.py alone: importing the `unclutter` package pulls in torch (seconds per process).
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.RunLock(sys.argv[2], what="holder").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def write_gqa(tmp_path, n):
    (tmp_path / "images").mkdir()
    for i in range(n):
        random_image(i).save(tmp_path / "images" / f"{i}.png")
    recs = [
        {"question_id": f"q{i}", "image": f"{i}.png", "question": "what is the color ?", "answer": "red"}
        for i in range(n)
    ]
    (tmp_path / "gqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "gqa.jsonl", tmp_path / "images"


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock on ``tmp_path / "run"``; killed (SIGKILL) at the end if still alive."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, runlock.__file__, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


def test_second_writer_is_refused_naming_the_first(holder, tmp_path):
    with pytest.raises(RunLocked, match=rf"run is being written by another holder \(pid {holder.pid} on host .*--out"):
        RunLock(tmp_path / "run").acquire()
    cfg = TrainConfig(stage="pretrain", data=str(tmp_path / "absent.json"), output=str(tmp_path / "run"), model="m")
    with pytest.raises(RunLocked, match=rf"pid {holder.pid} .*use another --output"):
        train(cfg)  # refused before it reads its data


def test_other_ranks_are_not_refused(holder, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a torchrun worker: rank 0 stands for the job
    with main_process_lock(tmp_path / "run", "unclutter train"):
        pass


def test_lock_of_a_killed_holder_is_taken_over(holder, tmp_path, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="unclutter.runlock"), RunLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert f"stale lock of holder (pid {holder.pid} " in caplog.text
    assert lock.path.read_text() == ""  # released cleanly: the next taker has nothing to report
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unclutter.runlock"), RunLock(tmp_path / "run"):
        pass
    assert caplog.text == ""


def test_concurrent_eval_is_refused_and_a_killed_one_resumes(model_dir, tmp_path, caplog):
    n = 12
    data, images = write_gqa(tmp_path, n + 4)  # --limit: the last 4 are not asked
    out = tmp_path / "run"
    args = dict(model_name=str(model_dir), method="stock", bench="gqa", data=data, images=images, out=out,
                batch_size=1, limit=n, max_new_tokens=24, device="cpu")  # fmt: skip
    cmd = [sys.executable, "-m", "unclutter.cli", "eval", "--model", str(model_dir), "--method", "stock",
           "--bench", "gqa", "--data", str(data), "--images", str(images), "--out", str(out),
           "--batch-size", "1", "--limit", str(n), "--max-new-tokens", "24", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "predictions.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not (log.exists() and log.read_text().count("\n")):
        time.sleep(0.02)
    try:
        with pytest.raises(RunLocked, match=rf"another unclutter eval \(pid {proc.pid} .*command: .* eval "):
            run_eval(**args)  # refused at once, before anything in the folder is read
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = log.read_text().count("\n")
    assert 1 <= done_before < n, "the first run must be killed mid-way"
    with caplog.at_level(logging.WARNING, logger="unclutter.runlock"):
        metrics = run_eval(**args)
    assert f"pid {proc.pid} " in caplog.text
    ids = [json.loads(line)["id"] for line in log.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))  # every question exactly once
    assert metrics["num_records"] == n == json.loads((out / "metrics.json").read_text())["num_records"]


def test_folders_that_cannot_be_locked_are_named(tmp_path, monkeypatch):
    """A file where the folder should be, a directory where the lock file should be, a file system without locks:
    a ValueError naming the folder and the cause (the CLIs print it as one line), and no file descriptor left open."""
    import errno

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file: cannot create its lock file"):
        RunLock(tmp_path / "file").acquire()
    with pytest.raises(ValueError, match="cannot create its lock file"):
        RunLock(tmp_path / "file" / "below").acquire()
    (tmp_path / "odd" / runlock.LOCK_NAME).mkdir(parents=True)
    with pytest.raises(ValueError, match="cannot create its lock file"):
        RunLock(tmp_path / "odd").acquire()

    def no_locks(fd):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock, "_try_lock", no_locks)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(ValueError, match="cannot lock files .*use a local folder"):
        RunLock(tmp_path / "nfs", option="--output").acquire()
    assert len(os.listdir("/proc/self/fd")) == open_before
