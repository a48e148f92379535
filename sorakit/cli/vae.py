"""VAE commands: `sorakit train vae`, `sorakit vae reconstruct`, `sorakit vae eval`, `sorakit encode`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from sorakit.cli.app import CONFIG_HELP, SET_HELP, UserError, app, console, handle_errors, report_trained, train_app, vae_app
from sorakit.data.latents import EncodeSettings

DEVICE_HELP = "auto, cpu, cuda, cuda:1, ..."


@train_app.command("vae")
@handle_errors
def train_vae(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the config's `out`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
):
    """Train the spacetime VAE from scratch on raw shards; OUT becomes the VAE model directory."""
    from sorakit.config import load_config
    from sorakit.training.vae import TrainVAEConfig, train_vae as run

    overrides = list(set_) + ([f"out={out}"] if out is not None else [])
    cfg = load_config(TrainVAEConfig, config, overrides)
    path = run(cfg, resume=resume)
    report_trained(f"VAE written to {path}")


@vae_app.command("reconstruct")
@handle_errors
def reconstruct(
    src: Path = typer.Argument(..., help="Video file to encode and decode (any size and length)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained VAE directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the reconstruction (MP4)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Encode and decode one video at its own size and length; print PSNR and SSIM."""
    from sorakit.training.vae import reconstruct_file

    if not src.is_file():
        raise UserError(f"{src}: no such video file")
    r = reconstruct_file(src, model, out, device=device)
    ssim = f"{r['ssim']:.4f}" if r["ssim"] is not None else "-"
    console.print(f"{out}: {r['frames']}×{r['height']}×{r['width']} → latent {tuple(r['latent_shape'])}")
    print(f"PSNR {r['psnr']:.2f} dB  SSIM {ssim}")


@vae_app.command("eval")
@handle_errors
def evaluate(
    shards: str = typer.Argument(..., help="Raw shards to reconstruct (a directory, tar or glob)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained VAE directory."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Evaluate at most this many clips."),
    as_json: bool = typer.Option(False, "--json", help="Print the full result as JSON on stdout instead of a table."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """PSNR and SSIM of whole clips reconstructed at their native size, per clip and mean."""
    from rich.table import Table

    from sorakit.training.vae import evaluate_vae

    r = evaluate_vae(model, shards, limit=limit, device=device)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    table = Table(title=f"VAE {r['model']}")
    for col in ("clip", "frames×H×W", "latent C×T'×H'×W'", "compression", "PSNR dB", "SSIM"):
        table.add_column(col, justify="left" if col == "clip" else "right")
    for c in r["clips"]:
        table.add_row(c["key"], f"{c['frames']}×{c['height']}×{c['width']}", "×".join(map(str, c["latent_shape"])),
                      f"{c['compression']:.1f}", f"{c['psnr']:.2f}", f"{c['ssim']:.4f}" if c["ssim"] is not None else "-")
    console.print(table)
    fac = r["factors"]
    mean_ssim = f"{r['mean_ssim']:.4f}" if r["mean_ssim"] is not None else "-"
    print(f"{len(r['clips'])} clips  {r['kind']} {fac['temporal']}×{fac['spatial']}×{fac['spatial']}, "
          f"{fac['channels']} channels (compression {r['nominal_compression']:.1f})  "
          f"mean PSNR {r['mean_psnr']:.2f} dB  mean SSIM {mean_ssim}")


@app.command("encode")
@handle_errors
def encode(
    shards: str = typer.Argument(..., help="Raw shards to encode (a directory, tar or glob)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained VAE directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Latent shard directory (same shard names and keys)."),
    max_frames: Optional[int] = typer.Option(EncodeSettings.max_frames, "--max-frames", min=1, help="Encode at most this many frames per clip (default: all)."),
    fps: Optional[float] = typer.Option(EncodeSettings.fps, "--fps", help="Resample clips to this frame rate first (default: their own)."),
    workers: int = typer.Option(EncodeSettings.workers, "--workers", "-j", min=1, help="Processes, each encoding whole shards."),
    device: str = typer.Option(EncodeSettings.device, "--device", help=DEVICE_HELP),
    features: Optional[Path] = typer.Option(None, "--features", help="A captioner directory: also store its vision features per latent frame (for `repa` in DiT training)."),
    feature_stride: int = typer.Option(EncodeSettings.feature_stride, "--feature-stride", min=1, help="Latent pixels per feature cell: the DiT's spatial patch."),
):
    """Encode raw shards into latent shards for DiT training; rerun the same command to resume."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sorakit.data.latents import encode_shards
    from sorakit.data.shards import read_manifest

    src_manifest = read_manifest(shards) if Path(shards).is_dir() else None
    total = src_manifest["totals"]["samples"] if src_manifest else None
    settings = EncodeSettings(max_frames=max_frames, fps=fps, device=device, workers=workers,
                              features=str(features.resolve()) if features else None, feature_stride=feature_stride)
    columns = [TextColumn("encode"), BarColumn(), MofNCompleteColumn(), TextColumn("clips"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("encode", total=total)
        result = encode_shards(shards, model, out, settings, progress=lambda n: bar.advance(task, n))
    t = result.manifest["totals"]
    console.print(f"{out}: {t['samples']} latent clips in {t['shards']} shards; {t.get('skipped', 0)} skipped "
                  f"(see {out / 'errors.jsonl'})")
    if result.failed_shards:
        raise UserError(f"{len(result.failed_shards)} shards not finished ({result.failed_shards[0]}, ...); run the same command again")
