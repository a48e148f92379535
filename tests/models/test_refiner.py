"""The cascaded refiner: output shapes for each kind of refiner, the conditioning path, sampling, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sorakit.config import ConfigError
from sorakit.data.packing import pack
from sorakit.generation.refine import (
    downsample_video, psnr, refine_chain, refine_decoded, refine_latents, refine_video, upsample_video,
)
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.refiner import Refiner, build_refiner, refined_shape, refiner_config, upsample_latent
from sorakit.models.vae import VAE, vae_config

SCALES = {"spatial": (2, 1), "temporal": (1, 2), "both": (2, 2)}


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # adaLN-Zero makes a fresh model output zeros; random weights exercise every path.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return model.eval()


def _tiny(scales, **kw) -> Refiner:
    kw = {"attn_backend": "dense", **kw}
    return _randomise(build_refiner("tiny", spatial_scale=scales[0], temporal_scale=scales[1], **kw))


HEAD = {"head_width": 8, "head_depth": 2}  # the pixel-level conv head


@pytest.mark.parametrize("head", [False, True], ids=["plain", "conv-head"])
@pytest.mark.parametrize("kind", list(SCALES))
def test_shapes_through_the_network_and_the_sampler(kind, head):
    scales = SCALES[kind]
    model = _tiny(scales, **(HEAD if head else {}))
    lows = [torch.randn(4, 3, 5, 7), torch.randn(4, 1, 4, 4), torch.randn(4, 2, 3, 6)]  # odd sizes, an image
    expected = [refined_shape(tuple(z.shape), scales) for z in lows]
    s, r = scales
    assert expected[0] == (4, 1 + 2 * r, 5 * s, 7 * s)
    assert expected[1] == (4, 1, 4 * s, 4 * s)  # an image stays one frame

    conds = [upsample_latent(z, scales) for z in lows]
    assert [tuple(c.shape) for c in conds] == expected
    batch = pack([torch.zeros(e) for e in expected], model.patch)
    cond = pack(conds, model.patch).x
    t = torch.rand(batch.seq_ids.shape)
    out = model(batch.x, cond, t, torch.zeros_like(t), batch.pos, batch.seq_ids)
    assert out.shape == batch.x.shape  # (B, N, C·pt·ph·pw)
    assert [tuple(z.shape) for z in batch.unpack(out)] == expected

    refined = refine_latents(model, lows, steps=2, seed=0)
    assert [tuple(z.shape) for z in refined] == expected
    assert all(torch.isfinite(z).all() for z in refined)


@pytest.mark.parametrize("head", [False, True], ids=["plain", "conv-head"])
def test_conditioning_path_reaches_only_its_own_video(head):
    model = _tiny((2, 2), **(HEAD if head else {}))
    a, b = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 2, 4)
    ca, cb = upsample_latent(a, model.scales), upsample_latent(b, model.scales)
    xa, xb = torch.randn(ca.shape), torch.randn(cb.shape)
    batch = pack([xa, xb], model.patch, max_tokens=4096)
    assert batch.seq_ids.shape[0] == 1  # both videos in one row

    def run(cond_a, aug=0.0):
        cond = pack([cond_a, cb], model.patch, max_tokens=4096).x
        t = torch.full(batch.seq_ids.shape, 0.5)
        return batch.unpack(model(batch.x, cond, t, torch.full_like(t, aug), batch.pos, batch.seq_ids))

    ref = run(ca)
    moved = run(ca * 2 + 1)
    assert (moved[0] - ref[0]).abs().max() > 1e-3  # the low-res video steers its own output...
    torch.testing.assert_close(moved[1], ref[1], atol=1e-5, rtol=0)  # ...and no other video's
    assert (run(ca, aug=0.4)[0] - ref[0]).abs().max() > 1e-3  # the augmentation level is an input too


def test_local_windows_bound_attention_and_equal_full_attention_when_they_cover_the_video():
    lows = [torch.randn(4, 3, 6, 8), torch.randn(4, 2, 4, 4)]
    batch = pack(lows, (1, 2, 2), max_tokens=4096)
    t = torch.rand(batch.seq_ids.shape)
    full = _tiny((2, 1))
    for backend in ("dense", "segments"):
        covering = _tiny((2, 1), attn_backend=backend, attn_window=(8, 8, 8))
        torch.testing.assert_close(covering(batch.x, batch.x, t, t, batch.pos, batch.seq_ids),
                                   full(batch.x, batch.x, t, t, batch.pos, batch.seq_ids), atol=1e-5, rtol=0)
    # One block of 1×2×2-token windows: a token changes only its own window's outputs.
    local = _tiny((2, 1), attn_window=(1, 2, 2), depth=1)
    x = batch.x.clone()
    ref = local(x, x, t, t, batch.pos, batch.seq_ids)
    x[0, 0] += 1.0  # the token at (t, h, w) = (0, 0, 0) of the first video
    moved = (local(x, x, t, t, batch.pos, batch.seq_ids) - ref).abs().amax(-1)[0] > 1e-6
    same_window = (batch.seq_ids[0] == 0) & (batch.pos[0, :, 0] == 0) & (batch.pos[0, :, 1] < 2) & (batch.pos[0, :, 2] < 2)
    assert moved.any() and not (moved & ~same_window).any()


def test_the_conv_head_convolves_each_packed_video_as_if_it_were_alone():
    from sorakit.models.layers import PackedConvHead

    torch.manual_seed(0)
    head = PackedConvHead(3, 3, width=5, depth=2, kernel=(3, 3, 3), patch=(1, 2, 2))
    torch.nn.init.normal_(head.out.weight)  # the fresh head outputs zeros by design
    # two of one size (they share a grid batch) and one of another, all in one packed row
    videos = [torch.randn(3, 3, 4, 6), torch.randn(3, 2, 6, 2), torch.randn(3, 3, 4, 6)]
    batch = pack(videos, (1, 2, 2), max_tokens=4096)
    assert batch.seq_ids.shape[0] == 1
    out = batch.unpack(head(batch.x, batch.pos, batch.seq_ids))

    def direct(v):  # the same convs on the video alone, zero padding at its border
        x = v[None]
        for conv in head.convs:
            x = torch.nn.functional.silu(conv(x))
        return head.out(x)[0]

    for v, o in zip(videos, out):
        torch.testing.assert_close(o, direct(v), atol=1e-5, rtol=1e-5)


def test_upsampled_conditioning_keeps_the_low_res_frames_and_values():
    z = torch.randn(3, 4, 2, 3)
    up = upsample_latent(z, (1, 3))
    torch.testing.assert_close(up[:, ::3], z)  # low-res frame j sits on target frame j·r
    torch.testing.assert_close(up[:, 1], z[:, 0] * 2 / 3 + z[:, 1] / 3)  # new frames blend their neighbours
    flat = torch.full((2, 2, 3, 3), 0.7)
    torch.testing.assert_close(upsample_latent(flat, (2, 2)), torch.full((2, 3, 6, 6), 0.7))


@pytest.mark.parametrize("head", [False, True], ids=["plain", "conv-head"])
def test_sampling_is_reproducible_and_independent_of_batch_companions(head):
    model = _tiny((2, 1), **(HEAD if head else {}))
    a, b = torch.randn(4, 2, 3, 3), torch.randn(4, 1, 5, 2)
    alone = refine_latents(model, [a], steps=3, seed=[7])[0]
    together = refine_latents(model, [b, a], steps=3, seed=[1, 7])[1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (refine_latents(model, [a], steps=3, seed=[8])[0] - alone).abs().max() > 1e-4


def test_a_residual_refiner_adds_its_output_to_the_upsampled_input():
    z = torch.randn(4, 3, 3, 4)
    x_pred = {"parametrisation": "x"}
    fresh = build_refiner("tiny", spatial_scale=2, temporal_scale=2, residual=True, diffusion=x_pred).eval()
    # A fresh network predicts zeros (adaLN-Zero): the residual refiner then returns its input upsampled.
    torch.testing.assert_close(refine_latents(fresh, [z], steps=2, aug_level=0.0)[0], upsample_latent(z, (2, 2)))
    plain = build_refiner("tiny", spatial_scale=2, temporal_scale=2, diffusion=x_pred).eval()
    assert refine_latents(plain, [z], steps=2, aug_level=0.0)[0].abs().max() < 1e-6  # the same net, not residual


def test_a_chain_multiplies_the_scales():
    temporal, spatial = _tiny((1, 2)), _tiny((2, 1))
    [z] = refine_chain([temporal, spatial], [torch.randn(4, 3, 2, 3)], steps=1)
    assert tuple(z.shape) == (4, 5, 4, 6)


def test_refine_video_returns_the_scaled_video_for_any_size():
    vae = VAE(vae_config("tiny")).eval()
    model = _tiny((2, 2))
    frames = np.random.default_rng(0).integers(0, 256, (4, 10, 14, 3), dtype=np.uint8)  # sizes not multiples of 4
    out = refine_video(model, vae, frames, steps=1)
    assert out.shape == (7, 20, 28, 3) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="channel"):
        refine_video(_randomise(build_refiner("tiny", in_channels=8)), vae, frames, steps=1)


def test_consistency_takes_the_low_band_from_the_input():
    vae = VAE(vae_config("tiny")).eval()  # untrained: its decodes are far from any input
    model = _tiny((2, 2))
    low = np.random.default_rng(1).integers(0, 256, (3, 6, 8, 3), dtype=np.uint8).repeat(2, 1).repeat(2, 2)

    def error(video):  # how far the refined video is from reducing back to its input
        return np.abs(downsample_video(video, (2, 2)).astype(np.float64) - low).mean()

    raw = refine_video(model, vae, low, steps=1, consistency=False)
    kept = refine_video(model, vae, low, steps=1)
    assert error(kept) < 0.25 * error(raw)
    z = vae.encode_video(low).clone()  # the pipeline's path: from a base latent, decoding the base itself
    np.testing.assert_array_equal(refine_decoded(model, vae, z, low.shape[:3], steps=1, consistency=False), raw)


def test_save_and_load_keep_weights_and_sampling_settings(tmp_path):
    cfg = refiner_config("tiny", temporal_scale=2, aug_level=0.25, steps=7,
                         diffusion={"parametrisation": "flow", "zero_terminal_snr": False})
    model = _randomise(Refiner(cfg))
    save_pretrained(model, tmp_path / "r", extra={"vae": "../vae"})
    loaded = load_pretrained(tmp_path / "r", kind="refiner")
    assert loaded.config == cfg and loaded.config.diffusion.parametrisation == "flow"
    z = torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(refine_latents(loaded, [z], seed=3)[0], refine_latents(model, [z], seed=3)[0])


def test_config_rejects_a_refiner_that_changes_nothing():
    with pytest.raises(ConfigError, match="spatial_scale > 1 or temporal_scale > 1"):
        refiner_config("tiny", spatial_scale=1, temporal_scale=1)
    with pytest.raises(ConfigError, match="aug_level"):
        refiner_config("tiny", aug_level=1.0)


def test_pixel_helpers_define_low_res_and_the_baseline():
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    blocky = low.repeat(2, axis=1).repeat(2, axis=2)  # every 2×2 block one colour
    video = np.repeat(blocky, 2, axis=0)[:5]  # 5 frames: frames 0, 2, 4 are the low-res ones
    np.testing.assert_array_equal(downsample_video(video, (2, 2)), low)
    up = upsample_video(low, (1, 2))
    np.testing.assert_array_equal(up[::2], low)  # linear in time keeps the given frames
    assert up.shape == (5, 4, 5, 3) and upsample_video(low, (2, 1)).shape == (3, 8, 10, 3)
    with pytest.raises(ValueError, match="multiples of 2"):
        downsample_video(video[:, :7], (2, 1))
    a = rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255.0), abs=1e-9)
