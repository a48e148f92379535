"""Cron-safe batches: reruns only do what is missing, a second run is locked out, failures are
recorded while the rest is done, and a run killed mid-batch leaves nothing duplicated or half-written."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sorakit.generation import batch
from sorakit.generation.modes import GenerationConfig, Generated
from sorakit.media import probe
from sorakit.utils.fs import read_jsonl
from tests.generation.tiny_pipeline import make_tiny_pipeline

CFG = GenerationConfig(steps=2)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def _counting_generator(calls: list):
    """A stand-in model for the batch plumbing: a real (small) video per job, failing on request."""

    def make():
        calls.append("loaded")

        def run(job, cfg: GenerationConfig) -> Generated:
            if "explode" in job.prompt:
                raise RuntimeError("the model ran out of memory")
            calls.append(job.prompt)
            frames = np.full((3, 8, 10, 3), 10 * len(calls), np.uint8)
            return Generated(frames, 8.0, {"prompt": job.prompt, "seed": cfg.seed, "size": {"width": 10, "height": 8, "frames": 3}})

        return run

    return make


def _ok_lines(out: Path) -> list[dict]:
    return [e for e in read_jsonl(out / batch.MANIFEST) if e["status"] == "ok"]


def test_a_rerun_only_does_what_is_missing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# nightly prompts\na red circle\n\na <b>blue</b> square\na red circle\n")
    out = tmp_path / "out"
    calls: list = []
    first = batch.run_batch(prompts, out, CFG, _counting_generator(calls), model="/m")
    assert (first.ok, first.skipped, first.failed, first.exit_code) == (2, 0, 0, 0)
    assert calls == ["loaded", "a red circle", "a <b>blue</b> square"]  # the repeated line is one job
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2 and all(v.with_suffix(".json").is_file() and v.with_suffix(".png").is_file() for v in videos)
    gallery = (out / batch.GALLERY).read_text()
    assert "a &lt;b&gt;blue&lt;/b&gt; square" in gallery and gallery.count("<figure>") == 2

    calls.clear()
    again = batch.run_batch(prompts, out, CFG, _counting_generator(calls), model="/m")
    assert (again.ok, again.skipped) == (0, 2) and calls == []  # the model is not even loaded
    assert len(_ok_lines(out)) == 2 and sorted(out.glob("*.mp4")) == videos

    other_seed = batch.run_batch(prompts, out, CFG.replace(seed=1), _counting_generator(calls), model="/m")
    assert other_seed.ok == 2 and len(list(out.glob("*.mp4"))) == 4  # new settings, new jobs


def test_a_new_setting_at_its_default_keeps_the_done_jobs_done():
    """An upgrade that adds a generation setting must not redo a nightly batch that is already done."""

    @dataclasses.dataclass
    class Upgraded(GenerationConfig):
        new_knob: bool = False

    job = batch.Job("a red circle", "p.txt:1")
    assert batch.job_key(job, Upgraded(steps=2), "/m") == batch.job_key(job, CFG, "/m")
    assert batch.job_key(job, Upgraded(steps=2, new_knob=True), "/m") != batch.job_key(job, CFG, "/m")


def test_failures_are_recorded_and_the_rest_is_done(tmp_path, tiny):
    from PIL import Image

    Image.fromarray(np.full((12, 14, 3), 200, np.uint8)).save(tmp_path / "first.png")
    lines = [
        {"prompt": "a red circle moving left on a black background", "width": 16, "height": 12, "frames": 3, "seed": 5},
        {"prompt": "a block", "image": "first.png", "frames": 3},
        {"prompt": "a ghost", "image": "missing.png"},
        {"prompt": "a cat", "colour": "red"},
        {"prompt": "a dog", "frames": "many"},
        {"prompt": "a fox", "frames": -3},
    ]
    prompts = tmp_path / "jobs.jsonl"
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    out = tmp_path / "out"
    result = batch.sample_batch(tiny, prompts, out, CFG)
    assert (result.ok, result.failed, result.exit_code) == (2, 5, 1)
    errors = {e["line"]: e["error"] for e in read_jsonl(out / batch.ERRORS)}
    assert "missing.png: no such image" in errors[f"{prompts}:3"]
    assert "unknown key 'colour'" in errors[f"{prompts}:4"]
    assert "frames must be int" in errors[f"{prompts}:5"]
    assert "frames must be at least 1" in errors[f"{prompts}:6"]
    assert "not valid JSON" in errors[f"{prompts}:7"]
    sides = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert sorted(s["mode"] for s in sides) == ["image-to-video", "text-to-video"]
    t2v = next(s for s in sides if s["mode"] == "text-to-video")
    assert (t2v["seed"], t2v["size"]["width"], t2v["size"]["frames"], t2v["job_line"]) == (5, 16, 3, f"{prompts}:1")
    assert "failed" in (out / batch.GALLERY).read_text()

    rerun = batch.sample_batch(tiny, prompts, out, CFG)
    assert (rerun.ok, rerun.skipped, rerun.failed) == (0, 2, 5)  # failures are retried, successes kept


def test_a_second_concurrent_run_is_turned_away(tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sorakit.utils.fs import exclusive_lock\n"
         f"with exclusive_lock({str(out / batch.LOCK)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(batch.BatchLocked, match=rf"pid {holder.pid}\) is writing here"):
            batch.run_batch(prompts, out, CFG, _counting_generator([]), model="/m")
        assert sorted(p.name for p in out.iterdir()) == [batch.LOCK]  # nothing was touched
    finally:
        holder.kill()
        holder.wait()
    assert batch.run_batch(prompts, out, CFG, _counting_generator([]), model="/m").ok == 1  # the lock died with it


def test_killed_mid_batch_then_rerun_leaves_every_video_once(tmp_path, tiny):
    prompts = tmp_path / "p.txt"
    texts = [f"a {c} square moving right on a white background" for c in ("red", "green", "blue", "yellow")]
    prompts.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    args = ["sample", "--prompts", str(prompts), "--out-dir", str(out), "--model", str(tiny), "--steps", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "sorakit", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / batch.MANIFEST).is_file():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # as hard as it gets: no handler, no cleanup
    proc.wait()
    done_before = len(_ok_lines(out))
    assert done_before < len(texts), "the batch finished before it could be killed"
    (out / ".planted.mp4.x1y2.tmp").write_bytes(b"half a video")  # what a kill mid-write leaves

    from sorakit.cli import main

    assert main(args) == 0
    ok = _ok_lines(out)
    assert sorted(e["prompt"] for e in ok) == sorted(texts)  # each job recorded once
    assert len({e["key"] for e in ok}) == len(texts)
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == len(texts)
    for v in videos:
        assert probe(v).num_frames == 5 and v.with_suffix(".json").is_file() and v.with_suffix(".png").is_file()
    assert not list(out.glob(".*.tmp"))
    assert (out / batch.GALLERY).read_text().count("<figure>") == len(texts)
