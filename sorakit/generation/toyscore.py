"""Score a video against a toy-world prompt from its pixels alone (`toyworld.md`, "Scoring").

The rules are a contract shared by every implementation, so nothing here knows about models:

1. background: median colour of the first frame's border, snapped to the nearest background colour;
2. object mask per frame: pixels whose colour is far from the (measured) background colour;
3. colour: median colour of all masked pixels, snapped to the nearest object colour;
4. shape: median over frames of mask area / bounding-box area, snapped to the nearest shape's ratio;
5. motion: centroid displacement from the first to the last frame, relative to the frame size;
   below a threshold it is `still`, otherwise the dominant axis and its sign.

The colour and shape tables come only from `sorakit.data.toyworld`; the thresholds are derived from
them (half the closest distance between two classes), so a change in the tables moves them too.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np

ATTRIBUTES = ("color", "shape", "motion", "background")


@dataclasses.dataclass(frozen=True)
class _Tables:
    colors: dict[str, np.ndarray]
    backgrounds: dict[str, np.ndarray]
    motions: tuple[str, ...]
    mask_threshold: float  # RGB distance from the background above which a pixel is object
    still_threshold: float  # displacement / frame extent below which the object is still


def _as_rgb_table(table) -> dict[str, np.ndarray]:
    if isinstance(table, dict):
        return {str(k): np.asarray(v, dtype=np.float64) for k, v in table.items()}
    raise TypeError(f"expected a name -> RGB mapping, got {type(table).__name__}")


@lru_cache(maxsize=1)
def tables() -> _Tables:
    from sorakit.data import toyworld as tw

    colors, backgrounds = _as_rgb_table(tw.COLORS), _as_rgb_table(tw.BACKGROUNDS)
    closest = min(float(np.linalg.norm(c - b)) for c in colors.values() for b in backgrounds.values())
    min_travel = float(tw.TRAVEL_FRACTION[0])
    return _Tables(colors, backgrounds, tuple(tw.MOTIONS), closest / 2, min_travel / 2)


def _snap(value: np.ndarray, table: dict[str, np.ndarray]) -> str:
    return min(table, key=lambda k: float(np.linalg.norm(table[k] - value)))


# Coverage of a pixel by the object, from its colour: 0 at the background colour, 1 at the object
# colour. Values within this margin of 0 or 1 are codec noise and count as exactly 0 or 1; the ramp
# between stays symmetric about 0.5, so an edge blurred by 4:2:0 chroma keeps its true area.
COVERAGE_DEAD_ZONE = 0.1
# Blur reaches at most this many pixels past the thresholded mask; coverage is measured only there.
BOX_MARGIN = 2
# Sub-pixel placements (per axis) averaged for the reference fill ratio of each shape at a size.
_REFERENCE_OFFSETS = 4


def _coverage_fill(cover: np.ndarray) -> tuple[float, float]:
    """Mask area / bounding-box area of a soft (H, W) mask, with the box sides measured as the
    summed column and row maxima (sub-pixel); also returns the box's side sqrt(w * h)."""
    c = np.clip((cover - COVERAGE_DEAD_ZONE) / (1 - 2 * COVERAGE_DEAD_ZONE), 0.0, 1.0)
    box_w, box_h = float(c.max(axis=0).sum()), float(c.max(axis=1).sum())
    if box_w * box_h == 0:
        return 0.0, 0.0
    return float(c.sum()) / (box_w * box_h), (box_w * box_h) ** 0.5


def _chroma_420(cover: np.ndarray) -> np.ndarray:
    """Average over 2x2 blocks and spread back: what 4:2:0 video does to an edge that only chroma
    shows (green on gray differ in hue, hardly in brightness)."""
    h, w = cover.shape
    blocks = cover.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return np.repeat(np.repeat(blocks, 2, axis=0), 2, axis=1)


@lru_cache(maxsize=None)
def reference_fills(size: int) -> dict[str, float]:
    """The fill ratio this scorer measures on each shape as the toy-world renderer draws it at this
    bounding-box side, after 4:2:0 chroma blur, averaged over sub-pixel placements.

    The ideal ratios (triangle 0.5, disc 0.785, square 1) drift at small sizes: a 12-pixel triangle
    drawn on pixel centres fills 0.54 of its box, and 0.63 once chroma blur rounds its thin corners;
    snapping against what a real clip measures keeps the shapes apart at every size.
    """
    from sorakit.data.toyworld import SHAPES, object_mask

    size = max(2, int(size))
    side = size + 4 * BOX_MARGIN  # even, so the 2x2 blocks tile it
    side += side % 2
    out = {}
    for shape in SHAPES:
        fills = []
        for i in range(_REFERENCE_OFFSETS):
            for j in range(_REFERENCE_OFFSETS):
                for parity in range(4):  # where the shape falls on the 2x2 chroma grid
                    x0 = 2 * BOX_MARGIN + parity % 2 + i / _REFERENCE_OFFSETS
                    y0 = 2 * BOX_MARGIN + parity // 2 + j / _REFERENCE_OFFSETS
                    m = object_mask(shape, side, side, x0, y0, size).astype(np.float32)
                    fills.append(_coverage_fill(_chroma_420(m))[0])
        out[shape] = float(np.mean(fills))
    return out


def _snap_fill(ratio: float, size: float) -> str:
    ref = reference_fills(int(round(size)))
    return min(ref, key=lambda s: abs(ref[s] - ratio))


@dataclasses.dataclass
class ToyScore:
    """What the scorer saw in one video and, when a prompt was given, whether it matches it."""

    predicted: dict[str, str | None]
    measures: dict[str, object]
    expected: dict[str, str] | None = None
    correct: dict[str, bool] | None = None

    @property
    def followed(self) -> bool:
        return bool(self.correct) and all(self.correct.values())

    def to_dict(self) -> dict:
        return {
            "predicted": self.predicted,
            "expected": self.expected,
            "correct": self.correct,
            "followed": self.followed,
            "measures": self.measures,
        }


def _border_pixels(frame: np.ndarray) -> np.ndarray:
    return np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]], axis=0)


def analyze(frames: np.ndarray, *, travel_scale: float = 1.0) -> ToyScore:
    """Read the four attributes off a (T, H, W, 3) uint8 video.

    `travel_scale` < 1 scores a part of a clip (the generated frames of an extension): an object
    moving at the toy world's speed covers only that fraction of its travel there, so the `still`
    threshold shrinks with it.
    """
    tb = tables()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    t, h, w, _ = frames.shape
    bg_rgb = np.median(_border_pixels(frames[0]).astype(np.float64), axis=0)
    background = _snap(bg_rgb, tb.backgrounds)

    # (T, H, W) distance of each pixel from the measured background colour
    diff = frames.astype(np.float32) - bg_rgb.astype(np.float32)
    mask = np.sqrt((diff * diff).sum(-1)) > tb.mask_threshold
    areas = mask.sum(axis=(1, 2))  # (T,)
    present = np.flatnonzero(areas > 0)
    measures: dict[str, object] = {
        "background_rgb": [round(float(v), 1) for v in bg_rgb],
        "object_rgb": None,
        "fill_ratio": None,
        "object_side": None,
        "dx": None,
        "dy": None,
        "frames_with_object": int(present.size),
    }
    if present.size == 0:
        predicted = {"color": None, "shape": None, "motion": None, "background": background}
        return ToyScore(predicted, measures)

    obj_rgb = np.median(frames[mask].astype(np.float64), axis=0)
    color = _snap(obj_rgb, tb.colors)

    # (T, H, W) coverage in [0, 1]: the mask area and box sides below are measured with sub-pixel
    # accuracy, since 4:2:0 video blurs colour edges over two pixels and a hard threshold leaves
    # them ragged on small objects.
    axis = (obj_rgb - bg_rgb).astype(np.float32)
    cover = (diff @ axis) / max(float(axis @ axis), 1e-6)
    ys = np.arange(h, dtype=np.float64)
    xs = np.arange(w, dtype=np.float64)
    fills, sides, centroids = [], [], {}
    for i in present:
        m = mask[i]
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        sides.append(float((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)) ** 0.5)
        near = (slice(max(0, rows[0] - BOX_MARGIN), rows[-1] + BOX_MARGIN + 1), slice(max(0, cols[0] - BOX_MARGIN), cols[-1] + BOX_MARGIN + 1))
        fills.append(_coverage_fill(cover[i][near])[0])
        if i in (present[0], present[-1]):
            centroids[int(i)] = ((m.sum(axis=1) * ys).sum() / areas[i], (m.sum(axis=0) * xs).sum() / areas[i])
    fill, side = float(np.median(fills)), float(np.median(sides))
    shape = _snap_fill(fill, side)

    # First and last frames that show the object (the first and last frame for any real clip).
    (y0, x0), (y1, x1) = centroids[int(present[0])], centroids[int(present[-1])]
    dx, dy = (x1 - x0) / w, (y1 - y0) / h
    if max(abs(dx), abs(dy)) < tb.still_threshold * travel_scale:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"  # image rows grow downwards
    measures.update(
        object_rgb=[round(float(v), 1) for v in obj_rgb],
        fill_ratio=round(fill, 4),
        object_side=round(side, 2),
        dx=round(float(dx), 4),
        dy=round(float(dy), 4),
    )
    predicted = {"color": color, "shape": shape, "motion": motion, "background": background}
    return ToyScore(predicted, measures)


def expected_attributes(prompt: str) -> dict[str, str]:
    """The four attributes a toy-world caption asks for; a clear error for anything else."""
    from sorakit.data.toyworld import parse_caption

    parsed = parse_caption(prompt.strip())
    if not parsed:
        raise ValueError(f"not a toy-world caption: {prompt!r}")
    return {a: parsed[a] for a in ATTRIBUTES}


def score_video(frames: np.ndarray, prompt: str | dict, *, travel_scale: float = 1.0) -> ToyScore:
    """Analyse `frames` and compare with `prompt` (a toy-world caption or an attribute dict)."""
    expected = expected_attributes(prompt) if isinstance(prompt, str) else {a: prompt[a] for a in ATTRIBUTES}
    result = analyze(frames, travel_scale=travel_scale)
    result.expected = expected
    result.correct = {a: result.predicted[a] == expected[a] for a in ATTRIBUTES}
    return result


def summarize(scores: Iterable[ToyScore]) -> dict:
    """Per-attribute accuracy and the all-four accuracy (the fraction of prompts followed)."""
    scores = [s for s in scores if s.correct is not None]
    n = len(scores)
    if n == 0:
        return {"n": 0, "accuracy": {a: None for a in ATTRIBUTES}, "all": None}
    acc = {a: sum(s.correct[a] for s in scores) / n for a in ATTRIBUTES}
    return {"n": n, "accuracy": acc, "all": sum(s.followed for s in scores) / n}


# Frame differences are in 0-255 grey levels; below this mean change per frame a clip counts as
# static, so a still clip's seam ratio measures the join against codec noise, not against zero.
SEAM_FLOOR = 0.5


def frame_diffs(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between each pair of consecutive frames, shape (T-1,)."""
    f = np.asarray(frames, dtype=np.float32)
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))


def seam_ratio(frames: np.ndarray, joins: Sequence[int]) -> float:
    """Mean frame difference across the joins over the mean difference inside the clip.

    `joins[k] = j` means frames j-1 and j come from different sources (input / generated); 1.0 means
    the join looks like any other frame step, larger means a visible cut.
    """
    diffs = frame_diffs(frames)
    idx = sorted({int(j) - 1 for j in joins})
    if not idx or idx[0] < 0 or idx[-1] >= diffs.size:
        raise ValueError(f"joins {list(joins)} must lie inside a clip of {len(frames)} frames")
    inside = np.delete(diffs, idx)
    denom = max(float(inside.mean()) if inside.size else 0.0, SEAM_FLOOR)
    return float(diffs[idx].mean()) / denom


def step_ratio(frames: np.ndarray, new: slice) -> float:
    """Mean frame difference inside the generated frames `new` over the mean inside the kept ones.

    1.0 means the new frames change as fast as the input's. The seam ratio's denominator mixes both
    parts, so new frames that flicker lower it and hide a cut; this ratio shows the flicker.
    """
    is_new = np.zeros(len(frames), bool)
    is_new[new] = True
    inside_new, inside_kept = is_new[1:] & is_new[:-1], ~is_new[1:] & ~is_new[:-1]
    if not inside_new.any() or not inside_kept.any():
        raise ValueError(f"frames {new.start}:{new.stop} of {len(frames)} leave no frame step inside both parts")
    diffs = frame_diffs(frames)
    return float(diffs[inside_new].mean()) / max(float(diffs[inside_kept].mean()), SEAM_FLOOR)
