"""Diffusion, apart from the network: parametrisations, noise schedules, samplers.

`sorakit.diffusion` never imports models, training or CLI code; a DiT is just a `denoise` function here.
"""

from sorakit.diffusion.config import PARAMETRISATIONS, SCHEDULES, DiffusionConfig
from sorakit.diffusion.parametrisation import add_noise, from_x0, loss_weight, self_condition_input, target, to_x0_eps
from sorakit.diffusion.samplers import (
    EVALS_PER_STEP,
    SAMPLERS,
    default_sampler,
    get_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from sorakit.diffusion.schedule import (
    NoiseGrid, alpha_sigma, network_time, sample_t, sampling_grid, shift_factor, training_shift,
)

__all__ = [
    "DiffusionConfig", "PARAMETRISATIONS", "SCHEDULES",
    "add_noise", "from_x0", "loss_weight", "self_condition_input", "target", "to_x0_eps",
    "SAMPLERS", "EVALS_PER_STEP", "default_sampler", "get_sampler",
    "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_heun",
    "NoiseGrid", "alpha_sigma", "network_time", "sample_t", "sampling_grid", "shift_factor",
    "training_shift",
]
