"""One input file -> the shard samples it becomes: validated, and cut and re-encoded if asked.

A clip that needs no cutting is not decoded beyond its first frame: it is copied into the shard
byte for byte. `--max-seconds` / `--scene-split` decode it once more (streaming) and encode each
piece with `sorakit.media.write_video` at high quality.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sorakit.data.containers import structure
from sorakit.data.scenes import detect_cuts, segments
from sorakit.data.shards import FileMember
from sorakit.data.sources import Source, read_caption_sidecar

if TYPE_CHECKING:
    from sorakit.data.ingest import IngestConfig

_HASH_CHUNK = 1 << 20
TAIL_SECONDS = 1.0  # how much of a file's end is read to prove it is not truncated


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_video(path: str):
    """Probe a file and prove it is a whole, usable video: its first frame decodes, and it is not
    cut short (a truncated file often still opens and shows its first frame).

    Returns (VideoInfo, container name); raises MediaError naming the problem."""
    from sorakit.media import MediaError, probe

    info = probe(path)
    st = structure(path)
    if st is not None and st.complete is False:
        raise MediaError(f"{path}: truncated (the file ends inside its {st.container} data)")
    if st is None or st.complete is None:
        return info, _check_packets_reach_end(path, info)
    return info, st.container


def _check_packets_reach_end(path: str, info) -> str:
    """For containers without a size to compare: the packets must reach the declared duration.
    Only the tail is read (any packet, not a keyframe, can start it), nothing is decoded."""
    import av

    from sorakit.media import MediaError

    with av.open(path, metadata_errors="ignore") as c:
        streams = [s for s in c.streams if s.type in ("video", "audio")]
        declared = float(c.duration / av.time_base) if c.duration else 0.0
        vs = c.streams.video[0]
        if vs.frames and vs.average_rate:
            declared = max(declared, float(vs.frames / vs.average_rate))
        if declared > TAIL_SECONDS:
            with contextlib.suppress(av.error.FFmpegError, OSError):  # unseekable: read it all
                c.seek(int((declared - TAIL_SECONDS) * av.time_base), any_frame=True)
        last: dict = {}  # stream -> largest pts + duration, in the stream's time base
        try:
            for p in c.demux(*streams):
                if p.is_corrupt:  # a packet cut short by the end of the file
                    raise MediaError(f"{path}: truncated (last packets incomplete)")
                if p.size and p.pts is not None:
                    last[p.stream] = max(last.get(p.stream, p.pts), p.pts + (p.duration or 0))
        except (av.error.FFmpegError, OSError) as e:
            raise MediaError(f"{path}: truncated or corrupt ({e})") from None
        reached = max((float((end - (s.start_time or 0)) * s.time_base) for s, end in last.items()), default=0.0)
        tolerance = max(2.0 / (info.fps or 1.0), 0.02 * declared)
        if declared and reached < declared - tolerance:
            raise MediaError(f"{path}: truncated (data ends at {reached:.2f} s of {declared:.2f} s)")
        return c.format.name


def _clip_meta(src: Source, info, caption: str | None, container: str) -> dict:
    meta = {
        "source": src.source,
        "width": info.width,
        "height": info.height,
        "num_frames": info.num_frames,
        "fps": info.fps,
        "duration": info.duration,
        "codec": info.codec,
        "container": container,
        "rotation": info.rotation,
        "has_audio": info.has_audio,
        "start": 0.0,
        "end": info.duration,
    }
    if caption:
        meta["caption"] = caption
    return meta


def _cut_plan(path: str, info, cfg: IngestConfig) -> tuple[list[tuple[int, int]], float]:
    """Frame ranges to cut a video into, and the frame rate the cut clips are written at."""
    fps = info.fps or 25.0
    max_frames = max(1, int(cfg.max_seconds * fps + 1e-6)) if cfg.max_seconds else None
    if cfg.scene_split:
        from sorakit.media import iter_frames

        cuts, n = detect_cuts(iter_frames(path, fps=fps), fps, cfg.scene)
    else:
        if max_frames is None or info.num_frames <= max_frames:
            return [(0, info.num_frames)], fps
        cuts, n = [], info.num_frames
    return segments(n, cuts, max_frames), fps


def _encode_segments(path: str, segs: list[tuple[int, int]], fps: float, cfg: IngestConfig, out_stem: Path) -> Iterator[tuple[Path, int, int]]:
    """Decode once, streaming, and encode each frame range to its own file: (file, first, count).

    Frames are resampled to `fps` by timestamps (the same decode the scene pass saw), so a
    variable-frame-rate source becomes evenly timed clips. Memory does not grow with the length."""
    from sorakit.media import iter_frames, write_video

    frames = enumerate(iter_frames(path, fps=fps))
    for si, (a, b) in enumerate(segs):
        last = si == len(segs) - 1
        first = next(frames, None)
        if first is None:
            return
        count = 0

        def piece(first=first, b=b, last=last) -> Iterator:
            nonlocal count
            i, f = first
            while True:
                count += 1
                yield f
                if not last and i >= b - 1:
                    return
                nxt = next(frames, None)
                if nxt is None:
                    return
                i, f = nxt

        out = out_stem.with_name(f"{out_stem.name}-{si:04d}.mp4")
        write_video(out, piece(), fps, crf=cfg.crf, preset=cfg.preset)
        yield out, first[0], count


@dataclass
class Item:
    source: Source
    sha256: str | None  # known when it was hashed at planning (size shared with another file)


def input_samples(item: Item, key: str, cfg: IngestConfig, tmp: Path) -> list[tuple[str, dict, float]]:
    """The samples `(key, members, duration)` one input becomes; raises (MediaError, OSError, ...)
    when it is unusable.

    Cut clips are fully encoded (to temporary files) before anything is returned, so a failure
    half way through an input never leaves part of it in the shard."""
    src = item.source
    info, container = check_video(src.path)
    caption = src.caption or read_caption_sidecar(src.path)
    meta = _clip_meta(src, info, caption, container)
    needs_cut = cfg.scene_split or (cfg.max_seconds is not None and info.duration > cfg.max_seconds + 0.5 / (info.fps or 25.0))
    segs, fps = _cut_plan(src.path, info, cfg) if needs_cut else ([(0, info.num_frames)], info.fps)
    text = {"txt": caption} if caption else {}
    if len(segs) <= 1:
        member = FileMember(src.path)
        known = item.sha256
        # The json is made after the clip is copied: its sha256 is computed on the way.
        sample = {"mp4": member, "json": lambda: {**meta, "sha256": known or member.sha256}, **text}
        return [(key, sample, info.duration)]
    sha = item.sha256 or sha256_file(src.path)
    out = []
    for k, (clip, first, count) in enumerate(_encode_segments(src.path, segs, fps, cfg, tmp / key)):
        clip_meta = {
            **meta,
            "num_frames": count,
            "fps": fps,
            "duration": count / fps,
            "codec": "h264",
            "container": "mp4",
            "rotation": 0,
            "has_audio": False,  # cut clips are video only
            "start": first / fps,
            "end": (first + count) / fps,
            "clip": k,
            "source_duration": info.duration,
            "source_codec": info.codec,
            "sha256": sha,
        }
        out.append((f"{key}-{k:04d}", {"mp4": clip, "json": clip_meta, **text}, count / fps))
    return out
