"""Refining videos with cascaded refiners: more pixels and more frames from a base video.

    z_hi = refine_latents(refiner, [z_lo], steps=20, seed=0)[0]     # latents in, latents out
    z_hi = refine_chain([r1, r2], [z_lo])[0]                        # a pipeline's chain of refiners
    frames_hi = refine_video(refiner_dir, vae, frames_lo)           # uint8 video in, uint8 video out
    frames_hi = refine_decoded(pipe.refiners, pipe.vae, z_lo, (T, H, W))   # after a DiT: base latent in

A refiner (`sorakit.models.refiner`) is given as a model directory or a loaded `Refiner`; its
diffusion settings and sampling defaults come with its config. Sampling uses the shared samplers of
`sorakit.diffusion` (DPM-Solver++(2M) by default) over the packed target tokens, each video drawing
its noise from its own seed (a video does not change when others share its batch), and the
low-res conditioning noised to the refiner's `aug_level`, as in training.

The pixel helpers here define what "low resolution" means everywhere (training pairs, evaluation):
`downsample_video` averages s×s pixel blocks and keeps every r-th frame; `upsample_video` is the
bicubic-in-space, linear-in-time baseline a refiner has to beat.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sorakit.data.packing import pack
from sorakit.diffusion import alpha_sigma, get_sampler, network_time, sampling_grid, shift_factor
from sorakit.models.refiner import Refiner, Scales, refined_shape, refined_video_size, upsample_latent

PSNR_CAP = 100.0  # dB for identical videos, so that means over clips stay finite


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_refiner(refiner, device: torch.device | str | None = None) -> Refiner:
    """A `Refiner` from a model directory (or the model itself), in eval mode."""
    if isinstance(refiner, Refiner):
        model = refiner
    elif isinstance(refiner, (str, os.PathLike)):
        from sorakit.models.io import load_pretrained

        model = load_pretrained(refiner, kind="refiner")
    else:
        raise TypeError(f"expected a refiner directory or a Refiner, got {type(refiner).__name__}")
    return model.to(device) if device is not None else model


def refiner_vae_path(refiner_dir: str | os.PathLike) -> Path:
    """The VAE a refiner directory was trained with (recorded at export, relative to the directory)."""
    from sorakit.models.io import read_model_config

    refiner_dir = Path(refiner_dir)
    meta = read_model_config(refiner_dir)
    vae = meta.get("vae")
    if not vae:
        raise ValueError(f"{refiner_dir}: records no VAE; pass the VAE directory explicitly (--vae)")
    path = Path(vae) if Path(vae).is_absolute() else refiner_dir / vae
    if not path.is_dir():
        raise FileNotFoundError(f"{refiner_dir}: its VAE {vae} does not exist ({path}); pass --vae")
    return path


def chain_scales(refiners: Sequence[Refiner]) -> Scales:
    """The overall (spatial, temporal) factor of a chain of refiners."""
    s = math.prod(r.scales[0] for r in refiners)
    t = math.prod(r.scales[1] for r in refiners)
    return (s, t)


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} latents")
    return seeds


@torch.no_grad()
def refine_latents(
    refiner,
    latents: Sequence[torch.Tensor],
    *,
    steps: int | None = None,
    sampler: str | None = None,
    seed: int | Sequence[int] = 0,
    aug_level: float | None = None,
    max_tokens: int | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Refine low-res latents (C, T', H', W') into (C, 1 + (T' − 1)·r, s·H', s·W'), on the CPU in float32.

    steps / aug_level: default to the refiner's config. seed: one per latent, or a base seed (latent
    i gets seed + i). max_tokens: row capacity for packing (default: the largest video).
    """
    model = load_refiner(refiner)
    cfg, dcfg = model.config, model.config.diffusion
    n = len(latents)
    if n == 0:
        return []
    steps = cfg.steps if steps is None else int(steps)
    aug = cfg.aug_level if aug_level is None else float(aug_level)
    if not 0.0 <= aug < 1.0:
        raise ValueError(f"aug_level must be in [0, 1), got {aug}")
    device = next(model.parameters()).device
    a_aug, s_aug = alpha_sigma(torch.tensor(aug), dcfg)

    noise, conds, shapes, bases = [], [], [], []
    for i, (z, s) in enumerate(zip(latents, _seeds(seed, n))):
        if z.dim() != 4 or z.shape[0] != cfg.in_channels:
            raise ValueError(
                f"latent {i} must be ({cfg.in_channels}, T', H', W') for this refiner, got {tuple(z.shape)} "
                "(was it made by the VAE the refiner was trained with?)"
            )
        g = torch.Generator().manual_seed(int(s))  # CPU: the same seed gives the same video on every device
        full = refined_shape(tuple(z.shape), model.scales)
        noise.append(torch.randn(full, generator=g))
        low = z.detach().float().cpu()
        up = upsample_latent(low, model.scales)
        bases.append(up if cfg.residual else None)
        if aug > 0:
            up = upsample_latent(a_aug * low + s_aug * torch.randn(low.shape, generator=g), model.scales)
        conds.append(up)
        shapes.append(full)

    patch = model.patch
    batch = pack(noise, patch, max_tokens).to(device)
    cond = pack(conds, patch, max_tokens).x.to(device)  # same shapes → same layout as `batch`
    positions = torch.tensor([c[1] * c[2] * c[3] for c in shapes], dtype=torch.float32)
    token_shift = batch.per_token(shift_factor(positions, dcfg).to(device))[..., None]  # (B, N, 1)
    grid = sampling_grid(dcfg, steps, token_shift)
    x = batch.x * grid.sigma[0]
    aug_tokens = torch.full(batch.seq_ids.shape, aug, device=device)

    def denoise(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = network_time(alpha, sigma).expand(*x.shape[:2], 1)[..., 0]  # (B, N)
        return model(x, cond, t, aug_tokens, batch.pos, batch.seq_ids).float()

    run = get_sampler(sampler, dcfg)
    was_training = model.training
    model.eval()
    try:
        out = run(denoise, x, grid, dcfg, callback=callback)
    finally:
        model.train(was_training)
    return [z.float().cpu() if b is None else z.float().cpu() + b for z, b in zip(batch.unpack(out), bases)]


def refine_chain(refiners: Sequence, latents: Sequence[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """Apply refiners one after the other (e.g. a temporal one, then a spatial one)."""
    for r in refiners:
        latents = refine_latents(r, latents, **kwargs)
    return list(latents)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _as_list(refiner) -> list:
    return list(refiner) if isinstance(refiner, (list, tuple)) else [refiner]


def _prepare(refiner, vae) -> tuple[list[Refiner], torch.nn.Module]:
    from sorakit.models.io import load_pretrained

    models = [load_refiner(r) for r in _as_list(refiner)]
    if isinstance(vae, (str, os.PathLike)):
        vae = load_pretrained(vae, kind="vae")
    for m in models:
        if m.config.in_channels != vae.latent_channels:
            raise ValueError(
                f"the refiner works on {m.config.in_channels}-channel latents but the VAE makes "
                f"{vae.latent_channels}: use the VAE the refiner was trained with"
            )
    return models, vae


def refine_decoded(
    refiner, vae, latent: torch.Tensor, size: tuple[int, int, int], *, base_frames: np.ndarray | None = None,
    consistency: bool = True, **kwargs,
) -> np.ndarray:
    """A base latent (C, T', H', W') of a video of `size` = (frames, height, width) → the refined
    video, uint8 (1 + (T − 1)·r, s·H, s·W, 3). This is what a text-to-video pipeline calls after its
    DiT: the base video is decoded only for the low-frequency consistency (pass it as `base_frames`
    when it is decoded anyway). kwargs go to `refine_latents` (steps, sampler, seed, aug_level).
    """
    models, vae = _prepare(refiner, vae)
    scales = chain_scales(models)
    z = refine_chain(models, [latent], **kwargs)[0]
    out = vae.decode_video(z, *refined_video_size(*size, scales))
    if not consistency:
        return out
    if base_frames is None:
        base_frames = vae.decode_video(latent, *size)
    return match_low_frequencies(out, base_frames, scales)


def refine_cascade(refiners: Sequence[Refiner], vaes: Sequence[torch.nn.Module], base_vae: torch.nn.Module,
                   latent: torch.Tensor, frames: np.ndarray, **kwargs) -> np.ndarray:
    """A pipeline's refiners after its DiT, each in the space of the VAE it was trained with: the
    base latent (in `base_vae`'s space) and its decoded `frames` in, the refined video out.

    Consecutive refiners that share a VAE refine latents as one chain. Where the next refiner works
    in another space (a pixel-space super-resolution refiner after a latent base model, the shape of
    Imagen Video's cascade), the video so far is encoded with that refiner's VAE. kwargs go to
    `refine_latents` (steps, sampler, seed, aug_level).
    """
    if len(vaes) != len(refiners):
        raise ValueError(f"{len(refiners)} refiners but {len(vaes)} VAEs")
    z, space = latent, base_vae
    for _, run in itertools.groupby(zip(refiners, vaes), key=lambda pair: id(pair[1])):
        models, (vae, *_) = zip(*run)
        if vae is not space:
            z = vae.encode_video(frames).clone()
        frames = refine_decoded(list(models), vae, z, tuple(frames.shape[:3]), base_frames=frames, **kwargs)
        space = None  # the refined video's latent is not kept: a next run encodes its frames
    return frames


def refine_video(refiner, vae, frames: np.ndarray, *, consistency: bool = True, **kwargs) -> np.ndarray:
    """uint8 (T, H, W, 3) → uint8 (1 + (T − 1)·r, s·H, s·W, 3) through the VAE's latent space.

    refiner: a directory, a `Refiner`, or a list of those (a chain). vae: a VAE or its directory.
    consistency: take the output's low frequencies from the input (`match_low_frequencies`).
    kwargs go to `refine_latents` (steps, sampler, seed, aug_level).
    """
    models, vae = _prepare(refiner, vae)
    frames = np.asarray(frames)
    z = vae.encode_video(frames).clone()
    return refine_decoded(models, vae, z, tuple(frames.shape[:3]), base_frames=frames, consistency=consistency, **kwargs)


def check_divisible(shape: tuple[int, ...], scales: Scales) -> None:
    t, h, w = shape[:3]
    s, r = scales
    if h % s or w % s or (t - 1) % r:
        raise ValueError(
            f"a {t}×{h}×{w} video cannot be reduced by ({s}× space, {r}× time): "
            f"height and width must be multiples of {s} and frames 1 + k·{r}"
        )


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _down(x: torch.Tensor, scales: Scales) -> torch.Tensor:
    """float (T, 3, H, W) → (1 + (T − 1)/r, 3, H/s, W/s): s×s block means of every r-th frame."""
    s, r = scales
    x = x[::r]
    return F.avg_pool2d(x, s) if s > 1 else x


def _up(x: torch.Tensor, scales: Scales) -> torch.Tensor:
    """float (T, 3, H, W) → (1 + (T − 1)·r, 3, s·H, s·W): bicubic in space, linear in time."""
    s, r = scales
    if s > 1:
        x = F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
    if r > 1 and x.shape[0] > 1:
        pos = torch.arange(1 + (x.shape[0] - 1) * r, dtype=torch.float32) / r
        lo = pos.floor().long().clamp(max=x.shape[0] - 1)
        hi = (lo + 1).clamp(max=x.shape[0] - 1)
        w = (pos - lo.float())[:, None, None, None]
        x = x[lo] * (1 - w) + x[hi] * w
    return x


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)


def downsample_video(frames: np.ndarray, scales: Scales) -> np.ndarray:
    """The low-res / low-fps version of a video: mean of s×s pixel blocks, every r-th frame from the first."""
    check_divisible(np.shape(frames), scales)
    return _to_uint8(_down(_float(frames), scales))


def upsample_video(frames: np.ndarray, scales: Scales) -> np.ndarray:
    """The classical baseline: bicubic in space, linear in time (frame j of the input lands on j·r)."""
    return _to_uint8(_up(_float(frames), scales))


def match_low_frequencies(refined: np.ndarray, low: np.ndarray, scales: Scales) -> np.ndarray:
    """`refined` with its low band replaced by the input's: refined − up(down(refined)) + up(low).

    A refined video should reduce back to its input; the VAE's decoder gets flat regions and colours
    only approximately right, while the input has them exactly. Keeping the refiner's detail (the
    high band) on the input's low band (ILVR-style low-frequency consistency, Choi et al. 2021)
    removes that error without touching what the refiner added.
    """
    hi, lo = _float(refined), _float(low)
    expected = (1 + (lo.shape[0] - 1) * scales[1], lo.shape[2] * scales[0], lo.shape[3] * scales[0])
    if (hi.shape[0], hi.shape[2], hi.shape[3]) != expected:
        raise ValueError(f"refined video {tuple(refined.shape)} is not the {scales} refinement of {tuple(low.shape)}")
    return _to_uint8(hi - _up(_down(hi, scales), scales) + _up(lo, scales))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 videos of one shape, in dB (capped at PSNR_CAP)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))


# --------------------------------------------------------------------------------------------
# Files: `sorakit refine IN.mp4 --model DIR --out OUT.mp4`
# --------------------------------------------------------------------------------------------


def refine_file(
    src: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae: str | os.PathLike | None = None,
    device: str = "cpu",
    preview: bool = False,
    crf: int = 18,
    **kwargs,
) -> dict:
    """Refine one video file; writes OUT.mp4 (metadata inside) and the OUT.json sidecar, atomically.

    The sidecar keeps the input's prompt when the input is a sorakit video, so a refined video can
    still be scored against it (`sorakit eval toyworld --videos`). Returns the sidecar record.
    """
    import time

    from sorakit.generation.outputs import (
        container_metadata, contact_sheet, file_sha256, preview_path, read_input_video, sidecar_path, write_png,
    )
    from sorakit.media import write_video
    from sorakit.models.io import load_pretrained, read_model_config
    from sorakit.utils.fs import atomic_write_json

    src, out, model = Path(src), Path(out), Path(model)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such video file")
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"{out}: refined videos are written as .mp4")
    if out.resolve() == src.resolve():
        raise ValueError(f"{out}: the output would overwrite the input; choose another --out")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    refiner = load_refiner(model, device)
    vae_path = Path(vae) if vae is not None else refiner_vae_path(model)
    vae_model = load_pretrained(vae_path, kind="vae").to(device)
    frames, fps, prompt = read_input_video(src)
    s, r = refiner.scales
    start = time.perf_counter()
    refined = refine_video(refiner, vae_model, frames, **kwargs)
    seconds = time.perf_counter() - start
    out_fps = (fps or 0.0) * r or float(r)
    record = {
        "prompt": prompt or "",
        "mode": "refine",
        "seed": kwargs.get("seed", 0),
        "settings": {"steps": kwargs.get("steps") or refiner.config.steps, "sampler": kwargs.get("sampler"),
                     "aug_level": refiner.config.aug_level if kwargs.get("aug_level") is None else kwargs["aug_level"]},
        "model": {"refiner": str(model.resolve()), "refiner_trained_steps": read_model_config(model).get("trained_steps"),
                  "vae": str(vae_path.resolve())},
        "size": {"width": int(refined.shape[2]), "height": int(refined.shape[1]), "frames": int(refined.shape[0]), "fps": out_fps},
        "scales": {"spatial": s, "temporal": r},
        "inputs": {"video": {"path": str(src.resolve()), "sha256": file_sha256(src)},
                   "size": {"width": int(frames.shape[2]), "height": int(frames.shape[1]), "frames": int(frames.shape[0]), "fps": fps}},
        "timing": {"seconds": seconds},
    }
    write_video(out, refined, out_fps, crf=crf, metadata=container_metadata(record))
    files = {"video": out.name, "preview": None}
    if preview:
        write_png(preview_path(out), contact_sheet(refined))
        files["preview"] = preview_path(out).name
    atomic_write_json(sidecar_path(out), {**record, "files": files})  # last: its presence means complete
    return record
