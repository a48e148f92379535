"""Patch n' pack: round trips, first-fit-decreasing, token dropping, per-video loss, the packed loader."""

from __future__ import annotations

import random

import pytest
import torch

from sorakit.data.packing import (
    cut_frames,
    first_fit_decreasing,
    frame_window,
    grid_positions,
    num_tokens,
    pack,
    pack_text,
    packed_batches,
    patchify,
    per_video_loss,
    token_features,
    unpatchify,
)


def _latents(seed: int, n: int, c: int = 3) -> list[torch.Tensor]:
    rng = random.Random(seed)
    return [torch.randn(c, rng.randint(1, 5), rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]


@pytest.mark.parametrize("patch", [(1, 1, 1), (1, 2, 2), (2, 3, 2)])
def test_patchify_round_trip_at_shapes_not_divisible_by_the_patch(patch):
    z = torch.randn(3, 5, 7, 4)
    tokens = patchify(z, patch)
    assert tokens.shape == (num_tokens(z.shape, patch), 3 * patch[0] * patch[1] * patch[2])
    torch.testing.assert_close(unpatchify(tokens, z.shape, patch), z, rtol=0, atol=0)


def test_pack_unpack_round_trip_across_rows():
    lat = _latents(0, 12)
    batch = pack(lat, (1, 2, 2), max_tokens=80)
    assert batch.seq_ids.shape[0] > 1  # several rows
    assert batch.x.shape[1] <= 80
    for got, want in zip(batch.unpack(batch.x), lat):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Every video is contiguous with its own positions and slot; padding is -1.
    for v in batch.videos:
        seg = batch.seq_ids[v.row, v.start : v.start + v.length]
        assert (seg == v.slot).all()
        from sorakit.data.packing import token_grid

        assert torch.equal(batch.pos[v.row, v.start : v.start + v.length], grid_positions(token_grid(v.shape, (1, 2, 2))))
    assert batch.real_tokens == int((batch.seq_ids >= 0).sum())
    assert batch.valid.sum() == sum(z.numel() for z in lat)


def test_first_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(3)
    lengths = [rng.randint(1, 100) for _ in range(200)]
    bins = first_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 11 / 9 * (sum(lengths) / 128) + 1  # FFD's bound over the optimum
    with pytest.raises(ValueError, match="more than the row capacity"):
        first_fit_decreasing([10, 200], 128)


def test_token_dropping_keeps_positions_of_the_kept_tokens():
    z = torch.randn(3, 4, 6, 6)
    batch = pack([z], (1, 2, 2), drop_rates=[0.5], generator=torch.Generator().manual_seed(0))
    v = batch.videos[0]
    assert v.length == num_tokens(z.shape, (1, 2, 2)) // 2
    full = grid_positions((4, 3, 3))
    assert torch.equal(batch.pos[0, : v.length], full[v.keep])
    assert torch.equal(batch.x[0, : v.length], patchify(z, (1, 2, 2))[v.keep])
    with pytest.raises(ValueError, match="dropped"):
        batch.unpack(batch.x)


def test_given_frames_mark_their_elements():
    z = torch.randn(2, 4, 4, 4)
    frames = torch.tensor([True, False, False, True])
    batch = pack([z], (1, 2, 2), given_frames=[frames])
    back = unpatchify(batch.given[0, : batch.videos[0].length], z.shape, (1, 2, 2))
    assert back[:, 0].all() and back[:, 3].all() and not back[:, 1:3].any()
    assert batch.token_given()[0].sum() == 2 * 4  # two latent frames of 2×2 tokens


def test_per_video_loss_weights_videos_not_tokens():
    big, small = torch.zeros(1, 8, 8, 8), torch.zeros(1, 1, 2, 2)
    batch = pack([big, small], (1, 1, 1))
    loss_el = batch.per_token(torch.tensor([1.0, 3.0]))[..., None].expand_as(batch.x)
    w = batch.valid
    per_video, means = per_video_loss(loss_el, w, batch, "video")
    torch.testing.assert_close(means, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per_video, torch.tensor(2.0))
    flat, _ = per_video_loss(loss_el, w, batch, "token")
    torch.testing.assert_close(flat, (512 * 1.0 + 4 * 3.0) / 516 * torch.ones(()))
    # A fully given video has nothing to learn and is left out.
    only_big, _ = per_video_loss(loss_el, w & (batch.per_token(torch.tensor([True, False]))[..., None]), batch)
    torch.testing.assert_close(only_big, torch.tensor(1.0))


def test_pack_text_keeps_each_videos_text_with_its_slot():
    lat = [torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 3), torch.randn(1, 2, 2, 2)]
    batch = pack(lat, (1, 1, 1), max_tokens=10)
    texts = [torch.full((n, 4), float(i)) for i, n in enumerate([2, 3, 1])]
    ctx, ctx_ids, pooled = pack_text(batch, texts, torch.arange(3.0)[:, None].expand(3, 4))
    for i, v in enumerate(batch.videos):
        assert (ctx[v.row][ctx_ids[v.row] == v.slot] == i).all()
        assert (ctx_ids[v.row] == v.slot).sum() == texts[i].shape[0]
        assert (pooled[v.row, v.slot] == i).all()


def test_packed_batches_fill_rows_and_see_every_video_once():
    rng = random.Random(1)
    samples = [
        {"key": f"k{i}", "caption": f"c{i}", "latent": torch.randn(2, rng.randint(1, 6), rng.randint(2, 8), rng.randint(2, 8))}
        for i in range(150)
    ]
    samples.append({"key": "long", "caption": "long", "latent": torch.randn(2, 40, 8, 8)})  # longer than a row
    batches = list(packed_batches(samples, (1, 2, 2), max_tokens=64, rows=2, pool_size=24))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(s["key"] for s in samples)
    assert all(b["batch"].x.shape[:2] == (2, 64) for b in batches)
    real = sum(b["batch"].real_tokens for b in batches)
    cap = sum(b["batch"].capacity for b in batches[:-2])  # the drained tail may be partial
    assert real / (cap + 2 * 2 * 64) > 0.95
    long = next(b for b in batches if "long" in b["keys"])
    assert long["batch"].videos[long["keys"].index("long")].shape[1] == 4  # cut to 4 frames of 16 tokens


def test_a_frame_window_cuts_the_latent_and_its_features_together():
    z = torch.arange(10.0).view(1, 10, 1, 1).expand(1, 10, 4, 4)
    sample = {"latent": z, "features": torch.arange(10.0).view(1, 10, 1, 1).expand(5, 10, 2, 3), "caption": "c"}
    w = cut_frames(sample, frame_window(z.shape, (1, 2, 2), max_tokens=12, rng=random.Random(0)))
    assert w["latent"].shape[1] == 3 and torch.equal(w["latent"][0, :, 0, 0], w["latent"][0, 0, 0, 0] + torch.arange(3.0))
    assert torch.equal(w["features"][0, :, 0, 0], w["latent"][0, :, 0, 0]) and w["caption"] == "c"
    assert frame_window(z.shape, (1, 2, 2), max_tokens=40) == slice(None)  # it fits: all of it
    with pytest.raises(ValueError, match="tokens per frame"):
        frame_window((1, 2, 20, 20), (1, 2, 2), max_tokens=50)


def test_features_follow_their_tokens_through_packing_and_dropping():
    # Features on the token grid: each token's row is its own (t, h, w), so any misplacement shows.
    z = [torch.randn(4, 4, 6, 4), torch.randn(4, 2, 4, 4)]
    grids = [(2, 3, 2), (1, 2, 2)]
    feats = [grid_positions(g).T.float().reshape(3, *g).repeat_interleave(2, 1) for g in grids]  # (3, T', h, w)
    for rates in ([0.0, 0.0], [0.5, 0.3]):
        b = pack(z, (2, 2, 2), max_tokens=12, features=feats, drop_rates=rates, generator=torch.Generator().manual_seed(0))
        assert b.features.shape == (*b.seq_ids.shape, 3)
        real = b.seq_ids >= 0
        torch.testing.assert_close(b.features[real], b.pos[real].float())  # a token's features are its place's
        assert (b.features[~real] == 0).all()
    # A finer map is averaged over each token's temporal patch and resampled to its grid.
    fine = torch.arange(4.0).view(1, 4, 1, 1).expand(1, 4, 6, 4)
    assert token_features(fine, (2, 3, 2))[:, 0].tolist() == [0.5] * 6 + [2.5] * 6
    with pytest.raises(ValueError, match="like its latent"):
        pack(z, (2, 2, 2), features=[feats[0], feats[0]])


