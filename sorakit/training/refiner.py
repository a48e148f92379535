"""Training a cascaded refiner with Lightning: `sorakit train refiner --config recipes/toy/refiner.yaml`.

Training pairs are made on the fly from the *raw* shards the VAE trained on, so no data preparation
is added: a random window of a clip (at most `data.crop` pixels a side, cropped, never resized, and
`data.frames` frames) is the high-res target; `downsample_video` (s×s block means, every r-th frame)
makes its low-res input; the frozen VAE encodes both under no_grad. Why raw shards and not the
latent shards the DiT uses: latent shards hold only the full-size latent, and the low-res latent
must be the VAE's encoding of a real low-res video (what the base model generates), which cannot
be computed from a latent without decoding it. The low-res encode costs 1/(s²·r) of the high-res one.

Windows are cut so the two latents line up exactly: height and width multiples of s·f (the VAE's
spatial factor), 1 + k·r·t frames (t its temporal factor), so the high-res latent is
(C, 1 + k·r, s·H', s·W') for a low-res latent (C, 1 + k, H', W').

Two data modes, as for the captioner:
* streaming (default; GPUs): the shared shard reader (resampled, split by node and worker) yields
  windows; the VAE encodes them on the training device in `on_after_batch_transfer`;
* `data.preload: true` (small datasets on CPUs): `data.windows_per_clip` windows of every clip are
  encoded once, up front, and epochs reshuffle the cached latent pairs. On a CPU the VAE encode
  costs more than a refiner step, so this is what makes the toy recipe fit in minutes.

Output: `OUT/` is a refiner model directory (config.json with the VAE it belongs to, relative to
OUT; model.safetensors, EMA weights when EMA is on), `OUT/checkpoints/last.ckpt` for `--resume`,
`OUT/logs/metrics.csv`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning as L
import numpy as np
import torch

from sorakit.config import ConfigError, save_config
from sorakit.data.packing import VIDEO_WEIGHTINGS, pack, per_video_loss
from sorakit.diffusion import alpha_sigma, loss_weight, network_time, sample_t, target, training_shift
from sorakit.generation.refine import downsample_video
from sorakit.models.refiner import Refiner, RefinerConfig, Scales, refined_shape, refiner_config, upsample_latent
from sorakit.training.common import (BudgetedOptimisation, OptimConfig, TrainerConfig, build_trainer, fit,
                                     log_trained_steps, trained_steps)

Pair = tuple[torch.Tensor, torch.Tensor]  # (high-res latent, low-res latent)
PIXELS = "pixels"  # `vae: pixels`: refine in pixel space (the identity VAE, `sorakit.models.vae` kind "pixels")


@dataclass
class RefinerDataConfig:
    shards: str = ""  # raw training shards (the VAE's): a directory, a tar, or a glob
    crop: int = 96  # high-res windows are at most this many pixels a side (random crop; never resized)
    frames: int = 9  # high-res windows have at most this many frames (rounded down to 1 + k·r·t)
    fps: float | None = None  # resample clips to this rate first (None: the clip's own)
    # A window takes every k-th frame, k drawn from 1 .. max_stride (as far as the clip is long enough):
    # a frame-rate refiner must see the motion per frame of the low-fps videos it will fill in, which
    # is several times a native clip's (a base model's frames, a clip subsampled to a few frames).
    max_stride: int = 1
    batch_size: int = 8  # windows per step, packed into rows of `max_tokens`
    max_tokens: int = 4096  # row capacity in target tokens; one window must fit
    preload: bool = False  # encode the latent pairs once, up front, instead of streaming
    windows_per_clip: int = 1  # preload: random windows cached per clip
    limit: int | None = None  # preload: use at most this many clips
    num_workers: int = 2  # DataLoader workers (streaming)
    shuffle: int = 500  # streaming: sample shuffle buffer


@dataclass
class TrainRefinerConfig:
    preset: str = "toy"  # model size: tiny, toy, base (sorakit.models.refiner.REFINER_PRESETS)
    # Overrides of the preset: spatial_scale, temporal_scale, dim, ..., diffusion {...}, aug_level, steps.
    model: dict[str, Any] = field(default_factory=dict)
    vae: str = ""  # the trained VAE directory (frozen; the refiner works in its latent space), or "pixels"
    out: str = "runs/refiner"
    aug_max: float = 0.5  # conditioning noise-augmentation levels are drawn from U(0, aug_max)
    video_weighting: str = "video"  # how videos of different sizes count in the loss: video, sqrt, token
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is fastest on a CPU shared with other jobs
    data: RefinerDataConfig = field(default_factory=RefinerDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if not 0.0 <= self.aug_max < 1.0:
            raise ConfigError(f"aug_max must be in [0, 1), got {self.aug_max}")
        if self.video_weighting not in VIDEO_WEIGHTINGS:
            raise ConfigError(f"unknown video_weighting {self.video_weighting!r} (known: {', '.join(VIDEO_WEIGHTINGS)})")
        d = self.data
        if min(d.batch_size, d.windows_per_clip, d.crop, d.frames, d.max_stride) < 1:
            raise ConfigError("data.batch_size, data.windows_per_clip, data.crop, data.frames and data.max_stride must be positive")
        self.model_config()  # unknown or invalid model overrides fail here, not after the VAE has loaded

    def model_config(self, in_channels: int | None = None) -> RefinerConfig:
        overrides = dict(self.model)
        if in_channels is not None:
            if overrides.get("in_channels", in_channels) != in_channels:
                raise ConfigError(f"model.in_channels={overrides['in_channels']} but the VAE makes {in_channels}-channel latents")
            overrides["in_channels"] = in_channels
        try:
            return refiner_config(self.preset, **overrides)
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None


# --------------------------------------------------------------------------------------------
# Training pairs
# --------------------------------------------------------------------------------------------


def window_units(scales: Scales, vae) -> tuple[int, int]:
    """(pixels, frames) a window's sides and length-minus-one must be multiples of."""
    s, r = scales
    return s * vae.spatial_factor, r * vae.temporal_factor


def training_window(frames: np.ndarray, scales: Scales, vae, crop: int, max_frames: int,
                    rng: random.Random, max_stride: int = 1) -> np.ndarray | None:
    """A random window of `frames` (T, H, W, 3) whose latents line up at both resolutions, or None
    when the clip is too small (smaller than one s·f block, or too short to show r× motion). The
    window takes every k-th frame, k uniform over the strides up to `max_stride` the clip allows."""
    unit, tunit = window_units(scales, vae)
    t, h, w = frames.shape[:3]
    ch, cw = min(h, crop) // unit * unit, min(w, crop) // unit * unit

    def units(stride: int) -> int:  # whole temporal units a window of this stride holds
        return (min(1 + (t - 1) // stride, max_frames) - 1) // tunit

    fits = [k for k in range(1, max_stride + 1) if units(k) >= 1 or (k == 1 and scales[1] == 1)]
    if ch == 0 or cw == 0 or not fits:
        return None
    stride = rng.choice(fits)
    span = units(stride) * tunit * stride + 1  # frames of the clip the window covers
    t0, y, x = rng.randint(0, t - span), rng.randint(0, h - ch), rng.randint(0, w - cw)
    return np.ascontiguousarray(frames[t0 : t0 + span : stride, y : y + ch, x : x + cw])


def encode_pair(vae, window: np.ndarray | torch.Tensor, scales: Scales) -> Pair:
    """(high-res latent, low-res latent) of one window, with the frozen VAE on its own device."""
    window = window.cpu().numpy() if isinstance(window, torch.Tensor) else np.asarray(window)
    low = downsample_video(window, scales)
    # encode_video runs in inference mode; clone() makes normal tensors autograd may use.
    z_hi, z_lo = vae.encode_video(window).clone(), vae.encode_video(low).clone()
    if tuple(z_hi.shape) != refined_shape(tuple(z_lo.shape), scales):
        raise ValueError(f"window {tuple(window.shape)} gives misaligned latents {tuple(z_hi.shape)} / {tuple(z_lo.shape)}")
    return z_hi, z_lo


def refiner_loss(
    model: Refiner,
    pairs: Sequence[Pair],
    aug_max: float,
    weighting: str = "video",
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The diffusion loss on a batch of latent pairs: (scalar, per-video losses (V,)).

    Each video draws a time t and a conditioning augmentation level a ∈ U(0, aug_max): the low-res
    latent is noised to level a on the diffusion path, upsampled to the target grid and given beside
    the target noised to t; the network predicts in the configured parametrisation. For a residual
    refiner the target is the high-res latent minus the clean upsampled low-res one.
    """
    cfg = model.config.diffusion
    device = model.x_embed.weight.device
    n = len(pairs)
    aug = torch.rand(n, generator=generator) * aug_max
    a_aug, s_aug = alpha_sigma(aug, cfg)
    targets, conds = [], []
    for i, (z_hi, z_lo) in enumerate(pairs):
        z_lo = z_lo.to(device).float()
        eps = torch.randn(z_lo.shape, generator=generator).to(device)
        conds.append(upsample_latent(a_aug[i] * z_lo + s_aug[i] * eps, model.scales))
        base = upsample_latent(z_lo, model.scales) if model.config.residual else 0.0
        targets.append(z_hi.to(device).float() - base)
    batch = pack(targets, model.patch, max_tokens)
    cond = pack(conds, model.patch, max_tokens).x  # same shapes → same layout
    t = sample_t(n, cfg, generator)
    positions = torch.tensor([z.shape[1] * z.shape[2] * z.shape[3] for z in targets], dtype=torch.float32)
    alpha, sigma = alpha_sigma(t, cfg, training_shift(positions, cfg, generator))  # (V,)
    tok_alpha = batch.per_token(alpha.to(device))[..., None]  # (B, N, 1)
    tok_sigma = batch.per_token(sigma.to(device))[..., None]
    noise = torch.randn(batch.x.shape, generator=generator).to(device)
    x_t = tok_alpha * batch.x + tok_sigma * noise
    t_net = batch.per_token(network_time(alpha, sigma).to(device))  # (B, N)
    pred = model(x_t, cond, t_net, batch.per_token(aug.to(device)), batch.pos, batch.seq_ids)
    err = (pred.float() - target(batch.x, noise, tok_alpha, tok_sigma, cfg.parametrisation)) ** 2
    err = err * batch.per_token(loss_weight(alpha, sigma, cfg).to(device))[..., None]
    return per_video_loss(err, batch.valid, batch, weighting)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _min_frames(scales: Scales, vae) -> int:
    return 1 + window_units(scales, vae)[1] if scales[1] > 1 else 1


def preload_pairs(cfg: TrainRefinerConfig, vae, scales: Scales, seed: int) -> list[Pair]:
    """Encode `windows_per_clip` windows of this rank's share of the clips into latent pairs, once."""
    from rich.progress import Progress

    from sorakit.data.reader import clip_pipeline
    from sorakit.data.shards import list_shards

    d = cfg.data
    rank, world = _rank_world()
    paths = list_shards(d.shards)
    mine = paths[rank::world] if len(paths) >= world else paths
    rng = random.Random(f"{seed}:{rank}")
    pipe = clip_pipeline([str(p) for p in mine], fps=d.fps, random_window=False, min_frames=_min_frames(scales, vae),
                         split_by_node=False)
    pairs: list[Pair] = []
    clips = too_small = 0
    with Progress(transient=True) as bar:
        task = bar.add_task("encoding training pairs", total=d.limit)
        for sample in pipe:
            if d.limit is not None and clips >= d.limit:
                break
            clips += 1
            for _ in range(d.windows_per_clip):
                w = training_window(sample["frames"], scales, vae, d.crop, d.frames, rng, d.max_stride)
                if w is None:
                    too_small += 1
                    break
                pairs.append(encode_pair(vae, w, scales))
            bar.advance(task)
    if not pairs:
        raise ValueError(f"{d.shards}: no clip large and long enough for a ({scales[0]}× space, {scales[1]}× time) window")
    if too_small:
        print(f"preload: skipped {too_small} clips too small for a training window")
    return pairs


@dataclass
class _Geometry:
    """The VAE's factors alone, so that DataLoader workers need not carry the VAE."""

    spatial_factor: int
    temporal_factor: int


class _Windows:
    """Pipeline stage: decoded clips → random aligned windows (uint8 tensors); picklable for workers."""

    def __init__(self, scales: Scales, geometry: _Geometry, crop: int, frames: int, seed: int, max_stride: int = 1):
        self.scales, self.geometry, self.crop, self.frames, self.seed = scales, geometry, crop, frames, seed
        self.max_stride = max_stride

    def __call__(self, src: Iterator[dict]) -> Iterator[torch.Tensor]:
        worker = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{_rank_world()[0]}:{worker.id if worker else 0}")
        for s in src:
            w = training_window(s["frames"], self.scales, self.geometry, self.crop, self.frames, rng, self.max_stride)
            if w is not None:
                yield torch.from_numpy(w)


class PairList(torch.utils.data.Dataset):
    def __init__(self, pairs: list[Pair]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]


def _collate_pairs(items: list[Pair]) -> dict:
    return {"pairs": list(items)}


def _collate_windows(items: list[torch.Tensor]) -> dict:
    return {"windows": list(items)}


class RefinerData(L.LightningDataModule):
    def __init__(self, cfg: TrainRefinerConfig, vae, scales: Scales):
        super().__init__()
        self.cfg, self.vae, self.scales = cfg, vae, scales
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        d, seed = self.cfg.data, self.cfg.trainer.seed
        if d.preload:
            self.dataset = PairList(preload_pairs(self.cfg, self.vae, self.scales, seed))
            return
        from sorakit.data.reader import clip_pipeline

        span = 1 + (d.frames - 1) * d.max_stride  # decoded frames a window of the largest stride needs
        pipe = clip_pipeline(d.shards, num_frames=span, fps=d.fps, min_frames=_min_frames(self.scales, self.vae),
                             shuffle=d.shuffle, resampled=True, seed=seed)
        geometry = _Geometry(self.vae.spatial_factor, self.vae.temporal_factor)
        pipe.append(_Windows(self.scales, geometry, d.crop, d.frames, seed, d.max_stride))
        self.dataset = pipe

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "windows" in batch:  # streaming: encode on the training device (the module moved the VAE there)
            batch = {"pairs": [encode_pair(self.vae, w, self.scales) for w in batch["windows"]]}
        return batch

    def train_dataloader(self):
        d = self.cfg.data
        if d.preload:
            g = torch.Generator().manual_seed(self.cfg.trainer.seed)
            return torch.utils.data.DataLoader(self.dataset, batch_size=d.batch_size, shuffle=True, drop_last=len(self.dataset) >= d.batch_size,
                                               generator=g, collate_fn=_collate_pairs)
        return torch.utils.data.DataLoader(self.dataset, batch_size=d.batch_size, num_workers=d.num_workers,
                                           collate_fn=_collate_windows, persistent_workers=d.num_workers > 0)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class RefinerModule(BudgetedOptimisation, L.LightningModule):
    def __init__(self, cfg: TrainRefinerConfig, model_config: RefinerConfig, vae):
        super().__init__()
        self.cfg = cfg
        self.model = Refiner(model_config)
        # Not a submodule: the frozen VAE is neither trained, nor checkpointed, nor EMA-averaged.
        self._frozen = {"vae": vae.eval().requires_grad_(False)}

    @property
    def vae(self):
        return self._frozen["vae"]

    def on_fit_start(self) -> None:
        self.vae.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pairs = batch["pairs"]
        loss, _ = refiner_loss(self.model, pairs, self.cfg.aug_max, self.cfg.video_weighting, self.cfg.data.max_tokens)
        self.log("loss", loss, prog_bar=True, batch_size=len(pairs))
        log_trained_steps(self, len(pairs))
        return loss


def _relative(target: Path, base: Path) -> str:
    try:
        return os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(target.resolve())


def train_refiner(cfg: TrainRefinerConfig, resume: bool = False) -> Path:
    """Train, then write the refiner model directory into `cfg.out`; returns that path."""
    from sorakit.models.io import load_pretrained, save_pretrained

    if not cfg.data.shards:
        raise ValueError("data.shards is not set: give the raw training shards (--set data.shards=DIR)")
    if not cfg.vae:
        raise ValueError("vae is not set: give the trained VAE directory (--set vae=DIR), or --set vae=pixels")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.vae == PIXELS:  # pixel space: the weightless identity VAE, kept in the refiner's directory
        from sorakit.models.vae import VAE, vae_config

        if not (out / "vae" / "config.json").is_file():
            save_pretrained(VAE(vae_config("pixels")), out / "vae")
        cfg = replace(cfg, vae=str(out / "vae"))
    vae = load_pretrained(cfg.vae, kind="vae")
    model_config = cfg.model_config(in_channels=vae.latent_channels)
    save_config(cfg, out / "train_config.yaml")
    module = RefinerModule(cfg, model_config, vae)
    scales = module.model.scales
    trainer = build_trainer(cfg.trainer, out, cfg.optim)
    fit(trainer, module, RefinerData(cfg, vae, scales), out, resume)
    if trainer.is_global_zero:
        save_pretrained(
            module.model.cpu().eval(), out,
            extra={"vae": _relative(Path(cfg.vae), out), "trained_steps": trained_steps(trainer), "data": cfg.data.shards},
        )
    return out
