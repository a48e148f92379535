"""Does a toy DiT tie motion to the prompt where sampling decides it? Its x0 estimate from pure noise.

    python bench/motion_mean.py --model runs/demo/pipeline --latents runs/demo/latents [--batches 16]
    python bench/motion_mean.py --model runs/demo/pipeline --latents runs/demo/latents --reference-steps 5000

At t = 1 (pure noise, zero terminal SNR) a denoiser's x0 estimate is the conditional mean of the
training clips for that prompt: for "moving right" the object's mean sits in the left part of the
first frame and the right part of the last. Sampling places the object from these estimates, so a
model whose estimate does not drift generates objects that stand still whatever the prompt.

For toy-world latent shards (captions parsed per `toyworld.md`), per motion, the centroid of each
latent's deviation from its frame mean moves from the first to the last latent frame by some
fraction of the frame; the report sets the model's estimate (on the same packed batches, at t = 1)
against the true latents, the baseline in the same run. `--reference-steps N` also trains, on the
same batches at t = 1, a direct MLP from (fractional position, pooled text) to x0: a model with
nothing else to learn, which shows how many steps the drift takes to appear at all.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys

import torch

AXIS = {"left": (2, -1), "right": (2, 1), "up": (1, -1), "down": (1, 1), "still": (2, 0)}  # (latent dim, sign)


def drift(z: torch.Tensor, dim: int) -> float:
    """Centroid shift along `dim` (1: height, 2: width of (T, H, W)) of a latent's deviation energy,
    first to last latent frame, as a fraction of the frame."""
    e = (z - z.mean(dim=(2, 3), keepdim=True)).pow(2).sum(0)  # (T, H, W)
    other = 2 if dim == 1 else 1
    profile = e.sum(dim=other)  # (T, extent)
    coord = (torch.arange(profile.shape[1]).float() + 0.5) / profile.shape[1]
    centre = (profile * coord).sum(1) / profile.sum(1).clamp(min=1e-12)
    return float(centre[-1] - centre[0])


def table(rows: dict[str, list[tuple[float, float]]]) -> str:
    lines = ["| motion | clips | true latents | model estimate | ratio |", "|---|---:|---:|---:|---:|"]
    for motion in AXIS:
        if rows.get(motion):
            true, est = (sum(v) / len(v) for v in zip(*rows[motion]))
            ratio = est / true if abs(true) > 1e-3 else float("nan")
            lines.append(f"| {motion} | {len(rows[motion])} | {true:+.3f} | {est:+.3f} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline directory")
    ap.add_argument("--latents", required=True, help="toy-world latent shards made with the pipeline's VAE")
    ap.add_argument("--batches", type=int, default=16, help="packed batches to measure on")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--reference-steps", type=int, default=0, help="also train the direct MLP this many steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from sorakit.data.latents import latent_pipeline
    from sorakit.data.packing import packed_batches
    from sorakit.data.toyworld import parse_caption
    from sorakit.diffusion import alpha_sigma, network_time, to_x0_eps
    from sorakit.generation.pipeline import load_pipeline
    from sorakit.generation.sampling import encode_text

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    dit, cfg = pipe.dit.eval(), pipe.diffusion_cfg

    def batches(seed: int):
        src = latent_pipeline(args.latents, shuffle=256, resampled=True, seed=seed)
        for item in packed_batches(src, dit.patch, args.max_tokens, pool_size=16, seed=seed):
            motions = [(parse_caption(c or "") or {}).get("motion") for c in item["captions"]]
            yield item["batch"], item["captions"], motions

    def x0_at_noise(model, batch, text) -> torch.Tensor:
        one = torch.ones(len(batch.videos))
        a, s = alpha_sigma(one, cfg)
        alpha, sigma = batch.per_token(a)[..., None], batch.per_token(s)[..., None]
        x_t = torch.randn_like(batch.x)
        with torch.no_grad():
            pred = model(x_t, network_time(alpha, sigma)[..., 0], batch.pos, batch.seq_ids, *text, batch.token_given())
        return to_x0_eps(pred.float(), x_t, alpha, sigma, cfg.parametrisation)[0]

    rows: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for batch, captions, motions in itertools.islice(batches(args.seed), args.batches):
        text = encode_text(pipe.text_encoder, captions, batch, "cpu")
        est = batch.unpack(x0_at_noise(dit, batch, text))
        for motion, z, z_hat in zip(motions, batch.unpack(batch.x), est):
            if motion in AXIS:
                dim, sign = AXIS[motion]
                rows[motion].append((drift(z, dim) * (sign or 1), drift(z_hat, dim) * (sign or 1)))
    if not rows:
        sys.exit(f"{args.latents}: no toy-world captions in the shards")
    print(f"{args.model}: centroid drift along the motion's axis, first → last latent frame (fraction of the frame; "
          "sign: towards the motion); the estimate is the DiT's x0 at t = 1")
    print(table(rows))

    if args.reference_steps:
        reference(args, pipe, batches)


def reference(args, pipe, batches) -> None:
    """Train a 2-hidden-layer MLP: (fractional position, pooled text) → x0, at t = 1 only."""
    from sorakit.generation.sampling import encode_text as encode
    from sorakit.models.dit import fractional_features

    freqs = pipe.dit.config.frac_pos_freqs or 8
    width = pipe.dit.config.text_dim
    net = torch.nn.Sequential(
        torch.nn.Linear(6 * freqs + width, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256), torch.nn.SiLU(),
        torch.nn.Linear(256, pipe.dit.config.patch_dim),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)

    def predict(batch, text) -> torch.Tensor:
        pooled = torch.nn.functional.layer_norm(text[2], text[2].shape[-1:])  # (B, V, Dt)
        rows = torch.arange(batch.pos.shape[0])[:, None]
        y = pooled[rows, batch.seq_ids.clamp(min=0)]  # (B, N, Dt)
        return net(torch.cat([fractional_features(batch.pos, batch.seq_ids, freqs, slots=pooled.shape[1]), y], -1))

    print(f"\nreference: a direct MLP (fractional position, pooled text) → x0, trained at t = 1 "
          f"(mean rightward drift of its estimate for 'moving right' clips / the true latents'):")
    train = batches(args.seed + 1)
    held = list(itertools.islice(batches(args.seed + 2), 4))
    every = max(args.reference_steps // 10, 1)
    for step in range(1, args.reference_steps + 1):
        batch, captions, _ = next(train)
        text = encode(pipe.text_encoder, captions, batch, "cpu")
        err = (predict(batch, text) - batch.x).pow(2) * batch.valid
        loss = err.sum() / batch.valid.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            pairs = []
            with torch.no_grad():
                for hb, hc, hm in held:
                    est = hb.unpack(predict(hb, encode(pipe.text_encoder, hc, hb, "cpu")))
                    true = hb.unpack(hb.x)
                    pairs += [(drift(z, 2), drift(e, 2)) for m, z, e in zip(hm, true, est) if m == "right"]
            true, got = (sum(v) / len(v) for v in zip(*pairs))
            print(f"  step {step}: loss {loss.item():.3f}, drift {got:+.3f} of {true:+.3f} ({got / true:.2f})", flush=True)


if __name__ == "__main__":
    main()
