"""Video I/O on PyAV: probe, decode (streaming, with frame selection) and encode.

Frames are uint8 arrays `(H, W, 3)` in RGB, already turned upright when the file carries rotation
metadata, so `width`/`height` everywhere in sorakit are the *displayed* size.

Odd sizes: H.264 in 4:2:0 needs even sides. `write_video` never pads, crops or resizes: an even-sized
video is written as yuv420p (what browsers play); an odd-sized one as 4:4:4 H.264 (High 4:4:4 profile),
which keeps every pixel but which some browsers will not play. Generated videos always have even sides.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator, Union

import av
import numpy as np

from sorakit.utils.fs import atomic_path

Source = Union[str, os.PathLike, bytes, IO[bytes]]

_CONTAINER_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}


class MediaError(ValueError):
    """A file that cannot be used as a video; the message names the file and the reason."""


@dataclass
class VideoInfo:
    width: int  # displayed, after rotation
    height: int
    num_frames: int
    fps: float
    duration: float  # seconds
    codec: str
    rotation: int  # degrees counter-clockwise the stored frames are turned for display
    has_audio: bool
    pix_fmt: str | None
    size_bytes: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _name(src: Source) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return getattr(src, "name", "<bytes>")


def _open(src: Source):
    name = _name(src)
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if p.is_symlink() and not p.exists():
            raise MediaError(f"{name}: dangling symlink")
        if not p.exists():
            raise MediaError(f"{name}: no such file")
        if p.is_dir():
            raise MediaError(f"{name}: is a directory")
        if not os.access(p, os.R_OK):
            raise MediaError(f"{name}: permission denied")
        if p.stat().st_size == 0:
            raise MediaError(f"{name}: empty file (0 bytes)")
        target = str(p)
    elif isinstance(src, (bytes, bytearray)):
        if not src:
            raise MediaError(f"{name}: empty file (0 bytes)")
        target = io.BytesIO(src)
    else:
        target = src
    try:
        return av.open(target, metadata_errors="ignore")
    except PermissionError:
        raise MediaError(f"{name}: permission denied") from None
    except av.error.InvalidDataError:
        raise MediaError(f"{name}: not a video file (unrecognised or corrupt data)") from None
    except (av.error.FFmpegError, OSError) as e:
        raise MediaError(f"{name}: cannot open ({e})") from None


def _video_stream(container, name: str):
    streams = container.streams.video
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        # An MP4 cut short before its index (moov) opens with nothing but an empty data stream.
        what = "audio only" if "audio" in kinds else "no video stream" if set(kinds) - {"data"} else "truncated or corrupt (no audio or video stream found)"
        raise MediaError(f"{name}: {what}")
    vs = streams[0]
    if vs.codec_context is None or not vs.codec_context.name:
        raise MediaError(f"{name}: unsupported video codec")
    vs.thread_type = "AUTO"
    return vs


def _fps(vs) -> float:
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    return float(rate) if rate else 0.0


def _upright(img: np.ndarray, rotation: int) -> np.ndarray:
    k = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(img, k=k)) if k else img


def _seek(container, vs, seconds: float) -> None:
    """Seek to the keyframe at or before `seconds`; streams that cannot seek are read from the start."""
    try:
        container.seek(int(seconds / vs.time_base), stream=vs, backward=True, any_frame=False)
    except (av.error.FFmpegError, OSError, ValueError):
        pass


def _decode_errors():
    return (av.error.InvalidDataError, av.error.FFmpegError, ValueError)


def probe(src: Source) -> VideoInfo:
    """Read a video's properties from its headers and packets; only the first frame is decoded."""
    name = _name(src)
    size = None
    if isinstance(src, (str, os.PathLike)) and Path(src).is_file():
        size = Path(src).stat().st_size
    with _open(src) as container:
        vs = _video_stream(container, name)
        vs.thread_type = "SLICE"  # frame threads would decode several frames before the first comes out
        cc = vs.codec_context
        try:
            first = next(container.decode(vs))
        except StopIteration:
            raise MediaError(f"{name}: no decodable video frames") from None
        except _decode_errors() as e:
            raise MediaError(f"{name}: cannot decode video ({cc.name}: {e})") from None
        rotation = int(round(first.rotation or 0)) % 360
        fps = _fps(vs)
        num_frames = vs.frames
        duration = float(vs.duration * vs.time_base) if vs.duration and vs.time_base else None
        if not num_frames:
            # Containers such as WebM/MKV store no frame count: count packets (no decoding).
            _seek(container, vs, 0.0)
            num_frames = sum(1 for p in container.demux(vs) if p.size)
        if duration is None:
            duration = float(container.duration / av.time_base) if container.duration else (num_frames / fps if fps else 0.0)
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(
            width=w,
            height=h,
            num_frames=int(num_frames),
            fps=fps,
            duration=duration,
            codec=cc.codec.canonical_name if cc.codec else cc.name,  # "av1", not the decoder "libdav1d"
            rotation=rotation,
            has_audio=bool(container.streams.audio),
            pix_fmt=cc.pix_fmt,
            size_bytes=size,
        )


def _shown(container, vs, src_fps: float, start: float | None, end: float | None):
    """(frame, shown from, shown until) for the frames in [start, end): a frame lasts until the next
    one starts (one frame of look-ahead, which is what makes variable frame rates come out right)."""
    eps = 1e-6
    prev = None
    for i, frame in enumerate(container.decode(vs)):
        t = frame.time if frame.time is not None else i / src_fps
        if start is not None and t < start - eps:
            continue
        if end is not None and t >= end - eps:
            break
        if prev is not None:
            yield prev[0], prev[1], t
        prev = (frame, t)
    if prev is not None:
        until = prev[1] + 1.0 / src_fps
        yield prev[0], prev[1], min(until, end) if end is not None else until


def iter_frames(
    src: Source,
    *,
    stride: int = 1,
    fps: float | None = None,
    max_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
) -> Iterator[np.ndarray]:
    """Decode frames one at a time, upright, as uint8 `(H, W, 3)`.

    Selection, in order: the time range `[start, end)` in seconds (seeking, not decoding, up to
    `start`), then resampling to `fps` by presentation timestamps (so variable-frame-rate files come
    out evenly timed), then every `stride`-th frame, then at most `max_frames` frames.
    """
    if stride < 1:
        raise ValueError("stride must be >= 1")
    name = _name(src)
    with _open(src) as container:
        vs = _video_stream(container, name)
        src_fps = _fps(vs) or 30.0
        if start:
            _seek(container, vs, start)
        first_t = None
        grid = 0
        kept = 0
        index = 0
        eps = 1e-6
        try:
            for frame, t, t_next in _shown(container, vs, src_fps, start, end):
                repeats = 1
                if fps:
                    if first_t is None:
                        first_t = t
                    repeats = 0
                    # The frame is on screen from t until the next frame: emit it for every grid time in between.
                    while first_t + grid / fps < t_next - eps:
                        repeats += 1
                        grid += 1
                if not repeats:
                    continue
                img = None
                for _ in range(repeats):
                    if index % stride == 0:
                        if img is None:
                            img = _upright(frame.to_ndarray(format="rgb24"), int(round(frame.rotation or 0)) % 360)
                        yield img
                        kept += 1
                        if max_frames is not None and kept >= max_frames:
                            return
                    index += 1
        except _decode_errors() as e:
            if kept == 0:
                raise MediaError(f"{name}: cannot decode video ({e})") from None
            # A truncated tail: keep what decoded, as players do.


def read_video(src: Source, **selection) -> np.ndarray:
    """Decode into one uint8 array `(T, H, W, 3)`; takes the options of `iter_frames`."""
    frames = list(iter_frames(src, **selection))
    if not frames:
        raise MediaError(f"{_name(src)}: no frames in the selected range")
    return np.stack(frames)


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray] | np.ndarray,
    fps: float,
    *,
    crf: int = 18,
    preset: str = "medium",
    codec: str = "libx264",
    metadata: dict | None = None,
) -> Path:
    """Encode uint8 RGB frames `(H, W, 3)` to a video file, atomically (temp file + rename).

    `metadata` keys go into the container (title, comment, ...); non-string values are stored as JSON.
    """
    path = Path(path)
    fmt = _CONTAINER_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unsupported container (use one of {', '.join(sorted(_CONTAINER_FORMATS))})")
    if fps <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        # faststart puts the index first so browsers can play while downloading.
        options = {"movflags": "+faststart"} if fmt in ("mp4", "mov") else {}
        with av.open(str(tmp), mode="w", format=fmt, options=options) as out:
            stream = None
            for img in frames:
                img = np.asarray(img)
                if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                    raise ValueError(f"{path}: frames must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
                if stream is None:
                    h, w = img.shape[:2]
                    stream = out.add_stream(codec, rate=rate)
                    stream.width, stream.height = w, h
                    odd = w % 2 or h % 2
                    if codec == "libx264":
                        stream.pix_fmt = "yuv444p" if odd else "yuv420p"
                        stream.options = {"crf": str(crf), "preset": preset}
                    else:
                        stream.pix_fmt = "yuv420p"
                    for k, v in (metadata or {}).items():
                        out.metadata[k] = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                elif img.shape[:2] != (stream.height, stream.width):
                    raise ValueError(f"{path}: frame size changed from {stream.width}x{stream.height} to {img.shape[1]}x{img.shape[0]}")
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                out.mux(packet)
    return path


def read_metadata(src: Source) -> dict[str, str]:
    """The container-level metadata tags (title, comment, ...)."""
    with _open(src) as container:
        return dict(container.metadata)
