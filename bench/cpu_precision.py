"""bf16 autocast against float32 for training the toy DiT on a CPU, in one run.

    .venv/bin/python bench/cpu_precision.py            # ~40 seconds on one core
    .venv/bin/python bench/cpu_precision.py --quick    # fewer batches, for a smoke run

1. Attention within one video, forward + backward, at the token counts of toy-world clips (the
   recipe's patch): PyTorch's CPU flash kernel in float32 and in bf16, and the plain bf16 product
   that `sorakit.models.layers.video_attention` takes for short bf16 videos on a CPU.
2. Whole training steps (self-conditioned forward, backward, AdamW) of the toy recipe's DiT on
   packed rows of toy-world-shaped latents, float32 against `torch.autocast("cpu", torch.bfloat16)`
   (what `trainer.precision: bf16-mixed` runs), best of interleaved passes, in real tokens/s.

The gain depends on the CPU: bf16 matmuls are fast only with AVX512-BF16 or AMX (the flags are
printed); without them a CPU converts bf16 to float32 for its matmuls.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.packing import latent_shape, toy_mix  # noqa: E402
from sorakit.config import load_config  # noqa: E402
from sorakit.data.packing import first_fit_decreasing, num_tokens, pack, pack_text  # noqa: E402
from sorakit.models.dit import DiT, DiTConfig, dit_config  # noqa: E402
from sorakit.models.layers import video_attention  # noqa: E402
from sorakit.models.vae import VAEConfig, vae_config  # noqa: E402
from sorakit.training.common import FAST_BF16_CPU_FLAGS, cpu_flags, resolve_precision  # noqa: E402
from sorakit.training.dit import TrainDiTConfig, diffusion_loss  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "toy" / "dit.yaml"
REPEATS = 3


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def attention_times(lengths: list[int], heads: int, head_dim: int) -> None:
    print(f"1. attention within one video, forward + backward, {heads} heads of {head_dim} (ms):")
    print(f"    {'tokens':>6}  {'flash f32':>9}  {'flash bf16':>10}  {'plain bf16':>10}  {'f32 / plain':>11}")
    g = torch.Generator().manual_seed(0)
    for n in lengths:
        base = [torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3)]

        def run(fn, dtype):
            q, k, v = (x.to(dtype).requires_grad_(True) for x in base)
            return timed(lambda: fn(q, k, v).sum().backward(), max(3, 3000 // n))

        f32 = run(F.scaled_dot_product_attention, torch.float32)
        fb16 = run(F.scaled_dot_product_attention, torch.bfloat16)
        plain = run(video_attention, torch.bfloat16)
        print(f"    {n:6d}  {f32 * 1e3:9.2f}  {fb16 * 1e3:10.2f}  {plain * 1e3:10.2f}  {f32 / plain:10.2f}×")


def train_seconds(model, rows, cfg: TrainDiTConfig, bf16: bool) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dim = model.config.text_dim
    torch.manual_seed(0)
    start = time.perf_counter()
    for b in rows:
        nv = len(b.videos)
        text = pack_text(b, [torch.randn(8, dim)] * nv, torch.randn(nv, dim))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = diffusion_loss(model, b, text, cfg.diffusion)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def training_throughput(cfg: TrainDiTConfig, model_config: DiTConfig, vae: VAEConfig, num_rows: int) -> float:
    model = DiT(model_config)
    patch, budget = tuple(model_config.patch), cfg.data.max_tokens
    rng = random.Random(0)
    lat = []
    for f, h, w in toy_mix(num_rows * 8, rng):
        shape = latent_shape(f, h, w, vae)
        if num_tokens(shape, patch) <= budget:
            lat.append(torch.randn(shape))
    bins = first_fit_decreasing([num_tokens(z.shape, patch) for z in lat], budget)[:num_rows]
    rows = [pack([lat[i] for i in b], patch, budget) for b in bins]
    real = sum(r.real_tokens for r in rows)
    train_seconds(model, rows[:1], cfg, False)  # warm-up both paths
    train_seconds(model, rows[:1], cfg, True)
    best = {False: float("inf"), True: float("inf")}
    for _ in range(REPEATS):  # interleaved: other load on the machine slows both alike
        for bf16 in best:
            best[bf16] = min(best[bf16], train_seconds(model, rows, cfg, bf16))
    ratio = best[False] / best[True]
    print(f"2. training steps of the toy recipe's DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters), {len(rows)} packed rows of {budget} tokens, {real} real tokens:")
    print(f"    float32      {real / best[False]:7.0f} real tokens/s   ({best[False] / len(rows) * 1e3:.0f} ms/step)")
    print(f"    bf16 autocast {real / best[True]:6.0f} real tokens/s   ({best[True] / len(rows) * 1e3:.0f} ms/step)")
    print(f"    bf16 / float32 throughput: {ratio:.2f}×")
    return ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches (smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the toy recipe trains with 1 per process)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(TrainDiTConfig, RECIPE)
    found = ", ".join(sorted(cpu_flags() & set(FAST_BF16_CPU_FLAGS))) or "none"
    print(f"CPU flags for fast bf16: {found}; precision 'auto' on this CPU: {resolve_precision('auto', 'cpu')}; "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    vae = vae_config("toy")
    model_config = dit_config(cfg.preset, in_channels=vae.latent_channels, **cfg.model)
    attention_times([64, 200, 400, 800, 1600], model_config.heads, model_config.dim // model_config.heads)
    training_throughput(cfg, model_config, vae, 4 if args.quick else 12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
