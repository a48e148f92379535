"""VAE memory against video length, and throughput, beside the one-pass baseline measured in the same run.

    python bench/vae.py [--preset toy] [--size 192x192] [--short 16] [--long 128] [--threads 1]

* Peak memory (RSS) of `decode_video` on a short and a long video of the same size, each in a fresh
  process: chunked decoding with a causal cache must not grow with the length (target: ratio <= 1.3).
  The baseline is the one-pass `decode` of the same latents (no chunks, no cache), whose memory grows
  with the number of frames; the same for encoding.
* Throughput in frames/s of `encode_video` and `decode_video` on the long video.

Weights are random: memory and speed do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_RUN = r"""
import json, resource, sys, time
import numpy as np, torch
threads, preset, mode, t, h, w = sys.argv[1:]
t, h, w = int(t), int(h), int(w)
if int(threads):
    torch.set_num_threads(int(threads))
from sorakit.models.vae import VAE, vae_config
torch.manual_seed(0)
vae = VAE(vae_config(preset)).eval()
shape = vae.latent_shape(t, h, w)
z = torch.randn(shape)
frames = np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
with torch.inference_mode():
    if mode == "decode_video":
        out = vae.decode_video(z, t, h, w)
    elif mode == "encode_video":
        out = vae.encode_video(frames)
    elif mode == "decode_one_pass":
        out = vae.decode(z[None])
    else:
        tf = vae.temporal_factor  # one pass takes 1 + k·t frames: the longest such prefix
        x = torch.from_numpy(frames[: 1 + (t - 1) // tf * tf]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        out = vae.encode(x).mean
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": peak, "before_mb": base, "seconds": seconds, "frames": t}))
"""


def run(args, mode: str, t: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _RUN, str(args.threads), args.preset, mode, str(t), str(args.h), str(args.w)],
        capture_output=True, text=True, env=env,
    )
    if res.returncode != 0:
        raise SystemExit(f"{mode} {t} frames failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy", help="VAE preset (sorakit.models.vae.VAE_PRESETS)")
    ap.add_argument("--size", default="192x192", help="WIDTHxHEIGHT of the frames")
    ap.add_argument("--short", type=int, default=16, help="frames of the short video")
    ap.add_argument("--long", type=int, default=128, help="frames of the long video")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    args.w, args.h = (int(v) for v in args.size.lower().split("x"))

    print(f"# VAE preset {args.preset}, {args.w}x{args.h}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, threads={args.threads or 'default'}")
    results = {}
    for mode in ("decode_video", "decode_one_pass", "encode_video", "encode_one_pass"):
        short, long = run(args, mode, args.short), run(args, mode, args.long)
        results[mode] = {"short": short, "long": long, "ratio": long["peak_mb"] / short["peak_mb"]}
        grow = (long["peak_mb"] - long["before_mb"]) / max(1.0, short["peak_mb"] - short["before_mb"])
        print(f"{mode:16s} peak RSS {args.short:4d} frames {short['peak_mb']:8.1f} MB | {args.long:4d} frames "
              f"{long['peak_mb']:8.1f} MB | ratio {results[mode]['ratio']:.2f} (working set x{grow:.1f}) | "
              f"{args.long / long['seconds']:.1f} frames/s")
    ok = results["decode_video"]["ratio"] <= 1.3
    print(f"chunked decode peak-RSS ratio {args.long}/{args.short} frames: {results['decode_video']['ratio']:.2f} "
          f"(target <= 1.3: {'PASS' if ok else 'FAIL'}); one-pass baseline ratio {results['decode_one_pass']['ratio']:.2f}")
    print(f"throughput at {args.w}x{args.h}: encode_video {args.long / results['encode_video']['long']['seconds']:.1f} frames/s, "
          f"decode_video {args.long / results['decode_video']['long']['seconds']:.1f} frames/s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
