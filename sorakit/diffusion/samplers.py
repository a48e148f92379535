"""Samplers: pure functions with one signature (k-diffusion style).

    x0 = sampler(denoise, x, grid, cfg, given=None, callback=None)

* `denoise(x, alpha, sigma) -> prediction` in `cfg.parametrisation` (the network plus guidance);
  `alpha`, `sigma` are the grid's values at the current step, broadcastable to `x`.
* `x` is the initial state (pure noise, or a noised start for SDEdit), any shape.
* `grid` holds α, σ for the S + 1 points (`sampling_grid`); they may differ per video or token.
* `given = (mask, values)`: elements under `mask` are clean context (given frames). They are set
  to `values` before every network call and in the result, so they stay clean at every step.

DDIM and DPM-Solver++(2M) work from (x0, ε) and fit any Gaussian path, so they serve v, eps and flow
models; Euler and Heun integrate the straight rectified-flow ODE dx/dσ = ε − x0 and need `flow`.
"""

from __future__ import annotations

from typing import Callable

import torch

from sorakit.diffusion.config import DiffusionConfig
from sorakit.diffusion.parametrisation import to_x0_eps
from sorakit.diffusion.schedule import NoiseGrid

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Given = tuple[torch.Tensor, torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, x, x0_hat)


def _clamp_given(x: torch.Tensor, given: Given | None) -> torch.Tensor:
    if given is None:
        return x
    mask, values = given
    return torch.where(mask, values, x)


def _predict(denoise, x, alpha, sigma, cfg, given):
    x = _clamp_given(x, given)
    x0, eps = to_x0_eps(denoise(x, alpha, sigma), x, alpha, sigma, cfg.parametrisation)
    return x, x0, eps


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser, x: torch.Tensor, grid: NoiseGrid, cfg: DiffusionConfig, *,
    given: Given | None = None, callback: Callback | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (η = 0): x' = α'·x0 + σ'·ε."""
    for i in range(grid.steps):
        x, x0, eps = _predict(denoise, x, grid.alpha[i], grid.sigma[i], cfg, given)
        x = grid.alpha[i + 1] * x0 + grid.sigma[i + 1] * eps
        if callback is not None:
            callback(i, x, x0)
    return _clamp_given(x, given)


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser, x: torch.Tensor, grid: NoiseGrid, cfg: DiffusionConfig, *,
    given: Given | None = None, callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in λ = log(α/σ), data prediction.

    The first step (from λ = −∞ at zero terminal SNR) and the last (to σ = 0) are first order.
    """
    lam = torch.log(grid.alpha) - torch.log(grid.sigma)  # −inf at pure noise, +inf at σ = 0
    x0_prev, h_prev = None, None
    for i in range(grid.steps):
        a, s, a1, s1 = grid.alpha[i], grid.sigma[i], grid.alpha[i + 1], grid.sigma[i + 1]
        x, x0, _ = _predict(denoise, x, a, s, cfg, given)
        h = lam[i + 1] - lam[i]
        last = i == grid.steps - 1
        if x0_prev is None or last:
            d = x0
        else:
            # r = h_prev / h; an infinite h_prev (first step from pure noise) makes this first order.
            inv_2r = torch.where(h > 0, h / (2 * h_prev), torch.zeros_like(h))
            d = (1 + inv_2r) * x0 - inv_2r * x0_prev
        x = (s1 / s) * x - a1 * torch.expm1(-h) * d  # e^{-h} = α·σ'/(σ·α'); exact at h = ±inf
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, x, x0)
    return _clamp_given(x, given)


def _check_flow(cfg: DiffusionConfig, name: str) -> None:
    if cfg.parametrisation != "flow":
        raise ValueError(
            f"sampler {name!r} integrates the rectified-flow ODE; this model is "
            f"{cfg.parametrisation}-parameterised (use ddim or dpmpp_2m)"
        )


@torch.no_grad()
def sample_euler(
    denoise: Denoiser, x: torch.Tensor, grid: NoiseGrid, cfg: DiffusionConfig, *,
    given: Given | None = None, callback: Callback | None = None,
) -> torch.Tensor:
    """Euler on the flow ODE dx/dσ = ε − x0."""
    _check_flow(cfg, "euler")
    for i in range(grid.steps):
        x, x0, eps = _predict(denoise, x, grid.alpha[i], grid.sigma[i], cfg, given)
        x = x + (grid.sigma[i + 1] - grid.sigma[i]) * (eps - x0)
        if callback is not None:
            callback(i, x, x0)
    return _clamp_given(x, given)


@torch.no_grad()
def sample_heun(
    denoise: Denoiser, x: torch.Tensor, grid: NoiseGrid, cfg: DiffusionConfig, *,
    given: Given | None = None, callback: Callback | None = None,
) -> torch.Tensor:
    """Heun (trapezoidal) on the flow ODE; the last step, to σ = 0, is an Euler step."""
    _check_flow(cfg, "heun")
    for i in range(grid.steps):
        s, s1 = grid.sigma[i], grid.sigma[i + 1]
        x, x0, eps = _predict(denoise, x, grid.alpha[i], s, cfg, given)
        u = eps - x0
        x_euler = x + (s1 - s) * u
        if i < grid.steps - 1:
            _, x0_2, eps_2 = _predict(denoise, x_euler, grid.alpha[i + 1], s1, cfg, given)
            x = x + (s1 - s) * 0.5 * (u + eps_2 - x0_2)
        else:
            x = x_euler
        if callback is not None:
            callback(i, x, x0)
    return _clamp_given(x, given)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
}
# Network evaluations per step, for time estimates.
EVALS_PER_STEP: dict[str, int] = {"ddim": 1, "dpmpp_2m": 1, "euler": 1, "heun": 2}


def default_sampler(cfg: DiffusionConfig) -> str:
    return "euler" if cfg.parametrisation == "flow" else "dpmpp_2m"


def get_sampler(name: str | None, cfg: DiffusionConfig) -> Callable[..., torch.Tensor]:
    name = name or default_sampler(cfg)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    if name in ("euler", "heun"):
        _check_flow(cfg, name)
    return SAMPLERS[name]
