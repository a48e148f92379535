"""`sorakit ingest`: raw video files -> WebDataset shards of native-size clips.

How a run is made safe to kill at any moment and to spread over machines:

1. Plan. Inputs are expanded (files, folders, lists, CSVs), split between nodes by file size
   (identical files have equal sizes, so duplicates always meet on one node and dedup stays exact
   without every node reading every file), deduplicated (only files that share a size are hashed
   up front), and grouped in order into shards. The plan is saved (`DIR/.ingest/plan-*.json`)
   before any shard is written; `--resume` reuses it, so a resumed run sees exactly the same
   assignment of inputs to shards even if files were added meanwhile.
2. Write. Each shard is one task for the worker pool: its tar is written to a temporary name and
   renamed when complete, then a `DIR/.ingest/done/NAME.json` record (count, errors) is written.
   A shard without a record is redone on resume, so the final shards hold every input once.
3. Merge. The manifest and errors.jsonl are rebuilt from all nodes' plans and records, under a
   lock, by every node as it finishes; the last one to finish writes the complete manifest.

A clip that needs no cutting is copied into the tar byte for byte (streamed, hashed on the way);
`--max-seconds` / `--scene-split` decode it, cut it, and re-encode each piece at high quality.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from sorakit.data.prepare import Item, input_samples, sha256_file
from sorakit.data.scenes import SceneConfig
from sorakit.data.shards import ERRORS_NAME, SHARD_PREFIX, shard_name, write_manifest, write_tar_atomic
from sorakit.data.sources import Source, expand_inputs
from sorakit.utils.fs import atomic_write_json, atomic_write_text
from sorakit.utils.procs import die_with_parent

STATE_DIR = ".ingest"
_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class IngestError(ValueError):
    """A problem with the request itself (options, output directory): nothing was ingested."""


@dataclass
class IngestConfig:
    samples_per_shard: int = 1000  # most inputs (and, without cutting, samples) per shard
    max_shard_bytes: int | None = None  # most source bytes per shard (one bigger input gets its own)
    max_seconds: float | None = None  # cut longer videos into equal clips of at most this many seconds
    scene_split: bool = False  # cut at hard scene changes
    scene: SceneConfig = field(default_factory=SceneConfig)
    crf: int = 17  # x264 quality of re-encoded (cut) clips: 17 is visually lossless
    preset: str = "medium"
    dedup: bool = True  # store identical files (same sha256) once
    workers: int = 0  # processes; 0 = all cores
    num_nodes: int = 1
    node_rank: int = 0

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise IngestError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1:
            raise IngestError(f"--max-shard-bytes must be positive, got {self.max_shard_bytes}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise IngestError(f"--max-seconds must be positive, got {self.max_seconds}")
        if not 0 <= self.crf <= 51:
            raise IngestError(f"--crf must be in 0..51, got {self.crf}")
        if self.workers < 0:
            raise IngestError(f"--workers must be >= 0, got {self.workers}")
        if self.num_nodes < 1 or not 0 <= self.node_rank < self.num_nodes:
            raise IngestError(f"--node-rank must be in 0..{self.num_nodes - 1} for {self.num_nodes} node(s), got {self.node_rank}")
        self.scene.validate()

    def settings(self) -> dict:
        """What decides the content of the shards (recorded in the manifest, checked on resume)."""
        d = asdict(self)
        for k in ("workers", "node_rank"):
            d.pop(k)
        if not self.scene_split:
            d.pop("scene")
        return d


def parse_size(text: str | int | None) -> int | None:
    """`"500MB"`, `"1.5GiB"`, `"2e9"` -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]i?)?[bB]?\s*", text)
    if not m:
        raise IngestError(f"cannot read a size from {text!r} (examples: 500MB, 2GiB, 1e9)")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def nodes_from_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(num_nodes, node_rank) from WORLD_SIZE/RANK or SLURM_NNODES/SLURM_NODEID; (1, 0) if unset."""
    env = os.environ if env is None else env
    for size_var, rank_var in (("WORLD_SIZE", "RANK"), ("SLURM_NNODES", "SLURM_NODEID")):
        if env.get(size_var) and env.get(rank_var):
            return int(env[size_var]), int(env[rank_var])
    return 1, 0


# ---------------------------------------------------------------- per-input work (in the workers)


def _reason(exc: BaseException, path: str) -> str:
    """A readable reason without the file name (errors.jsonl has it in `source`)."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    msg = str(exc) or type(exc).__name__
    for prefix in (path, os.path.basename(path), "<bytes>"):
        if msg.startswith(prefix + ": "):
            return msg[len(prefix) + 2 :]
    return msg


def reason_category(reason: str) -> str:
    """`cannot decode video (h264: ...)` -> `cannot decode video`: the summary groups by this."""
    return re.sub(r"\s*[(:].*$", "", reason).strip() or reason


_progress_queue = None


def _init_worker(queue, lock_fd: int) -> None:
    global _progress_queue
    _progress_queue = queue
    # Let go of the parent's node lock, so the lock dies with the parent however the workers end.
    os.close(lock_fd)
    die_with_parent()


def _report(inputs: int, clips: int, nbytes: int) -> None:
    if _progress_queue is not None:
        _progress_queue.put((inputs, clips, nbytes))


def write_shard(task: dict, cfg: IngestConfig, out_dir: str, report: Callable | None = None) -> dict:
    """Ingest the inputs of one planned shard into `out_dir/NAME` and record it as done."""
    report = report or _report
    out = Path(out_dir)
    name, index = task["name"], task["index"]
    tmp = out / STATE_DIR / "tmp" / name
    tmp.mkdir(parents=True, exist_ok=True)
    errors: list[dict] = []
    stats = {"duration": 0.0, "ingested": 0}

    def samples() -> Iterator[tuple[str, dict]]:
        for pos, (source, path, caption, sha, size) in enumerate(task["inputs"]):
            item = Item(Source(source, path, caption), sha)
            try:
                produced = input_samples(item, f"{index:06d}-{pos:05d}", cfg, tmp)
            except Exception as e:  # any broken input is reported and skipped, never fatal
                errors.append({"source": source, "reason": _reason(e, path)})
                report(1, 0, size or 0)
                continue
            stats["ingested"] += 1
            for key, sample, duration in produced:
                stats["duration"] += duration
                yield key, sample
                if isinstance(sample["mp4"], Path):  # a cut clip's temporary file
                    sample["mp4"].unlink(missing_ok=True)
            report(1, len(produced), size or 0)

    path = out / name
    count = write_tar_atomic(path, samples(), keep_empty=False)  # no tar when every input failed
    record = {
        "name": name,
        "index": index,
        "count": count,
        "bytes": path.stat().st_size if count else 0,
        "duration": round(stats["duration"], 6),
        "inputs": len(task["inputs"]),
        "ingested": stats["ingested"],
        "errors": errors,
    }
    atomic_write_json(out / STATE_DIR / "done" / f"{name}.json", record)
    shutil.rmtree(tmp, ignore_errors=True)
    return record


# ---------------------------------------------------------------- planning (main process)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def node_of(size: int | None, source: str, num_nodes: int) -> int:
    """The node that ingests a file: by its size, so that identical files meet on one node."""
    key = f"size:{size}" if size is not None else f"source:{source}"
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % num_nodes


def _sha_or_none(path: str) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # the worker reports why it cannot be read


def _header_duration(path: str) -> float:
    """Duration from the container header only (no decoding); 0 when unknown."""
    import av

    try:
        with av.open(path, metadata_errors="ignore") as c:
            return float(c.duration / av.time_base) if c.duration else 0.0
    except Exception:
        return 0.0


def make_plan(inputs: list[str], cfg: IngestConfig, pmap: Callable = map) -> dict:
    """This node's share of the inputs, deduplicated and grouped into named shards."""
    sources, input_errors = expand_inputs(inputs)
    k, rank = cfg.num_nodes, cfg.node_rank
    sizes = [_size(s.path) for s in sources]
    mine = [i for i, s in enumerate(sources) if node_of(sizes[i], s.source, k) == rank]
    errors = [e.to_dict() for e in input_errors if node_of(None, e.source, k) == rank]
    shas: dict[int, str | None] = {}
    keep = mine
    if cfg.dedup:
        by_size: dict[int, list[int]] = {}
        for i in mine:
            if sizes[i]:
                by_size.setdefault(sizes[i], []).append(i)
        to_hash = [i for group in by_size.values() if len(group) > 1 for i in group]
        shas = dict(zip(to_hash, pmap(_sha_or_none, [sources[i].path for i in to_hash])))
        first_of: dict[str, str] = {}
        keep = []
        for i in mine:
            sha = shas.get(i)
            if sha is not None and sha in first_of:
                errors.append({"source": sources[i].source, "reason": f"duplicate (same sha256 as {first_of[sha]})"})
                continue
            if sha is not None:
                first_of[sha] = sources[i].source
            keep.append(i)
    weights = [1] * len(keep)
    if cfg.max_seconds:
        # Cut inputs become several samples: weigh each by the clips it will make.
        durations = list(pmap(_header_duration, [sources[i].path for i in keep]))
        weights = [max(1, -(-int(d * 1000) // int(cfg.max_seconds * 1000))) for d in durations]
    shards: list[dict] = []
    current: list = []
    n = nbytes = 0
    for i, w in zip(keep, weights):
        size = sizes[i] or 0
        over_count = n + w > cfg.samples_per_shard
        over_bytes = cfg.max_shard_bytes is not None and nbytes + size > cfg.max_shard_bytes
        if current and (over_count or over_bytes):
            shards.append(current)
            current, n, nbytes = [], 0, 0
        s = sources[i]
        current.append([s.source, s.path, s.caption, shas.get(i), sizes[i]])
        n += w
        nbytes += size
    if current:
        shards.append(current)
    return {
        "num_nodes": k,
        "node_rank": rank,
        "settings": cfg.settings(),
        "inputs": inputs,
        "num_inputs": len(mine) + sum(node_of(None, e.source, k) == rank for e in input_errors),
        "errors": errors,
        # Global shard index j*K + rank: K nodes write disjoint names into one directory.
        "shards": [{"name": shard_name(j * k + rank), "index": j * k + rank, "inputs": sh} for j, sh in enumerate(shards)],
    }


# ---------------------------------------------------------------- merging (every node, at its end)


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def merge_outputs(out_dir: str | os.PathLike) -> dict:
    """Rebuild `manifest.json` and `errors.jsonl` from every node's plan and finished shards."""
    out = Path(out_dir)
    state = out / STATE_DIR
    with _waiting_lock(state / "merge.lock"):
        shards, errors = [], []
        inputs = ingested = pending = 0
        settings: dict = {}
        num_nodes = 1
        finished = []
        for pf in sorted(state.glob("plan-node-*.json")):
            plan = json.loads(pf.read_text(encoding="utf-8"))
            settings = settings or plan["settings"]
            num_nodes = plan["num_nodes"]
            inputs += plan["num_inputs"]
            errors += plan["errors"]
            node_pending = 0
            for sh in plan["shards"]:
                rec_path = state / "done" / f"{sh['name']}.json"
                if not rec_path.is_file():
                    node_pending += 1
                    continue
                rec = json.loads(rec_path.read_text(encoding="utf-8"))
                errors += rec["errors"]
                ingested += rec["ingested"]
                if rec["count"]:
                    shards.append({k: rec[k] for k in ("name", "count", "bytes", "duration")})
            pending += node_pending
            if not node_pending:
                finished.append(plan["node_rank"])
        atomic_write_text(out / ERRORS_NAME, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
        by_reason = Counter(reason_category(e["reason"]) for e in errors)
        return write_manifest(
            out,
            shards,
            settings,
            stage="ingest",
            totals={"inputs": inputs, "ingested": ingested, "skipped": len(errors), "by_reason": dict(by_reason.most_common())},
            nodes={"num_nodes": num_nodes, "finished": sorted(finished)},
            complete=pending == 0 and len(finished) == num_nodes,
        )


# ---------------------------------------------------------------- the job


@dataclass
class IngestResult:
    out_dir: Path
    manifest: dict  # the merged manifest of the directory (all nodes so far)
    node_samples: int  # samples this node's shards hold
    node_inputs: int  # inputs this node was given
    failed_shards: list[str]  # shards whose writing failed (rerun with --resume)

    @property
    def exit_code(self) -> int:
        """0 when this node ingested something (or had nothing to do), 1 when nothing could be."""
        if self.failed_shards:
            return 1
        return 0 if self.node_samples or not self.node_inputs else 1


class _InlineExecutor:
    """`--workers 1`: run tasks in this process (simplest to debug, no pickling)."""

    def map(self, fn, items):
        return map(fn, items)

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, **_):
        pass


def _executor(workers: int, queue, lock_fd: int):
    if workers <= 1:
        return _InlineExecutor()
    import multiprocessing as mp

    # fork: workers start at once and inherit the imported modules; the pool is made before any
    # thread (the progress bar) starts.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker, initargs=(queue, lock_fd))


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[int]:
    """Only one run per node and directory; yields the lock's fd (workers close their copy)."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestError(f"{path.parent.parent}: another ingest of this node is running there") from None
        yield f.fileno()


def _clean_stale_temps(out: Path, names: set[str]) -> None:
    """Remove temporary files that a killed run of this node left (never other nodes' files)."""
    for p in out.glob(f".{SHARD_PREFIX}*.tmp"):
        if p.name[1:].rsplit(".tar.", 1)[0] + ".tar" in names:
            p.unlink(missing_ok=True)
    for name in names:
        shutil.rmtree(out / STATE_DIR / "tmp" / name, ignore_errors=True)


def _load_or_make_plan(inputs: list[str], cfg: IngestConfig, out: Path, resume: bool, pmap: Callable) -> dict:
    plan_file = out / STATE_DIR / f"plan-node-{cfg.node_rank:05d}-of-{cfg.num_nodes:05d}.json"
    if plan_file.is_file():
        if not resume:
            raise IngestError(f"{out}: already holds an ingest; pass --resume to finish it, or choose another --out")
        plan = json.loads(plan_file.read_text(encoding="utf-8"))
        if plan["inputs"] != list(inputs):
            raise IngestError(f"{out}: --resume needs the inputs of the interrupted run: {' '.join(plan['inputs'])}")
        if plan["settings"] != cfg.settings():
            changed = sorted(k for k in set(plan["settings"]) | set(cfg.settings()) if plan["settings"].get(k) != cfg.settings().get(k))
            raise IngestError(f"{out}: --resume needs the settings of the interrupted run; these differ: {', '.join(changed)}")
        return plan
    mine = [p for p in out.glob(f"{SHARD_PREFIX}*.tar") if p.stem[len(SHARD_PREFIX):].isdigit()
            and int(p.stem[len(SHARD_PREFIX):]) % cfg.num_nodes == cfg.node_rank]
    if mine:
        raise IngestError(f"{out}: already holds shards ({mine[0].name}, ...) from another run; use an empty --out")
    plan = make_plan(inputs, cfg, pmap)
    atomic_write_json(plan_file, plan)
    return plan


def ingest(inputs: list[str], out_dir: str | os.PathLike, cfg: IngestConfig | None = None, *, resume: bool = False, console=None) -> IngestResult:
    """Ingest `inputs` (files, folders, .txt lists, CSVs) into shards in `out_dir`.

    With a rich `console`, shows a progress bar and prints a summary table at the end."""
    cfg = cfg or IngestConfig()
    cfg.validate()
    if not inputs:
        raise IngestError("no inputs given")
    out = Path(out_dir)
    (out / STATE_DIR / "done").mkdir(parents=True, exist_ok=True)
    workers = cfg.workers or os.cpu_count() or 1
    with _node_lock(out / STATE_DIR / f"node-{cfg.node_rank:05d}.lock") as lock_fd:
        import multiprocessing as mp

        queue = mp.get_context("fork").Queue() if workers > 1 else None
        pool = _executor(workers, queue, lock_fd)
        try:
            plan = _load_or_make_plan(inputs, cfg, out, resume, pool.map)
            names = {s["name"] for s in plan["shards"]}
            _clean_stale_temps(out, names)
            todo = [s for s in plan["shards"] if not (out / STATE_DIR / "done" / f"{s['name']}.json").is_file()]
            failed = _run(todo, cfg, out, pool, queue, console)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    manifest = merge_outputs(out)
    done = [json.loads((out / STATE_DIR / "done" / f"{n}.json").read_text()) for n in sorted(names) if (out / STATE_DIR / "done" / f"{n}.json").is_file()]
    result = IngestResult(out, manifest, sum(r["count"] for r in done), plan["num_inputs"], failed)
    if console is not None:
        print_summary(result, console)
    return result


def _run(todo: list[dict], cfg: IngestConfig, out: Path, pool, queue, console) -> list[str]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    total = sum(len(s["inputs"]) for s in todo)
    counts = {"clips": 0, "bytes": 0}
    start = time.monotonic()
    progress = Progress(
        TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TextColumn("inputs"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=console is None, transient=False,
    )
    failed: list[str] = []
    with progress:
        bar = progress.add_task("ingest", total=total, rate="")

        def advance(inputs: int, clips: int, nbytes: int) -> None:
            counts["clips"] += clips
            counts["bytes"] += nbytes
            dt = max(time.monotonic() - start, 1e-6)
            progress.update(bar, advance=inputs, rate=f"{counts['clips'] / dt:.1f} clips/s {counts['bytes'] / dt / 1e6:.1f} MB/s")

        if queue is None:
            futures = {pool.submit(write_shard, t, cfg, str(out), advance): t["name"] for t in todo}
        else:
            futures = {pool.submit(write_shard, t, cfg, str(out)): t["name"] for t in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            while queue is not None and not queue.empty():
                advance(*queue.get())
            for fut in finished:
                if fut.exception() is not None:
                    failed.append(futures[fut])
                    if console is not None:
                        console.print(f"[bold red]error:[/] {futures[fut]}: {fut.exception()} (run again with --resume)", highlight=False)
        while queue is not None and not queue.empty():
            advance(*queue.get())
    return failed


def print_summary(result: IngestResult, console) -> None:
    from rich.table import Table

    m = result.manifest
    t = m["totals"]
    table = Table(title=f"ingest: {result.out_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("inputs", str(t["inputs"]))
    table.add_row("ingested", str(t["ingested"]))
    table.add_row("clips (samples)", str(t["samples"]))
    table.add_row("shards", str(t["shards"]))
    table.add_row("hours of video", f"{t.get('duration', 0.0) / 3600:.3f}")
    table.add_row("skipped", str(t["skipped"]))
    if not m.get("complete", True):
        done = m["nodes"]["finished"]
        table.add_row("nodes finished", f"{len(done)} of {m['nodes']['num_nodes']}")
    console.print(table)
    if t["by_reason"]:
        reasons = Table(title=f"skipped inputs by reason (details: {result.out_dir / ERRORS_NAME})")
        reasons.add_column("reason")
        reasons.add_column("inputs", justify="right")
        for reason, n in t["by_reason"].items():
            reasons.add_row(reason, str(n))
        console.print(reasons)
    for name in result.failed_shards:
        console.print(f"[bold red]not finished:[/] {name}; run the same command with --resume", highlight=False)
