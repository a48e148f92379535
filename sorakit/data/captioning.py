"""Captioning over shards: re-caption a dataset, caption one file, evaluate a captioner.

`caption_shards(SRC, model_dir, OUT)` maps every input shard to an output shard of the same name,
never touching the input: each sample keeps its members, gets the new caption in `KEY.txt` and
`json.caption`, and any previous caption moves to `json.original_caption`. An output shard is
written atomically, so after a kill a rerun skips the shards already done (resume). A sample whose
video cannot be decoded is left out of the output and reported in `OUT/errors.jsonl`.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from sorakit.data.latents import resolve_device
from sorakit.data.shards import ERRORS_NAME, iter_tar_samples, list_shards, read_manifest, write_manifest, write_tar_atomic
from sorakit.utils.fs import append_jsonl, exclusive_lock, read_jsonl
from sorakit.utils.procs import run_each, spread_device

if TYPE_CHECKING:  # imported where used, so the CLI starts without loading torch
    import torch

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")  # as the shard reader looks for them


def read_clip_frames(src, num_frames: int, total: int | None = None) -> np.ndarray:
    """`num_frames` frames spread over the whole clip, uint8 (n, H, W, 3) at native size.

    Decodes with a stride of about total/num_frames so that only the frames needed are converted to
    RGB (the costly part of decoding small clips), then picks evenly among them.
    """
    from sorakit.media import probe, read_video
    from sorakit.models.captioner import frame_indices

    if not total:
        total = probe(src).num_frames
    frames = read_video(src, stride=max(1, int(total) // num_frames))
    return frames[frame_indices(len(frames), num_frames)]


def sample_video(members: dict[str, bytes]) -> bytes:
    for ext in VIDEO_EXTS:
        if ext in members:
            return members[ext]
    raise ValueError(f"no video member (found {', '.join(sorted(members)) or 'nothing'})")


def sample_meta(members: dict[str, bytes]) -> dict:
    raw = members.get("json")
    meta = json.loads(raw) if raw else {}
    if not isinstance(meta, dict):
        raise ValueError("json member is not an object")
    return meta


def sample_caption(members: dict[str, bytes], meta: dict) -> str | None:
    txt = members.get("txt")
    if txt:
        text = txt.decode("utf-8", errors="replace").strip()
        if text:
            return text
    cap = meta.get("caption")
    return cap.strip() if isinstance(cap, str) and cap.strip() else None


def prepare_sample(members: dict[str, bytes], num_frames: int, image_size: int) -> torch.Tensor:
    """A raw shard sample -> the captioner's input (num_frames, 3, S, S) uint8."""
    from sorakit.models.captioner import prepare_clip

    meta = sample_meta(members)
    frames = read_clip_frames(sample_video(members), num_frames, meta.get("num_frames"))
    return prepare_clip(frames, num_frames, image_size)


@dataclass
class Prepared:
    key: str
    members: dict[str, bytes]
    frames: torch.Tensor | None  # None: not decoded (broken, or its caption is kept)
    error: str | None = None


def iter_prepared(
    tar: Path, num_frames: int, image_size: int, *, batch_size: int, workers: int = 2,
    skip: Callable[[dict], bool] | None = None,
) -> Iterator[list[Prepared]]:
    """Batches of a shard's samples, frames decoded in `workers` threads (PyAV releases the GIL)."""

    def prep(item: tuple[str, dict]) -> Prepared:
        key, members = item
        if skip is not None and skip(members):
            return Prepared(key, members, None)
        try:
            return Prepared(key, members, prepare_sample(members, num_frames, image_size))
        except Exception as e:  # a broken sample is reported, never fatal
            return Prepared(key, members, None, error=str(e).splitlines()[0] if str(e) else type(e).__name__)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        batch: list[tuple[str, dict]] = []
        for item in iter_tar_samples(tar):
            batch.append(item)
            if len(batch) == batch_size:
                yield list(pool.map(prep, batch))
                batch = []
        if batch:
            yield list(pool.map(prep, batch))


def load_captioner(model_dir: str | Path, device: str = "auto"):
    from sorakit.models.io import load_pretrained

    return load_pretrained(model_dir, kind="captioner").to(resolve_device(device)).eval()


@dataclass
class CaptionSettings:
    frames: int | None = None  # frames per clip; default: the model's num_frames
    beams: int = 1
    max_len: int | None = None
    batch_size: int = 16
    workers: int = 2  # decoding threads (per process)
    processes: int = 1  # processes, each captioning whole shards with its own copy of the model
    keep_existing: bool = False  # samples that already have a caption keep it
    device: str = "auto"


_WORKER: dict = {}  # the captioner of this process (`run_each`'s init loads it)


def _init_worker(slot: int, threads: int, model_dir: str, device: str) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    _WORKER["model"] = load_captioner(model_dir, spread_device(resolve_device(device), slot))


def caption_shard(shard: str, out_dir: str, settings: CaptionSettings,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Re-caption one shard into `out_dir/<same name>` with this process's captioner; returns its
    record: `name`, `count` (samples written), `captioned`, `kept` and `errors` (samples left out)."""
    import torch

    from sorakit.models.captioner import DecodeOptions, caption_clips

    model, s = _WORKER["model"], settings
    num_frames = s.frames or model.config.num_frames
    opts = DecodeOptions(max_len=s.max_len, num_beams=s.beams)
    keep = (lambda m: sample_caption(m, sample_meta(m)) is not None) if s.keep_existing else None
    record = {"name": Path(shard).name, "count": 0, "captioned": 0, "kept": 0, "errors": []}

    def samples() -> Iterator[tuple[str, dict]]:
        for batch in iter_prepared(Path(shard), num_frames, model.config.vision.image_size, batch_size=s.batch_size,
                                   workers=s.workers, skip=keep):
            todo = [p for p in batch if p.frames is not None]
            captions = caption_clips(model, torch.stack([p.frames for p in todo]), opts) if todo else []
            new = dict(zip((p.key for p in todo), captions))
            for p in batch:
                if p.error is not None:
                    record["errors"].append({"source": f"{shard}:{p.key}", "reason": p.error})
                    continue
                yield p.key, recaptioned(p.members, new.get(p.key))
                record["captioned" if p.key in new else "kept"] += 1
            if progress:
                progress(len(batch))

    record["count"] = write_tar_atomic(Path(out_dir) / record["name"], samples())
    return record


def caption_shards(src, model_dir: str | Path, out_dir: str | Path, settings: CaptionSettings | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Re-caption every shard of `src` into `out_dir`; returns a summary (counts, clips/s, and
    `failed_shards`: those that could not be read, with the reason).

    `progress(n)` is called with the number of samples done: after each batch in one process, after
    each shard with `settings.processes` > 1.
    """
    from sorakit.models.io import read_model_config

    s = settings or CaptionSettings()
    if s.processes < 1:
        raise ValueError(f"processes must be at least 1, got {s.processes}")
    shards = list_shards(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(p.resolve().parent == out.resolve() for p in shards):
        raise ValueError(f"{out}: the output directory must differ from the input shards' directory")
    config = read_model_config(model_dir)
    if config["kind"] != "captioner":
        raise ValueError(f"{model_dir}: not a captioner model directory (kind {config['kind']!r})")
    most = config["config"]["num_frames"]
    num_frames = s.frames or most
    if num_frames > most:
        raise ValueError(f"--frames {num_frames}: {model_dir} takes at most {most} frames per clip")
    errors_path = out / ERRORS_NAME
    settings_record = {"source": str(src), "model": str(model_dir), "frames": num_frames, "beams": s.beams,
                       "max_len": s.max_len, "keep_existing": s.keep_existing}
    done: dict[str, int] = {}
    manifest = read_manifest(out)
    if manifest:
        done = {x["name"]: int(x["count"]) for x in manifest.get("shards", [])}
    summary = {"shards": len(shards), "skipped_shards": 0, "captioned": 0, "kept": 0, "errors": 0,
               "failed_shards": [], "seconds": 0.0}
    start = time.perf_counter()
    with exclusive_lock(out / ".caption.lock"):
        known_errors = {(e.get("source"), e.get("reason")) for e in read_jsonl(errors_path)}
        todo = []
        for shard in shards:
            target = out / shard.name
            if not target.exists():
                todo.append(str(shard))
                continue
            # written atomically, so it is complete: resume skips it
            if shard.name not in done:
                from sorakit.data.shards import count_tar_samples

                done[shard.name] = count_tar_samples(target)
            summary["skipped_shards"] += 1
            if progress:
                progress(done[shard.name])

        def finished(shard: str, record: dict) -> None:
            for err in record["errors"]:
                if (err["source"], err["reason"]) not in known_errors:
                    append_jsonl(errors_path, err)
            for k in ("captioned", "kept"):
                summary[k] += record[k]
            summary["errors"] += len(record["errors"])
            done[record["name"]] = record["count"]
            write_manifest(out, [{"name": n, "count": c} for n, c in done.items()], settings=settings_record)
            if progress and s.processes > 1:  # one process reports batch by batch
                progress(record["count"] + len(record["errors"]))

        work = functools.partial(caption_shard, out_dir=str(out), settings=s,
                                 progress=progress if s.processes == 1 else None)
        failures = run_each(work, todo, processes=s.processes, init=_init_worker, initargs=(str(model_dir), s.device),
                            on_done=finished)
        summary["failed_shards"] = [f"{shard}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                    for shard, e in failures]
        write_manifest(out, [{"name": n, "count": c} for n, c in done.items()], settings=settings_record)
    summary["seconds"] = time.perf_counter() - start
    n = summary["captioned"] + summary["kept"]
    summary["clips_per_s"] = n / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


def recaptioned(members: dict[str, bytes], caption: str | None) -> dict:
    """The sample's members with `caption` in KEY.txt and json.caption (previous one in json.original_caption).

    `caption=None` keeps the existing caption (`--keep-existing`).
    """
    meta = sample_meta(members)
    previous = sample_caption(members, meta)
    out = {k: v for k, v in members.items() if k not in ("txt", "json")}
    if caption is None:
        caption = previous
    elif previous is not None:
        meta["original_caption"] = previous
    meta["caption"] = caption
    out["json"] = meta
    out["txt"] = caption or ""
    return out


def caption_file(path: str | Path, model_dir: str | Path, frames: int | None = None, beams: int = 1,
                 device: str = "auto") -> str:
    """The caption of one video file."""
    from sorakit.models.captioner import DecodeOptions, caption_clips, prepare_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    model = load_captioner(model_dir, device)
    n = frames or model.config.num_frames
    clip = prepare_clip(read_clip_frames(path, n), n, model.config.vision.image_size)
    return caption_clips(model, clip[None], DecodeOptions(num_beams=beams))[0]


# --------------------------------------------------------------------------------------------
# Evaluation: exact match, per-word accuracy, zero-shot retrieval
# --------------------------------------------------------------------------------------------


def normalize_caption(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _no_grad(fn):
    """`torch.no_grad()` as a decorator that imports torch only when called."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_no_grad
def evaluate_captioner(src, model_dir: str | Path, *, frames: int | None = None, beams: int = 1,
                       batch_size: int = 32, workers: int = 2, limit: int | None = None, device: str = "auto",
                       progress: Callable[[int], None] | None = None) -> dict:
    """Score a captioner on shards whose samples have reference captions.

    exact_match: generated == reference (case and spacing ignored). word_accuracy: fraction of the
    reference's words that the generated caption has at the same position. retrieval_accuracy: each
    video's contrastive embedding against the embeddings of the set of distinct reference captions;
    correct when its own caption ranks first.
    """
    import torch

    from sorakit.models.captioner import DecodeOptions, generate

    model = load_captioner(model_dir, device)
    n = frames or model.config.num_frames
    opts = DecodeOptions(num_beams=beams)
    refs: list[str] = []
    preds: list[str] = []
    video_emb: list[torch.Tensor] = []
    errors = 0
    has_ref = lambda m: sample_caption(m, sample_meta(m)) is not None  # noqa: E731
    for shard in list_shards(src):
        for batch in iter_prepared(shard, n, model.config.vision.image_size, batch_size=batch_size, workers=workers,
                                   skip=lambda m: not has_ref(m)):
            batch = [p for p in batch if p.frames is not None or p.error]
            errors += sum(p.error is not None for p in batch)
            batch = [p for p in batch if p.frames is not None]
            if limit is not None:
                batch = batch[: max(0, limit - len(refs))]
            if not batch:
                continue
            emb, tokens = model.encode_video(torch.stack([p.frames for p in batch]).to(model.logit_scale.device))
            preds += [model.tokenizer.decode(ids) for ids in generate(model, tokens, opts)]
            refs += [sample_caption(p.members, sample_meta(p.members)) for p in batch]
            video_emb.append(emb.cpu())
            if progress:
                progress(len(batch))
        if limit is not None and len(refs) >= limit:
            break
    if not refs:
        raise ValueError(f"{src}: no samples with a reference caption to evaluate on")
    refs_n = [normalize_caption(r) for r in refs]
    preds_n = [normalize_caption(p) for p in preds]
    exact = float(np.mean([p == r for p, r in zip(preds_n, refs_n)]))
    word_acc = float(np.mean([
        sum(a == b for a, b in zip(p.split(), r.split())) / max(1, len(r.split())) for p, r in zip(preds_n, refs_n)
    ]))
    distinct = sorted(set(refs_n))
    text_emb = torch.cat([model.embed_texts(distinct[i : i + 256]).cpu() for i in range(0, len(distinct), 256)])
    best = (torch.cat(video_emb) @ text_emb.T).argmax(1).tolist()
    index = {c: i for i, c in enumerate(distinct)}
    retrieval = float(np.mean([b == index[r] for b, r in zip(best, refs_n)]))
    result = {
        "samples": len(refs), "distinct_captions": len(distinct), "decode_errors": errors,
        "exact_match": exact, "word_accuracy": word_acc, "retrieval_accuracy": retrieval,
        "frames": n, "beams": beams,
    }
    attrs = _toy_attribute_accuracy(preds_n, refs_n)
    if attrs is not None:
        result["toy_attributes"] = attrs
    result["examples"] = [{"reference": r, "generated": p} for r, p in list(zip(refs, preds))[:5]]
    return result


def _toy_attribute_accuracy(preds: list[str], refs: list[str]) -> dict | None:
    """Per-attribute accuracy when every reference is a toy-world caption (a diagnostic, else None)."""
    from sorakit.data.toyworld import parse_caption

    parsed_refs = [parse_caption(r) for r in refs]
    if any(r is None for r in parsed_refs):
        return None
    parsed = [parse_caption(p) or {} for p in preds]
    keys = parsed_refs[0].keys()
    return {k: float(np.mean([p.get(k) == r[k] for p, r in zip(parsed, parsed_refs)])) for k in keys}
