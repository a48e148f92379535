"""The shard reader every training stage uses: a `webdataset` pipeline of native-size clips.

    pipe = clip_pipeline("runs/demo/shards", num_frames=16, fps=8, shuffle=100, resampled=True)
    for sample in pipe:   # {"key", "frames": uint8 (T, H, W, 3), "caption": str | None, "meta": dict}
        ...

Shards are split by node (RANK / WORLD_SIZE or torch.distributed) and by DataLoader worker inside
the pipeline, so it can be handed to `torch.utils.data.DataLoader(pipe, batch_size=None,
num_workers=N)` on any number of machines. It reads shards that video2dataset wrote too: their
json holds `caption` (and its own fields) but not our `num_frames`/`fps`, which are then probed from
the clip. A sample that cannot be decoded is logged and skipped; it never stops training.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

# Member extensions that hold the clip, in the order they are looked for.
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")


@dataclass(frozen=True)
class FrameSampling:
    """How frames are chosen from a clip; see `clip_pipeline` for each field."""

    num_frames: int | None = None
    stride: int = 1
    fps: float | None = None
    random_window: bool = True
    min_frames: int = 1
    max_side: int | None = None
    multiple_of: int | None = None
    crop: tuple[int, int] | None = None

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.min_frames < 1:
            raise ValueError(f"min_frames must be >= 1, got {self.min_frames}")


class SkipSample(Exception):
    """A sample that is fine but does not fit the request (e.g. too few frames)."""


def _caption(members: dict[str, Any], meta: dict) -> str | None:
    txt = members.get("txt")
    if txt is not None:
        text = txt.decode("utf-8", errors="replace").strip() if isinstance(txt, bytes) else str(txt).strip()
        if text:
            return text
    cap = meta.get("caption")
    return cap.strip() if isinstance(cap, str) and cap.strip() else None


def _video_bytes(members: dict[str, Any]) -> bytes:
    for ext in VIDEO_EXTS:
        if ext in members:
            return members[ext]
    raise ValueError(f"no video member (looked for {', '.join(VIDEO_EXTS)}; found {', '.join(sorted(members))})")


def _window(sampling: FrameSampling, meta: dict, rng: random.Random) -> tuple[float | None, int | None]:
    """Start time (seconds) and frame count of the window to decode, from the clip's metadata."""
    if sampling.num_frames is None:
        return None, None
    src_fps = float(meta["fps"])
    eff_fps = sampling.fps or src_fps
    # Frames the full selection would give: resampling to eff_fps, then every stride-th frame.
    total = int(round(float(meta["duration"]) * eff_fps)) if sampling.fps else int(meta["num_frames"])
    selectable = (total + sampling.stride - 1) // sampling.stride
    spare = selectable - sampling.num_frames
    first = rng.randint(0, spare) if sampling.random_window and spare > 0 else 0
    return (first * sampling.stride / eff_fps if first else None), sampling.num_frames


def _resize(frames: np.ndarray, sampling: FrameSampling, rng: random.Random) -> np.ndarray:
    t, h, w, _ = frames.shape
    if sampling.max_side and max(h, w) > sampling.max_side:
        from PIL import Image

        scale = sampling.max_side / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        frames = np.stack([np.asarray(Image.fromarray(f).resize((nw, nh), Image.Resampling.BICUBIC)) for f in frames])
        h, w = nh, nw
    ch, cw = h, w
    if sampling.crop:
        ch, cw = sampling.crop
        if ch > h or cw > w:
            raise SkipSample(f"clip {w}x{h} is smaller than the crop {cw}x{ch}")
    if sampling.multiple_of:
        m = sampling.multiple_of
        ch, cw = ch - ch % m, cw - cw % m
        if ch == 0 or cw == 0:
            raise SkipSample(f"clip {w}x{h} is smaller than one {m}-pixel block")
    if (ch, cw) != (h, w):
        rand = sampling.random_window
        y = rng.randint(0, h - ch) if rand else (h - ch) // 2
        x = rng.randint(0, w - cw) if rand else (w - cw) // 2
        frames = np.ascontiguousarray(frames[:, y : y + ch, x : x + cw])
    return frames


def decode_sample(
    key: str,
    members: dict[str, Any],
    sampling: FrameSampling = FrameSampling(),
    rng: random.Random | None = None,
) -> dict:
    """One raw shard sample (`{ext: bytes}`) -> `{"key", "frames", "caption", "meta"}`.

    `meta` is the sample's json, completed with `width`, `height`, `num_frames`, `fps`, `duration`
    probed from the clip where the json lacks them (video2dataset's json does), plus `clip_start`
    (seconds into the clip of the first returned frame) and `clip_fps` (rate of the returned frames).
    Raises `SkipSample` when the clip does not fit the request, other errors when it is broken.
    """
    from sorakit.media import iter_frames, probe

    rng = rng or random.Random(0)
    raw_meta = members.get("json")
    meta: dict = json.loads(raw_meta) if raw_meta else {}
    if not isinstance(meta, dict):
        raise ValueError("json member is not an object")
    video = _video_bytes(members)
    if any(not isinstance(meta.get(k), (int, float)) or not meta.get(k) for k in ("num_frames", "fps", "duration")):
        info = probe(video)
        for k in ("width", "height", "num_frames", "fps", "duration"):
            if not isinstance(meta.get(k), (int, float)) or not meta.get(k):
                meta[k] = getattr(info, k)
    start, count = _window(sampling, meta, rng)
    frames_list = list(iter_frames(video, stride=sampling.stride, fps=sampling.fps, start=start, max_frames=count))
    if len(frames_list) < sampling.min_frames:
        raise SkipSample(f"{len(frames_list)} frames, fewer than min_frames={sampling.min_frames}")
    frames = _resize(np.stack(frames_list), sampling, rng)  # (T, H, W, 3)
    meta["clip_start"] = start or 0.0
    meta["clip_fps"] = (sampling.fps or float(meta["fps"])) / sampling.stride
    return {"key": key, "frames": frames, "caption": _caption(members, meta), "meta": meta}


class _DecodeStage:
    """Pipeline stage: raw webdataset samples -> decoded clips; broken ones are logged and skipped."""

    def __init__(self, sampling: FrameSampling, seed: int):
        self.sampling = sampling
        self.seed = seed
        self.epoch = -1

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        import webdataset as wds

        self.epoch += 1
        rank, world, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{rank}:{worker}:{self.epoch}")
        for sample in src:
            key = sample.get("__key__", "?")
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            try:
                out = decode_sample(key, members, self.sampling, rng)
            except SkipSample as e:
                log.debug("%s %s: skipped (%s)", sample.get("__url__"), key, e)
                continue
            except Exception as e:  # one broken sample must never stop training
                log.warning("%s %s: skipped, cannot decode (%s)", sample.get("__url__"), key, e)
                continue
            out["meta"]["shard"] = str(sample.get("__url__", ""))
            yield out


def clip_pipeline(
    shards: Any,
    *,
    num_frames: int | None = None,
    stride: int = 1,
    fps: float | None = None,
    random_window: bool = True,
    min_frames: int = 1,
    max_side: int | None = None,
    multiple_of: int | None = None,
    crop: tuple[int, int] | None = None,
    shuffle: int = 0,
    resampled: bool = False,
    seed: int = 0,
    split_by_node: bool = True,
):
    """A `webdataset.DataPipeline` yielding `{"key", "frames", "caption", "meta"}` per clip.

    shards: a directory of shards, a tar, a glob, or a list of those.
    num_frames: decode a window of this many frames (None: the whole clip). The window starts at a
        random frame when `random_window`, else at the first frame; crops are random/centred likewise.
    stride: keep every stride-th frame. fps: first resample to this frame rate by timestamps
        (variable-frame-rate clips come out evenly timed); None keeps the clip's own rate.
    min_frames: skip clips that give fewer frames than this (pass num_frames for fixed-length batches).
    max_side: downscale (aspect kept) so the longer side is at most this; the only resizing in sorakit,
        for memory, never applied at ingest. multiple_of: crop height and width down to multiples
        of this (e.g. a VAE's downsampling factor). crop: (height, width) spatial crop; smaller clips
        are skipped.
    shuffle: sample shuffle buffer size (0: no shuffling; shards are then read in order too).
    resampled: draw shards with replacement forever (for step-based training on many nodes: every
        rank and worker draws its own stream, so no rank runs dry); else one pass per epoch, shards
        split between nodes and workers.
    split_by_node: in epoch mode, give each node (RANK / WORLD_SIZE) its own subset of shards.
    """
    from sorakit.data.shards import sample_pipeline

    sampling = FrameSampling(num_frames, stride, fps, random_window, min_frames, max_side, multiple_of, crop)
    return sample_pipeline(shards, _DecodeStage(sampling, seed), shuffle=shuffle, resampled=resampled, seed=seed,
                           split_by_node=split_by_node)
