"""Parametrisations and noise paths: exact conversions, zero terminal SNR, the resolution shift, min-SNR."""

from __future__ import annotations

import math

import pytest
import torch

from sorakit.config import ConfigError, from_dict
from sorakit.diffusion import (
    DiffusionConfig,
    add_noise,
    alpha_sigma,
    from_x0,
    loss_weight,
    network_time,
    sampling_grid,
    shift_factor,
    target,
    to_x0_eps,
    training_shift,
)

CONFIGS = {
    "v": DiffusionConfig(parametrisation="v"),
    "eps": DiffusionConfig(parametrisation="eps", schedule="scaled_linear", zero_terminal_snr=False),
    "flow": DiffusionConfig(parametrisation="flow"),
    "x": DiffusionConfig(parametrisation="x"),
}


@pytest.mark.parametrize("param", ["v", "eps", "flow", "x"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_conversions_recover_x0_and_noise_exactly(param, shift):
    cfg = CONFIGS[param]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    t = torch.linspace(0.05 if param == "x" else 0.02, 0.98, 64)[:, None]  # x: σ above X_SIGMA_MIN
    alpha, sigma = alpha_sigma(t, cfg, shift)
    x_t = add_noise(x0, noise, alpha, sigma)
    pred = target(x0, noise, alpha, sigma, param)
    x0_hat, eps_hat = to_x0_eps(pred, x_t, alpha, sigma, param)
    torch.testing.assert_close(x0_hat, x0, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, noise, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(from_x0(x0, x_t, alpha, sigma, param), pred, atol=1e-4, rtol=1e-4)


def test_known_values_of_v_and_flow_targets():
    x0, noise = torch.tensor([2.0]), torch.tensor([-1.0])
    a, s = torch.tensor(0.6), torch.tensor(0.8)
    assert target(x0, noise, a, s, "v").item() == pytest.approx(0.6 * -1 - 0.8 * 2)
    assert target(x0, noise, a, s, "flow").item() == pytest.approx(-3.0)
    # At pure noise (α = 0) a v-model still determines x0: x0 = −v.
    x0_hat, _ = to_x0_eps(torch.tensor([5.0]), torch.tensor([0.3]), torch.tensor(0.0), torch.tensor(1.0), "v")
    assert x0_hat.item() == pytest.approx(-5.0)


def test_x_prediction_is_weighted_as_the_v_loss():
    cfg = CONFIGS["x"]
    g = torch.Generator().manual_seed(1)
    x0, noise, x0_hat = (torch.randn(32, 4, generator=g) for _ in range(3))
    alpha, sigma = alpha_sigma(torch.linspace(0.1, 1.0, 32)[:, None], cfg)
    x_t = add_noise(x0, noise, alpha, sigma)
    v_err = (from_x0(x0_hat, x_t, alpha, sigma, "v") - target(x0, noise, alpha, sigma, "v")) ** 2
    x_err = (x0_hat - target(x0, noise, alpha, sigma, "x")) ** 2 * loss_weight(alpha, sigma, cfg)
    torch.testing.assert_close(x_err, v_err, atol=1e-4, rtol=1e-4)
    # Near σ = 0 the weight is capped, so clean tokens cannot dominate the loss.
    assert loss_weight(torch.tensor(1.0), torch.tensor(1e-4), cfg).item() == pytest.approx(400.0)


def test_zero_terminal_snr_rescale():
    t = torch.tensor([0.0, 0.5, 1.0])
    raw = DiffusionConfig(schedule="scaled_linear", zero_terminal_snr=False)
    a, s = alpha_sigma(t, raw)
    assert (a[-1] ** 2 / s[-1] ** 2).item() == pytest.approx(0.0047, abs=3e-4)  # Stable Diffusion's terminal SNR
    for schedule in ("scaled_linear", "cosine"):
        a, s = alpha_sigma(t, DiffusionConfig(schedule=schedule))
        assert a[0].item() == pytest.approx(1.0) and a[-1].item() == 0.0 and s[-1].item() == 1.0
        torch.testing.assert_close(a**2 + s**2, torch.ones(3))


def test_more_tokens_get_more_noise():
    cfg = DiffusionConfig(shift_base_tokens=1024)
    k = shift_factor(torch.tensor([1024.0, 4096.0, 16384.0]), cfg)
    torch.testing.assert_close(k, torch.tensor([1.0, 2.0, 4.0]))
    a, s = alpha_sigma(torch.full((3,), 0.4), cfg, k)
    snr = a**2 / s**2
    assert snr[0] > snr[1] > snr[2]
    torch.testing.assert_close(snr[0] / snr[1], torch.tensor(4.0))  # SNR divided by shift²
    # For flow the shift is SD3's t' = k·t / (1 + (k − 1)·t).
    flow = DiffusionConfig(parametrisation="flow")
    t = torch.linspace(0, 1, 11)
    _, sig = alpha_sigma(t, flow, 3.0)
    torch.testing.assert_close(sig, 3 * t / (1 + 2 * t))
    # The network sees the noise level itself: the same SNR gives the same network time.
    a1, s1 = alpha_sigma(torch.tensor(0.3), cfg, 2.0)
    t_same = network_time(a1, s1)
    a2, s2 = alpha_sigma(t_same, cfg)
    torch.testing.assert_close(a2, a1)


def test_an_unshifted_share_of_training_videos_keeps_low_noise_trained():
    positions = torch.full((4000,), 16384.0)  # shift 4 each
    shifted = DiffusionConfig(shift_base_tokens=1024)
    mixed = DiffusionConfig(shift_base_tokens=1024, unshifted_fraction=0.3)
    k = training_shift(positions, mixed, torch.Generator().manual_seed(0))
    assert set(k.unique().tolist()) == {1.0, 4.0} and abs((k == 1).float().mean().item() - 0.3) < 0.03
    assert torch.equal(training_shift(positions, shifted), shift_factor(positions, shifted))
    # What it is for: the share of training at σ < 0.3 (where outlines are made) nearly doubles.
    t = torch.rand(4000, generator=torch.Generator().manual_seed(1))
    low = [(alpha_sigma(t, c, training_shift(positions, c))[1] < 0.3).float().mean().item() for c in (shifted, mixed)]
    assert low[1] > 1.5 * low[0]
    with pytest.raises(ConfigError):
        DiffusionConfig(unshifted_fraction=1.5).validate()


def test_min_snr_weights():
    cfg = DiffusionConfig(min_snr_gamma=5.0)
    a, s = alpha_sigma(torch.tensor([0.1, 0.5, 0.9]), cfg)
    snr = a**2 / s**2
    torch.testing.assert_close(loss_weight(a, s, cfg), snr.clamp(max=5.0) / (snr + 1))
    eps = DiffusionConfig(parametrisation="eps", schedule="scaled_linear", zero_terminal_snr=False, min_snr_gamma=5.0)
    a, s = alpha_sigma(torch.tensor([0.1, 0.9]), eps)
    snr = a**2 / s**2
    torch.testing.assert_close(loss_weight(a, s, eps), snr.clamp(max=5.0) / snr)
    assert (loss_weight(a, s, DiffusionConfig()) == 1).all()


def test_grid_and_config_validation():
    grid = sampling_grid(DiffusionConfig(), 10, torch.tensor([1.0, 2.0]))
    assert grid.alpha.shape == (11, 2) and grid.steps == 10
    assert (grid.sigma[0] == 1).all() and (grid.sigma[-1] == 0).all()
    assert (grid.sigma[1:] <= grid.sigma[:-1]).all()
    half = sampling_grid(DiffusionConfig(), 5, t_start=0.5)
    assert half.sigma[0].item() == pytest.approx(math.sin(math.pi / 4))
    with pytest.raises(ConfigError, match="zero terminal SNR"):
        from_dict(DiffusionConfig, {"parametrisation": "eps"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DiffusionConfig, {"shfit": 2})
