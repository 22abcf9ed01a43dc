"""`unclutter report`: compare evaluation runs side by side (Table 1 / Table 2 style)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..ifeval.report import bar_chart, table, to_markdown
from ..ifeval.scoring import read_json_object, write_json_atomic

COLUMNS = {  # (column title, bench, metric key)
    "IF": ("if16", "if_avg_strict"),
    "VQAv2": ("vqav2", "accuracy"),
    "GQA": ("gqa", "accuracy"),
    "TextVQA": ("textvqa", "accuracy"),
    "MME": ("mme", "perception"),
    "MMB": ("mmbench", "circular_accuracy"),
}
HEADLINES = dict(COLUMNS.values())  # bench -> its headline metric


def load_metrics(run: str | Path) -> dict[str, Any]:
    path = Path(run) / "metrics.json" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise ValueError(f"{run}: no metrics.json (finish the run with `unclutter eval` first).")
    what = "a run folder of `unclutter eval` or its metrics.json (`unclutter ifeval report` takes IFEval summaries)"
    m = read_json_object(path, what)
    if m.get("bench") not in HEADLINES:
        raise ValueError(f"{path} is not the metrics.json of an `unclutter eval` run (no known 'bench'); give {what}.")
    key = HEADLINES[m["bench"]]
    if not isinstance(m.get(key), int | float):  # a row without its number would be dropped from the table
        hint = (
            " (its if16 file has no 'task' fields, which if16 runs need since 2026-12-06: rebuild the suite with "
            "`unclutter ifeval build` and evaluate it into a new folder, or leave this run out of the report)"
        )
        raise ValueError(f"{path}: the {m['bench']} run has no {key}{hint if m['bench'] == 'if16' else ''}.")
    m.setdefault("name", path.parent.name)
    m["run"] = str(path.parent)  # the run folder, to tell apart runs that would share a row
    return m


def compare(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows keyed by method (each run's metrics contribute their benchmark's headline number). Runs of several
    models side by side (one method on LLaVA-NeXT and on Qwen2.5-VL, say) get one row per model and method."""
    labels = row_labels(metrics)
    rows: dict[str, dict[str, Any]] = defaultdict(dict)
    several = len({m.get("model") for m in metrics}) > 1
    for m, label in zip(metrics, labels, strict=True):
        if several:
            rows[label].update({k: m[k] for k in ("model", "family") if m.get(k)})
        for title, (bench, key) in COLUMNS.items():
            if m["bench"] == bench and key in m:
                rows[label][title] = m[key]
    cols = [c for c in COLUMNS if any(c in r for r in rows.values())]
    return {"columns": cols, "rows": [{"method": k, **v} for k, v in rows.items()]}


def short_names(paths: list[str]) -> dict[str, str]:
    """Each path's shortest end that no other path's shares (``a/checkpoint`` and ``b/checkpoint``;
    ``llava-hf/llava-1.5-7b-hf`` and ``runs/llava-1.5-7b-hf``)."""
    paths = sorted(set(paths))
    names = {}
    for path in paths:
        parts = Path(path).parts or (path,)
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            if all(Path(other).parts[-k:] != tail for other in paths if other != path) or k == len(parts):
                names[path] = "/".join(tail)
                break
    return names


def row_labels(metrics: list[dict[str, Any]]) -> list[str]:
    """Each run's row: its method and overrides, after its model's name (`short_names`) when the runs compared come
    from several models. Runs of one benchmark that would share a row (the same model and method, evaluated twice)
    keep their own rows, each followed by its run folder's name: one number must not overwrite the other."""
    models = short_names([str(m.get("model") or "?") for m in metrics])
    labels = []
    for m in metrics:
        label = m.get("label") or m.get("method") or m["name"]
        labels.append(f"{models[str(m.get('model') or '?')]}: {label}" if len(models) > 1 else label)
    clash = Counter(zip(labels, [m["bench"] for m in metrics], strict=True))
    folders = [str(m.get("run") or m.get("name") or i) for i, m in enumerate(metrics)]
    names = short_names(folders)
    return [
        f"{label} ({names[folder]})" if clash[label, m["bench"]] > 1 else label
        for m, label, folder in zip(metrics, labels, folders, strict=True)
    ]


def compare_markdown(tab: dict[str, Any]) -> str:
    lines = ["| Method | " + " | ".join(tab["columns"]) + " |", "|---" * (len(tab["columns"]) + 1) + "|"]
    for r in tab["rows"]:
        lines.append(
            f"| {r['method']} | " + " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in tab["columns"]) + " |"
        )
    return "\n".join(lines) + "\n"


def compare_chart(tab: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tab["columns"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3 * len(cols), 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        names = [r["method"] for r in tab["rows"] if col in r]
        ax.bar(names, [r[col] for r in tab["rows"] if col in r], color="tab:blue")
        ax.set_title(col)
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(runs: list[str | Path], out: str | Path) -> dict[str, Any]:
    """``comparison.{md,json,png}`` (headline metric per benchmark, one row per method) and, when
    if16 runs are among them, Table 1's per-task layout (``if_table.{md,json,png}``)."""
    if not runs:
        raise ValueError("give at least one run directory.")
    metrics = [load_metrics(run) for run in runs]  # every run checked before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tab = compare(metrics)
    (out / "comparison.md").write_text(compare_markdown(tab), encoding="utf-8")
    write_json_atomic(out / "comparison.json", tab)
    compare_chart(tab, out / "comparison.png")
    if_runs = [
        (label, m["if16"])
        for m, label in zip(metrics, row_labels(metrics), strict=True)
        if m["bench"] == "if16" and "per_task" in m.get("if16", {})
    ]
    if if_runs:
        itab = table(if_runs)
        (out / "if_table.md").write_text(to_markdown(itab), encoding="utf-8")
        write_json_atomic(out / "if_table.json", itab)
        bar_chart(itab, out / "if_table.png")
    return tab
