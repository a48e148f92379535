"""Shard files: atomic tar writing, reading back (ours and the plain webdataset library), manifests."""

from __future__ import annotations

import hashlib
import json

import pytest
import webdataset as wds

from sorakit.data.shards import (
    FileMember,
    iter_tar_samples,
    list_shards,
    merge_manifests,
    read_manifest,
    shard_counts,
    shard_name,
    split_member_name,
    write_manifest,
    write_tar_atomic,
)


def _samples(tmp_path):
    clip = tmp_path / "clip.bin"
    clip.write_bytes(bytes(range(256)) * 1000)
    member = FileMember(clip)
    return clip, [
        ("000000-00000", {"mp4": member, "json": lambda: {"sha256": member.sha256, "caption": "ünïcode"}, "txt": "ünïcode"}),
        ("000000-00001", {"mp4": b"\x00\x01", "json": {"width": 3}}),
    ]


def test_roundtrip_streams_files_and_hashes_them(tmp_path):
    clip, samples = _samples(tmp_path)
    path = tmp_path / "out" / shard_name(0)
    assert write_tar_atomic(path, samples) == 2
    got = list(iter_tar_samples(path))
    assert [k for k, _ in got] == ["000000-00000", "000000-00001"]
    first = got[0][1]
    assert first["mp4"] == clip.read_bytes()
    assert json.loads(first["json"])["sha256"] == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert first["txt"].decode() == "ünïcode"
    # The plain webdataset library reads the same samples.
    plain = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in plain] == ["000000-00000", "000000-00001"]
    assert plain[0]["mp4"] == clip.read_bytes() and json.loads(plain[1]["json"]) == {"width": 3}


def test_same_samples_give_identical_bytes(tmp_path):
    for name in ("a.tar", "b.tar"):
        _, samples = _samples(tmp_path)
        write_tar_atomic(tmp_path / name, samples)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    def broken():
        yield "k0", {"txt": "fine"}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_tar_atomic(tmp_path / shard_name(3), broken())
    assert list(tmp_path.iterdir()) == []
    assert write_tar_atomic(tmp_path / shard_name(4), iter([]), keep_empty=False) == 0
    assert list(tmp_path.iterdir()) == []


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        write_tar_atomic(tmp_path / "x.tar", [("a.b", {"txt": "x"})])


def test_list_shards_dir_file_glob_and_temp_files(tmp_path):
    for i in (1, 0, 2):
        write_tar_atomic(tmp_path / shard_name(i), [(f"k{i}", {"txt": "x"})])
    (tmp_path / f".{shard_name(3)}.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    names = [p.name for p in list_shards(tmp_path)]
    assert names == [shard_name(0), shard_name(1), shard_name(2)]
    assert list_shards(tmp_path / shard_name(1)) == [tmp_path / shard_name(1)]
    assert [p.name for p in list_shards(str(tmp_path / "shard-00000[12].tar"))] == [shard_name(1), shard_name(2)]
    assert len(list_shards([tmp_path / shard_name(0), tmp_path / shard_name(2)])) == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        list_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(tmp_path / "empty")


def test_member_names_split_like_webdataset():
    assert split_member_name("dir/abc.seg.json") == ("dir/abc", "seg.json")
    assert split_member_name("000001-00002.mp4") == ("000001-00002", "mp4")


def test_manifest_write_read_merge_and_counts(tmp_path):
    write_tar_atomic(tmp_path / shard_name(0), [("a", {"txt": "1"}), ("b", {"txt": "2"})])
    assert read_manifest(tmp_path) is None
    assert shard_counts(tmp_path) == {shard_name(0): 2}  # counted from the tar when no manifest
    m = write_manifest(tmp_path, [{"name": shard_name(0), "count": 2, "duration": 1.5}], {"max_seconds": None}, stage="test")
    assert read_manifest(tmp_path) == m
    assert m["totals"] == {"shards": 1, "samples": 2, "duration": 1.5} and m["stage"] == "test"
    other = {"shards": [{"name": shard_name(1), "count": 5, "duration": 2.0}], "totals": {"inputs": 7}, "settings": {}}
    merged = merge_manifests([m, other, m])
    assert [s["name"] for s in merged["shards"]] == [shard_name(0), shard_name(1)]
    assert merged["totals"]["samples"] == 7 and merged["totals"]["duration"] == 3.5
    assert merged["settings"] == {"max_seconds": None}
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt manifest"):
        read_manifest(tmp_path)
