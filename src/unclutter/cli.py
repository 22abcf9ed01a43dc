"""The `unclutter` command line. Each verb is a thin wrapper over a Python function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="unclutter: VMTC + CMAI for vision-language models.", no_args_is_help=True)
ifeval_app = typer.Typer(help="IFEval-exact instruction checking and the 16-task image suite.", no_args_is_help=True)
app.add_typer(ifeval_app, name="ifeval")
console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


@app.callback()
def main() -> None:
    """unclutter: VMTC + CMAI for vision-language models."""


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(__version__)


@ifeval_app.command("score")
def ifeval_score(
    input: Annotated[
        Path, typer.Option("--input", help="IFEval input JSONL {key, prompt, instruction_id_list, kwargs}")
    ],
    responses: Annotated[Path, typer.Option(help="response JSONL {prompt|key, response}")],
    out: Annotated[Path, typer.Option(help="output directory")],
) -> None:
    """Score responses: eval_results_{strict,loose}.jsonl and summary.json in OUT."""
    from .ifeval.scoring import DataError, score_files

    try:
        summary = score_files(input, responses, out)
    except DataError as exc:
        fail(str(exc))
    t = Table(title=f"IFEval ({summary['num_prompts']} prompts, {summary['num_instructions']} instructions)")
    for col in ("", "strict", "loose"):
        t.add_column(col, justify="right" if col else "left")
    for level in ("prompt_level", "instruction_level"):
        t.add_row(
            level,
            *(f"{100 * summary[f'{level}_{m}']:.2f} ({summary[f'{level}_{m}_count']})" for m in ("strict", "loose")),
        )
    for task, e in summary.get("per_task", {}).items():
        t.add_row(task, f"{100 * e['strict_rate']:.1f}", f"{100 * e['loose_rate']:.1f}")
    console.print(t)
    console.print(f"wrote {out}/summary.json")


@ifeval_app.command("build")
def ifeval_build(
    source: Annotated[str, typer.Option(help="LLaVA question JSONL, or a Hugging Face dataset id / saved dir")],
    out: Annotated[Path, typer.Option(help="suite JSONL to write")],
    images: Annotated[Path | None, typer.Option(help="image folder (checks that every image exists)")] = None,
    per_task: Annotated[int, typer.Option(help="records per task")] = 218,
    seed: Annotated[int, typer.Option()] = 0,
    tasks: Annotated[str | None, typer.Option(help="comma-separated subset, e.g. T1,T5,T9")] = None,
) -> None:
    """Build the paper's 16-task instruction-following suite over an image-question set."""
    from .ifeval.scoring import DataError
    from .ifeval.suite import build_suite_file

    try:
        records = build_suite_file(
            source, out, images=images, per_task=per_task, seed=seed, tasks=tasks.split(",") if tasks else None
        )
    except (DataError, ValueError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(records)} records to {out}")


@ifeval_app.command("report")
def ifeval_report(
    runs: Annotated[list[Path], typer.Argument(help="run directories (or summary.json files)")],
    out: Annotated[Path, typer.Option(help="where to write if_table.{md,json,png}")] = Path("if-report"),
    mode: Annotated[str, typer.Option(help="strict or loose")] = "strict",
) -> None:
    """Table 1 layout (T1..T16, AVG; one row per run) as markdown, JSON and a bar chart."""
    from .ifeval.report import to_markdown, write_report

    try:
        tab = write_report(runs, out, mode)
    except ValueError as exc:
        fail(str(exc))
    console.print(to_markdown(tab))
    console.print(f"wrote {out}/if_table.md, if_table.json, if_table.png")


if __name__ == "__main__":
    app()
