"""Refiner commands: `sorakit train refiner`, `sorakit set-refiners`, `sorakit refine`, `sorakit eval refiner`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from sorakit.cli.app import CONFIG_HELP, SET_HELP, UserError, app, console, eval_app, handle_errors, report_trained, train_app

MODEL = typer.Option(..., "--model", "-m", help="Trained refiner directory (written by `sorakit train refiner`).")
VAE = typer.Option(None, "--vae", help="VAE directory (default: the one the refiner was trained with).")
STEPS = typer.Option(None, "--steps", min=1, help="Sampling steps (default: the refiner's).")
SAMPLER = typer.Option(None, "--sampler", help="ddim, dpmpp_2m, euler or heun (default: dpmpp_2m for v/eps, euler for flow).")
AUG = typer.Option(None, "--aug", help="Noise level in [0, 1) put on the low-res conditioning (default: the refiner's).")
SEED = typer.Option(0, "--seed", help="Noise seed; the same seed and settings give the same video.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ...")


@train_app.command("refiner")
@handle_errors
def train_refiner(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the config's `out`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
):
    """Train a cascaded refiner (more pixels and/or frames) on raw shards with a frozen VAE."""
    from sorakit.config import load_config
    from sorakit.training.refiner import TrainRefinerConfig, train_refiner as run

    overrides = list(set_) + ([f"out={out}"] if out is not None else [])
    cfg = load_config(TrainRefinerConfig, config, overrides)
    path = run(cfg, resume=resume)
    report_trained(f"refiner written to {path}")


@app.command("set-refiners")
@handle_errors
def set_refiners(
    pipeline: Path = typer.Argument(..., help="Pipeline directory (written by `sorakit train dit`)."),
    refiners: List[Path] = typer.Argument(None, help="Refiner directories, applied in this order; none: remove all."),
):
    """Set the chain of refiners a pipeline applies after its DiT (`sorakit sample --refine`)."""
    from sorakit.generation.pipeline import set_refiners as run

    refs = run(pipeline, list(refiners or []))
    console.print(f"{pipeline}: refiners {', '.join(refs) if refs else 'none'}")


@app.command("refine")
@handle_errors
def refine(
    src: Path = typer.Argument(..., help="Video to refine (any size and length; a sorakit video keeps its prompt)."),
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", "-o", help="Output OUT.mp4 (OUT.json sidecar beside it)."),
    vae: Optional[Path] = VAE,
    steps: Optional[int] = STEPS,
    sampler: Optional[str] = SAMPLER,
    aug: Optional[float] = AUG,
    seed: int = SEED,
    preview: bool = typer.Option(False, "--preview", help="Also write OUT.png, a contact sheet of frames."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality of the output; lower is better."),
    device: str = DEVICE,
):
    """Raise a video's resolution and/or frame rate with a trained refiner."""
    from sorakit.generation.refine import refine_file

    rec = refine_file(src, model, out, vae=vae, device=device, preview=preview, crf=crf,
                      steps=steps, sampler=sampler, aug_level=aug, seed=seed)
    i, o = rec["inputs"]["size"], rec["size"]
    console.print(
        f"wrote {out}: {i['width']}x{i['height']}, {i['frames']} frames → {o['width']}x{o['height']}, "
        f"{o['frames']} frames at {o['fps']:g} fps ({rec['timing']['seconds']:.1f} s)",
        highlight=False,
    )


@eval_app.command("refiner")
@handle_errors
def evaluate(
    shards: str = typer.Argument(..., help="Held-out raw shards: each clip is the ground truth, downsampled then refined."),
    model: Path = MODEL,
    vae: Optional[Path] = VAE,
    limit: int = typer.Option(16, "--limit", "-n", min=1, help="Evaluate at most this many clips."),
    frames: int = typer.Option(17, "--frames", min=1, help="Use at most this many frames of each clip."),
    crop: Optional[int] = typer.Option(None, "--crop", min=2, help="Use a centred crop of at most this many pixels a side (default: the whole frame)."),
    steps: Optional[int] = STEPS,
    sampler: Optional[str] = SAMPLER,
    aug: Optional[float] = AUG,
    seed: int = SEED,
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="Also refine videos this pipeline generates from toy-world prompts."),
    generated: int = typer.Option(8, "--generated", min=0, help="With --pipeline: how many prompts to generate."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout instead of a table."),
):
    """PSNR of refined vs bicubic/linear-upsampled clips against the ground truth, and prompt following."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from sorakit.generation.refine_eval import evaluate_refiner

    if aug is not None and not 0.0 <= aug < 1.0:
        raise UserError(f"--aug must be in [0, 1), got {aug}")
    columns = [TextColumn("refining clips"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("eval", total=limit)
        r = evaluate_refiner(shards, model, vae=vae, limit=limit, max_frames=frames, max_side=crop, steps=steps, sampler=sampler,
                             aug_level=aug, seed=seed, pipeline=pipeline, num_generated=generated if pipeline else 0,
                             progress=lambda n: bar.advance(task, n))
    if as_json:
        print(json.dumps(r, indent=2))
        return
    sc = r["scales"]
    table = Table(title=f"refiner {model} ({sc['spatial']}× space, {sc['temporal']}× time)")
    for col in ("clip", "ground truth T×H×W", "PSNR refined", "PSNR baseline", "gain dB", "PSNR VAE"):
        table.add_column(col, justify="left" if col == "clip" else "right")
    for c in r["clips"]:
        table.add_row(c["key"], "×".join(map(str, c["size"])), f"{c['psnr_refined']:.2f}", f"{c['psnr_baseline']:.2f}",
                      f"{c['psnr_refined'] - c['psnr_baseline']:+.2f}", f"{c['psnr_vae']:.2f}")
    console.print(table)
    p, pf = r["psnr"], r["prompt_following"]

    def acc(s: dict) -> str:
        return f"{s['all']:.1%} of {s['n']}" if s["n"] else "-"

    print(f"{len(r['clips'])} clips  PSNR refined {p['refined']:.2f} dB  baseline (bicubic/linear) {p['baseline']:.2f} dB  "
          f"gain {r['gain_db']:+.2f} dB  VAE ceiling {p['vae_ceiling']:.2f} dB  {r['seconds_per_clip']:.1f} s/clip")
    for part, q in (r["psnr_by_frames"] or {}).items():
        print(f"  {part} frames: refined {q['refined']:.2f} dB  baseline {q['baseline']:.2f} dB  VAE ceiling {q['vae']:.2f} dB")
    print(f"prompt following (all four): base {acc(pf['base'])}  refined {acc(pf['refined'])}")
    if "generated" in r:
        g = r["generated"]
        print(f"generated by {g['pipeline']}: base {acc(g['base'])}  refined {acc(g['refined'])}")
