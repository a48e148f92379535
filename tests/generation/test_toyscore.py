"""The toy-world scorer reads real, H.264-encoded toy clips exactly, at every size the world allows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sorakit.data import toyworld as tw
from sorakit.generation import toyscore
from sorakit.media import read_video, write_video


def _encode(tmp_path, frames, fps=8, crf=12, name="clip"):
    return read_video(write_video(tmp_path / f"{name}.mp4", frames, fps, crf=crf))


def test_real_toyworld_clips_score_100_percent(toy_world, tmp_path):
    """Clips written by make_toyworld (both splits), decoded from their MP4 files."""
    paths = sorted(toy_world.glob("*.mp4")) + tw.make_toyworld(tmp_path / "heldout", 24, seed=5, split="heldout")
    scores = [toyscore.score_video(read_video(p), tw.load_clip_metadata(p)["caption"]) for p in paths]
    summary = toyscore.summarize(scores)
    assert summary["n"] == len(paths) == 32
    assert summary["all"] == 1.0, [s.to_dict() for s in scores if not s.followed]


@pytest.mark.parametrize("crf", [12, 18])  # toy-world clips, and sorakit's generated videos
def test_every_shape_colour_and_background_at_the_smallest_and_extreme_sizes(tmp_path, crf):
    """Small objects (12 px on a 48 px side) on every background, including green on gray, which
    differ almost only in chroma (subsampled 2x2 by 4:2:0), in every aspect from 1:2 to 2:1."""
    rng = np.random.default_rng(crf)
    sizes = [(48, 48), (48, 96), (96, 48), (160, 80), (62, 122)]
    combos = list(itertools.product(tw.COLORS, tw.SHAPES, tw.BACKGROUNDS))
    failures = []
    for i, (color, shape, bg) in enumerate(combos):
        w, h = sizes[i % len(sizes)]
        spec = tw.sample_spec(rng, 0, color=color, shape=shape, background=bg, motion=tw.MOTIONS[i % len(tw.MOTIONS)],
                              width=w, height=h, num_frames=8, fps=8)
        score = toyscore.score_video(_encode(tmp_path, tw.render(spec), crf=crf, name=str(i)), spec.caption)
        if not score.followed:
            failures.append((spec, score.to_dict()))
    assert not failures


def test_each_attribute_is_told_apart(tmp_path):
    spec = tw.sample_spec(np.random.default_rng(1), 0, color="blue", shape="triangle", motion="up",
                          background="white", width=96, height=64, num_frames=12, fps=12)
    frames = _encode(tmp_path, tw.render(spec))
    assert toyscore.score_video(frames, spec.caption).followed
    wrong = toyscore.score_video(frames, "a red square moving down on a black background")
    assert wrong.correct == {"color": False, "shape": False, "motion": False, "background": False}
    assert wrong.predicted == {"color": "blue", "shape": "triangle", "motion": "up", "background": "white"}
    # a caption given as attributes scores the same way
    assert toyscore.score_video(frames, tw.parse_caption(spec.caption)).followed


def test_a_blank_video_follows_nothing_but_its_background():
    frames = np.full((6, 40, 60, 3), tw.BACKGROUNDS["gray"], np.uint8)
    score = toyscore.score_video(frames, "a red circle standing still on a gray background")
    assert score.predicted["color"] is None and not score.followed
    assert score.correct["background"]


def test_prompts_that_are_not_toy_captions_are_a_clear_error():
    with pytest.raises(ValueError, match="not a toy-world caption"):
        toyscore.score_video(np.zeros((2, 8, 8, 3), np.uint8), "a cat playing piano")


def test_seam_ratio_sees_a_cut_and_not_a_smooth_join():
    spec = tw.sample_spec(np.random.default_rng(2), 0, motion="right", width=80, height=48, num_frames=24, fps=12)
    clip = tw.render(spec)
    assert toyscore.seam_ratio(clip, [12]) == pytest.approx(1.0, abs=0.35)
    jumped = np.concatenate([clip[:12], clip[18:]])  # six frames missing at the join
    assert toyscore.seam_ratio(jumped, [12]) > 3.0
    still = np.repeat(clip[:1], 10, axis=0)  # no motion: the floor keeps the ratio finite
    assert toyscore.seam_ratio(still, [5]) == 0.0
    with pytest.raises(ValueError):
        toyscore.seam_ratio(clip, [0])


def test_step_ratio_shows_new_frames_that_flicker():
    spec = tw.sample_spec(np.random.default_rng(2), 0, motion="right", width=80, height=48, num_frames=24, fps=12)
    clip = tw.render(spec)
    assert toyscore.step_ratio(clip, slice(12, None)) == pytest.approx(1.0, abs=0.35)
    speckled = clip.astype(np.int16)
    speckled[12:] += np.random.default_rng(0).integers(-12, 13, speckled[12:].shape, dtype=np.int16)
    speckled = speckled.clip(0, 255).astype(np.uint8)
    assert toyscore.step_ratio(speckled, slice(12, None)) > 5.0  # fresh speckle every frame
    # the seam ratio's denominator takes in the flicker, so it hides the cut at 12
    assert toyscore.seam_ratio(speckled, [12]) < 1.5
    assert toyscore.step_ratio(speckled, slice(0, 12)) < 0.2  # the other part is the new one
    with pytest.raises(ValueError, match="no frame step"):
        toyscore.step_ratio(clip, slice(23, None))
