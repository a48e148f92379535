"""Data commands: `sorakit toyworld`, `sorakit ingest`, `sorakit inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sorakit.cli.app import app, console, fail, handle_errors
from sorakit.data.ingest import IngestConfig
from sorakit.data.scenes import SceneConfig

USAGE = 2  # exit status of a usage error, as click gives for a missing argument


@app.command("toyworld")
@handle_errors
def toyworld(
    out: Path = typer.Argument(..., help="Directory to write the clips (MP4 + JSON each) into."),
    num_clips: int = typer.Option(64, "--num-clips", "-n", min=1, help="Number of clips."),
    seed: int = typer.Option(0, "--seed", help="Base seed; the same seed and count give the same clips."),
    split: str = typer.Option("train", "--split", help="train or heldout: the splits never share a clip seed."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes rendering clips."),
):
    """Write the built-in labelled toy-world dataset (see docs/toyworld.md)."""
    from rich.progress import Progress

    from sorakit.data.toyworld import SPLITS, make_toyworld

    if split not in SPLITS:
        fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}", USAGE)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"toyworld {split}", total=num_clips)
        paths = make_toyworld(out, num_clips, seed=seed, split=split, workers=workers, progress=lambda: progress.advance(task))
    console.print(f"wrote {len(paths)} {split} clips to {out}")


@app.command("ingest")
@handle_errors
def ingest(
    inputs: List[str] = typer.Argument(..., help="Video files, folders (searched recursively), .txt lists of paths, or Open-Sora style CSVs (path,text,...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for shard-NNNNNN.tar, manifest.json, errors.jsonl."),
    samples_per_shard: int = typer.Option(IngestConfig.samples_per_shard, "--samples-per-shard", help="Most inputs per shard (without cutting: samples per shard)."),
    max_shard_bytes: Optional[str] = typer.Option(None, "--max-shard-bytes", help="Most source bytes per shard, e.g. 1GB or 500MiB (default: no limit)."),
    max_seconds: Optional[float] = typer.Option(IngestConfig.max_seconds, "--max-seconds", help="Cut longer videos into equal clips of at most this many seconds, re-encoded (default: no cutting)."),
    scene_split: bool = typer.Option(IngestConfig.scene_split, "--scene-split/--no-scene-split", help="Cut at hard scene changes (clips re-encoded)."),
    scene_threshold: float = typer.Option(SceneConfig.threshold, "--scene-threshold", help="Mean RGB frame difference (0-255) a scene cut must exceed."),
    min_scene_seconds: float = typer.Option(SceneConfig.min_scene_seconds, "--min-scene-seconds", help="Shortest scene that --scene-split makes."),
    crf: int = typer.Option(IngestConfig.crf, "--crf", help="H.264 quality of re-encoded (cut) clips; lower is better, 17 is visually lossless."),
    preset: str = typer.Option(IngestConfig.preset, "--preset", help="x264 speed preset of re-encoded clips."),
    dedup: bool = typer.Option(IngestConfig.dedup, "--dedup/--no-dedup", help="Store identical files (same sha256) once."),
    workers: int = typer.Option(IngestConfig.workers, "--workers", "-j", help="Worker processes; 0 = all cores."),
    num_nodes: Optional[int] = typer.Option(None, "--num-nodes", help="Machines sharing this job (default: WORLD_SIZE or SLURM_NNODES, else 1)."),
    node_rank: Optional[int] = typer.Option(None, "--node-rank", help="This machine's index, 0..num-nodes-1 (default: RANK or SLURM_NODEID, else 0)."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run in --out (same inputs and settings)."),
):
    """Ingest raw videos at their native size into WebDataset shards."""
    from sorakit.data.ingest import IngestError, ingest as run_ingest, nodes_from_env, parse_size

    env_nodes, env_rank = nodes_from_env()
    try:
        cfg = IngestConfig(
            samples_per_shard=samples_per_shard,
            max_shard_bytes=parse_size(max_shard_bytes),
            max_seconds=max_seconds,
            scene_split=scene_split,
            scene=SceneConfig(threshold=scene_threshold, min_scene_seconds=min_scene_seconds),
            crf=crf,
            preset=preset,
            dedup=dedup,
            workers=workers,
            num_nodes=num_nodes if num_nodes is not None else env_nodes,
            node_rank=node_rank if node_rank is not None else env_rank,
        )
        result = run_ingest(inputs, out, cfg, resume=resume, console=console)
    except IngestError as e:
        fail(str(e), USAGE)
    if result.exit_code:
        fail("nothing could be ingested" if not result.node_samples else "some shards were not finished", result.exit_code)


@app.command("inspect")
@handle_errors
def inspect(
    directory: Path = typer.Argument(..., help="A directory of shards (or one tar)."),
    contact_sheet: Optional[Path] = typer.Option(None, "--contact-sheet", help="Also write a PNG grid of frames from random clips here."),
    clips: int = typer.Option(16, "--clips", min=1, help="Clips on the contact sheet."),
    seed: int = typer.Option(0, "--seed", help="Which random clips the contact sheet shows."),
):
    """Summarise a shard directory: samples, hours, size/aspect/duration/fps distributions, captions."""
    from sorakit.data.inspect import inspect_shards

    inspect_shards(directory, console=console, contact_sheet=contact_sheet, num_clips=clips, seed=seed)
