"""Text encoders for conditioning: token embeddings + mask + a pooled vector, behind one interface.

Two kinds sit behind `TextEncoder`:

* `ClipTextEncoder` (kind "text_encoder"): sorakit's CLIP-like text tower, open_clip's
  `TextTransformer` with CoCa's appended CLS token, tokenised with open_clip's BPE tokenizer (shipped
  with the package, so it works offline). It is the captioner's text tower, exported alone with
  `export_text_encoder(captioner, dir)`; the directory stores the tokenizer settings with the weights.
* `HFTextEncoder`: a Hugging Face encoder (T5, CLIP text, BERT-like such as MiniLM) loaded from a
  local directory with `local_files_only=True`.

`load_text_encoder(path)` tells them apart by the directory's `config.json`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sorakit.models.io import CONFIG_FILE, load_pretrained, register, save_pretrained

BPE_VOCAB_SIZE = 49408  # open_clip's BPE vocabulary, special tokens included


@dataclass
class TextEmbeddings:
    tokens: torch.Tensor  # (B, L, D) float
    mask: torch.Tensor  # (B, L) bool, True on real tokens
    pooled: torch.Tensor  # (B, D)

    def to(self, device: torch.device | str) -> "TextEmbeddings":
        return TextEmbeddings(self.tokens.to(device), self.mask.to(device), self.pooled.to(device))


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class CaptionTokenizer:
    """open_clip's BPE tokenizer, optionally over a trimmed vocabulary.

    With `vocab=None` ids are open_clip's own (pad 0, as in open_clip). With `vocab` (a sorted list of
    BPE ids that must include start/end of text) the model sees compact ids: 0 = pad, 1 = unknown,
    2 + i = vocab[i]. Trimming turns a 49408-way softmax into a few-dozen-way one, which is what makes
    the toy recipe train in minutes on a CPU; pretrained checkpoints use the full vocabulary.
    """

    PAD, UNK = 0, 1

    def __init__(self, context_length: int, vocab: list[int] | None = None, clean: str = "lower"):
        from open_clip.tokenizer import get_clean_fn

        self.bpe = _bpe()
        self.context_length = context_length
        self.vocab = list(vocab) if vocab is not None else None
        self.clean_fn = get_clean_fn(clean)
        sot, eot = self.bpe.sot_token_id, self.bpe.eot_token_id
        if self.vocab is None:
            self.pad_id, self.unk_id = 0, None
            self.vocab_size = BPE_VOCAB_SIZE
            self._to_compact = None
            self._from_compact = None
        else:
            if sot not in self.vocab or eot not in self.vocab:
                raise ValueError("a trimmed vocabulary must include the start and end of text tokens")
            self.pad_id, self.unk_id = self.PAD, self.UNK
            self.vocab_size = len(self.vocab) + 2
            self._to_compact = {b: i + 2 for i, b in enumerate(self.vocab)}
            self._from_compact = {i + 2: b for i, b in enumerate(self.vocab)}
        self.sot_id = self._compact(sot)
        self.eot_id = self._compact(eot)

    @staticmethod
    def build_vocab(texts) -> list[int]:
        """The BPE ids used by `texts`, plus start/end of text: the `vocab` of a trimmed tokenizer."""
        bpe = _bpe()
        from open_clip.tokenizer import get_clean_fn

        clean = get_clean_fn("lower")
        ids = {bpe.sot_token_id, bpe.eot_token_id}
        for t in texts:
            ids.update(bpe.encode(clean(t)))
        return sorted(ids)

    def _compact(self, bpe_id: int) -> int:
        if self._to_compact is None:
            return bpe_id
        return self._to_compact.get(bpe_id, self.UNK)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without start/end tokens."""
        return [self._compact(i) for i in self.bpe.encode(self.clean_fn(text))]

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        """(B, context_length) long: start, text, end, then padding; long texts are cut, keeping the end token."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_id] + self.encode(t)[: self.context_length - 2] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        """Text of a sequence of ids; stops at the end token and drops start/pad/unknown tokens."""
        bpe_ids = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i == self.eot_id:
                break
            if i in (self.sot_id, self.pad_id) or (self.unk_id is not None and i == self.unk_id):
                continue
            bpe_ids.append(i if self._from_compact is None else self._from_compact[i])
        return " ".join(self.bpe.decode(bpe_ids).split())


# --------------------------------------------------------------------------------------------
# The CLIP-like text tower (shared with the captioner)
# --------------------------------------------------------------------------------------------


@dataclass
class TextTowerConfig:
    context_length: int = 76  # tokens incl. start/end; CoCa's appended CLS makes it 77 positions
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512  # size of the contrastive text embedding (the projection of the CLS token)
    vocab: list[int] | None = None  # trimmed BPE vocabulary (see CaptionTokenizer); None = full
    clean: str = "lower"  # open_clip's text cleaning before BPE
    # open_clip's pretrained CoCa weights were trained with a CLS mask shifted by one position;
    # models trained here use the correct one.
    correct_cls_mask: bool = True

    def validate(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 3:
            raise ValueError("text context_length must be at least 3")

    def tokenizer(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.context_length, self.vocab, self.clean)


TEXT_PRESETS: dict[str, TextTowerConfig] = {
    "tiny": TextTowerConfig(context_length=16, width=32, heads=2, layers=1, embed_dim=32),
    "toy": TextTowerConfig(context_length=20, width=128, heads=4, layers=2, embed_dim=128),
    # coca_ViT-B-32's text tower, so an open_clip CoCa checkpoint loads into it
    "base": TextTowerConfig(context_length=76, width=512, heads=8, layers=12, embed_dim=512, correct_cls_mask=False),
}


def build_text_tower(cfg: TextTowerConfig, pad_id: int, vocab_size: int) -> nn.Module:
    from open_clip.transformer import TextTransformer

    return TextTransformer(
        context_length=cfg.context_length,
        vocab_size=vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.embed_dim,
        embed_cls=True,
        pad_id=pad_id,
        correct_cls_mask=cfg.correct_cls_mask,
        output_tokens=True,
    )


def text_tower_states(tower: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run open_clip's text tower and return its (B, L, W) token states and (B, W) CLS state, both final-normed.

    `TextTransformer.forward` returns only the projected CLS and un-normed tokens; the conditioning
    interface wants both at the tower's width, so this repeats its three steps.
    """
    x, attn_mask = tower._embeds(ids)  # (B, L+1, W): CLS appended last
    x = tower.transformer(x, attn_mask=attn_mask)
    x = tower.ln_final(x)
    return x[:, :-1], x[:, -1]


class TextEncoder(nn.Module):
    """The interface: `.dim` and `.encode(texts) -> TextEmbeddings` on the module's device."""

    dim: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, texts: list[str]) -> TextEmbeddings:  # pragma: no cover - interface
        raise NotImplementedError


@register("text_encoder")
class ClipTextEncoder(TextEncoder):
    config_class = TextTowerConfig

    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.config = config
        self.tokenizer = config.tokenizer()
        self.text = build_text_tower(config, self.tokenizer.pad_id, self.tokenizer.vocab_size)
        self.dim = config.width

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbeddings:
        ids = self.tokenizer(list(texts)).to(self.device)  # (B, L)
        tokens, pooled = text_tower_states(self.text, ids)
        return TextEmbeddings(tokens=tokens, mask=ids != self.tokenizer.pad_id, pooled=pooled)


def build_text_encoder(preset: str = "tiny", **overrides) -> ClipTextEncoder:
    """A randomly initialised sorakit text encoder from a named preset (tests, from-scratch training)."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r} (known: {', '.join(TEXT_PRESETS)})")
    return ClipTextEncoder(replace(TEXT_PRESETS[preset], **overrides))


def export_text_encoder(captioner: nn.Module, path: str | Path) -> Path:
    """Write the captioner's text tower alone as a text-encoder directory (kind "text_encoder")."""
    enc = ClipTextEncoder(captioner.config.text)
    enc.text.load_state_dict(captioner.text.state_dict())
    return save_pretrained(enc, path, extra={"exported_from": "captioner"})


# --------------------------------------------------------------------------------------------
# Hugging Face encoders from a local directory
# --------------------------------------------------------------------------------------------


def _hf_model_dir(path: Path) -> Path:
    """The directory holding the HF `config.json`: `path` itself, or a sentence-transformers module."""
    if (path / CONFIG_FILE).is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("Transformer") and (path / m.get("path", "") / CONFIG_FILE).is_file():
                return path / m["path"]
    raise FileNotFoundError(f"{path}: not a text encoder directory (no {CONFIG_FILE})")


class HFTextEncoder(TextEncoder):
    """A local Hugging Face encoder. Pooled vector: CLIP's EOS state, else the masked mean of the tokens."""

    def __init__(self, path: str | Path, max_length: int = 77):
        super().__init__()
        import transformers as tf

        path = _hf_model_dir(Path(path))
        self.path = path
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        mtype = config.model_type
        if mtype in ("t5", "mt5", "umt5"):
            cls = tf.UMT5EncoderModel if mtype == "umt5" else tf.T5EncoderModel
        elif mtype in ("clip", "clip_text_model"):
            cls = tf.CLIPTextModel
        else:
            cls = tf.AutoModel
        try:
            self.tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = cls.from_pretrained(path, local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(f"{path}: cannot load a Hugging Face text encoder ({str(e).splitlines()[0]})") from None
        self.model.eval()
        self.is_clip = mtype in ("clip", "clip_text_model")
        limit = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = min(max_length, limit)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEmbeddings:
        batch = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens = out.last_hidden_state  # (B, L, D)
        mask = batch["attention_mask"].bool()  # (B, L)
        if self.is_clip:
            pooled = out.pooler_output
        else:
            m = mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1)
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=pooled)


def load_text_encoder(path: str | Path, max_length: int = 77) -> TextEncoder:
    """A sorakit text-encoder (or captioner) directory, or a local Hugging Face encoder directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such text encoder directory")
    cfg_file = path / CONFIG_FILE
    meta = {}
    if cfg_file.is_file():
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    kind = meta.get("kind")
    if kind == "text_encoder":
        return load_pretrained(path, kind="text_encoder")
    if kind == "captioner":
        captioner = load_pretrained(path, kind="captioner")
        enc = ClipTextEncoder(captioner.config.text)
        enc.text.load_state_dict(captioner.text.state_dict())
        return enc.eval()
    if kind is not None:
        raise ValueError(f"{path}: holds a {kind} model, not a text encoder")
    return HFTextEncoder(path, max_length=max_length)
