"""Training the DiT on packed latents: `sorakit train dit --config recipes/toy/dit.yaml`.

* Data: latent shards (`sorakit encode`) read by `sorakit.data.latents.latent_pipeline` (resampled,
  split by node and worker), cut into spacetime patches and packed into rows of `data.max_tokens`
  (`sorakit.data.packing.packed_batches`); the log reports the token utilisation of every batch.
* Text: embeddings are computed on the fly by the frozen text encoder, on the training device,
  after the batch is moved there, and memoised per caption string in an LRU cache. Why not cached
  in the shards: the latent shards then stay independent of the text encoder (swap it without
  re-encoding video), caption dropout and re-captioning need no second copy, and the cost is small
  (a frozen text tower is a fraction of a DiT step; on the toy world's 180 distinct captions the
  cache answers every lookup after the first few steps).
* Caption dropout (`data.caption_dropout`, 0.1) trains the unconditional branch with the empty
  prompt, which is what classifier-free guidance and the default negative prompt use.
* Mask strategy (Open-Sora): each video trains as text-to-video, image-to-video, forward or backward
  extension, or interpolation, with the probabilities in `masks`; its given latent frames are clean
  context (time 0, the model's "given" flag) and are left out of the loss.
* Loss: the parametrisation's target (`diffusion`), optional min-SNR weights, averaged per video and
  then over videos (`data.video_weighting`).
* Representation alignment (`repa`, REPA: Yu et al. 2024, "Representation Alignment for Generation"):
  an MLP maps the DiT's tokens after `repa.depth` blocks onto the captioner's vision features of the
  clean clip at that place and frame (stored by `sorakit encode --features`), and `repa.weight` ×
  (1 − cosine similarity) joins the loss. From noisy latents the DiT must say what is where, so what
  the features tell apart reaches it as a direct target, not only through the few latent values in
  which it shows. The projector is training-only.
* Trainer, optimiser, EMA, checkpoints and `--resume` come from `sorakit.training.common`.

Output: OUT is a pipeline directory (`pipeline.json`, `dit/` with EMA weights when EMA is on,
pointing at the VAE and text encoder), plus `checkpoints/last.ckpt`, `logs/metrics.csv`,
`samples/step_N/*.mp4` when `samples.every_n_steps` is set.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lightning as L
import torch

from sorakit.config import ConfigError, from_dict, save_config, to_dict
from sorakit.data.packing import VIDEO_WEIGHTINGS, PackedBatch, cut_frames, pack_text, packed_batches, per_video_loss
from sorakit.diffusion import (
    DiffusionConfig,
    alpha_sigma,
    loss_weight,
    network_time,
    sample_t,
    self_condition_input,
    target,
    training_shift,
)
from sorakit.training.common import (BudgetedOptimisation, OptimConfig, TrainerConfig, build_trainer, fit,
                                     log_trained_steps, trained_steps)

MASK_MODES: tuple[str, ...] = ("t2v", "i2v", "forward", "backward", "interpolate")


@dataclass
class MaskConfig:
    """Probabilities of the training modes (normalised; modes a clip is too short for are skipped)."""

    t2v: float = 0.6  # nothing given
    i2v: float = 0.1  # the first latent frame given
    forward: float = 0.1  # the first k given: continue forward in time
    backward: float = 0.1  # the last k given: continue backward
    interpolate: float = 0.1  # the first and last k given
    max_given_fraction: float = 0.5  # k is drawn from 1 .. max(1, fraction · T')

    def validate(self) -> None:
        probs = [getattr(self, m) for m in MASK_MODES]
        if min(probs) < 0 or sum(probs) <= 0:
            raise ConfigError("masks: probabilities must be >= 0 and not all 0")
        if not 0 < self.max_given_fraction < 1:
            raise ConfigError("masks.max_given_fraction must be in (0, 1)")


@dataclass
class DiTDataConfig:
    shards: str = ""  # latent shards (`sorakit encode` output): a directory, a tar, or a glob
    max_tokens: int = 4096  # tokens per packed row
    rows: int = 1  # packed rows per batch
    pool_size: int = 64  # videos held back to fill rows (higher → fuller rows, more memory)
    shuffle: int = 256  # sample shuffle buffer of the shard reader
    num_workers: int = 1
    drop_rate: float = 0.0  # NaViT token dropping (0 = off)
    drop_schedule: str = "constant"  # constant: every video drops drop_rate; uniform: U(0, drop_rate) per video
    caption_dropout: float = 0.1  # trains the unconditional branch for classifier-free guidance
    # Joint image-video training from the same clips (Latte's video-image joint training; Sora and
    # Open-Sora train on images as 1-frame videos): this share of samples is cut to one temporal patch
    # (pt latent frames) at a random time and trains as text-to-image. A row then holds many more
    # examples of what things look like, at the cost of fewer clips that show how they move.
    image_share: float = 0.0
    video_weighting: str = "video"  # loss weight of a video: video (equal), sqrt (√tokens), token
    text_cache: int = 4096  # captions whose embeddings are memoised (LRU)

    def validate(self) -> None:
        if self.video_weighting not in VIDEO_WEIGHTINGS:
            raise ConfigError(f"data.video_weighting must be one of {', '.join(VIDEO_WEIGHTINGS)}")
        if self.drop_schedule not in ("constant", "uniform"):
            raise ConfigError("data.drop_schedule must be constant or uniform")
        if not 0 <= self.drop_rate < 1 or not 0 <= self.caption_dropout <= 1 or not 0 <= self.image_share <= 1:
            raise ConfigError("data.drop_rate must be in [0, 1), data.caption_dropout and data.image_share in [0, 1]")
        if self.max_tokens < 1 or self.rows < 1 or self.pool_size < 1:
            raise ConfigError("data.max_tokens, data.rows and data.pool_size must be positive")


@dataclass
class SamplesConfig:
    """Sample videos written to OUT/samples/step_N/ during training (rank zero)."""

    every_n_steps: int = 0  # 0 = never
    prompts: list[str] = field(default_factory=list)  # empty: the first captions of the current batch
    count: int = 2  # videos when prompts come from the batch
    frames: int = 17
    height: int = 64
    width: int = 96
    fps: int = 8
    steps: int = 20
    guidance: float = 4.0


@dataclass
class RepaConfig:
    """Representation alignment; needs latent shards encoded with `--features`."""

    weight: float = 0.0  # λ on (1 − cos); 0 = off (REPA uses 0.5)
    depth: int = 2  # align the tokens after this many blocks (REPA: about a third of the depth)
    hidden: int = 512  # width of the projector MLP
    dim: int = 0  # feature width; 0 = read from the latent shards' manifest

    def validate(self) -> None:
        if self.weight < 0 or self.depth < 1 or self.hidden < 1 or self.dim < 0:
            raise ConfigError("repa: weight must be >= 0, depth and hidden >= 1, dim >= 0")


@dataclass
class TrainDiTConfig:
    preset: str = "toy"  # model size: tiny, toy, base, large (sorakit.models.dit.DIT_PRESETS)
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. {depth: 8}
    vae: str = ""  # the VAE directory that made the latent shards (exported with the pipeline)
    text_encoder: str = ""  # text encoder directory (toy: the captioner's OUT/text_encoder)
    out: str = "runs/dit"
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DiTDataConfig = field(default_factory=DiTDataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    threads: int = 0  # torch CPU threads per process (0: torch's default); 1 is fastest on a CPU shared with other jobs


# --------------------------------------------------------------------------------------------
# Mask strategy, text, loss
# --------------------------------------------------------------------------------------------


def sample_given_frames(num_frames: int, cfg: MaskConfig, rng: random.Random) -> torch.Tensor | None:
    """A (T',) bool mask of given latent frames for one training video, or None (text-to-video)."""
    need = {"t2v": 1, "i2v": 2, "forward": 2, "backward": 2, "interpolate": 3}
    modes = [m for m in MASK_MODES if getattr(cfg, m) > 0 and num_frames >= need[m]]
    if not modes:
        return None
    mode = rng.choices(modes, weights=[getattr(cfg, m) for m in modes])[0]
    if mode == "t2v":
        return None
    given = torch.zeros(num_frames, dtype=torch.bool)
    k = rng.randint(1, max(1, int(cfg.max_given_fraction * num_frames)))
    if mode == "i2v":
        given[0] = True
    elif mode == "forward":
        given[:k] = True
    elif mode == "backward":
        given[-k:] = True
    else:
        k = min(k, (num_frames - 1) // 2)
        given[:k] = True
        given[-k:] = True
    return given


class TextCache:
    """Frozen text encoder + an LRU cache of (real tokens (L, D), pooled (D,)) per caption."""

    def __init__(self, encoder: torch.nn.Module, size: int = 4096):
        self.encoder = encoder.eval().requires_grad_(False)
        self.size = size
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = self.misses = 0

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.encoder.device != device:
            self.encoder.to(device)
            self.cache.clear()
        todo = sorted({c for c in captions if c not in self.cache})
        self.misses += len(todo)
        self.hits += len(captions) - len(todo)
        if todo:
            emb = self.encoder.encode(todo)
            for i, c in enumerate(todo):
                self.cache[c] = (emb.tokens[i][emb.mask[i]].float(), emb.pooled[i].float())
        for c in captions:
            self.cache.move_to_end(c)
        tokens = [self.cache[c][0] for c in captions]
        pooled = torch.stack([self.cache[c][1] for c in captions])
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return tokens, pooled


def noisy_inputs(
    batch: PackedBatch, alpha: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DiT's noisy tokens x_t, per-token network time and given flags for `batch` noised at
    (alpha, sigma) (B, N, 1): given elements stay clean, and fully given tokens get time 0."""
    x_t = torch.where(batch.given, batch.x, alpha * batch.x + sigma * noise)
    token_given = batch.token_given()
    return x_t, network_time(alpha, sigma)[..., 0].masked_fill(token_given, 0.0), token_given


class RepaProjector(torch.nn.Module):
    """REPA's head: the DiT's tokens (B, N, D) after `depth` blocks → the vision features' space."""

    def __init__(self, dim: int, cfg: RepaConfig):
        super().__init__()
        from sorakit.models.layers import Mlp

        self.depth, self.weight = cfg.depth, cfg.weight
        self.mlp = Mlp(dim, cfg.hidden, cfg.dim)
        self.last_loss: torch.Tensor | None = None  # the latest alignment loss, for the training log

    def forward(self, hidden: torch.Tensor, batch: PackedBatch, weighting: str) -> torch.Tensor:
        """The alignment loss: 1 − cos(projected tokens, features), averaged per video, then over videos,
        on the tokens the denoising loss covers (not padding, not fully given)."""
        if batch.features is None:
            raise ValueError("repa is on but the batch has no vision features (encode the shards with --features)")
        cos = torch.nn.functional.cosine_similarity(self.mlp(hidden).float(), batch.features, dim=-1)  # (B, N)
        keep = batch.valid.any(-1) & ~batch.token_given()
        loss = per_video_loss((1 - cos)[..., None], keep[..., None], batch, weighting)[0]
        self.last_loss = loss.detach()
        return loss


def diffusion_loss(
    dit: torch.nn.Module,
    batch: PackedBatch,
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: DiffusionConfig,
    weighting: str = "video",
    self_cond_prob: float = 0.5,
    repa: RepaProjector | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise each video at its own (shifted) time, predict, and average the loss per video then over
    videos; given elements stay clean (time 0 for fully given tokens) and carry no loss.
    self_cond_prob: for a self-conditioned DiT, the share of videos that see its own first estimate.
    repa: adds its weight × the alignment loss of the tokens after its depth (the per-video means
    returned are the denoising loss's)."""
    x0 = batch.x
    nv = len(batch.videos)
    positions = torch.tensor([v.shape[1] * v.shape[2] * v.shape[3] for v in batch.videos], dtype=torch.float32)
    t = sample_t(nv, cfg)
    alpha_v, sigma_v = alpha_sigma(t, cfg, training_shift(positions, cfg))  # (V,)
    alpha = batch.per_token(alpha_v.to(x0.device))[..., None]  # (B, N, 1)
    sigma = batch.per_token(sigma_v.to(x0.device))[..., None]
    noise = torch.randn_like(x0)
    x_t, t_net, token_given = noisy_inputs(batch, alpha, sigma, noise)
    args = (x_t, t_net, batch.pos, batch.seq_ids, *text, token_given)
    x0_prev = None
    if getattr(dit.config, "self_condition", False):
        # Some videos see the network's own x0 estimate from a first, no-grad pass (as every
        # sampling step after the first), the rest see zeros everywhere (as the first step does).
        # Always a tensor, so every parameter takes part in every step (DDP).
        x0_prev = torch.zeros_like(x_t)
        use = batch.per_token(torch.rand(nv) < self_cond_prob)[..., None].to(x0.device)  # (B, N, 1)
        if use.any():
            with torch.no_grad():
                first = dit(*args, x0_prev=x0_prev).float()
            estimate = self_condition_input(first, x_t, alpha, sigma, cfg.parametrisation, (batch.given, x0))
            x0_prev = torch.where(use, estimate, x0_prev)
    pred = dit(*args, x0_prev=x0_prev, hidden_at=repa.depth if repa is not None else 0)
    if repa is not None:
        pred, hidden = pred
    err = (pred.float() - target(x0, noise, alpha, sigma, cfg.parametrisation)) ** 2
    err = err * loss_weight(alpha, sigma, cfg)
    loss, per_video = per_video_loss(err, batch.valid & ~batch.given, batch, weighting)
    if repa is not None:
        loss = loss + repa.weight * repa(hidden, batch, weighting)
    return loss, per_video


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class DiTModule(BudgetedOptimisation, L.LightningModule):
    def __init__(self, cfg: TrainDiTConfig, model_config):
        super().__init__()
        from sorakit.models.dit import DiT

        self.cfg = cfg
        self.dit = DiT(model_config)
        self.repa = RepaProjector(model_config.dim, cfg.repa) if cfg.repa.weight > 0 else None
        self._t0: float | None = None

    def setup(self, stage: str) -> None:
        if self.cfg.threads:  # here, so that every DDP process gets it
            torch.set_num_threads(self.cfg.threads)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        packed: PackedBatch = batch["batch"]
        loss, _ = diffusion_loss(self.dit, packed, batch["text"], self.cfg.diffusion, self.cfg.data.video_weighting,
                                 repa=self.repa)
        n = len(packed.videos)
        self.log("loss", loss, prog_bar=True, batch_size=n)
        if self.repa is not None:
            self.log("repa", self.repa.last_loss, batch_size=n)  # 1 − cos, before its weight
        self.log("utilisation", packed.utilisation, prog_bar=True, batch_size=n)
        self.log("videos", float(n), batch_size=n)
        log_trained_steps(self, n)
        now = time.perf_counter()
        if self._t0 is not None:
            self.log("tokens_per_s", packed.real_tokens / max(now - self._t0, 1e-6), batch_size=n)
        self._t0 = now
        return loss


def _rank_world() -> tuple[int, int]:
    import os

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class PackedLatents(torch.utils.data.IterableDataset):
    """Packed batches from a stream of latent samples; each worker packs its own share of shards."""

    def __init__(self, cfg: TrainDiTConfig, patch: tuple[int, int, int], channels: int, seed: int,
                 source: Callable[[int], Iterable[dict]] | None = None):
        self.cfg, self.patch, self.channels, self.seed = cfg, patch, channels, seed
        self.source = source  # seed → samples; default: the latent-shard reader

    def _samples(self, seed: int) -> Iterable[dict]:
        if self.source is not None:
            return self.source(seed)
        from sorakit.data.latents import latent_pipeline

        return latent_pipeline(self.cfg.data.shards, shuffle=self.cfg.data.shuffle, resampled=True, seed=seed)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        rank, _ = _rank_world()
        seed = self.seed + 1000 * rank + (info.id if info else 0)
        d, masks = self.cfg.data, self.cfg.masks

        def add_masks(sample: dict, rng: random.Random) -> dict:
            z = sample["latent"]
            if z.dim() != 4 or z.shape[0] != self.channels:
                where = f"{sample.get('meta', {}).get('shard', '')} {sample.get('key', '')}".strip()
                raise ValueError(f"{where}: latent of shape {tuple(z.shape)}, the DiT expects ({self.channels}, T', H', W') "
                                 "(shards encoded by another VAE?)")
            pt = self.patch[0]
            if z.shape[1] > pt and rng.random() < d.image_share:
                start = rng.randrange(z.shape[1] - pt + 1)
                return {**cut_frames(sample, slice(start, start + pt)), "given": None}
            return {**sample, "given": sample_given_frames(z.shape[1], masks, rng)}

        yield from packed_batches(
            self._samples(seed), self.patch, d.max_tokens, rows=d.rows, pool_size=d.pool_size,
            drop_rate=d.drop_rate, drop_schedule=d.drop_schedule, seed=seed, transform=add_masks,
        )


class LatentData(L.LightningDataModule):
    """Packed latent batches; text embeddings are added on the device after transfer."""

    def __init__(self, cfg: TrainDiTConfig, model_config, text: TextCache,
                 source: Callable[[int], Iterable[dict]] | None = None):
        super().__init__()
        self.cfg, self.text, self.source = cfg, text, source
        self.patch, self.channels = tuple(model_config.patch), model_config.in_channels
        self.rng = random.Random(cfg.trainer.seed)

    def train_dataloader(self):
        # Seeded by the step, so a resumed run does not replay the batches it already trained on.
        step = self.trainer.global_step if self.trainer is not None else 0
        ds = PackedLatents(self.cfg, self.patch, self.channels, self.cfg.trainer.seed + 7919 * step, self.source)
        w = self.cfg.data.num_workers
        return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=w, persistent_workers=w > 0)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        packed: PackedBatch = batch["batch"]
        p = self.cfg.data.caption_dropout
        captions = ["" if self.rng.random() < p else c for c in batch["captions"]]
        tokens, pooled = self.text(captions, packed.x.device)
        return {**batch, "text": pack_text(packed, tokens, pooled)}


class SampleVideos(L.Callback):
    """Every `samples.every_n_steps`, generate a few videos with the current weights (rank zero)."""

    def __init__(self, cfg: TrainDiTConfig, out: Path, text: TextCache):
        self.cfg, self.out, self.text = cfg, out, text
        self.vae = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        s = self.cfg.samples
        step = trainer.global_step
        if s.every_n_steps <= 0 or step % s.every_n_steps or not trainer.is_global_zero:
            return
        prompts = list(s.prompts) or [c for c in batch["captions"] if c][: s.count]
        if prompts:
            write_samples(pl_module.dit, self.cfg, self.text.encoder, prompts, self.out / "samples" / f"step_{step:06d}", self)


def write_samples(dit, cfg: TrainDiTConfig, text_encoder, prompts: list[str], out: Path, holder=None) -> list[Path]:
    from sorakit.generation.sampling import generate_latents
    from sorakit.media import write_video
    from sorakit.models.io import load_pretrained

    s = cfg.samples
    vae = getattr(holder, "vae", None) or load_pretrained(cfg.vae, kind="vae")
    if holder is not None:
        holder.vae = vae
    vae.to(dit.device)
    shape = vae.latent_shape(s.frames, s.height, s.width)[1:]
    latents = generate_latents(dit, cfg.diffusion, text_encoder, prompts, [shape] * len(prompts),
                               guidance=s.guidance, steps=s.steps, seed=cfg.trainer.seed)
    paths = []
    for i, (prompt, z) in enumerate(zip(prompts, latents)):
        frames = vae.decode_video(z, num_frames=s.frames, height=s.height, width=s.width)
        path = out / f"{i:02d}.mp4"
        write_video(path, frames, s.fps, metadata={"comment": prompt})
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def resolve_model_config(cfg: TrainDiTConfig, out: Path, resume: bool, in_channels: int, text_dim: int):
    """The saved config of the run being resumed, else the preset + overrides sized to the VAE and text encoder."""
    from sorakit.models.dit import DiTConfig, dit_config
    from sorakit.utils.fs import atomic_write_json

    saved = out / "model_config.json"
    if resume and saved.is_file():
        return from_dict(DiTConfig, json.loads(saved.read_text()), "model")
    model_config = dit_config(cfg.preset, **{"in_channels": in_channels, "text_dim": text_dim, **cfg.model})
    if model_config.in_channels != in_channels or model_config.text_dim != text_dim:
        raise ConfigError(
            f"model overrides give in_channels={model_config.in_channels}, text_dim={model_config.text_dim} but the "
            f"VAE has {in_channels} latent channels and the text encoder width {text_dim}"
        )
    atomic_write_json(saved, to_dict(model_config))
    return model_config


def check_latents_match_vae(shards: str, vae_path: str, vae_config: dict) -> None:
    """Latent shards made by a VAE of another shape cannot train a DiT that decodes with `vae_path`."""
    from sorakit.data.shards import read_manifest

    if not shards or not Path(shards).is_dir():
        return
    manifest = read_manifest(shards) or {}
    made_by = (manifest.get("vae") or {}).get("config")
    if not made_by:
        return
    keys = ("latent_channels", "spatial_factor", "temporal_factor", "kind")
    diff = [k for k in keys if k in made_by and made_by[k] != vae_config.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(
            f"{shards}: encoded by a VAE with {k}={made_by[k]}, but vae {vae_path} has {k}={vae_config.get(k)}"
        )


def repa_features_dim(shards: str) -> int:
    """The width of the vision features stored in latent shards (`sorakit encode --features`)."""
    from sorakit.data.latents import load_latent_manifest
    from sorakit.models.io import read_model_config

    captioner = (load_latent_manifest(shards).get("settings") or {}).get("features") if Path(shards).is_dir() else None
    if not captioner:
        raise ValueError(f"{shards}: no vision features for repa; encode with `sorakit encode ... --features CAPTIONER`")
    return int(read_model_config(captioner)["config"]["vision"]["width"])


def train_dit(cfg: TrainDiTConfig, resume: bool = False, source: Callable[[int], Iterable[dict]] | None = None) -> Path:
    """Train, then export OUT as a pipeline directory; returns OUT.

    `source(seed)` replaces the latent-shard reader with any stream of {"latent", "caption", "key"} samples.
    """
    from sorakit.generation.pipeline import export_pipeline
    from sorakit.models.io import read_model_config
    from sorakit.models.text_encoder import load_text_encoder

    if source is None and not cfg.data.shards:
        raise ValueError("data.shards is not set: give the latent shards (--set data.shards=DIR)")
    for name in ("vae", "text_encoder"):
        if not getattr(cfg, name):
            raise ValueError(f"{name} is not set: give its model directory (--set {name}=DIR)")
    vae_meta = read_model_config(cfg.vae)
    if vae_meta["kind"] != "vae":
        raise ValueError(f"{cfg.vae}: holds a {vae_meta['kind']} model, expected vae")
    check_latents_match_vae(cfg.data.shards, cfg.vae, vae_meta["config"])
    if cfg.repa.weight > 0 and not cfg.repa.dim:
        cfg.repa.dim = repa_features_dim(cfg.data.shards)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    text = TextCache(load_text_encoder(cfg.text_encoder), cfg.data.text_cache)
    model_config = resolve_model_config(cfg, out, resume, vae_meta["config"]["latent_channels"], text.encoder.dim)
    if cfg.repa.weight > 0 and cfg.repa.depth > model_config.depth:
        raise ConfigError(f"repa.depth {cfg.repa.depth} is deeper than the DiT ({model_config.depth} blocks)")
    module = DiTModule(cfg, model_config)
    callbacks = [SampleVideos(cfg, out, text)] if cfg.samples.every_n_steps > 0 else []
    trainer = build_trainer(cfg.trainer, out, cfg.optim, callbacks)
    data = LatentData(cfg, model_config, text, source)
    fit(trainer, module, data, out, resume)
    if trainer.is_global_zero:
        dit = module.dit.cpu().eval()
        export_pipeline(out, dit, cfg.diffusion, cfg.vae, cfg.text_encoder,
                        extra={"trained_steps": trained_steps(trainer), "data": cfg.data.shards})
    return out
