"""`sorakit train dit` on latent shards: the loss falls, resume continues the step count, DDP, recipes."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from sorakit.cli import main
from sorakit.config import from_dict, load_config
from sorakit.data.latents import LATENT_MEMBER, latent_bytes, latent_pipeline
from sorakit.data.packing import pack_text, packed_batches
from sorakit.data.shards import write_manifest, write_tar_atomic
from sorakit.generation.pipeline import load_pipeline
from sorakit.models.dit import DiT, dit_config
from sorakit.models.io import save_pretrained
from sorakit.models.text_encoder import build_text_encoder
from sorakit.models.vae import VAE, vae_config
from sorakit.training.dit import (
    MaskConfig,
    PackedLatents,
    TextCache,
    TrainDiTConfig,
    diffusion_loss,
    sample_given_frames,
)

REPO = Path(__file__).resolve().parents[2]
COLORS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Latent shards whose content follows the caption (a per-colour channel pattern), plus a tiny
    VAE and text encoder directory, as `sorakit encode` and the captioner would leave them."""
    root = tmp_path_factory.mktemp("dit")
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for s in range(2):
        samples = []
        for i in range(12):
            c = rng.randrange(4)
            shape = (4, rng.randint(1, 4), rng.randint(3, 7), rng.randint(3, 7))
            pattern = torch.tensor([1.0, -1.0, 0.5, -0.5]).roll(c)[:, None, None, None]
            latent = pattern.expand(shape) + 0.1 * torch.randn(shape, generator=g)
            caption = f"a {COLORS[c]} square"
            samples.append((f"s{s}-{i:03d}", {LATENT_MEMBER: latent_bytes(latent), "json": {"caption": caption}, "txt": caption}))
        write_tar_atomic(root / "latents" / f"shard-{s:06d}.tar", samples)
    save_pretrained(VAE(vae_config("tiny")), root / "vae")
    save_pretrained(build_text_encoder("tiny"), root / "text_encoder")
    return root


def _args(ws: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train", "dit", "--out", str(out),
        "--set", "preset=tiny", "--set", f"vae={ws / 'vae'}", "--set", f"text_encoder={ws / 'text_encoder'}",
        "--set", f"data.shards={ws / 'latents'}", "--set", "data.max_tokens=96", "--set", "data.pool_size=8",
        "--set", "data.num_workers=0", "--set", "data.shuffle=8",
        "--set", "trainer.accelerator=cpu", "--set", "trainer.devices=1", "--set", f"trainer.max_steps={steps}",
        "--set", "trainer.log_every_n_steps=1", "--set", "trainer.checkpoint_every_n_steps=4",
        "--set", "optim.lr=0.003", "--set", "optim.warmup_steps=2", "--set", "threads=1",
        *extra,
    ]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # bf16-mixed: GPUs, and CPUs with AVX512-BF16
def test_training_lowers_the_loss_and_exports_a_pipeline(workspace, tmp_path, precision):
    out = tmp_path / "run"
    assert main(_args(workspace, out, 16, "--set", f"trainer.precision={precision}")) == 0
    pipe = load_pipeline(out)
    assert json.loads((out / "dit" / "config.json").read_text())["trained_steps"] == 16
    # Same batches, noise and times for the trained DiT and a fresh one (which predicts zero).
    te_state = pipe.text_encoder.state_dict()
    fresh = DiT(pipe.dit.config)
    before = _fixed_loss_with(fresh, workspace, te_state)
    after = _fixed_loss_with(pipe.dit, workspace, te_state)
    assert after < 0.85 * before, (before, after)
    rows = (out / "logs" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    util = [float(r.split(",")[header.index("utilisation")]) for r in rows[1:] if r.split(",")[header.index("utilisation")]]
    assert util and min(util) > 0


def _fixed_loss_with(dit, ws, te_state) -> float:
    te = build_text_encoder("tiny")
    te.load_state_dict(te_state)
    cache = TextCache(te)
    batches = packed_batches(latent_pipeline(ws / "latents"), tuple(dit.config.patch), 96, pool_size=8)
    losses = []
    torch.manual_seed(123)
    with torch.no_grad():
        for b in list(batches)[:4]:
            text = pack_text(b["batch"], *cache(b["captions"], torch.device("cpu")))
            losses.append(diffusion_loss(dit.eval(), b["batch"], text, TrainDiTConfig().diffusion)[0].item())
    return sum(losses) / len(losses)


def test_resume_continues_the_step_count(workspace, tmp_path):
    out = tmp_path / "run"
    assert main(_args(workspace, out, 4)) == 0
    assert main(_args(workspace, out, 8, "--resume")) == 0
    steps = [int(r.split(",")[2]) for r in (out / "logs" / "metrics.csv").read_text().splitlines()[1:] if r]
    meta = json.loads((out / "dit" / "config.json").read_text())
    assert meta["trained_steps"] == 8
    assert max(steps) == 7 and steps.count(4) >= 1  # the second run logged steps 4..7, not 0..3 again
    assert min(steps) == 0  # and the first run's rows are still there: one history, not two halves


def test_bad_config_is_a_one_line_error(workspace, tmp_path, capsys):
    assert main(_args(workspace, tmp_path / "x", 1, "--set", "data.video_weighting=loudness")) == 1
    assert "video_weighting" in capsys.readouterr().err
    assert main(["train", "dit", "--set", "preset=tiny", "--set", f"vae={workspace / 'nope'}",
                 "--set", f"text_encoder={workspace / 'text_encoder'}", "--set", f"data.shards={workspace}"]) == 1
    # Latents from a VAE with other channels: a one-line error naming the shard and sample.
    save_pretrained(VAE(vae_config("tiny", latent_channels=8)), tmp_path / "vae8")
    capsys.readouterr()
    assert main(_args(workspace, tmp_path / "y", 1, "--set", f"vae={tmp_path / 'vae8'}")) == 1
    err = capsys.readouterr().err
    assert "shard-00000" in err and "expects (8, T', H', W')" in err
    # With the manifest `sorakit encode` writes, the mismatch is caught before training starts.
    shutil.copytree(workspace / "latents", tmp_path / "latents")
    write_manifest(tmp_path / "latents", [{"name": f"shard-{s:06d}.tar", "count": 12} for s in range(2)],
                   vae={"path": str(workspace / "vae"), "config": {"latent_channels": 4, "kind": "spacetime"}})
    assert main(_args(workspace, tmp_path / "z", 1, "--set", f"vae={tmp_path / 'vae8'}",
                      "--set", f"data.shards={tmp_path / 'latents'}")) == 1
    err = capsys.readouterr().err
    assert "encoded by a VAE with latent_channels=4" in err and "has latent_channels=8" in err
    assert not (tmp_path / "z" / "checkpoints").exists()


def _ddp_source(seed: int):
    rng = random.Random(seed)
    while True:
        c = rng.randrange(4)
        yield {"key": str(seed), "caption": f"a {COLORS[c]} square", "latent": torch.full((4, 2, 4, 4), c - 1.5)}


def test_ddp_spawn_training_step_on_cpu(workspace, tmp_path):
    from sorakit.training.dit import train_dit

    cfg = from_dict(TrainDiTConfig, {
        "preset": "tiny", "vae": str(workspace / "vae"), "text_encoder": str(workspace / "text_encoder"),
        "out": str(tmp_path / "ddp"), "data": {"max_tokens": 64, "pool_size": 4, "num_workers": 0},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn",
                    "log_every_n_steps": 1},
        "threads": 1,
    })
    train_dit(cfg, source=_ddp_source)
    meta = json.loads((tmp_path / "ddp" / "dit" / "config.json").read_text())
    assert meta["trained_steps"] == 2
    # The weights trained in the worker processes came back: the zero-initialised output layer moved.
    assert load_pipeline(tmp_path / "ddp").dit.final.linear.weight.abs().max() > 0


def test_self_conditioning_trains_its_embedding_and_every_parameter_gets_a_gradient():
    from sorakit.models.dit import build_dit
    from sorakit.data.packing import pack

    dit = build_dit("tiny", self_condition=True)
    for p in dit.parameters():  # a fresh DiT predicts zero and passes no gradient back to its inputs
        if p is not dit.sc_embed.weight:
            p.data.normal_(0, 0.05)
    z = [torch.randn(4, 3, 4, 4), torch.randn(4, 2, 6, 4)]
    batch = pack(z, dit.patch, given_frames=[torch.tensor([True, False, False]), None])
    texts = [torch.randn(3, 32), torch.randn(2, 32)]
    text = pack_text(batch, texts, torch.stack([t.mean(0) for t in texts]))
    calls = []
    dit.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["x0_prev"].clone()), with_kwargs=True)
    for prob, passes in ((0.0, 1), (1.0, 2)):  # no video self-conditions / every video does
        dit.zero_grad(set_to_none=True)
        calls.clear()
        diffusion_loss(dit, batch, text, TrainDiTConfig().diffusion, self_cond_prob=prob)[0].backward()
        assert len(calls) == passes
        if prob == 0.0:  # as the first sampling step: nothing to condition on, given frames included
            assert calls[-1].abs().max() == 0
        assert all(p.grad is not None for p in dit.parameters())  # DDP needs every parameter in every step
    assert dit.sc_embed.weight.grad.abs().max() > 0
    fed = calls[-1]
    assert torch.equal(fed[batch.given], batch.x[batch.given])  # given elements: their clean values
    assert fed[~batch.given & batch.valid].abs().max() > 0  # the rest: the first pass's estimate


def test_repa_aligns_the_tokens_after_its_depth_to_the_features():
    from sorakit.data.packing import pack
    from sorakit.models.dit import build_dit
    from sorakit.training.dit import RepaConfig, RepaProjector

    torch.manual_seed(0)
    dit = build_dit("tiny")
    z = [torch.randn(4, 2, 4, 4), torch.randn(4, 3, 6, 4)]
    feats = [torch.randn(8, 2, 2, 2), torch.randn(8, 3, 3, 2)]
    batch = pack(z, dit.patch, features=feats, given_frames=[None, torch.tensor([True, False, False])])
    texts = [torch.randn(3, 32), torch.randn(2, 32)]
    text = pack_text(batch, texts, torch.stack([t.mean(0) for t in texts]))
    repa = RepaProjector(dit.config.dim, RepaConfig(weight=1.0, depth=1, hidden=16, dim=8))
    cfg = TrainDiTConfig().diffusion

    def losses() -> tuple[torch.Tensor, float]:  # (total, the alignment part) on the same noise
        torch.manual_seed(1)
        total = diffusion_loss(dit, batch, text, cfg, repa=repa)[0]
        torch.manual_seed(1)
        return total, (total - diffusion_loss(dit, batch, text, cfg)[0]).item()

    opt = torch.optim.Adam([*dit.parameters(), *repa.parameters()], lr=1e-2)
    first = losses()[1]
    assert 0.5 < first < 1.5  # 1 − cos of unrelated vectors
    for _ in range(30):
        opt.zero_grad()
        losses()[0].backward()
        opt.step()
    assert losses()[1] < 0.5 * first
    args = (batch.x, torch.full(batch.seq_ids.shape, 0.5), batch.pos, batch.seq_ids, *text)
    pred, hidden = dit(*args, hidden_at=1)
    assert torch.equal(pred, dit(*args)) and hidden.shape == (*batch.seq_ids.shape, dit.config.dim)
    batch.features = None
    with pytest.raises(ValueError, match="no vision features"):
        diffusion_loss(dit, batch, text, cfg, repa=repa)


def test_mask_strategy_modes():
    rng = random.Random(0)
    cfg = MaskConfig(t2v=0.2, i2v=0.2, forward=0.2, backward=0.2, interpolate=0.2)
    kinds = Counter()
    for _ in range(2000):
        g = sample_given_frames(8, cfg, rng)
        if g is None:
            kinds["t2v"] += 1
            continue
        assert 0 < g.sum() < 8  # something given, something to generate
        if g[0] and g[-1]:
            kinds["interpolate"] += 1
        elif g[0] and g.sum() == 1 and not g[1]:
            kinds["i2v_or_forward1"] += 1
        elif g[0]:
            kinds["forward"] += 1
            assert g[: g.sum()].all()  # a prefix
        else:
            kinds["backward"] += 1
            assert g[-g.sum():].all()  # a suffix
    assert all(k > 200 for k in kinds.values()) and len(kinds) == 5
    assert all(sample_given_frames(1, cfg, rng) is None for _ in range(20))  # an image: text-to-image only


def test_image_share_trains_single_temporal_patches_cut_from_the_clips():
    def clips(seed: int):
        rng = random.Random(seed)
        while True:  # each latent frame holds its own index, so a cut shows where it came from
            t = rng.randint(4, 9)
            yield {"key": "k", "caption": "a red square", "latent": torch.arange(t).float().view(1, t, 1, 1).expand(4, t, 2, 4)}

    def videos(share: float) -> list[tuple[torch.Tensor, torch.Tensor]]:  # (latent, given) per video
        cfg = from_dict(TrainDiTConfig, {"data": {"max_tokens": 256, "pool_size": 8, "image_share": share},
                                         "masks": {"t2v": 0.0, "i2v": 0.0, "forward": 1.0, "backward": 0.0, "interpolate": 0.0}})
        batches = iter(PackedLatents(cfg, (2, 2, 2), 4, seed=0, source=clips))
        out = []
        for _ in range(10):
            b = next(batches)["batch"]
            out += [(z, g) for z, g in zip(b.unpack(b.x), b.unpack(b.given))]
        return out

    mixed = videos(0.5)
    images = [(z, g) for z, g in mixed if z.shape[1] == 2]
    assert 0.3 < len(images) / len(mixed) < 0.7
    for z, g in images:  # two consecutive latent frames of a clip, generated from the text alone
        assert z[0, 1, 0, 0] == z[0, 0, 0, 0] + 1 and not g.any()
    assert all(g.any() for z, g in mixed if z.shape[1] > 2)  # the clips keep their mask strategy
    assert all(z.shape[1] >= 4 for z, _ in videos(0.0))


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*/dit.yaml")), ids=lambda p: p.parent.name)
def test_recipes_validate(recipe):
    text = recipe.read_text()
    assert text.startswith("# sorakit train dit --config recipes/")  # opens with the command that runs it
    cfg = load_config(TrainDiTConfig, recipe)
    model = dit_config(cfg.preset, **cfg.model)
    assert model.dim % model.heads == 0
