"""Generation speed on this machine: time per video and per sampling step, and how a step scales with tokens.

    flock /tmp/sorakit-heavy.lock python bench/generation.py [--model PIPELINE_DIR] [--steps 20] [--threads 1,2]

Without --model the toy presets (DiT "toy", VAE "toy", text encoder "toy") are built with random
weights: speed depends on the architecture, not on what the weights learned.

* Per step: the DiT sampling steps of one video at each size from the smallest toy-world clip to
  the largest, timed between the sampler's callbacks (text encoding and packing excluded); the
  fastest step is kept, since other processes on a shared machine only ever add time. Baseline:
  the smallest size, in the same run; each row gives its tokens and step time as ratios to it and
  the exponent log(time ratio) / log(token ratio) (1 linear, 2 quadratic).
* Per video: `text_to_video` end to end (text, every step, VAE decode) at --steps, at a typical
  toy size, and the VAE decode alone at each size.
* Threads: everything runs once per torch thread count in --threads. On a small machine that other
  jobs share, one thread can be several times faster than two: a parallel region waits for its
  slowest thread, and a thread that lost its core to another process stalls every operation.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sorakit.generation.modes import GenerationConfig, plan_size, text_to_video  # noqa: E402

PROMPT = "a red circle moving left on a black background"
# (width, height, frames): the toy world's smallest and largest clips and sizes between
SIZES = [(48, 48, 8), (64, 48, 17), (96, 64, 17), (128, 96, 33), (160, 160, 64)]
TYPICAL = (96, 64, 17)
TIMED_STEPS = 6  # steps timed per size (the fastest is kept)


def toy_pipeline(root: Path) -> Path:
    import torch

    from sorakit.diffusion import DiffusionConfig
    from sorakit.generation.pipeline import export_pipeline
    from sorakit.models.dit import build_dit
    from sorakit.models.io import save_pretrained
    from sorakit.models.text_encoder import build_text_encoder
    from sorakit.models.vae import VAE, vae_config

    torch.manual_seed(0)
    vae = save_pretrained(VAE(vae_config("toy")), root / "vae")
    text = save_pretrained(build_text_encoder("toy"), root / "text")
    return export_pipeline(root / "pipeline", build_dit("toy"), DiffusionConfig(), vae, text)


def step_seconds(pipe, latent: tuple[int, int, int], cfg: GenerationConfig) -> float:
    from sorakit.generation.sampling import generate_latents

    stamps = [time.perf_counter()]
    generate_latents(pipe.dit, pipe.diffusion_cfg, pipe.text_encoder, [PROMPT], [latent], guidance=cfg.guidance,
                     steps=TIMED_STEPS + 1, sampler=cfg.sampler, callback=lambda *_: stamps.append(time.perf_counter()))
    return min(b - a for a, b in zip(stamps[1:-1], stamps[2:]))  # steps 2..n: no set-up inside


def run(pipe, cfg: GenerationConfig, steps: int) -> None:
    import torch

    print(f"{'size WxHxT':>14} {'tokens':>7} {'s/step':>8} {'tokens x':>9} {'step x':>7} {'exponent':>8} {'VAE decode s':>12}",
          flush=True)
    base = None
    for w, h, t in SIZES:
        plan = plan_size(pipe, w, h, t)
        step = step_seconds(pipe, plan.latent, cfg)
        z = torch.zeros(pipe.vae.latent_channels, *plan.latent)
        decode = float("inf")
        for _ in range(2):  # the faster of two
            start = time.perf_counter()
            pipe.vae.decode_video(z, t, h, w)
            decode = min(decode, time.perf_counter() - start)
        base = base or (plan.tokens, step)
        tr, sr = plan.tokens / base[0], step / base[1]
        exponent = f"{math.log(sr) / math.log(tr):8.2f}" if tr > 1 else f"{'-':>8}"
        print(f"{f'{w}x{h}x{t}':>14} {plan.tokens:>7} {step:>8.3f} {tr:>9.1f} {sr:>7.1f} {exponent} {decode:>12.2f}",
              flush=True)
    w, h, t = TYPICAL
    g = text_to_video(pipe, PROMPT, cfg.replace(width=w, height=h, frames=t, steps=steps))
    tm = g.record["timing"]
    print(f"one {w}x{h}x{t} video, {steps} {g.record['settings']['sampler']} steps: {tm['seconds']:.1f} s "
          f"({tm['sampling_seconds']:.1f} s sampling, {tm['seconds'] - tm['sampling_seconds']:.1f} s text + VAE decode)",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="pipeline directory (default: random toy presets)")
    ap.add_argument("--steps", type=int, default=GenerationConfig.steps, help="steps of the end-to-end video")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to run with, comma-separated")
    args = ap.parse_args()

    import torch

    from sorakit.generation.outputs import load_model

    with tempfile.TemporaryDirectory() as tmp:
        pipe = load_model(args.model or toy_pipeline(Path(tmp)))
        cfg = GenerationConfig()
        print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
              f"model: {args.model or 'toy presets, random weights'}; guidance {cfg.guidance} (2 network passes per step)",
              flush=True)
        step_seconds(pipe, (2, 4, 4), cfg)  # warm-up
        for threads in [int(v) for v in args.threads.split(",")]:
            torch.set_num_threads(threads)
            print(f"\n## {threads} thread(s)", flush=True)
            run(pipe, cfg, args.steps)


if __name__ == "__main__":
    main()
