"""Training the refiner: aligned training pairs, the loss goes down, the commands run end to end, recipes validate."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sorakit.cli import main
from sorakit.config import ConfigError, load_config
from sorakit.generation.refine import refine_decoded, refine_video
from sorakit.models.io import read_model_config, save_pretrained
from sorakit.models.refiner import build_refiner, refined_shape, refined_video_size
from sorakit.models.vae import VAE, vae_config
from sorakit.training.refiner import (
    RefinerDataConfig, TrainRefinerConfig, encode_pair, preload_pairs, refiner_loss, training_window,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("refiner*.yaml"))
LATENT_RECIPE = ROOT / "recipes" / "toy" / "refiner.yaml"
PIXEL_RECIPES = [ROOT / "recipes" / "toy" / "refiner_pixels.yaml", ROOT / "recipes" / "toy" / "refiner_sr.yaml"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("refiner_vae") / "vae"
    save_pretrained(VAE(vae_config("tiny")), path)
    return path


def test_training_windows_give_latents_that_line_up():
    vae = VAE(vae_config("tiny")).eval()  # spatial factor 4, temporal factor 2
    frames = np.random.default_rng(0).integers(0, 256, (10, 50, 37, 3), dtype=np.uint8)
    rng = random.Random(0)
    for scales in [(2, 1), (1, 2), (2, 2)]:
        w = training_window(frames, scales, vae, crop=40, max_frames=9, rng=rng)
        s, r = scales
        assert w.shape[1] % (4 * s) == 0 and w.shape[2] % (4 * s) == 0 and w.shape[1] <= 40
        assert (w.shape[0] - 1) % (2 * r) == 0 and w.shape[0] <= 9
        z_hi, z_lo = encode_pair(vae, w, scales)
        assert tuple(z_hi.shape) == refined_shape(tuple(z_lo.shape), scales)
    # Too small for one 8-pixel block, or too short to show 2× motion: no window.
    assert training_window(frames[:, :7], (2, 1), vae, 40, 9, rng) is None
    assert training_window(frames[:4], (1, 2), vae, 40, 9, rng) is None


def test_strided_windows_show_the_motion_of_low_frame_rates():
    vae = VAE(vae_config("tiny")).eval()  # temporal factor 2: a (1, 2) window holds 1 + 4k frames
    index = np.arange(40, dtype=np.uint8)[:, None, None, None]
    frames = np.broadcast_to(index, (40, 16, 16, 3)).copy()  # every pixel holds its frame's index
    rng = random.Random(0)
    strides = set()
    for _ in range(40):
        w = training_window(frames, (1, 2), vae, crop=16, max_frames=9, rng=rng, max_stride=4)
        steps = np.diff(w[:, 0, 0, 0].astype(int))
        assert len(w) == 9 and len(set(steps)) == 1  # whole units, evenly spaced frames of the clip
        strides.add(int(steps[0]))
    assert strides == {1, 2, 3, 4}
    # A clip too short for a stride gets only the strides it can hold.
    short = frames[:13]
    got = {int(np.diff(training_window(short, (1, 2), vae, 16, 9, rng, max_stride=4)[:2, 0, 0, 0].astype(int))[0])
           for _ in range(30)}
    assert got == {1, 2, 3}


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_refiner("tiny", spatial_scale=2, temporal_scale=2, attn_backend="dense")
    # Targets with structure the low-res latent predicts: smooth fields and their 2×-reduced versions.
    pairs = []
    for shape in [(4, 3, 8, 8), (4, 5, 4, 6)]:
        hi = torch.nn.functional.avg_pool3d(torch.randn(1, shape[0], shape[1], shape[2] * 2, shape[3] * 2), (1, 2, 2))[0]
        pairs.append((hi * 3, torch.nn.functional.avg_pool2d(hi[:, ::2] * 3, 2)))

    def loss(seed: int = 0) -> torch.Tensor:  # one fixed draw of times, noise and augmentation
        total, per_video = refiner_loss(model, pairs, 0.3, generator=torch.Generator().manual_seed(seed))
        assert per_video.shape == (2,)
        return total

    before = loss().item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(12):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.6 * before


def test_preloaded_pairs_come_from_the_raw_shards(toy_shards, tiny_vae):
    from sorakit.models.io import load_pretrained

    vae = load_pretrained(tiny_vae, kind="vae")
    cfg = TrainRefinerConfig(preset="tiny", vae=str(tiny_vae),
                             data=RefinerDataConfig(shards=str(toy_shards), crop=32, frames=5, preload=True, limit=3))
    pairs = preload_pairs(cfg, vae, (2, 2), seed=0)
    assert len(pairs) == 3
    for z_hi, z_lo in pairs:
        assert tuple(z_hi.shape) == refined_shape(tuple(z_lo.shape), (2, 2)) and z_hi.shape[-1] <= 32 // 4


def test_train_refine_and_eval_commands(toy_shards, tiny_vae, tmp_path, capsys):
    out = tmp_path / "refiner"
    common = ["--config", str(LATENT_RECIPE), "--set", "preset=tiny", "--set", f"vae={tiny_vae}",
              "--set", f"data.shards={toy_shards}", "--set", "data.preload=false", "--set", "data.num_workers=0",
              "--set", "data.batch_size=2", "--set", "data.crop=32", "--set", "data.frames=5",
              "--set", "model.steps=2", "--set", "trainer.max_minutes=null", "--out", str(out)]
    assert main(["train", "refiner", *common, "--set", "trainer.max_steps=2"]) == 0  # streaming: encoded on the fly
    meta = read_model_config(out)
    assert meta["kind"] == "refiner" and meta["trained_steps"] == 2
    assert (out / meta["vae"]).resolve() == tiny_vae.resolve()  # the VAE is found from the directory
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert main(["train", "refiner", *common, "--set", "trainer.max_steps=3", "--resume"]) == 0
    assert read_model_config(out)["trained_steps"] == 3  # continued, not restarted

    from sorakit.media import probe, write_video

    src = tmp_path / "in.mp4"
    write_video(src, np.full((5, 22, 30, 3), 128, np.uint8), fps=8)
    assert main(["refine", str(src), "--model", str(out), "--out", str(tmp_path / "hi.mp4"), "--steps", "1"]) == 0
    info = probe(tmp_path / "hi.mp4")
    assert (info.num_frames, info.height, info.width, info.fps) == (9, 44, 60, 16)
    side = json.loads((tmp_path / "hi.json").read_text())
    assert side["mode"] == "refine" and side["size"]["frames"] == 9

    # A pipeline directory holds the refiner; its refiners refine what its DiT generates.
    from sorakit.generation.pipeline import export_pipeline, load_pipeline
    from sorakit.models.io import load_pretrained
    from tests.generation.tiny_pipeline import make_tiny_pipeline

    tiny = load_pipeline(make_tiny_pipeline(tmp_path / "tiny"))
    pipe_dir = export_pipeline(tmp_path / "pipe", tiny.dit, tiny.diffusion_cfg, tmp_path / "tiny" / "vae",
                               tmp_path / "tiny" / "text", refiners=[out])
    pipe = load_pipeline(pipe_dir)
    z = torch.randn(4, 3, 3, 4)  # a base latent of a 5 × 12 × 16 video
    frames = refine_decoded(pipe.refiners, load_pretrained(tiny_vae, kind="vae"), z, (5, 12, 16), steps=1)
    assert frames.shape == (9, 24, 32, 3)

    capsys.readouterr()
    assert main(["eval", "refiner", str(toy_shards), "--model", str(out), "--limit", "2", "--frames", "5",
                 "--crop", "32", "--steps", "1", "--pipeline", str(pipe_dir), "--generated", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["clips"]) == 2 and report["scales"] == {"spatial": 2, "temporal": 2}
    assert report["gain_db"] == pytest.approx(report["psnr"]["refined"] - report["psnr"]["baseline"])
    assert set(report["psnr_by_frames"]) == {"kept", "new"}  # a 2× frame-rate refiner: input and in-between frames
    for c in report["clips"]:  # a clip's PSNR lies between those of its two sets of frames
        for k in ("refined", "baseline"):
            parts = (c[f"psnr_{k}_kept"], c[f"psnr_{k}_new"])
            assert min(parts) - 1e-9 <= c[f"psnr_{k}"] <= max(parts) + 1e-9
    assert report["prompt_following"]["base"]["n"] == 2  # toy captions are scored before and after
    assert report["generated"]["base"]["n"] == report["generated"]["refined"]["n"] == 1
    assert main(["refine", str(tmp_path / "missing.mp4"), "--model", str(out), "--out", str(tmp_path / "x.mp4")]) == 1


@pytest.mark.parametrize("recipe", PIXEL_RECIPES, ids=lambda p: p.stem)
def test_pixel_space_refiner_trains_and_refines(recipe, toy_shards, tmp_path):
    out = tmp_path / "pixel_refiner"
    assert main(["train", "refiner", "--config", str(recipe), "--set", "preset=tiny",
                 "--set", f"data.shards={toy_shards}", "--set", "data.preload=true", "--set", "data.limit=2",
                 "--set", "data.crop=16", "--set", "data.frames=5",
                 "--set", "trainer.max_minutes=null", "--set", "trainer.max_steps=2", "--out", str(out)]) == 0
    meta = read_model_config(out)
    assert meta["vae"] == "vae" and read_model_config(out / "vae")["config"]["kind"] == "pixels"
    assert meta["config"]["in_channels"] == 3
    low = np.random.default_rng(0).integers(0, 256, (3, 10, 14, 3), dtype=np.uint8)
    scales = (meta["config"]["spatial_scale"], meta["config"]["temporal_scale"])
    assert refine_video(out, out / "vae", low, steps=1).shape == (*refined_video_size(3, 10, 14, scales), 3)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# sorakit train refiner --config recipes/") and recipe.name in first
    cfg = load_config(TrainRefinerConfig, recipe)
    model = cfg.model_config(in_channels=16 if recipe.parent.name == "base" else 8)
    assert model.spatial_scale * model.temporal_scale > 1
    with pytest.raises(ConfigError, match="model"):
        load_config(TrainRefinerConfig, recipe, ["model.depthh=3"])
