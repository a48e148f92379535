"""`sorakit sample / extend / interpolate / edit / eval toyworld` from the command line, on a tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sorakit.cli import main
from sorakit.media import probe
from tests.generation.tiny_pipeline import make_tiny_pipeline

PROMPT = "a red circle moving left on a black background"
FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


def _sidecar(path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def test_every_mode_from_the_command_line(tmp_path, tiny, capsys):
    a = tmp_path / "a.mp4"
    assert main(["sample", PROMPT, "--model", tiny, "--out", str(a), "--width", "17", "--frames", "7",
                 "--seed", "3", "--preview", *FAST]) == 0
    err = capsys.readouterr().err
    assert "rounded to 18x12" in err and "wrote" in err
    info = probe(a)
    assert (info.width, info.height, info.num_frames, info.pix_fmt) == (18, 12, 7, "yuv420p")
    side = _sidecar(a)
    assert side["prompt"] == PROMPT and side["seed"] == 3 and side["settings"]["steps"] == 2
    assert side["model"]["dit"]["weights_sha256"] and a.with_suffix(".png").is_file()

    ext = tmp_path / "ext.mp4"
    assert main(["extend", str(a), "--model", tiny, "--direction", "backward", "--frames", "6", "--out", str(ext), *FAST]) == 0
    side = _sidecar(ext)
    assert probe(ext).num_frames == 13 and side["prompt"] == PROMPT  # the input's prompt, from its sidecar
    assert side["mode"] == "extend-backward" and side["joins"] == [6] and side["inputs"]["video"]["sha256"]

    mid = tmp_path / "mid.mp4"
    assert main(["interpolate", str(a), str(ext), "--model", tiny, "--frames", "4", "--out", str(mid), *FAST]) == 0
    assert probe(mid).num_frames == 7 + 4 + 13

    edited = tmp_path / "edit.mp4"
    assert main(["edit", str(a), "a blue circle moving left on a black background", "--model", tiny,
                 "--strength", "0.5", "--out", str(edited), *FAST]) == 0
    assert probe(edited).num_frames == 7 and _sidecar(edited)["settings"]["strength"] == 0.5

    image = tmp_path / "first.png"
    from PIL import Image

    Image.fromarray(np.full((12, 20, 3), 90, np.uint8)).save(image)
    i2v = tmp_path / "i2v.mp4"
    assert main(["sample", "a block", "--image", str(image), "--frames", "3", "--model", tiny, "--out", str(i2v), *FAST]) == 0
    assert (probe(i2v).width, probe(i2v).height) == (20, 12)


def test_bad_requests_fail_with_one_line(tmp_path, tiny, capsys):
    cases = [
        (["sample", PROMPT, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.mp4")], "not a sorakit pipeline directory"),
        (["sample", "--prompts", str(tmp_path / "p.txt"), "--model", tiny], "--prompts needs --out-dir"),
        (["sample", PROMPT, "--model", tiny], "--out OUT.mp4"),
        (["extend", str(tmp_path / "missing.mp4"), "--model", tiny, "--frames", "2", "--out", str(tmp_path / "y.mp4")], "missing.mp4"),
        (["sample", PROMPT, "--model", tiny, "--out", str(tmp_path / "z.mp4"), "--strength", "2"], "No such option"),
    ]
    for argv, message in cases:
        assert main(argv) != 0, argv
        assert message in capsys.readouterr().err, argv
    assert not list(tmp_path.glob("*.mp4"))


def test_eval_toyworld_scores_existing_videos(tmp_path, capsys):
    from sorakit.data.toyworld import make_toyworld, render, spec_for_seed
    from sorakit.generation.outputs import write_generation

    clips = make_toyworld(tmp_path / "videos", 4, seed=1)
    spec = spec_for_seed(11)
    while spec.motion == "still" or spec.num_frames < 16:
        spec = spec_for_seed(spec.seed + 1)
    # a perfect forward extension: the real clip, recorded as its first half plus a generated rest
    t = spec.num_frames
    write_generation(tmp_path / "videos" / "ext.mp4", render(spec), spec.fps,
                     {"prompt": spec.caption, "mode": "extend-forward", "joins": [t // 2]})
    (tmp_path / "videos" / "orphan.mp4").write_bytes(clips[0].read_bytes())  # no sidecar: skipped, said so
    assert main(["eval", "toyworld", "--videos", str(tmp_path / "videos"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text_to_video"]["all"] == {"n": 4, "accuracy": dict.fromkeys(("color", "shape", "motion", "background"), 1.0), "all": 1.0}
    ext = report["extend_forward"]
    assert ext["n"] == 1 and ext["all_kept"] == 1.0 and ext["seam"]["max"] < 1.5
    assert ext["step"]["mean"] == pytest.approx(1.0, abs=0.35)  # the real continuation changes as fast as the input
    assert [s["reason"] for s in report["skipped"]] == ["no sidecar"]
    assert main(["eval", "toyworld", "--videos", str(tmp_path / "videos")]) == 0
    assert "100.0%" in capsys.readouterr().out


def test_eval_toyworld_generates_and_scores(tmp_path, tiny, capsys):
    from sorakit.generation.evaluate import draw_cases, training_sizes
    from sorakit.generation.outputs import load_model

    save = tmp_path / "saved"
    argv = ["eval", "toyworld", "--model", tiny, "--num", "1", "--i2v", "1", "--joins", "1", "--window", "8", "--steps", "1",
            "--compare", "ddim:1", "--save", str(save), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    t2v = report["text_to_video"]
    assert t2v["trained"]["n"] == 1 and set(t2v["trained"]["accuracy"]) == {"color", "shape", "motion", "background"}
    assert report["compare"]["steps"] == 1 and report["compare"]["gap_points"] is not None
    for mode in ("extend_forward", "extend_backward", "interpolate"):
        assert report[mode]["n"] == 1 and report[mode]["seam"]["mean"] >= 0
    i2v = report["image_to_video"]
    assert i2v["n"] == 1 and report["cases"]["image_to_video"][0]["prompt"].startswith("a ")
    assert len(list(save.glob("*.mp4"))) == 2 + 1 + 3  # t2v, its ddim rerun, image-to-video, three joins
    # the prompts: half at trained sizes, half at sizes the model never saw
    trained = training_sizes(load_model(tiny))
    cases = draw_cases(6, 0, trained)
    assert [c.group for c in cases] == ["trained", "unseen"] * 3
    assert all(((c.spec.width, c.spec.height, c.spec.num_frames) in trained) == (c.group == "trained") for c in cases)
    assert [c.prompt for c in draw_cases(6, 0, trained)] == [c.prompt for c in cases]


def test_eval_toyworld_scores_the_refined_videos_unless_told_not_to(tmp_path, capsys):
    cascade = str(make_tiny_pipeline(tmp_path / "cascade", refiner=True))
    sizes = {}
    for flag in ("--refine", "--no-refine"):
        save = tmp_path / flag
        assert main(["eval", "toyworld", "--model", cascade, "--num", "1", "--i2v", "0", "--joins", "0", "--steps", "1",
                     "--save", str(save), flag, "--json"]) == 0
        capsys.readouterr()
        (video,) = save.glob("*.mp4")
        info = probe(video)
        sizes[flag] = (info.width, info.height, info.num_frames)
    w, h, t = sizes["--no-refine"]
    assert sizes["--refine"] == (2 * w, 2 * h, 1 + 2 * (t - 1))  # the tiny refiner: 2× space, 2× frame rate
