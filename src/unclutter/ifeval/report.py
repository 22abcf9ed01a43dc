"""Table-1-style reports: success rate per task T1..T16 and their average, one row per run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .scoring import read_json_object, write_json_atomic
from .suite import TASKS


def load_run(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, summary) of a run: a ``summary.json`` / ``metrics.json`` file or a directory holding one.

    An `unclutter eval` run keeps its IF summary under ``metrics.json["if16"]``.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else [path / "summary.json", path / "metrics.json"]
    for c in candidates:
        if c.is_file():
            data = read_json_object(
                c, "the summary.json of `unclutter ifeval score` or the metrics.json of an `unclutter eval` if16 run"
            )
            data = data.get("if16", data)
            if not isinstance(data, dict) or not isinstance(data.get("per_task"), dict):
                raise ValueError(f"{c} has no per-task results: score a suite built by `unclutter ifeval build`.")
            name = data.get("name") or (path.name if path.is_dir() else path.parent.name)
            return name, data
    raise ValueError(f"{path}: no summary.json or metrics.json found.")


def table(runs: list[tuple[str, dict[str, Any]]], mode: str = "strict") -> dict[str, Any]:
    """{"tasks": [...], "rows": [{"name", "T1".., "AVG"}]} with percentages; AVG averages the tasks present."""
    if mode not in ("strict", "loose"):
        raise ValueError("mode must be 'strict' or 'loose'.")
    tasks = [t for t in TASKS if any(t in s["per_task"] for _, s in runs)]
    rows = []
    for name, summary in runs:
        row: dict[str, Any] = {"name": name}
        values = []
        for t in tasks:
            entry = summary["per_task"].get(t)
            row[t] = None if entry is None else 100.0 * entry[f"{mode}_rate"]
            if row[t] is not None:
                values.append(row[t])
        row["AVG"] = sum(values) / len(values) if values else None
        rows.append(row)
    return {"mode": mode, "tasks": tasks, "rows": rows}


def to_markdown(tab: dict[str, Any]) -> str:
    cols = tab["tasks"] + ["AVG"]
    lines = ["| Method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in tab["rows"]:
        cells = ["-" if row[c] is None else f"{row[c]:.1f}" for c in cols]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    legend = ", ".join(f"{t} {TASKS[t][1]}" for t in tab["tasks"])
    return "\n".join(lines) + f"\n\n{tab['mode']} success rate (%). {legend}.\n"


def bar_chart(tab: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = tab["tasks"] + ["AVG"]
    width = 0.8 / max(len(tab["rows"]), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(cols) * max(1, len(tab["rows"]) / 2)), 4))
    for i, row in enumerate(tab["rows"]):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [row[c] or 0.0 for c in cols], width, label=row["name"])
    ax.set_xticks([j + width * (len(tab["rows"]) - 1) / 2 for j in range(len(cols))], cols)
    ax.set_ylabel(f"{tab['mode']} success rate (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("Instruction following per task (Table 1 layout)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_paths: list[str | Path], out_dir: str | Path, mode: str = "strict") -> dict[str, Any]:
    """Write ``if_table.md``, ``if_table.json`` and ``if_table.png`` to ``out_dir``; returns the table."""
    if not run_paths:
        raise ValueError("give at least one run.")
    tab = table([load_run(p) for p in run_paths], mode)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "if_table.md").write_text(to_markdown(tab), encoding="utf-8")
    write_json_atomic(out / "if_table.json", tab)
    bar_chart(tab, out / "if_table.png")
    return tab
