"""Is a video file whole? Walk the top-level structure of the common containers.

A truncated download or copy often still opens and decodes its first frame: an MP4 with its index
first, a WebM, an AVI. Their top-level elements carry sizes, so comparing those with the file's
size finds the cut by reading a few bytes per element, without demuxing the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"moof", b"styp", b"sidx", b"meta"}
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML_SEGMENT = 0x18538067
_EBML_DOCTYPE = 0x4282


@dataclass(frozen=True)
class Structure:
    container: str  # mp4, mov, avi, matroska, webm
    complete: bool | None  # None: the format cannot tell (a live-streamed MKV of unknown size)


def _iso(f, size: int, head: bytes) -> Structure:
    # QuickTime files have the brand "qt  ", or (old ones) no ftyp box at all.
    container = "mp4" if head[4:8] == b"ftyp" and head[8:12] != b"qt  " else "mov"
    pos = 0
    while pos + 8 <= size:
        f.seek(pos)
        head = f.read(16)
        n = int.from_bytes(head[:4], "big")
        if n == 1:
            n = int.from_bytes(head[8:16], "big")
        elif n == 0:  # the last box runs to the end of the file
            return Structure(container, True)
        if n < 8:
            return Structure(container, False)
        pos += n
    return Structure(container, pos <= size)


def _riff(f, size: int) -> Structure:
    pos = 0
    while pos + 8 <= size:  # OpenDML AVIs over 1 GB chain several RIFF chunks
        f.seek(pos)
        head = f.read(8)
        n = int.from_bytes(head[4:8], "little")
        pos += 8 + n + (n & 1)
    return Structure("avi", pos <= size + 1)  # a missing final pad byte is harmless


def _vint(data: bytes, i: int, keep_marker: bool) -> tuple[int, int, bool]:
    """EBML variable-length integer at data[i]: (value, next index, all value bits set)."""
    first = data[i]
    length = 8 - first.bit_length() + 1
    value = first if keep_marker else first & (0xFF >> length)
    for b in data[i + 1 : i + length]:
        value = (value << 8) | b
    unknown = not keep_marker and value == (1 << (7 * length)) - 1
    return value, i + length, unknown


def _ebml(f, size: int) -> Structure:
    f.seek(0)
    data = f.read(4096)
    _, i, _ = _vint(data, 0, True)
    header_size, i, _ = _vint(data, i, False)
    end = i + header_size
    doctype = "matroska"
    while i < end:
        el, i, _ = _vint(data, i, True)
        n, i, _ = _vint(data, i, False)
        if el == _EBML_DOCTYPE:
            doctype = data[i : i + n].rstrip(b"\0").decode("ascii", "replace")
        i += n
    el, i, _ = _vint(data, end, True)
    n, i, unknown = _vint(data, i, False)
    if el != _EBML_SEGMENT or unknown:
        return Structure(doctype, None)
    return Structure(doctype, i + n <= size)


def structure(path: str | os.PathLike) -> Structure | None:
    """The container and whether its top-level structure is whole; None for formats not walked
    here (MPEG-TS, FLV, ...) or files too mangled to walk."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        try:
            if head[4:8] in _ISO_BOXES:
                return _iso(f, size, head)
            if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return _riff(f, size)
            if head[:4] == _EBML_MAGIC:
                return _ebml(f, size)
        except (IndexError, ValueError):
            return None
    return None
