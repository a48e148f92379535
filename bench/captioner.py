"""Throughput of `sorakit caption` (clips/s) beside its limits measured in the same run.

    python bench/captioner.py [--model DIR] [--shards DIR] [--clips 256] [--beams 1] [--batch-size 16]

* caption: the whole job (`caption_shards`: read shards, decode the frames it needs, letterbox,
  encode, decode text, write new shards) in clips/s.
* decode limit: reading and preparing the same clips' frames alone (no model), same threads.
* model limit: the model alone (video encoder + greedy/beam text decoding) on already prepared clips.

The job can be no faster than either limit; the ratios show which one bounds it. Without `--model`
a randomly initialised toy-preset captioner is used with captions cut at the toy captions' length
(a trained model stops there by itself); without `--shards` toy-world shards are made in a scratch dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sorakit.data.captioning import CaptionSettings, caption_shards, iter_prepared  # noqa: E402
from sorakit.data.shards import list_shards, write_tar_atomic  # noqa: E402

TOY_CAPTION_TOKENS = 11  # "a red circle moving left on a black background" + end token


def make_shards(root: Path, clips: int) -> Path:
    from sorakit.data.toyworld import make_toyworld

    paths = make_toyworld(root / "clips", clips, seed=123, split="heldout")
    samples = []
    for p in paths:
        meta = json.loads(p.with_suffix(".json").read_text())
        samples.append((p.stem.replace("-", "_"), {"mp4": p.read_bytes(), "json": meta, "txt": meta["caption"]}))
    for i in range(0, len(samples), 64):
        write_tar_atomic(root / "shards" / f"shard-{i // 64:06d}.tar", samples[i : i + 64])
    return root / "shards"


def random_model(root: Path) -> Path:
    from sorakit.data.toyworld import BACKGROUNDS, COLORS, MOTIONS, SHAPES, caption
    from sorakit.models.captioner import build_captioner
    from sorakit.models.io import save_pretrained
    from sorakit.models.text_encoder import CaptionTokenizer

    texts = [caption(c, s, m, b) for c in COLORS for s in SHAPES for m in MOTIONS for b in BACKGROUNDS]
    torch.manual_seed(0)
    return save_pretrained(build_captioner("toy", {"text": {"vocab": CaptionTokenizer.build_vocab(texts)}}).eval(),
                           root / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="trained captioner dir (default: random toy-preset model)")
    ap.add_argument("--shards", type=Path, help="shards to caption (default: toy-world shards made here)")
    ap.add_argument("--clips", type=int, default=256, help="clips to make when --shards is not given")
    ap.add_argument("--beams", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="decoding threads")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="sorakit-bench-caption-"))
    try:
        shards = args.shards or make_shards(scratch, args.clips)
        model_dir = args.model or random_model(scratch)
        max_len = None if args.model else TOY_CAPTION_TOKENS
        settings = CaptionSettings(beams=args.beams, batch_size=args.batch_size, workers=args.workers,
                                   max_len=max_len, device="cpu")

        from sorakit.data.captioning import load_captioner
        from sorakit.models.captioner import DecodeOptions, caption_clips

        model = load_captioner(model_dir, "cpu")
        n_frames, size = model.config.num_frames, model.config.vision.image_size

        t = time.perf_counter()
        prepared = [p.frames for s in list_shards(shards)
                    for b in iter_prepared(s, n_frames, size, batch_size=args.batch_size, workers=args.workers)
                    for p in b if p.frames is not None]
        decode_s = time.perf_counter() - t
        n = len(prepared)

        opts = DecodeOptions(num_beams=args.beams, max_len=max_len)
        t = time.perf_counter()
        for i in range(0, n, args.batch_size):
            caption_clips(model, torch.stack(prepared[i : i + args.batch_size]), opts)
        model_s = time.perf_counter() - t

        summary = caption_shards(shards, model_dir, scratch / "out", settings)
        job = summary["clips_per_s"]
        dec, mod = n / decode_s, n / model_s
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
              f"torch threads {torch.get_num_threads()}, beams {args.beams}, batch {args.batch_size}, {n} clips")
        print(f"caption job     {job:8.1f} clips/s")
        print(f"decode limit    {dec:8.1f} clips/s   job/decode = {job / dec:.2f}")
        print(f"model limit     {mod:8.1f} clips/s   job/model  = {job / mod:.2f}")
        print(f"both in series  {1 / (1 / dec + 1 / mod):8.1f} clips/s   job/series = {job * (1 / dec + 1 / mod):.2f}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
