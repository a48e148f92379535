"""Captioner commands: `sorakit train captioner`, `sorakit caption`, `sorakit captioner eval`, `sorakit expand`."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import List, Optional

import typer

from sorakit.cli.app import (CONFIG_HELP, SET_HELP, UserError, app, captioner_app, console, handle_errors, report_trained,
                             train_app)
from sorakit.data.captioning import CaptionSettings

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


@train_app.command("captioner")
@handle_errors
def train_captioner(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: the config's `out`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.ckpt."),
    init: Optional[Path] = typer.Option(None, "--init", help="Local open_clip CoCa checkpoint initialising the towers (base preset)."),
):
    """Train the VideoCoCa captioner on shards with captions."""
    from sorakit.config import load_config
    from sorakit.training.captioner import TrainCaptionerConfig, train_captioner as run

    overrides = list(set_)
    if out is not None:
        overrides.append(f"out={out}")
    if init is not None:
        overrides.append(f"init={init}")
    cfg = load_config(TrainCaptionerConfig, config, overrides)
    path = run(cfg, resume=resume)
    report_trained(f"captioner written to {path} (text encoder: {path / 'text_encoder'})")


@app.command("caption")
@handle_errors
def caption(
    source: str = typer.Argument(..., help="Shards (a directory, tar or glob) to re-caption, or one video file to caption."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained captioner directory."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output shard directory (required for shards; never the input's)."),
    frames: Optional[int] = typer.Option(CaptionSettings.frames, "--frames", help="Frames sampled per clip (default: the model's)."),
    beams: int = typer.Option(CaptionSettings.beams, "--beams", min=1, help="Beam width; 1 = greedy decoding."),
    max_len: Optional[int] = typer.Option(CaptionSettings.max_len, "--max-len", help="Most tokens per caption (default: the model's context)."),
    batch_size: int = typer.Option(CaptionSettings.batch_size, "--batch-size", min=1, help="Clips per forward pass."),
    workers: int = typer.Option(CaptionSettings.workers, "--workers", min=1, help="Threads decoding video, per process."),
    processes: int = typer.Option(CaptionSettings.processes, "--processes", "-j", min=1,
                                  help="Processes, each captioning whole shards with its own copy of the model."),
    keep_existing: bool = typer.Option(CaptionSettings.keep_existing, "--keep-existing", help="Keep the caption of samples that already have one."),
    device: str = typer.Option(CaptionSettings.device, "--device", help="auto, cpu, cuda, cuda:1, ..."),
):
    """Write new shards whose samples carry the captioner's caption, or print one video's caption."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sorakit.data.captioning import caption_file, caption_shards
    from sorakit.data.shards import list_shards, shard_counts

    if Path(source).suffix.lower() in VIDEO_SUFFIXES:
        print(caption_file(source, model, frames=frames, beams=beams, device=device))
        return
    if out is None:
        raise UserError("--out is required when captioning shards (the input is never modified)")
    list_shards(source)  # fail early, with the reason, on a bad source
    try:
        total = sum(shard_counts(Path(source)).values()) if Path(source).is_dir() else None
    except (OSError, ValueError, tarfile.TarError):  # an unreadable shard is reported by the job itself
        total = None
    settings = CaptionSettings(frames=frames, beams=beams, max_len=max_len, batch_size=batch_size, workers=workers,
                               processes=processes, keep_existing=keep_existing, device=device)
    columns = [TextColumn("captioning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} clips/s"),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("caption", total=total, rate="-")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f}" if speed else "-")

        summary = caption_shards(source, model, out, settings, progress=advance)
    console.print(
        f"{out}: {summary['captioned']} captioned, {summary['kept']} kept, {summary['errors']} skipped "
        f"(see errors.jsonl), {summary['skipped_shards']} shards already done; {summary['clips_per_s']:.1f} clips/s"
    )
    if summary["failed_shards"]:
        raise UserError(f"{len(summary['failed_shards'])} shards not captioned ({summary['failed_shards'][0]}, ...)")


@captioner_app.command("eval")
@handle_errors
def evaluate(
    shards: str = typer.Argument(..., help="Shards with reference captions (e.g. a held-out toy-world set)."),
    model: Path = typer.Option(..., "--model", "-m", help="Trained captioner directory."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames sampled per clip (default: the model's)."),
    beams: int = typer.Option(1, "--beams", min=1, help="Beam width; 1 = greedy decoding."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Clips per forward pass."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate on at most this many clips."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout instead of a table."),
):
    """Exact caption match, per-word accuracy and zero-shot retrieval accuracy on shards."""
    from rich.table import Table

    from sorakit.data.captioning import evaluate_captioner

    result = evaluate_captioner(shards, model, frames=frames, beams=beams, batch_size=batch_size, limit=limit,
                                device=device)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"captioner {model} on {shards}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("exact_match", "word_accuracy", "retrieval_accuracy"):
        table.add_row(k, f"{result[k]:.1%}")
    for k, v in result.get("toy_attributes", {}).items():
        table.add_row(f"toy {k}", f"{v:.1%}")
    for k in ("samples", "distinct_captions", "decode_errors", "frames", "beams"):
        table.add_row(k, str(result[k]))
    console.print(table)
    for ex in result["examples"]:
        console.print(f"  ref: {ex['reference']}\n  gen: {ex['generated']}", highlight=False)


@app.command("expand")
@handle_errors
def expand(
    prompt: str = typer.Argument(..., help="The short prompt to expand."),
    backend: str = typer.Option("captions", "--backend", help="captions (offline, from the training captions) or llm."),
    captions: Optional[str] = typer.Option(None, "--captions", help="Training captions: shards (dir/tar/glob), a .txt (one per line), .jsonl or .csv."),
    llm: Optional[Path] = typer.Option(None, "--llm", help="Local Hugging Face causal LM directory (llm backend)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same expansion."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (text, backend used, notes) as JSON."),
):
    """Rewrite a short prompt into the detailed caption style the models were trained on."""
    from sorakit.generation.expand import PromptExpander

    if captions is None:
        raise UserError("--captions is required: the training captions to expand from (shards or a captions file)")
    result = PromptExpander(captions, backend=backend, llm=llm).expand(prompt, seed=seed)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if result.note:
        console.print(f"note: {result.note}", highlight=False)
    print(result.text)
