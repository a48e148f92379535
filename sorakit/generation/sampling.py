"""The one function that turns text + latent shapes (+ given latent frames) into latents.

    latents = generate_latents(dit, diffusion_cfg, text_encoder, ["a red circle moving left ..."],
                               [(T', H', W')], guidance=5.0, steps=30, seed=0)

Every generation mode is this call with different `given` frames: text-to-video (none given),
image-to-video (the first latent frame), extension (the first or last k), interpolation (the first
and last), and video-to-video editing through `init_latents` + `strength` (SDEdit). The videos are
packed like in training (each attends only to itself), each draws its noise from its own seed so a
video does not change when other videos share its batch, and given frames equal the given latents
bit for bit in the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sorakit.data.packing import PackedBatch, pack, pack_text
from sorakit.diffusion import DiffusionConfig, get_sampler, network_time, sampling_grid, self_condition_input, shift_factor


@dataclass
class GivenLatents:
    """Context for one video: its latent (C, T', H', W') and which latent frames (T',) bool are given."""

    latent: torch.Tensor
    frames: torch.Tensor


def _per_video(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # CPU generator: the same seed gives the same video on every device.
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def encode_text(text_encoder, texts: list[str], batch: PackedBatch, device) -> tuple[torch.Tensor, ...]:
    """The DiT's text inputs (ctx, ctx_ids, pooled) for `batch`, one text per packed video (`pack_text`)."""
    emb = text_encoder.encode(texts).to(device)
    return pack_text(batch, [tok[m].float() for tok, m in zip(emb.tokens, emb.mask)], emb.pooled.float())


def _pad_ctx(ctx: torch.Tensor, ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ctx.shape[1]
    if extra == 0:
        return ctx, ids
    return (
        torch.cat([ctx, ctx.new_zeros(ctx.shape[0], extra, ctx.shape[2])], 1),
        torch.cat([ids, ids.new_full((ids.shape[0], extra), -1)], 1),
    )


@torch.no_grad()
def generate_latents(
    dit: torch.nn.Module,
    diffusion_cfg: DiffusionConfig,
    text_encoder,
    prompts: Sequence[str],
    shapes: Sequence[tuple[int, int, int]],
    *,
    given: Sequence[GivenLatents | tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    negative_prompt: str | Sequence[str] = "",
    guidance: float = 5.0,
    sampler: str | None = None,
    steps: int = 30,
    seed: int | Sequence[int] = 0,
    strength: float = 1.0,
    init_latents: Sequence[torch.Tensor | None] | None = None,
    max_tokens: int | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Sample one latent (C, T', H', W') per prompt, on the CPU in float32.

    shapes: latent (T', H', W') per video. given[i]: `GivenLatents` or (latent, frames) or None.
    negative_prompt: the unconditional text for classifier-free guidance (one, or one per video);
    guidance 1 turns guidance off. seed: one per video, or a base seed (video i gets seed + i).
    strength < 1 with init_latents[i]: start from init noised to t = strength (SDEdit) and run
    round(steps · strength) steps. max_tokens: row capacity (default: the largest video).
    """
    n = len(prompts)
    if n == 0:
        return []
    if len(shapes) != n:
        raise ValueError(f"got {len(shapes)} shapes for {n} prompts")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    device = next(dit.parameters()).device
    channels = dit.config.in_channels
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    givens = _per_video(given, n, "given") if given is not None else [None] * n
    inits = _per_video(init_latents, n, "init_latents") if init_latents is not None else [None] * n
    negatives = _per_video(negative_prompt, n, "negative_prompt")

    full_shapes, noise, context, frames = [], [], [], []
    for i, shape in enumerate(shapes):
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape {i} must be a positive latent (T', H', W'), got {tuple(shape)}")
        full = (channels, *map(int, shape))
        full_shapes.append(full)
        noise.append(_noise(full, seeds[i]))
        g = givens[i]
        if g is not None:
            latent, mask = (g.latent, g.frames) if isinstance(g, GivenLatents) else g
            if tuple(latent.shape) != full or tuple(mask.shape) != (full[1],):
                raise ValueError(
                    f"given latent {i} must be {full} with a ({full[1]},) frame mask, "
                    f"got {tuple(latent.shape)} and {tuple(mask.shape)}"
                )
            context.append(latent.detach().float().cpu())
            frames.append(mask.bool().cpu())
        else:
            context.append(torch.zeros(full))
            frames.append(None)

    patch = tuple(dit.config.patch)
    state = pack(noise, patch, max_tokens, given_frames=frames)  # the layout: same for every pack() below
    values = pack(context, patch, max_tokens).x
    batch = state.to(device)
    given_mask, given_values = batch.given, values.to(device)

    # Per-video noise shift (by latent size), spread to tokens: the grid is (S + 1, B, N, 1).
    positions = torch.tensor([s[1] * s[2] * s[3] for s in full_shapes], dtype=torch.float32)
    token_shift = batch.per_token(shift_factor(positions, diffusion_cfg).to(device))[..., None]
    t_start = strength if any(z is not None for z in inits) and strength < 1.0 else 1.0
    run_steps = max(1, round(steps * t_start))
    grid = sampling_grid(diffusion_cfg, run_steps, token_shift, t_start=t_start)
    x = batch.x * grid.sigma[0]
    if t_start < 1.0:
        starts = [z.detach().float().cpu() if z is not None else torch.zeros(f) for z, f in zip(inits, full_shapes)]
        for z, f in zip(starts, full_shapes):
            if tuple(z.shape) != f:
                raise ValueError(f"init latent must be {f}, got {tuple(z.shape)}")
        x = x + grid.alpha[0] * pack(starts, patch, max_tokens).x.to(device)
    x = torch.where(given_mask, given_values, x)

    ctx, ctx_ids, pooled = encode_text(text_encoder, list(prompts), batch, device)
    guided = guidance != 1.0
    if guided:
        u_ctx, u_ids, u_pooled = encode_text(text_encoder, [str(s) for s in negatives], batch, device)
        length = max(ctx.shape[1], u_ctx.shape[1])
        ctx, ctx_ids = _pad_ctx(ctx, ctx_ids, length)
        u_ctx, u_ids = _pad_ctx(u_ctx, u_ids, length)
        ctx, ctx_ids, pooled = torch.cat([ctx, u_ctx]), torch.cat([ctx_ids, u_ids]), torch.cat([pooled, u_pooled])
    token_given = batch.token_given()
    reps = 2 if guided else 1
    pos, seq_ids, tok_given = (v.repeat(reps, *[1] * (v.dim() - 1)) for v in (batch.pos, batch.seq_ids, token_given))

    # Self-conditioning: each branch (text, negative) sees its own x0 estimate from the previous call.
    x0_prev = torch.zeros_like(x).repeat(reps, 1, 1) if getattr(dit.config, "self_condition", False) else None
    branch_given = (given_mask.repeat(reps, 1, 1), given_values.repeat(reps, 1, 1))

    def denoise(x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal x0_prev
        t = network_time(alpha, sigma).expand(*x.shape[:2], 1)[..., 0]  # (B, N)
        t = t.masked_fill(token_given, 0.0)  # given tokens are clean
        x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
        pred = dit(x_in, t_in, pos, seq_ids, ctx, ctx_ids, pooled, tok_given, x0_prev=x0_prev).float()
        if x0_prev is not None:
            a, s = (v.expand_as(x).repeat(reps, 1, 1) for v in (alpha, sigma))
            x0_prev = self_condition_input(pred, x_in, a, s, diffusion_cfg.parametrisation, branch_given)
        if not guided:
            return pred
        cond, uncond = pred.chunk(2)
        return uncond + guidance * (cond - uncond)

    run = get_sampler(sampler, diffusion_cfg)
    was_training = dit.training
    dit.eval()
    try:
        out = run(denoise, x, grid, diffusion_cfg, given=(given_mask, given_values), callback=callback)
    finally:
        dit.train(was_training)
    return [z.float().cpu() for z in batch.unpack(out)]

