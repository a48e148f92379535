"""`sorakit eval refiner`: does a refiner beat classical upsampling, and does it keep the prompt?

    report = evaluate_refiner("runs/demo/heldout_shards", "runs/demo/refiner", limit=16)

Real clips (the held-out shards): each clip is cut to whole refiner units (sides multiples of s,
1 + k·r frames; a long clip is subsampled in time to at most `max_frames` frames spread over its
whole length, and cropped to at most `max_side` pixels a side when given, to bound the cost on a
CPU) and is the ground truth; `downsample_video` makes its low-res /
low-fps version, which is refined back and, as the baseline, upsampled bicubically in space and
linearly in time. Reported per clip and as means: PSNR of the refined and of the baseline video
against the ground truth (refined with and without `match_low_frequencies`), their difference (the
quality bar: ≥ 2 dB), and the VAE's own
reconstruction PSNR of the ground truth (the ceiling for any refiner working in its latent space);
for a frame-rate refiner also the same on the input's frames and on the new in-between frames apart.

Prompt following: where a clip's caption is a toy-world caption, the refined video and its base
(the low-res clip) are scored by the toy-world rules (`toyscore`); a refiner must not score worse.
With `pipeline`, base videos are also generated from toy-world prompts by that pipeline's DiT, and
scored before and after refining.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sorakit.generation import toyscore
from sorakit.generation.refine import (
    downsample_video, load_refiner, match_low_frequencies, psnr, refine_video, refiner_vae_path, upsample_video,
)


def crop_to_units(frames: np.ndarray, scales: tuple[int, int], max_frames: int | None,
                  max_side: int | None = None) -> np.ndarray | None:
    """The ground truth cut from a clip, or None when it is too small: a centred crop of at most
    `max_side` pixels a side, sides multiples of s, and 1 + k·r frames spread over the whole clip
    (every n-th frame when it has more than `max_frames`), so the object's whole motion is kept."""
    s, r = scales
    t, h, w = frames.shape[:3]
    stride = 1 if max_frames is None or t <= max_frames else -(-(t - 1) // max(1, max_frames - 1))
    t = 1 + (t - 1) // stride
    t = 1 + (t - 1) // r * r
    ch, cw = (min(h, max_side), min(w, max_side)) if max_side else (h, w)
    ch, cw = ch - ch % s, cw - cw % s
    if ch == 0 or cw == 0 or (r > 1 and t < 1 + r):
        return None
    y, x = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(frames[: 1 + (t - 1) * stride : stride, y : y + ch, x : x + cw])


def _followed(frames: np.ndarray, caption: str | None) -> toyscore.ToyScore | None:
    if not caption:
        return None
    try:
        return toyscore.score_video(frames, caption)
    except ValueError:  # not a toy-world caption: nothing to score
        return None


def _mean(values: list[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def evaluate_refiner(
    shards,
    model,
    *,
    vae=None,
    limit: int | None = 16,
    max_frames: int | None = 17,
    max_side: int | None = None,
    steps: int | None = None,
    sampler: str | None = None,
    aug_level: float | None = None,
    seed: int = 0,
    pipeline: str | Path | None = None,
    num_generated: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """PSNR of refined vs baseline-upsampled real clips, and prompt following before/after refining."""
    from sorakit.data.reader import clip_pipeline
    from sorakit.models.io import load_pretrained

    refiner = load_refiner(model)
    scales = refiner.scales
    vae_path = Path(vae) if vae is not None else refiner_vae_path(model)
    vae_model = load_pretrained(vae_path, kind="vae")
    kwargs = {"steps": steps, "sampler": sampler, "aug_level": aug_level}

    clips, base_scores, refined_scores = [], [], []
    skipped = 0
    for sample in clip_pipeline(shards, random_window=False, split_by_node=False):
        if limit is not None and len(clips) >= limit:
            break
        gt = crop_to_units(sample["frames"], scales, max_frames, max_side)
        if gt is None:
            skipped += 1
            continue
        low = downsample_video(gt, scales)
        start = time.perf_counter()
        raw = refine_video(refiner, vae_model, low, seed=seed + len(clips), consistency=False, **kwargs)
        refined = match_low_frequencies(raw, low, scales)
        seconds = time.perf_counter() - start
        ceiling = vae_model.decode_video(vae_model.encode_video(gt), *gt.shape[:3])
        baseline = upsample_video(low, scales)
        row = {
            "key": sample["key"],
            "size": list(gt.shape[:3]),
            "low_size": list(low.shape[:3]),
            "psnr_refined": psnr(refined, gt),
            "psnr_refined_raw": psnr(raw, gt),
            "psnr_baseline": psnr(baseline, gt),
            "psnr_vae": psnr(ceiling, gt),
            "seconds": seconds,
        }
        if scales[1] > 1:  # the input's own frames (j·r) and the new in-between ones, apart
            new = np.arange(len(gt)) % scales[1] > 0
            for part, frames in (("kept", ~new), ("new", new)):
                row[f"psnr_refined_{part}"] = psnr(refined[frames], gt[frames])
                row[f"psnr_baseline_{part}"] = psnr(baseline[frames], gt[frames])
                row[f"psnr_vae_{part}"] = psnr(ceiling[frames], gt[frames])
        b, r = _followed(low, sample["caption"]), _followed(refined, sample["caption"])
        if b is not None and r is not None:
            base_scores.append(b)
            refined_scores.append(r)
            row["followed_base"], row["followed_refined"] = b.followed, r.followed
        clips.append(row)
        if progress:
            progress(1)
    if not clips:
        raise ValueError(f"{shards}: no clip large enough to evaluate a ({scales[0]}× space, {scales[1]}× time) refiner")

    refined_mean = _mean([c["psnr_refined"] for c in clips])
    baseline_mean = _mean([c["psnr_baseline"] for c in clips])
    report = {
        "model": str(model) if not hasattr(model, "config") else "<in memory>",
        "vae": str(vae_path),
        "scales": {"spatial": scales[0], "temporal": scales[1]},
        "settings": {"steps": steps or refiner.config.steps, "sampler": sampler or "default",
                     "aug_level": refiner.config.aug_level if aug_level is None else aug_level,
                     "max_frames": max_frames, "max_side": max_side, "seed": seed},
        "clips": clips,
        "skipped_small": skipped,
        "psnr": {"refined": refined_mean, "refined_raw": _mean([c["psnr_refined_raw"] for c in clips]),
                 "baseline": baseline_mean, "vae_ceiling": _mean([c["psnr_vae"] for c in clips])},
        "gain_db": refined_mean - baseline_mean,
        # Frame-rate refiners: the same means on the input's frames and on the in-between ones.
        "psnr_by_frames": {
            part: {k: _mean([c[f"psnr_{k}_{part}"] for c in clips]) for k in ("refined", "baseline", "vae")}
            for part in ("kept", "new")
        } if scales[1] > 1 else None,
        "seconds_per_clip": _mean([c["seconds"] for c in clips]),
        "prompt_following": {
            "base": toyscore.summarize(base_scores),
            "refined": toyscore.summarize(refined_scores),
        },
    }
    if pipeline is not None and num_generated > 0:
        extra = {"max_side": max(16, max_side // scales[0])} if max_side else {}
        report["generated"] = evaluate_on_generated(pipeline, refiner, vae_model, num_generated, seed=seed, **extra, **kwargs)
    return report


def evaluate_on_generated(pipeline, refiner, vae, num: int, *, seed: int = 0, max_side: int = 80,
                          max_frames: int = 9, **kwargs) -> dict:
    """Generate `num` toy-world prompts with the pipeline's DiT, refine each, score both."""
    from sorakit.data.toyworld import sample_spec
    from sorakit.generation.modes import GenerationConfig, text_to_video
    from sorakit.generation.outputs import load_model

    pipe = load_model(pipeline)
    rng = np.random.default_rng(seed)
    base_scores, refined_scores, seconds = [], [], []
    for i in range(num):
        spec = sample_spec(rng, seed)
        # Small base videos: the refiner's output is s·r times larger, and its cost grows with that.
        w, h = min(spec.width, max_side), min(spec.height, max_side)
        # refine=False: the base video alone, even when the pipeline holds refiners of its own.
        cfg = GenerationConfig(width=w - w % 2, height=h - h % 2, frames=min(spec.num_frames, max_frames), seed=seed + i,
                               refine=False)
        base = text_to_video(pipe, spec.caption, cfg).frames
        start = time.perf_counter()
        refined = refine_video(refiner, vae, base, seed=seed + i, **kwargs)
        seconds.append(time.perf_counter() - start)
        base_scores.append(toyscore.score_video(base, spec.caption))
        refined_scores.append(toyscore.score_video(refined, spec.caption))
    return {
        "pipeline": str(pipeline),
        "num": num,
        "base": toyscore.summarize(base_scores),
        "refined": toyscore.summarize(refined_scores),
        "seconds_per_refine": _mean(seconds),
    }
