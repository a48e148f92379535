"""The toy world: short real videos whose content is known exactly (see docs/toyworld.md).

One flat-coloured object (circle, square or triangle) moves at constant velocity, or stands still,
on a flat background. The tables below are the only place the toy-world vocabulary lives; the
captioner, the prompt expander and the scorer all read them from here.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (240, 220, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (16, 16, 16),
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Mask area over bounding-box area of each shape, used by the scorer.
SHAPE_FILL: dict[str, float] = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

SIDE_RANGE = (48, 160)  # even pixels, each of width and height
ASPECT_RANGE = (0.5, 2.0)  # width / height
FRAMES_RANGE = (8, 64)
FPS_CHOICES = (8, 12, 24)
OBJECT_FRACTION = (0.25, 0.35)  # bounding-box side over min(width, height)
TRAVEL_FRACTION = (0.4, 0.6)  # distance travelled over the frame's extent along the motion axis
SPLITS = ("train", "heldout")

_CAPTION_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) (?:moving (?P<motion>\w+)|standing still) on an? (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    motion: str
    background: str
    width: int
    height: int
    num_frames: int
    fps: int
    size: int  # bounding-box side in pixels
    x0: float  # top-left corner of the bounding box in the first frame
    y0: float
    dx: float  # total displacement over the clip
    dy: float
    seed: int

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.motion, self.background)


def caption(color: str, shape: str, motion: str, background: str) -> str:
    action = "standing still" if motion == "still" else f"moving {motion}"
    return f"a {color} {shape} {action} on a {background} background"


def parse_caption(text: str) -> dict[str, str] | None:
    """The four attributes of a toy-world caption, or None when the text is not one."""
    m = _CAPTION_RE.match(text.strip().lower())
    if not m:
        return None
    out = {k: m.group(k) for k in ("color", "shape", "background")}
    out["motion"] = m.group("motion") or "still"
    if out["color"] not in COLORS or out["shape"] not in SHAPES or out["background"] not in BACKGROUNDS:
        return None
    if out["motion"] not in MOTIONS:
        return None
    return out


def _even(rng: np.random.Generator, lo: int, hi: int) -> int:
    return 2 * int(rng.integers(lo // 2, hi // 2 + 1))


def sample_size(rng: np.random.Generator) -> tuple[int, int]:
    """Width and height, even, within SIDE_RANGE, aspect log-uniform within ASPECT_RANGE."""
    lo, hi = SIDE_RANGE
    while True:
        aspect = float(np.exp(rng.uniform(np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1]))))
        area = rng.uniform(lo * lo, hi * hi * 0.6)
        w = 2 * round(np.sqrt(area * aspect) / 2)
        h = 2 * round(np.sqrt(area / aspect) / 2)
        if lo <= w <= hi and lo <= h <= hi and ASPECT_RANGE[0] <= w / h <= ASPECT_RANGE[1]:
            return w, h


def sample_spec(
    rng: np.random.Generator,
    seed: int = 0,
    *,
    color: str | None = None,
    shape: str | None = None,
    motion: str | None = None,
    background: str | None = None,
    width: int | None = None,
    height: int | None = None,
    num_frames: int | None = None,
    fps: int | None = None,
) -> ClipSpec:
    """A random clip per the toy-world rules; any attribute may be fixed by the caller."""
    color = color or str(rng.choice(list(COLORS)))
    shape = shape or str(rng.choice(SHAPES))
    motion = motion or str(rng.choice(MOTIONS))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    if width is None or height is None:
        width, height = sample_size(rng)
    num_frames = num_frames or int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1))
    fps = fps or int(rng.choice(FPS_CHOICES))
    side = min(width, height)
    lo, hi = int(np.ceil(OBJECT_FRACTION[0] * side)), int(np.floor(OBJECT_FRACTION[1] * side))
    size = int(rng.integers(lo, hi + 1))
    dx = dy = 0.0
    if motion in ("left", "right"):
        dx = float(rng.uniform(*TRAVEL_FRACTION) * width) * (1 if motion == "right" else -1)
    elif motion in ("up", "down"):
        dy = float(rng.uniform(*TRAVEL_FRACTION) * height) * (1 if motion == "down" else -1)
    # The whole path must stay inside the frame: pick the start so that both ends fit.
    x0 = float(rng.uniform(max(0.0, -dx), width - size - max(0.0, dx)))
    y0 = float(rng.uniform(max(0.0, -dy), height - size - max(0.0, dy)))
    return ClipSpec(color, shape, motion, background, width, height, num_frames, fps, size, x0, y0, dx, dy, seed)


def spec_for_seed(seed: int) -> ClipSpec:
    return sample_spec(np.random.default_rng(seed), seed)


def object_mask(shape: str, width: int, height: int, x0: float, y0: float, size: int) -> np.ndarray:
    """Boolean `(H, W)` mask: the pixels whose centres fall inside the shape (hard edges, exact colours)."""
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    u = xs - x0  # position inside the bounding box
    v = ys - y0
    inside_box = (u >= 0) & (u < size) & (v >= 0) & (v < size)
    if shape == "square":
        return inside_box
    if shape == "circle":
        r = size / 2
        return (u - r) ** 2 + (v - r) ** 2 <= r * r
    if shape == "triangle":  # apex up, base horizontal, height equal to base
        return inside_box & (np.abs(u - size / 2) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: ClipSpec) -> np.ndarray:
    """The clip's frames, uint8 `(T, H, W, 3)`, with the exact table colours."""
    frames = np.empty((spec.num_frames, spec.height, spec.width, 3), np.uint8)
    frames[:] = BACKGROUNDS[spec.background]
    colour = np.array(COLORS[spec.color], np.uint8)
    for i in range(spec.num_frames):
        a = i / (spec.num_frames - 1) if spec.num_frames > 1 else 0.0
        mask = object_mask(spec.shape, spec.width, spec.height, spec.x0 + a * spec.dx, spec.y0 + a * spec.dy, spec.size)
        frames[i][mask] = colour
    return frames


def clip_seed(seed: int, index: int, split: str) -> int:
    """Per-clip seed. Splits differ in parity, so a held-out set never shares a seed with training."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (seed * 1_000_000 + index) * 2 + SPLITS.index(split)


def metadata(spec: ClipSpec) -> dict:
    d = asdict(spec)
    d["caption"] = spec.caption
    return d


def write_clip(out_dir: Path, name: str, spec: ClipSpec) -> Path:
    from sorakit.media import write_video
    from sorakit.utils.fs import atomic_write_json

    path = out_dir / f"{name}.mp4"
    # Low CRF keeps the flat colours close to the table values after 4:2:0 encoding.
    write_video(path, render(spec), spec.fps, crf=12, preset="fast")
    atomic_write_json(out_dir / f"{name}.json", metadata(spec))
    return path


def _write_one(args: tuple[str, int, str, int]) -> str:
    out_dir, index, split, seed = args
    name = f"{split}-{index:06d}"
    out = Path(out_dir)
    if not (out / f"{name}.json").exists():  # the json is written last: its presence means done
        write_clip(out, name, spec_for_seed(seed))
    return name


def make_toyworld(
    out_dir: str | Path, num_clips: int, seed: int = 0, split: str = "train", workers: int = 1, progress=None
) -> list[Path]:
    """Write `num_clips` clips (MP4 + JSON each) into `out_dir`; clips already there are kept (resumable)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), i, split, clip_seed(seed, i, split)) for i in range(num_clips)]
    if workers > 1:
        from sorakit.utils.procs import die_with_parent

        with ProcessPoolExecutor(workers, initializer=die_with_parent) as pool:
            names = []
            for name in pool.map(_write_one, jobs, chunksize=8):
                names.append(name)
                if progress:
                    progress()
    else:
        names = []
        for job in jobs:
            names.append(_write_one(job))
            if progress:
                progress()
    return [out / f"{n}.mp4" for n in names]


def load_clip_metadata(path: str | Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())
