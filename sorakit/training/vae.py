"""Training the spacetime VAE from scratch: `sorakit train vae --config recipes/toy/vae.yaml`.

Data: the shared shard reader streams native-size clips (resampled, split by node and worker); a
batching stage in the DataLoader workers takes a random window of `1 + k·t` frames and a random crop
of at most `crop` pixels per side from each clip, then trims the batch to a common shape (multiples of
the spatial factor). A fraction `image_prob` of batches are single frames, so images and videos train
together (an image is a 1-frame video).

Losses: L1 or Charbonnier reconstruction + KL; optionally a VGG perceptual term (from local torchvision
VGG16 weights) and a hinge adversarial term from a per-frame patch discriminator after a given step.
Generator and discriminator share one optimiser: the generator's adversarial term runs the
discriminator with detached parameters and the discriminator's term sees detached reconstructions, so
one backward pass trains both and Lightning's clipping, accumulation, precision and strategies apply.

Output: `OUT/` is the VAE model directory (config.json + model.safetensors, EMA weights when EMA is
on, latent statistics measured after training), as every trainer's OUT is; beside the model,
`OUT/checkpoints/last.ckpt` for `--resume`, `OUT/logs/metrics.csv`, `OUT/reconstructions/step_*.png`
(top row inputs, bottom row reconstructions) and `OUT/train_config.yaml`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorakit.config import ConfigError, save_config, to_dict
from sorakit.models.vae import VAE, VAEConfig, vae_config
from sorakit.training.common import BudgetedOptimisation, OptimConfig, TrainerConfig, build_trainer, fit


@dataclass
class VAEDataConfig:
    shards: str = ""  # raw training shards: a directory, a tar, or a glob
    num_frames: int = 17  # frames per training window, 1 + k·temporal_factor; shorter clips give less
    crop: int = 256  # random crops of at most this many pixels per side (native scale, never resized)
    image_prob: float = 0.1  # fraction of batches made of single frames (images)
    batch_size: int = 4
    num_workers: int = 2  # DataLoader workers decoding clips
    shuffle: int = 500  # sample shuffle buffer
    fps: float | None = None  # resample clips to this rate first (None: their own)


@dataclass
class VAELossConfig:
    reconstruction: Literal["l1", "charbonnier", "mse"] = "l1"  # mse optimises PSNR directly
    kl_weight: float = 1e-6
    perceptual_weights: str | None = None  # local torchvision VGG16 state dict (.pth/.safetensors); None: off
    perceptual_weight: float = 0.1
    perceptual_frames: int = 4  # frames per clip the perceptual term looks at (it is per-frame and costly)
    adversarial_weight: float = 0.0  # 0: off
    adversarial_start_step: int = 5000  # the discriminator joins once reconstructions are reasonable
    disc_channels: int = 64
    # Scale equivariance (EQ-VAE, Kouzelis et al. 2025): also decode the latent average-pooled 2×2 in
    # space against the frames average-pooled 2×2, so neighbouring latents average to a valid latent
    # and edges are not written as ringing codes. Weight of that term; 0 = off. On the toy world it
    # smoothed the latents at equal PSNR, but the toy DiT did worse on them (docs/vae.md).
    equivariance_weight: float = 0.0
    # Latent denoising (l-DeTok, Yang et al. 2025): decode z + τ·std(z)·ε, τ uniform in [0, this] per
    # clip, so the decoder draws clean frames from the imprecise latents a DiT makes and the encoder
    # writes what it must keep in a form noise does not erase. 0 = off.
    latent_noise: float = 0.0


@dataclass
class TrainVAEConfig:
    preset: str = "toy"  # model size: a name in sorakit.models.vae.VAE_PRESETS
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the preset, e.g. {latent_channels: 4}
    out: str = "runs/vae"
    data: VAEDataConfig = field(default_factory=VAEDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    image_every_n_steps: int = 500  # write OUT/reconstructions/step_N.png this often (0: never)
    stats_batches: int = 16  # batches encoded after training to measure the latent normalisation
    threads: int = 0  # torch CPU threads (0: torch's default); 1 is fastest on a CPU shared with other jobs

    def validate(self) -> None:
        self.model_config()  # unknown preset or bad override: fail before any work
        if not 0.0 <= self.data.image_prob <= 1.0:
            raise ConfigError("data.image_prob must be between 0 and 1")
        if self.data.batch_size < 1 or self.data.num_frames < 1 or self.data.crop < 1:
            raise ConfigError("data.batch_size, data.num_frames and data.crop must be positive")

    def model_config(self) -> VAEConfig:
        return vae_config(self.preset, **self.model)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class ClipBatcher:
    """Pipeline stage: decoded clips → uint8 batches (B, T, H, W, 3) of one common shape.

    Runs inside DataLoader workers (picklable, no torch state). Each clip gives a random crop of at
    most `crop` pixels per side; the batch is then trimmed to the smallest height/width among its
    clips rounded down to a multiple of `spatial_factor`, and to the largest `1 + k·t` frame count all
    clips have. With probability `image_prob` the batch is one random frame per clip instead.
    """

    def __init__(self, batch_size: int, crop: int, image_prob: float, spatial_factor: int, temporal_factor: int, seed: int):
        self.batch_size, self.crop, self.image_prob = batch_size, crop, image_prob
        self.f, self.t, self.seed = spatial_factor, temporal_factor, seed

    def _batch(self, clips: list[np.ndarray], rng: random.Random) -> np.ndarray:
        image = rng.random() < self.image_prob
        t = 1 if image else 1 + (min(len(c) for c in clips) - 1) // self.t * self.t
        h = min(min(c.shape[1] for c in clips), self.crop) // self.f * self.f
        w = min(min(c.shape[2] for c in clips), self.crop) // self.f * self.f
        out = np.empty((len(clips), t, h, w, 3), dtype=np.uint8)
        for i, c in enumerate(clips):
            t0 = rng.randint(0, len(c) - 1) if image else 0
            y, x = rng.randint(0, c.shape[1] - h), rng.randint(0, c.shape[2] - w)
            out[i] = c[t0 : t0 + t, y : y + h, x : x + w]
        return out

    def __call__(self, src: Iterable[dict]) -> Iterator[torch.Tensor]:
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}:{rank}:{worker}")
        clips: list[np.ndarray] = []
        for sample in src:
            frames = sample["frames"]
            if frames.shape[1] < self.f or frames.shape[2] < self.f:
                continue  # smaller than one latent pixel: nothing to learn from
            clips.append(frames)
            if len(clips) == self.batch_size:
                yield torch.from_numpy(self._batch(clips, rng))
                clips = []


class VAEData(L.LightningDataModule):
    def __init__(self, cfg: TrainVAEConfig, model_config: VAEConfig, seed_offset: int = 0):
        super().__init__()
        self.cfg, self.model_config, self.seed_offset = cfg, model_config, seed_offset

    def pipeline(self):
        from sorakit.data.reader import clip_pipeline

        d, seed = self.cfg.data, self.cfg.trainer.seed + self.seed_offset
        pipe = clip_pipeline(d.shards, num_frames=d.num_frames, fps=d.fps, shuffle=d.shuffle, resampled=True, seed=seed)
        mc = self.model_config
        pipe.append(ClipBatcher(d.batch_size, d.crop, d.image_prob, mc.spatial_factor, mc.temporal_factor, seed))
        return pipe

    def train_dataloader(self):
        d = self.cfg.data
        return torch.utils.data.DataLoader(
            self.pipeline(), batch_size=None, num_workers=d.num_workers, persistent_workers=d.num_workers > 0
        )


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) → float (B, 3, T, H, W) in [-1, 1]."""
    return batch.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# Auxiliary losses
# --------------------------------------------------------------------------------------------


class VGGPerceptual(nn.Module):
    """Feature distance through a frozen VGG16 loaded from a local file (nothing is downloaded)."""

    LAYERS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3
    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, weights: str | Path):
        super().__init__()
        import torchvision

        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: perceptual-loss weights not found")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        net = torchvision.models.vgg16()
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: not a torchvision VGG16 state dict ({str(e).splitlines()[0]})") from None
        self.features = net.features[: self.LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # frames (N, 3, H, W) in [-1, 1]
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        loss = x.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = h.chunk(2)
                loss = loss + F.mse_loss(F.normalize(a, dim=1), F.normalize(b, dim=1))
        return loss


class PatchDiscriminator(nn.Module):
    """Per-frame PatchGAN: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, in_channels: int = 3, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) → (N, 1, h, w)
        return self.net(x)


def reconstruction_loss(kind: str, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "l1":
        return (recon - target).abs().mean()
    if kind == "mse":
        return (recon - target).pow(2).mean()
    return torch.sqrt((recon - target).pow(2) + 1e-6).mean()  # Charbonnier: smooth L1 near zero


def autoencoder_loss(vae: VAE, x: torch.Tensor, lc: VAELossConfig) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Reconstruction (of the noised latent, with `latent_noise`) + KL (+ the half-scale equivariance
    term): (loss, its parts, reconstruction)."""
    posterior = vae.encode(x)
    z = posterior.sample()
    if lc.latent_noise > 0:  # the noise follows the latent's own scale, so growing the latent cannot outrun it
        tau = torch.rand(z.shape[0], *(1,) * (z.dim() - 1), device=z.device, dtype=z.dtype) * lc.latent_noise
        scale = z.detach().std(dim=(0, *range(2, z.dim())), keepdim=True)  # per channel
        z = z + tau * scale * torch.randn_like(z)
    recon = vae.decode(z)
    rec = reconstruction_loss(lc.reconstruction, recon, x)
    kl = posterior.kl().mean()
    loss = rec + lc.kl_weight * kl
    logs = {"rec": rec, "kl": kl}
    h, w = z.shape[-2] // 2 * 2, z.shape[-1] // 2 * 2  # whole 2×2 latents (batches are multiples of f)
    if lc.equivariance_weight > 0 and h and w:
        half, f = (1, 2, 2), vae.spatial_factor  # space only: time keeps the causal first frame + chunks
        small = vae.decode(F.avg_pool3d(z[..., :h, :w], half))
        target = F.avg_pool3d(x[..., : h * f, : w * f], half)
        logs["equivariance"] = reconstruction_loss(lc.reconstruction, small, target)
        loss = loss + lc.equivariance_weight * logs["equivariance"]
    return loss, logs, recon


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) → (B·T, 3, H, W)."""
    return x.transpose(1, 2).flatten(0, 1)


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


class VAEModule(BudgetedOptimisation, L.LightningModule):
    def __init__(self, cfg: TrainVAEConfig, model_config: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = VAE(model_config)
        lc = cfg.loss
        self.disc = PatchDiscriminator(lc.disc_channels) if lc.adversarial_weight > 0 else None
        # A list keeps the frozen VGG out of checkpoints, EMA and the optimiser.
        self._perceptual = [VGGPerceptual(lc.perceptual_weights)] if lc.perceptual_weights else []

    def on_fit_start(self) -> None:
        for p in self._perceptual:
            p.to(self.device)

    def _perceptual_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        idx = torch.randperm(t, device=x.device)[: self.cfg.loss.perceptual_frames]
        return self._perceptual[0](frames_of(x[:, :, idx]), frames_of(recon[:, :, idx]))

    def _adversarial(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(generator term, discriminator term), each reaching only its own side's parameters."""
        frozen = {n: p.detach() for n, p in self.disc.named_parameters()}
        g = -torch.func.functional_call(self.disc, frozen, (frames_of(recon),)).mean()
        real, fake = self.disc(frames_of(x)), self.disc(frames_of(recon.detach()))
        d = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
        return g, d

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = to_model_input(batch)  # (B, 3, T, H, W)
        lc = self.cfg.loss
        loss, logs, recon = autoencoder_loss(self.vae, x, lc)
        if self._perceptual and lc.perceptual_weight > 0:
            logs["perceptual"] = self._perceptual_loss(x, recon)
            loss = loss + lc.perceptual_weight * logs["perceptual"]
        if self.disc is not None and self.global_step >= lc.adversarial_start_step:
            logs["g_adv"], logs["d_adv"] = self._adversarial(x, recon)
            loss = loss + lc.adversarial_weight * logs["g_adv"] + logs["d_adv"]
        with torch.no_grad():
            mse = F.mse_loss(recon.clamp(-1, 1), x)
            logs["psnr"] = 10 * torch.log10(4.0 / mse.clamp_min(1e-10))  # peak-to-peak 2 in [-1, 1]
        bs = x.shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(k, v, prog_bar=k in ("rec", "psnr"), batch_size=bs)
        every = self.cfg.image_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            save_reconstructions(Path(self.cfg.out) / "reconstructions" / f"step_{self.global_step:07d}.png", x, recon)
        return loss


def save_reconstructions(path: Path, x: torch.Tensor, recon: torch.Tensor, clips: int = 4, frames: int = 4) -> None:
    """A PNG grid: per clip, a row of input frames above a row of their reconstructions."""
    from PIL import Image

    from sorakit.utils.fs import atomic_path

    def u8(v: torch.Tensor) -> np.ndarray:
        return ((v.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()

    t = x.shape[2]
    idx = sorted({round(i * (t - 1) / max(1, frames - 1)) for i in range(frames)})
    rows = []
    for b in range(min(clips, x.shape[0])):
        for v in (x, recon):
            rows.append(np.concatenate([u8(v[b, :, i]).transpose(1, 2, 0) for i in idx], axis=1))
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")


@torch.no_grad()
def measure_latent_stats(vae: VAE, batches: Iterable[torch.Tensor], max_batches: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over `max_batches` training batches."""
    vae.eval()
    c = vae.latent_channels
    n, s, ss = 0, torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        z = vae.encode(to_model_input(batch).to(vae.device, vae.dtype)).mean.double().cpu()  # (B, C, T', h, w)
        z = z.transpose(0, 1).flatten(1)  # (C, N)
        n, s, ss = n + z.shape[1], s + z.sum(1), ss + z.pow(2).sum(1)
    if n == 0:
        raise ValueError("no training batches to measure the latent statistics on")
    mean = s / n
    std = (ss / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def export_model(module: VAEModule, data: VAEData, out: Path) -> Path:
    """Measure the latent normalisation on training batches and write the model directory `out`."""
    from sorakit.models.io import save_pretrained

    vae = module.vae.cpu() if module.device.type != "cpu" else module.vae
    stats_data = VAEData(module.cfg, vae.config, seed_offset=1)  # a fresh stream, single-process
    pipe = stats_data.pipeline()
    mean, std = measure_latent_stats(vae, pipe, module.cfg.stats_batches)
    vae.with_latent_stats(mean, std)
    extra = {"training": {"steps": int(module.global_step), "config": to_dict(module.cfg)}}
    return save_pretrained(vae, out, extra=extra)


def train_vae(cfg: TrainVAEConfig, resume: bool = False) -> Path:
    """Train (or resume) a VAE as configured; returns the exported model directory."""
    from sorakit.utils.fs import exclusive_lock

    if not cfg.data.shards:
        raise ConfigError("data.shards is not set (the raw shards to train on)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out / ".lock"):
        save_config(cfg, out / "train_config.yaml")
        L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        model_config = cfg.model_config()
        module = VAEModule(cfg, model_config)
        data = VAEData(cfg, model_config)
        trainer = build_trainer(cfg.trainer, out, cfg.optim)
        fit(trainer, module, data, out, resume)
        if not trainer.is_global_zero:
            return out
        return export_model(module, data, out)


# --------------------------------------------------------------------------------------------
# Evaluation: `sorakit vae eval`, `sorakit vae reconstruct`
# --------------------------------------------------------------------------------------------


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of two videos or images (inf when equal)."""
    mse = (torch.as_tensor(a).double() - torch.as_tensor(b).double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 255.0, chunk: int = 16) -> float:
    """Mean SSIM (Gaussian window 11, σ 1.5, as Wang et al. 2004) over the frames of two uint8 videos
    (T, H, W, 3); the window shrinks to fit frames smaller than 11 pixels."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.ndim == 3:
        a, b = a[None], b[None]
    side = min(a.shape[1], a.shape[2])
    kernel = min(11, side if side % 2 else side - 1)
    if kernel < 3:
        raise ValueError(f"SSIM needs frames of at least 3×3 pixels, got {a.shape[2]}×{a.shape[1]}")
    total = 0.0
    for i in range(0, a.shape[0], chunk):  # bounded memory for long clips
        x = a[i : i + chunk].permute(0, 3, 1, 2).float()
        y = b[i : i + chunk].permute(0, 3, 1, 2).float()
        val = structural_similarity_index_measure(
            x, y, data_range=data_range, kernel_size=kernel, sigma=1.5 * kernel / 11, reduction="none"
        )
        total += val.sum().item()
    return total / a.shape[0]


def load_vae(model_dir: str | Path, device: str = "auto") -> VAE:
    from sorakit.data.latents import resolve_device
    from sorakit.models.io import load_pretrained

    device = resolve_device(device)
    return load_pretrained(model_dir, kind="vae", map_location=device).to(device)


def evaluate_vae(model_dir: str | Path, shards: Any, limit: int | None = None, device: str = "auto") -> dict:
    """Reconstruct whole clips at their native size and length: PSNR/SSIM per clip and their means."""
    from sorakit.data.reader import clip_pipeline

    vae = load_vae(model_dir, device)
    c, tf, f = vae.latent_channels, vae.temporal_factor, vae.spatial_factor
    clips = []
    for sample in clip_pipeline(shards, random_window=False, split_by_node=False):
        if limit is not None and len(clips) >= limit:
            break
        frames = sample["frames"]
        recon = vae.reconstruct(frames)
        t, h, w, _ = frames.shape
        shape = vae.latent_shape(t, h, w)
        clips.append({
            "key": sample["key"], "frames": t, "width": w, "height": h, "latent_shape": list(shape),
            "compression": round(frames.size / math.prod(shape), 2),
            "psnr": psnr(frames, recon), "ssim": ssim(frames, recon) if min(h, w) >= 3 else None,
        })
    if not clips:
        raise ValueError(f"{shards}: no decodable clips to evaluate")
    finite = [x["psnr"] for x in clips if math.isfinite(x["psnr"])]
    ssims = [x["ssim"] for x in clips if x["ssim"] is not None]
    return {
        "model": str(Path(model_dir).resolve()),
        "kind": vae.config.kind,
        "factors": {"temporal": tf, "spatial": f, "channels": c},
        "nominal_compression": tf * f * f * 3 / c,  # pixel values per latent value, before padding
        "clips": clips,
        "mean_psnr": sum(finite) / len(finite) if finite else math.inf,
        "mean_ssim": sum(ssims) / len(ssims) if ssims else None,
    }


def reconstruct_file(src: str | Path, model_dir: str | Path, dst: str | Path, device: str = "auto") -> dict:
    """Encode and decode one video file at its own size and length; write the result as MP4."""
    from sorakit.media import probe, read_video, write_video

    vae = load_vae(model_dir, device)
    frames = read_video(src)
    recon = vae.reconstruct(frames)
    write_video(dst, recon, fps=probe(src).fps or 24.0, metadata={"comment": f"sorakit vae reconstruct {Path(model_dir).resolve()}"})
    t, h, w, _ = frames.shape
    return {"frames": t, "width": w, "height": h, "latent_shape": list(vae.latent_shape(t, h, w)),
            "psnr": psnr(frames, recon), "ssim": ssim(frames, recon) if min(h, w) >= 3 else None}
