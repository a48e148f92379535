"""`sorakit encode`: latent shards readable by plain webdataset, resumable, and the latent reader."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from sorakit.cli import main
from sorakit.data.latents import EncodeSettings, encode_shards, latent_pipeline, load_latent_manifest
from sorakit.data.shards import iter_tar_samples, list_shards, write_tar_atomic
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.vae import VAE, vae_config


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """An untrained tiny VAE with latent statistics, saved as a model directory."""
    torch.manual_seed(0)
    vae = VAE(vae_config("tiny")).with_latent_stats([0.1, -0.2, 0.0, 0.3], [1.5, 0.5, 1.0, 2.0])
    return save_pretrained(vae, tmp_path_factory.mktemp("vae") / "model")


@pytest.fixture(scope="module")
def latents(toy_shards, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents")
    assert main(["encode", str(toy_shards), "--model", str(vae_dir), "--out", str(out), "--max-frames", "9"]) == 0
    return out


def test_encode_output_is_plain_webdataset(latents, toy_shards, vae_dir):
    import webdataset as wds

    assert [p.name for p in list_shards(latents)] == [p.name for p in list_shards(toy_shards)]
    raw = {key: members for shard in list_shards(toy_shards) for key, members in iter_tar_samples(shard)}
    seen = set()
    for sample in wds.WebDataset([str(p) for p in list_shards(latents)], shardshuffle=False):
        key = sample["__key__"]
        seen.add(key)
        from safetensors.torch import load

        latent = load(sample["latent.safetensors"])["latent"]
        meta = json.loads(sample["json"])
        src_meta = json.loads(raw[key]["json"])
        assert latent.dtype == torch.float16
        assert list(latent.shape) == meta["latent_shape"]
        assert {k: meta[k] for k in src_meta} == src_meta  # all original metadata kept
        assert meta["encoded_frames"] == min(9, src_meta["num_frames"])
        assert sample["txt"].decode() == raw[key]["txt"].decode()
    assert seen == set(raw)
    # The stored latent is what the VAE gives for the same frames (normalised, float16).
    from sorakit.media import read_video

    key = sorted(raw)[0]
    vae = load_pretrained(vae_dir, kind="vae")
    expected = vae.encode_video(read_video(raw[key]["mp4"], max_frames=9))
    got = next(s for s in latent_pipeline(latents) if s["key"] == key)["latent"]
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


def test_manifest_records_the_vae_and_counts(latents, vae_dir, toy_shards):
    m = load_latent_manifest(latents)
    assert m["vae"]["path"] == str(Path(vae_dir).resolve())
    assert m["vae"]["config"]["latent_channels"] == 4
    assert m["vae"]["config"]["latent_std"] == [1.5, 0.5, 1.0, 2.0]
    assert m["totals"]["samples"] == 8 and m["totals"]["shards"] == 2
    assert m["settings"]["max_frames"] == 9
    assert (latents / "errors.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="not a latent manifest"):
        load_latent_manifest(toy_shards)


def test_latent_pipeline_yields_tensors_captions_and_meta(latents):
    samples = list(latent_pipeline(latents, shuffle=4, seed=1))
    assert len(samples) == 8
    for s in samples:
        assert isinstance(s["latent"], torch.Tensor) and s["latent"].ndim == 4 and s["latent"].dtype == torch.float32
        assert s["caption"] and s["caption"].startswith("a ")
        assert list(s["latent"].shape) == s["meta"]["latent_shape"]
    assert [s["key"] for s in samples] != sorted(s["key"] for s in samples) or len(samples) < 3
    endless = iter(latent_pipeline(latents, resampled=True, seed=0))
    assert len([next(endless) for _ in range(20)]) == 20


def _parent_death_signal() -> int:
    import ctypes

    sig = ctypes.c_int(-1)
    pr_get_pdeathsig = 2
    assert ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_get_pdeathsig, ctypes.byref(sig)) == 0
    return sig.value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_encoding_in_the_jobs_own_process_does_not_tie_it_to_its_parent(toy_shards, vae_dir, tmp_path):
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 0)  # PR_SET_PDEATHSIG: none, whatever ran before
    encode_shards(toy_shards, vae_dir, tmp_path / "latents", EncodeSettings(max_frames=3, workers=1))
    assert _parent_death_signal() == 0  # a `nohup sorakit encode` outlives its shell; only pool workers die with the job


def test_broken_samples_are_skipped_and_reported_and_rerun_resumes(toy_shards, vae_dir, tmp_path):
    src = tmp_path / "src"
    good = list(iter_tar_samples(list_shards(toy_shards)[0]))
    broken = ("broken-clip", {"mp4": b"not a video", "json": json.dumps({"caption": "x"}).encode()})
    write_tar_atomic(src / "shard-000000.tar", [good[0], broken, good[1]])
    write_tar_atomic(src / "shard-000001.tar", good[2:3])
    out = tmp_path / "latents"
    settings = EncodeSettings(max_frames=3)
    result = encode_shards(src, vae_dir, out, settings)
    assert result.encoded_shards == 2 and not result.failed_shards
    assert result.manifest["totals"]["samples"] == 3
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["shard"], e["key"]) for e in errors] == [("shard-000000.tar", "broken-clip")]
    # A rerun skips finished shards; a shard lost from the output is made again.
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.tar").unlink()
    (out / ".encode" / "done" / "shard-000001.tar.json").unlink()
    result = encode_shards(src, vae_dir, out, settings)
    assert result.encoded_shards == 1
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before
    assert load_latent_manifest(out)["totals"]["samples"] == 3
    assert len((out / "errors.jsonl").read_text().splitlines()) == 1  # not counted twice
    with tarfile.open(out / "shard-000001.tar") as tf:
        assert sorted(tf.getnames()) == sorted(f"{good[2][0]}.{e}" for e in ("latent.safetensors", "json", "txt"))


def test_encode_with_features_stores_the_captioners_view_and_a_dit_aligns_to_it(toy_shards, vae_dir, latents, tmp_path):
    from sorakit.media import read_video
    from sorakit.models.captioner import build_captioner
    from sorakit.models.text_encoder import build_text_encoder

    torch.manual_seed(0)
    cap_dir = save_pretrained(build_captioner("tiny"), tmp_path / "captioner")
    out = tmp_path / "latents"
    assert main(["encode", str(toy_shards), "--model", str(vae_dir), "--out", str(out), "--max-frames", "8",
                 "--features", str(cap_dir), "--feature-stride", "2"]) == 0
    assert load_latent_manifest(out)["settings"]["features"] == str(cap_dir.resolve())
    vae, cap = load_pretrained(vae_dir, kind="vae"), load_pretrained(cap_dir, kind="captioner").eval()
    raw = {key: members for shard in list_shards(toy_shards) for key, members in iter_tar_samples(shard)}
    samples = list(latent_pipeline(out))
    for s in samples:
        _, t, h, w = s["latent"].shape
        assert s["features"].shape == (cap.config.vision.width, t, -(-h // 2), -(-w // 2))
        assert list(s["features"].shape) == s["meta"]["features_shape"]
    # Latent frame k holds the features of the frame it ends on: k·t, or the last frame where the VAE padded.
    s = samples[0]
    frames = read_video(raw[s["key"]]["mp4"], max_frames=8)
    t = s["latent"].shape[1]
    ends = [min(k * vae.temporal_factor, len(frames) - 1) for k in range(t)]
    expected = cap.frame_features(frames[ends], cell=2 * vae.spatial_factor, grid=tuple(s["features"].shape[2:]))
    torch.testing.assert_close(s["features"], expected.half().float())
    # The next stage: a DiT trained with representation alignment on these shards.
    save_pretrained(build_text_encoder("tiny"), tmp_path / "text_encoder")
    train = ["train", "dit", "--out", str(tmp_path / "dit"), "--set", "preset=tiny", "--set", f"vae={vae_dir}",
             "--set", f"text_encoder={tmp_path / 'text_encoder'}", "--set", "data.max_tokens=256",
             "--set", "data.pool_size=4", "--set", "data.num_workers=0", "--set", "trainer.accelerator=cpu",
             "--set", "trainer.devices=1", "--set", "trainer.max_steps=2", "--set", "repa.weight=0.5",
             "--set", "repa.depth=1", "--set", "repa.hidden=16"]
    assert main([*train, "--set", f"data.shards={out}"]) == 0
    assert load_pretrained(tmp_path / "dit" / "dit", kind="dit").config.depth == 2  # the projector is not exported
    assert main([*train, "--set", f"data.shards={latents}"]) == 1  # encoded without --features: a clear error


def test_encode_refuses_bad_requests(toy_shards, vae_dir, tmp_path):
    assert main(["encode", str(toy_shards), "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert main(["encode", str(tmp_path / "nothing"), "--model", str(vae_dir), "--out", str(tmp_path / "o")]) == 1
    with pytest.raises(ValueError, match="must not be the input"):
        encode_shards(toy_shards, vae_dir, toy_shards)


def test_parallel_workers_give_the_same_latents(toy_shards, vae_dir, latents, tmp_path):
    out = tmp_path / "par"
    result = encode_shards(toy_shards, vae_dir, out, EncodeSettings(max_frames=9, workers=2))
    assert result.encoded_shards == 2
    a = {s["key"]: s["latent"] for s in latent_pipeline(latents)}
    b = {s["key"]: s["latent"] for s in latent_pipeline(out)}
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-3)
