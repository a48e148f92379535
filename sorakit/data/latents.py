"""Latent shards: `sorakit encode` writes them, the DiT trains on them without ever running the VAE.

    encode_shards("runs/demo/shards", "runs/demo/vae", "runs/demo/latents")
    for s in latent_pipeline("runs/demo/latents", shuffle=100):
        s["latent"]   # float32 (C, T', H', W'), normalised; s["caption"], s["meta"], s["key"]

Layout: input shard `shard-000003.tar` becomes `LATENT_DIR/shard-000003.tar` with the same keys; per
sample `KEY.latent.safetensors` (tensor "latent", float16), `KEY.json` (the input's metadata plus
`latent_shape`, `encoded_frames`, `encoded_fps`) and `KEY.txt` (caption, when known). The manifest
records the VAE (absolute path and config) and the counts; `errors.jsonl` lists skipped samples.

With `features` (a captioner directory), each sample also gets `KEY.vision.safetensors`: the
captioner's image-tower features of the frame each latent frame ends on, float16 (Wv, T', H'/s, W'/s)
on cells of `feature_stride` = s latent pixels (set s to the DiT's spatial patch), which a DiT trained
with representation alignment (REPA) learns to predict from noisy latents.

Resuming: each shard is written atomically, then a record `LATENT_DIR/.encode/done/NAME.json`
(count, errors). A shard without its record is encoded again, so a killed run can simply be rerun.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sorakit.utils.fs import atomic_write_json, exclusive_lock
from sorakit.utils.procs import run_each, spread_device

log = logging.getLogger(__name__)

LATENT_MEMBER = "latent.safetensors"
LATENT_KEY = "latent"  # tensor name inside the safetensors member
FEATURES_MEMBER = "vision.safetensors"
FEATURES_KEY = "features"
STATE_DIR = ".encode"
MANIFEST_KIND = "latents"


@dataclass
class EncodeSettings:
    max_frames: int | None = None  # encode at most this many frames of each clip (None: all)
    fps: float | None = None  # resample clips to this rate first (None: their own)
    device: str = "auto"  # auto, cpu, cuda, cuda:1, ...
    workers: int = 1  # processes, each encoding whole shards
    features: str | None = None  # a captioner directory: also store its vision features per latent frame
    feature_stride: int = 2  # latent pixels per feature cell (the DiT's spatial patch)

    def validate(self) -> None:
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {self.max_frames}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.feature_stride < 1:
            raise ValueError(f"feature_stride must be at least 1, got {self.feature_stride}")


@dataclass
class EncodeResult:
    out_dir: Path
    manifest: dict
    encoded_shards: int  # shards encoded by this run (the others were already done)
    failed_shards: list[str]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------------------------
# Encoding one shard (runs in a worker process or inline)
# --------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(slot: int, threads: int, model_dir: str, device: str, features: str | None = None) -> None:
    import torch

    from sorakit.models.io import load_pretrained

    if threads:
        torch.set_num_threads(threads)
    device = spread_device(device, slot)
    _WORKER["vae"] = load_pretrained(model_dir, kind="vae", map_location=device).to(device)
    _WORKER["captioner"] = None
    if features:
        _WORKER["captioner"] = load_pretrained(features, kind="captioner", map_location=device).to(device).eval()


def tensor_bytes(x, key: str) -> bytes:
    """A tensor as a safetensors member (float16)."""
    from safetensors.torch import save

    return save({key: x.detach().to("cpu").half().contiguous()})


def latent_bytes(latent) -> bytes:
    """A latent (C, T', H', W') as a safetensors member (float16)."""
    return tensor_bytes(latent, LATENT_KEY)


def encode_sample(vae, members: dict[str, bytes], settings: EncodeSettings, captioner=None) -> dict[str, Any]:
    """Raw sample members → latent sample members. Raises on a broken clip."""
    import json

    import numpy as np

    from sorakit.data.reader import _caption, _video_bytes
    from sorakit.media import iter_frames

    raw_meta = members.get("json")
    meta = json.loads(raw_meta) if raw_meta else {}
    if not isinstance(meta, dict):
        raise ValueError("json member is not an object")
    counted = {"n": 0}
    ends: list = []  # the frame each latent frame ends on (frame k·t), for the vision features
    last: list = []

    def frames() -> Iterator:
        for frame in iter_frames(_video_bytes(members), fps=settings.fps, max_frames=settings.max_frames):
            if captioner is not None:
                if counted["n"] % vae.temporal_factor == 0:
                    ends.append(frame)
                last[:] = [frame]
            counted["n"] += 1
            yield frame

    latent = vae.encode_video(frames())
    meta["latent_shape"] = list(latent.shape)
    out: dict[str, Any] = {LATENT_MEMBER: latent_bytes(latent)}
    if captioner is not None:
        _, t, h, w = latent.shape
        ends += last * (t - len(ends))  # the VAE pads the last group by repeating the last frame
        s = settings.feature_stride
        grid = (-(-h // s), -(-w // s))
        feats = captioner.frame_features(np.stack(ends[:t]), cell=s * vae.spatial_factor, grid=grid)
        out[FEATURES_MEMBER] = tensor_bytes(feats, FEATURES_KEY)
        meta["features_shape"] = list(feats.shape)
    meta["encoded_frames"] = counted["n"]
    if settings.fps or not meta.get("fps"):
        meta["encoded_fps"] = settings.fps
    else:
        meta["encoded_fps"] = meta["fps"]
    out["json"] = meta
    caption = _caption(members, meta)
    if caption:
        out["txt"] = caption
    return out


def encode_shard(shard: str, out_dir: str, settings: EncodeSettings, vae=None) -> dict:
    """Encode one shard into `out_dir/<same name>`; returns its done record (count, errors)."""
    from sorakit.data.shards import iter_tar_samples, write_tar_atomic

    vae = vae or _WORKER["vae"]
    captioner = _WORKER.get("captioner")
    errors: list[dict] = []
    name = Path(shard).name

    def samples() -> Iterator[tuple[str, dict]]:
        try:
            for key, members in iter_tar_samples(shard):
                try:
                    yield key, encode_sample(vae, members, settings, captioner)
                except Exception as e:  # one broken clip never stops the job
                    errors.append({"shard": name, "key": key, "reason": f"{type(e).__name__}: {e}"})
        except Exception as e:  # a truncated or corrupt tar: keep what was read
            errors.append({"shard": name, "key": None, "reason": f"unreadable shard ({e})"})

    count = write_tar_atomic(Path(out_dir) / name, samples())
    record = {"name": name, "count": count, "errors": errors}
    atomic_write_json(Path(out_dir) / STATE_DIR / "done" / f"{name}.json", record)
    return record


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _merge(out: Path, names: list[str], model_dir: Path, settings: EncodeSettings, source: str) -> dict:
    """Rebuild manifest.json and errors.jsonl from the done records (so a resumed run counts once)."""
    import json

    from sorakit.data.shards import ERRORS_NAME, write_manifest
    from sorakit.models.io import read_model_config
    from sorakit.utils.fs import atomic_write_text

    records = []
    for n in names:
        p = out / STATE_DIR / "done" / f"{n}.json"
        if p.is_file():
            records.append(json.loads(p.read_text(encoding="utf-8")))
    errors = [e for r in records for e in r["errors"]]
    atomic_write_text(out / ERRORS_NAME, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
    vae_meta = read_model_config(model_dir)
    return write_manifest(
        out,
        shards=[{"name": r["name"], "count": r["count"]} for r in records],
        settings={k: v for k, v in asdict(settings).items() if k not in ("device", "workers")},
        kind=MANIFEST_KIND,
        source=source,
        vae={"path": str(model_dir), "config": vae_meta["config"]},
        totals={"skipped": len(errors)},
        complete=len(records) == len(names),
    )


def encode_shards(
    shards: Any,
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: EncodeSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Encode every shard of `shards` into latent shards in `out_dir`; shards already done are kept.

    `progress(n)` is called with the sample count of each finished shard.
    """
    from sorakit.data.shards import list_shards
    from sorakit.models.io import read_model_config

    settings = settings or EncodeSettings()
    settings.validate()
    model_dir = Path(model_dir).resolve()
    if read_model_config(model_dir)["kind"] != "vae":
        raise ValueError(f"{model_dir}: not a VAE model directory")
    paths = [Path(p).resolve() for p in list_shards(shards)]
    names = [p.name for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"{shards}: two input shards share the name {sorted(dup)[0]} (outputs are named after inputs)")
    out = Path(out_dir)
    if any(p.parent == out.resolve() for p in paths):
        raise ValueError(f"{out}: the output directory must not be the input directory")
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    with exclusive_lock(out / STATE_DIR / "lock"):
        for tmp in out.glob(".*.tmp"):  # temporaries of a killed run
            tmp.unlink(missing_ok=True)
        todo = [p for p in paths if not (out / STATE_DIR / "done" / f"{p.name}.json").is_file()]

        failures = run_each(functools.partial(encode_shard, out_dir=str(out), settings=settings), [str(p) for p in todo],
                            processes=settings.workers, init=_init_worker,
                            initargs=(str(model_dir), device, settings.features),
                            on_done=(lambda _, record: progress(record["count"])) if progress else None)
        for shard, e in failures:
            log.error("%s: not encoded (%s)", shard, e)
        failed = [Path(shard).name for shard, _ in failures]
        source = ",".join(str(p) for p in sorted({p.parent for p in paths}))
        manifest = _merge(out, names, model_dir, settings, source)
    return EncodeResult(out, manifest, len(todo) - len(failed), failed)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_latent_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a latent directory: `vae` (`path`, `config`), `shards`, `totals`, `settings`."""
    from sorakit.data.shards import read_manifest

    m = read_manifest(directory)
    if m is None:
        raise FileNotFoundError(f"{directory}: no manifest.json (not a latent directory made by `sorakit encode`)")
    if m.get("kind") != MANIFEST_KIND or "vae" not in m:
        raise ValueError(f"{directory}: manifest.json is not a latent manifest (run `sorakit encode` to make one)")
    return m


def decode_latent_sample(sample: dict) -> dict:
    """A webdataset sample of a latent shard → `{"key", "latent", "caption", "meta"}`."""
    import json

    from safetensors.torch import load

    if LATENT_MEMBER not in sample:
        raise ValueError(f"no {LATENT_MEMBER} member")
    latent = load(sample[LATENT_MEMBER])[LATENT_KEY].float()
    features = load(sample[FEATURES_MEMBER])[FEATURES_KEY].float() if FEATURES_MEMBER in sample else None
    meta = json.loads(sample["json"]) if sample.get("json") else {}
    txt = sample.get("txt")
    caption = txt.decode("utf-8").strip() if isinstance(txt, bytes) else None
    caption = caption or (meta.get("caption") if isinstance(meta.get("caption"), str) else None)
    meta["shard"] = str(sample.get("__url__", ""))
    out = {"key": sample["__key__"], "latent": latent, "caption": caption, "meta": meta}
    if features is not None:
        out["features"] = features  # (Wv, T', H'/s, W'/s)
    return out


def _decode_stage(src: Iterable[dict]) -> Iterator[dict]:
    for sample in src:
        try:
            yield decode_latent_sample(sample)
        except Exception as e:  # a broken sample is logged and skipped, never stops training
            log.warning("%s %s: skipped, cannot decode latent (%s)", sample.get("__url__"), sample.get("__key__"), e)


def latent_pipeline(shards: Any, *, shuffle: int = 0, resampled: bool = False, seed: int = 0):
    """A `webdataset.DataPipeline` over latent shards, split by node and worker.

    shards: a latent directory, a tar, a glob, or a list of those. resampled: draw shards with
    replacement forever (step-based training on many nodes); else one pass, shards split between
    nodes and DataLoader workers. shuffle: sample shuffle buffer (0: file order).
    """
    from sorakit.data.shards import sample_pipeline

    return sample_pipeline(shards, _decode_stage, shuffle=shuffle, resampled=resampled, seed=seed)
