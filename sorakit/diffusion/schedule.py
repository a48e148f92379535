"""Noise paths x_t = α(t)·x0 + σ(t)·ε for t ∈ [0, 1], the resolution-aware shift, and sampling grids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sorakit.diffusion.config import DiffusionConfig

# Stable Diffusion's "scaled linear" betas over 1000 steps, in continuous time: its terminal SNR is
# ≈ 0.0047, the case zero-terminal-SNR rescaling was made for.
_SL_STEPS, _SL_BETA0, _SL_BETA1 = 1000, 0.00085, 0.012


def _vp_alpha(t: torch.Tensor, schedule: str) -> torch.Tensor:
    if schedule == "cosine":
        return torch.cos(0.5 * math.pi * t)
    a, b = math.sqrt(_SL_BETA0), math.sqrt(_SL_BETA1) - math.sqrt(_SL_BETA0)
    integral = a * a * t + a * b * t**2 + b * b * t**3 / 3  # ∫₀ᵗ β(u) du / steps, β(u) = (a + b·u)²
    return torch.exp(-0.5 * _SL_STEPS * integral)


def shift_factor(num_positions: torch.Tensor | float, cfg: DiffusionConfig) -> torch.Tensor:
    """The noise shift of a video with `num_positions` latent positions (more tokens → more noise)."""
    n = torch.as_tensor(num_positions, dtype=torch.float32)
    if cfg.shift_base_tokens <= 0:
        return torch.full_like(n, cfg.shift_scale)
    return cfg.shift_scale * (n / cfg.shift_base_tokens).sqrt()


def training_shift(num_positions: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-video shift factors for training: `shift_factor`, except 1 for a random share
    `cfg.unshifted_fraction` of the videos."""
    shift = shift_factor(num_positions, cfg)
    if cfg.unshifted_fraction > 0:
        plain = torch.rand(shift.shape, generator=generator) < cfg.unshifted_fraction
        shift = torch.where(plain, torch.ones_like(shift), shift)
    return shift


def alpha_sigma(
    t: torch.Tensor, cfg: DiffusionConfig, shift: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t), σ(t) of the configured path; `shift` k divides the SNR by k² (k = 1: unchanged)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if cfg.parametrisation == "flow":
        alpha, sigma = 1.0 - t, t
    else:
        alpha = _vp_alpha(t, cfg.schedule)
        if cfg.zero_terminal_snr:
            a0 = _vp_alpha(torch.zeros(()), cfg.schedule)
            a1 = _vp_alpha(torch.ones(()), cfg.schedule)
            alpha = (alpha - a1) * a0 / (a0 - a1)
        alpha = alpha.clamp(0.0, 1.0)
        sigma = (1.0 - alpha**2).clamp(min=0.0).sqrt()
    return apply_shift(alpha, sigma, cfg, shift)


def apply_shift(
    alpha: torch.Tensor, sigma: torch.Tensor, cfg: DiffusionConfig, shift: torch.Tensor | float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide the SNR by shift², keeping α + σ = 1 (flow) or α² + σ² = 1 (v, eps)."""
    if shift is None:
        return alpha, sigma
    k = torch.as_tensor(shift, dtype=torch.float32, device=alpha.device)
    if cfg.parametrisation == "flow":
        norm = alpha + k * sigma
    else:
        norm = (alpha**2 + (k * sigma) ** 2).sqrt()
    return alpha / norm, k * sigma / norm


def network_time(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The time the network is conditioned on: (2/π)·atan2(σ, α) ∈ [0, 1], a function of the noise
    level alone, so shifted and unshifted paths that reach the same SNR look the same to it."""
    return torch.atan2(sigma, alpha) * (2.0 / math.pi)


def sample_t(n: int, cfg: DiffusionConfig, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times for n videos."""
    if cfg.t_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator)).to(device)
    return torch.rand(n, generator=generator).to(device)


@dataclass
class NoiseGrid:
    """α and σ at the S + 1 points of a sampling run, each (S + 1, *shape) broadcastable to the state."""

    alpha: torch.Tensor
    sigma: torch.Tensor

    @property
    def steps(self) -> int:
        return self.alpha.shape[0] - 1


def sampling_grid(
    cfg: DiffusionConfig, steps: int, shift: torch.Tensor | float | None = None, t_start: float = 1.0
) -> NoiseGrid:
    """S = `steps` steps from `t_start` (1 = the terminal noise level; less for SDEdit) to clean.

    Flow walks uniform steps of its own t (as SD3). Variance-preserving paths walk uniform steps of
    the angle atan2(σ, α) whatever the training schedule, so a schedule that crowds its noise levels
    (scaled_linear) still gets evenly spread steps. The shift is applied to the points afterwards;
    `shift` may be a tensor of per-video (or per-token) factors: the grid's trailing shape is its shape.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must be in (0, 1], got {t_start}")
    if cfg.parametrisation == "flow":
        t = torch.linspace(t_start, 0.0, steps + 1)
        alpha, sigma = 1.0 - t, t
    else:
        u0 = network_time(*alpha_sigma(torch.tensor(t_start), cfg)).item()
        u = torch.linspace(u0, 0.0, steps + 1)
        alpha, sigma = torch.cos(0.5 * math.pi * u).clamp(min=0.0), torch.sin(0.5 * math.pi * u)
        alpha[-1], sigma[-1] = 1.0, 0.0  # exactly clean at the end (cos(π/2) is not exactly 0 either)
    if shift is not None:
        shift = torch.as_tensor(shift, dtype=torch.float32)
        alpha, sigma = (v.view(-1, *([1] * shift.dim())) for v in (alpha, sigma))
    alpha, sigma = apply_shift(alpha, sigma, cfg, shift)
    return NoiseGrid(alpha, sigma)
