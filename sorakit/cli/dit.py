"""DiT commands: `sorakit train dit`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sorakit.cli.app import CONFIG_HELP, SET_HELP, handle_errors, report_trained, train_app


@train_app.command("dit")
@handle_errors
def train_dit(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output pipeline directory (default: the config's `out`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt at the step it reached."),
):
    """Train the Diffusion Transformer on packed latent shards; OUT becomes a pipeline for `sorakit sample --model OUT`."""
    from sorakit.config import load_config
    from sorakit.training.dit import TrainDiTConfig, train_dit as run

    overrides = list(set_)
    if out is not None:
        overrides.append(f"out={out}")
    cfg = load_config(TrainDiTConfig, config, overrides)
    path = run(cfg, resume=resume)
    report_trained(f"pipeline written to {path} (sample with: sorakit sample \"PROMPT\" --model {path} --out OUT.mp4)")
