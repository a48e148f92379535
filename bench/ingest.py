"""Ingest throughput beside its limits measured in the same run, and memory against input length.

    python bench/ingest.py [--clips 16] [--seconds 8] [--size 1280x720] [--workers 2] [--repeats 3] [--scratch DIR]

* No-cut path (clips stored byte for byte) vs the byte-read limit: reading the same files from
  storage (the faster of 1 and --workers processes). The page cache is emptied for the files
  (posix_fadvise DONTNEED) before every measurement, so both read from storage. Target: >= 0.8x.
  Also vs the copy limit: reading the bytes and writing them durably (fsync), as shards are.
* Cut path (`--max-seconds 1`: decode, cut, re-encode with x264) vs decoding the same clips with
  PyAV alone, same number of processes.
* Peak memory (RSS) of ingesting one short and one 4x longer input, without and with cutting,
  each in a fresh process: it must not grow with the input's length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sorakit.data.ingest import IngestConfig, ingest  # noqa: E402
from sorakit.media import iter_frames, write_video  # noqa: E402

FPS = 24
CUT_CLIPS = 4  # clips used for the (slow) cut path
CUT_SECONDS = 1.0


def _frames(seed: int, seconds: float, size: tuple[int, int]):
    """Textured, moving content (an encoder has real work, the file a realistic bitrate)."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
    for t in range(int(seconds * FPS)):
        wave = (127 + 100 * np.sin((xx + 4 * t) / 17.0) * np.cos((yy - 3 * t) / 23.0)).astype(np.uint8)
        img = base // 2 + wave[..., None] // 2
        img[(t * 5) % (h - 40) : (t * 5) % (h - 40) + 40, 40:120] = 255
        yield np.roll(img, t * 3, axis=1)


def _make(args) -> str:
    path, seed, seconds, size = args
    size = tuple(size)
    if not Path(path).exists():
        write_video(path, _frames(seed, seconds, size), FPS, crf=16, preset="ultrafast")
    return path


def make_corpus(d: Path, n: int, seconds: float, size: tuple[int, int], workers: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    jobs = [(str(d / f"clip-{i:04d}.mp4"), i, seconds, size) for i in range(n)]
    with ProcessPoolExecutor(workers) as pool:
        return [Path(p) for p in pool.map(_make, jobs)]


def evict(paths) -> None:
    """Drop these files' pages from the page cache, so the next read comes from storage."""
    for p in paths:
        for f in [p] if Path(p).is_file() else Path(p).rglob("*"):
            if Path(f).is_file():
                fd = os.open(f, os.O_RDONLY)
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def _read_all(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


def _copy_all(paths: list[str]) -> int:
    """Read the files and write them, durably, into one output file: the least any ingest that
    keeps the bytes must do (a shard is written the same way: temp file, fsync, rename)."""
    out = Path(paths[0]).parent.parent / f"copy-{os.getpid()}.bin"
    n = 0
    with open(out, "wb") as dst:
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    n += dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    out.unlink()
    return n


def _decode_all(paths: list[str]) -> int:
    return sum(1 for p in paths for _ in iter_frames(p))


def parallel(fn, paths: list[Path], workers: int) -> float:
    """Seconds to run fn over the paths split between `workers` processes."""
    parts = [[str(p) for p in paths[i::workers]] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(len, [[0]] * workers))  # start the workers before the clock
        t = time.perf_counter()
        list(pool.map(fn, parts))
        return time.perf_counter() - t


def best(measure, repeats: int) -> float:
    return min(measure() for _ in range(repeats))


def time_ingest(paths: list[Path], out: Path, cfg: IngestConfig) -> float:
    shutil.rmtree(out, ignore_errors=True)
    evict(paths)
    t = time.perf_counter()
    result = ingest([str(p) for p in paths], out, cfg)
    dt = time.perf_counter() - t
    assert result.exit_code == 0 and not result.manifest["totals"]["skipped"], result.manifest["totals"]
    return dt


_PEAK = """
import json, resource, sys
from sorakit.data.ingest import IngestConfig, ingest
cfg = IngestConfig(workers=1, max_seconds=float(sys.argv[3]) if sys.argv[3] != "none" else None)
r = ingest([sys.argv[1]], sys.argv[2], cfg)
assert r.exit_code == 0
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "samples": r.node_samples}))
"""


def peak_memory(src: Path, out: Path, max_seconds: float | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(out), str(max_seconds or "none")],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the corpus clips")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-seconds", type=float, default=20.0, help="length of the short input of the memory test (the long one is 4x)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sorakit-bench-ingest"))
    a = ap.parse_args(argv)
    w = a.workers
    size = tuple(int(x) for x in a.size.split("x"))
    corpus = make_corpus(a.scratch / f"corpus-{a.clips}x{a.seconds:g}s-{a.size}", a.clips, a.seconds, size, w)
    total = sum(p.stat().st_size for p in corpus)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"corpus: {len(corpus)} H.264 clips {a.size} {a.seconds:g}s @ {FPS} fps, {total / 1e6:.1f} MB; best of {a.repeats}")

    def read_limit(k: int) -> float:
        evict(corpus)
        return parallel(_read_all, corpus, k)

    t_read = min(best(lambda: read_limit(1), a.repeats), best(lambda: read_limit(w), a.repeats))
    t_copy = best(lambda: (evict(corpus), parallel(_copy_all, corpus, w))[1], a.repeats)
    out = a.scratch / "out"
    # Shards of about a worker's share each, as with real shard sizes (1000 samples).
    per_shard = max(1, len(corpus) // w)
    t_ing = best(lambda: time_ingest(corpus, out, IngestConfig(workers=w, samples_per_shard=per_shard)), a.repeats)
    print("\nno-cut path (byte for byte)")
    print(f"  byte-read limit (read the same bytes)      : {total / t_read / 1e6:8.1f} MB/s  {len(corpus) / t_read:6.1f} clips/s")
    print(f"  copy limit (read + write + fsync them)     : {total / t_copy / 1e6:8.1f} MB/s  {len(corpus) / t_copy:6.1f} clips/s")
    print(f"  ingest -j {w} (probe, check, hash, copy)     : {total / t_ing / 1e6:8.1f} MB/s  {len(corpus) / t_ing:6.1f} clips/s")
    ratio = t_read / t_ing
    verdict = "met" if ratio >= 0.8 else "MISSED"
    print(f"  ratio: {ratio:.2f}x of the byte-read limit (target >= 0.80: {verdict}), {t_copy / t_ing:.2f}x of the copy limit")

    sub = corpus[:CUT_CLIPS]
    sub_bytes = sum(p.stat().st_size for p in sub)
    t_dec = best(lambda: (evict(sub), parallel(_decode_all, sub, w))[1], a.repeats)
    cfg = IngestConfig(workers=w, samples_per_shard=max(1, len(sub) // w), max_seconds=CUT_SECONDS)
    t_cut = best(lambda: time_ingest(sub, out, cfg), max(1, a.repeats - 1))
    n_frames = int(a.seconds * FPS) * len(sub)
    print(f"\ncut path (--max-seconds {CUT_SECONDS:g}: decode, cut, re-encode crf {cfg.crf} preset {cfg.preset}), {len(sub)} clips")
    print(f"  PyAV decode-only limit : {n_frames / t_dec:8.1f} frames/s  {sub_bytes / t_dec / 1e6:6.1f} MB/s")
    print(f"  ingest -j {w}            : {n_frames / t_cut:8.1f} frames/s  {sub_bytes / t_cut / 1e6:6.1f} MB/s  {len(sub) * a.seconds / CUT_SECONDS / t_cut:.1f} clips/s out")
    print(f"  ratio                  : {t_dec / t_cut:.2f}x of decode-only (the rest is x264 encoding)")

    print("\npeak memory (one input, --workers 1, fresh process each)")
    long_dir = a.scratch / "long"
    lengths = (a.long_seconds, 4 * a.long_seconds)
    long_dir.mkdir(parents=True, exist_ok=True)
    longs = [Path(_make((str(long_dir / f"long-{s:g}s.mp4"), 7, s, (320, 180)))) for s in lengths]
    for label, cut in (("no cut", None), ("--max-seconds 2", 2.0)):
        peaks = [peak_memory(p, a.scratch / "mem-out", cut)["peak_mb"] for p in longs]
        growth = peaks[1] / peaks[0]
        verdict = "flat" if growth < 1.1 else "GROWS"
        print(f"  {label:16s}: {lengths[0]:g} s input {peaks[0]:6.1f} MB, {lengths[1]:g} s input {peaks[1]:6.1f} MB -> {growth:.2f}x for 4x the length ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
