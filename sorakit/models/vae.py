"""The spacetime VAE: a causal 3D-convolution autoencoder that compresses video in space and time.

    vae = VAE(vae_config("toy"))                     # or load_pretrained(dir, kind="vae")
    z = vae.encode_video(frames)                     # uint8 (T, H, W, 3) → normalised (C, T', H', W')
    frames = vae.decode_video(z, num_frames=T, height=H, width=W)   # → uint8 (T, H, W, 3)

Time: the first frame is encoded on its own and each later group of `t = temporal_factor` frames
becomes one latent frame, so `1 + k·t` frames give `1 + k` latent frames and an image is a 1-frame
video. A length that is not of that form is padded at the end by repeating the last frame up to the
next `1 + k·t`; decoding gives the padded length, and `decode_video(..., num_frames=T)` crops it back.

Space: height and width are padded on the bottom/right edge (replicating the edge pixels) up to
multiples of `f = spatial_factor`, so `H' = ceil(H / f)`; `decode_video(..., height=H, width=W)` crops.

Memory: `encode_video`/`decode_video` run the network over `chunk_frames` latent frames at a time,
with a causal cache per convolution (the result equals one pass over the whole video up to float
rounding), and over overlapping spatial tiles of `tile_size` pixels blended linearly when a frame is
larger than a tile. Peak memory depends on the chunk and tile sizes, not on the video's length.

Normalisation: the posterior means are shifted and scaled per channel by `latent_mean`/`latent_std`,
measured on training data after training and stored in the config, so the latents every other stage
sees are roughly zero-mean, unit-variance and no code downstream carries a magic constant.

The `spatial` kind is the per-frame 2D VAE ("spatial-patch compression") used as a baseline: same
network with temporal kernels of size 1 and no temporal compression.

The `pixels` kind (preset `pixels`) has no weights: its "latent" is the video itself, RGB in
[-1, 1] (latent statistics, if stored, apply as for any VAE). A refiner over it works in pixel
space, as the super-resolution stages of Imagen Video do, with the same code and directory format.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Literal, Union

import numpy as np
import torch
from torch import nn

from sorakit.config import ConfigError, from_dict, to_dict
from sorakit.models.io import register
from sorakit.models.vae_blocks import Decoder, DiagonalGaussian, Encoder, ResBlock, Stream, plan_levels

Frames = Union[np.ndarray, torch.Tensor]  # uint8 (T, H, W, 3)


INITIAL_LOGVAR = -6.0


@dataclass
class VAEConfig:
    """Architecture and inference settings; the defaults are the `base` preset (4×8×8, 16 channels)."""

    kind: Literal["spacetime", "spatial", "pixels"] = "spacetime"
    in_channels: int = 3
    latent_channels: int = 16
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one per level: max(log2(spatial_factor/patch_size), log2(t)) + 1
    patch_size: int = 1  # p×p pixel patches become channels before the first conv (cheap high resolutions)
    num_res_blocks: int = 2
    per_frame_levels: int = 0  # the first N (highest-resolution) levels use per-frame 3×3 kernels: ⅓ the cost
    spatial_factor: int = 8
    temporal_factor: int = 4
    # Per-channel latent statistics, measured after training; empty means "not calibrated" (identity).
    latent_mean: list[float] = field(default_factory=list)
    latent_std: list[float] = field(default_factory=list)
    # Inference memory bounds: they change peak memory, never the weights.
    chunk_frames: int = 4  # latent frames per temporal chunk
    tile_size: int = 256  # pixels; larger frames are processed in overlapping tiles
    tile_overlap: int = 64  # pixels shared by neighbouring tiles and blended

    def validate(self) -> None:
        if self.kind == "pixels":
            if (self.spatial_factor, self.temporal_factor, self.patch_size) != (1, 1, 1) or self.latent_channels != self.in_channels:
                raise ConfigError("a pixels VAE has spatial_factor, temporal_factor and patch_size 1 and latent_channels = in_channels")
            self._validate_common()
            return
        f, t = self.spatial_factor, self.temporal_factor
        if f < 1 or f & (f - 1):
            raise ConfigError(f"spatial_factor must be a power of two, got {f}")
        p = self.patch_size
        if p < 1 or p & (p - 1) or p > f:
            raise ConfigError(f"patch_size must be a power of two up to spatial_factor {f}, got {p}")
        if t not in (1, 2, 4, 8):
            raise ConfigError(f"temporal_factor must be 1, 2, 4 or 8, got {t}")
        downs = max(int(math.log2(f // p)), int(math.log2(t)))
        if len(self.channel_mult) != downs + 1:
            raise ConfigError(
                f"channel_mult needs one entry per level: max(log2(spatial_factor / patch_size), "
                f"log2(temporal_factor)) + 1 = {downs + 1}, got {len(self.channel_mult)}"
            )
        chans = [self.base_channels * m for m in self.channel_mult]
        pairs = list(zip(chans[1:], chans[:-1])) + [(chans[-1], self.latent_channels)]
        if any(a % b and b % a for a, b in pairs):
            raise ConfigError(
                "each level's channels and latent_channels must divide one another (the parameter-free "
                f"shortcuts average or repeat channels): {chans} → {self.latent_channels}"
            )
        if not 0 <= self.per_frame_levels <= len(self.channel_mult):
            raise ConfigError(f"per_frame_levels must be between 0 and {len(self.channel_mult)}")
        if self.kind == "spatial" and t != 1:
            raise ConfigError("a spatial (per-frame) VAE has temporal_factor 1")
        self._validate_common()

    def _validate_common(self) -> None:
        f = self.spatial_factor
        if self.latent_mean and len(self.latent_mean) != self.latent_channels:
            raise ConfigError(f"latent_mean has {len(self.latent_mean)} values for {self.latent_channels} channels")
        if len(self.latent_std) != len(self.latent_mean) or any(s <= 0 for s in self.latent_std):
            raise ConfigError("latent_std needs one positive value per latent_mean value")
        if self.chunk_frames < 1:
            raise ConfigError("chunk_frames must be at least 1")
        if self.tile_size % f or self.tile_overlap % f or not 0 <= self.tile_overlap < self.tile_size:
            raise ConfigError(
                f"tile_size and tile_overlap must be multiples of spatial_factor {f}, with overlap < size"
            )


# Named sizes. Each preset is a set of overrides of the VAEConfig defaults (which are `base`).
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: runs in milliseconds on a CPU.
    "tiny": dict(latent_channels=4, base_channels=8, channel_mult=(1, 1, 2), num_res_blocks=1,
                 spatial_factor=4, temporal_factor=2, chunk_frames=2, tile_size=64, tile_overlap=32),
    # The CPU recipe on toy-world clips (flat colours): 2× time, 4×4 space, 4 channels (8 reconstruct
    # 0.9 dB better, but a 2×4×4 DiT patch of them holds twice the toy DiT's width). 4×4 pixel
    # patches become channels first and time is mixed by the causal down/upsampling convolutions
    # only: every convolution runs at 1/4 resolution, which is what lets it train on 2 CPU cores.
    "toy": dict(latent_channels=4, base_channels=64, channel_mult=(1, 1), patch_size=4, num_res_blocks=0,
                per_frame_levels=2, spatial_factor=4, temporal_factor=2, chunk_frames=8,
                tile_size=256, tile_overlap=32),
    # Per-frame baseline with the same latent numbers per frame pair as `toy` (2 channels per frame).
    "toy-spatial": dict(kind="spatial", latent_channels=2, base_channels=64, channel_mult=(1,), patch_size=4,
                        num_res_blocks=0, spatial_factor=4, temporal_factor=1, chunk_frames=16,
                        tile_size=256, tile_overlap=32),
    # No compression: the identity "autoencoder" of pixel-space stages (a pixel-space refiner).
    "pixels": dict(kind="pixels", latent_channels=3, spatial_factor=1, temporal_factor=1, patch_size=1,
                   channel_mult=(1,), chunk_frames=16, tile_size=4096, tile_overlap=0),
    # GPUs: the 4×8×8, 16-channel shape of the open video VAEs.
    "base": dict(),
    # Per-frame baseline with base's latent size (4 channels per frame = 16 per 4 frames).
    "base-spatial": dict(kind="spatial", latent_channels=4, temporal_factor=1),
}


def vae_config(preset: str = "base", **overrides: Any) -> VAEConfig:
    """The config of a named preset, with typed overrides (`vae_config("toy", latent_channels=4)`)."""
    if preset not in VAE_PRESETS:
        raise ConfigError(f"unknown VAE preset {preset!r} (known: {', '.join(VAE_PRESETS)})")
    return from_dict(VAEConfig, {**VAE_PRESETS[preset], **overrides})


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp_weights(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1D blending weights: linear ramps on the sides that meet another tile, 1 elsewhere."""
    w = torch.ones(length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        n = min(overlap, length)
        if ramp_start:
            w[:n] = torch.minimum(w[:n], ramp[:n])
        if ramp_end:
            w[length - n :] = torch.minimum(w[length - n :], ramp[:n].flip(0))
    return w


@register("vae")
class VAE(nn.Module):
    config_class = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        if config.kind == "pixels":
            self.encoder, self.decoder = PixelEncoder(), PixelDecoder()
            return
        levels = plan_levels(
            config.base_channels,
            tuple(config.channel_mult),
            int(math.log2(config.spatial_factor // config.patch_size)),
            int(math.log2(config.temporal_factor)),
            len(config.channel_mult) if config.kind == "spatial" else config.per_frame_levels,
        )
        args = (config.latent_channels, levels, config.num_res_blocks, config.patch_size)
        self.encoder = Encoder(config.in_channels, *args)
        self.decoder = Decoder(config.in_channels, *args)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
                nn.init.zeros_(m.bias)
        # Start each residual branch near zero so a deep stack begins close to the identity.
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.conv2.conv.weight.data.mul_(0.1)
        # Start with a small posterior variance (std e^-3 ≈ 0.05): with logvar near 0 the decoder would
        # first see latents drowned in unit noise, and reconstruction would stall until the encoder
        # has learned to shrink it.
        logvar_bias = self.encoder.conv_out.conv.bias.data[self.config.latent_channels :]
        nn.init.constant_(logvar_bias, INITIAL_LOGVAR)

    # ----- sizes -----
    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a `num_frames × height × width` video."""
        if min(num_frames, height, width) < 1:
            raise ValueError(f"a video needs at least 1 frame of 1×1 pixels, got {num_frames}×{height}×{width}")
        t, f = self.temporal_factor, self.spatial_factor
        return (self.latent_channels, 1 + math.ceil((num_frames - 1) / t), math.ceil(height / f), math.ceil(width / f))

    def num_frames_for(self, latent_frames: int) -> int:
        """Frames decoded from `latent_frames` latent frames: 1 + (T' - 1)·t."""
        if latent_frames < 1:
            raise ValueError(f"need at least 1 latent frame, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_factor

    def _any_tensor(self) -> torch.Tensor:  # where and in what dtype it runs (the `pixels` kind has only a buffer)
        return next(itertools.chain(self.parameters(), self.buffers()))

    @property
    def device(self) -> torch.device:
        return self._any_tensor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._any_tensor().dtype

    # ----- batched forms (training) -----
    def _check_batch(self, x: torch.Tensor) -> None:
        b, c, t, h, w = x.shape
        tf, f = self.temporal_factor, self.spatial_factor
        if (t - 1) % tf or h % f or w % f:
            raise ValueError(
                f"batched encode needs 1 + k·{tf} frames and sizes divisible by {f}, got {t}×{h}×{w} "
                "(encode_video pads any size)"
            )

    def encode(self, x: torch.Tensor, stream: Stream | None = None) -> DiagonalGaussian:
        """x (B, 3, 1 + k·t, H, W) in [-1, 1], H and W multiples of f → posterior over raw latents."""
        if stream is None:
            self._check_batch(x)
        return DiagonalGaussian(self.encoder(x, stream or Stream()))

    def decode(self, z: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        """Raw latents (B, C, T', H', W') → (B, 3, 1 + (T'-1)·t, H'·f, W'·f) in about [-1, 1]."""
        return self.decoder(z, stream or Stream())

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mean
        return self.decode(z), posterior

    # ----- latent normalisation -----
    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.config.latent_mean:
            return None
        shape = (-1,) + (1,) * 3  # broadcast over (T', H', W')
        mean = torch.tensor(self.config.latent_mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(self.config.latent_std, device=z.device, dtype=z.dtype).view(shape)
        return mean, std

    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents (..., C, T', H', W') → the normalised latents other stages use."""
        stats = self._stats(z)
        return z if stats is None else (z - stats[0]) / stats[1]

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        stats = self._stats(z)
        return z if stats is None else z * stats[1] + stats[0]

    def with_latent_stats(self, mean: list[float], std: list[float]) -> "VAE":
        """Store measured per-channel statistics in the config (they are saved with the weights)."""
        self.config = from_dict(VAEConfig, to_dict(replace(self.config, latent_mean=list(mean), latent_std=list(std))))
        return self

    # ----- any size, any length, bounded memory -----
    def _tiles(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """Tiles (y, x, height, width) covering an `h × w` latent frame, in latent pixels."""
        f = self.spatial_factor
        tile, stride = self.config.tile_size // f, (self.config.tile_size - self.config.tile_overlap) // f
        return [
            (y, x, min(tile, h), min(tile, w))
            for y in _tile_starts(h, tile, stride)
            for x in _tile_starts(w, tile, stride)
        ]

    def _run_tiles(
        self,
        fn: Callable[[torch.Tensor, Stream], torch.Tensor],
        x: torch.Tensor,
        streams: list[Stream],
        tiles: list[tuple[int, int, int, int]],
        in_mul: int,
        out_mul: int,
        overlap: int,
        full_hw: tuple[int, int],
    ) -> torch.Tensor:
        """Run `fn` on each tile of x (tile coordinates × in_mul) and blend the outputs (× out_mul)."""
        if len(tiles) == 1:
            return fn(x, streams[0])
        acc = weight_sum = None
        for (y, x0, h, w), stream in zip(tiles, streams):
            out = fn(x[..., y * in_mul : (y + h) * in_mul, x0 * in_mul : (x0 + w) * in_mul], stream)
            if acc is None:
                acc = out.new_zeros(*out.shape[:3], full_hw[0] * out_mul, full_hw[1] * out_mul)
                weight_sum = out.new_zeros(full_hw[0] * out_mul, full_hw[1] * out_mul)
            wy = _ramp_weights(h * out_mul, overlap, y > 0, y + h < full_hw[0])
            wx = _ramp_weights(w * out_mul, overlap, x0 > 0, x0 + w < full_hw[1])
            weight = (wy[:, None] * wx[None, :]).to(out)
            region = (slice(y * out_mul, (y + h) * out_mul), slice(x0 * out_mul, (x0 + w) * out_mul))
            acc[..., region[0], region[1]] += out * weight
            weight_sum[region] += weight
        return acc / weight_sum

    def _frame_chunks(self, frames: Frames | Iterable[Frames]) -> Iterator[torch.Tensor]:
        """uint8 chunks (Tc, H, W, 3): frame 0 alone, then `t·chunk_frames` frames each; the last one
        is padded to a multiple of t by repeating the video's last frame."""
        size = self.temporal_factor * self.config.chunk_frames
        buf: list[torch.Tensor] = []
        want, shape = 1, None
        for frame in frames:  # a (T, H, W, 3) array iterates over its frames
            frame = torch.as_tensor(frame)
            if shape is None:
                shape = tuple(frame.shape)
                if frame.ndim != 3 or shape[-1] != 3 or min(shape) < 1:
                    raise ValueError(f"encode_video expects frames (T, H, W, 3), got a frame of shape {shape}")
            if frame.dtype != torch.uint8 or tuple(frame.shape) != shape:
                raise ValueError(f"encode_video expects uint8 frames of one size {shape}, got {frame.dtype} {tuple(frame.shape)}")
            buf.append(frame)
            if len(buf) == want:
                yield torch.stack(buf)
                buf, want = [], size
        if shape is None:
            raise ValueError("encode_video got no frames")
        if buf:
            pad = -len(buf) % self.temporal_factor
            yield torch.stack(buf + [buf[-1]] * pad)

    @torch.inference_mode()
    def encode_video(self, frames: Frames | Iterable[Frames]) -> torch.Tensor:
        """uint8 frames (T, H, W, 3), any size and length → normalised posterior mean (C, T', H', W').

        `frames` may also be an iterator of (H, W, 3) frames (e.g. `sorakit.media.iter_frames`): the
        video is then never held in memory whole.
        """
        if isinstance(frames, np.ndarray | torch.Tensor) and (frames.ndim != 4 or frames.shape[-1] != 3):
            raise ValueError(f"encode_video expects uint8 frames (T, H, W, 3), got shape {tuple(frames.shape)}")
        f = self.spatial_factor
        out: list[torch.Tensor] = []
        streams: list[Stream] = []
        for chunk in self._frame_chunks(frames):
            _, height, width, _ = chunk.shape
            _, _, h_lat, w_lat = self.latent_shape(1, height, width)
            tiles = self._tiles(h_lat, w_lat)
            streams = streams or [Stream() for _ in tiles]
            x = chunk.to(self.device).permute(3, 0, 1, 2)[None].to(self.dtype) / 127.5 - 1.0  # (1, 3, Tc, H, W)
            pad_h, pad_w = h_lat * f - height, w_lat * f - width
            if pad_h or pad_w:
                x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
            moments = self._run_tiles(
                lambda v, s: self.encoder(v, s), x, streams, tiles, f, 1, self.config.tile_overlap // f, (h_lat, w_lat)
            )
            out.append(self.normalize_latent(DiagonalGaussian(moments).mean[0].float()).cpu())  # (C, Tc', H', W')
        return torch.cat(out, dim=1)

    @torch.inference_mode()
    def decode_video(
        self,
        z: torch.Tensor,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> np.ndarray:
        """Normalised latent (C, T', H', W') → uint8 frames (T, H, W, 3) as a numpy array.

        Without sizes the full decoded extent is returned (`num_frames_for(T')` frames of `H'·f × W'·f`);
        give the original `num_frames`/`height`/`width` to crop the padding `encode_video` added.
        """
        z = torch.as_tensor(z)
        if z.ndim != 4 or z.shape[0] != self.latent_channels:
            raise ValueError(f"decode_video expects a latent ({self.latent_channels}, T', H', W'), got {tuple(z.shape)}")
        _, t_lat, h_lat, w_lat = z.shape
        f, tf = self.spatial_factor, self.temporal_factor
        full_t, full_h, full_w = self.num_frames_for(t_lat), h_lat * f, w_lat * f
        num_frames, height, width = num_frames or full_t, height or full_h, width or full_w
        if num_frames > full_t or height > full_h or width > full_w:
            raise ValueError(
                f"cannot crop a {full_t}×{full_h}×{full_w} decode to {num_frames}×{height}×{width}"
            )
        tiles = self._tiles(h_lat, w_lat)
        streams = [Stream() for _ in tiles]
        out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
        n = self.config.chunk_frames
        for lat0 in [0, *range(1, t_lat, n)]:
            first = 0 if lat0 == 0 else 1 + (lat0 - 1) * tf
            if first >= num_frames:
                break  # the rest is padding
            lat1 = 1 if lat0 == 0 else min(lat0 + n, t_lat)
            zc = self.denormalize_latent(z[:, lat0:lat1].to(self.device, self.dtype))[None]
            x = self._run_tiles(
                lambda v, s: self.decoder(v, s), zc, streams, tiles, 1, f, self.config.tile_overlap, (h_lat, w_lat)
            )  # (1, 3, Tc, H, W)
            x = ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            x = x[:, : num_frames - first, :height, :width].permute(1, 2, 3, 0).cpu().numpy()
            out[first : first + x.shape[0]] = x
        return out

    def reconstruct(self, frames: Frames) -> np.ndarray:
        """Encode and decode at the input's own size and length."""
        num_frames, height, width = tuple(frames.shape[:3])
        return self.decode_video(self.encode_video(frames), num_frames, height, width)


class PixelEncoder(nn.Module):
    """The `pixels` kind's encoder: the frames are the posterior mean, with (almost) no variance."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # follows .to(): the VAE's device and dtype

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return torch.cat([x, torch.full_like(x, -30.0)], dim=1)  # (B, 2·3, T, H, W) moments


class PixelDecoder(nn.Module):
    def forward(self, z: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:
        return z
