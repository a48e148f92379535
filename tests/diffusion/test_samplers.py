"""Samplers on a known Gaussian target (the exact denoiser is known in closed form), given frames."""

from __future__ import annotations

import pytest
import torch

from sorakit.diffusion import SAMPLERS, DiffusionConfig, alpha_sigma, from_x0, get_sampler, sampling_grid

MU, SD = 1.5, 0.5
CONFIGS = {
    "v": DiffusionConfig(parametrisation="v", shift_base_tokens=64),
    "eps": DiffusionConfig(parametrisation="eps", schedule="scaled_linear", zero_terminal_snr=False),
    "flow": DiffusionConfig(parametrisation="flow"),
}


def gaussian_denoiser(param: str):
    """Exact posterior mean E[x0 | x_t] for x0 ~ N(MU, SD²), returned as the model's prediction."""

    def denoise(x, alpha, sigma):
        x0 = MU + alpha * SD**2 / (alpha**2 * SD**2 + sigma**2) * (x - alpha * MU)
        return from_x0(x0, x, alpha, sigma, param)

    return denoise


def start(cfg: DiffusionConfig, n: int, shift=None) -> torch.Tensor:
    # The exact marginal at t = 1 (pure noise when the terminal SNR is zero).
    a, s = alpha_sigma(torch.tensor(1.0), cfg, shift)
    return a * MU + (a**2 * SD**2 + s**2).sqrt() * torch.randn(n, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "param,sampler,steps",
    [("v", "ddim", 50), ("v", "dpmpp_2m", 20), ("eps", "dpmpp_2m", 20), ("eps", "ddim", 50),
     ("flow", "euler", 50), ("flow", "heun", 20), ("flow", "dpmpp_2m", 20)],
)
def test_sampler_recovers_a_known_gaussian(param, sampler, steps):
    cfg = CONFIGS[param]
    shift = torch.full((20000,), 2.0)  # a per-element grid, as packed videos have
    grid = sampling_grid(cfg, steps, shift)
    out = get_sampler(sampler, cfg)(gaussian_denoiser(param), start(cfg, 20000, 2.0), grid, cfg)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(SD, abs=0.03)


def test_second_order_beats_first_order_at_equal_steps():
    cfg = CONFIGS["v"]
    x = start(cfg, 4000)
    ref = SAMPLERS["ddim"](gaussian_denoiser("v"), x, sampling_grid(cfg, 1000), cfg)
    grid = sampling_grid(cfg, 15)
    err_ddim = (SAMPLERS["ddim"](gaussian_denoiser("v"), x, grid, cfg) - ref).abs().mean()
    err_dpm = (SAMPLERS["dpmpp_2m"](gaussian_denoiser("v"), x, grid, cfg) - ref).abs().mean()
    assert err_dpm < 0.5 * err_ddim


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_given_elements_stay_clean_at_every_step(sampler):
    cfg = CONFIGS["flow"] if sampler in ("euler", "heun") else CONFIGS["v"]
    mask = torch.zeros(6, 8, dtype=torch.bool)
    mask[0] = mask[-1] = True
    values = torch.randn(6, 8)
    seen = []

    def denoise(x, alpha, sigma):
        seen.append(torch.equal(x[mask], values[mask]))
        return gaussian_denoiser(cfg.parametrisation)(x, alpha, sigma)

    out = SAMPLERS[sampler](denoise, torch.randn(6, 8), sampling_grid(cfg, 6), cfg, given=(mask, values))
    assert all(seen) and len(seen) >= 6
    assert torch.equal(out[mask], values[mask])
    assert not torch.equal(out[~mask], values[~mask])


def test_flow_samplers_refuse_other_parametrisations():
    with pytest.raises(ValueError, match="rectified-flow"):
        get_sampler("euler", CONFIGS["v"])
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("plms", CONFIGS["v"])
