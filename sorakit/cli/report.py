"""`sorakit report RUN_DIR`: all metrics, loss curves and contact sheets of a run in one page."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sorakit.cli.app import app, console, handle_errors


@app.command("report")
@handle_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (e.g. runs/demo) holding stage outputs and metrics/*.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file to write; default RUN_DIR/report.md."),
):
    """Write a Markdown report of a run: every metric in one table, training-loss plots, contact sheets."""
    from sorakit.report import write_report

    path = write_report(run_dir, out)
    console.print(f"wrote {path}")
