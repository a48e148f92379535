"""sorakit.media on real encoded files of every container/codec a user is likely to bring."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sorakit.media import MediaError, iter_frames, probe, read_metadata, read_video, write_video
from tests.data.clips import CODEC_CASES, EXPECTED_CODEC, block_corner, frame_image, frame_index, make_clip, make_undecodable


@pytest.fixture(scope="module")
def codec_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("codecs")
    return {name: make_clip(d / fname, **opts) for name, (fname, opts) in CODEC_CASES.items()}


@pytest.mark.parametrize("case", sorted(CODEC_CASES))
def test_probe_and_decode_every_codec(codec_clips, case):
    path = codec_clips[case]
    w, h = CODEC_CASES[case][1].get("size", (64, 48))
    info = probe(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (w, h, 8, 12.0)
    assert info.codec == EXPECTED_CODEC[case]
    assert info.duration == pytest.approx(8 / 12, abs=0.05)
    assert not info.has_audio and info.rotation == 0
    video = read_video(path)
    assert video.shape == (8, h, w, 3) and video.dtype == np.uint8
    assert [frame_index(f, 8) for f in video] == list(range(8))
    assert all(block_corner(f) == "tl" for f in video)


def test_decode_from_bytes_and_file_object(codec_clips):
    data = codec_clips["vp9_webm"].read_bytes()
    assert read_video(data).shape == (8, 48, 64, 3)
    assert probe(io.BytesIO(data)).num_frames == 8


def test_frame_selection(codec_clips):
    path = codec_clips["h264_mp4"]  # 8 frames at 12 fps
    idx = lambda v: [frame_index(f, 8) for f in v]  # noqa: E731
    assert idx(read_video(path, stride=3)) == [0, 3, 6]
    assert idx(read_video(path, max_frames=2)) == [0, 1]
    assert idx(read_video(path, start=3 / 12, end=6 / 12)) == [3, 4, 5]
    assert idx(read_video(path, fps=6)) == [0, 2, 4, 6]
    assert idx(read_video(path, fps=24))[:4] == [0, 0, 1, 1]
    it = iter_frames(path)
    assert frame_index(next(it), 8) == 0  # streaming: one frame at a time
    it.close()


@pytest.mark.parametrize("rotation,corner", [(90, "bl"), (270, "tr"), (180, "br")])
def test_rotation_metadata_is_honoured(tmp_path, rotation, corner):
    path = make_clip(tmp_path / f"rot{rotation}.mp4", size=(64, 48), rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation
    upright = (48, 64) if rotation in (90, 270) else (64, 48)
    assert (info.width, info.height) == upright
    video = read_video(path)
    assert video.shape[1:3] == (upright[1], upright[0])
    assert block_corner(video[0]) == corner  # turned counter-clockwise by `rotation` degrees


def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path):
    times = [0.0, 0.1, 0.15, 0.2, 0.5, 0.55, 0.9]
    path = make_clip(tmp_path / "vfr.mkv", num_frames=len(times), times=times)
    native = read_video(path)
    assert [frame_index(f, 7) for f in native] == list(range(7))
    even = read_video(path, fps=10)
    # At each 0.1 s grid time the frame on screen is the last one that started at or before it.
    expected = [max(i for i, t in enumerate(times) if t <= g / 10 + 1e-6) for g in range(len(even))]
    assert len(even) >= 9
    assert [frame_index(f, 7) for f in even] == expected


def test_audio_track_is_seen_and_ignored_for_frames(tmp_path):
    path = make_clip(tmp_path / "with audio.mp4", audio=True)
    info = probe(path)
    assert info.has_audio and info.num_frames == 8
    assert read_video(path).shape == (8, 48, 64, 3)


def test_odd_size_roundtrip_keeps_every_pixel(tmp_path):
    frames = np.stack([frame_image(i, 317, 181) for i in range(5)])
    out = write_video(tmp_path / "odd.mp4", frames, 10, metadata={"title": "odd", "comment": {"seed": 3}})
    info = probe(out)
    assert (info.width, info.height, info.num_frames, info.codec) == (317, 181, 5, "h264")
    back = read_video(out)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 3
    meta = read_metadata(out)
    assert meta["title"] == "odd" and '"seed": 3' in meta["comment"]


def test_even_size_is_browser_playable_yuv420p(tmp_path):
    out = write_video(tmp_path / "even.mp4", np.stack([frame_image(i, 96, 54) for i in range(4)]), 8)
    info = probe(out)
    assert (info.codec, info.pix_fmt, info.width, info.height) == ("h264", "yuv420p", 96, 54)


def test_broken_files_raise_media_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("hello" * 100)
    for path, why in [(empty, "empty"), (text, "not a video"), (make_undecodable(tmp_path / "x.avi"), "codec|decode")]:
        with pytest.raises(MediaError, match=rf"{path.name}: .*({why})"):
            probe(path)
