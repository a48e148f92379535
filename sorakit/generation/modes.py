"""Every generation mode is one model and one sampler; a mode only chooses which latent frames are given.

    text-to-video      nothing given
    image-to-video     latent frame 0 = the image, encoded as a 1-frame video
    extend forward     the first k latent frames = the input's last frames
    extend backward    the last k latent frames = the input's first frames
    interpolate        the first k = the end of A, the last k = the start of B
    edit (SDEdit)      nothing given; sampling starts from the input's latent noised to `strength`

The VAE is causal in time: latent frame 0 holds one frame and each later one `t` frames. Context
is therefore always re-encoded from pixels so that it sits where a training clip would put it: a
context that starts a window is encoded as a clip of 1 + (k−1)·t frames; a context that ends a
window (backward extension, the B side of an interpolation) is encoded behind one copy of its first
frame, so its k latent frames are whole t-frame groups. Input frames are never re-decoded: the
output holds them unchanged, plus the new frames.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from sorakit.config import ConfigError

if TYPE_CHECKING:  # torch loads lazily: `sorakit --help` must not wait for it
    import torch

Direction = Literal["forward", "backward"]
DIRECTIONS: tuple[str, ...] = ("forward", "backward")


@dataclass
class GenerationConfig:
    """Every generation setting and its default (the CLI options read their defaults from here)."""

    width: int | None = None  # output size; None: the pipeline's sample size, or the input's
    height: int | None = None
    frames: int | None = None  # frames to generate (sample: the clip's length; extend/interpolate: new frames)
    fps: float | None = None  # None: the input video's rate, else the pipeline's
    seed: int = 0
    steps: int = 20
    sampler: str | None = None  # None: DPM-Solver++(2M) for v/eps models, Euler for flow
    guidance: float = 5.0  # classifier-free guidance scale; 1 turns guidance off
    negative_prompt: str = ""
    expand: bool | None = None  # None: expand when the pipeline records a caption corpus ("captions")
    strength: float = 0.6  # edit: how far the input is noised before denoising (1 = ignore it)
    context: int = 2  # latent frames of the input given as context (extend, interpolate)
    window: int | None = None  # latent frames per sampling call when extending; None: the pipeline's
    feather: int = 8  # frames over which the decoder's error at a join fades out of the new frames; 0: off
    crf: int = 18  # H.264 quality of the written video
    refine: bool | None = None  # sample: apply the pipeline's refiners; None: when it holds any
    # Text-to-video in two passes (Emu Video's factorisation, Girdhar et al. 2023): sample the video,
    # keep its first latent frame, and sample the rest again as image-to-video from it. The second
    # pass places the motion relative to an object that is already there.
    two_pass: bool = False

    def validate(self) -> None:
        for name in ("width", "height", "frames"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be at least 1, got {v}")
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"fps must be positive, got {self.fps}")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 < self.strength <= 1.0:
            raise ConfigError(f"strength must be in (0, 1], got {self.strength}")
        if self.context < 1:
            raise ConfigError(f"context must be at least 1 latent frame, got {self.context}")
        if self.feather < 0:
            raise ConfigError(f"feather must be >= 0 frames, got {self.feather}")
        if self.window is not None and self.window < 2:
            raise ConfigError(f"window must be at least 2 latent frames, got {self.window}")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0, got {self.guidance}")

    def replace(self, **changes) -> "GenerationConfig":
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out


# Used only when a pipeline does not say (pipelines exported by `sorakit train dit` do).
FALLBACK_SAMPLE_SIZE = (128, 96, 17)  # width, height, frames
FALLBACK_FPS = 12.0
FALLBACK_WINDOW = 9  # latent frames


@dataclass
class SizePlan:
    """The output size for a request, and the latent that covers it."""

    width: int
    height: int
    frames: int
    latent: tuple[int, int, int]  # (T', H', W')
    tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Window:
    """One sampling call: its output latent, which latent frames were given and their values."""

    latent: torch.Tensor  # (C, T', H', W')
    given: torch.Tensor  # (T',) bool
    context: torch.Tensor | None  # (C, T', H', W') values under `given`
    seed: int


@dataclass
class Generated:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float
    record: dict
    windows: list[Window] = field(default_factory=list)


def _even(n: int) -> int:
    return n + (n % 2)


def _pipe_meta(pipe) -> dict:
    meta = getattr(pipe, "meta", None) or {}
    # pipeline.json keys win over the DiT's extra metadata (written by `sorakit train dit`)
    return {**(meta.get("dit_meta") or {}), **{k: v for k, v in meta.items() if k != "dit_meta"}}


def pipeline_default(pipe, name: str, fallback):
    """A generation default the pipeline records under "generation" (sample_size, fps, window)."""
    value = (_pipe_meta(pipe).get("generation") or {}).get(name)
    return fallback if value is None else value


def plan_size(pipe, width: int, height: int, frames: int) -> SizePlan:
    """Round a request to what the video and the models need, and say what changed.

    H.264 4:2:0 needs even sides, so odd ones grow by a pixel. Any other size is generated as is: the
    latent covers the frame rounded up to whole VAE cells (and the DiT pads the last patch, as it
    did in training), and the decoded video is cropped back to the requested size and length.
    """
    vae, dit = pipe.vae, pipe.dit
    notes = []
    w, h = _even(width), _even(height)
    if (w, h) != (width, height):
        notes.append(f"size {width}x{height} rounded to {w}x{h} (H.264 4:2:0 needs even sides)")
    _, tl, hl, wl = vae.latent_shape(frames, h, w)
    full = (vae.num_frames_for(tl), hl * vae.spatial_factor, wl * vae.spatial_factor)
    if full != (frames, h, w):
        notes.append(
            f"latent {tl}x{hl}x{wl} (T'xH'xW') decodes to {full[0]} frames of {full[2]}x{full[1]}, "
            f"cropped to {frames} frames of {w}x{h}"
        )
    from sorakit.data.packing import num_tokens

    tokens = num_tokens((tl, hl, wl), tuple(dit.config.patch))
    return SizePlan(w, h, frames, (tl, hl, wl), tokens, notes)


# --------------------------------------------------------------------------------------------
# Prompts, model identity, the sampling call
# --------------------------------------------------------------------------------------------


def _meta_path(pipe, key: str) -> str | None:
    """A path the pipeline metadata records, relative to the pipeline directory or, as written at
    training time, to the working directory; None when absent or gone."""
    value = _pipe_meta(pipe).get(key)
    if not value or not isinstance(value, str):
        return None
    base = getattr(pipe, "path", None)
    for root in ([Path(base)] if base else []) + [Path.cwd()]:
        p = Path(value) if Path(value).is_absolute() else root / value
        if p.exists() or any(ch in value for ch in "*?["):
            return str(p)
    return None


def training_data(pipe) -> str | None:
    """The latent shards the DiT trained on ("data", written by `sorakit train dit`)."""
    return _meta_path(pipe, "data")


def caption_corpus(pipe, explicit: bool = False) -> str | None:
    """The captions prompts are expanded towards: "captions" in the pipeline metadata (shards, .txt,
    .jsonl or .csv); when expansion is asked for explicitly, else the DiT's training shards (read
    whole, so only on request)."""
    return _meta_path(pipe, "captions") or (training_data(pipe) if explicit else None)


def expand_for(pipe, prompt: str, cfg: GenerationConfig) -> tuple[str, dict | None]:
    """The text the model sees, and how it was made (None when the prompt is used as written)."""
    if cfg.expand is False or not prompt.strip():
        return prompt, None
    captions = caption_corpus(pipe, explicit=bool(cfg.expand))
    if not captions:
        if cfg.expand:
            raise ValueError("--expand needs a caption corpus: the pipeline records neither \"captions\" nor its training \"data\"")
        return prompt, None
    cache = _EXPANDERS.get(captions)
    if cache is None:
        from sorakit.generation.expand import PromptExpander

        cache = _EXPANDERS[captions] = PromptExpander(captions)  # one corpus index per process
    e = cache.expand(prompt, cfg.seed)
    return e.text, {"backend": e.backend, "note": e.note}


_EXPANDERS: dict[str, object] = {}
_IDENTITIES: dict[str, dict] = {}


def _component_identity(path: Path) -> dict:
    from sorakit.generation.outputs import file_sha256

    out: dict = {"path": str(path.resolve())}
    for name, key in (("config.json", "config_sha256"), ("model.safetensors", "weights_sha256")):
        f = path / name
        if f.is_file():
            out[key] = file_sha256(f)
    return out


def model_identity(pipe) -> dict:
    """Where the model came from and the sha256 of each component's config and weights."""
    path = getattr(pipe, "path", None)
    if path is None:
        return {"path": None}
    key = str(Path(path).resolve())
    if key not in _IDENTITIES:
        from sorakit.generation.pipeline import read_pipeline

        resolved = read_pipeline(path)["resolved"]
        ident = {"path": key}
        for name in ("dit", "vae", "text_encoder"):
            ident[name] = _component_identity(resolved[name])
        ident["refiners"] = [_component_identity(r) for r in resolved["refiners"]]
        _IDENTITIES[key] = ident
    return _IDENTITIES[key]


def _sample(
    pipe,
    prompt: str,
    shape: tuple[int, int, int],
    cfg: GenerationConfig,
    seed: int,
    *,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
    init: torch.Tensor | None = None,
    clock: dict | None = None,
) -> Window:
    import torch

    from sorakit.generation.sampling import GivenLatents, generate_latents

    steps_done = [0]

    def count(step, x, x0):
        steps_done[0] += 1

    start = time.perf_counter()
    [z] = generate_latents(
        pipe.dit,
        pipe.diffusion_cfg,
        pipe.text_encoder,
        [prompt],
        [shape],
        given=[GivenLatents(*given)] if given is not None else None,
        negative_prompt=cfg.negative_prompt,
        guidance=cfg.guidance,
        sampler=cfg.sampler,
        steps=cfg.steps,
        seed=[seed],
        strength=cfg.strength if init is not None else 1.0,
        init_latents=[init] if init is not None else None,
        callback=count,
    )
    if clock is not None:
        clock["sampling_s"] = clock.get("sampling_s", 0.0) + time.perf_counter() - start
        clock["steps"] = clock.get("steps", 0) + steps_done[0]
    return Window(z, given[1] if given is not None else torch.zeros(shape[0], dtype=torch.bool),
                  given[0] if given is not None else None, seed)


def _given(latent_shape: tuple[int, ...], parts: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A full (C, T', H', W') context tensor and (T',) mask from (start frame, latent) pieces."""
    import torch

    ctx = torch.zeros(latent_shape)
    mask = torch.zeros(latent_shape[1], dtype=torch.bool)
    for start, z in parts:
        ctx[:, start : start + z.shape[1]] = z
        mask[start : start + z.shape[1]] = True
    return ctx, mask


def _encode_head(vae, frames: np.ndarray) -> torch.Tensor:
    """Latent of frames that START a window: a clip of its own, latent 0 = its first frame."""
    return vae.encode_video(frames)


def _encode_tail(vae, frames: np.ndarray) -> torch.Tensor:
    """Latent of k·t frames that END a window, as whole t-frame groups: encoded behind one copy
    of their first frame (the causal encoder's stand-in for the frame before), which is dropped."""
    return vae.encode_video(np.concatenate([frames[:1], frames]))[:, 1:]


def _record(mode: str, prompt: str, text: str, expansion: dict | None, cfg: GenerationConfig, pipe, **extra) -> dict:
    from sorakit import __version__
    from sorakit.config import to_dict
    from sorakit.diffusion import default_sampler

    settings = to_dict(cfg)  # as resolved for this video: no None left where a default was used
    settings["sampler"] = cfg.sampler or default_sampler(pipe.diffusion_cfg)
    size = extra.get("size") or {}
    settings.update({k: size[k] for k in ("width", "height", "fps") if k in size})
    settings["frames"] = extra.get("new_frames", size.get("frames"))
    if mode.startswith("extend") or mode == "interpolate":
        settings["window"] = _window(pipe, cfg)
    settings["expand"] = expansion is not None
    settings["refine"] = extra.get("refined") is not None
    rec = {
        "mode": mode,
        "prompt": prompt,
        "expanded_prompt": text if expansion is not None else None,
        "expansion": expansion,
        "seed": cfg.seed,
        "settings": settings,
        "model": model_identity(pipe),
        "sorakit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rec.update(extra)
    return rec


def _timing(clock: dict, total_start: float) -> dict:
    steps = clock.get("steps", 0)
    sampling = clock.get("sampling_s", 0.0)
    return {
        "seconds": round(time.perf_counter() - total_start, 3),
        "sampling_seconds": round(sampling, 3),
        "steps": steps,
        "seconds_per_step": round(sampling / steps, 4) if steps else None,
    }


def _check_video(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"{name}: expected uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


# --------------------------------------------------------------------------------------------
# The modes
# --------------------------------------------------------------------------------------------


def text_to_video(pipe, prompt: str, cfg: GenerationConfig) -> Generated:
    start = time.perf_counter()
    dw, dh, dt = pipeline_default(pipe, "sample_size", FALLBACK_SAMPLE_SIZE)
    plan = plan_size(pipe, cfg.width or dw, cfg.height or dh, cfg.frames or dt)
    text, expansion = expand_for(pipe, prompt, cfg)
    clock: dict = {}
    win = _sample(pipe, text, plan.latent, cfg, cfg.seed, clock=clock)
    if cfg.two_pass and plan.latent[0] > 1:
        shape = (pipe.vae.latent_channels, *plan.latent)
        # Fresh noise: the first pass's noise already set a layout, motion included.
        win = _sample(pipe, text, plan.latent, cfg, cfg.seed + 1, given=_given(shape, [(0, win.latent[:, :1])]),
                      clock=clock)
    frames = pipe.vae.decode_video(win.latent, plan.frames, plan.height, plan.width)
    fps = cfg.fps or float(pipeline_default(pipe, "fps", FALLBACK_FPS))
    frames, fps, refined = _refine(pipe, win.latent, frames, fps, cfg)
    rec = _record("text-to-video", prompt, text, expansion, cfg, pipe, size=_size(frames, fps), plan=plan.to_dict(),
                  timing=_timing(clock, start), refined=refined)
    return Generated(frames, fps, rec, [win])


def _refine(pipe, latent, frames: np.ndarray, fps: float, cfg: GenerationConfig) -> tuple[np.ndarray, float, dict | None]:
    """The pipeline's chain of refiners on a sampled base latent (`sample --refine`): the output has
    s× the pixels and r× the frames at r× the rate; the record keeps the base size."""
    use = bool(pipe.refiners) if cfg.refine is None else cfg.refine
    if not use:
        return frames, fps, None
    if not pipe.refiners:
        raise ValueError(f"{pipe.path or 'the pipeline'}: holds no refiners (pipeline.json \"refiners\": []), so --refine cannot apply")
    from sorakit.generation.refine import chain_scales, refine_cascade

    start = time.perf_counter()
    s, r = chain_scales(pipe.refiners)
    out = refine_cascade(pipe.refiners, pipe.refiner_vaes, pipe.vae, latent, frames, seed=cfg.seed)
    info = {"spatial_scale": s, "temporal_scale": r, "base_size": _size(frames, fps),
            "seconds": round(time.perf_counter() - start, 3)}
    return out, fps * r, info


def _fit_image(image: np.ndarray, width: int | None, height: int | None) -> tuple[np.ndarray, list[str]]:
    """The image at its own aspect: scaled to the given width or height (both: fit inside), even sides."""
    from PIL import Image

    h, w = image.shape[:2]
    notes = []
    scale = 1.0
    if width and height:
        scale = min(width / w, height / h)
    elif width:
        scale = width / w
    elif height:
        scale = height / h
    tw, th = max(2, _even(round(w * scale))), max(2, _even(round(h * scale)))
    if (tw, th) != (w, h):
        image = np.array(Image.fromarray(image).resize((tw, th), Image.Resampling.LANCZOS))
        notes.append(f"image {w}x{h} resized to {tw}x{th} (its own aspect, even sides)")
    return image, notes


def image_to_video(pipe, prompt: str, image: np.ndarray, cfg: GenerationConfig) -> Generated:
    """The image is frame 0 (exactly, in the output) and latent frame 0 (given) of the video."""
    start = time.perf_counter()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    image, notes = _fit_image(image, cfg.width, cfg.height)
    frames_wanted = cfg.frames or pipeline_default(pipe, "sample_size", FALLBACK_SAMPLE_SIZE)[2]
    plan = plan_size(pipe, image.shape[1], image.shape[0], frames_wanted)
    plan.notes[:0] = notes
    text, expansion = expand_for(pipe, prompt, cfg)
    z_img = _encode_head(pipe.vae, image[None])  # (C, 1, H', W')
    shape = (pipe.vae.latent_channels, *plan.latent)
    clock: dict = {}
    win = _sample(pipe, text, plan.latent, cfg, cfg.seed, given=_given(shape, [(0, z_img)]), clock=clock)
    frames = pipe.vae.decode_video(win.latent, plan.frames, plan.height, plan.width)
    frames[0] = image
    fps = cfg.fps or float(pipeline_default(pipe, "fps", FALLBACK_FPS))
    frames, fps, refined = _refine(pipe, win.latent, frames, fps, cfg)  # frame 0 is then the refined image
    rec = _record("image-to-video", prompt, text, expansion, cfg, pipe, size=_size(frames, fps), plan=plan.to_dict(),
                  timing=_timing(clock, start), refined=refined)
    return Generated(frames, fps, rec, [win])


def _size(frames: np.ndarray, fps: float) -> dict:
    return {"width": int(frames.shape[2]), "height": int(frames.shape[1]), "frames": int(frames.shape[0]), "fps": fps}


def _window(pipe, cfg: GenerationConfig) -> int:
    return int(cfg.window or pipeline_default(pipe, "window", FALLBACK_WINDOW))


def _check_even(frames: np.ndarray, name: str) -> None:
    h, w = frames.shape[1:3]
    if w % 2 or h % 2:
        raise ValueError(
            f"{name}: {w}x{h} has an odd side; the output keeps the input frames unchanged and "
            "browser-playable H.264 needs even sides (crop the input by a pixel first)"
        )


def feather_weights(n: int, frames: int) -> np.ndarray:
    """(n,) weights from 1 at a join down to 0 `frames` frames away (all 0 when feathering is off)."""
    if frames <= 0:
        return np.zeros(n, np.float32)
    return np.clip(1.0 - np.arange(n, dtype=np.float32) / frames, 0.0, 1.0)


def feather_new_frames(new: np.ndarray, joins: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """`new` frames with the decoder's error at each join carried in and faded out.

    Input frames are kept and new ones are decoded, so a join meets the VAE's reconstruction error
    all at once; on flat toy-world frames that error is larger than an ordinary frame step, and even
    the true continuation, decoded, leaves a seam of ~2 (docs/benchmarks.md). Each join is given as
    (the kept frame beside it, its decoded twin from the same window, per-new-frame weights); the
    difference of the first two is added to the new frames by weight, so the first new frame
    continues the kept one and the correction fades as the content moves on. Where two joins' weights
    overlap (a short interpolation) they are scaled to sum to at most 1.
    """
    if not any(w.any() for _, _, w in joins):  # feathering off (or no joins): the frames as decoded
        return new
    total = np.maximum(1.0, sum(w for _, _, w in joins))
    out = new.astype(np.float32)
    for kept, decoded, w in joins:
        err = kept.astype(np.float32) - decoded.astype(np.float32)  # (H, W, 3)
        out += (w / total)[:, None, None, None] * err
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _extend_frames(pipe, video: np.ndarray, text: str, cfg: GenerationConfig, direction: str, count: int,
                   clock: dict, windows: list[Window], seed0: int) -> np.ndarray:
    """`count` new frames before or after `video`, sliding a window of context over the growing clip."""
    vae = pipe.vae
    tf = vae.temporal_factor
    window = _window(pipe, cfg)
    current = video
    new_parts: list[np.ndarray] = []
    made = 0
    while made < count:
        remaining = count - made
        _, _, hl, wl = vae.latent_shape(1, *current.shape[1:3])
        if direction == "forward":
            k = min(cfg.context, 1 + (len(current) - 1) // tf, window - 1)
            m = 1 + (k - 1) * tf
            ctx = _encode_head(vae, current[-m:])
            n_lat = min(window - k, math.ceil(remaining / tf))
            shape = (vae.latent_channels, k + n_lat, hl, wl)
            win = _sample(pipe, text, shape[1:], cfg, seed0 + len(windows), given=_given(shape, [(0, ctx)]), clock=clock)
            decoded = vae.decode_video(win.latent, m + n_lat * tf, *current.shape[1:3])
            new = decoded[m:][:remaining]
            new = feather_new_frames(new, [(current[-1], decoded[m - 1], feather_weights(len(new), cfg.feather))])
            current = np.concatenate([current, new])
        else:
            k = min(cfg.context, len(current) // tf, window - 1)
            if k < 1:
                raise ValueError(f"backward extension needs at least {tf} input frames, got {len(current)}")
            m = k * tf
            ctx = _encode_tail(vae, current[:m])
            n_lat = min(window - k, 1 + math.ceil((remaining - 1) / tf))
            shape = (vae.latent_channels, n_lat + k, hl, wl)
            win = _sample(pipe, text, shape[1:], cfg, seed0 + len(windows), given=_given(shape, [(n_lat, ctx)]), clock=clock)
            n_new = 1 + (n_lat - 1) * tf
            decoded = vae.decode_video(win.latent, n_new + 1, *current.shape[1:3])  # + the twin of current[0]
            new = decoded[:n_new][-remaining:]
            new = feather_new_frames(new, [(current[0], decoded[n_new], feather_weights(len(new), cfg.feather)[::-1])])
            current = np.concatenate([new, current])
        windows.append(win)
        new_parts.append(new)
        made += len(new)
    return np.concatenate(new_parts if direction == "forward" else new_parts[::-1])


def _context_prompt(prompt: str | None, fallback: str | None) -> str:
    if prompt is not None:
        return prompt
    return fallback or ""


def extend(pipe, video: np.ndarray, cfg: GenerationConfig, *, direction: str = "forward", num_frames: int | None = None,
           prompt: str | None = None, fps: float = FALLBACK_FPS, source_prompt: str | None = None) -> Generated:
    """The input frames unchanged plus `num_frames` new ones after (forward) or before (backward) them."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    start = time.perf_counter()
    video = _check_video(video, "input video")
    _check_even(video, "input video")
    count = num_frames or cfg.frames or pipeline_default(pipe, "sample_size", FALLBACK_SAMPLE_SIZE)[2]
    prompt = _context_prompt(prompt, source_prompt)
    text, expansion = expand_for(pipe, prompt, cfg)
    clock: dict = {}
    windows: list[Window] = []
    new = _extend_frames(pipe, video, text, cfg, direction, count, clock, windows, cfg.seed)
    frames = np.concatenate([video, new] if direction == "forward" else [new, video])
    out_fps = cfg.fps or fps
    joins = [len(video)] if direction == "forward" else [len(new)]
    rec = _record(f"extend-{direction}", prompt, text, expansion, cfg, pipe, size=_size(frames, out_fps),
                  input_frames=len(video), new_frames=len(new), joins=joins, windows=len(windows),
                  timing=_timing(clock, start))
    return Generated(frames, out_fps, rec, windows)


def interpolate(pipe, a: np.ndarray, b: np.ndarray, cfg: GenerationConfig, *, num_frames: int | None = None,
                prompt: str | None = None, fps: float = FALLBACK_FPS, source_prompt: str | None = None) -> Generated:
    """A unchanged, `num_frames` new frames that connect A's end to B's start, then B unchanged."""
    start = time.perf_counter()
    a, b = _check_video(a, "video A"), _check_video(b, "video B")
    _check_even(a, "video A")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"video A is {a.shape[2]}x{a.shape[1]} and video B {b.shape[2]}x{b.shape[1]}: interpolation needs one size")
    vae = pipe.vae
    tf = vae.temporal_factor
    window = _window(pipe, cfg)
    wanted = num_frames or cfg.frames or 2 * tf
    g = max(1, math.ceil(wanted / tf))
    notes = [] if g * tf == wanted else [f"{wanted} frames between the videos rounded to {g * tf} (the VAE's time step is {tf})"]
    kb = min(cfg.context, len(b) // tf)
    if kb < 1:
        raise ValueError(f"video B needs at least {tf} frames, got {len(b)}")
    prompt = _context_prompt(prompt, source_prompt)
    text, expansion = expand_for(pipe, prompt, cfg)
    clock: dict = {}
    windows: list[Window] = []

    ka = min(cfg.context, 1 + (len(a) - 1) // tf)
    if window < 3:
        raise ValueError(f"interpolation needs a window of at least 3 latent frames, got {window}")
    while ka + kb + 1 > window:  # keep at least one new latent frame in the last window
        if ka >= kb:
            ka -= 1
        else:
            kb -= 1
        if not notes or not notes[-1].startswith("context"):
            notes.append(f"context cut to fit the {window}-frame window")
    g_last = min(g, window - ka - kb)
    lead = np.zeros((0, *a.shape[1:]), np.uint8)
    if g > g_last:  # a long gap: extend A first, then connect the rest in one window
        lead = _extend_frames(pipe, a, text, cfg, "forward", (g - g_last) * tf, clock, windows, cfg.seed)
    a_ext = np.concatenate([a, lead])
    ka = min(ka, 1 + (len(a_ext) - 1) // tf)
    ma, mb = 1 + (ka - 1) * tf, kb * tf
    ctx_a = _encode_head(vae, a_ext[-ma:])
    ctx_b = _encode_tail(vae, b[:mb])
    shape = (vae.latent_channels, ka + g_last + kb, *ctx_a.shape[2:])
    win = _sample(pipe, text, shape[1:], cfg, cfg.seed + len(windows),
                  given=_given(shape, [(0, ctx_a), (ka + g_last, ctx_b)]), clock=clock)
    windows.append(win)
    n_mid = g_last * tf
    decoded = vae.decode_video(win.latent, ma + n_mid + 1, *a.shape[1:3])  # + the twin of b[0]
    last = decoded[ma : ma + n_mid]
    w = feather_weights(n_mid, cfg.feather)
    last = feather_new_frames(last, [(a_ext[-1], decoded[ma - 1], w), (b[0], decoded[ma + n_mid], w[::-1])])
    middle = np.concatenate([lead, last])
    frames = np.concatenate([a, middle, b])
    out_fps = cfg.fps or fps
    rec = _record("interpolate", prompt, text, expansion, cfg, pipe, size=_size(frames, out_fps), notes=notes,
                  input_frames=[len(a), len(b)], new_frames=len(middle), joins=[len(a), len(a) + len(middle)],
                  windows=len(windows), timing=_timing(clock, start))
    return Generated(frames, out_fps, rec, windows)


def edit(pipe, video: np.ndarray, prompt: str, cfg: GenerationConfig, *, fps: float = FALLBACK_FPS) -> Generated:
    """SDEdit: noise the input's latent to t = strength, denoise it towards the prompt."""
    start = time.perf_counter()
    video = _check_video(video, "input video")
    if not prompt.strip():
        raise ValueError("edit needs a prompt describing the result")
    text, expansion = expand_for(pipe, prompt, cfg)
    t, h, w = video.shape[:3]
    plan = plan_size(pipe, w, h, t)
    z0 = pipe.vae.encode_video(video)
    clock: dict = {}
    win = _sample(pipe, text, tuple(z0.shape[1:]), cfg, cfg.seed, init=z0, clock=clock)
    frames = pipe.vae.decode_video(win.latent, plan.frames, plan.height, plan.width)
    out_fps = cfg.fps or fps
    rec = _record("edit", prompt, text, expansion, cfg, pipe, size=_size(frames, out_fps), plan=plan.to_dict(),
                  timing=_timing(clock, start))
    return Generated(frames, out_fps, rec, [win])
