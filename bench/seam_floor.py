"""The seam a perfect generator would leave: the true continuation of each clip, through the VAE.

    python bench/seam_floor.py --model runs/demo/pipeline [--joins 8] [--feather 0,8]

Extension keeps the input frames and decodes the new ones, so even a DiT that generated exactly
the clip's own latents would meet the VAE's reconstruction error at the join. For the same clips
`sorakit eval toyworld --joins N` draws, this splices the real first half to the VAE's
reconstruction of the second half (forward) and the reconstruction of the first half to the real
second half (backward), and scores the seam ratio with and without feathering (the baseline, 0, in
the same run). Also reported: the new part's PSNR against the real frames, which feathering must not
lower by much.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="pipeline directory (its VAE is used)")
    ap.add_argument("--joins", type=int, default=8, help="clips, drawn as `sorakit eval toyworld --joins` draws them")
    ap.add_argument("--feather", default="0,8", help="comma-separated feather lengths in frames; 0 is the baseline")
    ap.add_argument("--eval-seed", type=int, default=0)
    args = ap.parse_args(argv)

    from sorakit.generation import toyscore
    from sorakit.generation.evaluate import draw_join_clips, encoded_clip, training_sizes
    from sorakit.generation.modes import feather_new_frames, feather_weights
    from sorakit.generation.outputs import load_model
    from sorakit.generation.refine import psnr

    pipe = load_model(args.model)
    feathers = [int(f) for f in args.feather.split(",")]
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for spec in draw_join_clips(args.joins, args.eval_seed, training_sizes(pipe, None)):
        clip = encoded_clip(spec)
        half = len(clip) // 2
        rec = pipe.vae.decode_video(pipe.vae.encode_video(clip), *clip.shape[:3])
        for f in feathers:
            fwd = feather_new_frames(rec[half:], [(clip[half - 1], rec[half - 1], feather_weights(len(clip) - half, f))])
            bwd = feather_new_frames(rec[:half], [(clip[half], rec[half], feather_weights(half, f)[::-1])])
            for name, frames, new, truth in (("forward", np.concatenate([clip[:half], fwd]), fwd, clip[half:]),
                                             ("backward", np.concatenate([bwd, clip[half:]]), bwd, clip[:half])):
                rows.setdefault((name, f), []).append((toyscore.seam_ratio(frames, [half]), psnr(new, truth)))
    print(f"{args.model}: {args.joins} clips, the true continuation decoded by the VAE")
    print("| direction | feather (frames) | seam ratio, mean | within 1.5 | new part PSNR (dB) |")
    print("|---|---:|---:|---:|---:|")
    for (name, f), vals in rows.items():
        seams = [s for s, _ in vals]
        print(f"| {name} | {f} | {statistics.fmean(seams):.2f} | {sum(s <= 1.5 for s in seams) / len(seams):.0%} | "
              f"{statistics.fmean(p for _, p in vals):.2f} |")


if __name__ == "__main__":
    main()
