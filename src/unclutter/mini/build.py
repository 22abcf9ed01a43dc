"""One mini-LLaVA build: shapes data -> ViT pretraining -> untrained assembly -> `unclutter train` stage 1
(projector, captions) -> stage 2 (projector + LoRA on the LLM, LLaVA-mix-like conversations in the chat format).

``python -m unclutter.mini.build --recipe stock|method|vmtc|cmai --seed S [--root build/mini]``

Every step is skipped when its output is complete and resumed when it is not (the trainer resumes from its
last ``checkpoint-*``), so rerunning the command after a kill continues the build. Data and the ViT are shared
by every recipe and seed (LLaVA-1.5 starts every run from the same CLIP); the projector's init, the data order
and LoRA's init follow the seed. Each step's wall time and the machine's load are appended to
``ROOT/RECIPE-sSEED/build.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from ..ifeval.scoring import write_json_atomic

# The method active in both stages, per recipe: "method" is the paper's (VMTC 50% + CMAI gamma_max 0.6).
RECIPES = {"stock": "stock", "method": "vmtc+cmai", "vmtc": "vmtc", "cmai": "cmai"}
TRAIN_IMAGES, TEST_IMAGES, IF_PER_TASK = 4000, 500, 20
VISION_STEPS = 900


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _step(log: list[dict], name: str, done: bool, fn) -> None:
    """Run ``fn`` unless ``done``; record its wall time and the 1-minute load average before and after."""
    if done:
        print(f"[mini] {name}: done before, skipped", flush=True)
        return
    start, load = time.perf_counter(), _load()
    print(f"[mini] {name}: start (load {load})", flush=True)
    fn()
    seconds = round(time.perf_counter() - start, 1)
    log.append({"step": name, "seconds": seconds, "load_before": load, "load_after": _load()})
    print(f"[mini] {name}: {seconds} s", flush=True)


@contextlib.contextmanager
def _exclusive(path: Path):
    """Wait for, then hold, an exclusive lock on ``path``: builds of two recipes running side by side share the
    data, the ViT and a seed's untrained assembly, and must not write them twice at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def shared_steps(root: Path, log: list[dict]) -> None:
    """Training and held-out data, and the pretrained ViT (shared by every recipe and seed)."""
    with _exclusive(root / ".shared.lock"):
        _shared_steps(root, log)


def _shared_steps(root: Path, log: list[dict]) -> None:
    from ..shapes.dataset import build_shapes
    from ..shapes.vision import pretrain_vision

    _step(log, "data train", (root / "train" / "if16.jsonl").is_file(),
          lambda: build_shapes(root / "train", TRAIN_IMAGES, seed=0))  # fmt: skip
    _step(log, "data test", (root / "test" / "if16.jsonl").is_file(),
          lambda: build_shapes(root / "test", TEST_IMAGES, seed=1, if_per_task=IF_PER_TASK))  # fmt: skip
    _step(log, "vision", (root / "vision" / "vision_pretrain.json").is_file(),
          lambda: pretrain_vision(root / "train", root / "vision", steps=VISION_STEPS))  # fmt: skip


def run_dir(root: Path, recipe: str, seed: int) -> Path:
    return root / f"{recipe}-s{seed}"


def build(recipe: str, seed: int, root: str | Path = "build/mini", configs: str | Path = "configs/mini") -> Path:
    """Build one recipe and seed; returns the stage-2 checkpoint directory."""
    from ..training.trainer import TrainConfig, train
    from .assemble import write_init

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}.")
    root, configs = Path(root), Path(configs)
    out = run_dir(root, recipe, seed)
    out.mkdir(parents=True, exist_ok=True)
    record = out / "build.json"
    log: list[dict] = json.loads(record.read_text())["steps"] if record.is_file() else []

    def save() -> None:  # atomic: a kill mid-write must not leave a file the rerun cannot read
        total = round(sum(e["seconds"] for e in log), 1)
        write_json_atomic(record, {"recipe": recipe, "seed": seed, "seconds": total, "steps": log})

    shared_steps(root, log)
    init = root / f"init-s{seed}"
    with _exclusive(root / f".init-s{seed}.lock"):
        _step(log, "init", (init / "init.json").is_file(), lambda: write_init(root / "vision", init, seed))
    save()
    stages = (("stage1", "pretrain.yaml", init), ("stage2", "finetune.yaml", out / "stage1"))
    for name, config, start in stages:
        cfg = TrainConfig.from_yaml(
            configs / config, model=str(start), output=str(out / name), method=RECIPES[recipe], seed=seed,
            data=str(root / "train" / ("pretrain.json" if name == "stage1" else "finetune.json")),
            images=str(root / "train" / "images"),
        )  # fmt: skip
        _step(log, name, (out / name / "train_log.json").is_file(), lambda cfg=cfg: train(cfg))
        save()
    (out / "DONE").write_text(json.dumps({"seconds": sum(e["seconds"] for e in log)}))
    return out / "stage2"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclutter.mini.build", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="stock", choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="build/mini")
    parser.add_argument("--configs", default="configs/mini")
    parser.add_argument("--shared-only", action="store_true", help="only the data and the ViT (shared by all runs)")
    args = parser.parse_args(argv)
    if args.shared_only:
        log: list[dict] = []
        shared_steps(Path(args.root), log)
        print(json.dumps(log))
        return
    print(build(args.recipe, args.seed, args.root, args.configs))


if __name__ == "__main__":
    main()
