"""The spacetime VAE: shapes at any size and length, causality, chunking, tiling, images, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sorakit.config import ConfigError
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.vae import VAE, vae_config
from sorakit.models.vae_blocks import Stream


def tiny(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(vae_config("tiny", **overrides)).eval()


def video(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def padded_input(frames: np.ndarray, vae: VAE) -> torch.Tensor:
    """What encode_video documents: last frame repeated up to 1 + k·t, edges replicated to multiples of f."""
    t, h, w, _ = frames.shape
    _, t_lat, h_lat, w_lat = vae.latent_shape(t, h, w)
    idx = np.minimum(np.arange(vae.num_frames_for(t_lat)), t - 1)
    x = torch.from_numpy(frames[idx]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
    f = vae.spatial_factor
    return torch.nn.functional.pad(x, (0, w_lat * f - w, 0, h_lat * f - h, 0, 0), mode="replicate")


@pytest.mark.parametrize("preset_overrides", [{}, {"temporal_factor": 4}, {"kind": "spatial", "temporal_factor": 1}])
@pytest.mark.parametrize("t,h,w", [(1, 16, 16), (1, 7, 5), (2, 9, 13), (5, 16, 24), (8, 21, 10), (13, 33, 17)])
def test_shapes_any_size_and_length(preset_overrides, t, h, w):
    vae = tiny(**preset_overrides)
    tf, f = vae.temporal_factor, vae.spatial_factor
    z = vae.encode_video(video(t, h, w))
    expected = (4, 1 + -(-(t - 1) // tf), -(-h // f), -(-w // f))
    assert tuple(z.shape) == vae.latent_shape(t, h, w) == expected
    full = vae.decode_video(z)
    assert full.shape == (vae.num_frames_for(z.shape[1]), z.shape[2] * f, z.shape[3] * f, 3)
    assert full.dtype == np.uint8
    assert vae.decode_video(z, t, h, w).shape == (t, h, w, 3)
    assert vae.reconstruct(torch.from_numpy(video(t, h, w))).shape == (t, h, w, 3)


def test_one_plus_k_t_frames_give_one_plus_k_latents():
    vae = tiny(temporal_factor=4)
    for k in range(4):
        assert vae.latent_shape(1 + 4 * k, 8, 8)[1] == 1 + k
        assert vae.num_frames_for(1 + k) == 1 + 4 * k


@pytest.mark.parametrize("temporal_factor", [2, 4])
def test_causal_first_latents_ignore_later_frames(temporal_factor):
    vae = tiny(temporal_factor=temporal_factor)
    frames = video(1 + 4 * temporal_factor, 16, 20)
    z = vae.encode_video(frames)
    changed = frames.copy()
    changed[1 + 2 * temporal_factor :] = 255 - changed[1 + 2 * temporal_factor :]  # latent 3 on depends on these
    z2 = vae.encode_video(changed)
    assert torch.equal(z[:, :3], z2[:, :3])
    assert not torch.allclose(z[:, 3:], z2[:, 3:])
    # The decoder is causal too: frames of latent j depend only on latents <= j.
    d, d2 = vae.decode_video(z), vae.decode_video(z2)
    assert np.array_equal(d[: 1 + 2 * temporal_factor], d2[: 1 + 2 * temporal_factor])


@pytest.mark.parametrize("chunk_frames", [1, 3])
def test_chunked_equals_one_pass(chunk_frames):
    vae = tiny(chunk_frames=chunk_frames)
    frames = video(16, 20, 28)  # 16 = not 1 + k·t: padded with the last frame
    z = vae.encode_video(frames)
    with torch.no_grad():
        one = vae.encode(padded_input(frames, vae)).mean[0]
        ref = vae.decode(z[None])[0]
    torch.testing.assert_close(z, one, rtol=1e-4, atol=1e-4)
    dec = vae.decode_video(z)
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.abs(dec.astype(int) - ref_u8.astype(int)).max() <= 1


def test_streaming_any_split_matches_one_pass():
    vae = tiny()
    x = padded_input(video(17, 16, 16), vae)
    with torch.no_grad():
        full = vae.encoder(x, Stream())
        stream = Stream()
        parts = [vae.encoder(x[:, :, a:b], stream) for a, b in [(0, 2), (2, 3), (3, 10), (10, 17)]]
        z = full[:, :4]
        dfull = vae.decoder(z, Stream())
        stream = Stream()
        dparts = [vae.decoder(z[:, :, a:b], stream) for a, b in [(0, 2), (2, 9)]]
    torch.testing.assert_close(torch.cat(parts, 2), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat(dparts, 2), dfull[:, :, : sum(p.shape[2] for p in dparts)], rtol=1e-4, atol=1e-4)


def test_iterator_of_frames_equals_array():
    vae = tiny()
    frames = video(10, 12, 12)
    assert torch.equal(vae.encode_video(frames), vae.encode_video(iter(list(frames))))


def test_spatial_tiles_blend_close_to_whole_frame():
    whole = tiny(tile_size=256, tile_overlap=0)
    tiled = tiny(tile_size=64, tile_overlap=32)
    assert len(tiled._tiles(150 // 4 + 1, 130 // 4 + 1)) > 1
    yy, xx = np.mgrid[0:150, 0:130]
    smooth = np.stack([yy * 1.5 % 256, xx * 1.8 % 256, (yy + xx) % 256], -1).astype(np.uint8)
    frames = np.repeat(smooth[None], 5, 0)
    z, zt = whole.encode_video(frames), tiled.encode_video(frames)
    assert zt.shape == z.shape
    assert (zt - z).abs().mean() < 0.1 * z.abs().mean()
    d, dt = whole.decode_video(z), tiled.decode_video(z)
    assert dt.shape == d.shape
    assert np.abs(dt.astype(float) - d.astype(float)).mean() < 6


def test_image_is_a_one_frame_video():
    vae = tiny()
    img = video(1, 24, 20)
    z = vae.encode_video(img)
    assert z.shape[1] == 1
    assert vae.decode_video(z, 1, 24, 20).shape == (1, 24, 20, 3)
    # The same frame as the first of a video gives the same first latent.
    clip = np.concatenate([img, video(4, 24, 20, seed=1)])
    torch.testing.assert_close(vae.encode_video(clip)[:, :1], z)
    recon, posterior = vae(torch.zeros(2, 3, 1, 8, 8))
    assert recon.shape == (2, 3, 1, 8, 8) and posterior.mean.shape == (2, 4, 1, 2, 2)


def test_normalisation_is_applied_and_undone():
    vae = tiny()
    frames = video(5, 16, 16)
    raw = vae.encode_video(frames)
    mean, std = [0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 4.0]
    vae.with_latent_stats(mean, std)
    z = vae.encode_video(frames)
    expected = (raw - torch.tensor(mean).view(-1, 1, 1, 1)) / torch.tensor(std).view(-1, 1, 1, 1)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = vae.decode(raw[None])[0]
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.abs(vae.decode_video(z).astype(int) - ref_u8.astype(int)).max() <= 1


def test_save_load_round_trip(tmp_path):
    vae = tiny()
    vae.with_latent_stats([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    save_pretrained(vae, tmp_path / "vae")
    loaded = load_pretrained(tmp_path / "vae", kind="vae")
    assert loaded.config == vae.config
    frames = video(5, 12, 12)
    assert torch.equal(loaded.encode_video(frames), vae.encode_video(frames))
    assert (loaded.temporal_factor, loaded.spatial_factor, loaded.latent_channels) == (2, 4, 4)


def test_pixels_kind_is_the_identity_at_any_size(tmp_path):
    vae = VAE(vae_config("pixels"))
    frames = video(6, 13, 22)
    z = vae.encode_video(frames)
    assert tuple(z.shape) == vae.latent_shape(6, 13, 22) == (3, 6, 13, 22) and float(z.abs().max()) <= 1.0
    assert np.array_equal(vae.decode_video(z, 6, 13, 22), frames)  # exact: uint8 → [-1, 1] → uint8
    save_pretrained(vae, tmp_path / "pixels")  # no weights, a config only
    assert np.array_equal(load_pretrained(tmp_path / "pixels", kind="vae").reconstruct(frames), frames)
    with pytest.raises(ConfigError, match="pixels VAE"):
        vae_config("pixels", spatial_factor=2)


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="channel_mult"):
        vae_config("tiny", spatial_factor=8)
    with pytest.raises(ConfigError, match="spatial"):
        vae_config("tiny", kind="spatial")
    with pytest.raises(ConfigError, match="unknown VAE preset"):
        vae_config("huge")
    vae = tiny()
    with pytest.raises(ValueError, match="uint8"):
        vae.encode_video(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        vae.encode_video(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="1 \\+ k"):
        vae.encode(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="crop"):
        vae.decode_video(torch.zeros(4, 2, 2, 2), num_frames=10)
