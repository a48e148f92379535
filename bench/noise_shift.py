"""Where along the noise path a clip's layout becomes visible, for a choice of the resolution shift.

    python bench/noise_shift.py --latents runs/demo/latents --shift-scales 1,4 [--num 40]

A denoiser can only place the object once the object stands out of the noise in x_t. For each
latent, the signal of one latent frame is its squared deviation from the clip's background (the
per-channel median), summed over the frame; its visibility at time t is that signal × SNR(t) under
the configured path and the clip's own shift (`shift_factor`). A visibility of about 10 or more
(log of the number of places the object could be, times a margin) means the position can be read
from x_t alone, so the layout is chosen at the times where visibility crosses from ~1 to ~10.
The table gives the median and the 10th percentile over the clips, per t and shift scale, with the
diffusion settings of a DiT recipe (default: recipes/toy/dit.yaml).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", required=True, help="latent shards (`sorakit encode` output)")
    ap.add_argument("--recipe", default=str(REPO / "recipes/toy/dit.yaml"), help="DiT recipe whose diffusion settings to use")
    ap.add_argument("--shift-scales", default="1,4", help="comma-separated shift_scale values to compare")
    ap.add_argument("--times", default="0.5,0.6,0.7,0.8,0.85,0.9,0.93,0.95,0.97")
    ap.add_argument("--num", type=int, default=40)
    args = ap.parse_args(argv)

    from sorakit.config import load_config
    from sorakit.data.latents import latent_pipeline
    from sorakit.diffusion import alpha_sigma, shift_factor
    from sorakit.training.dit import TrainDiTConfig

    base = load_config(TrainDiTConfig, args.recipe).diffusion
    times = torch.tensor([float(t) for t in args.times.split(",")])
    scales = [float(s) for s in args.shift_scales.split(",")]
    signals = []  # (latent positions, per-frame object signal)
    for sample in itertools.islice(latent_pipeline(args.latents, shuffle=0, resampled=False), args.num):
        z = sample["latent"].float()  # (C, T', H', W')
        background = z.flatten(1).median(dim=1).values[:, None, None, None]
        per_frame = ((z - background) ** 2).sum(dim=(0, 2, 3)).mean().item()
        signals.append((z[0].numel(), per_frame))
    if not signals:
        sys.exit(f"{args.latents}: no latents")
    print(f"{len(signals)} clips; median per-frame object signal {statistics.median(s for _, s in signals):.0f}, "
          f"median latent positions {statistics.median(n for n, _ in signals):.0f}; "
          f"path {base.schedule}, zero-terminal-SNR {base.zero_terminal_snr}, shift_base_tokens {base.shift_base_tokens}")
    print("visibility = per-frame signal x SNR(t), median / 10th percentile over clips")
    print("t      " + "".join(f"| shift_scale {s:<4g} " for s in scales))
    positions = torch.tensor([float(n) for n, _ in signals])
    signal = torch.tensor([s for _, s in signals])
    for t in times.tolist():
        cells = []
        for s in scales:
            cfg = dataclasses.replace(base, shift_scale=s)
            a, sg = alpha_sigma(torch.full_like(positions, t), cfg, shift_factor(positions, cfg))  # per clip
            vis = sorted((signal * (a / sg.clamp(min=1e-12)) ** 2).tolist())
            cells.append(f"| {statistics.median(vis):7.2f} / {vis[len(vis) // 10]:6.2f} ")
        print(f"{t:<6.2f} " + "".join(cells))


if __name__ == "__main__":
    main()
