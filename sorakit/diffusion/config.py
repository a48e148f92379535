"""The diffusion settings a DiT is trained with; stored beside its weights (config.json "diffusion")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sorakit.config import ConfigError

PARAMETRISATIONS: tuple[str, ...] = ("v", "eps", "flow", "x")
SCHEDULES: tuple[str, ...] = ("cosine", "scaled_linear")


@dataclass
class DiffusionConfig:
    # What the network predicts: v = α·ε − σ·x0 (default), eps = ε, flow = ε − x0 (rectified flow),
    # x = x0 itself, trained with the v-loss's weighting ("Back to Basics: Let Denoising Generative
    # Models Denoise", Li & He 2025): the choice when a token's patch has more values than the network's
    # width, where a v/eps network cannot carry the noise through and leaves it in the samples.
    parametrisation: Literal["v", "eps", "flow", "x"] = "v"
    # The variance-preserving noise path of v/eps (α² + σ² = 1). Flow always uses α = 1 − t, σ = t.
    schedule: Literal["cosine", "scaled_linear"] = "cosine"
    # Rescale α so the last step is pure noise (Lin et al. 2024), which sampling from pure noise needs.
    zero_terminal_snr: bool = True
    # Resolution/length-aware shift: a video with n latent positions (T'·H'·W') is noised with its
    # SNR divided by shift², shift = shift_scale · sqrt(n / shift_base_tokens). 0 turns it off.
    shift_base_tokens: int = 0
    shift_scale: float = 1.0
    # Share of training videos noised without that shift. A large shift puts nearly all training at
    # high noise, where layout is decided, and starves the low and middle levels, where outlines are
    # made: the samples come out speckled and blotchy. Sampling keeps the shift either way; the
    # network sees only the noise level, so the two paths train one function.
    unshifted_fraction: float = 0.0
    # Min-SNR-γ loss weighting (Hang et al. 2023); 0 turns it off. For x: the cap of the v-loss weight.
    min_snr_gamma: float = 0.0
    # How training draws t ∈ [0, 1]: uniform, or logit-normal (more weight on the middle, as SD3).
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"

    def validate(self) -> None:
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"unknown parametrisation {self.parametrisation!r} (known: {', '.join(PARAMETRISATIONS)})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.parametrisation == "eps" and (self.zero_terminal_snr or self.schedule == "cosine"):
            raise ConfigError(
                "eps-prediction cannot recover x0 at zero terminal SNR (α = 0 at t = 1); use it with "
                "schedule: scaled_linear and zero_terminal_snr: false, or use v"
            )
        if self.shift_base_tokens < 0 or self.shift_scale <= 0:
            raise ConfigError("shift_base_tokens must be >= 0 and shift_scale > 0")
        if not 0.0 <= self.unshifted_fraction <= 1.0:
            raise ConfigError("unshifted_fraction must be in [0, 1]")
        if self.min_snr_gamma < 0:
            raise ConfigError("min_snr_gamma must be >= 0")
