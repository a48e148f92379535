"""The shard reader: native-size clips, frame sampling, node/worker splitting, shuffling, bad samples."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest

from sorakit.data.reader import clip_pipeline
from sorakit.data.shards import iter_tar_samples, list_shards, shard_name, write_tar_atomic
from sorakit.media import read_video
from tests.data.clips import frame_index, make_clip


def _raw(toy_shards) -> dict[str, dict]:
    return {k: m for shard in list_shards(toy_shards) for k, m in iter_tar_samples(shard)}


def test_yields_every_clip_at_native_size_with_caption(toy_shards):
    raw = _raw(toy_shards)
    got = {s["key"]: s for s in clip_pipeline(toy_shards)}
    assert set(got) == set(raw)
    sizes = set()
    for key, s in got.items():
        meta = json.loads(raw[key]["json"])
        assert s["frames"].dtype == np.uint8
        assert s["frames"].shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        assert s["caption"] == raw[key]["txt"].decode() == meta["caption"]
        assert s["meta"]["source"] == meta["source"] and s["meta"]["clip_fps"] == meta["fps"]
        sizes.add((meta["width"], meta["height"]))
    assert len(sizes) > 1  # nothing was resized to a common shape


def test_frame_windows_stride_and_fps(toy_shards):
    raw = _raw(toy_shards)
    key, members = max(raw.items(), key=lambda kv: json.loads(kv[1]["json"])["num_frames"])
    full = read_video(members["mp4"])
    n = len(full)
    pick = lambda pipe: next(s for s in pipe if s["key"] == key)  # noqa: E731
    first = pick(clip_pipeline(toy_shards, num_frames=4, random_window=False))
    assert np.array_equal(first["frames"], full[:4]) and first["meta"]["clip_start"] == 0.0
    strided = pick(clip_pipeline(toy_shards, num_frames=3, stride=2, random_window=False))
    assert np.array_equal(strided["frames"], full[0:6:2])
    starts = set()
    for seed in range(6):
        s = pick(clip_pipeline(toy_shards, num_frames=4, seed=seed))
        assert s["frames"].shape[0] == 4
        # A random window is 4 consecutive source frames.
        offset = next(i for i in range(n - 3) if np.array_equal(full[i], s["frames"][0]))
        assert np.array_equal(full[offset : offset + 4], s["frames"])
        starts.add(offset)
    assert len(starts) > 1
    fps = json.loads(members["json"])["fps"]
    half = pick(clip_pipeline(toy_shards, fps=fps / 2))
    assert abs(half["frames"].shape[0] - n / 2) <= 1 and half["meta"]["clip_fps"] == fps / 2


def test_short_clips_skipped_and_spatial_options(toy_shards):
    lengths = {k: json.loads(m["json"])["num_frames"] for k, m in _raw(toy_shards).items()}
    keys = {s["key"] for s in clip_pipeline(toy_shards, num_frames=24, min_frames=24)}
    assert keys == {k for k, n in lengths.items() if n >= 24} and keys
    for s in clip_pipeline(toy_shards, num_frames=2, max_side=40, multiple_of=8):
        h, w = s["frames"].shape[1:3]
        assert max(h, w) <= 40 and h % 8 == 0 and w % 8 == 0
    for s in clip_pipeline(toy_shards, num_frames=2, crop=(40, 48)):
        assert s["frames"].shape == (2, 40, 48, 3)


def test_video2dataset_shards_and_broken_samples(tmp_path, caplog):
    clip = make_clip(tmp_path / "c.mp4", num_frames=6, fps=10)
    v2d = {"caption": "a grey square", "url": "http://example.com/c.mp4", "key": "000000000", "status": "success"}
    write_tar_atomic(
        tmp_path / "shards" / shard_name(0),
        [
            ("000000000", {"mp4": clip.read_bytes(), "json": v2d}),
            ("000000001", {"mp4": b"this is not a video", "json": {"caption": "broken"}}),
            ("000000002", {"mp4": clip.read_bytes()[:300], "txt": "truncated"}),
            ("000000003", {"mp4": clip.read_bytes(), "txt": "kept after the broken ones"}),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="sorakit.data.reader"):
        out = list(clip_pipeline(tmp_path / "shards"))
    assert [s["key"] for s in out] == ["000000000", "000000003"]
    assert out[0]["caption"] == "a grey square" and out[1]["caption"] == "kept after the broken ones"
    meta = out[0]["meta"]
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (64, 48, 6, 10.0)
    assert [frame_index(f, 6) for f in out[0]["frames"]] == list(range(6))
    assert "000000001" in caplog.text and "000000002" in caplog.text


def _keys(pipe) -> list[str]:
    return [s["key"] for s in pipe]


def test_split_by_node_gives_disjoint_covering_parts(toy_shards, monkeypatch):
    everything = _keys(clip_pipeline(toy_shards, num_frames=1))
    parts = []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        parts.append(_keys(clip_pipeline(toy_shards, num_frames=1)))
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)


def test_split_by_worker_in_a_dataloader(toy_shards):
    import torch

    pipe = clip_pipeline(toy_shards, num_frames=2)
    loader = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=2, collate_fn=lambda s: s)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == sorted(_keys(clip_pipeline(toy_shards, num_frames=1)))


def test_shuffle_is_seeded_and_resampled_never_ends(toy_shards):
    plain = _keys(clip_pipeline(toy_shards, num_frames=1))
    a = _keys(clip_pipeline(toy_shards, num_frames=1, shuffle=8, seed=1))
    b = _keys(clip_pipeline(toy_shards, num_frames=1, shuffle=8, seed=1))
    assert a == b and sorted(a) == sorted(plain) and a != plain
    endless = list(itertools.islice(clip_pipeline(toy_shards, num_frames=1, resampled=True), 20))
    assert len(endless) == 20 and {s["key"] for s in endless} <= set(plain)


def test_no_shards_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards"):
        clip_pipeline(tmp_path)
