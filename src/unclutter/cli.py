"""The `unclutter` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="unclutter: VMTC + CMAI for vision-language models.", no_args_is_help=True)


@app.callback()
def main() -> None:
    """unclutter: VMTC + CMAI for vision-language models."""


@app.command()
def version() -> None:
    """Print the installed version."""
    from . import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
