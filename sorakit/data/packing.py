"""Patch n' pack: latents of any shape → rows of spacetime-patch tokens for the DiT, and back.

    batch = pack([z1, z2, z3], patch=(1, 2, 2), max_tokens=4096)   # z: (C, T', H', W'), any shapes
    pred = dit(batch.x, t, batch.pos, batch.seq_ids, ...)            # (B, N, P)
    z1_hat, z2_hat, z3_hat = batch.unpack(pred)                     # back to each (C, T', H', W')

* `patchify` cuts a latent into (pt, ph, pw) patches (zero-padding the far edges up to a multiple of
  the patch; `valid` marks the real elements) with integer (t, h, w) patch coordinates for RoPE.
* `first_fit_decreasing` packs videos (an image is a 1-frame video) into rows of at most `max_tokens`.
* NaViT token dropping: `drop_rates` drops a random fraction of a video's tokens before packing
  (positions are kept, so the model still knows where every remaining token is).
* `per_video_loss` averages a loss over each video's elements first and then over videos with the
  configured weighting, so a long video counts as configured, not by its token count by accident.
* `packed_batches` turns a stream of latent samples (the latent-shard reader) into packed batches,
  keeping a pool of videos so that rows fill up; every batch reports its token utilisation.
* Per-video feature maps (Dv, T', h, w) (the captioner's vision features, for REPA) are resampled
  to each video's token grid and packed beside its tokens (`PackedBatch.features`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch

Patch = tuple[int, int, int]
VideoWeighting = Literal["video", "sqrt", "token"]
VIDEO_WEIGHTINGS: tuple[str, ...] = ("video", "sqrt", "token")


# --------------------------------------------------------------------------------------------
# One video ↔ tokens
# --------------------------------------------------------------------------------------------


def token_grid(shape: Sequence[int], patch: Patch) -> tuple[int, int, int]:
    """(nt, nh, nw) patches for a latent of shape (C, T, H, W) or (T, H, W)."""
    t, h, w = shape[-3:]
    pt, ph, pw = patch
    return (math.ceil(t / pt), math.ceil(h / ph), math.ceil(w / pw))


def num_tokens(shape: Sequence[int], patch: Patch) -> int:
    nt, nh, nw = token_grid(shape, patch)
    return nt * nh * nw


def grid_positions(grid: tuple[int, int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 3) integer (t, h, w) coordinates of the patches, in patchify's order."""
    axes = [torch.arange(g, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def patchify(x: torch.Tensor, patch: Patch) -> torch.Tensor:
    """(C, T, H, W) → (n, C·pt·ph·pw), zero-padding the far edges up to whole patches (any dtype)."""
    c = x.shape[0]
    pt, ph, pw = patch
    nt, nh, nw = token_grid(x.shape, patch)
    if (nt * pt, nh * ph, nw * pw) != tuple(x.shape[1:]):
        padded = x.new_zeros(c, nt * pt, nh * ph, nw * pw)
        padded[:, : x.shape[1], : x.shape[2], : x.shape[3]] = x
        x = padded
    x = x.reshape(c, nt, pt, nh, ph, nw, pw).permute(1, 3, 5, 0, 2, 4, 6)  # (nt, nh, nw, C, pt, ph, pw)
    return x.reshape(nt * nh * nw, c * pt * ph * pw)


def unpatchify(tokens: torch.Tensor, shape: Sequence[int], patch: Patch) -> torch.Tensor:
    """(n, C·pt·ph·pw) → (C, T, H, W): the inverse of `patchify`, cropping the padding."""
    c, t, h, w = shape
    pt, ph, pw = patch
    nt, nh, nw = token_grid(shape, patch)
    x = tokens.reshape(nt, nh, nw, c, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)  # (C, nt, pt, nh, ph, nw, pw)
    return x.reshape(c, nt * pt, nh * ph, nw * pw)[:, :t, :h, :w]


def kept_tokens(n: int, drop_rate: float) -> int:
    """Tokens a video keeps at a NaViT drop rate (at least one)."""
    return max(1, round(n * (1.0 - drop_rate)))


def token_features(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """A feature map (Dv, T, h, w) → (nt·nh·nw, Dv) one row per token of a `grid`, in `patchify`'s
    order: trilinear resampling, which averages the pt frames of a temporal patch when T = nt·pt."""
    f = torch.nn.functional.interpolate(features[None].float(), size=grid, mode="trilinear", align_corners=False)
    return f[0].flatten(1).T  # (n, Dv)


# Per-sample tensors laid out (·, T', ...) along latent frames: a temporal window cuts them together.
TIME_ALIGNED: tuple[str, ...] = ("latent", "features")


def cut_frames(sample: dict, frames: slice) -> dict:
    """`sample` with its time-aligned tensors ("latent", "features") cut to the latent frames `frames`."""
    return {**sample, **{k: sample[k][:, frames] for k in TIME_ALIGNED if sample.get(k) is not None}}


def frame_window(shape: Sequence[int], patch: Patch, max_tokens: int, rng: random.Random | None = None) -> slice:
    """A random window of whole temporal patches of a (C, T, H, W) latent with at most `max_tokens`
    tokens (all of it when it fits).

    Raises ValueError when even one temporal patch is larger than `max_tokens`.
    """
    nt, nh, nw = token_grid(shape, patch)
    per_step = nh * nw
    if per_step > max_tokens:
        raise ValueError(
            f"a latent of {tuple(shape[-2:])} spatial size has {per_step} tokens per frame, "
            f"more than max_tokens={max_tokens}"
        )
    steps = max_tokens // per_step
    if steps >= nt:
        return slice(None)
    start = (rng or random).randrange(nt - steps + 1)
    pt = patch[0]
    return slice(start * pt, (start + steps) * pt)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`, largest items first."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"video {i} has {n} tokens, more than the row capacity {capacity}")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


@dataclass
class VideoSlot:
    """Where one video sits in a packed batch."""

    row: int
    slot: int  # index of the video within its row (its seq id)
    start: int  # first token in the row
    length: int  # tokens in the row (after dropping)
    shape: tuple[int, int, int, int]  # latent (C, T, H, W)
    keep: torch.Tensor | None = None  # indices into the full token grid when tokens were dropped


@dataclass
class PackedBatch:
    x: torch.Tensor  # (B, N, P) patch tokens (latent values)
    pos: torch.Tensor  # (B, N, 3) long (t, h, w) patch coordinates
    seq_ids: torch.Tensor  # (B, N) long video slot in the row; -1 = padding
    valid: torch.Tensor  # (B, N, P) bool: a real latent element (not patch or row padding)
    given: torch.Tensor  # (B, N, P) bool: a given (clean context) latent element
    videos: list[VideoSlot] = field(default_factory=list)  # in the order the videos were given
    patch: Patch = (1, 1, 1)
    features: torch.Tensor | None = None  # (B, N, Dv) each token's vision features (REPA), 0 on padding

    @property
    def capacity(self) -> int:
        return self.seq_ids.numel()

    @property
    def real_tokens(self) -> int:
        return sum(v.length for v in self.videos)

    @property
    def utilisation(self) -> float:
        return self.real_tokens / max(1, self.capacity)

    @property
    def num_slots(self) -> int:
        return 1 + max((v.slot for v in self.videos), default=0)

    def video_index(self) -> torch.Tensor:
        """(B, N) long: the index (in `videos`) of each token's video, -1 on padding."""
        idx = torch.full_like(self.seq_ids, -1)
        for i, v in enumerate(self.videos):
            idx[v.row, v.start : v.start + v.length] = i
        return idx

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Spread per-video `values` (V, ...) to tokens (B, N, ...); padding gets video 0's value."""
        return values[self.video_index().clamp(min=0)]

    def token_given(self) -> torch.Tensor:
        """(B, N) bool: every real element of the token is given (a clean context token)."""
        return (self.given | ~self.valid).all(-1) & self.valid.any(-1)

    def unpack(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """(B, N, P) → one (C, T, H, W) tensor per video, in input order (no dropped tokens allowed)."""
        out = []
        for v in self.videos:
            if v.keep is not None:
                raise ValueError("cannot unpack a video whose tokens were dropped")
            out.append(unpatchify(tokens[v.row, v.start : v.start + v.length], v.shape, self.patch))
        return out

    def to(self, device: torch.device | str, **kwargs) -> "PackedBatch":
        return PackedBatch(
            self.x.to(device, **kwargs), self.pos.to(device, **kwargs), self.seq_ids.to(device, **kwargs),
            self.valid.to(device, **kwargs), self.given.to(device, **kwargs), self.videos, self.patch,
            None if self.features is None else self.features.to(device, **kwargs),
        )


def pack(
    latents: Sequence[torch.Tensor],
    patch: Patch,
    max_tokens: int | None = None,
    *,
    given_frames: Sequence[torch.Tensor | None] | None = None,
    drop_rates: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
    pad_to_capacity: bool = False,
    bins: Sequence[Sequence[int]] | None = None,
    features: Sequence[torch.Tensor] | None = None,
) -> PackedBatch:
    """Pack latents (C, T, H, W) of any shapes into rows of at most `max_tokens` tokens.

    `given_frames[i]` is a (T,) bool mask of video i's given latent frames. `features[i]` is a
    feature map (Dv, T, h, w) of video i (any h, w), resampled to its token grid (`token_features`).
    `max_tokens=None` makes the row capacity the largest video's token count. Rows are `max_tokens` long when
    `pad_to_capacity` (static shapes for compiled kernels), else as long as the fullest row.
    `bins` gives the rows' video indices explicitly (default: first-fit-decreasing).
    """
    if not latents:
        raise ValueError("pack needs at least one latent")
    patch = tuple(patch)
    if features is not None and len(features) != len(latents):
        raise ValueError(f"features: {len(features)} maps for {len(latents)} latents")
    toks, valids, givens, poss, keeps, shapes, feats = [], [], [], [], [], [], []
    for i, z in enumerate(latents):
        if z.dim() != 4:
            raise ValueError(f"latent {i} must be (C, T, H, W), got shape {tuple(z.shape)}")
        tok = patchify(z, patch)
        valid = patchify(torch.ones_like(z, dtype=torch.bool), patch)
        g = given_frames[i] if given_frames is not None else None
        if g is None:
            given = torch.zeros_like(valid)
        else:
            if g.shape != (z.shape[1],):
                raise ValueError(f"given_frames[{i}] must have one flag per latent frame ({z.shape[1]}), got {tuple(g.shape)}")
            given = patchify(g.to(device=z.device, dtype=torch.bool)[None, :, None, None].expand_as(z), patch) & valid
        grid = token_grid(z.shape, patch)
        pos = grid_positions(grid, z.device)
        if features is not None:
            if features[i].dim() != 4 or features[i].shape[1] != z.shape[1]:
                raise ValueError(f"features[{i}] must be (Dv, {z.shape[1]}, h, w) like its latent, "
                                 f"got {tuple(features[i].shape)}")
            feats.append(token_features(features[i].to(z.device), grid))
        keep = None
        rate = drop_rates[i] if drop_rates is not None else 0.0
        if rate > 0:
            n = tok.shape[0]
            keep = torch.randperm(n, generator=generator)[: kept_tokens(n, rate)].sort().values.to(z.device)
            tok, valid, given, pos = tok[keep], valid[keep], given[keep], pos[keep]
            if feats:
                feats[-1] = feats[-1][keep]
        toks.append(tok), valids.append(valid), givens.append(given), poss.append(pos), keeps.append(keep)
        shapes.append(tuple(int(s) for s in z.shape))
    lengths = [t.shape[0] for t in toks]
    capacity = max_tokens if max_tokens is not None else max(lengths)
    if bins is None:
        bins = first_fit_decreasing(lengths, capacity)
    elif sorted(i for b in bins for i in b) != list(range(len(latents))) or any(
        sum(lengths[i] for i in b) > capacity for b in bins
    ):
        raise ValueError("bins must hold every video once, each row within the capacity")
    n_row = capacity if pad_to_capacity else max(sum(lengths[i] for i in b) for b in bins)
    ref = toks[0]
    b_rows, p = len(bins), ref.shape[1]
    x = ref.new_zeros(b_rows, n_row, p)
    pos = torch.zeros(b_rows, n_row, 3, dtype=torch.long, device=ref.device)
    seq_ids = torch.full((b_rows, n_row), -1, dtype=torch.long, device=ref.device)
    valid = torch.zeros(b_rows, n_row, p, dtype=torch.bool, device=ref.device)
    given = torch.zeros_like(valid)
    feat = x.new_zeros(b_rows, n_row, feats[0].shape[1], dtype=torch.float32) if feats else None
    slots: list[VideoSlot | None] = [None] * len(latents)
    for r, members in enumerate(bins):
        start = 0
        for s, i in enumerate(members):
            n = lengths[i]
            x[r, start : start + n] = toks[i]
            pos[r, start : start + n] = poss[i]
            seq_ids[r, start : start + n] = s
            valid[r, start : start + n] = valids[i]
            given[r, start : start + n] = givens[i]
            if feat is not None:
                feat[r, start : start + n] = feats[i]
            slots[i] = VideoSlot(r, s, start, n, shapes[i], keeps[i])
            start += n
    return PackedBatch(x, pos, seq_ids, valid, given, slots, patch, feat)


def pack_text(
    batch: PackedBatch, tokens: Sequence[torch.Tensor], pooled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay out per-video text like the packed videos: `tokens[i]` (L_i, D) are video i's real text
    tokens, `pooled` (V, D) its pooled vectors.

    Returns ctx (B, Lr, D) with each row's videos' text tokens concatenated, ctx_ids (B, Lr) (the
    video slot each belongs to, -1 padding) and pooled (B, S, D) per slot.
    """
    if len(tokens) != len(batch.videos) or pooled.shape[0] != len(batch.videos):
        raise ValueError(f"text for {len(tokens)} videos given to a batch of {len(batch.videos)}")
    b, s, d = batch.seq_ids.shape[0], batch.num_slots, pooled.shape[-1]
    lengths = [0] * b
    for i, v in enumerate(batch.videos):
        lengths[v.row] += tokens[i].shape[0]
    ctx = pooled.new_zeros(b, max(1, max(lengths)), d)
    ctx_ids = torch.full(ctx.shape[:2], -1, dtype=torch.long, device=pooled.device)
    pooled_rows = pooled.new_zeros(b, s, d)
    fill = [0] * b
    for i, v in enumerate(batch.videos):
        n, start = tokens[i].shape[0], fill[v.row]
        ctx[v.row, start : start + n] = tokens[i]
        ctx_ids[v.row, start : start + n] = v.slot
        pooled_rows[v.row, v.slot] = pooled[i]
        fill[v.row] += n
    return ctx, ctx_ids, pooled_rows


# --------------------------------------------------------------------------------------------
# Loss averaged per video
# --------------------------------------------------------------------------------------------


def per_video_loss(
    elem_loss: torch.Tensor, weight: torch.Tensor, batch: PackedBatch, weighting: str = "video"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `elem_loss` (B, N, P) over each video's elements where `weight` (B, N, P) is nonzero,
    then a weighted mean over videos: `video` (each video counts once), `sqrt` (by √tokens) or
    `token` (by its element count, what a flat mean over the row would do).

    Returns (scalar loss, per-video means (V,)); a video with nothing to learn (all given) is left out.
    """
    if weighting not in VIDEO_WEIGHTINGS:
        raise ValueError(f"unknown video weighting {weighting!r} (known: {', '.join(VIDEO_WEIGHTINGS)})")
    nv = len(batch.videos)
    idx = batch.video_index().flatten()  # (B·N,)
    idx = torch.where(idx >= 0, idx, nv)  # padding goes to a discarded bucket
    w = weight.to(elem_loss.dtype)
    sums = elem_loss.new_zeros(nv + 1).index_add(0, idx, (elem_loss * w).sum(-1).flatten())
    counts = elem_loss.new_zeros(nv + 1).index_add(0, idx, w.sum(-1).flatten())
    sums, counts = sums[:nv], counts[:nv]
    means = sums / counts.clamp(min=1e-8)
    has = counts > 0
    if weighting == "video":
        vw = has.to(means.dtype)
    elif weighting == "sqrt":
        vw = counts.sqrt()
    else:
        vw = counts
    total = (vw * means).sum() / vw.sum().clamp(min=1e-8)
    return total, means


# --------------------------------------------------------------------------------------------
# Packed batches from a stream of latent samples
# --------------------------------------------------------------------------------------------


def select_fullest(lengths: Sequence[int], capacity: int, rows: int) -> list[list[int]]:
    """The `rows` fullest first-fit-decreasing bins (lists of indices) of a pool of videos."""
    bins = first_fit_decreasing(lengths, capacity)
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))
    return bins[:rows]


def packed_batches(
    samples: Iterable[dict],
    patch: Patch,
    max_tokens: int,
    *,
    rows: int = 1,
    pool_size: int = 64,
    drop_rate: float = 0.0,
    drop_schedule: Literal["constant", "uniform"] = "constant",
    seed: int = 0,
    transform: Callable[[dict, random.Random], dict | None] | None = None,
) -> Iterator[dict]:
    """Packed batches of `rows` rows × `max_tokens` tokens from samples {"latent" (C,T,H,W), ...}.

    Keeps a pool of `pool_size` videos; each batch takes the `rows` fullest first-fit-decreasing
    bins of the pool, so the leftovers wait for better partners instead of being padded. Videos
    longer than a row are cut to a random window of latent frames. `transform(sample, rng)` may
    add `"given"` ((T,) bool latent-frame mask) or return None to skip the sample.
    Yields {"batch": PackedBatch, "captions": [str], "keys": [str], "utilisation": float}.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pool: list[tuple[dict, float, int]] = []  # (sample, drop rate, kept tokens)

    def rate() -> float:
        return drop_rate if drop_schedule == "constant" else rng.uniform(0.0, drop_rate)

    def emit(final: bool) -> Iterator[dict]:
        while pool and (final or len(pool) >= pool_size):
            bins = select_fullest([n for _, _, n in pool], max_tokens, rows)
            chosen = [i for b in bins for i in b]
            items = [pool[i] for i in chosen]
            local = {i: j for j, i in enumerate(chosen)}
            for i in sorted(chosen, reverse=True):
                pool.pop(i)
            batch = pack(
                [s["latent"] for s, _, _ in items], patch, max_tokens,
                given_frames=[s.get("given") for s, _, _ in items],
                drop_rates=[r for _, r, _ in items], generator=gen, pad_to_capacity=True,
                bins=[[local[i] for i in b] for b in bins],
                features=[s["features"] for s, _, _ in items] if all("features" in s for s, _, _ in items) else None,
            )
            if batch.seq_ids.shape[0] < rows:  # fewer bins than rows: keep B fixed
                extra = rows - batch.seq_ids.shape[0]
                batch = _add_empty_rows(batch, extra)
            yield {
                "batch": batch,
                "captions": [s.get("caption") or "" for s, _, _ in items],
                "keys": [s.get("key", "") for s, _, _ in items],
                "utilisation": batch.utilisation,
            }
            if not final:
                break

    for sample in samples:
        window = frame_window(sample["latent"].shape, patch, max_tokens, rng)
        if window != slice(None):
            sample = cut_frames(sample, window)
        if transform is not None:
            sample = transform(sample, rng)
            if sample is None:
                continue
        r = rate()
        pool.append((sample, r, kept_tokens(num_tokens(sample["latent"].shape, patch), r)))
        yield from emit(final=False)
    yield from emit(final=True)


def _add_empty_rows(batch: PackedBatch, extra: int) -> PackedBatch:
    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        pad = t.new_full((extra, *t.shape[1:]), fill)
        return torch.cat([t, pad], 0)

    return PackedBatch(
        grow(batch.x, 0), grow(batch.pos, 0), grow(batch.seq_ids, -1), grow(batch.valid, False),
        grow(batch.given, False), batch.videos, batch.patch,
        None if batch.features is None else grow(batch.features, 0),
    )
