"""Building blocks of the spacetime VAE: causal 3D convolutions that can run chunk by chunk.

Every temporal convolution is causal (it sees only the current and earlier frames), and every
normalisation acts on channels at one pixel of one frame. Together these make the network *streamable*:
running a video in temporal chunks, with each convolution keeping the last frames it saw in a
`Stream`, gives the same result as one pass over the whole video, in memory that does not grow with
the video's length. There is deliberately no attention layer and no norm over space or time, since
either would couple distant frames or tiles and break both chunking and tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


_HAS_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.aten, "mkldnn_convolution")


class Stream:
    """Causal state carried between the temporal chunks of one video (one per spatial tile).

    `cache[conv]` holds the input frames a causal convolution still needs for its next outputs;
    `started` holds the temporal upsamplers that have already emitted the video's first frame.
    """

    def __init__(self) -> None:
        self.cache: dict[nn.Module, torch.Tensor] = {}
        self.started: set[nn.Module] = set()


class CausalConv3d(nn.Module):
    """A 3D convolution, causal in time, spatially 'same'-padded, that can be fed chunk by chunk.

    The time axis is treated as the stream `[zeros × (kt-1), frame 0, frame 1, ...]` with windows
    starting every `st` frames, so output j sees input frames `st·j - kt + 1 ... st·j`. With kt=3, st=2,
    output 0 sees frame 0 alone and output j ≥ 1 sees frames 2j-2..2j: the first frame is compressed on
    its own and every later pair of frames becomes one output frame.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        self.kt, self.st = kernel[0], stride[0]
        self.spatial_stride = stride[1]
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=(0, kernel[1] // 2, kernel[2] // 2))

    def _empty(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        s = self.spatial_stride
        return x.new_zeros(b, self.conv.out_channels, 0, (h - 1) // s + 1, (w - 1) // s + 1)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.float32 and _HAS_MKLDNN:
            # PyTorch's heuristic sends batch-1 3D convolutions with small N·C·T·H (chunked
            # inference) to its reference kernel, ~10× slower than oneDNN; ask for oneDNN directly.
            c = self.conv
            return torch.ops.aten.mkldnn_convolution(x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups)
        return self.conv(x)

    def advance(self, x: torch.Tensor, stream: Stream | None) -> tuple[torch.Tensor, int]:
        """Append x to the frames cached from earlier chunks; return them and the number of complete
        windows n. Output j is computed from `buf[:, :, st·j : st·j + kt]`, whose last frame is the
        newest input frame it sees."""
        if self.kt == 1 and self.st == 1:
            return x, x.shape[2]
        assert stream is not None, "a temporal convolution needs a Stream"
        prev = stream.cache.get(self)
        if prev is None:
            b, c, _, h, w = x.shape
            prev = x.new_zeros(b, c, self.kt - 1, h, w)
        buf = torch.cat([prev, x], dim=2)  # (B, C, kt-1+T, H, W)
        length = buf.shape[2]
        n = (length - self.kt) // self.st + 1 if length >= self.kt else 0
        # Keep only what the next window needs, copied so the chunk itself can be freed.
        stream.cache[self] = buf[:, :, n * self.st :].clone()
        return buf, n

    def newest_frames(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        """The newest input frame of each of the n windows of `buf`: (B, C, n, H, W)."""
        return buf[:, :, self.kt - 1 : (n - 1) * self.st + self.kt : self.st]

    def windows(self, buf: torch.Tensor, n: int) -> torch.Tensor:
        return self._conv(buf[:, :, : (n - 1) * self.st + self.kt]) if n else self._empty(buf)

    def forward(self, x: torch.Tensor, stream: Stream | None = None) -> torch.Tensor:  # (B, C, T, H, W)
        buf, n = self.advance(x, stream)
        return self.windows(buf, n)


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Parameter-free channel change for shortcuts: average groups of channels, or repeat them."""
    c = x.shape[1]
    if c == channels:
        return x
    if c % channels == 0:
        return x.unflatten(1, (channels, c // channels)).mean(dim=2)
    if channels % c == 0:
        return x.repeat_interleave(channels // c, dim=1)
    raise ValueError(f"cannot match {c} channels to {channels} without parameters")


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each pixel and frame: local, so tiles and chunks stay independent."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        # mean/rsqrt rather than F.normalize: its backward over dim 1 is ~4× slower on CPU.
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.gamma


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kt: int) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, (kt, 3, 3))
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, (kt, 3, 3))
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), stream)
        h = self.conv2(F.silu(self.norm2(h)), stream)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve height and width (when `space`) and the frame count (when `time`; first frame kept alone).

    Plus a parameter-free shortcut (as DC-AE's residual autoencoding): the 2×2 average of the newest
    frame each output sees. The network then starts close to plain average pooling and learns only
    what pooling loses.
    """

    def __init__(self, channels: int, space: bool, time: bool) -> None:
        super().__init__()
        kt, st = (3, 2) if time else (1, 1)
        self.space = space
        s = 2 if space else 1
        self.conv = CausalConv3d(channels, channels, (kt, 3, 3), (st, s, s))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        buf, n = self.conv.advance(x, stream)
        if n == 0:
            return self.conv.windows(buf, 0)
        shortcut = self.conv.newest_frames(buf, n)
        if self.space:
            shortcut = F.avg_pool3d(shortcut, (1, 2, 2))
        return self.conv.windows(buf, n) + shortcut  # (B, C, T', H', W')


class Upsample(nn.Module):
    """Double height and width (when `space`) and change channels; when `time`, each frame becomes two
    but the video's first, which becomes one (mirroring the encoder: 1 + k latent frames → 1 + k·t).

    The temporal part is depth-to-time: a causal conv makes 2C channels that are split into two frames.
    A parameter-free shortcut (nearest upsampling, channel averages) mirrors Downsample's.
    """

    def __init__(self, cin: int, cout: int, space: bool, time: bool, kt: int) -> None:
        super().__init__()
        self.space, self.time = space, time
        if time:
            self.time_conv = CausalConv3d(cin, 2 * cin, (3, 1, 1))
        self.conv = CausalConv3d(cin, cout, (kt, 3, 3))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:
        b, c, t, h, w = x.shape
        s = 2 if self.space else 1
        if t == 0:  # an empty chunk (a causal window not yet full) stays empty
            return x.new_zeros(b, self.conv.conv.out_channels, 0, s * h, s * w)
        shortcut = x
        if self.time:
            y = self.time_conv(x, stream).view(b, 2, c, t, h, w)
            x = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frames interleaved in time
            shortcut = shortcut.repeat_interleave(2, dim=2)
            if self not in stream.started:
                stream.started.add(self)
                x, shortcut = x[:, :, 1:], shortcut[:, :, 1:]
        if self.space:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
            shortcut = F.interpolate(shortcut, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x, stream) + match_channels(shortcut, self.conv.conv.out_channels)  # (B, cout, T'', H'', W'')


@dataclass(frozen=True)
class Level:
    """One resolution of the encoder (and, mirrored, the decoder)."""

    channels: int
    kt: int  # temporal kernel of its convolutions: 3, or 1 for per-frame levels
    halves_space: bool  # whether the downsampling after it halves height and width
    halves_time: bool  # whether the downsampling after it halves the frame count


def plan_levels(
    base_channels: int, channel_mult: tuple[int, ...], space_downs: int, time_downs: int, per_frame_levels: int
) -> list[Level]:
    """Levels from the finest resolution down. Space and time are halved at the deepest downsamplings
    (where it is cheapest), and the first `per_frame_levels` levels use per-frame 3×3 kernels, a third
    of the cost at the resolutions that dominate it."""
    n_down = len(channel_mult) - 1
    return [
        Level(
            base_channels * m,
            1 if i < per_frame_levels else 3,
            n_down - space_downs <= i < n_down,
            n_down - time_downs <= i < n_down,
        )
        for i, m in enumerate(channel_mult)
    ]


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) → (B, C·p², T, H/p, W/p): each p×p pixel patch becomes channels."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `space_to_depth`."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(b, c, t, h * p, w * p)


class Encoder(nn.Module):
    def __init__(
        self, in_channels: int, latent_channels: int, levels: list[Level], num_res_blocks: int, patch_size: int = 1
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv_in = CausalConv3d(in_channels * patch_size**2, levels[0].channels, (levels[0].kt, 3, 3))
        self.blocks = nn.ModuleList()
        prev = levels[0].channels
        for i, lv in enumerate(levels):
            for _ in range(num_res_blocks):
                self.blocks.append(ResBlock(prev, lv.channels, lv.kt))
                prev = lv.channels
            if i < len(levels) - 1:
                self.blocks.append(Downsample(prev, lv.halves_space, lv.halves_time))
        kt = levels[-1].kt
        self.mid = ResBlock(prev, prev, kt)
        self.norm_out = ChannelRMSNorm(prev)
        self.conv_out = CausalConv3d(prev, 2 * latent_channels, (kt, 3, 3))

    def forward(self, x: torch.Tensor, stream: Stream) -> torch.Tensor:  # (B, 3, T, H, W)
        h = self.conv_in(space_to_depth(x, self.patch_size), stream)
        for block in self.blocks:
            h = block(h, stream)
        h = self.mid(h, stream)
        moments = self.conv_out(F.silu(self.norm_out(h)), stream)  # (B, 2·C, T', H/f, W/f)
        c = moments.shape[1] // 2
        # Shortcut into the posterior mean (channel averages of the features), as in Downsample.
        return torch.cat([moments[:, :c] + match_channels(h, c), moments[:, c:]], dim=1)


class Decoder(nn.Module):
    def __init__(
        self, out_channels: int, latent_channels: int, levels: list[Level], num_res_blocks: int, patch_size: int = 1
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        prev, kt = levels[-1].channels, levels[-1].kt
        self.conv_in = CausalConv3d(latent_channels, prev, (kt, 3, 3))
        self.mid = ResBlock(prev, prev, kt)
        self.blocks = nn.ModuleList()
        for i in reversed(range(len(levels))):
            # One block more than the encoder, as in the usual VAE decoders: decoding is the harder half.
            for _ in range(num_res_blocks + 1):
                self.blocks.append(ResBlock(prev, levels[i].channels, levels[i].kt))
                prev = levels[i].channels
            if i > 0:
                up = levels[i - 1]
                self.blocks.append(Upsample(prev, up.channels, up.halves_space, up.halves_time, up.kt))
                prev = up.channels
        self.norm_out = ChannelRMSNorm(prev)
        self.conv_out = CausalConv3d(prev, out_channels * patch_size**2, (levels[0].kt, 3, 3))

    def forward(self, z: torch.Tensor, stream: Stream) -> torch.Tensor:  # (B, C, T', h, w)
        h = self.conv_in(z, stream) + match_channels(z, self.conv_in.conv.out_channels)
        h = self.mid(h, stream)
        for block in self.blocks:
            h = block(h, stream)
        h = self.conv_out(F.silu(self.norm_out(h)), stream)
        return depth_to_space(h, self.patch_size)  # (B, 3, T, h·f, w·f)


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, moments: torch.Tensor) -> None:  # (B, 2·C, ...)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL to N(0, I) per sample, averaged over latent elements (so the weight is size-independent)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).mean(dim=1)  # (B,)
