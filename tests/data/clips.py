"""Real encoded test clips made with PyAV, and the broken inputs ingest must survive.

Frame i of a clip is a flat grey of level `level(i)` with a white block in the top-left corner, so a
decoded frame tells which source frame it is (`frame_index`) and which way up it is (`block_corner`).
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL_STEP = 24  # grey levels between consecutive frames: far more than codec error


def level(i: int) -> int:
    return 16 + (i * LEVEL_STEP) % 224


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    img = np.full((height, width, 3), level(i), np.uint8)
    img[: max(2, height // 5), : max(2, width // 3)] = 255  # marks the top-left corner
    return img


def frame_index(img: np.ndarray, num_frames: int) -> int:
    """Which source frame a decoded frame shows (by its median grey level)."""
    v = float(np.median(img[..., 1]))
    return int(np.argmin([abs(level(i) - v) for i in range(num_frames)]))


def block_corner(img: np.ndarray) -> str:
    """Where the white block is: 'tl', 'tr', 'bl' or 'br'."""
    h, w = img.shape[:2]
    ys, xs = np.nonzero(img[..., 0] > 240)
    return ("t" if ys.mean() < h / 2 else "b") + ("l" if xs.mean() < w / 2 else "r")


def make_clip(
    path: str | os.PathLike,
    *,
    codec: str = "libx264",
    size: tuple[int, int] = (64, 48),
    num_frames: int = 8,
    fps: int = 12,
    pix_fmt: str = "yuv420p",
    rotation: int = 0,
    audio: bool = False,
    times: list[float] | None = None,
    frames: list[np.ndarray] | None = None,
    options: dict | None = None,
) -> Path:
    """Encode a clip. `times` (seconds, one per frame) makes a variable-frame-rate file;
    `rotation` sets display-rotation metadata (degrees counter-clockwise); `audio` adds an AAC
    track; `frames` replaces the default pictures."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    imgs = frames if frames is not None else [frame_image(i, w, h) for i in range(num_frames)]
    ms = Fraction(1, 1000)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, pix_fmt
        if options:
            vs.options = options
        if times is not None:
            vs.codec_context.time_base = ms
        if rotation:
            vs.set_display_rotation(rotation)
        a_stream = out.add_stream("aac", rate=22050) if audio else None
        for i, img in enumerate(imgs):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), ms
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if a_stream is not None:
            duration = (times[-1] + 0.1) if times else len(imgs) / fps
            n = 1024
            for k in range(int(duration * 22050) // n):
                t = (np.arange(n) + k * n) / 22050
                samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
                af = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
                af.sample_rate, af.pts = 22050, k * n
                for packet in a_stream.encode(af):
                    out.mux(packet)
            for packet in a_stream.encode():
                out.mux(packet)
    return path


# name -> (file name, make_clip options): one of every container/codec pairing a user brings.
CODEC_CASES = {
    "h264_mp4": ("h264.mp4", dict(codec="libx264")),
    "vp9_webm": ("vp9.webm", dict(codec="libvpx-vp9")),
    "mpeg4_avi": ("mpeg4.avi", dict(codec="mpeg4")),
    "mjpeg_mov": ("mjpeg.mov", dict(codec="mjpeg", pix_fmt="yuvj420p")),
    "av1_mkv": ("av1.mkv", dict(codec="libsvtav1", size=(64, 64), options={"preset": "12"})),
    "odd_mpeg4_avi": ("odd 317x181.avi", dict(codec="mpeg4", size=(317, 181))),
    "portrait_mp4": ("portrait.mp4", dict(codec="libx264", size=(48, 96))),
}
EXPECTED_CODEC = {"h264_mp4": "h264", "vp9_webm": "vp9", "mpeg4_avi": "mpeg4", "mjpeg_mov": "mjpeg", "av1_mkv": "av1", "odd_mpeg4_avi": "mpeg4", "portrait_mp4": "h264"}


def make_undecodable(path: str | os.PathLike) -> Path:
    """An AVI whose video codec tag names no codec FFmpeg knows: opens, cannot decode."""
    path = Path(path)
    tmp = path.with_name(path.stem + "-src.avi")
    make_clip(tmp, codec="mpeg4")
    data = tmp.read_bytes()
    tmp.unlink()
    assert b"FMP4" in data
    path.write_bytes(data.replace(b"FMP4", b"QQZX"))
    return path


def make_broken_inputs(folder: str | os.PathLike, good: str | os.PathLike) -> dict[str, str]:
    """Every kind of bad input beside a good clip, in `folder`; returns {file name: expected reason
    category}. Names with spaces and non-ASCII characters are used on purpose."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(good).read_bytes()
    (folder / "zero bytes.mp4").write_bytes(b"")
    (folder / "truncated clip.mp4").write_bytes(data[: len(data) * 2 // 3])
    (folder / "notes, not a vidéo.mp4").write_text("just some text\n" * 20)
    audio = folder / "audio only.m4a"
    with av.open(str(audio), "w") as out:
        s = out.add_stream("aac", rate=22050)
        for k in range(10):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            af.sample_rate, af.pts = 22050, k * 1024
            for p in s.encode(af):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    audio.rename(folder / "audio only.mp4")
    make_undecodable(folder / "unknown codec.avi")
    os.symlink(folder / "does-not-exist.mp4", folder / "dangling link.mp4")
    unreadable = folder / "unreadable ファイル.mp4"
    unreadable.write_bytes(data)
    unreadable.chmod(0)
    return {
        "zero bytes.mp4": "empty file",
        "truncated clip.mp4": "truncated|truncated or corrupt",
        "notes, not a vidéo.mp4": "not a video file",
        "audio only.mp4": "audio only",
        "unknown codec.avi": "unsupported video codec|cannot decode video",
        "dangling link.mp4": "dangling symlink",
        "unreadable ファイル.mp4": "permission denied",
    }


def matches(category: str, pattern: str) -> bool:
    return re.fullmatch(pattern, category) is not None
