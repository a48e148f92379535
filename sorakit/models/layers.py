"""Transformer parts for packed spacetime tokens, shared by the DiT and the refiners.

A *packed* batch holds `B` rows of `N` tokens; each row is the concatenation of several videos'
tokens (plus padding), told apart by `seq_ids` (B, N): the video's slot in its row, -1 on padding.
Attention never crosses videos:

* `packed_attention_mask(seq_ids, backend)` builds the mask once per forward pass, and
  `attention(q, k, v, mask)` runs it with one of three back ends:
  - ``dense``: `scaled_dot_product_attention` with a (B, 1, N, N) boolean block-diagonal mask. Works
    everywhere with gradients; costs the square of the row.
  - ``segments``: one `video_attention` call per video (videos are contiguous in a row). Costs the
    sum of per-video squares, with gradients, on any device; a Python loop per video.
  - ``flex``: `flex_attention` with a `BlockMask` (compiled), which skips the blocks the mask zeroes:
    the GPU path. PyTorch runs flex_attention's backward only on GPUs.
  ``auto`` picks ``flex`` on CUDA and ``segments`` elsewhere (see docs/benchmarks.md).
* `AxialRoPE3D` rotates query/key channels by the token's (t, h, w) position, so attention depends
  on relative positions only and any size or length works, including ones never trained on;
  `MixedRoPE3D` learns each pair's frequency direction in spacetime (moving objects).
* `DiTBlock` is self-attention + masked cross-attention to the video's own text tokens + MLP, with
  adaLN-Zero modulation from a small table of conditioning vectors (one per distinct (video, time)
  pair) gathered per token, so clean "given" tokens (time 0) sit beside noisy ones in one video.
  Its MLP can be a `MixMlp`, which first convolves each video's tokens on their own grid (found
  by `neighbour_index`, so packing, padding and dropped tokens need no canvas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

AttnBackend = Literal["auto", "dense", "segments", "flex"]
ATTN_BACKENDS: tuple[str, ...] = ("auto", "dense", "segments", "flex")
# Above this many tokens a video's plain bf16 product is no faster than the flash kernel on a CPU
# (bench/cpu_precision.py), and its (N, N) score matrices only cost memory.
CPU_BF16_MATH_MAX_TOKENS = 1024


# --------------------------------------------------------------------------------------------
# Attention back ends over packed sequences
# --------------------------------------------------------------------------------------------


@dataclass
class PackedMask:
    """The self-attention mask of one packed batch in the form its back end wants."""

    backend: str
    dense: torch.Tensor | None = None  # (B, 1, N, N) bool, True = may attend
    segments: list[list[tuple[int, int, bool]]] | None = None  # per row: (start, end, is_video)
    block_mask: Any = None  # torch.nn.attention.flex_attention.BlockMask


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r} (known: {', '.join(ATTN_BACKENDS)})")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "segments"
    return backend


def _row_segments(ids: list[int]) -> list[tuple[int, int, bool]]:
    """Run-length encode one row of seq ids into (start, end, is_video) pieces."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            out.append((start, i, ids[start] >= 0))
            start = i
    return out


def packed_attention_mask(seq_ids: torch.Tensor, backend: str = "auto") -> PackedMask:
    """Block-diagonal self-attention mask for `seq_ids` (B, N); padding (-1) attends only to padding."""
    backend = resolve_backend(backend, seq_ids.device)
    if backend == "dense":
        return PackedMask(backend, dense=(seq_ids[:, :, None] == seq_ids[:, None, :])[:, None])
    if backend == "segments":
        return PackedMask(backend, segments=[_row_segments(r) for r in seq_ids.tolist()])
    from torch.nn.attention.flex_attention import create_block_mask

    def same_video(b, h, q_idx, kv_idx):
        return seq_ids[b, q_idx] == seq_ids[b, kv_idx]

    b, n = seq_ids.shape
    return PackedMask(backend, block_mask=create_block_mask(same_video, b, None, n, n, device=seq_ids.device))


_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, compiled: bool | None = None) -> torch.Tensor:
    """flex_attention; compiled (the default on CUDA) it skips the blocks the mask zeroes, eager it
    materialises the whole score matrix (fine for checking results on a CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if compiled is None:
        compiled = q.device.type == "cuda"
    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention within one video: `scaled_dot_product_attention`, except for short bf16
    videos on a CPU. PyTorch's CPU flash kernel runs bf16 slower than float32 at small head sizes,
    while bf16 matmuls run several times faster than float32 ones on CPUs with AVX512-BF16 or AMX
    (bench/cpu_precision.py), so those take the plain product."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= CPU_BF16_MATH_MAX_TOKENS:
        return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v  # (B, H, N, Dh)
    return F.scaled_dot_product_attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: PackedMask) -> torch.Tensor:
    """Self-attention of packed rows: q, k, v (B, H, N, Dh) → (B, H, N, Dh); never crosses videos."""
    if mask.backend == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)
    if mask.backend == "flex":
        if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError("flex_attention has no backward pass on CPU; use attn_backend 'segments' or 'dense'")
        return flex(q, k, v, mask.block_mask)
    rows = []
    for b, pieces in enumerate(mask.segments):
        outs = []
        for s, e, is_video in pieces:
            if is_video:
                outs.append(video_attention(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e]))
            else:  # padding: its output is never read, zeros keep it finite
                outs.append(q.new_zeros(1, q.shape[1], e - s, v.shape[-1]))
        rows.append(torch.cat(outs, dim=2))
    return torch.cat(rows, dim=0)


def cross_attention_mask(seq_ids: torch.Tensor, ctx_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, N, L) mask letting each token see only its own video's text tokens, and the (B, 1, N, 1)
    rows that see none (padding, or a video without text tokens) whose output must be zeroed."""
    mask = (seq_ids[:, :, None] == ctx_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)  # (B, N, L)
    empty = ~mask.any(-1, keepdim=True)
    # An all-False row makes softmax NaN; let it attend everywhere, then zero its output.
    return (mask | empty)[:, None], empty[:, None]


# --------------------------------------------------------------------------------------------
# 3D axial rotary position embedding
# --------------------------------------------------------------------------------------------


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a head's channels over (t, h, w): 3/8 of the rotation pairs to each spatial axis."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    pairs = head_dim // 2
    hw = max(1, pairs * 3 // 8)
    t = pairs - 2 * hw
    if t < 1:
        raise ValueError(f"head dimension {head_dim} is too small for 3D RoPE (needs at least 6)")
    return (2 * t, 2 * hw, 2 * hw)


# Fractional RoPE coordinates run over [0, FRACTION_SPAN), so that their learned frequencies are of
# order one, like the integer ones, and Adam moves both at a similar relative rate.
FRACTION_SPAN = 16.0


class AxialRoPE3D(nn.Module):
    """cos/sin tables from integer (t, h, w) token positions; each axis rotates its own channel pairs."""

    def __init__(self, head_dim: int, theta: float = 10000.0, axes: tuple[int, int, int] | None = None):
        super().__init__()
        axes = tuple(axes) if axes else rope_axes(head_dim)
        if sum(axes) != head_dim or any(a % 2 for a in axes):
            raise ValueError(f"RoPE axes {axes} must be even and sum to the head dimension {head_dim}")
        self.axes = axes
        for i, d in enumerate(axes):
            freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
            self.register_buffer(f"freqs{i}", freqs.float(), persistent=False)

    def forward(self, pos: torch.Tensor, frac: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, N, 3), or (B, H, N, 3) per head → cos, sin (B, 1 or H, N, Dh/2). frac is unused
        (one signature for every RoPE)."""
        angles = torch.cat(
            [pos[..., i : i + 1].float() * getattr(self, f"freqs{i}") for i in range(3)], dim=-1
        )  # (B, [H,] N, Dh/2)
        if pos.dim() == 3:
            angles = angles[:, None]
        return angles.cos(), angles.sin()


class MixedRoPE3D(nn.Module):
    """RoPE with learnable spacetime frequency vectors (RoPE-Mixed, Heo et al. 2024, in 3D).

    Each head's channel pair j rotates by the angle f_j · (t, h, w), f_j a learned 3-vector, where
    axial RoPE fixes f_j to one axis. An oblique f_j (time and space mixed) has constant phase
    along a line Δw = v·Δt: a head can then match a token to where a moving object was a frame
    earlier, a relation axial RoPE can express only as a sum of separate time and space terms.
    Half the pairs start axial (as `AxialRoPE3D`), half at the same frequency in a random direction.

    fractional: the oblique half turns on the token's fractional position within its video
    ((i - i0 + 0.5) / n per axis, times `FRACTION_SPAN`) instead of its integer one, starting at
    half a turn to eight across the video. A motion that crosses a fixed share of the frame over
    the clip, whatever the clip's size and length, is then one direction in these coordinates,
    where in integer ones its slope changes with both (under 0.1 to 3 tokens per temporal token
    across the toy world). The axial half keeps integer positions for the local detail.
    """

    def __init__(self, head_dim: int, heads: int, theta: float = 10000.0, seed: int = 0, fractional: bool = False):
        super().__init__()
        axial = AxialRoPE3D(head_dim, theta)
        self.fractional = fractional
        freqs = torch.zeros(head_dim // 2, 6 if fractional else 3)
        start = 0
        for i in range(3):
            f = getattr(axial, f"freqs{i}")
            freqs[start : start + len(f), i] = f
            start += len(f)
        freqs = freqs.repeat(heads, 1, 1)  # (H, Dh/2, 3 or 6)
        g = torch.Generator().manual_seed(seed)
        direction = torch.randn(heads, head_dim // 2, 3, generator=g)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        magnitude = freqs[..., :3].norm(dim=-1, keepdim=True)  # (H, Dh/2, 1)
        if fractional:
            # From half a turn to eight across the video (the span of the fractional position
            # features): theta's low frequencies would barely turn over a fraction.
            turns = torch.logspace(math.log10(0.5), math.log10(8.0), head_dim // 4)
            magnitude[:, 1::2, 0] = math.pi * turns / FRACTION_SPAN
        freqs[:, 1::2] = 0.0
        freqs[:, 1::2, -3:] = (magnitude * direction)[:, 1::2]
        self.freqs = nn.Parameter(freqs)

    def forward(self, pos: torch.Tensor, frac: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (B, N, 3) or (B, H, N, 3) per head, frac the same shape of fractional positions (needed
        when fractional) → cos, sin (B, H, N, Dh/2)."""
        coords = pos.float()
        if self.fractional:
            if frac is None:
                raise ValueError("fractional RoPE needs each token's fractional position")
            coords = torch.cat([coords, frac.float() * FRACTION_SPAN], dim=-1)  # (B, [H,] N, 6)
        if coords.dim() == 3:  # one position per token, shared by the heads
            coords = coords[:, None].expand(-1, self.freqs.shape[0], -1, -1)
        angles = torch.einsum("bhnc,hpc->bhnp", coords, self.freqs.float())  # (B, H, N, Dh/2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x (B, H, N, Dh) by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # QK-norm keeps attention logits bounded, which is what lets bf16 training stay stable.
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: PackedMask, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, Dh)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        # Under autocast the norms may return float32 while v is bf16; attention kernels need one dtype.
        out = attention(q.to(v.dtype), k.to(v.dtype), v, mask)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from video tokens, keys/values from text tokens, restricted to the token's own video."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q_norm(self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2))  # (B, H, N, Dh)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k = self.k_norm(k)  # (B, H, L, Dh)
        allowed, empty = mask
        out = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, attn_mask=allowed).masked_fill(empty, 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def neighbour_index(
    pos: torch.Tensor, seq_ids: torch.Tensor, kernel: tuple[int, int, int], slots: int | None = None
) -> torch.Tensor:
    """(B, N, 3) patch coordinates → (K, B·N): for each of the kernel's K offsets (t, h, w order) and
    each token, the flat index of the token at that offset in the same video, or B·N where that video
    has no token there (its border, a dropped token) and for padding tokens.

    Packed tokens sit on no common grid, so the neighbours are found by key: every token's
    (row, video, t, h, w) is one integer, the keys are sorted once, and each offset is a binary search.
    slots: video slots per row (default: read from seq_ids, which costs a device sync).
    """
    b, n, _ = pos.shape
    radius = torch.tensor([k // 2 for k in kernel], device=pos.device)
    p = pos.long().reshape(b * n, 3)
    p = p - p.amin(dim=0) + radius  # ≥ radius, so no offset leaves its video's key range
    size = p.amax(dim=0) + radius + 1  # (3,)
    slots = int(seq_ids.max()) + 1 if slots is None else slots
    video = (torch.arange(b, device=pos.device)[:, None] * (slots + 1) + seq_ids + 1).reshape(-1)
    key = ((video * size[0] + p[:, 0]) * size[1] + p[:, 1]) * size[2] + p[:, 2]  # (B·N,)
    sorted_key, order = key.sort()
    axes = [torch.arange(k, device=pos.device) - k // 2 for k in kernel]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (K, 3)
    delta = (offsets[:, 0] * size[1] + offsets[:, 1]) * size[2] + offsets[:, 2]  # (K,)
    query = key[None] + delta[:, None]  # (K, B·N)
    at = torch.searchsorted(sorted_key, query).clamp(max=b * n - 1)
    hit = (sorted_key[at] == query) & (seq_ids.reshape(1, -1) >= 0)
    return torch.where(hit, order[at], b * n)


def _depthwise(x: torch.Tensor, nbr: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(M, C) token features → (M, C): Σ_k taps[k] · x[nbr[k]] + bias, a missing neighbour counting as 0."""
    x = torch.cat([x, x.new_zeros(1, x.shape[-1])])  # row M: the zero a missing neighbour reads
    out = bias.expand(nbr.shape[1], -1)
    for k in range(nbr.shape[0]):
        out = out + x[nbr[k]] * taps[k]
    return out


class MixMlp(Mlp):
    """An MLP whose input first passes a depthwise convolution over each video's own token grid: with
    the first linear that makes a depthwise-separable conv (MobileNet's factorisation), so a token
    mixes its neighbours' features directly instead of finding them through attention. SANA's Mix-FFN
    convolves the 4× wider hidden layer instead; on the input it costs a quarter. The centre tap
    starts at 1 and the others at 0, so at init it is the plain MLP. Neighbours: `neighbour_index`."""

    def __init__(self, dim: int, hidden: int, kernel: tuple[int, int, int]):
        super().__init__(dim, hidden)
        k = math.prod(kernel)
        self.taps = nn.Parameter(torch.zeros(k, dim))
        self.taps.data[k // 2] = 1.0
        self.tap_bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:  # (B, N, D), (K, B·N) `neighbour_index`
        x = _depthwise(x.reshape(-1, x.shape[-1]), nbr, self.taps, self.tap_bias).view_as(x)
        return super().forward(x)


class TimestepEmbedder(nn.Module):
    """Continuous time t ∈ [0, 1] → sinusoidal features → MLP (DiT's embedder, on 1000·t)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (M, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention and MLP, with an ungated cross-attention between them (PixArt-style)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, cross: bool = True,
                 mlp_kernel: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, qk_norm)
        self.cross = cross
        if cross:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = MixMlp(dim, hidden, mlp_kernel) if math.prod(mlp_kernel) > 1 else Mlp(dim, hidden)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,  # (B, N, D)
        cond: torch.Tensor,  # (M, D) one row per distinct (video, time)
        cond_idx: torch.Tensor,  # (B, N) row of `cond` for each token
        mask: PackedMask,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: torch.Tensor | None = None,  # (B, L, D)
        ctx_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
        nbr: torch.Tensor | None = None,  # (K, B·N) `neighbour_index`, for a MixMlp
    ) -> torch.Tensor:
        mod = self.adaLN(cond)[cond_idx]  # (B, N, 6D): computed per condition, gathered per token
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), mask, rope)
        if self.cross:
            x = x + self.cross_attn(self.norm_cross(x), ctx, ctx_mask)
        y = modulate(self.norm2(x), shift2, scale2)
        x = x + gate2 * (self.mlp(y, nbr) if isinstance(self.mlp, MixMlp) else self.mlp(y))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(cond)[cond_idx].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_adaln_zero(module: nn.Module) -> None:
    """DiT's explicit init: Xavier linears, zero biases, and zero for every modulation and output
    projection that makes a residual branch start as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN[-1].weight)
            nn.init.zeros_(m.adaLN[-1].bias)
        if isinstance(m, DiTBlock) and m.cross:
            nn.init.zeros_(m.cross_attn.proj.weight)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
        if isinstance(m, TimestepEmbedder):
            for lin in (m.mlp[0], m.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)


# --------------------------------------------------------------------------------------------
# Convolutions on each packed video's own grid
# --------------------------------------------------------------------------------------------


def kernel_problem(name: str, kernel: tuple[int, ...]) -> str | None:
    """Why a (t, h, w) convolution kernel setting `name` is invalid (None when it is valid): a
    centred "same" convolution needs three odd positive sizes."""
    if len(kernel) != 3 or any(k < 1 or k % 2 == 0 for k in kernel):
        return f"{name} must be three odd positive sizes (t, h, w), got {tuple(kernel)}"
    return None


def conv_head_problem(width: int, depth: int, kernel: tuple[int, ...]) -> str | None:
    """Why a `PackedConvHead` setting is invalid (None when it is valid); width 0 means no head."""
    if width < 0 or (width and depth < 1):
        return "head_width must be ≥ 0 and head_depth ≥ 1 with a head"
    return kernel_problem("head_kernel", kernel)


class PackedConvHead(nn.Module):
    """A small conv stack on every packed video's own (C, T, H, W) grid, after a patch transformer.

    A transformer decodes each token's patch linearly from one vector, so it cannot draw an edge
    across a patch border, nor anything finer than the patch's linear basis allows; a super-
    resolution model's whole job is such edges (docs/benchmarks.md: the toy 2× refiner with 8×8-pixel
    tokens gains 1.2 dB over bicubic without this head, 3.1 dB with it). This head scatters each video's
    tokens onto its own grid, unpatchifies them, convolves, and gathers the result back into the
    packed layout; videos of one size share a batch of grids. Each video sees plain zero padding at
    its border, never another video (positions a video lacks, dropped tokens, are zeroed after
    every conv).
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int,
                 kernel: tuple[int, int, int], patch: tuple[int, int, int]):
        super().__init__()
        self.patch = tuple(patch)
        pad = tuple(k // 2 for k in kernel)
        chans = [in_channels] + [width] * depth
        self.convs = nn.ModuleList(nn.Conv3d(a, b, kernel, padding=pad) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv3d(chans[-1], out_channels, kernel, padding=pad)
        nn.init.zeros_(self.out.weight)  # starts as "add nothing" to the transformer's prediction
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
        """(B, N, C_in·pt·ph·pw) tokens → (B, N, C_out·pt·ph·pw); padding tokens give zeros."""
        b, n, _ = tokens.shape
        valid = seq_ids >= 0  # (B, N)
        slot = torch.arange(b, device=tokens.device)[:, None] * (int(seq_ids.max()) + 1) + seq_ids
        _, video = torch.unique(slot[valid], return_inverse=True)  # (M,) each real token's video 0..V-1
        p = pos[valid].long()  # (M, 3)
        src = tokens[valid]
        nv = int(video.max()) + 1
        per_video = video[:, None].expand(-1, 3)
        # Each video's grid starts at its own first position (a sliding window may not start at 0).
        p = p - p.new_full((nv, 3), torch.iinfo(p.dtype).max).scatter_reduce(0, per_video, p, "amin")[video]
        extent = p.new_zeros(nv, 3).scatter_reduce(0, per_video, p + 1, "amax")
        # Videos of one extent share a canvas of exactly that size: a batch of mixed sizes wastes no
        # convolution on padding, and a row of equal training windows is one call.
        shapes, group = torch.unique(extent, dim=0, return_inverse=True)
        res = src.new_zeros(len(src), self.out.out_channels * math.prod(self.patch))
        for g, shape in enumerate(shapes.tolist()):
            members = (group == g).nonzero().squeeze(1)
            local = torch.full((nv,), -1, dtype=torch.long, device=tokens.device)
            local[members] = torch.arange(len(members), device=tokens.device)
            sel = local[video] >= 0
            # Under autocast the convolutions return bf16 while the tokens (and `res`) are float32.
            res[sel] = self._convolve(src[sel], local[video[sel]], p[sel], len(members), shape).to(res.dtype)
        out = tokens.new_zeros(b, n, res.shape[-1])
        out[valid] = res
        return out

    def _convolve(self, src: torch.Tensor, video: torch.Tensor, p: torch.Tensor, nv: int, shape: list[int]) -> torch.Tensor:
        """(M, P_in) tokens of `nv` videos of one token extent `shape` → (M, P_out)."""
        pt, ph, pw = self.patch
        gt, gh, gw = shape
        grid = src.new_zeros(nv, gt, gh, gw, src.shape[-1])
        grid[video, p[:, 0], p[:, 1], p[:, 2]] = src
        present = src.new_zeros(nv, gt, gh, gw, 1)  # a video may lack tokens (dropped ones)
        present[video, p[:, 0], p[:, 1], p[:, 2]] = 1.0
        x = self._to_pixels(grid, src.shape[-1] // (pt * ph * pw))  # (V, C_in, T, H, W)
        keep = self._to_pixels(present.expand(-1, -1, -1, -1, pt * ph * pw), 1)  # (V, 1, T, H, W)
        x = x * keep
        for conv in self.convs:
            x = F.silu(conv(x)) * keep
        x = self.out(x)  # (V, C_out, T, H, W)
        x = x.reshape(nv, -1, gt, pt, gh, ph, gw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)  # (V, gt, gh, gw, C, pt, ph, pw)
        return x.reshape(nv, gt, gh, gw, -1)[video, p[:, 0], p[:, 1], p[:, 2]]

    def _to_pixels(self, grid: torch.Tensor, channels: int) -> torch.Tensor:
        """(V, gt, gh, gw, C·pt·ph·pw) token grid → (V, C, gt·pt, gh·ph, gw·pw), patchify's layout."""
        v, gt, gh, gw, _ = grid.shape
        pt, ph, pw = self.patch
        x = grid.reshape(v, gt, gh, gw, channels, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(v, channels, gt * pt, gh * ph, gw * pw)
