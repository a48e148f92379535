import json

import numpy as np
import pytest

from sorakit.data import toyworld as tw
from sorakit.media import probe, read_video


def test_clips_follow_the_spec(toy_world):
    for meta_path in sorted(toy_world.glob("*.json")):
        meta = json.loads(meta_path.read_text())
        info = probe(meta_path.with_suffix(".mp4"))
        assert (info.width, info.height, info.num_frames) == (meta["width"], meta["height"], meta["num_frames"])
        assert info.codec == "h264" and info.pix_fmt == "yuv420p"
        assert meta["width"] % 2 == 0 and meta["height"] % 2 == 0
        assert 48 <= meta["width"] <= 160 and 48 <= meta["height"] <= 160
        assert 8 <= meta["num_frames"] <= 64 and meta["fps"] in (8, 12, 24)
        assert tw.parse_caption(meta["caption"]) == {k: meta[k] for k in ("color", "shape", "motion", "background")}


def test_generation_is_deterministic_and_splits_share_no_seed(tmp_path):
    a = tw.make_toyworld(tmp_path / "a", 4, seed=3)
    b = tw.make_toyworld(tmp_path / "b", 4, seed=3)
    held = tw.make_toyworld(tmp_path / "h", 4, seed=3, split="heldout")
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
    seeds = {tw.load_clip_metadata(p)["seed"] for p in a}
    assert seeds.isdisjoint({tw.load_clip_metadata(p)["seed"] for p in held})


def test_many_specs_stay_inside_the_rules():
    aspects = []
    for seed in range(400):
        s = tw.spec_for_seed(seed)
        side = min(s.width, s.height)
        assert 0.25 * side <= s.size <= 0.35 * side
        travel = abs(s.dx) / s.width + abs(s.dy) / s.height
        assert (travel == 0) == (s.motion == "still")
        if s.motion != "still":
            assert 0.4 <= travel <= 0.6
        for a in (0.0, 1.0):  # the object is fully inside the frame at both ends of its path
            x, y = s.x0 + a * s.dx, s.y0 + a * s.dy
            assert x >= 0 and y >= 0 and x + s.size <= s.width and y + s.size <= s.height
        aspects.append(s.width / s.height)
    assert min(aspects) < 0.6 and max(aspects) > 1.7  # portrait and landscape both occur


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_shape_fill_ratio(shape):
    mask = tw.object_mask(shape, 120, 120, 10.0, 10.0, 90)
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert mask.sum() / box == pytest.approx(tw.SHAPE_FILL[shape], abs=0.03)


def test_encoded_clip_keeps_the_table_colours(toy_world):
    path = sorted(toy_world.glob("*.mp4"))[0]
    meta = tw.load_clip_metadata(path)
    frames = read_video(path)
    expected = tw.render(tw.spec_for_seed(meta["seed"]))
    assert np.median(np.abs(frames.astype(int) - expected)) <= 2


def test_caption_grammar_round_trips():
    assert tw.caption("red", "circle", "still", "white") == "a red circle standing still on a white background"
    assert tw.parse_caption("a red circle moving up on a gray background")["motion"] == "up"
    assert tw.parse_caption("a purple circle moving up on a gray background") is None
