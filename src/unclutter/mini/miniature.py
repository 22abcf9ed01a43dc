"""The miniature of the paper: every condition on held-out shapes data, with seeds and bootstrap intervals.

``python -m unclutter.mini.miniature [--root build/mini] [--out benchmarks/miniature] [--seeds 0,1,2]``

Data: ``ROOT/test`` (`unclutter data shapes --num 500 --seed 1 --if-per-task 20`): 500 VQA questions scored
with the GQA metric and 320 instruction prompts (20 for each of the 16 tasks), IFEval strict and loose.
Every condition runs through the harness (`unclutter.evaluation.runner.run_eval`, one run folder per model,
condition and benchmark under ``ROOT/runs``), on models rebuilt from their shipped parts (`ship.load_parts`),
so the numbers are those of the weights the package ships. Runs resume; conditions whose model is not built
yet are listed as pending. After every condition the results are rewritten (``OUT/results.{json,md}``,
``OUT/fig2.png``), so an interrupted miniature still leaves a consistent, labelled partial table.

Models run in bfloat16 (about twice as fast as float32 on CPUs with AVX-512 BF16; VMTC's ranking and K-means and
CMAI's quantiles compute in float32 whatever the model's dtype). The demo runs them in float32.

Statistics: each number is the mean over seeds and questions (IF: the mean of the 16 per-task success rates);
its 95% interval is a percentile bootstrap that resamples seeds and, within each seed set, questions (IF:
within each task). Differences against stock are paired: the same seeds' questions, resampled together.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..evaluation.data import load_records
from ..evaluation.runner import PredictionLog, compute_metrics, question_text, run_eval, score_record
from ..ifeval.scoring import write_json_atomic
from ..ifeval.suite import TASKS
from ..runlock import RunLock

BENCHES = ("gqa", "if16")
MAX_NEW_TOKENS = {"gqa": 16, "if16": 128}
DESCRIBE_TOKENS = 128  # describe-then-answer: the description and the answer share the harness's one limit (IF's)
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Condition:
    """One row: a model (``recipe`` trained, one per seed), a harness method with ``--set`` overrides."""

    name: str
    label: str
    recipe: str  # "stock", "method", "vmtc", "cmai" (trained recipes) or "base" (SmolLM2 without training)
    method: str
    overrides: tuple[str, ...] = ()
    all_seeds: bool = True  # else the first seed only


VMTC_CMAI = "vmtc+cmai"
CONDITIONS = [  # in the order they run: the headline rows first, then the ablations
    Condition("stock", "stock", "stock", "stock"),
    Condition("trained", "VMTC + CMAI, trained in (ours)", "method", "checkpoint"),
    Condition("plugin", "VMTC + CMAI, plug-in", "stock", VMTC_CMAI),
    Condition("spd8", "SPD 8x8", "stock", "spd", ("spd.grid=8",)),
    Condition("ceiling", "SmolLM2 on the true scene description (text only)", "base", "ceiling", (), False),
    Condition("vmtc", "VMTC, plug-in", "stock", "vmtc"),
    Condition("cmai", "CMAI, plug-in", "stock", "cmai"),
    Condition("dta", "upper limit: describe-then-answer", "stock", "describe-then-answer", (), False),
    Condition("spd10", "SPD 10x10", "stock", "spd", ("spd.grid=10",), False),
    Condition("spd6", "SPD 6x6", "stock", "spd", ("spd.grid=6",), False),
    Condition("spd4", "SPD 4x4", "stock", "spd", ("spd.grid=4",), False),
    Condition(
        "t4-llp", "CMAI + last-layer pruning (LLP)", "stock", VMTC_CMAI, ("vmtc.num_stages=1", "vmtc.merge=drop"), False
    ),  # fmt: skip
    Condition("t4-lwp", "CMAI + layer-wise pruning (LWP)", "stock", VMTC_CMAI, ("vmtc.merge=drop",), False),
    Condition("t4-mg", "CMAI + LWP + merging (MG)", "stock", VMTC_CMAI, ("vmtc.merge=single",), False),
    Condition("t5-tia", "VMTC + CMAI, focus TIA", "stock", VMTC_CMAI, ("cmai.focus=tia",), False),
    Condition("t5-sum", "VMTC + CMAI, focus sum TIA", "stock", VMTC_CMAI, ("cmai.focus=sum",), False),
    Condition("t5-disc", "VMTC + CMAI, focus discounted sum", "stock", VMTC_CMAI, ("cmai.focus=discounted",), False),
    Condition("trained-vmtc", "VMTC, trained in", "vmtc", "checkpoint", (), False),
    Condition("trained-cmai", "CMAI, trained in", "cmai", "checkpoint", (), False),
]
BY_NAME = {c.name: c for c in CONDITIONS}


class Models:
    """Rebuilt mini-LLaVAs, one held at a time (each is SmolLM2 plus its parts; the GGUF is read once)."""

    def __init__(self, root: Path, llm=None) -> None:
        """``llm``: a loaded (model, tokenizer) to use instead of SmolLM2 (tests pass a tiny one)."""
        self.root, self._llm, self._key, self._model = root, llm, None, None

    def built(self, recipe: str, seed: int) -> bool:
        return recipe == "base" or (self.root / f"{recipe}-s{seed}" / "DONE").is_file()

    def get(self, recipe: str, seed: int):
        from .assemble import assemble_mini, load_llm
        from .ship import extract, load_parts

        if self._key != (recipe, seed):
            if self._llm is None:
                self._llm = load_llm()
            llm = (copy.deepcopy(self._llm[0]), self._llm[1])
            if recipe == "base":
                self._model = assemble_mini(self.root / "vision", 0, llm)
            else:
                run = self.root / f"{recipe}-s{seed}"
                if not (run / "parts" / "recipe.json").is_file():
                    extract(run, run / "parts")
                self._model = load_parts(run / "parts", self.root / "vision", llm)
            self._key = (recipe, seed)
        return self._model


def run_dir(root: Path, cond: Condition, seed: int, bench: str) -> Path:
    model = "base" if cond.recipe == "base" else f"{cond.recipe}-s{seed}"
    return root / "runs" / model / f"{cond.name}-{bench}"


def finished(run: Path) -> bool:
    return (run / "metrics.json").is_file()


def image_tokens(model, processor, cond: Condition) -> int:
    """What the LLM receives per image under ``cond`` (the method's own count; text-only conditions: 0)."""
    from .. import apply
    from ..methods import resolve

    if cond.method in ("ceiling",):
        return 0
    recorded = getattr(model.config, "unclutter", None)
    configs = resolve(cond.method if cond.method != "describe-then-answer" else "stock", cond.overrides, recorded)
    with apply(model, processor, **{k: v for k, v in configs.items() if v is not None}) as handle:
        return handle.num_image_tokens


def ceiling_eval(model, processor, bench: str, records: list[dict], descriptions: dict[str, str], out: Path,
                 batch_size: int) -> dict:  # fmt: skip
    """The LLM's own ceiling: each question asked about the true scene description, text only, in the prompt
    describe-then-answer uses; written as a harness run folder (config, predictions, metrics)."""
    with RunLock(out, what="the miniature's ceiling run"):  # one writer, as every harness run folder
        return _ceiling_eval(model, processor, bench, records, descriptions, out, batch_size)


def _ceiling_eval(model, processor, bench, records, descriptions, out: Path, batch_size: int) -> dict:
    from ..evaluation.generation import build_prompt, generate

    config = {"method": "ceiling", "bench": bench, "max_new_tokens": MAX_NEW_TOKENS[bench]}
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) != config:
        raise ValueError(f"{out} holds a ceiling run with other settings; delete it to run again.")
    write_json_atomic(out / "config.json", config)
    log = PredictionLog(out / "predictions.jsonl")
    todo = [r for r in records if r["id"] not in log.rows]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = [
            build_prompt(
                processor, f"Image description: {descriptions[r['image']]}\n\n{question_text(bench, r)}", False
            )
            for r in batch
        ]
        answers = generate(model, processor, prompts, None, max_new_tokens=MAX_NEW_TOKENS[bench])
        log.append([{"id": r["id"], "prediction": a} for r, a in zip(batch, answers, strict=True)])
    metrics = compute_metrics(bench, records, log.rows) | {"name": out.name, "method": "ceiling", "label": "ceiling"}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def descriptions_of(test: Path) -> dict[str, str]:
    from ..ifeval.scoring import read_jsonl
    from ..shapes.text import description
    from ..shapes.vision import _scene_from_dict

    return {s["image"]: description(_scene_from_dict(s)) for _, s in read_jsonl(test / "scenes.jsonl")}


def run_condition(cond: Condition, seeds: list[int], root: Path, models: Models, records: dict, batch_size: int,
                  dtype: str = "bfloat16") -> list[int]:  # fmt: skip
    """Run ``cond`` for every built seed (resuming); returns the seeds still pending (model not built)."""
    test = root / "test"
    pending = []
    for seed in seeds if cond.all_seeds else seeds[:1]:
        if not models.built(cond.recipe, seed):
            pending.append(seed)
            continue
        for bench in BENCHES:
            out = run_dir(root, cond, seed, bench)
            if finished(out):
                continue
            model, processor = models.get(cond.recipe, seed)
            model.to(getattr(torch, dtype))
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / "tokens.json", {"image_tokens": image_tokens(model, processor, cond)})
            print(f"[miniature] {cond.name} seed {seed} {bench}", flush=True)
            if cond.method == "ceiling":
                ceiling_eval(model, processor, bench, records[bench], descriptions_of(test), out, batch_size)
                continue
            tokens = DESCRIBE_TOKENS if cond.method == "describe-then-answer" else MAX_NEW_TOKENS[bench]
            run_eval(
                model_name=f"{cond.recipe}-s{seed}", method=cond.method, bench=bench,
                data=test / ("vqa.jsonl" if bench == "gqa" else "if16.jsonl"), images=test / "images", out=out,
                batch_size=batch_size, overrides=list(cond.overrides), max_new_tokens=tokens,
                model_and_processor=(model, processor),
            )  # fmt: skip
    return pending


# ---- statistics -------------------------------------------------------------------------------------------


def score_matrix(root: Path, cond: Condition, seeds: list[int], bench: str, records: list[dict], mode: str = "strict"):
    """(seeds with a finished run, (S, Q) per-question scores): VQA accuracy, or IF success (all instructions
    followed, ``mode`` strict or loose)."""
    done, rows = [], []
    for seed in seeds if cond.all_seeds else seeds[:1]:
        run = run_dir(root, cond, seed, bench)
        if not finished(run):
            continue
        preds = PredictionLog(run / "predictions.jsonl").rows
        scores = []
        for rec in records:
            s = score_record(bench, rec, preds[rec["id"]].get("prediction"))
            scores.append(s["accuracy"] if bench == "gqa" else float(all(s[mode])))
        done.append(seed)
        rows.append(scores)
    return done, np.array(rows, dtype=np.float64)


def bootstrap(x: np.ndarray, groups: np.ndarray | None, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the statistic over seeds (rows) and questions (columns), questions
    resampled within ``groups`` (the statistic is then the mean of the group means)."""
    rng = np.random.default_rng(seed)
    s, q = x.shape
    per_q = x[rng.integers(0, s, (BOOTSTRAP, s))].mean(1) if s > 1 else np.repeat(x, BOOTSTRAP, 0)  # (B, Q)
    if groups is None:
        point = x.mean()
        stats = np.take_along_axis(per_q, rng.integers(0, q, (BOOTSTRAP, q)), 1).mean(1)
    else:
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        point = np.mean([x[:, m].mean() for m in members])
        stats = np.mean(
            [np.take_along_axis(per_q[:, m], rng.integers(0, len(m), (BOOTSTRAP, len(m))), 1).mean(1) for m in members],
            axis=0,
        )
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(point) * 100, float(lo) * 100, float(hi) * 100


def summarize_condition(root: Path, cond: Condition, seeds: list[int], records: dict) -> dict | None:
    """Means, intervals, per-task and per-type numbers and paired differences against stock for ``cond``."""
    tasks = np.array([r["task"] for r in records["if16"]])
    kinds = [r.get("kind") for r in records["gqa"]]
    out: dict = {"label": cond.label, "recipe": cond.recipe, "method": cond.method, "overrides": list(cond.overrides)}
    stock = BY_NAME["stock"]
    any_done = False
    for key, bench, mode in (("vqa", "gqa", "strict"), ("if_strict", "if16", "strict"), ("if_loose", "if16", "loose")):
        done, x = score_matrix(root, cond, seeds, bench, records[bench], mode)
        if not done:
            continue
        any_done = True
        groups = tasks if bench == "if16" else None
        mean, lo, hi = bootstrap(x, groups)
        entry = {"mean": mean, "ci": [lo, hi], "seeds": done, "per_seed": [bootstrap(r[None], groups)[0] for r in x]}
        if bench == "if16":
            entry["per_task"] = {t: float(x[:, tasks == t].mean() * 100) for t in TASKS}
        else:
            entry["per_kind"] = {k: float(x[:, [i for i, kk in enumerate(kinds) if kk == k]].mean() * 100)
                                 for k in sorted(set(kinds))}  # fmt: skip
        if cond.name != "stock" and cond.recipe != "base":
            base_done, base = score_matrix(root, stock, seeds, bench, records[bench], mode)
            common = [s for s in done if s in base_done]
            if common:
                d = x[[done.index(s) for s in common]] - base[[base_done.index(s) for s in common]]
                dm, dlo, dhi = bootstrap(d, groups)
                entry["diff_vs_stock"] = {"mean": dm, "ci": [dlo, dhi], "seeds": common}
        out[key] = entry
        tokens = (
            root / "runs" / ("base" if cond.recipe == "base" else f"{cond.recipe}-s{done[0]}") / f"{cond.name}-{bench}"
        )
        if (tokens / "tokens.json").is_file():
            out["image_tokens"] = json.loads((tokens / "tokens.json").read_text())["image_tokens"]
    return out if any_done else None


# ---- tables -----------------------------------------------------------------------------------------------


def _ci(entry: dict | None, key: str = "mean") -> str:
    if not entry:
        return "pending"
    e = entry if key == "mean" else entry.get(key)
    if not e:
        return "-"
    return f"{e['mean']:.1f} [{e['ci'][0]:.1f}, {e['ci'][1]:.1f}]"


def _seeds(r: dict) -> str:
    """Seeds behind the row's numbers: one count, or VQA's and IF's when an unfinished run left them different."""
    vqa, ifs = (len((r.get(k) or {}).get("seeds", [])) for k in ("vqa", "if_strict"))
    return str(max(vqa, ifs)) if vqa == ifs or not (vqa and ifs) else f"{vqa} VQA / {ifs} IF"


def comparison_table(results: dict, names: list[str], title: str) -> list[str]:
    """Rows of ``names``: how many seeds, image tokens, VQA, IF strict and loose, and paired differences."""
    lines = [f"### {title}", "", "| condition | seeds | image tokens | VQA | Δ VQA | IF strict | Δ IF strict | IF loose |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for n in names:
        r = results.get(n)
        if r is None:
            lines.append(f"| {BY_NAME[n].label} | pending | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {_seeds(r)} | {r.get('image_tokens', '-')} | {_ci(r.get('vqa'))} | "
            f"{_ci(r.get('vqa'), 'diff_vs_stock')} | {_ci(r.get('if_strict'))} | "
            f"{_ci(r.get('if_strict'), 'diff_vs_stock')} | {_ci(r.get('if_loose'))} |"
        )
    return lines + [""]


def table1(results: dict, names: list[str]) -> list[str]:
    """The paper's Table 1 layout: VQA, then T1-T16 (strict success, mean over seeds) and AVG."""
    head = "| method | VQA | " + " | ".join(TASKS) + " | AVG strict | AVG loose |"
    lines = ["### Table 1: instruction following per task (strict) and VQA", "", head,
             "|---" * (len(TASKS) + 4) + "|"]  # fmt: skip
    for n in names:
        r = results.get(n)
        if r is None or "if_strict" not in r:
            lines.append(f"| {BY_NAME[n].label} | pending |" + " |" * (len(TASKS) + 2))
            continue
        tasks = " | ".join(f"{r['if_strict']['per_task'][t]:.0f}" for t in TASKS)
        lines.append(
            f"| {r['label']} ({_seeds(r)} seeds) | {_ci(r.get('vqa'))} | {tasks} | {_ci(r['if_strict'])} | "
            f"{_ci(r.get('if_loose'))} |"
        )
    return lines + [""]


FIG2 = ["stock", "spd10", "spd8", "spd6", "spd4"]


def fig2(results: dict, path: Path) -> list[str]:
    """The pilot study: SPD grids on the stock-trained model (JSON task, keyword task, IF AVG, VQA vs tokens)."""
    rows = [(n, results[n]) for n in FIG2 if n in results and "if_strict" in results[n] and "vqa" in results[n]]
    lines = [
        "### Fig. 2: spatial down-sampling on the stock-trained model (first seed)",
        "",
        "| condition | image tokens | T9 JSON | T7 keyword | IF AVG strict | VQA |",
        "|---|---|---|---|---|---|",
    ]
    for _, r in rows:
        per_seed0 = r["if_strict"]["per_task"]
        lines.append(f"| {r['label']} | {r.get('image_tokens', '-')} | {per_seed0['T9']:.0f} | {per_seed0['T7']:.0f} | "
                     f"{_ci(r['if_strict'])} | {_ci(r['vqa'])} |")  # fmt: skip
    if len(rows) >= 2:
        from ..viz import _plt

        plt = _plt()
        fig, axes = plt.subplots(1, 4, figsize=(12, 3))
        tokens = [r.get("image_tokens", 0) for _, r in rows]
        series = [("JSON task (T9)", [r["if_strict"]["per_task"]["T9"] for _, r in rows]),
                  ("keyword task (T7)", [r["if_strict"]["per_task"]["T7"] for _, r in rows]),
                  ("IF, all 16 (AVG)", [r["if_strict"]["mean"] for _, r in rows]),
                  ("VQA (GQA metric)", [r["vqa"]["mean"] for _, r in rows])]  # fmt: skip
        for ax, (title, ys) in zip(axes, series, strict=True):
            ax.plot(tokens, ys, "o-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.set_xlabel("image tokens")
            ax.set_title(title, fontsize=9)
            ax.set_ylabel("%")
        fig.suptitle("SPD on the stock-trained mini-LLaVA (held-out shapes data)", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        lines += ["", f"![Fig. 2]({path.name})"]
    return lines + [""]


def write_results(root: Path, out: Path, seeds: list[int], records: dict, pending: dict[str, list[int]]) -> dict:
    """Summaries of every condition with a finished run -> OUT/results.json, OUT/results.md, OUT/fig2.png."""
    out.mkdir(parents=True, exist_ok=True)
    results, first = {}, {}
    for cond in CONDITIONS:
        s = summarize_condition(root, cond, seeds, records)
        if s is not None:
            results[cond.name] = s
        # The ablations ran on the first seed only: their tables compare every row on that seed alone (a
        # condition run on the first seed only is already summarised on it)
        if cond.all_seeds and len(seeds) > 1:
            s = summarize_condition(root, cond, seeds[:1], records)
        if s is not None:
            first[cond.name] = s
    data = {"seeds": seeds, "vqa_questions": len(records["gqa"]), "if_prompts": len(records["if16"]),
            "bootstrap": BOOTSTRAP, "pending": pending, "conditions": results,
            "first_seed_conditions": first}  # fmt: skip
    write_json_atomic(out / "results.json", data)
    # Table 3: VMTC and CMAI trained in where those recipes were built; the plug-in rows are there in any case
    trained_rows = [n for n in ("trained-vmtc", "trained-cmai") if n in results]
    md = ["# The miniature: results", "",
          f"Held-out shapes data: {len(records['gqa'])} VQA questions (GQA metric), {len(records['if16'])} instruction "
          f"prompts (16 tasks x {len(records['if16']) // 16}). Mean over seeds and questions, 95% bootstrap interval in "
          "brackets; Δ: paired difference against stock (same seeds, same questions). Written by "
          "`python -m unclutter.mini.miniature`; pending rows wait for their model or run.", ""]  # fmt: skip
    md += comparison_table(results, ["stock", "trained", "plugin", "spd8", "dta"], "Headline")
    md += table1(results, ["stock", "spd8", "dta", "trained"])
    md += fig2(first, out / "fig2.png")
    md += comparison_table(
        results,
        ["stock", *trained_rows, "trained", "vmtc", "cmai", "plugin"],
        "Table 3: modules (trained in where trained, else plug-ins on the stock-trained model)",
    )
    md += comparison_table(
        first,
        ["cmai", "t4-llp", "t4-lwp", "t4-mg", "plugin"],
        "Table 4: VMTC stages, with CMAI (plug-ins on the stock-trained model, first seed)",
    )
    md += comparison_table(
        first,
        ["vmtc", "t5-tia", "t5-sum", "t5-disc", "plugin"],
        "Table 5: focus scores, with VMTC (plug-ins on the stock-trained model, first seed)",
    )
    md += comparison_table(results, ["ceiling", "stock", "dta"], "The LLM's own ceiling")
    md += [
        "### VQA per question type",
        "",
        "| condition | " + " | ".join(k for k in results.get("stock", {}).get("vqa", {}).get("per_kind", {})) + " |",
    ]
    kinds = list(results.get("stock", {}).get("vqa", {}).get("per_kind", {}))
    md += ["|---" * (len(kinds) + 1) + "|"]
    for r in results.values():
        if "vqa" in r:
            md.append(f"| {r['label']} | " + " | ".join(f"{r['vqa']['per_kind'].get(k, 0):.1f}" for k in kinds) + " |")
    if pending:
        md += ["", "Pending (model not built yet): " + ", ".join(f"{k} seeds {v}" for k, v in pending.items())]
    (out / "results.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unclutter.mini.miniature", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="build/mini", help="the builds (`python -m unclutter.mini.build`)")
    parser.add_argument("--out", default="benchmarks/miniature", help="results.{json,md} and fig2.png")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated condition names (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from finished runs")
    args = parser.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds repeats a seed: {args.seeds!r}")
    unknown = [n for n in (args.only or "").split(",") if n and n not in BY_NAME]
    if unknown:
        parser.error(f"--only: unknown conditions {unknown}; choose from {', '.join(BY_NAME)}")
    test = root / "test"
    records = {"gqa": load_records("gqa", test / "vqa.jsonl", test / "images"),
               "if16": load_records("if16", test / "if16.jsonl", test / "images")}  # fmt: skip
    conditions = [BY_NAME[n] for n in args.only.split(",")] if args.only else CONDITIONS
    models, pending = Models(root), {}
    for cond in conditions:
        if not args.report_only:
            waiting = run_condition(cond, seeds, root, models, records, args.batch_size)
        else:
            waiting = [s for s in (seeds if cond.all_seeds else seeds[:1]) if not models.built(cond.recipe, s)]
        if waiting:
            pending[cond.name] = waiting
        write_results(root, out, seeds, records, pending)
    print(f"wrote {out}/results.md")


if __name__ == "__main__":
    main()
