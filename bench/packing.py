"""Patch n' pack vs padding vs resolution buckets, on two shape mixes, in one run.

    .venv/bin/python bench/packing.py            # ~5 minutes on 2 CPU cores
    .venv/bin/python bench/packing.py --quick    # smaller samples, for a smoke run

Mixes: the toy world (sizes/lengths from `sorakit.data.toyworld`, toy VAE 4×4×2, toy DiT patch)
and a realistic one (256–1280 px sides, aspect 1:2–2:1, 1–128 frames, base VAE 4×8×8, base patch).

1. Token utilisation with a budget of `max_tokens` per step (real tokens / tokens computed) and the
   share of each video's native-resolution tokens that is trained on:
   packed (first-fit-decreasing over a pool of 64, as the training loader does), padded to the
   longest video of a batch (batches of the same video count as packed ones), and resolution
   buckets (Open-Sora style: each video is resized/cut down to the largest bucket it covers, batches
   are one bucket, batch size = budget // bucket tokens). Videos longer than a row are cut to a
   window of whole frames in every scheme.
2. Training throughput (forward + backward + AdamW step of a DiT) in real tokens/s, packed vs padded,
   over the same videos, so equal real tokens. The realistic mix is scaled down in every dimension
   (sides ÷ 4, so tokens ÷ 16, budget ÷ 16) to run on a CPU; its shape distribution is unchanged.
   Best of two interleaved passes each. Packed rows use the `segments` attention back end (the CPU
   default), padded batches dense SDPA with their padding masked (what a padded trainer does).
3. Attention time of the packed row holding the most videos: flex_attention compiled (skips masked
   blocks) vs dense masked SDPA vs one SDPA per video ("segments"), forward only: on a CPU,
   flex_attention has no backward. There is no GPU on the machine these numbers come from.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sorakit.data import toyworld  # noqa: E402
from sorakit.data.packing import (  # noqa: E402
    first_fit_decreasing,
    num_tokens,
    pack,
    pack_text,
    select_fullest,
    token_grid,
)
from sorakit.diffusion import DiffusionConfig  # noqa: E402
from sorakit.models.dit import build_dit, dit_config  # noqa: E402
from sorakit.models.layers import flex, packed_attention_mask  # noqa: E402
from sorakit.models.vae import vae_config  # noqa: E402
from sorakit.training.dit import diffusion_loss  # noqa: E402

POOL = 64  # the training loader's default pool_size
# Tokens per row for the realistic mix: a 64k-token row per GPU (flex_attention makes its cost the sum
# of per-video squares); with 32k rows, 38% of these videos are longer than a row and the whole-frame
# windows cut from them leave gaps (97.3% utilisation).
REAL_BUDGET = 65536
REPEATS = 2


def latent_shape(frames: int, height: int, width: int, vae) -> tuple[int, int, int, int]:
    t, f = vae.temporal_factor, vae.spatial_factor
    return (vae.latent_channels, 1 + math.ceil((frames - 1) / t), math.ceil(height / f), math.ceil(width / f))


def toy_mix(n: int, rng: random.Random) -> list[tuple[int, int, int]]:
    """(frames, height, width) of toy-world clips, drawn by `toyworld.sample_spec`."""
    g = np.random.default_rng(rng.randrange(2**32))
    out = []
    for _ in range(n):
        spec = toyworld.sample_spec(g)
        out.append((spec.num_frames, spec.height, spec.width))
    return out


def realistic_mix(n: int, rng: random.Random, scale: float = 1.0) -> list[tuple[int, int, int]]:
    out = []
    for _ in range(n):
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # width / height
        long_side = rng.uniform(256, 1280)
        w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
        h, w = max(256, h), max(256, w)
        out.append((rng.randint(1, 128), int(h * scale), int(w * scale)))
    return out


def fit(shape: tuple[int, int, int, int], patch, max_tokens: int) -> tuple[int, int, int, int]:
    """The window of whole temporal patches that fits a row (what the loader does to long videos)."""
    nt, nh, nw = token_grid(shape, patch)
    steps = min(nt, max_tokens // (nh * nw))
    return (shape[0], min(shape[1], steps * patch[0]), shape[2], shape[3])


# --------------------------------------------------------------------------------------------
# 1. Utilisation
# --------------------------------------------------------------------------------------------


def packed_utilisation(lengths: list[int], max_tokens: int) -> tuple[float, float]:
    """The training loader's policy on a stream: keep a pool of POOL videos, emit its fullest
    first-fit-decreasing row each time the pool is full, drain the pool at the end."""
    pool: list[int] = []
    real = cap = 0
    per_row = []

    def emit() -> None:
        nonlocal real, cap
        chosen = select_fullest(pool, max_tokens, 1)[0]
        real += sum(pool[i] for i in chosen)
        cap += max_tokens
        per_row.append(len(chosen))
        for i in sorted(chosen, reverse=True):
            pool.pop(i)

    for n in lengths:
        pool.append(n)
        if len(pool) >= POOL:
            emit()
    while pool:
        emit()
    return real / cap, statistics.mean(per_row)


def padded_utilisation(lengths: list[int], batch: int) -> float:
    real = cap = 0
    for i in range(0, len(lengths), batch):
        chunk = lengths[i : i + batch]
        real += sum(chunk)
        cap += len(chunk) * max(chunk)
    return real / cap


def bucket_utilisation(shapes, patch, max_tokens: int, sides: list[int], frames: list[int], vae) -> tuple[float, float]:
    """Open-Sora-style buckets: (short side, aspect, frames); videos shrink into the largest covered bucket."""
    aspects = [0.5, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0]  # width / height
    groups: dict[tuple, int] = {}
    kept = native = 0
    for f, h, w in shapes:
        native_tokens = num_tokens(fit(latent_shape(f, h, w, vae), patch, max_tokens), patch)
        a = min(aspects, key=lambda x: abs(math.log(x) - math.log(w / h)))
        side = max([s for s in sides if s <= min(h, w)] or [min(sides)])
        bf = max([x for x in frames if x <= f] or [1])
        bh, bw = (side, side * a) if a >= 1 else (side / a, side)
        tokens = num_tokens(fit(latent_shape(bf, int(bh), int(bw), vae), patch, max_tokens), patch)
        groups[(side, a, bf)] = groups.get((side, a, bf), 0) + tokens
        kept += min(tokens, native_tokens)
        native += native_tokens
    # Each bucket's batches hold budget // tokens videos; the tail batch of a bucket is partial.
    real = cap = 0
    for (side, a, bf), total in groups.items():
        bh, bw = (side, side * a) if a >= 1 else (side / a, side)
        tok = num_tokens(fit(latent_shape(bf, int(bh), int(bw), vae), patch, max_tokens), patch)
        per = max(1, max_tokens // tok)
        count = total // tok
        real += total
        cap += math.ceil(count / per) * max(max_tokens, tok)
    return real / cap, kept / native


# --------------------------------------------------------------------------------------------
# 2. Throughput and 3. attention time
# --------------------------------------------------------------------------------------------


def train_time(model, batches, cfg: DiffusionConfig) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text_dim = model.config.text_dim
    start = time.perf_counter()
    for b in batches:
        nv = len(b.videos)
        text = pack_text(b, [torch.zeros(8, text_dim)] * nv, torch.zeros(nv, text_dim))
        loss, _ = diffusion_loss(model, b, text, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def throughput(name, shapes, patch, max_tokens, model_kw, vae, seconds_hint: str) -> float:
    lat = [torch.randn(fit(latent_shape(f, h, w, vae), patch, max_tokens)) for f, h, w in shapes]
    lengths = [num_tokens(z.shape, patch) for z in lat]
    bins = first_fit_decreasing(lengths, max_tokens)
    packed = [pack([lat[i] for i in b], patch, max_tokens, pad_to_capacity=True) for b in bins]
    per = max(1, round(len(lat) / len(bins)))
    padded = []  # one video per row, rows padded to the batch's longest video
    for i in range(0, len(lat), per):
        group = lat[i : i + per]
        longest = max(num_tokens(z.shape, patch) for z in group)
        padded.append(pack(group, patch, longest, pad_to_capacity=True))
    real = sum(lengths)
    cfg = DiffusionConfig()
    models = {}
    for label, backend in [("packed", "segments"), ("padded", "dense")]:
        torch.manual_seed(0)
        models[label] = build_dit("toy", attn_backend=backend, **model_kw)
    results = {"packed": float("inf"), "padded": float("inf")}
    runs = {"packed": packed, "padded": padded}
    train_time(models["packed"], packed[:1], cfg)  # warm-up
    train_time(models["padded"], padded[:1], cfg)
    for _ in range(REPEATS):  # interleaved, best of: other jobs on the machine slow both alike
        for label in ("packed", "padded"):
            results[label] = min(results[label], train_time(models[label], runs[label], cfg))
    util_packed = real / sum(b.capacity for b in packed)
    util_padded = real / sum(b.capacity for b in padded)
    ratio = results["padded"] / results["packed"]
    print(f"  {name}: {len(lat)} videos, {real} real tokens; packed {len(packed)} rows × {max_tokens} "
          f"(util {util_packed:.1%}), padded {len(padded)} batches of {per} (util {util_padded:.1%})")
    print(f"    packed  {real / results['packed']:9.0f} real tokens/s   ({results['packed']:.1f} s)")
    print(f"    padded  {real / results['padded']:9.0f} real tokens/s   ({results['padded']:.1f} s)")
    print(f"    packed / padded throughput: {ratio:.2f}×  {seconds_hint}")
    return ratio


def attention_time(name, shapes, patch, max_tokens, vae, heads=6, head_dim=32, repeats=3) -> None:
    lat = [torch.zeros(fit(latent_shape(f, h, w, vae), patch, max_tokens)) for f, h, w in shapes]
    lengths = [num_tokens(z.shape, patch) for z in lat]
    bins = first_fit_decreasing(lengths, max_tokens)
    fullest = max(bins, key=lambda b: (len(b), sum(lengths[i] for i in b)))  # the row with most videos
    row = pack([lat[i] for i in fullest], patch, max_tokens, pad_to_capacity=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, max_tokens, head_dim, generator=g) for _ in range(3))
    times = {}
    for backend in ("dense", "segments", "flex"):
        mask = packed_attention_mask(row.seq_ids, backend)
        if backend == "flex":
            run = lambda: flex(q, k, v, mask.block_mask, compiled=True)  # noqa: E731
        else:
            from sorakit.models.layers import attention

            run = lambda: attention(q, k, v, mask)  # noqa: E731
        run()  # warm-up (flex: compilation)
        t = time.perf_counter()
        for _ in range(repeats):
            out = run()
        times[backend] = (time.perf_counter() - t) / repeats
        if backend == "dense":
            ref = out
        else:
            assert torch.allclose(out[:, :, : row.real_tokens], ref[:, :, : row.real_tokens], atol=1e-4), backend
    sq = sum(lengths[i] ** 2 for i in fullest)
    print(f"  {name}: one row of {max_tokens} tokens holding {len(fullest)} videos "
          f"(sum of per-video squares = {sq / max_tokens**2:.1%} of the row's square)")
    for b, t in times.items():
        print(f"    {b:9s} {t * 1000:8.1f} ms   ({times['dense'] / t:.2f}× dense)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller samples (smoke run)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared CPU a second OpenMP thread mostly spin-waits)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    n_util = 500 if args.quick else 4000
    toy_vae, base_vae = vae_config("toy"), vae_config("base")
    toy_patch, base_patch = tuple(dit_config("toy").patch), tuple(dit_config("base").patch)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else "GPU")

    print("\n1. token utilisation (real tokens / computed), and native tokens kept")
    mixes = {
        "toy": (toy_mix(n_util, rng), toy_patch, toy_vae, 2048, [48, 64, 96, 128], [8, 16, 32, 64]),
        "realistic": (realistic_mix(n_util, rng), base_patch, base_vae, REAL_BUDGET, [256, 360, 480, 720, 1080],
                      [1, 16, 32, 64, 128]),
    }
    packed_util = {}
    for name, (shapes, patch, vae, budget, sides, frames) in mixes.items():
        lengths = [num_tokens(fit(latent_shape(f, h, w, vae), patch, budget), patch) for f, h, w in shapes]
        u_pack, per_batch = packed_utilisation(lengths, budget)
        u_pad = padded_utilisation(lengths, max(1, round(per_batch)))
        u_buck, kept = bucket_utilisation(shapes, patch, budget, sides, frames, vae)
        packed_util[name] = u_pack
        print(f"  {name} ({len(shapes)} videos, budget {budget} tokens/row, patch {patch}, "
              f"median {int(statistics.median(lengths))} tokens/video):")
        print(f"    packed              {u_pack:7.1%}   native kept 100.0%   ({per_batch:.1f} videos/row)")
        print(f"    padded-to-longest   {u_pad:7.1%}   native kept 100.0%   (batches of {round(per_batch)})")
        print(f"    resolution buckets  {u_buck:7.1%}   native kept {kept:6.1%}")

    print("\n2. training throughput at equal real tokens (forward + backward + AdamW)")
    n_train = 8 if args.quick else 40
    trng = random.Random(1)
    toy_kw = dict(in_channels=toy_vae.latent_channels, text_dim=64, dim=128, depth=4, heads=4)
    r_toy = throughput("toy", toy_mix(n_train, trng), toy_patch, 2048, toy_kw, toy_vae, "")
    scale = 0.25
    real_kw = dict(in_channels=base_vae.latent_channels, text_dim=64, patch=base_patch, dim=128, depth=4, heads=4)
    r_real = throughput("realistic ÷4 per side", realistic_mix(n_train, trng, scale), base_patch, REAL_BUDGET // 16,
                        real_kw, base_vae, "")

    print("\n3. attention time of one packed row (forward; CPU: flex_attention has no backward here)")
    arng = random.Random(2)
    attention_time("toy", toy_mix(64, arng), toy_patch, 2048, toy_vae)
    attention_time("realistic ÷4 per side", realistic_mix(64, arng, scale), base_patch, REAL_BUDGET // 16, base_vae)

    print("\nsummary")
    print(f"  packed utilisation: toy {packed_util['toy']:.1%}, realistic {packed_util['realistic']:.1%} (target ≥ 98%)")
    print(f"  packed / padded throughput: toy {r_toy:.2f}×, realistic {r_real:.2f}× (target ≥ 1.5× on realistic)")
    ok = min(packed_util.values()) >= 0.98 and r_real >= 1.5
    print("  targets met" if ok else "  TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
