"""Hard scene-cut detection on frame differences.

Why our own and not PySceneDetect: its content detector needs OpenCV (a large binary dependency) and
decodes the video itself, while ingest already streams the frames through PyAV. What we need is
small: a hard cut is a frame that differs from the previous one far more than (a) an absolute
threshold and (b) the recent frame-to-frame differences (so fast motion or camera pans, where every
difference is large, are not cut). The comparison runs on a block-averaged thumbnail (about 32 px
on the long side), which ignores compression noise and costs little next to decoding.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

THUMB_SIDE = 32  # long side of the thumbnail frames are compared on


@dataclass
class SceneConfig:
    threshold: float = 30.0  # mean absolute RGB difference (0..255) a cut must exceed
    ratio: float = 3.0  # ... and exceed this many times the recent average difference
    window: int = 8  # frames in the recent average
    min_scene_seconds: float = 0.5  # no scene shorter than this (flashes do not split a shot)

    def validate(self) -> None:
        if self.threshold <= 0 or self.ratio < 1 or self.window < 1 or self.min_scene_seconds < 0:
            raise ValueError(f"invalid scene-detection settings: {self}")


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """Block-average a uint8 `(H, W, 3)` frame down to about THUMB_SIDE pixels on its long side."""
    h, w = frame.shape[:2]
    k = max(1, max(h, w) // THUMB_SIDE)
    hh, ww = max(1, h // k), max(1, w // k)
    small = frame[: hh * k, : ww * k].reshape(hh, k, ww, k, 3).mean(axis=(1, 3), dtype=np.float32)
    return small  # (h', w', 3) float32


@dataclass
class SceneDetector:
    """Feed frames in order with `update`; it says which frames start a new scene."""

    fps: float
    config: SceneConfig = field(default_factory=SceneConfig)

    def __post_init__(self):
        self.config.validate()
        self._prev: np.ndarray | None = None
        self._recent: deque[float] = deque(maxlen=self.config.window)
        self._since_cut = 0
        self._min_frames = max(1, round(self.config.min_scene_seconds * self.fps))

    def update(self, frame: np.ndarray) -> bool:
        """True when `frame` is the first frame of a new scene (never for the very first frame)."""
        thumb = thumbnail(frame)
        prev, self._prev = self._prev, thumb
        self._since_cut += 1
        if prev is None or prev.shape != thumb.shape:
            return False
        score = float(np.abs(thumb - prev).mean())
        recent = float(np.mean(self._recent)) if self._recent else 0.0
        self._recent.append(score)
        cfg = self.config
        if score >= cfg.threshold and score >= cfg.ratio * recent and self._since_cut >= self._min_frames:
            self._since_cut = 0
            self._recent.clear()
            return True
        return False


def detect_cuts(frames: Iterable[np.ndarray], fps: float, config: SceneConfig | None = None) -> tuple[list[int], int]:
    """Indices of the frames that start a new scene (0 excluded), and the number of frames seen."""
    det = SceneDetector(fps, config or SceneConfig())
    cuts = []
    n = 0
    for i, frame in enumerate(frames):
        if det.update(frame):
            cuts.append(i)
        n = i + 1
    return cuts, n


def segments(num_frames: int, cuts: list[int], max_frames: int | None) -> list[tuple[int, int]]:
    """`[start, end)` frame ranges: the scenes between cuts, each split into the fewest equal parts
    of at most `max_frames` frames (equal parts, so no clip is a leftover sliver)."""
    bounds = [0, *[c for c in cuts if 0 < c < num_frames], num_frames]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        parts = 1 if not max_frames else -(-n // max_frames)
        edges = [a + round(k * n / parts) for k in range(parts + 1)]
        out.extend((s, e) for s, e in zip(edges[:-1], edges[1:]) if e > s)
    return out
