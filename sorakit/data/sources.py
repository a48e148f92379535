"""Ingest inputs: video files, folders (recursive), `.txt` lists of paths, Open-Sora style CSVs.

Every input becomes a `Source`: the path as the user gave it (kept verbatim in the shards' json),
the path to open, and a caption when the CSV gave one. Sidecar captions (`clip.txt`, or `clip.json`
with a `caption` key, next to `clip.mp4`) are read later, by the worker that ingests the clip.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

# Files inside folders that are taken as videos; anything else there (sidecars, notes) is ignored.
# A file named explicitly is always tried, whatever its extension.
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .wmv .flv .3gp .ogv .gif .mxf .dv".split()
)
LIST_EXTENSION = ".txt"
CSV_EXTENSION = ".csv"
CSV_PATH_COLUMNS = ("path", "video", "video_path", "file")
CSV_CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class Source:
    source: str  # as given: the command-line argument, the line of a list, the CSV cell
    path: str  # what to open (relative list/CSV entries resolved against the list's folder)
    caption: str | None = None


@dataclass(frozen=True)
class InputError:
    source: str
    reason: str

    def to_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason}


def _walk(folder: str) -> list[str]:
    """Video files under `folder`, recursively, in a stable (sorted) order; links to folders are not
    followed (they could loop), links to files are (a dangling one is reported when it is ingested)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                out.append(os.path.join(root, name))
    return out


def _resolve(entry: str, base: Path) -> str:
    p = Path(os.path.expanduser(entry))
    return str(p if p.is_absolute() else base / p)


def read_caption_sidecar(path: str) -> str | None:
    """Caption from `stem.txt` or `stem.json` (`caption` key) beside a video; None when there is none."""
    p = Path(path)
    txt = p.with_suffix(".txt")
    if txt != p and txt.is_file():
        text = txt.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    js = p.with_suffix(".json")
    if js != p and js.is_file():
        try:
            cap = json.loads(js.read_text(encoding="utf-8")).get("caption")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            return None
        if isinstance(cap, str) and cap.strip():
            return cap.strip()
    return None


def _read_list(path: Path, source: str) -> tuple[list[Source], list[InputError]]:
    sources, errors = [], []
    base = path.parent
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        s, e = _expand_one(entry, _resolve(entry, base), nested=True)
        sources += s
        errors += e
    if not sources and not errors:
        errors.append(InputError(source, "list file names no paths"))
    return sources, errors


def _read_csv(path: Path, source: str) -> tuple[list[Source], list[InputError]]:
    sources, errors = [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        col = {name: orig for name, orig in zip(fields, reader.fieldnames or [])}
        path_col = next((col[c] for c in CSV_PATH_COLUMNS if c in col), None)
        text_col = next((col[c] for c in CSV_CAPTION_COLUMNS if c in col), None)
        if path_col is None:
            return [], [InputError(source, f"CSV has no path column (expected one of: {', '.join(CSV_PATH_COLUMNS)})")]
        for row in reader:
            entry = (row.get(path_col) or "").strip()
            if not entry:
                continue
            caption = (row.get(text_col) or "").strip() if text_col else ""
            sources.append(Source(entry, _resolve(entry, path.parent), caption or None))
    return sources, errors


def _expand_one(source: str, path: str, nested: bool = False) -> tuple[list[Source], list[InputError]]:
    p = Path(path)
    if p.is_dir():
        files = _walk(path)
        # Keep the user's spelling of the folder in each file's source.
        return [Source(os.path.join(source, os.path.relpath(f, path)), f) for f in files], []
    if not p.exists() and not p.is_symlink():
        return [], [InputError(source, "no such file or directory")]
    suffix = p.suffix.lower()
    if not nested and p.is_file() and suffix in (LIST_EXTENSION, CSV_EXTENSION):
        try:
            return (_read_list if suffix == LIST_EXTENSION else _read_csv)(p, source)
        except OSError as e:
            return [], [InputError(source, f"cannot read ({e.strerror or e})")]
    return [Source(source, path)], []


def expand_inputs(inputs: list[str]) -> tuple[list[Source], list[InputError]]:
    """All sources named by `inputs`, in the order given (folders sorted), and the inputs that name
    nothing usable."""
    sources: list[Source] = []
    errors: list[InputError] = []
    for given in inputs:
        s, e = _expand_one(given, os.path.expanduser(given))
        sources += s
        errors += e
    return sources, errors
