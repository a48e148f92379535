"""Generation commands: `sorakit sample`, `extend`, `interpolate`, `edit`, `eval toyworld`.

Every setting's default comes from `GenerationConfig` (sorakit.generation.modes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sorakit.cli.app import UserError, app, console, eval_app, fail, handle_errors
from sorakit.generation.evaluate import EvalConfig
from sorakit.generation.modes import GenerationConfig

D = GenerationConfig()
E = EvalConfig()

MODEL = typer.Option(..., "--model", "-m", help="Pipeline directory (written by `sorakit train dit`).")
SEED = typer.Option(D.seed, "--seed", help="Noise seed; the same seed and settings give the same video.")
STEPS = typer.Option(D.steps, "--steps", min=1, help="Sampling steps.")
SAMPLER = typer.Option(D.sampler, "--sampler", help="ddim, dpmpp_2m, euler or heun (default: dpmpp_2m for v/eps models, euler for flow).")
GUIDANCE = typer.Option(D.guidance, "--guidance", help="Classifier-free guidance scale; 1 turns it off.")
NEGATIVE = typer.Option(D.negative_prompt, "--negative-prompt", help="What to steer away from (the unconditional text of guidance).")
EXPAND = typer.Option(D.expand, "--expand/--no-expand", help="Rewrite the prompt in the training captions' style first (default: when the pipeline records a \"captions\" corpus; --expand falls back to its training shards).")
FPS = typer.Option(D.fps, "--fps", help="Frame rate of the output (default: the input's, else the pipeline's).")
PREVIEW = typer.Option(False, "--preview", help="Also write OUT.png, a contact sheet of frames.")
CONTEXT = typer.Option(D.context, "--context", min=1, help="Latent frames of the input given to the model as context.")
WINDOW = typer.Option(D.window, "--window", min=2, help="Latent frames per sampling call when extending (default: the pipeline's).")
FEATHER = typer.Option(D.feather, "--feather", min=0, help="Frames over which the decoder's error at a join fades out of the new frames (0: off).")
TWO_PASS = typer.Option(D.two_pass, "--two-pass/--one-pass", help="Text-to-video: sample, keep the first latent frame, sample the rest again from it (image-to-video).")
REFINE = typer.Option(D.refine, "--refine/--no-refine", help="Apply the pipeline's refiners (more pixels and frames) after the base model (default: when the pipeline holds any).")
CRF = typer.Option(D.crf, "--crf", help="H.264 quality of the output; lower is better.")


def _config(**values) -> GenerationConfig:
    return GenerationConfig(**values).replace()  # replace() validates


def _report(paths, gen) -> None:
    rec = gen.record
    for note in (rec.get("plan") or {}).get("notes", []) + rec.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    size = rec["size"]
    t = rec.get("timing") or {}
    per_step = f", {t['seconds_per_step']:.3f} s/step" if t.get("seconds_per_step") else ""
    console.print(
        f"wrote {paths.video} ({size['width']}x{size['height']}, {size['frames']} frames at {size['fps']:g} fps; "
        f"{t.get('seconds', 0):.1f} s{per_step})",
        highlight=False,
    )
    if rec.get("expanded_prompt"):
        console.print(f"expanded prompt: {rec['expanded_prompt']}", highlight=False)


@app.command("sample")
@handle_errors
def sample(
    prompt: Optional[str] = typer.Argument(None, help="What to generate (omit with --prompts)."),
    model: Path = MODEL,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output OUT.mp4 (OUT.json sidecar beside it)."),
    width: Optional[int] = typer.Option(D.width, "--width", min=1, help="Width in pixels (default: the pipeline's; with --image: fit the image)."),
    height: Optional[int] = typer.Option(D.height, "--height", min=1, help="Height in pixels."),
    frames: Optional[int] = typer.Option(D.frames, "--frames", min=1, help="Number of frames."),
    image: Optional[Path] = typer.Option(None, "--image", help="Image-to-video: this image is the first frame, at its own aspect."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Batch: a .txt (one prompt a line) or .jsonl (prompt, width, height, frames, fps, seed, image)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Batch output directory (manifest.jsonl, index.html, one video per job)."),
    preview: bool = PREVIEW,
    seed: int = SEED,
    steps: int = STEPS,
    sampler: Optional[str] = SAMPLER,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE,
    expand: Optional[bool] = EXPAND,
    fps: Optional[float] = FPS,
    crf: int = CRF,
    two_pass: bool = TWO_PASS,
    refine: Optional[bool] = REFINE,
):
    """Text-to-video (or image-to-video with --image) at any size and length; batches with --prompts."""
    cfg = _config(width=width, height=height, frames=frames, fps=fps, seed=seed, steps=steps, sampler=sampler,
                  guidance=guidance, negative_prompt=negative_prompt, expand=expand, crf=crf, refine=refine,
                  two_pass=two_pass)
    if prompts is not None:
        if prompt is not None or out is not None or image is not None:
            raise UserError("--prompts runs a batch: give --out-dir, not a PROMPT, --out or --image (put images in the .jsonl)")
        if out_dir is None:
            raise UserError("--prompts needs --out-dir DIR")
        from sorakit.generation.batch import EXIT_LOCKED, BatchLocked, sample_batch

        try:
            result = sample_batch(model, prompts, out_dir, cfg, preview=True,
                                  log=lambda m: console.print(m, highlight=False, markup=False))
        except BatchLocked as e:
            fail(str(e), EXIT_LOCKED)
        console.print(f"{result.ok} generated, {result.skipped} already done, {result.failed} failed "
                      f"-> {out_dir}/index.html", highlight=False)
        if result.exit_code:
            fail(f"{result.failed} job(s) failed; see {out_dir}/errors.jsonl", result.exit_code)
        return
    if prompt is None or out is None:
        raise UserError("give a PROMPT and --out OUT.mp4 (or --prompts FILE --out-dir DIR)")
    from sorakit.generation.outputs import sample_to_file

    _report(*sample_to_file(model, prompt, out, cfg, image=image, preview=preview))


@app.command("extend")
@handle_errors
def extend(
    video: Path = typer.Argument(..., help="Input video; its frames are kept unchanged."),
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", "-o", help="Output OUT.mp4."),
    direction: str = typer.Option("forward", "--direction", help="forward (after the end) or backward (before the start)."),
    frames: int = typer.Option(..., "--frames", min=1, help="New frames to add."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="What happens (default: the input's sidecar prompt)."),
    preview: bool = PREVIEW,
    seed: int = SEED,
    steps: int = STEPS,
    sampler: Optional[str] = SAMPLER,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE,
    expand: Optional[bool] = EXPAND,
    fps: Optional[float] = FPS,
    context: int = CONTEXT,
    window: Optional[int] = WINDOW,
    feather: int = FEATHER,
    crf: int = CRF,
):
    """Continue a video forward or backward in time, longer than one window by sliding the context."""
    from sorakit.generation.modes import DIRECTIONS
    from sorakit.generation.outputs import extend_to_file

    if direction not in DIRECTIONS:
        raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    cfg = _config(fps=fps, seed=seed, steps=steps, sampler=sampler, guidance=guidance, negative_prompt=negative_prompt,
                  expand=expand, context=context, window=window, feather=feather, crf=crf)
    _report(*extend_to_file(model, video, out, cfg, direction=direction, num_frames=frames, prompt=prompt, preview=preview))


@app.command("interpolate")
@handle_errors
def interpolate(
    a: Path = typer.Argument(..., help="First video; its end is connected to B's start."),
    b: Path = typer.Argument(..., help="Second video (same size as A)."),
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", "-o", help="Output OUT.mp4: A, the new frames, B."),
    frames: int = typer.Option(..., "--frames", min=1, help="New frames between A and B (rounded up to the VAE's time step)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="What happens (default: A's sidecar prompt)."),
    preview: bool = PREVIEW,
    seed: int = SEED,
    steps: int = STEPS,
    sampler: Optional[str] = SAMPLER,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE,
    expand: Optional[bool] = EXPAND,
    fps: Optional[float] = FPS,
    context: int = CONTEXT,
    window: Optional[int] = WINDOW,
    feather: int = FEATHER,
    crf: int = CRF,
):
    """Connect the end of video A to the start of video B with generated frames."""
    from sorakit.generation.outputs import interpolate_to_file

    cfg = _config(fps=fps, seed=seed, steps=steps, sampler=sampler, guidance=guidance, negative_prompt=negative_prompt,
                  expand=expand, context=context, window=window, feather=feather, crf=crf)
    _report(*interpolate_to_file(model, a, b, out, cfg, num_frames=frames, prompt=prompt, preview=preview))


@app.command("edit")
@handle_errors
def edit(
    video: Path = typer.Argument(..., help="Input video."),
    prompt: str = typer.Argument(..., help="What the result should show."),
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", "-o", help="Output OUT.mp4 (same size and length as the input)."),
    strength: float = typer.Option(D.strength, "--strength", help="How far the input is noised, 0-1: low keeps it, 1 ignores it."),
    preview: bool = PREVIEW,
    seed: int = SEED,
    steps: int = STEPS,
    sampler: Optional[str] = SAMPLER,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE,
    expand: Optional[bool] = EXPAND,
    fps: Optional[float] = FPS,
    crf: int = CRF,
):
    """Video-to-video editing by partial noising and denoising (SDEdit)."""
    from sorakit.generation.outputs import edit_to_file

    cfg = _config(fps=fps, seed=seed, steps=steps, sampler=sampler, guidance=guidance, negative_prompt=negative_prompt,
                  expand=expand, strength=strength, crf=crf)
    _report(*edit_to_file(model, video, prompt, out, cfg, preview=preview))


@eval_app.command("toyworld")
@handle_errors
def eval_toyworld(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Pipeline directory to generate with and score."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="Instead: score the videos in this directory against their sidecar prompts."),
    num: int = typer.Option(E.num, "--num", "-n", min=0, help="Text-to-video prompts (half at trained sizes, half unseen)."),
    i2v: int = typer.Option(E.i2v, "--i2v", min=0, help="Real toy clips animated from their first frame (image-to-video); 0 skips."),
    joins: int = typer.Option(E.joins, "--joins", min=0, help="Clips per join mode (extend forward/backward, interpolate); 0 skips."),
    eval_seed: int = typer.Option(E.seed, "--eval-seed", help="Draws the prompts, sizes and clips."),
    compare: Optional[str] = typer.Option(E.compare, "--compare", help="Also run text-to-video with SAMPLER:STEPS (e.g. ddim:100) and report the gap."),
    train_data: Optional[Path] = typer.Option(None, "--train-data", help="The toy-world clips the model trained on, when the pipeline does not record its training sizes."),
    save: Optional[Path] = typer.Option(None, "--save", help="Keep the generated videos (with sidecars, previews and scores) here."),
    json_out: bool = typer.Option(False, "--json", help="Print the full report (every case) as JSON on stdout."),
    seed: int = SEED,
    steps: int = STEPS,
    sampler: Optional[str] = SAMPLER,
    guidance: float = GUIDANCE,
    negative_prompt: str = NEGATIVE,
    context: int = CONTEXT,
    window: Optional[int] = WINDOW,
    feather: int = FEATHER,
    two_pass: bool = TWO_PASS,
    refine: Optional[bool] = REFINE,
):
    """Score toy-world prompt following (text-to-video, image-to-video) and extension/interpolation seams."""
    from sorakit.generation.evaluate import eval_model, eval_videos, format_report

    if (model is None) == (videos is None):
        raise UserError("give exactly one of --model DIR (generate and score) or --videos DIR (score existing videos)")
    log = (lambda m: None) if json_out else (lambda m: console.print(m, highlight=False, markup=False))
    if videos is not None:
        report = eval_videos(videos, log=log)
    else:
        cfg = _config(seed=seed, steps=steps, sampler=sampler, guidance=guidance, negative_prompt=negative_prompt,
                      context=context, window=window, feather=feather, two_pass=two_pass, refine=refine)
        ecfg = EvalConfig(num=num, i2v=i2v, joins=joins, seed=eval_seed, compare=compare)
        report = eval_model(model, ecfg, cfg, train_data=train_data, save_dir=save, log=log)
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        for line in format_report(report):
            typer.echo(line)
