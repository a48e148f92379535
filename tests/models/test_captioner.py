"""VideoCoCa: poolers, losses, decoding, frame preparation, checkpoints (tiny configs, seconds on CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sorakit.models.captioner import (
    CONTRASTIVE_KEYS,
    DecodeOptions,
    VideoCoCa,
    _constrain,
    build_captioner,
    caption_clips,
    captioner_config,
    captioner_losses,
    coca_model_config,
    frame_indices,
    generate,
    letterbox,
    load_coca_weights,
    prepare_clip,
)
from sorakit.models.io import load_pretrained, save_pretrained
from sorakit.models.text_encoder import CaptionTokenizer

CAPTIONS = ["a red circle moving left", "a blue square standing still", "a green triangle moving up"]
VOCAB = CaptionTokenizer.build_vocab(CAPTIONS)


def tiny(vocab=VOCAB, **over) -> VideoCoCa:
    torch.manual_seed(0)
    return build_captioner("tiny", {"text": {"vocab": vocab}, **over})


def clips(model: VideoCoCa, n: int) -> torch.Tensor:
    """n distinguishable clips: flat colours, one per clip, with a bar that moves."""
    cfg = model.config
    S, T = cfg.vision.image_size, cfg.num_frames
    out = torch.zeros(n, T, 3, S, S, dtype=torch.uint8)
    for i in range(n):
        out[i, :, i % 3] = 200
        for t in range(T):
            out[i, t, :, :, (t * 5 + i * 7) % S] = 255
    return out


def test_poolers_are_separate_with_paper_shapes():
    m = tiny(gen_queries=5)
    E, Wt, Wv = m.config.text.embed_dim, m.config.text.width, m.config.vision.width
    assert m.con_pool.query.shape == (1, E) and m.gen_pool.query.shape == (5, Wt)
    assert m.con_pool.attn.kdim == Wv and m.gen_pool.attn.kdim == Wv  # both attend to the frame tokens
    assert not ({id(p) for p in m.con_pool.parameters()} & {id(p) for p in m.gen_pool.parameters()})
    x = clips(m, 3)
    emb, tokens = m.encode_video(x)
    assert emb.shape == (3, E) and tokens.shape == (3, 5, Wt)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():  # the generative pooler does not feed the contrastive embedding
        m.gen_pool.query.add_(1.0)
        emb2, tokens2 = m.encode_video(x)
    assert torch.allclose(emb, emb2) and not torch.allclose(tokens, tokens2)


def test_frame_order_matters_through_the_temporal_embedding():
    m = tiny()
    x = clips(m, 2)
    with torch.no_grad():
        m.temporal_embedding.normal_()
        a, _ = m.encode_video(x)
        b, _ = m.encode_video(x.flip(1))
    assert not torch.allclose(a, b, atol=1e-4)  # "moving left" must differ from "moving right"


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_motion_stem_sees_frame_differences_and_starts_silent(stem):
    m = tiny(vision={"stem": stem})
    x = clips(m, 2)
    with torch.no_grad():
        a, _ = m.encode_video(x)
        b, _ = m.encode_video(x.flip(1))
        still = x[:, :1].expand_as(x).contiguous()
        assert torch.allclose(a, b, atol=1e-5)  # at init (both temporal parts at zero): frames are a bag
        stem, m.motion_stem = m.motion_stem, None
        assert torch.allclose(m.encode_video(x)[0], a, atol=1e-6)  # at init the stem adds nothing at all
        m.motion_stem = stem
        for name, w in m.motion_stem.named_parameters():
            if name.endswith("weight"):  # biases stay at zero: then a still clip adds nothing
                w.normal_(std=0.1)
        a, _ = m.encode_video(x)
        b, _ = m.encode_video(x.flip(1))
        s1, _ = m.encode_video(still)
        m.motion_stem.apply(lambda mod: nn.init.zeros_(mod.weight) if isinstance(mod, nn.Conv2d) else None)
        s0, _ = m.encode_video(still)
    assert not torch.allclose(a, b, atol=1e-4)  # reversed motion, other embedding
    assert torch.allclose(s0, s1, atol=1e-6)  # a still clip has no differences to embed


def test_both_losses_decrease():
    m = tiny()
    x, ids = clips(m, 3), m.tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        losses = captioner_losses(m(x, ids), m.pad_id)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        (losses["contrastive"] + 2 * losses["caption"]).backward()
        opt.step()
    last = {k: v.item() for k, v in captioner_losses(m(x, ids), m.pad_id).items()}
    assert last["caption"] < 0.5 * first["caption"]
    assert last["contrastive"] < 0.7 * first["contrastive"]


def test_duplicate_captions_are_positives():
    m = tiny()
    x, ids = clips(m, 2), m.tokenizer([CAPTIONS[0]] * 2)
    out = m(x, ids)
    out["video_features"] = out["text_features"].detach().clone()  # perfect alignment
    assert captioner_losses(out, m.pad_id)["contrastive"].item() == pytest.approx(math.log(2), abs=1e-3)


# Four clips, captions 0 and 3 the same: split over two ranks, a positive pair spans both.
GLOBAL_CAPTIONS = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[2], CAPTIONS[0]]


def _contrastive_grads(m: VideoCoCa, rows: slice, gather) -> dict[str, torch.Tensor]:
    x, ids = clips(m, 4)[rows], m.tokenizer(GLOBAL_CAPTIONS[rows])
    out = m(x, ids)
    gathered = None if gather is None else {k: gather(out[k]) for k in CONTRASTIVE_KEYS}
    m.zero_grad()
    captioner_losses(out, m.pad_id, gathered)["contrastive"].backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _rank_grads(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnn

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        def gather(x: torch.Tensor) -> torch.Tensor:  # as Lightning's all_gather(sync_grads=True), flattened
            if x.is_floating_point():
                return torch.cat(dnn.all_gather(x))
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            return torch.cat(parts)

        per = 4 // world
        grads = _contrastive_grads(tiny(), slice(rank * per, (rank + 1) * per), gather)
        for g in grads.values():  # DDP's gradient mean
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_over_ranks_is_the_global_batchs(tmp_path):
    """Two data-parallel ranks with two clips each, their features gathered, train as one process on
    all four: negatives and duplicate-caption positives come from the other rank's clips too."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_rank_grads, args=(2, f"file://{tmp_path / 'rendezvous'}", str(out)), nprocs=2)
    ranks = torch.load(out, weights_only=True)
    whole = _contrastive_grads(tiny(), slice(0, 4), None)
    local = _contrastive_grads(tiny(), slice(0, 2), None)  # what rank 0 computed without gathering
    assert ranks.keys() == whole.keys()
    for name, g in whole.items():
        assert (ranks[name] - g).norm() <= 1e-4 * g.norm(), name
    assert any((local[n] - g).norm() > 0.1 * g.norm() for n, g in whole.items())


@pytest.fixture(scope="module")
def overfit() -> VideoCoCa:
    """A tiny model trained to caption three clips exactly."""
    m = tiny()
    x, ids = clips(m, 3), m.tokenizer(CAPTIONS)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(40):
        losses = captioner_losses(m(x, ids), m.pad_id)
        opt.zero_grad()
        (losses["contrastive"] + 2 * losses["caption"]).backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_reproduces_learned_captions(overfit, beams):
    assert caption_clips(overfit, clips(overfit, 3), DecodeOptions(num_beams=beams)) == CAPTIONS


def test_decoding_respects_max_len(overfit):
    _, tokens = overfit.encode_video(clips(overfit, 3))
    for beams in (1, 2):
        out = generate(overfit, tokens, DecodeOptions(max_len=2, num_beams=beams))
        assert all(len(ids) <= 2 for ids in out) and len(out) == 3


def test_beam_search_beats_greedy_where_greedy_is_wrong(monkeypatch):
    """A fake next-token model where the likelier first token leads to a worse caption."""
    import sorakit.models.captioner as cap

    m = tiny().eval()
    tok = m.tokenizer
    V = tok.vocab_size
    A, B, C = 2, 3, 4  # compact ids of three ordinary tokens

    def fake_next_logp(model, memory, seqs):
        p = torch.full((seqs.shape[0], V), 1e-4)
        for i, last in enumerate(seqs[:, -1].tolist()):
            if last == tok.sot_id:
                p[i, A], p[i, B] = 0.6, 0.4
            elif last == A:
                p[i, tok.eot_id], p[i, C] = 0.35, 0.35  # best finish after A: 0.6 * 0.35 = 0.21
            elif last == B:
                p[i, tok.eot_id] = 0.95  # after B: 0.4 * 0.95 = 0.38
            else:
                p[i, tok.eot_id] = 0.9
        return (p / p.sum(1, keepdim=True)).log()

    monkeypatch.setattr(cap, "_next_logp", fake_next_logp)
    memory = torch.zeros(1, 1, m.config.text.width)
    assert generate(m, memory, DecodeOptions(max_len=4))[0][0] == A
    assert generate(m, memory, DecodeOptions(max_len=4, num_beams=2, length_penalty=0.0)) == [[B]]


def test_repetition_controls():
    seqs = torch.tensor([[9, 3, 4, 5, 3, 4]])  # start token 9, then "3 4 5 3 4"
    logp = torch.full((1, 10), -2.0)
    out = _constrain(logp, seqs, DecodeOptions(no_repeat_ngram=3), banned=[0])
    assert out[0, 5] == -math.inf  # "3 4 5" again is blocked
    assert out[0, 0] == -math.inf and out[0, 6] == -2.0
    out = _constrain(logp, seqs, DecodeOptions(no_repeat_ngram=0, repetition_penalty=1.5), banned=[])
    assert out[0, 3] == pytest.approx(-3.0) and out[0, 7] == -2.0


def test_letterbox_keeps_aspect_and_the_whole_frame():
    frames = np.full((2, 40, 80, 3), 16, np.uint8)  # 2:1, dark
    frames[:, :, -6:] = (220, 40, 40)  # red at the far right edge
    out = letterbox(frames, 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.uint8
    rows_with_content = (out[0].float() - out[0, :, 0:1, 0:1].float()).abs().sum(0).sum(1) > 0
    assert 14 <= int(rows_with_content.sum()) <= 18  # 40x80 -> 16x32, centred, padded top and bottom
    assert out[0, 0, 16, -1] > 180 and out[0, 1, 16, -1] < 80  # the right edge survives (no crop)


def test_frame_features_read_the_tower_at_native_positions():
    model = tiny().eval()
    S, P = model.config.vision.image_size, model.config.vision.patch_size
    g = S // P
    rng = np.random.default_rng(0)
    square = rng.integers(0, 256, (3, S, S, 3), dtype=np.uint8)
    feats = model.frame_features(square, cell=P, grid=(g, g))  # (Wv, T, g, g): cell centres = patch centres
    x = (letterbox(square, S).float() - model.mean) / model.std
    with torch.no_grad():
        tokens = model.frame_tokens(x, 1)[:, 0, 1:]  # (T, N, Wv), each frame on its own
    torch.testing.assert_close(feats, tokens.transpose(1, 2).reshape(3, -1, g, g).transpose(0, 1))
    # A 2:1 frame fills the middle half of the letterbox's rows: cell i (native row (i + 0.5)·P) reads
    # letterbox row S/4 + (i + 0.5)·P/2, i.e. row 2 + i of the tower's grid upsampled twice. Cells
    # past the bottom edge read the edge.
    wide = rng.integers(0, 256, (1, S, 2 * S, 3), dtype=np.uint8)
    f = model.frame_features(wide, cell=P, grid=(g + 2, 2 * g))[:, 0]  # (Wv, g + 2, 2g)
    lb = (letterbox(wide, S).float() - model.mean) / model.std
    with torch.no_grad():
        t = model.frame_tokens(lb, 1)[0, 0, 1:].T.reshape(-1, g, g)  # (Wv, g, g)
    up = torch.nn.functional.interpolate(t[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(f[:, :3], up[:, 2:5])
    torch.testing.assert_close(f[:, g], f[:, g + 1])


def test_frame_indices_cover_the_clip():
    assert frame_indices(64, 4).tolist() == [8, 24, 40, 56]
    assert frame_indices(3, 4).tolist() == [0, 1, 1, 2]
    assert prepare_clip(np.zeros((10, 30, 20, 3), np.uint8), 2, 16).shape == (2, 3, 16, 16)


def test_save_load_roundtrip(tmp_path):
    m = tiny().eval()
    save_pretrained(m, tmp_path / "cap")
    loaded = load_pretrained(tmp_path / "cap")
    assert isinstance(loaded, VideoCoCa) and loaded.config.text.vocab == VOCAB
    x = clips(m, 2)
    assert torch.allclose(m.encode_video(x)[0], loaded.encode_video(x)[0], atol=1e-6)


@pytest.mark.parametrize("vocab", [None, VOCAB])
def test_init_from_open_clip_coca_checkpoint(tmp_path, vocab):
    import open_clip

    cfg = captioner_config("tiny", {"num_frames": 1, "text": {"correct_cls_mask": False, "vocab": vocab}})
    cc = coca_model_config(cfg)
    torch.manual_seed(3)
    coca = open_clip.CoCa(cc["embed_dim"], cc["multimodal_cfg"], cc["text_cfg"], cc["vision_cfg"]).eval()
    torch.save(coca.state_dict(), tmp_path / "coca.pt")
    m = VideoCoCa(cfg).eval()
    # The temporal embedding and the tubelets' difference stem are VideoCoCa's own; both start at zero.
    assert sorted(load_coca_weights(m, tmp_path / "coca.pt")) == ["motion_stem.weight", "temporal_embedding"]
    images = torch.randint(0, 256, (2, 1, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        ours, _ = m.encode_video(images)
        theirs = coca.encode_image((images[:, 0].float() - m.mean) / m.std)
        assert torch.allclose(ours, theirs, atol=1e-5)  # one frame: VideoCoCa == CoCa
        text = "a red circle moving left"
        full = open_clip.tokenizer.SimpleTokenizer()([text], context_length=cfg.text.context_length)
        assert torch.allclose(m.embed_texts([text]), coca.encode_text(full), atol=1e-5)


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an open_clip CoCa checkpoint"):
        load_coca_weights(tiny(), tmp_path / "x.pt")


def test_base_preset_is_shaped_like_open_clip_coca_vit_b32():
    """So a user's local coca_ViT-B-32 checkpoint loads with `--init` (checked without building the model)."""
    import open_clip

    ref = open_clip.get_model_config("coca_ViT-B-32")
    ours = coca_model_config(captioner_config("base"))
    assert ours["embed_dim"] == ref["embed_dim"]
    for part, keys in {"vision_cfg": ("image_size", "layers", "width", "patch_size"),
                       "text_cfg": ("context_length", "vocab_size", "width", "heads", "layers"),
                       "multimodal_cfg": ("context_length", "width", "heads", "layers")}.items():
        assert {k: ours[part][k] for k in keys} == {k: ref[part][k] for k in keys}, part
    assert ours["vision_cfg"]["head_width"] == 64  # open_clip's default, which the json leaves implicit
