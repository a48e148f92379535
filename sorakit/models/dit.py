"""Diffusion Transformer over packed spacetime patches (patch n' pack).

    dit = DiT(dit_config("toy", in_channels=4, text_dim=128))      # or load_pretrained(dir, kind="dit")
    pred = dit(x, t, pos, seq_ids, ctx, ctx_ids, pooled, given)   # (B, N, P), see `forward`
    pred = dit(..., x0_prev=x0_hat)                                  # with self_condition: the last estimate
    pred, h = dit(..., hidden_at=2)                                  # and the tokens after block 2 (REPA)

The input is a packed batch (`sorakit.data.packing.pack`): latents of any shape (C, T', H', W')
cut into spacetime patches of (pt, ph, pw) latent elements, each patch flattened to
P = C·pt·ph·pw values, and the patches of several videos concatenated in a row. The network

* embeds each patch linearly (a Conv3d with kernel = stride = patch, written as a Linear on the
  flattened patch, since the patches of different videos no longer sit on one grid);
* encodes where a token is with 3D RoPE on its integer (t, h, w) patch coordinates (axial, or
  `rope="mixed"`: learned directions that mix time and space; `"mixed_frac"`: those directions on
  positions as fractions of the video), so any size and length works, including sizes never seen
  in training;
* runs `depth` DiT blocks: block-diagonal self-attention (a token sees only its own video),
  cross-attention to that video's text tokens (masked), MLP, each modulated by adaLN-Zero;
* conditions per token on the diffusion time and per video on the pooled text: the conditioning
  vectors are computed once per distinct (video, time) pair and gathered per token, so a video's
  clean "given" frames (time 0, plus a learned "given" embedding) sit beside its noisy frames;
* predicts P values per token in the diffusion parametrisation (v, eps or flow: `sorakit.diffusion`),
  which the network itself knows nothing about.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sorakit.config import ConfigError, from_dict
from sorakit.models.io import register
from sorakit.models.layers import (
    ATTN_BACKENDS,
    AxialRoPE3D,
    DiTBlock,
    FinalLayer,
    MixedRoPE3D,
    Mlp,
    PackedConvHead,
    TimestepEmbedder,
    conv_head_problem,
    cross_attention_mask,
    init_adaln_zero,
    kernel_problem,
    neighbour_index,
    packed_attention_mask,
)

ROPE_KINDS = ("axial", "mixed", "mixed_frac")


@dataclass
class DiTConfig:
    """Architecture; the defaults are the `base` preset. `in_channels` and `text_dim` are set from
    the VAE and text encoder a recipe uses."""

    in_channels: int = 16  # latent channels C
    patch: tuple[int, int, int] = (1, 2, 2)  # (pt, ph, pw) latent elements per token
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int = 512  # width of the text encoder's token states and pooled vector
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # axial | mixed (learned spacetime frequency directions, see MixedRoPE3D) | mixed_frac (the same,
    # the oblique half on positions as fractions of the video, so one direction is one relative motion)
    rope: str = "axial"
    attn_backend: str = "auto"  # auto | dense | segments | flex (see sorakit.models.layers)
    grad_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): the network also sees its own previous x0
    # estimate (zeros when there is none). Training then runs an extra no-grad pass for half the videos.
    self_condition: bool = False
    # NaViT's fractional positions: each token also gets an embedding of where it sits within its own
    # video, (i + 0.5) / n per axis, beside the relative RoPE. Relative positions alone make
    # frame-relative facts (an object stays inside the frame, a motion spans a fraction of the
    # frame) hard to learn; fractions keep any size and length valid. 0 frequencies = off.
    frac_pos_freqs: int = 0
    # Prompt-driven co-moving RoPE: each head's spatial positions move with a velocity read from the
    # pooled text (fractions of the frame per clip, zero at init), so "moving left" can turn a head
    # into one that matches a token to where the object was a frame earlier. Without it the toy DiT
    # ignored motion words entirely (docs/benchmarks.md, stop 19).
    comoving: bool = False
    # A depthwise (kt, kh, kw) convolution over each video's token grid before every MLP (`MixMlp`,
    # after SANA's Mix-FFN), so a token mixes its neighbours' features directly. (1, 1, 1) = off.
    mlp_kernel: tuple[int, int, int] = (1, 1, 1)
    # A conv head on each video's latent grid after the final layer (`PackedConvHead`), reading the
    # prediction, the noisy input and the time: a token's patch is decoded linearly from one vector,
    # so edges that cross patch borders come out as off-colour fringes at token corners (the toy
    # refiner gained 3.1 dB with such a head against 1.2 without). `head_width` channels (0: off),
    # `head_depth` hidden convs, kernel (t, h, w) in latent elements.
    head_width: int = 0
    head_depth: int = 2
    head_kernel: tuple[int, int, int] = (1, 3, 3)

    def validate(self) -> None:
        if self.dim % self.heads:
            raise ConfigError(f"dit dim {self.dim} is not divisible by heads {self.heads}")
        if (self.dim // self.heads) % 2 or self.dim // self.heads < 6:
            raise ConfigError(f"dit head dimension {self.dim // self.heads} must be even and at least 6 for 3D RoPE")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ConfigError(f"dit patch must be three positive sizes (pt, ph, pw), got {self.patch}")
        if problem := (kernel_problem("mlp_kernel", self.mlp_kernel)
                       or conv_head_problem(self.head_width, self.head_depth, self.head_kernel)):
            raise ConfigError(f"dit {problem}")
        if self.rope not in ROPE_KINDS:
            raise ConfigError(f"dit rope must be one of {', '.join(ROPE_KINDS)}, got {self.rope!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ConfigError(f"unknown attn_backend {self.attn_backend!r} (known: {', '.join(ATTN_BACKENDS)})")

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch
        return self.in_channels * pt * ph * pw


# Named sizes: overrides of the DiTConfig defaults (which are `base`).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: a forward pass in milliseconds on a CPU.
    "tiny": dict(in_channels=4, text_dim=32, dim=32, depth=2, heads=2),
    # The CPU recipe on toy-world latents (4×4×2 VAE, 4 channels, flat colours): 2×4×4 patches keep a
    # clip at ~400 tokens (at most 1700), and a patch's 128 values fit through the 128-wide network.
    "toy": dict(in_channels=4, text_dim=128, patch=(2, 4, 4), dim=128, depth=4, heads=4),
    # GPUs: DiT-B width with text cross-attention.
    "base": dict(),
    # DiT-XL width and depth.
    "large": dict(dim=1152, depth=28, heads=16, grad_checkpointing=True),
}


def dit_config(preset: str = "base", **overrides: Any) -> DiTConfig:
    """The config of a named preset with typed overrides (`dit_config("toy", in_channels=4)`)."""
    if preset not in DIT_PRESETS:
        raise ConfigError(f"unknown DiT preset {preset!r} (known: {', '.join(DIT_PRESETS)})")
    return from_dict(DiTConfig, {**DIT_PRESETS[preset], **overrides})


@register("dit")
class DiT(nn.Module):
    config_class = DiTConfig

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d, p = config.dim, config.patch_dim
        self.x_embed = nn.Linear(p, d)  # a Conv3d(C, D, kernel=stride=patch) on the flattened patch
        # Self-conditioning: Linear([x, x0_prev]) written as x_embed(x) + sc_embed(x0_prev).
        self.sc_embed = nn.Linear(p, d, bias=False) if config.self_condition else None
        self.frac_embed = nn.Linear(6 * config.frac_pos_freqs, d, bias=False) if config.frac_pos_freqs else None
        self.given_embed = nn.Parameter(torch.zeros(d))  # marks clean context tokens
        self.t_embed = TimestepEmbedder(d)
        self.text_norm = nn.LayerNorm(config.text_dim, elementwise_affine=False, eps=1e-6)
        self.y_embed = Mlp(config.text_dim, d, d)  # pooled text → the adaLN conditioning
        self.ctx_embed = Mlp(config.text_dim, d, d)  # text tokens → cross-attention keys/values
        self.velocity = nn.Linear(config.text_dim, 2 * config.heads) if config.comoving else None  # (h, w) per head
        if config.rope in ("mixed", "mixed_frac"):
            self.rope = MixedRoPE3D(d // config.heads, config.heads, config.rope_theta, fractional=config.rope == "mixed_frac")
        else:
            self.rope = AxialRoPE3D(d // config.heads, theta=config.rope_theta)
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.heads, config.mlp_ratio, config.qk_norm, cross=True, mlp_kernel=tuple(config.mlp_kernel))
            for _ in range(config.depth)
        )
        self.final = FinalLayer(d, p)
        self.head = None
        if config.head_width:  # input channels: [prediction, noisy input, time]
            c = config.in_channels
            self.head = PackedConvHead(2 * c + 1, c, config.head_width, config.head_depth, tuple(config.head_kernel), self.patch)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_adaln_zero(self)
        nn.init.normal_(self.given_embed, std=0.02)
        for extra in (self.sc_embed, self.frac_embed, self.velocity):  # start as the network without them
            if extra is not None:
                nn.init.zeros_(extra.weight)
                if extra.bias is not None:
                    nn.init.zeros_(extra.bias)

    @property
    def patch(self) -> tuple[int, int, int]:
        return tuple(self.config.patch)

    @property
    def device(self) -> torch.device:
        return self.x_embed.weight.device

    def conditioning(
        self, t: torch.Tensor, seq_ids: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The table of conditioning vectors (M, D), one per distinct (video, time), and each token's row (B, N)."""
        b, v = pooled.shape[:2]
        video = seq_ids.clamp(min=0) + v * torch.arange(b, device=seq_ids.device)[:, None]  # (B, N) global slot
        keys = torch.stack([video.flatten().float(), t.flatten().float()], dim=-1)  # exact: ids < 2**24
        uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (M, 2)
        pooled = self.text_norm(pooled).reshape(b * v, -1)
        cond = self.t_embed(uniq[:, 1]) + self.y_embed(pooled[uniq[:, 0].long()])  # (M, D)
        return cond, inverse.view(seq_ids.shape)

    def comoving_positions(
        self, pos: torch.Tensor, frac: torch.Tensor, size: torch.Tensor, seq_ids: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (B, H, N, 3) integer and fractional positions in frames that move with the velocity
        each head reads from its video's pooled text, so RoPE sees (Δh, Δw) − u·Δt, not (Δh, Δw)."""
        b, v = pooled.shape[:2]
        heads = self.config.heads
        u = self.velocity(self.text_norm(pooled)).view(b, v, heads, 2)  # (B, V, H, 2) frames per clip
        u = u.gather(1, seq_ids.clamp(min=0)[..., None, None].expand(-1, -1, heads, 2))  # (B, N, H, 2)
        moved = u * frac[..., None, :1]  # (B, N, H, 2): share of the frame travelled by this token's time
        still = moved.new_zeros(*moved.shape[:-1], 1)  # time itself does not move
        frac_h = frac[:, :, None] - torch.cat([still, moved], dim=-1)  # (B, N, H, 3)
        pos_h = pos.float()[:, :, None] - torch.cat([still, moved * size[:, :, None, 1:]], dim=-1)
        return pos_h.transpose(1, 2), frac_h.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,  # (B, N, P) noisy patch tokens
        t: torch.Tensor,  # (B, N) each token's time in [0, 1]; 0 = clean
        pos: torch.Tensor,  # (B, N, 3) integer (t, h, w) patch coordinates within the video
        seq_ids: torch.Tensor,  # (B, N) the token's video slot in its row; -1 = padding
        ctx: torch.Tensor,  # (B, L, Dt) text tokens of the row's videos
        ctx_ids: torch.Tensor,  # (B, L) the video slot each text token belongs to; -1 = padding
        pooled: torch.Tensor,  # (B, V, Dt) pooled text per video slot
        given: torch.Tensor | None = None,  # (B, N) bool: the token is clean context
        x0_prev: torch.Tensor | None = None,  # (B, N, P) previous x0 estimate (self-conditioning)
        hidden_at: int = 0,  # also return the tokens (B, N, D) after this many blocks (0: only the prediction)
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.x_embed(x)  # (B, N, D)
        if self.sc_embed is not None and x0_prev is not None:
            h = h + self.sc_embed(x0_prev.to(h.dtype))
        frac = size = None
        if self.frac_embed is not None or self.config.rope == "mixed_frac" or self.velocity is not None:
            origin, size = video_extents(pos, seq_ids, slots=pooled.shape[1])  # (B, N, 3) each
            frac = fractional_positions(pos, seq_ids, extents=(origin, size))  # (B, N, 3)
        if self.frac_embed is not None:
            h = h + self.frac_embed(fourier_features(frac, self.config.frac_pos_freqs).to(h.dtype))
        if given is not None:
            h = h + given[..., None].to(h.dtype) * self.given_embed
        cond, cond_idx = self.conditioning(t, seq_ids, pooled)
        ctx = self.ctx_embed(self.text_norm(ctx))  # (B, L, D)
        mask = packed_attention_mask(seq_ids, self.config.attn_backend)
        ctx_mask = cross_attention_mask(seq_ids, ctx_ids)
        if self.velocity is not None:
            rope = self.rope(*self.comoving_positions(pos, frac, size, seq_ids, pooled))
        else:
            rope = self.rope(pos, frac)
        kernel = tuple(self.config.mlp_kernel)
        nbr = neighbour_index(pos, seq_ids, kernel, slots=pooled.shape[1]) if math.prod(kernel) > 1 else None  # (K, B·N)
        hidden = None
        for i, block in enumerate(self.blocks):
            if self.config.grad_checkpointing and self.training:
                h = checkpoint(block, h, cond, cond_idx, mask, rope, ctx, ctx_mask, nbr, use_reentrant=False)
            else:
                h = block(h, cond, cond_idx, mask, rope, ctx, ctx_mask, nbr)
            if i + 1 == hidden_at:
                hidden = h
        out = self.final(h, cond, cond_idx)  # (B, N, P)
        if self.head is not None:
            time = t[..., None].to(out.dtype).expand(*t.shape, math.prod(self.patch))  # (B, N, pt·ph·pw): one channel
            out = out + self.head(torch.cat([out, x, time], dim=-1), pos, seq_ids)
        return (out, hidden) if hidden_at else out


def video_extents(pos: torch.Tensor, seq_ids: torch.Tensor, slots: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3) patch coordinates → each token's video origin i0 and size n per axis, (B, N, 3) each,
    taken from the video's own tokens (padding excluded). slots: video slots per row (default: read
    from seq_ids, which costs a device sync)."""
    b, n, _ = pos.shape
    slots = int(seq_ids.max()) + 1 if slots is None else slots
    slot = seq_ids.clamp(min=0)[..., None].expand(b, n, 3)  # (B, N, 3)
    pad = seq_ids[..., None] < 0  # padding must not stretch slot 0
    big = torch.iinfo(pos.dtype).max if not pos.is_floating_point() else float("inf")
    shape = (b, max(slots, 1), 3)
    lo = pos.new_full(shape, big).scatter_reduce(1, slot, pos.masked_fill(pad, big), "amin")  # (B, V, 3)
    hi = pos.new_full(shape, -big).scatter_reduce(1, slot, pos.masked_fill(pad, -big), "amax")
    lo, hi = lo.gather(1, slot), hi.gather(1, slot)
    return lo, hi - lo + 1


def fractional_positions(
    pos: torch.Tensor,
    seq_ids: torch.Tensor,
    slots: int | None = None,
    extents: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, N, 3) patch coordinates → (B, N, 3) each token's fractional position (i − i0 + 0.5) / n
    within its own video, per axis: in (0, 1) wherever the video is placed. extents: `video_extents`'
    result, when already computed."""
    origin, size = extents if extents is not None else video_extents(pos, seq_ids, slots)
    return ((pos - origin).float() + 0.5) / size.float()  # (B, N, 3)


def fourier_features(frac: torch.Tensor, freqs: int) -> torch.Tensor:
    """(B, N, 3) fractions → (B, N, 6·freqs) sin/cos of π·k·frac, k = 1..freqs."""
    angles = math.pi * frac[..., None] * torch.arange(1, freqs + 1, device=frac.device)  # (B, N, 3, F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(2)


def fractional_features(pos: torch.Tensor, seq_ids: torch.Tensor, freqs: int, slots: int | None = None) -> torch.Tensor:
    """(B, N, 3) patch coordinates → (B, N, 6·freqs) Fourier features of each token's fractional position."""
    return fourier_features(fractional_positions(pos, seq_ids, slots), freqs)


def build_dit(preset: str = "base", **overrides: Any) -> DiT:
    return DiT(dit_config(preset, **overrides))
