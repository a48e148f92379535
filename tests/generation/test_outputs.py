"""What a generated video leaves on disk: a browser-playable MP4 that says what made it, a sidecar, a preview."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sorakit.generation import outputs
from sorakit.media import probe, read_metadata, read_video

RECORD = {"prompt": "a red circle moving left on a black background", "expanded_prompt": None, "seed": 7,
          "settings": {"steps": 20, "sampler": "dpmpp_2m", "guidance": 5.0}, "model": {"path": "/m"}}


def _frames(t=9, h=24, w=40):
    """Smooth gradients that change from frame to frame (compress well, so decoding can be checked)."""
    y, x = np.mgrid[:h, :w]
    return np.stack([np.stack([x * 5 + 10 * i, y * 8, np.full_like(x, 20 * i)], -1) for i in range(t)]).astype(np.uint8)


def test_video_sidecar_and_preview(tmp_path):
    frames = _frames()
    paths = outputs.write_generation(tmp_path / "out.mp4", frames, 12, RECORD, preview=True)
    info = probe(paths.video)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames) == ("h264", "yuv420p", 40, 24, 9)
    assert info.fps == 12
    meta = read_metadata(paths.video)
    assert meta["title"] == RECORD["prompt"]
    stored = json.loads(meta["comment"])
    assert stored["seed"] == 7 and stored["settings"]["sampler"] == "dpmpp_2m" and stored["model"] == {"path": "/m"}
    side = outputs.read_sidecar(paths.video)
    assert side["prompt"] == RECORD["prompt"] and side["settings"] == RECORD["settings"]
    assert side["files"] == {"video": "out.mp4", "preview": "out.png"}
    sheet = np.asarray(Image.open(paths.preview))
    # 8 frames in 2 rows of 4, each upscaled to at least 96 px on its short side
    scale = -(-outputs.PREVIEW_MIN_TILE // 24)
    g = outputs.PREVIEW_GAP
    assert sheet.shape == (2 * 24 * scale + 3 * g, 4 * 40 * scale + 5 * g, 3)
    assert np.array_equal(sheet[g : g + 24 * scale : scale, g : g + 40 * scale : scale], frames[0])
    assert outputs.is_complete(paths.video)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.mp4", "out.png"]  # no temp files
    assert np.abs(read_video(paths.video).astype(int) - frames).mean() < 3  # it is the video we wrote


def test_a_video_without_its_sidecar_is_not_complete(tmp_path):
    paths = outputs.write_generation(tmp_path / "a.mp4", _frames(t=3), 8, RECORD)
    assert paths.preview is None and outputs.is_complete(paths.video)
    paths.sidecar.unlink()
    assert not outputs.is_complete(paths.video)
    with pytest.raises(FileNotFoundError, match="no sidecar"):
        outputs.read_sidecar(paths.video)
    paths.sidecar.write_text("{broken")
    with pytest.raises(ValueError, match="a.json: not valid JSON"):
        outputs.read_sidecar(paths.video)


def test_odd_sizes_and_other_containers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even sides"):
        outputs.write_generation(tmp_path / "a.mp4", _frames(w=41), 8, RECORD)
    with pytest.raises(ValueError, match=r"\.mp4"):
        outputs.write_generation(tmp_path / "a.webm", _frames(), 8, RECORD)
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_spreads_frames_from_first_to_last():
    frames = np.stack([np.full((100, 100, 3), i, np.uint8) for i in range(30)])
    sheet = outputs.contact_sheet(frames, num=4, columns=4)
    g = outputs.PREVIEW_GAP
    picked = [int(sheet[g, g + k * (100 + g), 0]) for k in range(4)]
    assert picked == [0, 10, 19, 29]
