"""Training the VAE on real toy-world shards, the recipes, the commands, and the quality metrics."""

from __future__ import annotations

import csv
import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sorakit.cli import main
from sorakit.config import ConfigError, load_config
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.vae import VAE
from sorakit.training.vae import (
    ClipBatcher, TrainVAEConfig, VAELossConfig, autoencoder_loss, evaluate_vae, psnr, ssim, to_model_input,
)

ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(shards: Path, out: Path, steps: int) -> list[str]:
    return [
        "preset=tiny", f"data.shards={shards}", f"out={out}", f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=5", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.max_minutes=5", "data.batch_size=2", "data.crop=32", "data.num_frames=5", "data.num_workers=0",
        "data.shuffle=8", "data.image_prob=0.2", "image_every_n_steps=10", "stats_batches=2", "optim.lr=0.002",
        "optim.warmup_steps=5",
    ]


def read_metrics(out: Path) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("rec")]


@pytest.fixture(scope="module")
def trained(toy_shards, tmp_path_factory):
    """A tiny VAE trained for 60 steps through the CLI on toy-world shards."""
    out = tmp_path_factory.mktemp("vae_run")
    args = ["train", "vae"] + [a for o in tiny_overrides(toy_shards, out, 60) for a in ("--set", o)]
    assert main(args) == 0
    return out


def test_training_lowers_the_loss_and_exports_a_model(trained, toy_shards):
    rec = [float(r["rec"]) for r in read_metrics(trained)]
    assert len(rec) == 60 and all(math.isfinite(v) for v in rec)
    # Batches differ a lot (black vs white backgrounds), so compare on fixed clips instead of the
    # logged loss: the trained model reconstructs them far better than the same network untrained.
    torch.manual_seed(0)
    untrained = VAE(load_pretrained(trained, kind="vae").config)
    save_pretrained(untrained, trained / "untrained")
    after = evaluate_vae(trained, toy_shards, limit=2)
    before = evaluate_vae(trained / "untrained", toy_shards, limit=2)
    assert [c["key"] for c in after["clips"]] == [c["key"] for c in before["clips"]]
    assert after["mean_psnr"] > before["mean_psnr"] + 4
    vae = load_pretrained(trained, kind="vae")
    # Latent statistics were measured on data and stored with the weights.
    assert len(vae.config.latent_mean) == vae.latent_channels == len(vae.config.latent_std)
    assert all(s > 0 for s in vae.config.latent_std)
    assert (trained / "train_config.yaml").is_file()
    assert list((trained / "reconstructions").glob("step_*.png"))


def test_resume_continues_from_the_checkpoint(toy_shards, tmp_path):
    out = tmp_path / "run"
    sets = lambda steps: [a for o in tiny_overrides(toy_shards, out, steps) for a in ("--set", o)]  # noqa: E731
    eq = ["--set", "loss.equivariance_weight=1.0"]
    trained_time = lambda ckpt: ckpt["callbacks"]["Timer"]["time_elapsed"]["train"]  # noqa: E731
    assert main(["train", "vae", *sets(5), *eq]) == 0
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert main(["train", "vae", *sets(8), *eq, "--resume"]) == 0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 8
    assert trained_time(ckpt) > trained_time(first) > 0  # the time budget carries over
    steps = [int(r["step"]) for r in read_metrics(out)]
    assert steps == list(range(8))  # one history: the second run appended steps 5..7 to the first's 0..4
    assert all(math.isfinite(float(r["equivariance"])) for r in read_metrics(out))  # the half-scale term is on


def test_batcher_trims_to_a_common_valid_shape():
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 255, (t, h, w, 3), dtype=np.uint8) for t, h, w in [(9, 50, 70), (8, 66, 48), (12, 90, 90)]]
    batcher = ClipBatcher(batch_size=3, crop=64, image_prob=0.0, spatial_factor=4, temporal_factor=2, seed=0)
    (batch,) = list(batcher([{"frames": c} for c in clips]))
    assert batch.shape == (3, 7, 48, 48, 3)  # 8 frames → 1 + 3·2; min height 50 → 48; crop 64 caps 70/90
    images = ClipBatcher(batch_size=3, crop=64, image_prob=1.0, spatial_factor=4, temporal_factor=2, seed=0)
    (batch,) = list(images([{"frames": c} for c in clips]))
    assert batch.shape == (3, 1, 48, 48, 3)


@pytest.mark.parametrize("name", ["toy", "base"])
def test_recipes_validate_and_name_their_command(name):
    path = ROOT / "recipes" / name / "vae.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sorakit train vae --config recipes/") and f"recipes/{name}/vae.yaml" in first
    cfg = load_config(TrainVAEConfig, path)
    assert cfg.model_config().kind == "spacetime"
    # The command in the comment parses: every --set of it is a valid override.
    words = shlex.split(first[2:])
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    load_config(TrainVAEConfig, path, overrides)


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="unknown VAE preset"):
        load_config(TrainVAEConfig, None, ["preset=nope"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainVAEConfig, None, ["model.no_such_field=1"])
    assert main(["train", "vae", "--set", "preset=tiny"]) == 1  # no data.shards: one-line error


def test_psnr_and_ssim_known_values():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a.copy()
    b[..., 0] = 125  # error 25 on one channel of three → MSE 625/3
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (625 / 3)))
    assert psnr(a, a) == math.inf
    # Constant frames: SSIM reduces to its luminance term (2μxμy + C1) / (μx² + μy² + C1).
    c1 = (0.01 * 255) ** 2
    lum = lambda x, y: (2 * x * y + c1) / (x * x + y * y + c1)  # noqa: E731
    assert ssim(a, b) == pytest.approx((lum(100, 125) + 2) / 3, abs=1e-4)  # float32 statistics
    assert ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, noisy) < 0.5


def test_eval_and_reconstruct_commands(trained, toy_shards, toy_world, tmp_path, capsys):
    assert main(["vae", "eval", str(toy_shards), "--model", str(trained), "--limit", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["clips"]) == 2
    for c in r["clips"]:
        assert c["psnr"] > 10 and 0 < c["ssim"] <= 1
        assert c["latent_shape"][0] == 4 and c["compression"] > 1
    assert r["mean_psnr"] == pytest.approx(np.mean([c["psnr"] for c in r["clips"]]))
    clip = sorted(toy_world.glob("*.mp4"))[0]
    out = tmp_path / "recon.mp4"
    assert main(["vae", "reconstruct", str(clip), "--model", str(trained), "--out", str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    from sorakit.media import probe

    src, rec = probe(clip), probe(out)
    assert (rec.width, rec.height, rec.num_frames) == (src.width, src.height, src.num_frames)
    assert main(["vae", "reconstruct", str(tmp_path / "missing.mp4"), "--model", str(trained), "--out", str(out)]) == 1


def two_clips_and_a_tiny_vae(toy_world: Path) -> tuple[torch.Tensor, VAE]:
    """Two toy clips as a model batch (2, 3, 5, 32, 32) in [-1, 1], and a seeded tiny VAE."""
    from sorakit.media import read_video
    from sorakit.models.vae import vae_config

    clips = [read_video(p)[:5, :32, :32] for p in sorted(toy_world.glob("*.mp4"))[:2]]
    torch.manual_seed(0)
    return to_model_input(torch.from_numpy(np.stack(clips))), VAE(vae_config("tiny"))

def test_equivariance_term_decodes_the_pooled_latent_against_the_pooled_frames(toy_world):
    """`loss.equivariance_weight` adds w·error(decode(2×2-averaged latent), 2×2-averaged frames) to the
    loss, and only that (the same posterior draw as the full-size term)."""
    x, vae = two_clips_and_a_tiny_vae(toy_world)
    plain = VAELossConfig(reconstruction="mse")
    with_eq = VAELossConfig(reconstruction="mse", equivariance_weight=2.0)
    half = (1, 2, 2)
    torch.manual_seed(1)
    loss0, logs0, _ = autoencoder_loss(vae, x, plain)
    torch.manual_seed(1)
    loss1, logs1, _ = autoencoder_loss(vae, x, with_eq)
    torch.manual_seed(1)
    z = vae.encode(x).sample()  # the same posterior draw
    expected = F.mse_loss(vae.decode(F.avg_pool3d(z, half)), F.avg_pool3d(x, half))
    assert "equivariance" not in logs0
    torch.testing.assert_close(logs1["equivariance"], expected)
    torch.testing.assert_close(loss1, loss0 + 2.0 * expected)
    # A batch trimmed to an odd number of latents (crops are multiples of f, not 2f) drops the last row.
    odd = x[..., :20, :]  # 5 latent rows at 4× space
    torch.manual_seed(1)
    _, logs, _ = autoencoder_loss(vae, odd, with_eq)
    torch.manual_seed(1)
    z = vae.encode(odd).sample()
    expected = F.mse_loss(vae.decode(F.avg_pool3d(z[..., :4, :], half)), F.avg_pool3d(odd[..., :16, :], half))
    torch.testing.assert_close(logs["equivariance"], expected)


def test_latent_noise_decodes_a_noised_draw_at_the_latents_own_scale(toy_world):
    """`loss.latent_noise` decodes z + τ·std(z)·ε, τ uniform in [0, latent_noise] per clip and std per
    channel, so the noise keeps its size against the latent however large the encoder makes it."""
    x, vae = two_clips_and_a_tiny_vae(toy_world)
    noisy = VAELossConfig(reconstruction="mse", latent_noise=0.8)
    torch.manual_seed(1)
    loss, logs, _ = autoencoder_loss(vae, x, noisy)
    torch.manual_seed(1)
    posterior = vae.encode(x)
    z = posterior.sample()
    tau = torch.rand(2, 1, 1, 1, 1) * 0.8
    z_noisy = z + tau * z.std(dim=(0, 2, 3, 4), keepdim=True) * torch.randn_like(z)
    expected = F.mse_loss(vae.decode(z_noisy), x)
    torch.testing.assert_close(logs["rec"], expected)
    torch.testing.assert_close(loss, expected + noisy.kl_weight * posterior.kl().mean())
    torch.manual_seed(1)
    _, plain, _ = autoencoder_loss(vae, x, VAELossConfig(reconstruction="mse"))
    torch.testing.assert_close(plain["rec"], F.mse_loss(vae.decode(z), x))  # off: the posterior draw itself
    assert not torch.allclose(plain["rec"], logs["rec"])
