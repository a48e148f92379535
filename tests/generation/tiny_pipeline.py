"""A tiny, randomly initialised pipeline directory for plumbing tests (milliseconds per step on a CPU)."""

from __future__ import annotations

from pathlib import Path

# Small frames and a short window keep every mode to a few tiny sampling calls.
SAMPLE_SIZE = (16, 12, 5)  # width, height, frames
FPS = 8
WINDOW = 4  # latent frames per sampling call


def make_tiny_pipeline(root: str | Path, seed: int = 0, refiner: bool = False, pixel_refiner: bool = False) -> Path:
    """refiner: also hold a tiny 2× space, 2× time refiner (`sample --refine`) in the VAE's latent
    space; pixel_refiner: then a tiny 2× space refiner in pixel space (the pixels VAE)."""
    import torch

    from sorakit.diffusion import DiffusionConfig
    from sorakit.generation.pipeline import export_pipeline
    from sorakit.models.dit import build_dit
    from sorakit.models.io import save_pretrained
    from sorakit.models.text_encoder import build_text_encoder
    from sorakit.models.vae import VAE, vae_config

    root = Path(root)
    torch.manual_seed(seed)
    vae_dir = save_pretrained(VAE(vae_config("tiny")), root / "vae")
    text_dir = save_pretrained(build_text_encoder("tiny"), root / "text")
    refiners = []
    if refiner:
        from sorakit.models.refiner import build_refiner

        refiners.append(save_pretrained(build_refiner("tiny", spatial_scale=2, temporal_scale=2), root / "refiner",
                                        extra={"vae": "../vae"}))
    if pixel_refiner:
        from sorakit.models.refiner import build_refiner

        pixels = root / "pixel_refiner"
        save_pretrained(VAE(vae_config("pixels")), pixels / "vae")
        refiners.append(save_pretrained(build_refiner("tiny", in_channels=3, spatial_scale=2, temporal_scale=1,
                                                      head_width=4), pixels, extra={"vae": "vae"}))
    generation = {"sample_size": list(SAMPLE_SIZE), "fps": FPS, "window": WINDOW}
    return export_pipeline(root / "pipeline", build_dit("tiny"), DiffusionConfig(), vae_dir, text_dir, refiners,
                           extra={"generation": generation, "train_sizes": [list(SAMPLE_SIZE)]})
