"""`unclutter demo`: the shipped mini-LLaVA (or any LLaVA) with and without the method, side by side.

By default three arms of the shipped mini-LLaVA (SmolLM2-135M-Instruct + the shapes ViT, `unclutter.mini`):
the stock-trained model, the same model with SPD, and the model trained with VMTC + CMAI active (the paper's
recipe), run with its training-time configs. With ``--model`` (any LLaVA): stock / SPD / VMTC+CMAI as plug-ins.
For a few images it asks questions with instructions and prints, per arm, the answer, whether the instruction
was followed, whether the answer is right (when the ground truth is known), the image tokens sent to the LLM
and the time. It also scores a small bundled benchmark per arm for the IF / VQA chart, and draws VMTC's token
map and CMAI's inhibition map for the first image (`unclutter.viz`). Everything lands in ``out``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .config import CMAIConfig, SPDConfig, VMTCConfig
from .ifeval import describe, follows
from .ifeval.suite import TASKS, _draw
from .metrics import gqa_match

DEMO_SEED = 2026
DEMO_TASKS = ("T3", "T9", "T11", "T15", "T6", "T2")  # visible formats: caps, JSON, bullets, end phrase...


def _instruction(task: str, rng: random.Random) -> tuple[str, dict]:
    """(instruction id, kwargs) of suite task ``task``, kwargs drawn as the if16 suite draws them."""
    return TASKS[task][0], _draw(task, rng)


@dataclass
class Item:
    image: Image.Image
    name: str
    prompt: str
    instruction_id: str | None = None
    kwargs: dict = field(default_factory=dict)
    answer: str | None = None  # ground truth short answer, when known


def shapes_items(num: int, seed: int = DEMO_SEED) -> list[Item]:
    """Questions with instructions about fresh shapes-world images (the demo's bundled images)."""
    from .shapes.text import QUESTION_TYPES, ask
    from .shapes.world import render, sample_scene

    items = []
    for i in range(num):
        rng = random.Random(f"unclutter-demo:{seed}:{i}")
        scene = sample_scene(rng)
        qa = ask(scene, QUESTION_TYPES[i % len(QUESTION_TYPES)], rng)
        iid, kwargs = _instruction(DEMO_TASKS[i % len(DEMO_TASKS)], rng)
        items.append(
            Item(render(scene), f"shapes-{i}", f"{qa.question} {describe(iid, kwargs)}", iid, kwargs, qa.short)
        )
    return items


def image_items(paths: list[Path], seed: int = DEMO_SEED) -> list[Item]:
    """User images: a generic question with an instruction each; no ground truth."""
    from .evaluation.images import open_image

    items = []
    for i, path in enumerate(paths):
        rng = random.Random(f"unclutter-demo:{seed}:{i}")
        iid, kwargs = _instruction(DEMO_TASKS[i % len(DEMO_TASKS)], rng)
        prompt = f"What objects are in the image? {describe(iid, kwargs)}"
        items.append(Item(open_image(Path(path)), Path(path).stem, prompt, iid, kwargs))
    return items


@dataclass
class Arm:
    """One column of the demo: a model, its processor and the method configs applied to it."""

    model: object
    processor: object
    configs: dict = field(default_factory=dict)


def spd_grid(model) -> int:
    """SPD's grid for about VMTC's 50% of the patch tokens (8x8 = 64 of 12x12 = 144 on the mini-LLaVA)."""
    vision = model.config.vision_config
    return max(1, round(vision.image_size // vision.patch_size / math.sqrt(2)))


DEMO_FAMILIES = ("LLaVA-1.5", "LLaVA-NeXT")  # SPD's grid below reads their single-resolution CLIP geometry


def demo_methods(model, processor) -> dict[str, Arm]:
    """A LLaVA-1.5 or LLaVA-NeXT: stock / SPD / VMTC+CMAI as plug-ins on the one model."""
    from .integrations.base import adapter_for

    family = adapter_for(model).family
    if family not in DEMO_FAMILIES:
        raise ValueError(
            f"the demo compares stock, SPD and VMTC+CMAI on a {' or '.join(DEMO_FAMILIES)} model, not {family}; "
            "for this family use `unclutter visualize` (pictures) or `unclutter eval` (benchmarks)."
        )
    return {
        "stock": Arm(model, processor),
        "spd": Arm(model, processor, {"spd": SPDConfig(grid=spd_grid(model))}),
        "vmtc+cmai": Arm(model, processor, {"vmtc": VMTCConfig(), "cmai": CMAIConfig()}),
    }


def shipped_arms() -> dict[str, Arm]:
    """The shipped mini-LLaVA: stock-trained, stock-trained + SPD, and trained with VMTC + CMAI (its recorded
    configs re-applied, as `unclutter eval --method checkpoint` does). SmolLM2's GGUF is read once."""
    import copy

    import torch

    from .methods import resolve
    from .mini.assemble import load_llm
    from .mini.ship import load_shipped

    llm = load_llm()
    stock, stock_proc = load_shipped("stock", llm=(copy.deepcopy(llm[0]), llm[1]))
    ours, ours_proc = load_shipped("method", llm=llm)
    stock, ours = stock.to(torch.bfloat16), ours.to(torch.bfloat16)  # as the miniature runs them; twice fp32's speed
    configs = {k: v for k, v in resolve("checkpoint", (), ours.config.unclutter).items() if v is not None}
    return {
        "stock": Arm(stock, stock_proc),
        "spd": Arm(stock, stock_proc, {"spd": SPDConfig(grid=spd_grid(stock))}),
        "ours (trained)": Arm(ours, ours_proc, configs),
    }


def correct(prediction: str, answer: str) -> bool:
    """The short answer is right, or a longer (instructed) answer contains it as a word."""
    if gqa_match(prediction, answer):
        return True
    words = "".join(ch.lower() if ch.isalnum() else " " for ch in prediction).split()
    # whole words only: "2" must not match "12", "red" must not match "tired"
    return f" {' '.join(answer.lower().split())} " in f" {' '.join(words)} "


def run_methods(arms: dict[str, Arm], items: list[Item], max_new_tokens: int, batch: int = 8):
    """{arm: {"answers", "followed", "correct", "tokens", "seconds"}} for ``items``."""
    from . import apply
    from .evaluation.generation import build_prompt, generate

    results = {}
    for name, arm in arms.items():
        model, processor = arm.model, arm.processor
        with apply(model, processor, **arm.configs) as handle:  # stock ({}) too: the handle knows the token count
            start = time.perf_counter()
            answers: list[str] = []
            for s in range(0, len(items), batch):
                chunk = items[s : s + batch]
                prompts = [build_prompt(processor, it.prompt) for it in chunk]
                answers += generate(
                    model, processor, prompts, [it.image for it in chunk], max_new_tokens=max_new_tokens
                )
            seconds = time.perf_counter() - start
            tokens = handle.num_image_tokens
        results[name] = {
            "answers": answers,
            "followed": [
                follows(it.instruction_id, it.kwargs, a, prompt=it.prompt) if it.instruction_id else None
                for it, a in zip(items, answers, strict=True)
            ],
            "correct": [correct(a, it.answer) if it.answer else None for it, a in zip(items, answers, strict=True)],
            "tokens": tokens,
            "seconds": seconds,
        }
    return results


def chart(summary: dict[str, dict], path: Path) -> Path:
    """Bars of instruction following and VQA accuracy per method."""
    from .viz import _plt

    plt = _plt()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.38
    for k, (metric, label) in enumerate((("if", "instruction following"), ("vqa", "VQA accuracy"))):
        vals = [100 * summary[n][metric] for n in names]
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(names))], vals, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), [f"{n}\n({summary[n]['tokens']} img tok)" for n in names], fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("%")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Demo benchmark (bundled shapes questions)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_items(num: int, seed: str = "unclutter-demo-bench") -> tuple[list[Item], list[Item]]:
    """The chart's benchmark: ``num`` short-answer VQA items and ``num`` instruction items (the 16 tasks in turn)."""
    from .evaluation.runner import SHORT_ANSWER
    from .shapes.text import QUESTION_TYPES, ask
    from .shapes.world import render, sample_scene

    vqa, ifs = [], []
    for i in range(num):
        rng = random.Random(f"{seed}:{i}")
        scene = sample_scene(rng)
        image = render(scene)
        qa = ask(scene, QUESTION_TYPES[i % len(QUESTION_TYPES)], rng)
        vqa.append(Item(image, f"vqa-{i}", f"{qa.question}\n{SHORT_ANSWER}", answer=qa.short))
        iid, kwargs = _instruction(list(TASKS)[i % len(TASKS)], rng)
        ifs.append(Item(image, f"if-{i}", f"{qa.question} {describe(iid, kwargs)}", iid, kwargs))
    return vqa, ifs


def load(model: str | None):
    """The shipped mini-LLaVA trained with VMTC + CMAI (default) or a hub id / local LLaVA directory."""
    from .evaluation.generation import load_model

    if model is None:
        from .mini.ship import load_shipped

        return load_shipped("method")
    return load_model(model)


def run_demo(
    model: str | None = None,
    images: list[Path] | None = None,
    out: str | Path = "demo-output",
    *,
    num_items: int = 4,
    bench_size: int = 16,
    max_new_tokens: int = 48,
    console=None,
) -> dict:
    """Run the demo; returns (and writes to ``out/demo.json``) everything it printed and drew."""
    from rich.console import Console
    from rich.table import Table

    from .viz import visualize

    if bench_size < 1 or max_new_tokens < 1:
        raise ValueError(f"bench_size and max_new_tokens must be >= 1, got {bench_size} and {max_new_tokens}.")
    console = console or Console()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    methods = shipped_arms() if model is None else demo_methods(*load(model))
    console.print(
        f"[bold]model[/]: {model or 'shipped mini-LLaVA (SmolLM2-135M-Instruct)'}  "
        f"(loaded in {time.perf_counter() - start:.1f}s)"
    )
    items = image_items(images) if images else shapes_items(num_items)
    for it in items:
        it.image.save(out / "images" / f"{it.name}.png")
    results = run_methods(methods, items, max_new_tokens)

    table = Table(title=f"Questions with instructions: {' vs '.join(methods)}", show_lines=True)
    table.add_column("image / prompt", max_width=38)
    for name in methods:
        r = results[name]
        table.add_column(f"{name}\n{r['tokens']} image tokens, {r['seconds']:.1f}s", max_width=34)
    for k, it in enumerate(items):
        cells = []
        for name in methods:
            r = results[name]
            marks = []
            if r["followed"][k] is not None:
                marks.append("[green]IF ✓[/]" if r["followed"][k] else "[red]IF ✗[/]")
            if r["correct"][k] is not None:
                marks.append("[green]right[/]" if r["correct"][k] else "[red]wrong[/]")
            cells.append(f"{r['answers'][k]}\n{' '.join(marks)}")
        truth = f" (truth: {it.answer})" if it.answer else ""
        table.add_row(f"[bold]{it.name}[/]{truth}\n{it.prompt}", *cells)
    console.print(table)

    vqa, ifs = bench_items(bench_size)
    scored = run_methods(methods, vqa + ifs, max_new_tokens)
    summary = {
        name: {
            "vqa": sum(map(bool, r["correct"][: len(vqa)])) / len(vqa),
            "if": sum(map(bool, r["followed"][len(vqa) :])) / len(ifs),
            "tokens": r["tokens"],
            "seconds": r["seconds"],
        }
        for name, r in scored.items()
    }
    types = f"all {len(TASKS)} types" if len(ifs) >= len(TASKS) else f"{len(ifs)} of the {len(TASKS)} types"
    bench = Table(title=f"Bundled benchmark: {len(vqa)} VQA questions, {len(ifs)} instruction prompts ({types})")
    for col in ("method", "VQA acc", "IF followed", "image tokens", "time"):
        bench.add_column(col)
    for name, s in summary.items():
        bench.add_row(name, f"{100 * s['vqa']:.1f}%", f"{100 * s['if']:.1f}%", str(s["tokens"]), f"{s['seconds']:.1f}s")
    console.print(bench)

    drawn = list(methods.values())[-1]  # the method's arm: the trained model's own configs, or the plug-in's
    pictures = visualize(
        drawn.model, drawn.processor, items[0].image, items[0].prompt, out, vmtc=drawn.configs.get("vmtc"),
        cmai=drawn.configs.get("cmai"), max_new_tokens=max_new_tokens,
    )  # fmt: skip
    paths = {k: str(v) for k, v in pictures["paths"].items()}
    paths["chart"] = str(chart(summary, out / "if_vqa_chart.png"))
    record = {
        "model": model or "shipped",
        "items": [
            {"name": it.name, "prompt": it.prompt, "truth": it.answer}
            | {m: {k: results[m][k][i] for k in ("answers", "followed", "correct")} for m in methods}
            for i, it in enumerate(items)
        ],
        "methods": {m: {"tokens": results[m]["tokens"], "seconds": results[m]["seconds"]} for m in methods},
        "benchmark": summary,
        "pictures": paths,
        "seconds": time.perf_counter() - start,
    }
    (out / "demo.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    console.print(
        f"pictures in {out}/: " + ", ".join(Path(p).name for p in paths.values())
        + f"  (total {record['seconds']:.0f}s)"
    )  # fmt: skip
    return record
