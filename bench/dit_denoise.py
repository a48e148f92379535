"""Where a trained DiT's denoising falls short: x0 error per noise level, split by what the network can see.

    python bench/dit_denoise.py --model runs/demo/pipeline --latents runs/demo/latents [--num 24]

For `--num` latents from the shards, noised at fixed times t (no resolution shift), it reports the
mean squared x0 error per value:

* in the row space of the patch embedding (`x_embed`) and in its null space. When a patch has more
  values than the network's width, the null space is never seen. A v/eps model then leaves the
  noise there (error ≈ the "noise alone" column): the speckle in its samples;
* against the baseline in the same run: σ²·(noise)², the error of leaving the noise in;
* with self-attention restricted to each token itself, which shows how much the model uses context.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline directory")
    ap.add_argument("--latents", required=True, help="latent shards made with the pipeline's VAE")
    ap.add_argument("--num", type=int, default=24)
    ap.add_argument("--times", default="0.1,0.2,0.4,0.6,0.8,0.95")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import sorakit.models.dit as dit_module
    from sorakit.data.latents import latent_pipeline
    from sorakit.data.packing import pack
    from sorakit.diffusion import add_noise, alpha_sigma, network_time, to_x0_eps
    from sorakit.generation.pipeline import load_pipeline
    from sorakit.generation.sampling import encode_text
    from sorakit.models.layers import PackedMask

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    dit, cfg = pipe.dit.eval(), pipe.diffusion_cfg
    samples = list(itertools.islice(iter(latent_pipeline(args.latents)), args.num))
    if not samples:
        sys.exit(f"{args.latents}: no latent samples")
    batch = pack([s["latent"] for s in samples], dit.patch)
    text = encode_text(pipe.text_encoder, [s["caption"] or "" for s in samples], batch, "cpu")
    weight = dit.x_embed.weight.detach()  # (D, P)
    rank = min(weight.shape)
    basis = torch.linalg.svd(weight, full_matrices=True).Vh  # (P, P): rows 0..rank-1 span what x_embed sees
    x0, valid = batch.x, batch.valid.float()
    values = valid.sum()
    tokens = values / valid.shape[-1]
    dense_mask = dit_module.packed_attention_mask

    def self_only(seq_ids, backend):
        eye = torch.eye(seq_ids.shape[1], dtype=torch.bool)
        return PackedMask("dense", dense=eye[None, None].expand(seq_ids.shape[0], 1, -1, -1))

    def x0_error(x_t, alpha, sigma, mask_fn) -> torch.Tensor:
        dit_module.packed_attention_mask = mask_fn
        try:
            with torch.no_grad():
                pred = dit(x_t, network_time(alpha, sigma)[..., 0], batch.pos, batch.seq_ids, *text, batch.token_given())
        finally:
            dit_module.packed_attention_mask = dense_mask
        return (to_x0_eps(pred, x_t, alpha, sigma, cfg.parametrisation)[0] - x0) * valid

    p = weight.shape[1]
    print(f"{args.model}: {cfg.parametrisation}-prediction, patch values {p}, width {weight.shape[0]}, {len(samples)} latents")
    print("| t (σ) | x0 error | row space | null space | noise alone | self-attention off |")
    print("|---|---:|---:|---:|---:|---:|")
    for t in (float(v) for v in args.times.split(",")):
        a, s = alpha_sigma(torch.full((len(samples),), t), cfg)
        alpha, sigma = batch.per_token(a)[..., None], batch.per_token(s)[..., None]
        noise = torch.randn_like(x0)
        x_t = add_noise(x0, noise, alpha, sigma)
        err = x0_error(x_t, alpha, sigma, dense_mask)
        alone = x0_error(x_t, alpha, sigma, self_only)
        row = (err @ basis[:rank].T).pow(2).sum() / tokens / rank
        null = (err @ basis[rank:].T).pow(2).sum() / tokens / (p - rank) if p > rank else float("nan")
        print(
            f"| {t:.2f} ({s.max():.2f}) | {err.pow(2).sum() / values:.4f} | {row:.4f} | {null:.4f} | "
            f"{(sigma * noise * valid).pow(2).sum() / values:.4f} | {alone.pow(2).sum() / values:.4f} |"
        )


if __name__ == "__main__":
    main()
