"""The DiT on packed spacetime patches: isolation between packed videos, RoPE, presets, save/load."""

from __future__ import annotations

import pytest
import torch

from sorakit.data.packing import pack, pack_text
from sorakit.models import layers
from sorakit.models.dit import DIT_PRESETS, ROPE_KINDS, DiT, build_dit, dit_config, fractional_positions, video_extents
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.layers import AxialRoPE3D, MixedRoPE3D, Mlp, apply_rope


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # adaLN-Zero makes a fresh model output zeros; random weights exercise every path.
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
        p.requires_grad_(False)  # forward checks only (flex_attention has no backward on CPU)
    return model.eval()


def _inputs(dit: DiT, latents, texts, t=None):
    batch = pack(latents, dit.patch, max_tokens=4096)  # one row holds them all
    ctx, ctx_ids, pooled = pack_text(batch, texts, torch.stack([x.mean(0) for x in texts]))
    t = torch.full(batch.seq_ids.shape, 0.5) if t is None else t
    return batch, (batch.x, t, batch.pos, batch.seq_ids, ctx, ctx_ids, pooled, batch.token_given())


@pytest.mark.parametrize("backend", ["dense", "segments", "flex"])
def test_no_attention_leakage_between_packed_videos(backend):
    dit = _randomise(build_dit("tiny", attn_backend=backend))
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, 6, 8, generator=g), torch.randn(4, 2, 4, 6, generator=g)
    ta, tb = torch.randn(5, 32, generator=g), torch.randn(3, 32, generator=g)
    batch, args = _inputs(dit, [a, b], [ta, tb])
    assert batch.seq_ids.shape[0] == 1 and len(set(batch.seq_ids[0].tolist()) - {-1}) == 2  # one row, two videos
    out = batch.unpack(dit(*args))
    # Change everything about video A (latent and text): video B's output must not move.
    _, args2 = _inputs(dit, [a * 3 + 1, b], [ta.flip(0) * 2, tb])
    out2 = batch.unpack(dit(*args2))
    torch.testing.assert_close(out2[1], out[1], atol=1e-5, rtol=0)
    assert (out2[0] - out[0]).abs().max() > 1e-3


def test_no_gradient_flows_between_packed_videos():
    dit = _randomise(build_dit("tiny", attn_backend="dense"))
    a, b = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    batch, args = _inputs(dit, [a, b], [torch.randn(2, 32), torch.randn(2, 32)])
    x = args[0].clone().requires_grad_(True)
    out = dit(x, *args[1:])
    vb = batch.videos[1]
    out[vb.row, vb.start : vb.start + vb.length].sum().backward()
    va = batch.videos[0]
    assert x.grad[va.row, va.start : va.start + va.length].abs().max() == 0
    assert x.grad[vb.row, vb.start : vb.start + vb.length].abs().max() > 0


def test_backends_agree():
    dit = _randomise(build_dit("tiny", attn_backend="dense"))
    lat = [torch.randn(4, 3, 5, 7), torch.randn(4, 1, 8, 8), torch.randn(4, 2, 2, 10)]
    _, args = _inputs(dit, lat, [torch.randn(4, 32), torch.randn(1, 32), torch.randn(6, 32)])
    ref = dit(*args)
    for backend in ("segments", "flex"):
        dit.config.attn_backend = backend
        torch.testing.assert_close(dit(*args), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plain_up_to", [layers.CPU_BF16_MATH_MAX_TOKENS, 0])  # plain bf16 product, flash kernel
def test_bf16_autocast_on_cpu_follows_float32_and_keeps_videos_apart(monkeypatch, plain_up_to):
    # `trainer.precision: bf16-mixed` on a CPU: short videos take the plain bf16 attention product.
    monkeypatch.setattr(layers, "CPU_BF16_MATH_MAX_TOKENS", plain_up_to)
    q, k, v = torch.randn(3, 1, 2, 50, 16).mul(2).unbind(0)  # peaked attention, as a trained model's
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    fast = layers.video_attention(*(x.bfloat16() for x in (q, k, v)))
    assert fast.dtype == torch.bfloat16 and ((fast.float() - exact).norm() / exact.norm()).item() < 0.02
    dit = _randomise(build_dit("tiny", attn_backend="segments", head_width=8))  # the conv head too
    lat = [torch.randn(4, 3, 5, 7), torch.randn(4, 2, 6, 6)]
    texts = [torch.randn(4, 32), torch.randn(3, 32)]
    batch, args = _inputs(dit, lat, texts)
    ref = dit(*args)
    x = args[0].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dit(x, *args[1:])
        _, args2 = _inputs(dit, [lat[0] * 3 + 1, lat[1]], [texts[0].flip(0), texts[1]])
        out2 = dit(*args2)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03
    a, b = batch.videos
    torch.testing.assert_close(out2[b.row, b.start : b.start + b.length], out[b.row, b.start : b.start + b.length])
    out[b.row, b.start : b.start + b.length].float().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[a.row, a.start : a.start + a.length].abs().max() == 0


def test_rope_scores_depend_only_on_relative_position_even_far_beyond_training_sizes():
    rope = AxialRoPE3D(16)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    base = score([1, 2, 3], [0, 5, 1])
    for shift in ([7, 0, 0], [0, 300, 0], [40, 900, 1200]):
        moved = score([1 + shift[0], 2 + shift[1], 3 + shift[2]], [0 + shift[0], 5 + shift[1], 1 + shift[2]])
        torch.testing.assert_close(moved, base, atol=1e-3, rtol=1e-4)
    assert not torch.isclose(score([1, 2, 3], [0, 6, 1]), base)  # the relative position does matter


def test_mixed_rope_starts_half_axial_and_can_follow_a_moving_object():
    axial, mixed = AxialRoPE3D(16), MixedRoPE3D(16, heads=2)
    pos = torch.randint(0, 50, (1, 7, 3))
    (ca, sa), (cm, sm) = axial(pos), mixed(pos)
    assert cm.shape == (1, 2, 7, 8)
    torch.testing.assert_close(cm[:, :, :, 0::2], ca[:, :, :, 0::2].expand(1, 2, 7, 4))  # the axial half
    assert (cm[:, :, :, 1::2] - ca[:, :, :, 1::2]).abs().max() > 1e-2  # the other half mixes the axes
    # Frequencies along (v, 0, -1): the phase is the same wherever w - w' = v (t - t'), so a query
    # scores highest on the key one frame back and v tokens behind it, for every frame gap.
    v = 2.0
    with torch.no_grad():
        mixed.freqs.copy_(torch.tensor([v, 0.0, -1.0]) * torch.linspace(0.05, 0.6, 8)[None, :, None])
    q = torch.randn(1, 1, 1, 16, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def score(pq, pk):
        cq, sq = mixed(torch.tensor([[pq]]))
        ck, sk = mixed(torch.tensor([[pk]]))
        return (apply_rope(q, cq[:1, :1], sq[:1, :1]) * apply_rope(q, ck[:1, :1], sk[:1, :1])).sum()

    for gap in (1, 2, 3):
        best = max(range(-10, 11), key=lambda dw: score([gap, 5, 20], [0, 5, 20 - dw]).item())
        assert best == v * gap


def test_fractional_mixed_rope_follows_one_relative_motion_across_clip_sizes_and_lengths():
    mixed = MixedRoPE3D(16, heads=1, fractional=True)
    pos = torch.randint(0, 50, (1, 7, 3))
    cos, _ = mixed(pos, torch.rand(1, 7, 3))
    torch.testing.assert_close(cos[..., 0::2], AxialRoPE3D(16)(pos)[0][..., 0::2])  # the axial half: integer positions
    with pytest.raises(ValueError, match="fractional position"):
        mixed(pos)
    # Frequencies along (fraction of the clip, 0, −½ fraction of the frame): "crosses half the frame
    # over the clip". From a token in the last frame, the best-scoring key in the first frame is half
    # the frame back, for a short wide clip and a long narrow one alike, at their different slopes.
    with torch.no_grad():
        mixed.freqs.zero_()
        mixed.freqs[0, :, 3:] = torch.tensor([0.5, 0.0, -1.0]) * torch.linspace(0.05, 0.4, 8)[:, None]
    q = torch.randn(1, 1, 1, 16, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def score(pq, pk, extent):
        frac = (torch.tensor([[pq, pk]]).float() + 0.5) / torch.tensor(extent).float()
        c, s = mixed(torch.tensor([[pq, pk]]), frac)
        return (apply_rope(q, c[..., :1, :], s[..., :1, :]) * apply_rope(q, c[..., 1:, :], s[..., 1:, :])).sum()

    for frames, width in ((3, 16), (16, 4), (9, 10)):
        last, w = frames - 1, width - 1
        best = max(range(width), key=lambda wk: score([last, 2, w], [0, 2, wk], (frames, 5, width)).item())
        assert abs(best - (w - 0.5 * width * last / frames)) <= 0.5 + 1e-6


def test_fractional_positions_do_not_depend_on_where_a_video_is_placed():
    batch = pack([torch.randn(4, 3, 6, 10)], (1, 2, 2), max_tokens=64)
    frac = fractional_positions(batch.pos, batch.seq_ids)
    moved = fractional_positions(batch.pos + torch.tensor([4, 50, 7]), batch.seq_ids)
    torch.testing.assert_close(moved, frac)
    assert frac.min() > 0 and frac.max() < 1


@pytest.mark.parametrize("rope", [*ROPE_KINDS, "mixed+comoving", "axial+head"])
def test_model_runs_at_unseen_sizes_and_is_translation_invariant(rope):
    rope, _, extra = rope.partition("+")
    dit = _randomise(build_dit("tiny", rope=rope, frac_pos_freqs=3 if rope == "mixed_frac" else 0,
                               comoving=extra == "comoving", head_width=8 if extra == "head" else 0))
    z = torch.randn(4, 9, 26, 3)  # odd sizes: patch padding, an aspect far from anything trained
    batch, args = _inputs(dit, [z], [torch.randn(3, 32)])
    out = dit(*args)
    assert out.shape == batch.x.shape and torch.isfinite(out).all()
    moved = list(args)
    moved[2] = args[2] + torch.tensor([5, 100, 37])  # same video placed elsewhere in spacetime
    torch.testing.assert_close(dit(*moved), out, atol=1e-4, rtol=1e-4)


def test_given_flag_and_per_token_time_change_only_their_tokens():
    dit = _randomise(build_dit("tiny", attn_backend="dense"))
    z = torch.randn(4, 4, 4, 4)
    batch, args = _inputs(dit, [z], [torch.randn(3, 32)])
    out = dit(*args)
    t = args[1].clone()
    t[0, :4] = 0.0  # first latent frame's tokens are clean: their own conditioning differs
    given = torch.zeros_like(args[7])
    given[0, :4] = True
    out2 = dit(args[0], t, *args[2:7], given)
    assert (out2[0, :4] - out[0, :4]).abs().max() > 1e-3
    cond, idx = dit.conditioning(t, args[3], args[6])
    assert cond.shape[0] == 2 and idx[0, :4].unique().numel() == 1  # two (video, time) pairs


def test_fresh_model_predicts_zero_and_presets_validate():
    dit = build_dit("tiny")
    batch, args = _inputs(dit, [torch.randn(4, 2, 4, 4)], [torch.randn(2, 32)])
    assert dit(*args).abs().max() == 0  # adaLN-Zero: every block starts as the identity, the output at 0
    for name in DIT_PRESETS:
        cfg = dit_config(name)
        assert cfg.dim % cfg.heads == 0
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_config("huge")
    with pytest.raises(ValueError, match="divisible"):
        dit_config("tiny", heads=3)


def test_save_and_load_pretrained(tmp_path):
    dit = _randomise(build_dit("tiny", patch=(1, 1, 2)))
    save_pretrained(dit, tmp_path / "dit", extra={"diffusion": {"parametrisation": "v"}})
    loaded = load_pretrained(tmp_path / "dit", kind="dit")
    assert tuple(loaded.config.patch) == (1, 1, 2)
    _, args = _inputs(dit, [torch.randn(4, 2, 3, 3)], [torch.randn(2, 32)])
    torch.testing.assert_close(loaded(*args), dit(*args))


def test_self_conditioning_sees_the_previous_estimate_and_starts_switched_off():
    fresh = build_dit("tiny", self_condition=True)
    _, args = _inputs(fresh, [torch.randn(4, 2, 4, 4)], [torch.randn(2, 32)])
    for p in fresh.parameters():  # random weights everywhere except the zero-initialised sc embedding
        if p is not fresh.sc_embed.weight:
            p.data.normal_(0, 0.1)
    x0_hat = torch.randn_like(args[0])
    with torch.no_grad():
        torch.testing.assert_close(fresh(*args, x0_prev=x0_hat), fresh(*args))
        fresh.sc_embed.weight.data.normal_(0, 0.1)
        assert (fresh(*args, x0_prev=x0_hat) - fresh(*args)).abs().max() > 1e-3
    plain = build_dit("tiny")
    assert plain.sc_embed is None and "sc_embed.weight" not in plain.state_dict()


def test_fractional_positions_are_relative_to_each_videos_own_extent():
    from sorakit.models.dit import fractional_features

    small, large = torch.randn(4, 1, 6, 6), torch.randn(4, 3, 10, 10)  # 1×3×3 and 3×5×5 tokens of (1, 2, 2)
    batch = pack([small, large], (1, 2, 2), max_tokens=80)  # a row each; the short row is padded
    feats = fractional_features(batch.pos, batch.seq_ids, 3)
    s, l = batch.videos
    assert (batch.seq_ids[s.row] == -1).any()
    centre_small = feats[s.row, s.start + 4]  # (0, 1, 1) of 1×3×3
    centre_large = feats[l.row, l.start + 37]  # (1, 2, 2) of 3×5×5: 25 + 2·5 + 2
    torch.testing.assert_close(centre_small, centre_large)
    assert (feats[l.row, l.start] - centre_large).abs().max() > 0.5  # a corner is elsewhere
    alone = pack([large, small], (1, 2, 2), max_tokens=128)  # now sharing a row
    shared = fractional_features(alone.pos, alone.seq_ids, 3)[0]
    torch.testing.assert_close(shared[:75], feats[l.row, :75])
    torch.testing.assert_close(shared[75:], feats[s.row, :9])


def test_comoving_rope_starts_switched_off_and_moves_each_heads_frame_with_the_prompt():
    fresh = build_dit("tiny", rope="mixed", comoving=True)
    texts = [torch.randn(3, 32), torch.randn(2, 32)]
    batch, args = _inputs(fresh, [torch.randn(4, 4, 6, 8), torch.randn(4, 2, 4, 4)], texts)
    plain = build_dit("tiny", rope="mixed")
    # Weights large enough for peaked attention, where positions matter.
    state = {k: torch.randn(v.shape) * 0.5 for k, v in fresh.state_dict().items() if not k.startswith("velocity.")}
    fresh.load_state_dict(state, strict=False)
    plain.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(*args), plain(*args), atol=1e-4, rtol=1e-4)  # zero velocity: as without it

        # A velocity of +½ frame per clip in w for every head: the positions RoPE sees slide back by
        # half the frame's width over the clip, so "half the frame, one clip later" lines up.
        fresh.velocity.bias.copy_(torch.tensor([0.0, 0.5] * fresh.config.heads))
        pos, seq_ids, pooled = args[2], args[3], args[6]
        extents = video_extents(pos, seq_ids)
        frac = fractional_positions(pos, seq_ids, extents=extents)
        pos_h, frac_h = fresh.comoving_positions(pos, frac, extents[1], seq_ids, pooled)
        assert pos_h.shape == (1, fresh.config.heads, pos.shape[1], 3)
        for head in range(fresh.config.heads):  # time and height do not move
            torch.testing.assert_close(pos_h[:, head, :, :2], pos[..., :2].float())
        expected_w = pos[..., 2].float() - 0.5 * frac[..., 0] * extents[1][..., 2].float()
        torch.testing.assert_close(pos_h[:, 0, :, 2], expected_w)
        torch.testing.assert_close(frac_h[:, 1, :, 2], frac[..., 2] - 0.5 * frac[..., 0])
        assert (fresh(*args) - plain(*args)).abs().max() > 1e-3

    # Each video's velocity comes from its own text: changing video A's prompt leaves video B alone.
    fresh.velocity.weight.data.normal_(0, 0.1)
    with torch.no_grad():
        out = batch.unpack(fresh(*args))
        _, other = _inputs(fresh, batch.unpack(batch.x), [texts[0] * -3, texts[1]])
        changed = batch.unpack(fresh(*other[:1], *args[1:4], *other[4:7], args[7]))
    torch.testing.assert_close(changed[1], out[1], atol=1e-5, rtol=0)
    assert (changed[0] - out[0]).abs().max() > 1e-3
    # And it learns from the loss.
    fresh.train()
    fresh(*args).pow(2).mean().backward()
    assert fresh.velocity.weight.grad.abs().max() > 0


def test_mix_mlp_convolves_each_packed_video_on_its_own_grid_like_conv3d():
    from sorakit.models.layers import MixMlp, neighbour_index

    kernel = (3, 3, 3)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 3, 5, 7, generator=g), torch.randn(6, 2, 4, 6, generator=g)
    batch = pack([a, b], (1, 1, 1), max_tokens=256, drop_rates=[0.3, 0.0], generator=g)  # A loses 30% of its tokens
    mix = MixMlp(6, 12, kernel)
    mix.taps.data = torch.randn(mix.taps.shape, generator=g)
    mix.tap_bias.data = torch.randn(6, generator=g)
    plain = Mlp(6, 12)
    plain.load_state_dict(mix.state_dict(), strict=False)
    nbr = neighbour_index(batch.pos, batch.seq_ids, kernel)
    with torch.no_grad():
        got = mix(batch.x, nbr)  # (1, N, 6)
        for video, latent in zip(batch.videos, (a, b)):
            tokens = slice(video.start, video.start + video.length)
            kept = batch.pos[video.row, tokens].T  # (3, L)
            # The reference: the video's kept tokens on a dense grid (dropped ones zero), Conv3d, then the MLP.
            grid = torch.zeros_like(latent)
            grid[:, *kept] = batch.x[video.row, tokens].T
            w = mix.taps.T.reshape(6, 1, *kernel)
            conv = torch.nn.functional.conv3d(grid[None], w, mix.tap_bias, padding=1, groups=6)[0]
            want = plain(conv[:, *kept].T)  # (L, 6)
            torch.testing.assert_close(got[video.row, tokens], want, atol=1e-5, rtol=1e-5)
    assert batch.videos[0].keep is not None  # the dropped tokens were exercised


# Each local extra: its options, the parameters that training would move off their starting values,
# and options it must refuse.
_LOCAL_EXTRAS = {
    "mlp_kernel": (dict(mlp_kernel=(3, 3, 3)), lambda m: [b.mlp.taps for b in m.blocks], dict(mlp_kernel=(1, 2, 3))),
    "head": (dict(head_width=8), lambda m: list(m.head.parameters()), dict(head_width=8, head_kernel=(1, 2, 3))),
}


@pytest.mark.parametrize("extra", list(_LOCAL_EXTRAS))
def test_local_extras_start_as_the_plain_dit_and_keep_packed_videos_apart(extra):
    options, trained, invalid = _LOCAL_EXTRAS[extra]
    plain = _randomise(build_dit("tiny", attn_backend="dense"))
    extended = build_dit("tiny", attn_backend="dense", **options).eval()
    extended.load_state_dict(plain.state_dict(), strict=False)  # fresh taps: the centre 1; the head's output: 0
    a, b = torch.randn(4, 3, 6, 8), torch.randn(4, 2, 4, 6)
    texts = [torch.randn(5, 32), torch.randn(3, 32)]
    batch, args = _inputs(plain, [a, b], texts)
    with torch.no_grad():
        torch.testing.assert_close(extended(*args), plain(*args))
        for p in trained(extended):
            p.normal_(0, 0.5)
        out = batch.unpack(extended(*args))
        assert (out[0] - batch.unpack(plain(*args))[0]).abs().max() > 1e-3  # the extra is used
        _, args2 = _inputs(plain, [a * 3 + 1, b], texts)
        out2 = batch.unpack(extended(*args2))
    torch.testing.assert_close(out2[1], out[1], atol=1e-5, rtol=0)  # changing A leaves B alone
    with pytest.raises(ValueError, match=list(invalid)[-1]):
        dit_config("tiny", **invalid)
