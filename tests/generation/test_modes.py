"""Every mode on a tiny random pipeline: sizes, given frames kept bit-exactly, reproducible seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sorakit.generation import modes
from sorakit.generation.modes import GenerationConfig
from tests.generation.tiny_pipeline import FPS, SAMPLE_SIZE, WINDOW, make_tiny_pipeline

CFG = GenerationConfig(steps=2)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from sorakit.generation.pipeline import load_pipeline

    return load_pipeline(make_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def clip():
    """A 9-frame 16x12 video with content (a moving bright block)."""
    frames = np.full((9, 12, 16, 3), 40, np.uint8)
    for i in range(9):
        frames[i, 3:8, i : i + 5] = (220, 60, 40)
    return frames


def _given_exact(win: modes.Window) -> bool:
    idx = win.given.nonzero().flatten()
    return len(idx) > 0 and torch.equal(win.latent[:, idx], win.context[:, idx])


def test_text_to_video_any_size_and_reproducible(pipe):
    cfg = CFG.replace(width=17, height=12, frames=6, seed=3)
    a = modes.text_to_video(pipe, "a red circle moving left on a black background", cfg)
    assert a.frames.shape == (6, 12, 18, 3) and a.frames.dtype == np.uint8
    assert a.record["size"] == {"width": 18, "height": 12, "frames": 6, "fps": float(FPS)}
    assert any("rounded to 18x12" in n for n in a.record["plan"]["notes"])
    assert any("cropped to 6 frames" in n for n in a.record["plan"]["notes"])  # 6 frames: a 7-frame latent cropped
    assert a.record["settings"]["width"] == 18 and a.record["settings"]["sampler"] == "dpmpp_2m"
    b = modes.text_to_video(pipe, "a red circle moving left on a black background", cfg)
    assert torch.equal(a.windows[0].latent, b.windows[0].latent) and np.array_equal(a.frames, b.frames)
    c = modes.text_to_video(pipe, "a red circle moving left on a black background", cfg.replace(seed=4))
    assert not torch.equal(a.windows[0].latent, c.windows[0].latent)
    # defaults come from the pipeline directory
    d = modes.text_to_video(pipe, "x", CFG)
    assert d.frames.shape == (SAMPLE_SIZE[2], SAMPLE_SIZE[1], SAMPLE_SIZE[0], 3)


def test_two_pass_text_to_video_resamples_from_its_own_first_frame(pipe):
    cfg = CFG.replace(width=16, height=12, frames=9, seed=5)
    one = modes.text_to_video(pipe, "a red circle moving left on a black background", cfg)
    two = modes.text_to_video(pipe, "a red circle moving left on a black background", cfg.replace(two_pass=True))
    win = two.windows[0]
    assert win.given.tolist() == [True] + [False] * (win.given.numel() - 1) and _given_exact(win)
    assert torch.equal(win.latent[:, :1], one.windows[0].latent[:, :1])  # the first pass's first frame
    assert not torch.equal(win.latent[:, 1:], one.windows[0].latent[:, 1:])  # the rest sampled again
    assert two.record["settings"]["two_pass"] is True and two.frames.shape == one.frames.shape


def test_image_to_video_keeps_the_image_as_first_frame(pipe, clip):
    image = np.ascontiguousarray(clip[0, :, :14])  # 14x12: its own aspect is kept
    g = modes.image_to_video(pipe, "a block", image, CFG.replace(frames=5))
    assert g.frames.shape == (5, 12, 14, 3)
    assert np.array_equal(g.frames[0], image)
    win = g.windows[0]
    assert win.given.tolist() == [True, False, False]
    assert torch.equal(win.latent[:, :1], pipe.vae.encode_video(image[None]))
    wide = modes.image_to_video(pipe, "a block", image, CFG.replace(frames=3, width=28))
    assert wide.frames.shape[1:3] == (24, 28)  # scaled, aspect kept


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extend_keeps_the_input_and_slides_past_one_window(pipe, clip, direction):
    g = modes.extend(pipe, clip, CFG.replace(context=2), direction=direction, num_frames=11, fps=12)
    assert g.frames.shape == (20, 12, 16, 3) and g.fps == 12
    kept = g.frames[:9] if direction == "forward" else g.frames[11:]
    assert np.array_equal(kept, clip)  # the input, bit for bit
    assert g.record["joins"] == ([9] if direction == "forward" else [11])
    assert len(g.windows) > 1 and all(w.latent.shape[1] <= WINDOW for w in g.windows)
    assert all(_given_exact(w) for w in g.windows)
    first = g.windows[0]
    if direction == "forward":  # the first window's context is the input's last 1 + (k-1)*t frames
        assert first.given.tolist()[:2] == [True, True] and not first.given[2:].any()
        assert torch.equal(first.context[:, :2], pipe.vae.encode_video(clip[-3:]))
    else:  # ... or its first k*t frames, as whole groups at the end of the window
        assert first.given.tolist()[-2:] == [True, True] and not first.given[:-2].any()
    again = modes.extend(pipe, clip, CFG.replace(context=2), direction=direction, num_frames=11)
    assert np.array_equal(again.frames, g.frames)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_feathering_makes_the_join_a_decoded_frame_step(pipe, clip, direction):
    """The input is kept and the new frames are decoded, so without feathering the join also carries
    the VAE's error; with it, the new frame beside the join differs from the kept one by exactly the
    decoder's own step there, and frames past `feather` are untouched."""
    n = 4 if direction == "forward" else 3  # one window of 2 context + 2 new latent frames
    off = modes.extend(pipe, clip, CFG.replace(context=2, feather=0), direction=direction, num_frames=n)
    on = modes.extend(pipe, clip, CFG.replace(context=2, feather=2), direction=direction, num_frames=n)
    assert len(on.windows) == 1 and torch.equal(on.windows[0].latent, off.windows[0].latent)  # same sample
    decoded = pipe.vae.decode_video(on.windows[0].latent, 7, *clip.shape[1:3]).astype(np.int16)
    step = decoded[3] - decoded[2]  # forward: last context frame → first new; backward: last new → first context
    if direction == "forward":
        kept, new_on, new_off, far = on.frames[:9], on.frames[9:], off.frames[9:], slice(2, None)
        join, beside = new_on[0].astype(np.int16) - clip[-1], new_on[0]
    else:
        kept, new_on, new_off, far = on.frames[n:], on.frames[:n], off.frames[:n], slice(None, -2)
        join, beside = clip[0].astype(np.int16) - new_on[-1], new_on[-1]
    assert np.array_equal(kept, clip)
    free = (beside > 0) & (beside < 255)  # a random tiny decoder saturates some pixels
    assert free.mean() > 0.5 and np.abs(join - step)[free].max() <= 1  # 1: rounding to uint8
    assert not np.array_equal(new_on, new_off)
    assert np.array_equal(new_on[far], new_off[far])
    assert on.record["settings"]["feather"] == 2


def test_interpolate_connects_two_videos(pipe, clip):
    b = clip[::-1].copy()
    g = modes.interpolate(pipe, clip, b, CFG.replace(context=1, window=WINDOW), num_frames=3)
    assert g.record["new_frames"] == 4 and any("rounded to 4" in n for n in g.record["notes"])
    assert np.array_equal(g.frames[:9], clip) and np.array_equal(g.frames[13:], b)
    assert g.record["joins"] == [9, 13]
    win = g.windows[-1]
    assert win.given.tolist() == [True, False, False, True]
    assert _given_exact(win)
    long_gap = modes.interpolate(pipe, clip, b, CFG.replace(context=1, window=WINDOW), num_frames=10)
    assert long_gap.frames.shape[0] == 9 + 10 + 9 and len(long_gap.windows) > 1
    assert np.array_equal(long_gap.frames[-9:], b)
    with pytest.raises(ValueError, match="one size"):
        modes.interpolate(pipe, clip, clip[:, :, :8].copy(), CFG, num_frames=2)


def test_edit_is_sdedit_from_the_input(pipe, clip):
    g = modes.edit(pipe, clip, "a blue block", CFG.replace(strength=0.5, steps=4))
    assert g.frames.shape == clip.shape
    assert g.record["timing"]["steps"] == 2  # strength 0.5 of 4 steps
    assert not g.windows[0].given.any()
    same = modes.edit(pipe, clip, "a blue block", CFG.replace(strength=0.5, steps=4))
    assert np.array_equal(g.frames, same.frames)
    with pytest.raises(ValueError, match="needs a prompt"):
        modes.edit(pipe, clip, " ", CFG)


def test_bad_settings_are_config_errors():
    from sorakit.config import ConfigError

    for bad in ({"strength": 0.0}, {"steps": 0}, {"width": 0}, {"context": 0}, {"window": 1}, {"feather": -1}):
        with pytest.raises(ConfigError):
            CFG.replace(**bad)


def test_prompts_are_expanded_when_the_pipeline_records_captions(pipe, tmp_path):
    corpus = tmp_path / "captions.txt"
    full = "a red circle moving left on a black background"
    corpus.write_text(f"{full}\na blue square standing still on a white background\n")
    cfg = CFG.replace(frames=1, width=8, height=8)
    pipe.meta["captions"] = str(corpus)
    try:
        g = modes.text_to_video(pipe, "red circle", cfg)
        assert (g.record["prompt"], g.record["expanded_prompt"]) == ("red circle", full)
        direct = modes.text_to_video(pipe, full, cfg.replace(expand=False))  # the model saw the expansion
        assert torch.equal(g.windows[0].latent, direct.windows[0].latent) and direct.record["expanded_prompt"] is None
    finally:
        del pipe.meta["captions"]
    assert modes.text_to_video(pipe, "red circle", cfg).record["expanded_prompt"] is None
    with pytest.raises(ValueError, match="needs a caption corpus"):
        modes.text_to_video(pipe, "red circle", cfg.replace(expand=True))


def test_sample_applies_the_pipelines_refiners_unless_told_not_to(tmp_path, clip):
    from sorakit.generation.pipeline import load_pipeline

    pipe = load_pipeline(make_tiny_pipeline(tmp_path / "cascade", refiner=True))
    cfg = CFG.replace(width=16, height=12, frames=5, seed=1)
    base = modes.text_to_video(pipe, "a red circle", cfg.replace(refine=False))
    refined = modes.text_to_video(pipe, "a red circle", cfg)  # default: refine when the pipeline holds refiners
    assert base.frames.shape == (5, 12, 16, 3) and base.record["refined"] is None
    assert refined.frames.shape == (9, 24, 32, 3) and refined.fps == 2 * base.fps
    assert refined.record["refined"]["base_size"] == {"width": 16, "height": 12, "frames": 5, "fps": base.fps}
    assert refined.record["settings"]["refine"] is True and base.record["settings"]["refine"] is False
    assert refined.record["size"]["width"] == 32
    i2v = modes.image_to_video(pipe, "a red circle", clip[0], cfg.replace(frames=5))
    assert i2v.frames.shape == (9, 24, 32, 3)
    # A pixel-space refiner after the latent one: the video is encoded into its own space.
    cascade = load_pipeline(make_tiny_pipeline(tmp_path / "pixels", refiner=True, pixel_refiner=True))
    assert cascade.refiner_vaes[0] is cascade.vae and cascade.refiner_vaes[1].latent_channels == 3
    both = modes.text_to_video(cascade, "a red circle", cfg)
    assert both.frames.shape == (9, 48, 64, 3) and both.record["refined"]["spatial_scale"] == 4
    plain_dir = make_tiny_pipeline(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no refiners"):
        modes.text_to_video(load_pipeline(plain_dir), "a red circle", cfg.replace(refine=True))
    # `sorakit set-refiners` attaches trained refiners to a trained pipeline, and removes them.
    from sorakit.cli import main

    assert main(["set-refiners", str(plain_dir), str(tmp_path / "pixels" / "pixel_refiner")]) == 0
    attached = load_pipeline(plain_dir)
    assert len(attached.refiners) == 1 and attached.refiner_vaes[0].latent_channels == 3
    assert modes.text_to_video(attached, "a red circle", cfg).frames.shape == (5, 24, 32, 3)
    assert main(["set-refiners", str(plain_dir), str(tmp_path / "plain" / "vae")]) == 1  # not a refiner
    assert len(load_pipeline(plain_dir).refiners) == 1  # a refused change leaves the pipeline as it was
    assert main(["set-refiners", str(plain_dir)]) == 0
    assert load_pipeline(plain_dir).refiners == []
