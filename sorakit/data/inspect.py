"""`sorakit inspect DIR`: what is in a shard directory, as a table, plus an optional contact sheet."""

from __future__ import annotations

import json
import math
import random
import statistics
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sorakit.data.reader import VIDEO_EXTS
from sorakit.data.shards import list_shards, split_member_name

# (upper bound of width/height, label): aspect-ratio buckets, portrait to landscape.
ASPECT_BINS = ((0.6, "tall (< 3:5)"), (0.95, "portrait"), (1.05, "square"), (1.6, "landscape (< 16:10)"), (math.inf, "wide (>= 16:10)"))
DURATION_BINS = ((1, "< 1 s"), (2, "1-2 s"), (5, "2-5 s"), (10, "5-10 s"), (30, "10-30 s"), (120, "30 s-2 min"), (math.inf, ">= 2 min"))
SHEET_FRAMES = 4  # frames per clip on the contact sheet
SHEET_ROW_HEIGHT = 96  # pixels; the sheet is for eyes only, so frames are scaled to one height
TOP_RESOLUTIONS = 10


@dataclass
class SampleInfo:
    shard: Path
    key: str
    meta: dict
    caption: str | None


def _bin(value: float, bins) -> str:
    return next(label for bound, label in bins if value < bound)


def read_index(directory: str | Path) -> list[SampleInfo]:
    """Metadata of every sample (json and txt members only; clips are read only when the json lacks
    their size, as video2dataset's does)."""
    from sorakit.media import probe

    out = []
    for shard in list_shards(directory):
        with tarfile.open(shard, mode="r:") as tf:
            samples: dict[str, dict] = {}
            for info in tf.getmembers():
                if info.isreg():
                    key, ext = split_member_name(info.name)
                    samples.setdefault(key, {})[ext.lower()] = info
            for key, members in samples.items():
                meta = json.loads(tf.extractfile(members["json"]).read()) if "json" in members else {}
                text = tf.extractfile(members["txt"]).read().decode("utf-8", "replace").strip() if "txt" in members else ""
                video = next((members[e] for e in VIDEO_EXTS if e in members), None)
                if video is None:
                    continue
                if not all(meta.get(k) for k in ("width", "height", "duration", "fps")):
                    try:
                        meta = {**probe(tf.extractfile(video).read()).to_dict(), **{k: v for k, v in meta.items() if v}}
                    except ValueError:
                        continue
                out.append(SampleInfo(shard, key, meta, text or meta.get("caption") or None))
    return out


def summarize(index: list[SampleInfo]) -> dict:
    """Counts and distributions of an index (what the table shows)."""
    durations = [float(s.meta["duration"]) for s in index]
    return {
        "samples": len(index),
        "shards": len({s.shard for s in index}),
        "hours": sum(durations) / 3600,
        "resolutions": dict(Counter(f"{s.meta['width']}x{s.meta['height']}" for s in index).most_common()),
        "aspects": dict(Counter(_bin(s.meta["width"] / s.meta["height"], ASPECT_BINS) for s in index)),
        "durations": dict(Counter(_bin(d, DURATION_BINS) for d in durations)),
        "duration_stats": {
            "min": min(durations, default=0.0),
            "median": statistics.median(durations) if durations else 0.0,
            "max": max(durations, default=0.0),
        },
        "fps": dict(Counter(f"{float(s.meta['fps']):g}" for s in index).most_common()),
        "captioned": sum(1 for s in index if s.caption),
    }


def _print(stats: dict, directory: Path, console) -> None:
    from rich.table import Table

    n = max(stats["samples"], 1)
    t = Table(title=f"shards: {directory}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    d = stats["duration_stats"]
    t.add_row("samples", str(stats["samples"]))
    t.add_row("shards", str(stats["shards"]))
    t.add_row("total hours", f"{stats['hours']:.3f}")
    t.add_row("captions", f"{stats['captioned']} of {stats['samples']} ({100 * stats['captioned'] / n:.0f}%)")
    t.add_row("duration min / median / max", f"{d['min']:.2f} / {d['median']:.2f} / {d['max']:.2f} s")
    console.print(t)
    for title, key, order in (
        ("resolution", "resolutions", None),
        ("aspect (width/height)", "aspects", [b[1] for b in ASPECT_BINS]),
        ("duration", "durations", [b[1] for b in DURATION_BINS]),
        ("fps", "fps", None),
    ):
        items = list(stats[key].items())
        if order:
            items = sorted(items, key=lambda kv: order.index(kv[0]))
        shown, rest = items[:TOP_RESOLUTIONS], items[TOP_RESOLUTIONS:]
        if rest:
            shown.append((f"({len(rest)} others)", sum(c for _, c in rest)))
        dist = Table(title=title)
        dist.add_column(title)
        dist.add_column("samples", justify="right")
        dist.add_column("share", justify="right")
        for label, count in shown:
            dist.add_row(label, str(count), f"{100 * count / n:.0f}%")
        console.print(dist)


def _clip_frames(sample: SampleInfo) -> np.ndarray:
    from sorakit.media import read_video

    with tarfile.open(sample.shard, mode="r:") as tf:
        for ext in VIDEO_EXTS:
            try:
                data = tf.extractfile(f"{sample.key}.{ext}").read()
                break
            except KeyError:
                continue
    frames = read_video(data)  # (T, H, W, 3)
    idx = np.linspace(0, len(frames) - 1, SHEET_FRAMES).round().astype(int)
    return frames[idx]


def draw_contact_sheet(index: list[SampleInfo], out: str | Path, num_clips: int = 16, seed: int = 0) -> Path:
    """A PNG with one row per random clip: SHEET_FRAMES frames spread over it, labelled with its size,
    length and caption."""
    from PIL import Image, ImageDraw

    from sorakit.utils.fs import atomic_path

    if not index:
        raise ValueError("no samples to draw")
    chosen = random.Random(seed).sample(index, min(num_clips, len(index)))
    label_h, pad = 14, 4
    rows = []
    for s in chosen:
        try:
            frames = _clip_frames(s)
        except ValueError:
            continue
        h, w = frames.shape[1:3]
        fw = max(1, round(w * SHEET_ROW_HEIGHT / h))
        tiles = [Image.fromarray(f).resize((fw, SHEET_ROW_HEIGHT), Image.Resampling.BILINEAR) for f in frames]
        m = s.meta
        label = f"{m['width']}x{m['height']}  {float(m['duration']):.1f}s @ {float(m['fps']):g}fps  {s.caption or '(no caption)'}"
        rows.append((tiles, label))
    width = max(sum(t.width for t in tiles) + pad * (len(tiles) + 1) for tiles, _ in rows)
    width = max(width, 480)
    height = len(rows) * (SHEET_ROW_HEIGHT + label_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for tiles, label in rows:
        draw.text((pad, y), label[: width // 6], fill=(230, 230, 230))
        x = pad
        for tile in tiles:
            sheet.paste(tile, (x, y + label_h))
            x += tile.width + pad
        y += SHEET_ROW_HEIGHT + label_h + pad
    out = Path(out)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def inspect_shards(directory: str | Path, *, console=None, contact_sheet: str | Path | None = None, num_clips: int = 16, seed: int = 0) -> dict:
    """Summarise a shard directory (printed as tables when a rich `console` is given); with
    `contact_sheet`, also draw one. Returns the summary."""
    directory = Path(directory)
    index = read_index(directory)
    stats = summarize(index)
    if console is not None:
        _print(stats, directory, console)
    if contact_sheet is not None:
        path = draw_contact_sheet(index, contact_sheet, num_clips, seed)
        stats["contact_sheet"] = str(path)
        if console is not None:
            console.print(f"wrote {path}")
    return stats
