"""Cascaded spacetime refiner: a second-stage diffusion transformer that raises resolution and frame rate.

    refiner = Refiner(refiner_config("toy", in_channels=4, spatial_scale=2, temporal_scale=2))
    cond = upsample_latent(z_low, refiner.scales)                # (C, T'h, H'h, W'h) on the target grid
    pred = refiner(x, cond_tokens, t, aug, pos, seq_ids)         # (B, N, P), see `forward`

A refiner generates the latent of a video `s×` larger in space (`spatial_scale`) and/or `r×` denser in
time (`temporal_scale`) than a given low-resolution / low-frame-rate latent, in the latent space of
one VAE (so it decodes the low-res and refined videos alike, and refiners chain); with the weightless
`pixels` VAE that latent is the video itself (pixel space, as Imagen Video). In latent units a
low-res latent (C, T', H', W') becomes (C, 1 + (T' − 1)·r, s·H', s·W'): the decoded video of
1 + (T − 1)·r frames of s·H × s·W pixels, for a causal VAE whose first latent frame is frame 0.

Conditioning (why channel concatenation): the low-res latent is upsampled to the target latent grid
(`upsample_latent`: bilinear in space, linear in time with end frames aligned) and concatenated to
the noisy latent channel-wise, i.e. each token embeds its own noisy patch *and* the low-res content
at the same place. Giving the low-res video as extra tokens instead would add 1/(s²·r) more tokens
to every attention (and make the network find the correspondence by attention alone); the concat
costs one wider input projection and keeps the sequence length of the target video.

Noise augmentation (Ho et al. 2021, Imagen Video): during training the conditioning is itself
noised to a random level `aug` ∈ [0, aug_max] on the diffusion path, and the network is told that
level through a second timestep embedding added to the time conditioning. At sampling a small
level makes the refiner robust to the artefacts of the base model it has never seen in training.

The network reuses the DiT's parts (`sorakit.models.layers`): packed block-diagonal attention with
the same back ends, 3D axial RoPE (any size and length), adaLN-Zero `DiTBlock`s without
cross-attention: the refiner takes no text, since its content is fixed by the low-res video
(which also lets `sorakit refine` work on any existing video, which has no prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sorakit.config import ConfigError, from_dict
from sorakit.diffusion.config import DiffusionConfig
from sorakit.models.io import register
from sorakit.models.layers import (
    ATTN_BACKENDS,
    AxialRoPE3D,
    DiTBlock,
    FinalLayer,
    PackedConvHead,
    TimestepEmbedder,
    conv_head_problem,
    init_adaln_zero,
    packed_attention_mask,
)

Scales = tuple[int, int]  # (spatial s, temporal r)


@dataclass
class RefinerConfig:
    """Architecture, plus how it samples; the defaults are the `base` preset. `in_channels` is set
    from the VAE. The diffusion settings and the sampling defaults live here (not in the trainer's
    config) so that every loader of the directory (`load_pretrained`, a pipeline's refiner list)
    gets them with the weights; the network itself never reads them."""

    in_channels: int = 16  # latent channels C of the VAE the refiner works in
    spatial_scale: int = 2  # s: output height and width are s× the input's
    temporal_scale: int = 1  # r: output has 1 + (T − 1)·r frames (r× the frame rate)
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent elements per token, on the target grid
    dim: int = 512
    depth: int = 8
    heads: int = 8
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10000.0
    attn_backend: str = "auto"  # auto | dense | segments | flex (see sorakit.models.layers)
    # Local attention: (t, h, w) tokens per spacetime window, shifted by half a window every other
    # block (Swin) so information crosses window borders; cost grows linearly with the video instead
    # of quadratically. None: every token attends to its whole video.
    attn_window: tuple[int, int, int] | None = None
    grad_checkpointing: bool = False
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Residual refinement: the diffusion runs over z_hi − upsample_latent(z_lo) and the clean upsampled
    # input is added back, so "change nothing" is the zero output instead of a copy the network must
    # reproduce through its patch embedding, and the whole model goes into the detail the input lacks.
    residual: bool = False
    # A conv head after the transformer (`PackedConvHead`), on each video's own target grid: it sees
    # the transformer's prediction, the conditioning and the noisy input, and adds pixel-exact detail
    # a patch cannot hold (edges across patch borders). `head_width` channels (0: no head),
    # `head_depth` hidden convs, kernel (t, h, w); (1, 3, 3) is per frame, time is the transformer's.
    head_width: int = 0
    head_depth: int = 3
    head_kernel: tuple[int, int, int] = (1, 3, 3)
    # Sampling defaults: the conditioning's noise-augmentation level (0 trusts the low-res video
    # exactly; a little hides a base model's artefacts) and the number of sampler steps.
    aug_level: float = 0.1
    steps: int = 20

    def validate(self) -> None:
        if not 0.0 <= self.aug_level < 1.0:
            raise ConfigError(f"refiner aug_level must be in [0, 1), got {self.aug_level}")
        if self.steps < 1:
            raise ConfigError("refiner steps must be at least 1")
        if self.spatial_scale < 1 or self.temporal_scale < 1:
            raise ConfigError("refiner spatial_scale and temporal_scale must be at least 1")
        if self.spatial_scale == 1 and self.temporal_scale == 1:
            raise ConfigError("a refiner needs spatial_scale > 1 or temporal_scale > 1 (it would change nothing)")
        if self.dim % self.heads:
            raise ConfigError(f"refiner dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2 or self.dim // self.heads < 6:
            raise ConfigError(f"refiner head dimension {self.dim // self.heads} must be even and at least 6 for 3D RoPE")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ConfigError(f"refiner patch must be three positive sizes (pt, ph, pw), got {self.patch}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"unknown attn_backend {self.attn_backend!r} (known: {', '.join(ATTN_BACKENDS)})")
        if problem := conv_head_problem(self.head_width, self.head_depth, self.head_kernel):
            raise ConfigError(f"refiner {problem}")
        if self.attn_window is not None and (len(self.attn_window) != 3 or min(self.attn_window) < 1):
            raise ConfigError(f"refiner attn_window must be three positive token counts (t, h, w), got {self.attn_window}")

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.in_channels * pt * ph * pw


# Named sizes: overrides of the RefinerConfig defaults (which are `base`). A refiner sees many more
# tokens than the base model per video, so it is narrower and shallower (as Imagen Video's SSR/TSR).
REFINER_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward pass in milliseconds on a CPU.
    "tiny": dict(in_channels=4, dim=32, depth=2, heads=2),
    # The CPU recipe on toy-world latents (4×4×2 VAE, 4 channels). Local windows keep a refined
    # 320×320 clip affordable on a CPU; they cover a whole 64-pixel training crop in space.
    "toy": dict(in_channels=4, patch=(1, 2, 2), dim=128, depth=4, heads=4, attn_window=(4, 8, 8)),
    # GPUs, on the base VAE's 16-channel latents: 1024-token windows.
    "base": dict(attn_window=(4, 16, 16)),
}


def refiner_config(preset: str = "base", **overrides: Any) -> RefinerConfig:
    """The config of a named preset with typed overrides (`refiner_config("toy", temporal_scale=2)`)."""
    if preset not in REFINER_PRESETS:
        raise ConfigError(f"unknown refiner preset {preset!r} (known: {', '.join(REFINER_PRESETS)})")
    return from_dict(RefinerConfig, {**REFINER_PRESETS[preset], **overrides})


# --------------------------------------------------------------------------------------------
# Geometry: low-res latent ↔ target latent
# --------------------------------------------------------------------------------------------


def refined_shape(shape: tuple[int, ...], scales: Scales) -> tuple[int, ...]:
    """(…, T', H', W') of a low-res latent → the target latent's (…, 1 + (T' − 1)·r, s·H', s·W')."""
    s, r = scales
    *lead, t, h, w = shape
    return (*lead, 1 + (t - 1) * r, s * h, s * w)


def refined_video_size(num_frames: int, height: int, width: int, scales: Scales) -> tuple[int, int, int]:
    """Frames, height, width of the refined video of a `num_frames × height × width` video."""
    s, r = scales
    return 1 + (num_frames - 1) * r, s * height, s * width


def upsample_latent(z: torch.Tensor, scales: Scales) -> torch.Tensor:
    """(C, T', H', W') → (C, 1 + (T' − 1)·r, s·H', s·W'): the conditioning on the target grid.

    Space: bilinear with pixel centres aligned (half-pixel convention, like image resizing). Time:
    linear with the first and last frames aligned, so latent frame j of the input sits on target
    frame j·r and the new frames between are blends of their neighbours.
    """
    if z.dim() != 4:
        raise ValueError(f"upsample_latent expects (C, T', H', W'), got {tuple(z.shape)}")
    s, r = scales
    c, t, h, w = z.shape
    x = z.float()
    if s > 1:
        x = F.interpolate(x.permute(1, 0, 2, 3), size=(s * h, s * w), mode="bilinear", align_corners=False)
        x = x.permute(1, 0, 2, 3)  # (C, T', sH', sW')
    if r > 1 and t > 1:
        flat = x.reshape(c, t, -1).permute(0, 2, 1)  # (C, HW, T')
        flat = F.interpolate(flat, size=1 + (t - 1) * r, mode="linear", align_corners=True)
        x = flat.permute(0, 2, 1).reshape(c, -1, *x.shape[2:])
    return x.to(z.dtype)


# --------------------------------------------------------------------------------------------
# Local spacetime windows
# --------------------------------------------------------------------------------------------

_KEY_BITS = 15  # window coordinates < 32768 per axis, video slots < 2**17: keys fit in int64


def window_layout(
    pos: torch.Tensor, seq_ids: torch.Tensor, window: tuple[int, int, int], shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Regroup packed tokens by spacetime window: (perm (B, N), window ids (B, N)).

    `x.gather(1, perm)` puts each window's tokens next to each other (padding last), and the window
    ids then play the part of `seq_ids`: attention stays inside a window of one video, with any back
    end. `shift` moves the window grid by half a window (Swin's shifted windows).
    """
    size = torch.tensor(window, device=pos.device)
    cell = (pos + (size // 2 if shift else 0)) // size  # (B, N, 3) window coordinates
    key = seq_ids.clamp(min=0)
    for i in range(3):
        key = (key << _KEY_BITS) + cell[..., i]
    key = torch.where(seq_ids >= 0, key, torch.iinfo(torch.int64).max)  # padding sorts last
    sorted_key, perm = torch.sort(key, dim=1, stable=True)
    new = torch.ones_like(sorted_key, dtype=torch.bool)
    new[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    ids = new.long().cumsum(1) - 1
    ids = torch.where(seq_ids.gather(1, perm) >= 0, ids, -1)
    return perm, ids


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


@register("refiner")
class Refiner(nn.Module):
    config_class = RefinerConfig

    def __init__(self, config: RefinerConfig):
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_dim
        # One projection of [noisy patch, conditioning patch]: a Conv3d over the channel concat.
        self.x_embed = nn.Linear(2 * p, d)
        self.t_embed = TimestepEmbedder(d)
        self.aug_embed = TimestepEmbedder(d)  # the conditioning's noise-augmentation level
        self.rope = AxialRoPE3D(d // config.heads, theta=config.rope_theta)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.heads, config.mlp_ratio, config.qk_norm, cross=False) for _ in range(config.depth)
        )
        self.final = FinalLayer(d, p)
        self.head = None
        if config.head_width:
            c = config.in_channels  # input: [prediction, conditioning, noisy input] on the target grid
            self.head = PackedConvHead(3 * c, c, config.head_width, config.head_depth, tuple(config.head_kernel), self.patch)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_zero(self)

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.config.patch)

    @property
    def scales(self) -> Scales:
        return (self.config.spatial_scale, self.config.temporal_scale)

    def conditioning(self, t: torch.Tensor, aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The table of conditioning vectors (M, D), one per distinct (time, aug level), and each token's row."""
        keys = torch.stack([t.flatten().float(), aug.flatten().float()], dim=-1)  # (B·N, 2)
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (M, 2)
        cond = self.t_embed(uniq[:, 0]) + self.aug_embed(uniq[:, 1])  # (M, D)
        return cond, inverse.view(t.shape)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, P) noisy target patch tokens
        cond: torch.Tensor,  # (B, N, P) (noise-augmented) upsampled low-res patch tokens, same layout
        t: torch.Tensor,  # (B, N) each token's diffusion time in [0, 1]
        aug: torch.Tensor,  # (B, N) each token's conditioning augmentation level in [0, 1]
        pos: torch.Tensor,  # (B, N, 3) integer (t, h, w) patch coordinates on the target grid
        seq_ids: torch.Tensor,  # (B, N) the token's video slot in its row; -1 = padding
    ) -> torch.Tensor:
        h = self.x_embed(torch.cat([x, cond], dim=-1))  # (B, N, D)
        c, c_idx = self.conditioning(t, aug)
        layouts = [(perm, c_idx if perm is None else c_idx.gather(1, perm), mask, rope)
                   for perm, mask, rope in self.layouts(pos, seq_ids)]
        for i, block in enumerate(self.blocks):
            perm, c_idx_l, mask, rope = layouts[i % len(layouts)]
            if perm is not None:  # windows: regroup, attend, restore the order
                h = h.gather(1, perm[..., None].expand_as(h))
            if self.config.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, c_idx_l, mask, rope, use_reentrant=False)
            else:
                h = block(h, c, c_idx_l, mask, rope)
            if perm is not None:
                h = torch.empty_like(h).scatter_(1, perm[..., None].expand_as(h), h)
        out = self.final(h, c, c_idx)  # (B, N, P)
        if self.head is not None:
            out = out + self.head(torch.cat([out, cond, x], dim=-1), pos, seq_ids)
        return out

    def layouts(self, pos: torch.Tensor, seq_ids: torch.Tensor) -> list[tuple]:
        """(token order or None, attention mask, RoPE tables) for each kind of block: one kind with
        whole-video attention, or plain and shifted windows taking turns."""
        backend, window = self.config.attn_backend, self.config.attn_window
        if window is None:
            return [(None, packed_attention_mask(seq_ids, backend), self.rope(pos))]
        out = []
        for shift in (False, True):
            perm, ids = window_layout(pos, seq_ids, tuple(window), shift)
            out.append((perm, packed_attention_mask(ids, backend), self.rope(pos.gather(1, perm[..., None].expand_as(pos)))))
        return out


def build_refiner(preset: str = "base", **overrides: Any) -> Refiner:
    return Refiner(refiner_config(preset, **overrides))
