"""Re-captioning shards: new shards with the right members, resume, errors, single file, eval."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from sorakit.cli import main
from sorakit.data.captioning import CaptionSettings, caption_shards, evaluate_captioner, read_clip_frames
from sorakit.data.shards import iter_tar_samples, read_manifest, write_tar_atomic
from sorakit.data.toyworld import make_toyworld, parse_caption
from sorakit.models.captioner import build_captioner
from sorakit.models.io import save_pretrained
from sorakit.models.text_encoder import CaptionTokenizer
from sorakit.utils.fs import read_jsonl


def make_toy_shards(root: Path, num_clips: int, per_shard: int, *, uncaptioned=(), broken=()) -> Path:
    """Toy-world clips as raw shards (KEY.mp4, KEY.json, KEY.txt), as ingest writes them."""
    clips = make_toyworld(root / "clips", num_clips, seed=5)
    out = root / "shards"
    for s in range(0, num_clips, per_shard):
        samples = []
        for i in range(s, min(s + per_shard, num_clips)):
            meta = json.loads(clips[i].with_suffix(".json").read_text())
            members = {"mp4": clips[i].read_bytes(), "json": {"num_frames": meta["num_frames"], "fps": meta["fps"],
                                                               "width": meta["width"], "height": meta["height"],
                                                               "source": clips[i].name, "caption": meta["caption"]},
                       "txt": meta["caption"]}
            if i in uncaptioned:
                del members["txt"], members["json"]["caption"]
            if i in broken:
                members["mp4"] = b"not a video at all"
            samples.append((f"{i:06d}", members))
        write_tar_atomic(out / f"shard-{s // per_shard:06d}.tar", samples)
    return out


def toy_model_dir(root: Path) -> Path:
    """A tiny random captioner over the toy vocabulary, saved as a model directory."""
    from sorakit.data.toyworld import BACKGROUNDS, COLORS, MOTIONS, SHAPES, caption

    texts = [caption(c, s, m, b) for c in COLORS for s in SHAPES for m in MOTIONS for b in BACKGROUNDS]
    torch.manual_seed(0)
    model = build_captioner("tiny", {"text": {"vocab": CaptionTokenizer.build_vocab(texts)}})
    return save_pretrained(model.eval(), root / "model")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("captioning")
    shards = make_toy_shards(root, 7, 4, uncaptioned={1}, broken={5})
    return {"root": root, "shards": shards, "model": toy_model_dir(root)}


def test_read_clip_frames_spreads_over_the_clip(data):
    clip = sorted((data["root"] / "clips").glob("*.mp4"))[0]
    meta = json.loads(clip.with_suffix(".json").read_text())
    frames = read_clip_frames(clip, 3, meta["num_frames"])
    assert frames.shape == (3, meta["height"], meta["width"], 3)  # native size, not resized


def test_caption_writes_new_shards_with_the_right_members(data, tmp_path):
    before = {p.name: digest(p) for p in data["shards"].glob("*.tar")}
    out = tmp_path / "captioned"
    summary = caption_shards(data["shards"], data["model"], out, CaptionSettings(batch_size=3, max_len=8))
    assert {p.name: digest(p) for p in data["shards"].glob("*.tar")} == before  # input untouched
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(before)  # shard i -> shard i, same name
    assert summary["captioned"] == 6 and summary["errors"] == 1
    originals = {k: m for p in sorted(data["shards"].glob("*.tar")) for k, m in iter_tar_samples(p)}
    samples = {k: m for p in sorted(out.glob("*.tar")) for k, m in iter_tar_samples(p)}
    assert set(samples) == set(originals) - {"000005"}  # the broken clip is reported, not copied
    for key, m in samples.items():
        assert set(m) == {"mp4", "json", "txt"}
        meta = json.loads(m["json"])
        assert meta["caption"] == m["txt"].decode() and m["txt"]
        assert m["mp4"] == originals[key]["mp4"]
        if key == "000001":
            assert "original_caption" not in meta  # it had none
        else:
            assert meta["original_caption"] == originals[key]["txt"].decode()
        assert meta["width"] == json.loads(originals[key]["json"])["width"]  # metadata kept
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) == 1 and errors[0]["source"].endswith(":000005") and errors[0]["reason"]
    manifest = read_manifest(out)
    assert {s["name"]: s["count"] for s in manifest["shards"]} == {"shard-000000.tar": 4, "shard-000001.tar": 2}
    assert manifest["settings"]["model"] == str(data["model"])


def test_keep_existing_captions(data, tmp_path):
    out = tmp_path / "kept"
    summary = caption_shards(data["shards"], data["model"], out, CaptionSettings(keep_existing=True, max_len=4))
    # only the uncaptioned clip is decoded and run; the others (the broken one too) pass through as they are
    assert summary["captioned"] == 1 and summary["kept"] == 6 and summary["errors"] == 0
    for p in out.glob("*.tar"):
        for key, m in iter_tar_samples(p):
            meta = json.loads(m["json"])
            if key != "000001":
                assert parse_caption(m["txt"].decode()) and "original_caption" not in meta
                assert meta["caption"] == m["txt"].decode()


def test_resume_skips_finished_shards(data, tmp_path):
    out = tmp_path / "resume"
    caption_shards(data["shards"], data["model"], out, CaptionSettings(max_len=4))
    first, second = out / "shard-000000.tar", out / "shard-000001.tar"
    kept_bytes = first.read_bytes()
    first.touch()
    stamp = first.stat().st_mtime_ns
    second.unlink()  # as if killed while writing it: only a hidden temp file would remain
    (out / ".shard-000001.tar.abc.tmp").write_bytes(b"partial")
    summary = caption_shards(data["shards"], data["model"], out, CaptionSettings(max_len=4))
    assert summary["skipped_shards"] == 1 and second.exists()
    assert first.stat().st_mtime_ns == stamp and first.read_bytes() == kept_bytes  # not redone
    assert len(read_jsonl(out / "errors.jsonl")) == 1  # the broken clip is not reported twice
    assert {s["name"] for s in read_manifest(out)["shards"]} == {"shard-000000.tar", "shard-000001.tar"}


def test_processes_write_the_same_shards(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = caption_shards(data["shards"], data["model"], one, CaptionSettings(max_len=6))
    seen = []
    b = caption_shards(data["shards"], data["model"], two, CaptionSettings(max_len=6, processes=2), progress=seen.append)
    assert sorted(seen) == [3, 4]  # per shard, broken clip included: all 7 samples accounted for
    assert {k: b[k] for k in ("captioned", "kept", "errors", "failed_shards")} == \
        {k: a[k] for k in ("captioned", "kept", "errors", "failed_shards")}
    for p in sorted(one.glob("*.tar")):
        assert dict(iter_tar_samples(p)) == dict(iter_tar_samples(two / p.name))
    assert read_jsonl(one / "errors.jsonl") == read_jsonl(two / "errors.jsonl")
    assert read_manifest(one)["shards"] == read_manifest(two)["shards"]


@pytest.mark.parametrize("processes", [1, 2])
def test_an_unreadable_shard_is_reported_and_the_others_are_captioned(data, tmp_path, capsys, processes):
    src = tmp_path / "src"
    src.mkdir()
    for p in data["shards"].glob("*.tar"):
        (src / p.name).write_bytes(p.read_bytes())
    (src / "shard-000009.tar").write_bytes(b"not a tar archive")
    out = tmp_path / "out"
    summary = caption_shards(src, data["model"], out, CaptionSettings(max_len=4, processes=processes))
    assert len(summary["failed_shards"]) == 1 and "shard-000009.tar" in summary["failed_shards"][0]
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert {s["name"] for s in read_manifest(out)["shards"]} == {"shard-000000.tar", "shard-000001.tar"}
    out2 = tmp_path / "cli"
    assert main(["caption", str(src), "--model", str(data["model"]), "--out", str(out2), "--max-len", "4",
                 "-j", str(processes)]) == 1
    err = capsys.readouterr().err
    assert "1 shards not captioned" in err and "shard-000009.tar" in err


def test_cli_caption_one_file_and_errors(data, capsys, tmp_path):
    clip = sorted((data["root"] / "clips").glob("*.mp4"))[0]
    assert main(["caption", str(clip), "--model", str(data["model"])]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["caption", str(data["shards"]), "--model", str(data["model"])]) == 1  # no --out
    assert "--out is required" in capsys.readouterr().err
    assert main(["caption", str(data["shards"]), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "not a sorakit model directory" in capsys.readouterr().err


def test_eval_reports_metrics(data, capsys, tmp_path):
    # On shards the model captioned itself, its greedy captions match the references exactly.
    own = tmp_path / "own"
    caption_shards(data["shards"], data["model"], own, CaptionSettings())
    result = evaluate_captioner(own, data["model"])
    assert result["exact_match"] == 1.0 and result["word_accuracy"] == 1.0 and result["samples"] == 6
    result = evaluate_captioner(data["shards"], data["model"])
    assert result["samples"] == 5 and result["decode_errors"] == 1  # uncaptioned skipped, broken counted
    for k in ("exact_match", "word_accuracy", "retrieval_accuracy"):
        assert 0.0 <= result[k] <= 1.0
    assert set(result["toy_attributes"]) == {"color", "shape", "motion", "background"}
    assert main(["captioner", "eval", str(data["shards"]), "--model", str(data["model"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 5
