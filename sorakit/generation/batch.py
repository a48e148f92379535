"""Cron-safe batch generation: `sorakit sample --prompts FILE --out-dir DIR`.

* FILE is a `.txt` (one prompt a line; blank lines and `#` comments skipped) or a `.jsonl`
  (`prompt`, optional `width`, `height`, `frames`, `fps`, `seed`, `image` relative to FILE).
* A job is named by a hash of its prompt, its settings and the model path; a job whose video and
  sidecar are already in DIR is skipped, so rerunning the same command only does what is missing.
* `DIR/.lock` (flock) makes a second concurrent run exit at once with a clear message.
* Every file is written atomically; temp files left by a killed run are removed by the next one.
* `DIR/manifest.jsonl` gets one line per job run (status, timing, paths); `DIR/errors.jsonl` one per
  failure; `DIR/index.html` is a gallery of the videos with their prompts, rewritten after every job.
* A failing job is recorded and the batch goes on; the exit status is 1 when any job failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import json
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sorakit.generation.modes import GenerationConfig, Generated

MANIFEST = "manifest.jsonl"
ERRORS = "errors.jsonl"
GALLERY = "index.html"
LOCK = ".lock"
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds DIR; cron may simply try again later
JOB_FIELDS = {"width": int, "height": int, "frames": int, "fps": (int, float), "seed": int, "image": str}
SLUG_CHARS = 40


class BatchLocked(RuntimeError):
    pass


@dataclass
class Job:
    prompt: str
    where: str  # FILE:LINE, for messages
    overrides: dict = field(default_factory=dict)  # width/height/frames/fps/seed/image from the line
    error: str | None = None  # the line could not be read

    def config(self, base: GenerationConfig) -> GenerationConfig:
        return base.replace(**{k: v for k, v in self.overrides.items() if k != "image"})

    def image(self) -> Path | None:
        return Path(self.overrides["image"]) if self.overrides.get("image") else None


def read_prompts(path: str | os.PathLike) -> list[Job]:
    """Jobs from a .txt or .jsonl prompts file; a bad line becomes a job that fails with the reason."""
    path = Path(path)
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: prompts file must be .txt (one prompt a line) or .jsonl")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    jobs = []
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        where = f"{path}:{n}"
        if not line or line.startswith("#"):
            continue
        if path.suffix.lower() == ".txt":
            jobs.append(Job(line, where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            jobs.append(Job(line, where, error=f"{where}: not valid JSON ({e.msg})"))
            continue
        jobs.append(_job_from_json(obj, where, path.parent))
    if not jobs:
        raise ValueError(f"{path}: no prompts in the file")
    return jobs


def _job_from_json(obj, where: str, base: Path) -> Job:
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        return Job(json.dumps(obj), where, error=f"{where}: each line needs a non-empty \"prompt\" string")
    prompt = obj["prompt"].strip()
    unknown = sorted(set(obj) - set(JOB_FIELDS) - {"prompt"})
    if unknown:
        return Job(prompt, where, error=f"{where}: unknown key {unknown[0]!r} (valid: prompt, {', '.join(JOB_FIELDS)})")
    overrides = {}
    for k, typ in JOB_FIELDS.items():
        if k not in obj or obj[k] is None:
            continue
        v = obj[k]
        if isinstance(v, bool) or not isinstance(v, typ):
            return Job(prompt, where, error=f"{where}: {k} must be {'a number' if k == 'fps' else typ.__name__}, got {v!r}")
        overrides[k] = str((base / v).resolve()) if k == "image" else v
    return Job(prompt, where, overrides)


def job_key(job: Job, cfg: GenerationConfig, model: str) -> str:
    """The identity of a job: prompt + every setting + the model directory (+ the image's bytes).
    Settings at their default are left out, so a new setting in a later release (at its default)
    does not redo the batches already done."""
    default = dataclasses.asdict(type(cfg)())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if v != default[k]}
    settings.update({k: v for k, v in job.overrides.items() if k != "image"})
    payload = {"prompt": job.prompt, "settings": settings, "model": model}
    image = job.image()
    if image is not None and image.is_file():
        payload["image_sha256"] = hashlib.sha256(image.read_bytes()).hexdigest()
    if job.error:
        payload["error"] = job.error
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:SLUG_CHARS].rstrip("-") or "video"


@dataclass
class BatchResult:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    out_dir: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what cron, systemd and `kill` send) unwinds like Ctrl-C, so temp files are removed."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_stale_temps(out_dir: Path) -> int:
    """Temp files of a run killed with SIGKILL (`atomic_path` names them `.NAME.XXXX.tmp`)."""
    n = 0
    for p in out_dir.glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


Generator = Callable[[Job, GenerationConfig], Generated]


def run_batch(
    prompts_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: GenerationConfig,
    make_generator: Callable[[], Generator],
    *,
    model: str,
    preview: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> BatchResult:
    """Run every job of `prompts_file` not already done in `out_dir`.

    `make_generator()` is called once, when the first job needs the model, so a rerun with nothing
    left to do never loads it.
    """
    from sorakit.generation.outputs import is_complete, read_sidecar, write_generation
    from sorakit.utils.fs import LockHeld, append_jsonl, exclusive_lock, read_jsonl

    jobs = read_prompts(prompts_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = BatchResult(out_dir=out)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(out / LOCK))
        except LockHeld:
            holder = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
            raise BatchLocked(
                f"{out}: another sorakit batch (pid {holder or '?'}) is writing here; exiting without changes"
            ) from None
        stack.enter_context(_terminate_as_interrupt())
        stale = _remove_stale_temps(out)
        if stale:
            log(f"removed {stale} temp file(s) left by an interrupted run")
        manifest = read_jsonl(out / MANIFEST)
        recorded_ok = {e.get("key") for e in manifest if e.get("status") == "ok"}
        generator: Generator | None = None
        seen: set[str] = set()
        for i, job in enumerate(jobs):
            key = job_key(job, cfg, model)
            if key in seen:  # the same prompt and settings twice in one file: one video
                continue
            seen.add(key)
            video = out / f"{slug(job.prompt)}-{key[:10]}.mp4"
            entry = {"key": key, "prompt": job.prompt, "line": job.where}
            if job.error is None and is_complete(video):
                side = read_sidecar(video)
                if side.get("job_key") == key:
                    result.skipped += 1
                    if key not in recorded_ok:  # killed between the sidecar and the manifest line
                        append_jsonl(out / MANIFEST, {**entry, "status": "ok", **_paths(video, side.get("files")),
                                                      "seconds": (side.get("timing") or {}).get("seconds"),
                                                      "size": side.get("size"), "recovered": True})
                    continue
            if job.error is None and generator is None:
                generator = make_generator()  # a model that cannot load stops the batch: nothing to retry
            started = time.time()
            try:
                if job.error:
                    raise ValueError(job.error)
                job_cfg = job.config(cfg)
                log(f"[{i + 1}/{len(jobs)}] {job.prompt}")
                gen = generator(job, job_cfg)
                gen.record["job_key"] = key
                gen.record["job_line"] = job.where
                written = write_generation(video, gen.frames, gen.fps, gen.record, preview=preview, crf=job_cfg.crf)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one bad job must not stop the batch
                msg = str(e) if job.where in str(e) else f"{job.where}: {e}"
                err = {**entry, "status": "failed", "error": msg, "seconds": round(time.time() - started, 3),
                       "finished": _now()}
                append_jsonl(out / MANIFEST, err)
                append_jsonl(out / ERRORS, err)
                result.failed += 1
                log(f"failed: {msg}")
            else:
                files = {"video": written.video.name, "preview": written.preview.name if written.preview else None}
                append_jsonl(out / MANIFEST, {**entry, "status": "ok", **_paths(video, files),
                                              "seconds": round(time.time() - started, 3), "finished": _now(),
                                              "timing": gen.record.get("timing"), "size": gen.record.get("size")})
                result.ok += 1
            write_gallery(out)
        write_gallery(out)
    return result


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _paths(video: Path, files: dict | None) -> dict:
    from sorakit.generation.outputs import sidecar_path

    files = files or {}
    return {"video": video.name, "sidecar": sidecar_path(video).name, "preview": files.get("preview")}


def write_gallery(out_dir: str | os.PathLike) -> Path:
    """`index.html`: the latest state of every job in the manifest, newest first, with its prompt."""
    from sorakit.utils.fs import atomic_write_text, read_jsonl

    out = Path(out_dir)
    latest: dict[str, dict] = {}
    for e in read_jsonl(out / MANIFEST):
        if "key" in e:
            latest.pop(e["key"], None)
            latest[e["key"]] = e
    cards = []
    for e in reversed(list(latest.values())):
        prompt = html.escape(e.get("prompt", ""))
        if e.get("status") == "ok" and e.get("video"):
            media = (f'<img src="{html.escape(e["preview"])}" alt="{prompt}">' if e.get("preview")
                     else f'<video src="{html.escape(e["video"])}" controls loop muted></video>')
            size = e.get("size") or {}
            info = f'{size.get("width", "?")}x{size.get("height", "?")}, {size.get("frames", "?")} frames'
            cards.append(f'<figure><a href="{html.escape(e["video"])}">{media}</a><figcaption>{prompt}'
                         f'<small>{html.escape(info)} · <a href="{html.escape(e.get("sidecar", ""))}">settings</a></small>'
                         f'</figcaption></figure>')
        else:
            cards.append(f'<figure class="failed"><figcaption>{prompt}<small>failed: '
                         f'{html.escape(str(e.get("error", "")))}</small></figcaption></figure>')
    done = sum(e.get("status") == "ok" for e in latest.values())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sorakit: {done} videos</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; width: 420px; }}
figure img, figure video {{ max-width: 100%; image-rendering: pixelated; }}
figcaption small {{ display: block; color: #666; }}
.failed {{ color: #a00; }}
</style></head>
<body><h1>{done} videos, {len(latest) - done} failed</h1>
<main>
{chr(10).join(cards)}
</main></body></html>
"""
    path = out / GALLERY
    atomic_write_text(path, page)
    return path


def sample_batch(model: str | os.PathLike, prompts_file, out_dir, cfg: GenerationConfig, *, preview: bool = True,
                 log: Callable[[str], None] = lambda msg: None) -> BatchResult:
    """`sorakit sample --prompts FILE --out-dir DIR`: text-to-video per job, image-to-video when it names an image."""
    from sorakit.generation.modes import image_to_video, text_to_video
    from sorakit.generation.outputs import file_sha256, load_model, read_image

    def make_generator() -> Generator:
        pipe = load_model(model)

        def run(job: Job, job_cfg: GenerationConfig) -> Generated:
            image = job.image()
            if image is None:
                return text_to_video(pipe, job.prompt, job_cfg)
            gen = image_to_video(pipe, job.prompt, read_image(image), job_cfg)
            gen.record["inputs"] = {"image": {"path": str(image), "sha256": file_sha256(image)}}
            return gen

        return run

    return run_batch(prompts_file, out_dir, cfg, make_generator, model=str(Path(model).resolve()), preview=preview, log=log)
