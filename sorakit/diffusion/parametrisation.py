"""What the network predicts, kept apart from the network (k-diffusion style).

With x_t = α·x0 + σ·ε:
  v    = α·ε − σ·x0    (variance-preserving paths: α² + σ² = 1)
  eps  = ε
  flow = ε − x0        (rectified flow: α + σ = 1)
  x    = x0            (weighted as the v-loss: an x0 error e is a v error e/σ on a VP path)
Every sampler works on (x0, ε) recovered from the prediction by `to_x0_eps`.
"""

from __future__ import annotations

import torch

from sorakit.diffusion.config import DiffusionConfig


# x-prediction divides by σ to find ε and weights its loss by 1/σ²; below this σ both are held constant.
X_SIGMA_MIN = 0.05


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return alpha * x0 + sigma * noise


def target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, param: str) -> torch.Tensor:
    """The training target of the parametrisation."""
    if param == "v":
        return alpha * noise - sigma * x0
    if param == "eps":
        return noise
    if param == "flow":
        return noise - x0
    if param == "x":
        return x0
    raise ValueError(f"unknown parametrisation {param!r}")


def to_x0_eps(
    pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, param: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, ε) implied by a prediction at x_t; exact inverses of `target` for the matching path."""
    if param == "v":
        return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    if param == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if param == "flow":
        return x_t - sigma * pred, x_t + alpha * pred
    if param == "x":
        return pred, (x_t - alpha * pred) / sigma.clamp(min=X_SIGMA_MIN)
    raise ValueError(f"unknown parametrisation {param!r}")


def self_condition_input(
    pred: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, param: str,
    given: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """What a self-conditioned network is fed next: the x0 its prediction implies, with the given
    (clean context) elements at their values. given = (mask, values). Training and sampling both
    call this, so the network sees the same thing in both."""
    mask, values = given
    return torch.where(mask, values, to_x0_eps(pred, x_t, alpha, sigma, param)[0])


def from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, param: str) -> torch.Tensor:
    """The prediction that a denoiser giving x0 at x_t amounts to (needs σ > 0)."""
    noise = (x_t - alpha * x0) / sigma
    return target(x0, noise, alpha, sigma, param)


def loss_weight(alpha: torch.Tensor, sigma: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Per-sample weight of the squared error on the prediction.

    Min-SNR-γ weights the error on x0 by min(SNR, γ); an error e on the prediction is an error
    c·e on x0 with c = ∂x0/∂pred (σ for v and flow, σ/α for eps), so the weight here is
    min(SNR, γ)·c² (for v: min(SNR, γ)/(SNR + 1), for eps: min(SNR, γ)/SNR). 1 when γ = 0.
    x-prediction is weighted as the v-loss it stands for, 1/σ², capped.
    """
    if cfg.parametrisation == "x":  # the v-loss: 1/σ² = SNR + 1, capped at γ (or at σ = X_SIGMA_MIN)
        cap = cfg.min_snr_gamma if cfg.min_snr_gamma > 0 else X_SIGMA_MIN**-2
        return sigma.clamp(min=1e-12).pow(-2).clamp(max=cap)
    if cfg.min_snr_gamma <= 0:
        return torch.ones_like(alpha)
    snr = alpha**2 / sigma.clamp(min=1e-12) ** 2
    c2 = sigma**2 / alpha.clamp(min=1e-12) ** 2 if cfg.parametrisation == "eps" else sigma**2
    return snr.clamp(max=cfg.min_snr_gamma) * c2
