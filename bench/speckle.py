"""Where the speckle in toy DiT samples comes from: the VAE decoder, or the DiT's latents?

    python bench/speckle.py --model runs/demo/pipeline [--clips 12] [--sigmas 0.05,0.1,0.2,0.3]

1. Decoder sensitivity. Real toy clips are encoded; the latent plus i.i.d. Gaussian noise of each
   σ (in the normalised latent's units) is decoded and compared with the decode of the clean latent
   (PSNR): how much latent error the decoder turns into visible noise.
2. The DiT's latent error where nothing happens. Each clip's first frame is given and the rest is
   sampled as image-to-video with its caption (the same sampler and settings as `sorakit sample`).
   On the latent positions the object never covers, the spread (std over positions, per channel
   and latent frame) of the generated latent is set against the real clip's latent there, the
   baseline in the same run: flat backgrounds encode to a nearly flat latent, so a larger spread
   in the samples is error the DiT added, which the decoder renders as speckle.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch


def background_cells(frames: np.ndarray, bg_rgb, factor: int, margin: int = 1) -> torch.Tensor:
    """(H', W') bool: latent cells that no frame's object (or its blur) touches."""
    touched = (np.abs(frames.astype(np.int16) - np.asarray(bg_rgb, dtype=np.int16)).max(-1) > 8).any(0)  # (H, W)
    h, w = touched.shape
    hc, wc = -(-h // factor), -(-w // factor)
    padded = np.zeros((hc * factor, wc * factor), dtype=bool)
    padded[:h, :w] = touched
    cells = torch.from_numpy(padded.reshape(hc, factor, wc, factor).any((1, 3))).float()
    grown = torch.nn.functional.max_pool2d(cells[None, None], 2 * margin + 1, stride=1, padding=margin)[0, 0]
    return grown == 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline directory")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--sigmas", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from sorakit.data.toyworld import BACKGROUNDS, sample_spec
    from sorakit.generation.evaluate import encoded_clip
    from sorakit.generation.pipeline import load_pipeline
    from sorakit.generation.sampling import GivenLatents, generate_latents
    from sorakit.training.vae import psnr

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    vae = pipe.vae
    rng = np.random.default_rng(args.seed)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    decoded_psnr = {s: [] for s in sigmas}
    real_spread, gen_spread = [], []
    for i in range(args.clips):
        spec = sample_spec(rng, args.seed, motion=str(rng.choice(["left", "right", "up", "down"])))
        clip = encoded_clip(spec)
        with torch.no_grad():
            z = vae.encode_video(clip)  # (C, T', H', W')
            clean = vae.decode_video(z)
            for s in sigmas:
                decoded_psnr[s].append(psnr(vae.decode_video(z + s * torch.randn_like(z)), clean))
        given = torch.zeros(z.shape[1], dtype=torch.bool)
        given[0] = True
        (gen,) = generate_latents(pipe.dit, pipe.diffusion_cfg, pipe.text_encoder, [spec.caption], [tuple(z.shape[1:])],
                                  given=[GivenLatents(z, given)], steps=args.steps, seed=args.seed + i)
        cells = background_cells(clip, BACKGROUNDS[spec.background], vae.spatial_factor)
        if cells.sum() < 4:
            continue
        for latent, out in ((z, real_spread), (gen, gen_spread)):
            bg = latent[:, 1:, cells]  # (C, T'-1, cells): the sampled frames, background only
            out.append(float(bg.std(dim=-1).mean()))
    print(f"{args.model}: {args.clips} toy clips (H.264), {args.steps} sampling steps")
    print("decoder: decode(z + σ·noise) against decode(z)")
    for s in sigmas:
        print(f"  σ = {s:<5} PSNR {statistics.fmean(decoded_psnr[s]):5.1f} dB")
    print(f"latent spread on background cells (std over cells; {len(real_spread)} clips)")
    real, gen = statistics.fmean(real_spread), statistics.fmean(gen_spread)
    print(f"  real clips {real:.3f}   image-to-video samples {gen:.3f}   ratio {gen / real:.1f}x")


if __name__ == "__main__":
    main()
