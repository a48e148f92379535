"""WebDataset shards on disk: naming, atomic tar writing, reading samples back, and manifests.

A shard is a plain tar file; the members of one sample share a key (`KEY.mp4`, `KEY.json`,
`KEY.txt`), as the `webdataset` library and video2dataset expect. A directory of shards has a
`manifest.json` (the sample count of every shard, totals and the settings that made it) and an
`errors.jsonl` (one `{"source", "reason"}` line per rejected input).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from sorakit.utils.fs import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".tar"
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
MANIFEST_FORMAT = "sorakit-shards"
MANIFEST_VERSION = 1
# Fixed mtime/owner in tar headers: the same samples always give the same bytes.
_TAR_MTIME = 0
_COPY_CHUNK = 1 << 20  # big reads when streaming a file into a tar (tarfile's default is 16 KiB)

Sample = tuple[str, Mapping[str, Any]]


def shard_name(index: int) -> str:
    """`shard-000123.tar`: six digits sort correctly up to a million shards."""
    return f"{SHARD_PREFIX}{index:06d}{SHARD_SUFFIX}"


def list_shards(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Shard files named by a directory (its `*.tar`), a tar file, a glob pattern, or a list of those.

    Temporary files of a write in progress (hidden, `.tmp`) are never listed.
    """
    if not isinstance(path, (str, os.PathLike)):
        out: list[Path] = []
        for p in path:
            out.extend(list_shards(p))
        return out
    p = Path(path)
    if p.is_dir():
        found = sorted(x for x in p.glob(f"*{SHARD_SUFFIX}") if not x.name.startswith(".") and x.is_file())
    elif p.is_file():
        found = [p]
    elif glob.has_magic(str(path)):
        found = sorted(Path(x) for x in glob.glob(str(path)) if x.endswith(SHARD_SUFFIX) and not Path(x).name.startswith("."))
    else:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not found:
        raise FileNotFoundError(f"{path}: no shards (*{SHARD_SUFFIX}) found")
    return found


def split_member_name(name: str) -> tuple[str, str]:
    """`dir/abc.seg.json` -> (`dir/abc`, `seg.json`): the key ends at the first dot of the base name,
    the rule the `webdataset` library uses."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def iter_tar_samples(tar: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {ext: bytes})` for each sample of a tar, in file order, streaming."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(tar, mode="r|*") as tf:
        for info in tf:
            if not info.isreg():
                continue
            k, ext = split_member_name(info.name)
            if not ext or k.rpartition("/")[2].startswith("__"):
                continue
            f = tf.extractfile(info)
            data = f.read() if f is not None else b""
            if k != key:
                if key is not None and members:
                    yield key, members
                key, members = k, {}
            members[ext.lower()] = data
    if key is not None and members:
        yield key, members


class FileMember:
    """A tar member streamed from a file on disk (never loaded whole), hashed while it is copied.

    After the member is written, `sha256` holds the hex digest of exactly the bytes stored.
    """

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        self.path = Path(path)
        self.size = self.path.stat().st_size if size is None else size
        self.sha256: str | None = None

    def copy_into(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        h = hashlib.sha256()
        with open(self.path, "rb") as src:
            tf.addfile(info, _HashingReader(src, h, self.size, self.path))
        self.sha256 = h.hexdigest()


class _HashingReader(io.RawIOBase):
    def __init__(self, f, h, size: int, path: Path):
        self.f, self.h, self.left, self.path = f, h, size, path

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        want = self.left if n < 0 else min(n, self.left)
        data = self.f.read(want)
        if len(data) < want:
            raise OSError(f"{self.path}: file shrank while it was being copied")
        self.left -= len(data)
        self.h.update(data)
        return data


def _encode_member(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=False).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a tar member")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    info.uname = info.gname = ""
    return info


class _NothingWritten(Exception):
    pass


def write_tar_atomic(path: str | os.PathLike, samples: Iterable[Sample], *, keep_empty: bool = True) -> int:
    """Write samples `(key, {ext: value})` to a tar that appears under `path` only when complete.

    A value is bytes, str (UTF-8), a dict/list (JSON), a `Path` or `FileMember` (streamed from disk),
    or a zero-argument callable returning one of those; members are written in dict order and a
    callable is called only after the members before it are written (so a JSON member can carry
    the hash of a file member streamed just before it). Returns the number of samples written;
    with `keep_empty=False` a tar that would hold no sample is not created at all.
    """
    count = 0
    try:
        count = _write_tar(path, samples, keep_empty)
    except _NothingWritten:
        return 0
    return count


def _write_tar(path: str | os.PathLike, samples: Iterable[Sample], keep_empty: bool) -> int:
    count = 0
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tf:
            tf.copybufsize = _COPY_CHUNK
            for key, members in samples:
                if "." in key.rpartition("/")[2]:
                    raise ValueError(f"sample key {key!r} must not contain a dot")
                for ext, value in members.items():
                    if callable(value) and not isinstance(value, (FileMember, Path)):
                        value = value()
                    name = f"{key}.{ext}"
                    if isinstance(value, Path):
                        value = FileMember(value)
                    if isinstance(value, FileMember):
                        value.copy_into(tf, _tarinfo(name, value.size))
                    else:
                        data = _encode_member(value)
                        tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                count += 1
        if not count and not keep_empty:
            raise _NothingWritten
    return count


def count_tar_samples(tar: str | os.PathLike) -> int:
    """Number of samples in a tar, from its member names only (no data is read into memory)."""
    keys = set()
    with tarfile.open(tar, mode="r:") as tf:
        for info in tf.getmembers():
            if info.isreg():
                k, ext = split_member_name(info.name)
                if ext:
                    keys.add(k)
    return len(keys)


def read_manifest(directory: str | os.PathLike) -> dict | None:
    """The directory's manifest, or None when it has none."""
    p = Path(directory) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt manifest ({e})") from None


def _totals(shards: list[dict]) -> dict:
    totals: dict[str, Any] = {"shards": len(shards), "samples": sum(int(s.get("count", 0)) for s in shards)}
    for field in ("bytes", "duration"):
        if shards and all(field in s for s in shards):
            totals[field] = sum(s[field] for s in shards)
    return totals


def write_manifest(
    directory: str | os.PathLike,
    shards: list[dict],
    settings: dict | None = None,
    **extra: Any,
) -> dict:
    """Write `DIR/manifest.json` atomically: shards (`name`, `count`, optional `bytes`, `duration`),
    their totals, the settings that made them, and any `extra` top-level fields. Returns it."""
    shards = sorted(shards, key=lambda s: s["name"])
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "shards": shards,
        "totals": {**_totals(shards), **extra.pop("totals", {})},
        "settings": settings or {},
        **extra,
    }
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest)
    return manifest


def merge_manifests(manifests: Iterable[dict]) -> dict:
    """One manifest from several (one per node writing into the same directory).

    Shards are united by name; numeric totals other than the shard/sample counts are summed;
    settings must agree (the first one is kept)."""
    by_name: dict[str, dict] = {}
    settings: dict = {}
    summed: dict[str, float] = {}
    for m in manifests:
        for s in m.get("shards", []):
            by_name[s["name"]] = s
        if not settings:
            settings = m.get("settings", {})
        for k, v in m.get("totals", {}).items():
            if k not in ("shards", "samples", "bytes", "duration") and isinstance(v, (int, float)):
                summed[k] = summed.get(k, 0) + v
    shards = sorted(by_name.values(), key=lambda s: s["name"])
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "shards": shards,
        "totals": {**_totals(shards), **summed},
        "settings": settings,
    }


def shard_counts(directory: str | os.PathLike) -> dict[str, int]:
    """`{shard name: sample count}` from the manifest, or by reading the tars when there is none."""
    manifest = read_manifest(directory)
    if manifest is not None:
        return {s["name"]: int(s["count"]) for s in manifest.get("shards", [])}
    return {p.name: count_tar_samples(p) for p in list_shards(directory)}


def _skip_unreadable(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


def sample_pipeline(shards: Any, decode, *, shuffle: int = 0, resampled: bool = False, seed: int = 0,
                    split_by_node: bool = True):
    """A `webdataset.DataPipeline` of the samples of `shards`, mapped by the stage `decode`.

    resampled: every rank and worker draws shards with replacement forever (step-based training on
    many nodes: no rank runs dry); else one pass, shards split between nodes (RANK / WORLD_SIZE, when
    `split_by_node`) and DataLoader workers. shuffle: a sample shuffle buffer of still-encoded samples
    (a buffer of decoded frames would cost far more memory); 0 reads shards and samples in order.
    """
    import webdataset as wds

    urls = [str(p) for p in list_shards(shards)]
    stages: list = []
    if resampled:
        stages.append(wds.ResampledShards(urls, seed=seed, deterministic=True))
    else:
        stages.append(wds.SimpleShardList(urls))
        if shuffle:
            stages.append(wds.detshuffle(len(urls), initial=len(urls), seed=seed))
        if split_by_node:
            stages.append(wds.split_by_node)
        stages.append(wds.split_by_worker)
    stages.append(wds.tarfile_to_samples(handler=_skip_unreadable))
    if shuffle:
        stages.append(wds.detshuffle(shuffle, initial=max(1, shuffle // 2), seed=seed))
    stages.append(decode)
    return wds.DataPipeline(*stages)
