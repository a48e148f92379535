"""`sorakit ingest`: every input format, byte-for-byte storage, cutting, bad inputs, resume after
SIGKILL, workers and nodes. Clips are real encoded files made by tests/data/clips.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from sorakit.cli import main
from sorakit.data.ingest import IngestConfig, ingest, reason_category
from sorakit.data.shards import iter_tar_samples, list_shards, read_manifest
from sorakit.data.prepare import check_video
from sorakit.media import MediaError, probe, read_video, write_video
from tests.data.clips import CODEC_CASES, EXPECTED_CODEC, frame_image, frame_index, make_broken_inputs, make_clip, matches

REPO = Path(__file__).resolve().parents[2]


def samples_of(out: Path) -> dict[str, dict]:
    """key -> {"json": dict, "mp4": bytes, "txt": str | None, "shard": name} for every sample."""
    got = {}
    for shard in list_shards(out):
        for key, m in iter_tar_samples(shard):
            assert key not in got
            got[key] = {"json": json.loads(m["json"]), "mp4": m["mp4"], "txt": m["txt"].decode() if "txt" in m else None, "shard": shard.name}
    return got


def sources_of(out: Path) -> list[str]:
    return sorted(s["json"]["source"] for s in samples_of(out).values())


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """One clip of every codec plus rotation, variable frame rate and audio, with sidecar captions."""
    d = tmp_path_factory.mktemp("clips")
    for name, (fname, opts) in CODEC_CASES.items():
        make_clip(d / fname, **opts)
    make_clip(d / "sub" / "rotated.mp4", rotation=90)
    make_clip(d / "sub" / "vfr.mkv", num_frames=5, times=[0.0, 0.1, 0.15, 0.4, 0.45])
    make_clip(d / "sub" / "with audio.mp4", audio=True)
    (d / "h264.txt").write_text("caption from a txt sidecar\n")
    (d / "vp9.json").write_text(json.dumps({"caption": "caption from a json sidecar", "other": 1}))
    return d


def test_every_codec_stored_byte_for_byte_with_metadata(clip_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["ingest", str(clip_dir), "--out", str(out), "--workers", "2", "--samples-per-shard", "4"]) == 0
    got = {Path(s["json"]["source"]).name: s for s in samples_of(out).values()}
    assert len(got) == len(CODEC_CASES) + 3
    for fname, s in got.items():
        src = next(clip_dir.rglob(fname))
        meta, data = s["json"], src.read_bytes()
        assert s["mp4"] == data  # no re-encode
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert meta["source"] == str(src)  # as given: the folder argument joined with the relative path
        info = probe(src)
        for k in ("width", "height", "num_frames", "fps", "codec"):
            assert meta[k] == getattr(info, k), (fname, k)
        assert meta["start"] == 0.0 and meta["end"] == pytest.approx(meta["duration"]) == pytest.approx(info.duration)
    for case, (fname, opts) in CODEC_CASES.items():
        assert got[fname]["json"]["codec"] == EXPECTED_CODEC[case]
    assert (got["odd 317x181.avi"]["json"]["width"], got["odd 317x181.avi"]["json"]["height"]) == (317, 181)
    assert (got["rotated.mp4"]["json"]["width"], got["rotated.mp4"]["json"]["height"]) == (48, 64)
    assert got["with audio.mp4"]["json"]["has_audio"]
    assert got["h264.mp4"]["txt"] == got["h264.mp4"]["json"]["caption"] == "caption from a txt sidecar"
    assert got["vp9.webm"]["txt"] == "caption from a json sidecar"
    assert got["mpeg4.avi"]["txt"] is None and "caption" not in got["mpeg4.avi"]["json"]
    manifest = read_manifest(out)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["totals"]["samples"] == 10 and manifest["totals"]["skipped"] == 0 and manifest["complete"]
    assert manifest["settings"]["samples_per_shard"] == 4
    assert (out / "errors.jsonl").read_text() == ""
    # The plain webdataset library reads them too.
    assert len(list(wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False))) == 10


@contextlib.contextmanager
def _unprivileged():
    """Permission bits mean nothing to root: drop to `nobody` (effective ids) while the block runs."""
    if os.geteuid() != 0:
        yield
        return
    import rich.progress  # noqa: F401  (imported now: nobody may not be able to read the venv)
    import rich.table  # noqa: F401

    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_bad_inputs_are_reported_and_never_stop_the_job(tmp_path, capsys):
    base = Path(tempfile.mkdtemp(prefix="sorakit-bad-"))  # outside pytest's private 0700 tmp
    try:
        base.chmod(0o777)
        good = make_clip(base / "in" / "gööd clip.mp4")
        expected = make_broken_inputs(base / "in", good)
        out = base / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        with _unprivileged():
            code = main(["ingest", str(base / "in"), str(base / "missing.mp4"), "--out", str(out), "--workers", "1"])
        assert code == 0
        errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
        by_name = {Path(e["source"]).name: e["reason"] for e in errors}
        assert set(by_name) == set(expected) | {"missing.mp4"}
        for name, pattern in expected.items():
            assert matches(reason_category(by_name[name]), pattern), (name, by_name[name])
        assert by_name["missing.mp4"] == "no such file or directory"
        assert [Path(s).name for s in sources_of(out)] == ["gööd clip.mp4"]
        m = read_manifest(out)["totals"]
        assert (m["inputs"], m["ingested"], m["skipped"]) == (len(expected) + 2, 1, len(expected) + 1)
        report = capsys.readouterr().err
        for text in ("skipped", "truncated", "dangling symlink", "audio only", "permission denied"):
            assert text in report
        # Nothing usable at all: non-zero exit status.
        assert main(["ingest", str(base / "in" / "zero bytes.mp4"), "--out", str(base / "out2")]) == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("name,opts", [
    ("index-first.mp4", None),  # written by sorakit.media.write_video: faststart, index before the data
    ("vp9.webm", dict(codec="libvpx-vp9")),
    ("mpeg4.avi", dict(codec="mpeg4")),
    ("mjpeg.mkv", dict(codec="mjpeg", pix_fmt="yuvj420p")),
    ("h264.ts", dict(codec="libx264")),  # no sizes to walk: the packets are checked instead
])
def test_truncation_is_found_in_every_container(tmp_path, name, opts):
    path = tmp_path / name
    if opts is None:
        write_video(path, np.stack([frame_image(i, 64, 48) for i in range(24)]), 12)
    else:
        make_clip(path, num_frames=24, **opts)
    info, container = check_video(str(path))
    assert info.num_frames == 24 and container
    if name.endswith(".ts"):
        return  # MPEG-TS is a stream: a shorter one is still a valid one
    data = path.read_bytes()
    for keep in (0.6, 0.95, 0.999):
        cut = tmp_path / f"cut-{keep}-{name}"
        cut.write_bytes(data[: int(len(data) * keep)])
        with pytest.raises(MediaError, match="truncated|not a video|cannot decode"):
            check_video(str(cut))


def test_csv_and_list_inputs_captions_and_dedup(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    a = make_clip(d / "clip a.mp4")
    make_clip(d / "b.webm", codec="libvpx-vp9", size=(48, 64))
    (d / "clip a.txt").write_text("sidecar caption loses to the csv")
    shutil.copy(a, d / "copy of a.mp4")
    (d / "list.txt").write_text("# my clips\nb.webm\n\ncopy of a.mp4\n")
    csv = d / "meta.csv"
    csv.write_text('path,text,aesthetic\nclip a.mp4,"a grey frame, from the csv",5.1\nnope.mp4,missing,1\n')
    out = tmp_path / "out"
    result = ingest([str(csv), str(d / "list.txt")], out, IngestConfig(workers=1))
    assert result.exit_code == 0
    got = {s["json"]["source"]: s for s in samples_of(out).values()}
    assert set(got) == {"clip a.mp4", "b.webm"}  # sources exactly as written in the csv and list
    assert got["clip a.mp4"]["txt"] == "a grey frame, from the csv"
    assert got["b.webm"]["json"]["width"] == 48 and got["b.webm"]["txt"] is None
    errors = {e["source"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors == {"nope.mp4": "no such file", "copy of a.mp4": "duplicate (same sha256 as clip a.mp4)"}
    assert read_manifest(out)["totals"]["by_reason"] == {"no such file": 1, "duplicate": 1}


def test_max_seconds_cuts_equal_clips_reencoded(tmp_path):
    src = make_clip(tmp_path / "in" / "long.mp4", num_frames=9, fps=3)  # 3 s
    short = make_clip(tmp_path / "in" / "short.mp4", num_frames=2, fps=3)
    out = tmp_path / "out"
    assert main(["ingest", str(tmp_path / "in"), "--out", str(out), "--max-seconds", "1.4", "--workers", "1"]) == 0
    got = sorted(samples_of(out).values(), key=lambda s: (s["json"]["source"], s["json"]["start"]))
    cut = [s for s in got if s["json"]["source"].endswith("long.mp4")]
    assert [(s["json"]["start"], s["json"]["end"], s["json"]["num_frames"]) for s in cut] == [(0.0, 1.0, 3), (1.0, 2.0, 3), (2.0, 3.0, 3)]
    frames = [frame_index(f, 9) for s in cut for f in read_video(s["mp4"])]
    assert frames == list(range(9))  # every frame once, in order, no resizing
    for s in cut:
        assert s["json"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        assert probe(s["mp4"]).width == 64 and s["json"]["codec"] == "h264" and s["json"]["duration"] <= 1.4
    whole = [s for s in got if s["json"]["source"].endswith("short.mp4")]
    assert len(whole) == 1 and whole[0]["mp4"] == short.read_bytes()


def test_scene_split_cuts_at_hard_changes_only(tmp_path, toy_world):
    moving = read_video(sorted(toy_world.glob("*.mp4"))[0])  # a toy clip: one shot, an object moving
    w, h = 64, 48
    shot_a = [frame_image(0, w, h)] * 10
    shot_b = [np.full((h, w, 3), (200, 40, 40), np.uint8)] * 8
    make_clip(tmp_path / "in" / "two shots.mp4", frames=shot_a + shot_b, fps=12)
    one = tmp_path / "in" / "one shot.mp4"
    one.write_bytes(sorted(toy_world.glob("*.mp4"))[0].read_bytes())
    out = tmp_path / "out"
    result = ingest([str(tmp_path / "in")], out, IngestConfig(scene_split=True, workers=1))
    assert result.exit_code == 0
    got = sorted(samples_of(out).values(), key=lambda s: (s["json"]["source"], s["json"]["start"]))
    two = [s for s in got if "two shots" in s["json"]["source"]]
    assert [s["json"]["num_frames"] for s in two] == [10, 8]
    assert two[1]["json"]["start"] == pytest.approx(10 / 12)
    assert read_video(two[1]["mp4"])[0, 0, 0].tolist() == pytest.approx([200, 40, 40], abs=6)
    single = [s for s in got if "one shot" in s["json"]["source"]]
    assert len(single) == 1 and single[0]["mp4"] == one.read_bytes() and len(moving) == single[0]["json"]["num_frames"]


def test_shard_size_limits(tmp_path, toy_world):
    out = tmp_path / "out"
    files = sorted(toy_world.glob("*.mp4"))
    limit = max(p.stat().st_size for p in files) + 2000
    result = ingest([str(toy_world)], out, IngestConfig(samples_per_shard=100, max_shard_bytes=limit, workers=1))
    m = result.manifest
    assert m["totals"]["samples"] == len(files) and len(m["shards"]) > 1
    for shard in m["shards"]:
        sources = [json.loads(x["json"])["source"] for _, x in iter_tar_samples(out / shard["name"])]
        assert sum(Path(s).stat().st_size for s in sources) <= limit


def _contents(out: Path) -> dict[str, list[str]]:
    return {p.name: [json.loads(m["json"])["source"] for _, m in iter_tar_samples(p)] for p in list_shards(out)}


def test_workers_and_nodes_partition_deterministically(tmp_path, toy_world, monkeypatch):
    inputs = [str(toy_world)]
    one, two = tmp_path / "w1", tmp_path / "w2"
    ingest(inputs, one, IngestConfig(samples_per_shard=3, workers=1))
    ingest(inputs, two, IngestConfig(samples_per_shard=3, workers=2))
    assert _contents(one) == _contents(two)  # the same shards whatever the number of workers
    nodes = tmp_path / "nodes"
    first = ingest(inputs, nodes, IngestConfig(samples_per_shard=2, workers=1, num_nodes=2, node_rank=0))
    assert not first.manifest["complete"] and first.manifest["nodes"]["finished"] == [0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["ingest", str(toy_world), "--out", str(nodes), "--samples-per-shard", "2", "--workers", "1"]) == 0
    manifest = read_manifest(nodes)
    assert manifest["complete"] and manifest["nodes"] == {"num_nodes": 2, "finished": [0, 1]}
    parts = _contents(nodes)
    by_node = {r: [n for n in parts if int(n[6:12]) % 2 == r] for r in (0, 1)}
    assert by_node[0] and by_node[1]  # both nodes wrote shards, with disjoint names
    assert sorted(s for v in parts.values() for s in v) == sorted(s for v in _contents(one).values() for s in v)
    assert manifest["totals"]["samples"] == 8 and manifest["totals"]["inputs"] == 8


def test_usage_errors_exit_2(tmp_path, toy_world):
    out = str(tmp_path / "out")
    assert main(["ingest", str(toy_world)]) == 2  # no --out
    assert main(["ingest", str(toy_world), "--out", out, "--samples-per-shard", "0"]) == 2
    assert main(["ingest", str(toy_world), "--out", out, "--num-nodes", "2", "--node-rank", "2"]) == 2
    assert main(["ingest", str(toy_world), "--out", out, "--max-shard-bytes", "lots"]) == 2
    assert main(["ingest", str(toy_world), "--out", out, "--workers", "1"]) == 0
    assert main(["ingest", str(toy_world), "--out", out]) == 2  # already there: needs --resume
    assert main(["ingest", str(toy_world), "--out", out, "--resume", "--samples-per-shard", "3"]) == 2
    assert main(["ingest", str(toy_world), str(toy_world), "--out", out, "--resume"]) == 2  # other inputs
    assert main(["ingest", str(toy_world), "--out", out, "--resume"]) == 0  # nothing left to do


def _complete_tars(out: Path) -> None:
    for p in out.glob("shard-*.tar"):
        with tarfile.open(p) as tf:
            assert tf.getmembers()


def test_resume_after_sigkill_holds_every_input_exactly_once(tmp_path):
    src = tmp_path / "in"
    for i in range(16):
        make_clip(src / f"clip {i:02d}.mp4", frames=[frame_image(i + k, 96, 64) for k in range(12)], fps=6)
    out = tmp_path / "out"
    args = ["ingest", str(src), "--out", str(out), "--samples-per-shard", "2", "--max-seconds", "1", "--workers", "2"]
    code = "import sys; from sorakit.cli.app import app; import sorakit.cli.data; app(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = out / ".ingest" / "done"
    for attempt, (extra, wait_for) in enumerate([([], 1), (["--resume"], 4)]):
        proc = subprocess.Popen([sys.executable, "-c", code, *args, *extra], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and len(list(done.glob("*.json"))) < wait_for:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as a machine crash would
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:  # until the last worker is gone
                os.killpg(proc.pid, 0)
                time.sleep(0.01)
        assert 0 < len(list(done.glob("*.json"))) < 16, "the kill should land part way through"
        _complete_tars(out)  # whatever is under a final name is a whole tar
    assert main(args + ["--resume"]) == 0
    expected = sorted(str(p) for p in src.glob("*.mp4"))
    clips = sorted((s["json"]["source"], s["json"]["start"]) for s in samples_of(out).values())
    assert sorted({c[0] for c in clips}) == expected
    assert len(set(clips)) == len(clips) == 2 * len(expected)  # each input once, cut in two
    manifest = read_manifest(out)
    assert manifest["totals"]["samples"] == len(clips) and manifest["complete"]
    # Inputs are weighed by the clips they will make: 2 clips each, so one input per 2-sample shard.
    assert len(manifest["shards"]) == 16 and {s["count"] for s in manifest["shards"]} == {2}
    assert not list(out.glob(".*.tmp"))


def test_toyworld_cli_feeds_ingest(tmp_path):
    toy = tmp_path / "toy"
    assert main(["toyworld", str(toy), "--num-clips", "3", "--seed", "5", "--split", "heldout"]) == 0
    assert main(["toyworld", str(toy), "--split", "bogus"]) == 2
    assert main(["ingest", str(toy), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    got = samples_of(tmp_path / "out")
    assert len(got) == 3 and all(s["txt"] == s["json"]["caption"] for s in got.values())
