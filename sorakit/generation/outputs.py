"""What every generated video leaves on disk, written so that nothing is ever half there.

    OUT.mp4   H.264 yuv420p (plays in browsers); the prompt in the `title` tag and the record
              (prompt, seed, settings, model) as JSON in the `comment` tag
    OUT.json  the sidecar: prompt, expanded prompt, seed, every setting, model identity, sizes, timing
    OUT.png   with --preview: a contact sheet of frames spread over the clip

Each file is written atomically, the sidecar last: a sidecar on disk means the video and preview
beside it are complete, which is what a rerun of a batch checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SIDECAR_SUFFIX = ".json"
PREVIEW_SUFFIX = ".png"
PREVIEW_FRAMES = 8  # frames on a contact sheet, evenly spread from first to last
PREVIEW_GAP = 2  # pixels between tiles
PREVIEW_MIN_TILE = 96  # small toy clips are upscaled (nearest) so the sheet is readable


@dataclass
class OutputPaths:
    video: Path
    sidecar: Path
    preview: Path | None = None

    def to_dict(self) -> dict:
        return {"video": str(self.video), "sidecar": str(self.sidecar), "preview": str(self.preview) if self.preview else None}


def sidecar_path(video: str | os.PathLike) -> Path:
    return Path(video).with_suffix(SIDECAR_SUFFIX)


def preview_path(video: str | os.PathLike) -> Path:
    return Path(video).with_suffix(PREVIEW_SUFFIX)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def contact_sheet(frames: np.ndarray, num: int = PREVIEW_FRAMES, columns: int | None = None) -> np.ndarray:
    """(H', W', 3) uint8 grid of `num` frames spread evenly over the clip (first and last included)."""
    frames = np.asarray(frames)
    t, h, w, _ = frames.shape
    idx = np.unique(np.linspace(0, t - 1, min(num, t)).round().astype(int))
    scale = max(1, math.ceil(PREVIEW_MIN_TILE / max(1, min(h, w))))
    tiles = [frames[i].repeat(scale, axis=0).repeat(scale, axis=1) for i in idx]
    th, tw = h * scale, w * scale
    cols = columns or min(len(tiles), 4)
    rows = math.ceil(len(tiles) / cols)
    g = PREVIEW_GAP
    sheet = np.full((rows * th + (rows + 1) * g, cols * tw + (cols + 1) * g, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, cols)
        y, x = g + r * (th + g), g + c * (tw + g)
        sheet[y : y + th, x : x + tw] = tile
    return sheet


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    from PIL import Image

    from sorakit.utils.fs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
    return path


def container_metadata(record: dict) -> dict[str, str]:
    """The tags stored in the MP4 itself, so a video separated from its sidecar still says what made it."""
    keep = ("prompt", "expanded_prompt", "mode", "seed", "settings", "model", "size")
    return {
        "title": str(record.get("prompt", "")),
        "comment": json.dumps({k: record[k] for k in keep if k in record}, ensure_ascii=False, sort_keys=True),
    }


def write_generation(
    out: str | os.PathLike, frames: np.ndarray, fps: float, record: dict, *, preview: bool = False, crf: int = 18
) -> OutputPaths:
    """Write the video, the optional contact sheet and the sidecar (last), each atomically."""
    from sorakit.media import write_video
    from sorakit.utils.fs import atomic_write_json

    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"{out}: generated videos are written as .mp4")
    frames = np.asarray(frames)
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"{out}: frames must have even sides for yuv420p, got {frames.shape[2]}x{frames.shape[1]}")
    paths = OutputPaths(out, sidecar_path(out), preview_path(out) if preview else None)
    write_video(out, frames, fps, crf=crf, metadata=container_metadata(record))
    if paths.preview is not None:
        write_png(paths.preview, contact_sheet(frames))
    sidecar = dict(record)
    sidecar["files"] = {"video": out.name, "preview": paths.preview.name if paths.preview else None}
    atomic_write_json(paths.sidecar, sidecar)
    return paths


def read_sidecar(video: str | os.PathLike) -> dict:
    """The sidecar of a generated video; a clear error naming the file when it is missing or broken."""
    path = sidecar_path(video)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no sidecar beside {Path(video).name}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "prompt" not in data:
        raise ValueError(f"{path}: not a sorakit sidecar (no 'prompt')")
    return data


def is_complete(video: str | os.PathLike) -> bool:
    """True when the video and its sidecar are both on disk (the sidecar is always written last)."""
    video = Path(video)
    if not (video.is_file() and sidecar_path(video).is_file()):
        return False
    try:
        files = read_sidecar(video).get("files") or {}
    except (ValueError, FileNotFoundError):
        return False
    pv = files.get("preview")
    return pv is None or (video.parent / pv).is_file()


# --------------------------------------------------------------------------------------------
# File-level entry points: read the inputs, run one mode, write the outputs (one call per command)
# --------------------------------------------------------------------------------------------

_PIPELINES: dict[str, object] = {}


def load_model(model: str | os.PathLike):
    """The pipeline in `model`, loaded once per process."""
    from sorakit.generation.pipeline import load_pipeline

    key = str(Path(model).resolve())
    if key not in _PIPELINES:
        _PIPELINES[key] = load_pipeline(model)
    return _PIPELINES[key]


def read_image(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def read_input_video(path: str | os.PathLike) -> tuple[np.ndarray, float, str | None]:
    """Frames, frame rate, and the prompt of its sidecar when it is a sorakit video."""
    from sorakit.media import probe, read_video

    info = probe(path)
    frames = read_video(path)
    prompt = None
    side = sidecar_path(path)
    if side.is_file():
        try:
            prompt = read_sidecar(path).get("prompt")
        except ValueError:
            prompt = None
    return frames, info.fps or 0.0, prompt


def _input(path: str | os.PathLike) -> dict:
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def _check_out(out: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    out = Path(out)
    for p in inputs:
        if p is not None and Path(p).resolve() == out.resolve():
            raise ValueError(f"{out}: the output would overwrite an input; choose another --out")
    return out


def sample_to_file(model, prompt: str, out, cfg, *, image=None, preview: bool = False):
    """`sorakit sample`: text-to-video, or image-to-video with `image`. Returns (paths, Generated)."""
    from sorakit.generation.modes import image_to_video, text_to_video

    out = _check_out(out, image)
    pipe = load_model(model)
    if image is not None:
        gen = image_to_video(pipe, prompt, read_image(image), cfg)
        gen.record["inputs"] = {"image": _input(image)}
    else:
        gen = text_to_video(pipe, prompt, cfg)
    return write_generation(out, gen.frames, gen.fps, gen.record, preview=preview, crf=cfg.crf), gen


def extend_to_file(model, video, out, cfg, *, direction: str, num_frames: int | None, prompt: str | None,
                   preview: bool = False):
    from sorakit.generation.modes import extend

    out = _check_out(out, video)
    frames, fps, source_prompt = read_input_video(video)
    kwargs = {"fps": fps} if fps else {}
    gen = extend(load_model(model), frames, cfg, direction=direction, num_frames=num_frames, prompt=prompt,
                 source_prompt=source_prompt, **kwargs)
    gen.record["inputs"] = {"video": _input(video)}
    return write_generation(out, gen.frames, gen.fps, gen.record, preview=preview, crf=cfg.crf), gen


def interpolate_to_file(model, a, b, out, cfg, *, num_frames: int | None, prompt: str | None, preview: bool = False):
    from sorakit.generation.modes import interpolate

    out = _check_out(out, a, b)
    fa, fps, prompt_a = read_input_video(a)
    fb, _, _ = read_input_video(b)
    kwargs = {"fps": fps} if fps else {}
    gen = interpolate(load_model(model), fa, fb, cfg, num_frames=num_frames, prompt=prompt, source_prompt=prompt_a, **kwargs)
    gen.record["inputs"] = {"a": _input(a), "b": _input(b)}
    return write_generation(out, gen.frames, gen.fps, gen.record, preview=preview, crf=cfg.crf), gen


def edit_to_file(model, video, prompt: str, out, cfg, *, preview: bool = False):
    from sorakit.generation.modes import edit

    out = _check_out(out, video)
    frames, fps, _ = read_input_video(video)
    kwargs = {"fps": fps} if fps else {}
    gen = edit(load_model(model), frames, prompt, cfg, **kwargs)
    gen.record["inputs"] = {"video": _input(video)}
    return write_generation(out, gen.frames, gen.fps, gen.record, preview=preview, crf=cfg.crf), gen
