"""What a cascade saves: generating directly at high resolution and frame rate vs base model + refiner.

    python bench/refiner.py [--steps 20] [--refine-steps 20] [--repeats 2]

1. Analytic: token counts, attention FLOPs (4·N²·D per layer) and all FLOPs (+ 24·N·D² per layer for
   the projections and MLP) per video, for the toy presets at a toy size and the base presets at
   1280×720, 4 s. Direct = the DiT at the target size with classifier-free guidance (2 passes per
   step); cascade = the DiT at 1/s the size and 1/r the frame rate + a refiner at the target size
   (no guidance: its content is fixed by the low-res video; attention inside its local windows).
2. Measured on this CPU with the toy presets (random weights: speed depends on the architecture
   only): seconds per sampling step of each network at those sizes, and per video. The baseline,
   direct generation, is measured in the same run; the cascade's time is printed as a ratio to it.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sorakit.data.packing import grid_positions, num_tokens, pack, pack_text, token_grid  # noqa: E402
from sorakit.models.dit import build_dit, dit_config  # noqa: E402
from sorakit.models.refiner import build_refiner, refiner_config, window_layout  # noqa: E402
from sorakit.models.vae import vae_config  # noqa: E402

# (name, VAE preset, DiT preset, refiner preset + overrides, target (frames, height, width), scales (s, r))
SETTINGS = [
    ("toy", "toy", "toy", ("toy", {}), (33, 128, 128), (2, 2)),
    ("base", "base", "base", ("base", {}), (97, 720, 1280), (2, 2)),
    ("base, refiner without windows", "base", "base", ("base", {"attn_window": None}), (97, 720, 1280), (2, 2)),
]


def latent_of(vae_preset: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    c = vae_config(vae_preset)
    return (1 + math.ceil((frames - 1) / c.temporal_factor), math.ceil(height / c.spatial_factor),
            math.ceil(width / c.spatial_factor))


def attended_pairs(grid: tuple[int, int, int], window) -> float:
    """Σ n² over the attention groups of one video of `grid` tokens, averaged over the plain and
    shifted window layouts (the whole video when `window` is None)."""
    if window is None:
        return float(math.prod(grid)) ** 2
    pos = grid_positions(grid)[None]
    ids = torch.zeros(pos.shape[:2], dtype=torch.long)
    total = 0.0
    for shift in (False, True):
        _, groups = window_layout(pos, ids, tuple(window), shift)
        total += float((torch.bincount(groups[0]).double() ** 2).sum())
    return total / 2


def flops(grid: tuple[int, int, int], dim: int, depth: int, passes: int, steps: int, window=None) -> tuple[float, float]:
    """(attention FLOPs, all FLOPs) of a sampling run over a video of `grid` tokens."""
    attn = 4.0 * attended_pairs(grid, window) * dim * depth
    dense = 24.0 * math.prod(grid) * dim**2 * depth
    return attn * passes * steps, (attn + dense) * passes * steps


def plan(setting, steps: int, refine_steps: int) -> dict:
    name, vae_p, dit_p, ref_p, (t, h, w), (s, r) = setting
    dcfg, rcfg = dit_config(dit_p), refiner_config(ref_p[0], **ref_p[1])
    hi = latent_of(vae_p, t, h, w)
    lo = latent_of(vae_p, 1 + (t - 1) // r, h // s, w // s)
    n_hi_dit = num_tokens(hi, dcfg.patch)
    n_lo_dit = num_tokens(lo, dcfg.patch)
    n_hi_ref = num_tokens(hi, rcfg.patch)
    direct = flops(token_grid(hi, dcfg.patch), dcfg.dim, dcfg.depth, 2, steps)
    base = flops(token_grid(lo, dcfg.patch), dcfg.dim, dcfg.depth, 2, steps)
    ref = flops(token_grid(hi, rcfg.patch), rcfg.dim, rcfg.depth, 1, refine_steps, rcfg.attn_window)
    return {"name": name, "target": (t, h, w), "scales": (s, r), "hi": hi, "lo": lo,
            "tokens": {"direct": n_hi_dit, "base": n_lo_dit, "refiner": n_hi_ref},
            "attn": {"direct": direct[0], "base": base[0], "refiner": ref[0]},
            "all": {"direct": direct[1], "base": base[1], "refiner": ref[1]}}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure(p: dict, repeats: int) -> dict:
    torch.manual_seed(0)
    dit, ref = build_dit("toy").eval(), build_refiner("toy").eval()
    ref_full = build_refiner("toy", attn_window=None).eval()
    c = dit.config.in_channels

    def dit_step(latent):
        batch = pack([torch.randn(c, *latent)] * 2, dit.patch, max_tokens=2 * num_tokens(latent, dit.patch))  # CFG: 2 passes
        text = [torch.randn(12, dit.config.text_dim)] * 2
        ctx, ctx_ids, pooled = pack_text(batch, text, torch.randn(2, dit.config.text_dim))
        t = torch.full(batch.seq_ids.shape, 0.5)
        return lambda: dit(batch.x, t, batch.pos, batch.seq_ids, ctx, ctx_ids, pooled)

    def ref_step(model, latent):
        batch = pack([torch.randn(c, *latent)], model.patch)
        t = torch.full(batch.seq_ids.shape, 0.5)
        return lambda: model(batch.x, batch.x, t, torch.zeros_like(t), batch.pos, batch.seq_ids)

    return {"direct": _time(dit_step(p["hi"]), repeats), "base": _time(dit_step(p["lo"]), repeats),
            "refiner": _time(ref_step(ref, p["hi"]), repeats), "refiner_full": _time(ref_step(ref_full, p["hi"]), repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="DiT sampling steps")
    ap.add_argument("--refine-steps", type=int, default=20, help="refiner sampling steps")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"DiT {args.steps} steps with guidance (2 passes each); refiner {args.refine_steps} steps, no guidance\n")
    plans = [plan(s, args.steps, args.refine_steps) for s in SETTINGS]
    print("| setting | target T×H×W | latent hi / lo | tokens direct | tokens base | tokens refiner "
          "| attention FLOPs direct | base + refiner | ratio | all FLOPs direct | base + refiner | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in plans:
        a, f, n = p["attn"], p["all"], p["tokens"]
        ca, cf = a["base"] + a["refiner"], f["base"] + f["refiner"]
        print(f"| {p['name']} ({p['scales'][0]}× space, {p['scales'][1]}× time) | {'×'.join(map(str, p['target']))} "
              f"| {'×'.join(map(str, p['hi']))} / {'×'.join(map(str, p['lo']))} | {n['direct']} | {n['base']} | {n['refiner']} "
              f"| {a['direct']:.3g} | {a['base']:.3g} + {a['refiner']:.3g} | {ca / a['direct']:.2f} "
              f"| {f['direct']:.3g} | {f['base']:.3g} + {f['refiner']:.3g} | {cf / f['direct']:.2f} |")
    toy = plans[0]
    m = measure(toy, args.repeats)
    direct = args.steps * m["direct"]
    cascade = args.steps * m["base"] + args.refine_steps * m["refiner"]
    print(f"\nmeasured, toy presets at {'×'.join(map(str, toy['target']))} (s per network call):")
    print("| network | tokens | s/step | s/video |")
    print("|---|---|---|---|")
    print(f"| DiT direct (×2 for guidance) | {toy['tokens']['direct']} | {m['direct']:.3f} | {direct:.2f} |")
    print(f"| DiT base (×2 for guidance) | {toy['tokens']['base']} | {m['base']:.3f} | {args.steps * m['base']:.2f} |")
    print(f"| refiner (local windows) | {toy['tokens']['refiner']} | {m['refiner']:.3f} | {args.refine_steps * m['refiner']:.2f} |")
    print(f"| refiner (whole-video attention) | {toy['tokens']['refiner']} | {m['refiner_full']:.3f} "
          f"| {args.refine_steps * m['refiner_full']:.2f} |")
    print(f"\ncost per video without refiner (direct at the target size): {direct:.2f} s")
    print(f"cost per video with refiner (base at 1/{toy['scales'][0]} size, 1/{toy['scales'][1]} rate + refiner): "
          f"{cascade:.2f} s = {cascade / direct:.2f}× direct")
    print(f"base video alone (what the refiner adds to): {args.steps * m['base']:.2f} s")


if __name__ == "__main__":
    main()
