"""generate_latents: shapes, given frames bit-exact, seeds, batch independence, SDEdit; pipeline directories."""

from __future__ import annotations

import json

import pytest
import torch

from sorakit.data.packing import pack
from sorakit.diffusion import DiffusionConfig
from sorakit.generation.pipeline import export_pipeline, load_pipeline
from sorakit.generation.sampling import GivenLatents, generate_latents
from sorakit.models.dit import build_dit
from sorakit.models.io import save_pretrained
from sorakit.models.text_encoder import build_text_encoder
from sorakit.models.vae import VAE, vae_config

CFG = DiffusionConfig(shift_base_tokens=128)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dit = build_dit("tiny")
    for p in dit.parameters():  # a fresh DiT predicts exactly zero; random weights make it do something
        p.data.normal_(0, 0.05)
    return dit.eval(), build_text_encoder("tiny").eval()


def test_shapes_given_frames_and_reproducibility(models):
    dit, te = models
    z = torch.randn(4, 5, 6, 7)
    frames = torch.tensor([True, True, False, False, True])
    shapes = [(5, 6, 7), (3, 4, 9), (1, 8, 8)]  # a video, another size, an image
    kw = dict(steps=4, seed=11, guidance=3.0)
    out = generate_latents(dit, CFG, te, ["a", "b", "c"], shapes, given=[GivenLatents(z, frames), None, None], **kw)
    assert [tuple(o.shape) for o in out] == [(4, *s) for s in shapes]
    assert torch.equal(out[0][:, frames], z[:, frames])  # given frames bit for bit
    assert not torch.equal(out[0][:, ~frames], z[:, ~frames])
    again = generate_latents(dit, CFG, te, ["a", "b", "c"], shapes, given=[(z, frames), None, None], **kw)
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    other = generate_latents(dit, CFG, te, ["a", "b", "c"], shapes, given=[(z, frames), None, None], **{**kw, "seed": 12})
    assert not torch.equal(out[1], other[1])
    # A video does not depend on what else shares its batch (its own seed, its own attention block).
    alone = generate_latents(dit, CFG, te, ["b"], [shapes[1]], steps=4, seed=[kw["seed"] + 1], guidance=3.0)
    torch.testing.assert_close(alone[0], out[1], atol=1e-4, rtol=1e-4)


def test_guidance_prompt_and_sdedit(models):
    dit, te = models
    base = dict(steps=6, seed=0)
    a = generate_latents(dit, CFG, te, ["red"], [(2, 4, 4)], guidance=4.0, **base)[0]
    b = generate_latents(dit, CFG, te, ["blue"], [(2, 4, 4)], guidance=4.0, **base)[0]
    unguided = generate_latents(dit, CFG, te, ["red"], [(2, 4, 4)], guidance=1.0, **base)[0]
    assert (a - b).abs().max() > 1e-4 and (a - unguided).abs().max() > 1e-4
    init = torch.randn(4, 2, 4, 4)
    steps = []
    light = generate_latents(dit, CFG, te, ["red"], [(2, 4, 4)], init_latents=[init], strength=0.3,
                             callback=lambda i, x, x0: steps.append(i), **base)[0]
    assert len(steps) == round(6 * 0.3)
    heavy = generate_latents(dit, CFG, te, ["red"], [(2, 4, 4)], init_latents=[init], strength=1.0, **base)[0]
    assert (light - init).abs().mean() < (heavy - init).abs().mean()  # less strength stays nearer the input


def test_bad_inputs_name_the_problem(models):
    dit, te = models
    with pytest.raises(ValueError, match="given latent 0 must be"):
        generate_latents(dit, CFG, te, ["a"], [(3, 4, 4)], given=[(torch.zeros(4, 2, 4, 4), torch.ones(2, dtype=torch.bool))])
    with pytest.raises(ValueError, match="2 shapes for 1 prompts"):
        generate_latents(dit, CFG, te, ["a"], [(1, 2, 2), (1, 2, 2)])
    with pytest.raises(ValueError, match="rectified-flow"):
        generate_latents(dit, CFG, te, ["a"], [(1, 2, 2)], sampler="heun")


def test_pipeline_round_trip(tmp_path, models):
    dit, _ = models
    save_pretrained(VAE(vae_config("tiny")), tmp_path / "vae")
    save_pretrained(build_text_encoder("tiny"), tmp_path / "te")
    cfg = DiffusionConfig(parametrisation="flow", shift_base_tokens=64)
    out = export_pipeline(tmp_path / "run", dit, cfg, tmp_path / "vae", tmp_path / "te")
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta == {"format": "sorakit-pipeline", "dit": "dit", "vae": "../vae", "text_encoder": "../te", "refiners": []}
    pipe = load_pipeline(out)
    assert pipe.diffusion_cfg == cfg
    for p, q in zip(pipe.dit.parameters(), dit.parameters()):
        assert torch.equal(p, q)
    assert pipe.vae.latent_channels == 4 and pipe.text_encoder.dim == 32
    # Moved as a whole, it still loads; a missing component is a one-line error naming it.
    (tmp_path / "moved").mkdir()
    for name in ("run", "vae", "te"):
        (tmp_path / name).rename(tmp_path / "moved" / name)
    assert load_pipeline(tmp_path / "moved" / "run").dit.config.dim == dit.config.dim
    (tmp_path / "moved" / "te").rename(tmp_path / "moved" / "gone")
    with pytest.raises(FileNotFoundError, match="component directory ../te"):
        load_pipeline(tmp_path / "moved" / "run")
    copied = export_pipeline(tmp_path / "portable", dit, cfg, tmp_path / "moved" / "vae", tmp_path / "moved" / "gone", copy=True)
    assert json.loads((copied / "pipeline.json").read_text())["vae"] == "vae"
    assert load_pipeline(copied).text_encoder.dim == 32


def test_self_conditioning_feeds_each_call_the_previous_estimate():
    torch.manual_seed(0)
    dit = build_dit("tiny", self_condition=True)
    for p in dit.parameters():
        p.data.normal_(0, 0.05)
    te = build_text_encoder("tiny").eval()
    seen = []
    hook = dit.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["x0_prev"].clone()), with_kwargs=True)
    estimates = []
    z = torch.randn(4, 3, 4, 4)
    frames = torch.tensor([True, False, False])
    try:
        out = generate_latents(dit.eval(), CFG, te, ["a"], [(3, 4, 4)], given=[(z, frames)], steps=4, seed=1,
                               guidance=1.0, callback=lambda i, x, x0: estimates.append(x0.clone()))
    finally:
        hook.remove()
    assert len(seen) == 4 and seen[0].abs().max() == 0  # nothing to condition on at the first step
    layout = pack([z], dit.patch, given_frames=[frames])
    for before, fed in zip(estimates, seen[1:]):  # call i + 1 sees the sampler's x0 of step i ...
        torch.testing.assert_close(fed[~layout.given], before[~layout.given])
        assert torch.equal(fed[layout.given], layout.x[layout.given])  # ... with the given frames clean
    assert torch.equal(out[0][:, frames], z[:, frames])
