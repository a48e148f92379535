"""Which words of a toy-world caption does a trained DiT use? Its x0 error with one attribute swapped.

    python bench/word_use.py --model runs/demo/pipeline --latents runs/demo/latents [--num 48] [--given first]

For `--num` toy-world latents whose caption names a motion, each noised at fixed times t (no
resolution shift, one noise draw shared by every caption), the DiT predicts x0 from the true
caption and from the caption with one attribute changed (colour, shape, motion to its opposite,
motion to "standing still", background) or with no caption at all. The table gives each mean
squared x0 error as a ratio to the true caption's, the baseline in the same run: 1.00 means the
model does not use that word, the empty caption's ratio is what the whole caption is worth.

`--given first` gives the first latent frame clean, as image-to-video does. The object's start is
then known, and with the motion word its whole path: a model that reads the motion word gains most here.

`--paths` says which way each word reaches the DiT: the swap applied to the text tokens only (the
cross-attention's keys and values, pooled vector kept) and to the pooled vector only (the adaLN
conditioning and the co-moving velocity, text tokens kept).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

import torch

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swaps(caption: str) -> dict[str, str]:
    """The caption with one attribute changed, per attribute (toy-world captions, `toyworld.md`)."""
    from sorakit.data.toyworld import BACKGROUNDS, COLORS, SHAPES, parse_caption

    attrs = parse_caption(caption)
    if attrs is None or attrs["motion"] not in OPPOSITE:
        raise ValueError(f"not a toy-world caption with a motion: {caption!r}")

    def changed(key: str, choices) -> str:
        names = list(choices)
        new = names[(names.index(attrs[key]) + 1) % len(names)]
        return re.sub(rf"\b{attrs[key]}\b", new, caption, count=1)

    return {
        "colour": changed("color", COLORS),
        "shape": changed("shape", SHAPES),
        "motion: opposite": caption.replace(f"moving {attrs['motion']}", f"moving {OPPOSITE[attrs['motion']]}"),
        "motion: still": caption.replace(f"moving {attrs['motion']}", "standing still"),
        "background": changed("background", BACKGROUNDS),
        "no caption": "",
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline directory")
    ap.add_argument("--latents", required=True, help="toy-world latent shards made with the pipeline's VAE")
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--times", default="0.3,0.5,0.7,0.85,0.95")
    ap.add_argument("--given", choices=("none", "first"), default="none")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paths", action="store_true", help="also swap each word in the text tokens only and in the pooled vector only")
    args = ap.parse_args(argv)

    from sorakit.data.latents import latent_pipeline
    from sorakit.data.packing import pack
    from sorakit.data.toyworld import parse_caption
    from sorakit.diffusion import alpha_sigma, to_x0_eps
    from sorakit.generation.pipeline import load_pipeline
    from sorakit.generation.sampling import encode_text
    from sorakit.training.dit import noisy_inputs

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model)
    dit, cfg = pipe.dit.eval(), pipe.diffusion_cfg
    moving = (s for s in latent_pipeline(args.latents) if (parse_caption(s["caption"] or "") or {}).get("motion") in OPPOSITE)
    samples = list(itertools.islice(moving, args.num))
    if not samples:
        sys.exit(f"{args.latents}: no toy-world captions with a motion")
    given = None
    if args.given == "first":
        given = [torch.arange(s["latent"].shape[1]) == 0 for s in samples]
    batch = pack([s["latent"] for s in samples], dit.patch, given_frames=given)
    captions = [s["caption"] for s in samples]
    variants = {"true": captions}
    for per_caption in (swaps(c) for c in captions):
        for name, text in per_caption.items():
            variants.setdefault(name, []).append(text)
    texts = {name: encode_text(pipe.text_encoder, v, batch, "cpu") for name, v in variants.items()}
    if args.paths:
        ctx, ids, pooled = texts["true"]
        for name in ("colour", "shape", "motion: opposite", "background"):
            s_ctx, s_ids, s_pooled = texts[name]
            if torch.equal(s_ids, ids):  # a swap that keeps every caption's token count
                texts[f"{name}, tokens only"] = (s_ctx, ids, pooled)
                texts[f"{name}, pooled only"] = (ctx, ids, s_pooled)
    x0, valid = batch.x, batch.valid.float()
    scored = valid * (~batch.given).float()  # given tokens are the input, not a prediction

    print(f"{args.model}: {len(samples)} moving clips, first latent frame given: {args.given == 'first'}; "
          "x0 error (mean square per value) with the true caption, and each variant's as a ratio to it")
    print("| t | true | " + " | ".join(n for n in texts if n != "true") + " |")
    print("|---:" * len(texts) + "|---:|")
    for t in (float(v) for v in args.times.split(",")):
        a, s = alpha_sigma(torch.full((len(samples),), t), cfg)
        alpha, sigma = batch.per_token(a)[..., None], batch.per_token(s)[..., None]
        x_t, t_tok, token_given = noisy_inputs(batch, alpha, sigma, torch.randn_like(x0))  # as training feeds them
        err = {}
        for name, text in texts.items():
            with torch.no_grad():
                pred = dit(x_t, t_tok, batch.pos, batch.seq_ids, *text, token_given)
            x0_hat = to_x0_eps(pred.float(), x_t, alpha, sigma, cfg.parametrisation)[0]
            err[name] = float(((x0_hat - x0) * scored).pow(2).sum() / scored.sum())
        print(f"| {t:.2f} | {err['true']:.4f} | " + " | ".join(f"{err[n] / err['true']:.3f}" for n in texts if n != "true") + " |")


if __name__ == "__main__":
    main()
