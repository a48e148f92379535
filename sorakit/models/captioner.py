"""VideoCoCa: a CoCa image encoder on each frame, frame tokens concatenated, two attentional poolers.

After "VideoCoCa: Video-Text Modeling with Zero-Shot Transfer from Contrastive Captioners"
(arXiv 2212.04979), built from open_clip's CoCa parts:

    frames (B, T, 3, S, S) ──ViT per frame (+ temporal emb)──▶ (B, T, N, Wv) ──flatten──▶ (B, T*N, Wv)
        ├─ contrastive pooler (1 query)  ─▶ LN ─▶ proj ─▶ video embedding (B, E)
        └─ generative pooler (Q queries) ─▶ LN ─▶ video tokens (B, Q, Wt) ─┐
    caption ids (B, L) ──text tower (causal, CLS appended)──▶ text embedding (B, E)  │
                                          └─▶ token states (B, L, Wt) ──multimodal decoder──▶ logits

The two poolers are separate modules, as in the paper (open_clip's pretrained CoCa shares one).
A learned temporal embedding, initialised at zero, is added to each frame's tokens as they enter the
image tower: attentional pooling is blind to token order, and without it "moving left" and "moving
right" look the same.

Frames enter at native aspect: each is resized so its long side is `image_size` and padded to a
square with the normalisation mean (`letterbox`), so nothing is cropped and shapes are not distorted;
the model sees the padding and so knows the clip's aspect ratio.

Decoding (`generate`) is our own greedy / beam search with a maximum length, a repetition penalty
and n-gram blocking, so nothing depends on open_clip's `generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sorakit.models.io import register
from sorakit.models.text_encoder import TEXT_PRESETS, TextTowerConfig, build_text_tower

MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN: what CoCa weights expect
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionTowerConfig:
    image_size: int = 224  # frames are letterboxed to this square
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    # "learnable" (CoCa's, needed to load its weights) or "sin_cos_2d": fixed, smooth in position, so
    # displacements between frames are linear in it; from-scratch models learn motion faster with it.
    pos_embed: str = "learnable"
    # "patch": ViT's single patchify conv (CoCa's); "conv": a stem of strided 3x3 convs ("Early
    # convolutions help transformers see better", Xiao et al. 2021): small objects in from-scratch training.
    stem: str = "patch"


@dataclass
class DecoderConfig:
    layers: int = 12  # its width is the text tower's, since it consumes the text tower's token states
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class CaptionerConfig:
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    num_frames: int = 8  # frames sampled evenly over each clip
    gen_queries: int = 256  # generative pooler's queries = video tokens the decoder attends to
    pooler_heads: int = 8
    # Transformer layers over the concatenated frame tokens before pooling (0 = VideoCoCa's attentional
    # pooling alone). A layer lets tokens of different frames attend to each other before pooling.
    temporal_layers: int = 0
    # Two-frame tubelets (ViViT's tubelet embedding, reparametrised): each frame's patch embedding plus
    # an embedding of its difference from the previous sampled frame, so a token sees the local motion
    # under it. The difference stem starts at zero, so an image CoCa's weights load unchanged.
    motion_embed: bool = False

    def validate(self) -> None:
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        for name, width in (("text.embed_dim", self.text.embed_dim), ("text.width", self.text.width)):
            if width % self.pooler_heads:
                raise ValueError(f"{name} ({width}) must be divisible by pooler_heads ({self.pooler_heads})")
        if self.vision.stem not in ("patch", "conv"):
            raise ValueError(f"vision.stem must be patch or conv, got {self.vision.stem!r}")
        if self.vision.stem == "conv" and self.vision.patch_size & (self.vision.patch_size - 1):
            raise ValueError("a conv stem needs a power-of-two vision.patch_size")
        if self.vision.pos_embed not in ("learnable", "sin_cos_2d"):
            raise ValueError(f"vision.pos_embed must be learnable or sin_cos_2d, got {self.vision.pos_embed!r}")
        if self.num_frames < 1 or self.gen_queries < 1:
            raise ValueError("num_frames and gen_queries must be >= 1")


PRESETS: dict[str, CaptionerConfig] = {
    "tiny": CaptionerConfig(
        vision=VisionTowerConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2),
        text=TEXT_PRESETS["tiny"],
        decoder=DecoderConfig(layers=1, heads=2),
        num_frames=2,
        gen_queries=4,
        pooler_heads=2,
        motion_embed=True,
    ),
    # From scratch on a CPU: fixed sin-cos positions, a conv stem and two-frame tubelets make shape and
    # motion learnable in minutes (toy world, 1200 steps: motion 20% -> 97%, exact captions 15% -> 88%).
    "toy": CaptionerConfig(
        vision=VisionTowerConfig(image_size=64, patch_size=16, width=128, layers=3, heads=4,
                                 pos_embed="sin_cos_2d", stem="conv"),
        text=TEXT_PRESETS["toy"],
        decoder=DecoderConfig(layers=2, heads=4),
        num_frames=4,
        gen_queries=16,
        pooler_heads=4,
        motion_embed=True,
    ),
    # Shaped like open_clip's coca_ViT-B-32, so its checkpoint initialises the towers (`load_coca_weights`).
    "base": CaptionerConfig(
        vision=VisionTowerConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=TEXT_PRESETS["base"],
        decoder=DecoderConfig(layers=12, heads=8),
        num_frames=8,
        gen_queries=256,
        pooler_heads=8,
        motion_embed=True,  # starts at zero: a CoCa checkpoint still loads exactly
    ),
}


def captioner_config(preset: str, overrides: dict | None = None) -> CaptionerConfig:
    """A named preset with nested overrides, e.g. `{"num_frames": 6, "text": {"vocab": [...]}}`."""
    from sorakit.config import from_dict, to_dict

    if preset not in PRESETS:
        raise ValueError(f"unknown captioner preset {preset!r} (known: {', '.join(PRESETS)})")
    merged = to_dict(PRESETS[preset])

    def deep_update(d: dict, u: dict) -> None:
        for k, v in u.items():
            if isinstance(v, dict) and isinstance(d.get(k), dict):
                deep_update(d[k], v)
            else:
                d[k] = v

    deep_update(merged, overrides or {})
    return from_dict(CaptionerConfig, merged, "model")


# --------------------------------------------------------------------------------------------
# Frames: even temporal sampling and letterboxing (pure functions, used by training and inference)
# --------------------------------------------------------------------------------------------


def frame_indices(total: int, n: int) -> np.ndarray:
    """`n` indices spread evenly over `total` frames (segment centres); repeats when `total < n`."""
    return np.minimum(((np.arange(n) + 0.5) * total / n).astype(np.int64), total - 1)


def letterbox_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """Where `letterbox` puts an h × w frame in its size × size square: (top, left, height, width)."""
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox(frames: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, size, size): long side resized to `size`, centred, padded.

    The padding is the normalisation mean, i.e. zero after `normalize`, so it carries no colour.
    """
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    h, w = x.shape[-2:]
    top, left, nh, nw = letterbox_box(h, w, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = torch.tensor(MEAN).mul(255).view(1, 3, 1, 1).expand(x.shape[0], 3, size, size).clone()
    out[:, :, top : top + nh, left : left + nw] = x
    return out.round().clamp(0, 255).to(torch.uint8)


def prepare_clip(frames: np.ndarray, num_frames: int, image_size: int) -> torch.Tensor:
    """A decoded clip (T, H, W, 3) uint8 at native size -> the model's input (num_frames, 3, S, S) uint8."""
    return letterbox(frames[frame_indices(len(frames), num_frames)], image_size)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class ConvStem(nn.Sequential):
    """Strided 3x3 convs (GroupNorm + GELU), each halving the resolution, then a 1x1 conv to the width:
    the same (B, width, S/patch, S/patch) output as the patchify conv it replaces."""

    def __init__(self, width: int, patch_size: int):
        n = patch_size.bit_length() - 1
        chans = [3] + [max(16, width >> (n - i)) for i in range(1, n + 1)]  # e.g. 16, 32, 64, 128
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(1, c_out), nn.GELU()]
        layers.append(nn.Conv2d(chans[-1], width, 1))
        super().__init__(*layers)


@register("captioner")
class VideoCoCa(nn.Module):
    config_class = CaptionerConfig

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        from open_clip.transformer import AttentionalPooler, LayerNorm, MultimodalTransformer, VisionTransformer

        self.config = config
        v, t, d = config.vision, config.text, config.decoder
        self.tokenizer = t.tokenizer()
        vocab_size = self.tokenizer.vocab_size

        self.visual = VisionTransformer(
            image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers, heads=v.heads,
            mlp_ratio=v.mlp_ratio, output_dim=t.embed_dim, pool_type="none", output_tokens=True,
            pos_embed_type=v.pos_embed,
        )
        if v.stem == "conv":
            self.visual.conv1 = ConvStem(v.width, v.patch_size)
        self.motion_stem = None
        if config.motion_embed:
            self.motion_stem = (ConvStem(v.width, v.patch_size) if v.stem == "conv"
                                else nn.Conv2d(3, v.width, v.patch_size, v.patch_size, bias=False))
            last = self.motion_stem[-1] if v.stem == "conv" else self.motion_stem
            nn.init.zeros_(last.weight)  # the conv stem's last layer has a bias too: silent means both
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        # Pooling happens after the frames are joined, so the tower's own head is not used.
        self.visual.ln_post = nn.Identity()
        self.visual.proj = None
        self.temporal_embedding = nn.Parameter(torch.zeros(config.num_frames, v.width))
        self.temporal = None
        if config.temporal_layers:
            from open_clip.transformer import Transformer

            self.temporal = Transformer(v.width, config.temporal_layers, v.heads, v.mlp_ratio)

        self.con_pool = AttentionalPooler(t.embed_dim, v.width, n_head=config.pooler_heads, n_queries=1)
        self.con_ln = LayerNorm(t.embed_dim)
        self.con_proj = nn.Parameter(torch.randn(t.embed_dim, t.embed_dim) * t.embed_dim**-0.5)
        self.gen_pool = AttentionalPooler(t.width, v.width, n_head=config.pooler_heads, n_queries=config.gen_queries)
        self.gen_ln = LayerNorm(t.width)

        self.text = build_text_tower(t, self.tokenizer.pad_id, vocab_size)
        self.decoder = MultimodalTransformer(
            width=t.width, layers=d.layers, heads=d.heads, context_length=t.context_length,
            mlp_ratio=d.mlp_ratio, output_dim=vocab_size,
        )
        _init_decoder(self.decoder)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1) * 255, persistent=False)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def frame_tokens(self, x: torch.Tensor, T: int) -> torch.Tensor:
        """Normalised frames (B*T, 3, S, S) -> the image tower's tokens (B, T, 1+N, Wv), class token first.

        open_clip's ViT forward, with each frame's temporal embedding added to its tokens after the
        input norm and *before* the tower: added to the tower's outputs it is dwarfed by their norm
        and a from-scratch model never learns motion (toy world: motion at chance after 1200 steps).
        """
        v = self.visual
        patches = v.conv1(x)  # (B*T, Wv, g, g)
        if self.motion_stem is not None:
            frames = x.view(-1, T, *x.shape[1:])
            diff = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, 1:] - frames[:, :-1]], 1)  # frame 0: none
            patches = patches + self.motion_stem(diff.flatten(0, 1))
        x = patches.flatten(2).transpose(1, 2)  # (B*T, N, Wv)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + v.positional_embedding
        x = v.ln_pre(v.patch_dropout(x))
        x = x.view(-1, T, *x.shape[1:]) + self.temporal_embedding[:T, None, :]  # (B, T, 1+N, Wv)
        x = v.transformer(x.flatten(0, 1))
        return x.view(-1, T, *x.shape[1:])

    def encode_video(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames (B, T, 3, S, S) -> (normalised embedding (B, E), generative tokens (B, Q, Wt))."""
        B, T = frames.shape[:2]
        if T > self.config.num_frames:
            raise ValueError(f"got {T} frames per clip, the model takes at most {self.config.num_frames}")
        x = (frames.flatten(0, 1).float() - self.mean) / self.std  # (B*T, 3, S, S)
        tokens = self.frame_tokens(x, T).flatten(1, 2)  # (B, T*(1+N), Wv)
        if self.temporal is not None:
            tokens = self.temporal(tokens)
        pooled = self.con_ln(self.con_pool(tokens))[:, 0] @ self.con_proj  # (B, E)
        video_tokens = self.gen_ln(self.gen_pool(tokens))  # (B, Q, Wt)
        return F.normalize(pooled, dim=-1), video_tokens

    @torch.no_grad()
    def frame_features(self, frames: np.ndarray | torch.Tensor, cell: float, grid: tuple[int, int]) -> torch.Tensor:
        """uint8 frames (T, H, W, 3) at native size → the image tower's patch features (Wv, T, gh, gw),
        each frame on its own, read (bilinearly) at the centres of a gh × gw grid of `cell`-pixel
        cells laid from the frame's top-left corner; centres past the frame's edge read the edge.

        What a from-scratch captioner learned to see, per place and frame: the target of a DiT's
        representation alignment (REPA, `sorakit.training.dit`).
        """
        frames = torch.as_tensor(frames)
        t, h, w = frames.shape[:3]
        size, patch = self.config.vision.image_size, self.config.vision.patch_size
        x = (letterbox(frames, size).to(self.mean.device).float() - self.mean) / self.std  # (T, 3, S, S)
        tokens = self.frame_tokens(x, 1)[:, 0, 1:]  # (T, N, Wv), class token dropped
        g = size // patch
        fmap = tokens.transpose(1, 2).reshape(t, -1, g, g)  # (T, Wv, g, g)
        # Cell centres in native pixels → letterbox pixels (where `letterbox` put the frame) → [-1, 1].
        top, left, nh, nw = letterbox_box(h, w, size)
        ys = ((torch.arange(grid[0]) + 0.5) * cell).clamp(max=h - 0.5) * (nh / h) + top
        xs = ((torch.arange(grid[1]) + 0.5) * cell).clamp(max=w - 0.5) * (nw / w) + left
        yy, xx = torch.meshgrid(ys / size * 2 - 1, xs / size * 2 - 1, indexing="ij")
        where = torch.stack([xx, yy], dim=-1).to(fmap)[None].expand(t, -1, -1, -1)  # (T, gh, gw, 2) as (x, y)
        out = F.grid_sample(fmap, where, mode="bilinear", padding_mode="border", align_corners=False)  # (T, Wv, gh, gw)
        return out.transpose(0, 1)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, L) -> (normalised embedding (B, E), causal token states (B, L, Wt))."""
        latent, token_states = self.text(ids)
        return F.normalize(latent, dim=-1), token_states

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Normalised contrastive embeddings (B, E) of captions."""
        ids = self.tokenizer(texts).to(self.logit_scale.device)
        return self.encode_text(ids)[0]

    def decode_logits(self, video_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V) for each prefix of `ids` (B, L), attending to `video_tokens`."""
        _, token_states = self.text(ids)
        return self.decoder(video_tokens, token_states)

    def forward(self, frames: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        video_features, video_tokens = self.encode_video(frames)
        text_features, token_states = self.encode_text(ids)
        logits = self.decoder(video_tokens, token_states[:, :-1])  # teacher forcing: (B, L-1, V)
        return {
            "video_features": video_features,
            "text_features": text_features,
            "logits": logits,
            "labels": ids[:, 1:],
            "logit_scale": self.logit_scale.exp().clamp(max=100),
        }


def _init_decoder(decoder: nn.Module) -> None:
    """CLIP's init for the multimodal decoder. open_clip's own `init_parameters` for it is broken (it
    reads an attribute the class lacks) and is never called, leaving `text_projection` uninitialised."""
    width, layers = decoder.width, decoder.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(decoder.text_projection, std=width**-0.5)


# What `captioner_losses` contrasts: under data parallelism, every rank's of these (`gathered`).
CONTRASTIVE_KEYS = ("video_features", "text_features", "labels")


def captioner_losses(out: dict[str, torch.Tensor], pad_id: int,
                     gathered: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """CoCa's two losses: symmetric InfoNCE between video and caption embeddings, and captioning CE.

    Duplicate captions in a batch (common when a dataset has few distinct captions) are treated as
    positives of each other, so the contrastive loss does not push apart videos with the same text.

    Under data parallelism, `gathered` holds every rank's `CONTRASTIVE_KEYS` (this rank's among
    them, the features with their gradient): this rank's videos and captions are contrasted against
    all of them (open_clip's `local_loss`), so the negatives are the global batch's, and the ranks'
    mean, which DDP's gradient averaging takes, is the global batch's loss.
    """
    v, t, scale, ids = out["video_features"], out["text_features"], out["logit_scale"], out["labels"]
    all_v, all_t, all_ids = (v, t, ids) if gathered is None else (gathered[k] for k in CONTRASTIVE_KEYS)
    same = (ids[:, None, :] == all_ids[None, :, :]).all(-1).float()  # (b, B): identical captions
    target = same / same.sum(1, keepdim=True)
    contrastive = 0.5 * (torch.sum(-target * (scale * v @ all_t.T).log_softmax(1), 1).mean()
                         + torch.sum(-target * (scale * t @ all_v.T).log_softmax(1), 1).mean())
    caption = F.cross_entropy(out["logits"].flatten(0, 1), out["labels"].flatten(), ignore_index=pad_id)
    return {"contrastive": contrastive, "caption": caption}


# --------------------------------------------------------------------------------------------
# Decoding: greedy and beam search, one signature
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeOptions:
    max_len: int | None = None  # new tokens at most; default: what the context length allows
    num_beams: int = 1
    repetition_penalty: float = 1.0  # >1 discourages tokens already generated (CTRL-style)
    no_repeat_ngram: int = 3  # forbid repeating any n-gram of this size (0 = off)
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty


def _constrain(logp: torch.Tensor, seqs: torch.Tensor, opts: DecodeOptions, banned: list[int]) -> torch.Tensor:
    """Apply bans, repetition penalty and n-gram blocking to next-token log-probs (N, V) given seqs (N, l)."""
    logp = logp.clone()
    logp[:, banned] = -math.inf
    generated = seqs[:, 1:]  # drop the start token
    if opts.repetition_penalty != 1.0 and generated.shape[1]:
        prev = logp.gather(1, generated)
        logp.scatter_(1, generated, prev * opts.repetition_penalty)  # log-probs are negative: more negative
    n = opts.no_repeat_ngram
    if n > 0 and generated.shape[1] >= n:
        rows = generated.tolist()
        for i, row in enumerate(rows):
            tail = tuple(row[len(row) - n + 1 :])
            for j in range(len(row) - n + 1):
                if tuple(row[j : j + n - 1]) == tail:
                    logp[i, row[j + n - 1]] = -math.inf
    return logp


@torch.no_grad()
def generate(model: VideoCoCa, video_tokens: torch.Tensor, opts: DecodeOptions | None = None) -> list[list[int]]:
    """Token ids (without start/end) of the best caption for each video, from its generative tokens (B, Q, W)."""
    opts = opts or DecodeOptions()
    tok = model.tokenizer
    limit = model.config.text.context_length - 1  # the decoder's positions; the start token takes one
    max_len = min(opts.max_len or limit, limit)
    banned = [i for i in {tok.pad_id, tok.sot_id, tok.unk_id} if i is not None]
    if opts.num_beams <= 1:
        return _greedy(model, video_tokens, max_len, opts, banned)
    return _beam(model, video_tokens, max_len, opts, banned)


def _next_logp(model: VideoCoCa, video_tokens: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    return model.decode_logits(video_tokens, seqs)[:, -1].float().log_softmax(-1)  # (N, V)


def _greedy(model, video_tokens, max_len, opts, banned) -> list[list[int]]:
    tok = model.tokenizer
    B = video_tokens.shape[0]
    seqs = torch.full((B, 1), tok.sot_id, dtype=torch.long, device=video_tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=video_tokens.device)
    for step in range(max_len):
        logp = _constrain(_next_logp(model, video_tokens, seqs), seqs, opts, banned + ([tok.eot_id] if step == 0 else []))
        nxt = logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], 1)
        done |= nxt == tok.eot_id
        if done.all():
            break
    out = []
    for row in seqs[:, 1:].tolist():
        out.append(row[: row.index(tok.eot_id)] if tok.eot_id in row else [t for t in row if t != tok.pad_id])
    return out


def _beam(model, video_tokens, max_len, opts, banned) -> list[list[int]]:
    tok = model.tokenizer
    B, K = video_tokens.shape[0], opts.num_beams
    device = video_tokens.device
    memory = video_tokens.repeat_interleave(K, 0)  # (B*K, Q, W)
    seqs = torch.full((B * K, 1), tok.sot_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick duplicates
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for step in range(max_len):
        ban = banned + ([tok.eot_id] if step == 0 else [])
        logp = _constrain(_next_logp(model, memory, seqs), seqs, opts, ban)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # (B, 2K)
        new_seqs, new_scores = [], []
        for b in range(B):
            keep: list[tuple[float, torch.Tensor]] = []
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                if s == -math.inf:
                    break
                beam, token = divmod(idx, V)
                prefix = seqs[b * K + beam]
                if token == tok.eot_id:
                    if len(finished[b]) < K:
                        length = prefix.shape[0]  # generated tokens + the end token
                        finished[b].append((s / length**opts.length_penalty, prefix[1:].tolist()))
                else:
                    keep.append((s, torch.cat([prefix, prefix.new_tensor([token])])))
                if len(keep) == K:
                    break
            while len(keep) < K:  # pad with dead beams
                keep.append((-math.inf, torch.cat([seqs[b * K], seqs.new_tensor([tok.pad_id])])))
            new_scores.append([s for s, _ in keep])
            new_seqs.extend(q for _, q in keep)
        seqs = torch.stack(new_seqs)
        scores = torch.tensor(new_scores, device=device)
        if all(len(f) >= K for f in finished):
            break
    out = []
    for b in range(B):
        cands = list(finished[b])
        if not cands:  # nothing ended within max_len: take the live beams as they are
            for k in range(K):
                if scores[b, k] > -math.inf:
                    length = seqs.shape[1]
                    cands.append((scores[b, k].item() / length**opts.length_penalty, seqs[b * K + k, 1:].tolist()))
        out.append(max(cands, key=lambda c: c[0])[1] if cands else [])
    return out


@torch.no_grad()
def caption_clips(model: VideoCoCa, frames: torch.Tensor, opts: DecodeOptions | None = None) -> list[str]:
    """Captions of a batch of prepared clips (B, T, 3, S, S) uint8."""
    _, video_tokens = model.encode_video(frames.to(model.logit_scale.device))
    return [model.tokenizer.decode(ids) for ids in generate(model, video_tokens, opts)]


# --------------------------------------------------------------------------------------------
# Initialising from an open_clip CoCa checkpoint (VideoCoCa reuses CoCa's weights)
# --------------------------------------------------------------------------------------------


def coca_model_config(config: CaptionerConfig) -> dict:
    """The open_clip CoCa model config (as in open_clip's model_configs/*.json) whose weights fit `config`."""
    v, t, d = config.vision, config.text, config.decoder
    return {
        "embed_dim": t.embed_dim,
        "vision_cfg": {
            "image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
            "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio, "attentional_pool": True,
            "attn_pooler_heads": config.pooler_heads, "attn_pooler_queries": config.gen_queries, "output_tokens": True,
        },
        "text_cfg": {
            "context_length": t.context_length, "vocab_size": 49408, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio, "embed_cls": True, "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": t.context_length, "vocab_size": 49408, "width": t.width, "heads": d.heads,
            "layers": d.layers, "mlp_ratio": d.mlp_ratio, "attn_pooler_heads": config.pooler_heads,
        },
    }


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors without executing code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights file ({str(e).splitlines()[0]})") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if torch.is_tensor(v)}


def load_coca_weights(model: VideoCoCa, path: str | Path) -> list[str]:
    """Initialise `model` from an open_clip CoCa checkpoint; returns the parameters left as initialised.

    CoCa's single attentional pooler initialises both poolers (its first query is CoCa's contrastive
    token), its `ln_post`/`proj` the pooler norms and projection. Rows/columns of a trimmed
    vocabulary are gathered from the full one; a different image size resamples the position grid.
    """
    from open_clip.model import resize_pos_embed

    sd = read_state_dict(path)
    if "visual.conv1.weight" not in sd or "text_decoder.text_projection" not in sd:
        raise ValueError(f"{path}: not an open_clip CoCa checkpoint (no visual.conv1 / text_decoder weights)")
    resize_pos_embed(sd, model)
    new: dict[str, torch.Tensor] = {}
    for k, w in sd.items():
        if k.startswith("visual.attn_pool."):
            sub = k.removeprefix("visual.attn_pool.")
            new[f"gen_pool.{sub}"] = w[: model.config.gen_queries] if sub == "query" else w
            new[f"con_pool.{sub}"] = w[:1] if sub == "query" else w
        elif k.startswith("visual.ln_post."):
            sub = k.removeprefix("visual.ln_post.")
            new[f"con_ln.{sub}"] = new[f"gen_ln.{sub}"] = w
        elif k == "visual.proj":
            new["con_proj"] = w
        elif k.startswith("text_decoder."):
            new["decoder." + k.removeprefix("text_decoder.")] = w
        elif k.startswith(("visual.", "text.")) or k == "logit_scale":
            new[k] = w
    vocab = model.config.text.vocab
    if vocab is not None:  # compact id 0 = pad (BPE 0), 1 = unknown (mean row), 2.. = vocab
        emb = new["text.token_embedding.weight"]
        new["text.token_embedding.weight"] = torch.cat([emb[:1], emb.mean(0, keepdim=True), emb[vocab]])
        proj = new["decoder.text_projection"]
        new["decoder.text_projection"] = torch.cat([proj[:, :1], proj.mean(1, keepdim=True), proj[:, vocab]], 1)
    own = model.state_dict()
    for k, w in new.items():
        if k in own and own[k].shape != w.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(w.shape)}, the model needs {tuple(own[k].shape)}")
    missing, _ = model.load_state_dict({k: w for k, w in new.items() if k in own}, strict=False)
    return missing


def build_captioner(preset: str = "toy", overrides: dict | None = None) -> VideoCoCa:
    return VideoCoCa(captioner_config(preset, overrides))


def with_vocab(config: CaptionerConfig, vocab: list[int] | None) -> CaptionerConfig:
    return replace(config, text=replace(config.text, vocab=vocab))
