"""`sorakit inspect`: the summary of a shard directory and the contact sheet."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sorakit.cli import main
from sorakit.data.inspect import SHEET_ROW_HEIGHT, inspect_shards
from sorakit.data.shards import iter_tar_samples, list_shards, shard_name, write_tar_atomic
from tests.data.clips import make_clip


def test_summary_of_toy_shards(toy_shards):
    metas = [json.loads(m["json"]) for p in list_shards(toy_shards) for _, m in iter_tar_samples(p)]
    stats = inspect_shards(toy_shards)
    assert (stats["samples"], stats["shards"], stats["captioned"]) == (8, 2, 8)
    assert abs(stats["hours"] - sum(m["duration"] for m in metas) / 3600) < 1e-9
    assert stats["resolutions"] == {f"{w}x{h}": n for (w, h), n in _count((m["width"], m["height"]) for m in metas).items()}
    assert sum(stats["aspects"].values()) == sum(stats["durations"].values()) == 8
    assert stats["fps"] == {f"{k:g}": n for k, n in _count(m["fps"] for m in metas).items()}
    assert stats["duration_stats"]["max"] == max(m["duration"] for m in metas)


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def test_cli_table_and_contact_sheet(toy_shards, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(["inspect", str(toy_shards), "--contact-sheet", str(sheet), "--clips", "3"]) == 0
    report = capsys.readouterr().err
    for text in ("samples", "total hours", "captions", "8 of 8", "resolution", "aspect", "fps"):
        assert text in report
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape[0] >= 3 * SHEET_ROW_HEIGHT  # one row per clip
    # Toy frames are flat backgrounds with coloured objects: the sheet shows more than its grey canvas.
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10


def test_video2dataset_shards_without_our_fields(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", size=(80, 40), num_frames=6, fps=10)
    write_tar_atomic(tmp_path / "s" / shard_name(0), [("000000000", {"mp4": clip.read_bytes(), "json": {"caption": "hi", "url": "x"}})])
    stats = inspect_shards(tmp_path / "s", contact_sheet=tmp_path / "sheet.png", num_clips=4)
    assert stats["resolutions"] == {"80x40": 1} and stats["captioned"] == 1 and stats["aspects"] == {"wide (>= 16:10)": 1}
    assert (tmp_path / "sheet.png").stat().st_size > 0
