"""`sorakit eval toyworld`: how well a model follows toy-world prompts, and how well it joins videos.

    report = eval_model("runs/demo/dit", EvalConfig(num=40), GenerationConfig(steps=20))
    report = eval_videos("outputs/")          # existing videos scored against their sidecar prompts

Text-to-video: prompts and native sizes/lengths are drawn per `toyworld.md` (`sample_spec`); half
use sizes the model trained on (the pipeline's "train_sizes", or the clips under --train-data) and
half sizes it never saw. Each video is scored by the pixel rules of `toyscore`: per-attribute and
all-four accuracy, for the trained and unseen halves apart.

Image-to-video: the first frame of a real toy clip (rendered and H.264-encoded), at a trained frame
size when known, is animated with the clip's caption; the video is scored like text-to-video. The
object is given, so this isolates what the model does over time: keeping the shape, moving it.

Joins: real toy clips (rendered and H.264-encoded) of moving objects are cut and rebuilt by the
model: forward extension regrows the second half from the first, backward extension the first half
from the second, interpolation the middle third (whole VAE time steps) between the outer parts.
Reported: the seam ratio (mean frame difference across each join over the mean difference inside
the clip; 1.0 is invisible), the step ratio (mean frame difference inside the generated part over
the mean inside the kept input; 1.0 means the new frames change no faster than the input's, more
means they flicker) and whether the generated part keeps the object's colour, shape and motion.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sorakit.config import ConfigError
from sorakit.generation import toyscore
from sorakit.generation.modes import GenerationConfig

JOIN_MODES = ("extend_forward", "extend_backward", "interpolate")
MIN_JOIN_FRAMES = 24  # join clips are at least this long, so every part spans several latent frames
SEAM_BAR = 1.5  # the quality bar: a seam at most this much above an ordinary frame step


@dataclass
class EvalConfig:
    num: int = 40  # text-to-video prompts (half at trained sizes, half at unseen ones)
    i2v: int = 10  # real toy clips animated from their first frame (image-to-video); 0 skips them
    joins: int = 6  # clips per join mode (extend forward, extend backward, interpolate); 0 skips them
    seed: int = 0  # draws the prompts, sizes and clips; the same seed gives the same cases
    compare: str | None = None  # "SAMPLER:STEPS", e.g. "ddim:100": rerun text-to-video with it and report the gap

    def validate(self) -> None:
        if self.num < 0 or self.joins < 0 or self.i2v < 0:
            raise ConfigError("num, i2v and joins must be >= 0")
        if self.compare is not None:
            parse_compare(self.compare)


def parse_compare(text: str) -> tuple[str, int]:
    name, _, steps = text.partition(":")
    if not name or not steps.isdigit() or int(steps) < 1:
        raise ConfigError(f"--compare must look like SAMPLER:STEPS (e.g. ddim:100), got {text!r}")
    return name, int(steps)


# --------------------------------------------------------------------------------------------
# Drawing cases
# --------------------------------------------------------------------------------------------


def _sizes_from_json(d: dict) -> tuple[int, int, int] | None:
    # latent shards record the frames actually encoded (`encoded_frames`) beside the source's count
    if not isinstance(d, dict):
        return None
    frames = d.get("encoded_frames") or d.get("num_frames")
    if d.get("width") and d.get("height") and frames:
        return int(d["width"]), int(d["height"]), int(frames)
    return None


def _sizes_in(path: Path) -> set[tuple[int, int, int]]:
    """Sizes of the clips in a directory of JSON files (toy-world clips) or in shards."""
    import json

    sizes = set()
    jsons = list(path.rglob("*.json")) if path.is_dir() else []
    for f in jsons:
        try:
            s = _sizes_from_json(json.loads(f.read_text()))
        except (ValueError, OSError, AttributeError):
            continue
        if s:
            sizes.add(s)
    if not sizes:
        from sorakit.data.shards import iter_tar_samples, list_shards

        for shard in list_shards(path):
            for _, members in iter_tar_samples(shard):
                try:
                    s = _sizes_from_json(json.loads(members.get("json", b"{}")))
                except (ValueError, AttributeError):
                    continue
                if s:
                    sizes.add(s)
    return sizes


def training_sizes(pipe=None, train_data: str | Path | None = None) -> set[tuple[int, int, int]]:
    """(width, height, frames) of the clips the model trained on: the pipeline's "train_sizes", else
    the clips under `train_data` (toy-world JSONs or shards), else the DiT's training shards."""
    from sorakit.generation.modes import _pipe_meta, training_data

    recorded = _pipe_meta(pipe).get("train_sizes") if pipe is not None else None
    if recorded:
        return {tuple(int(v) for v in s) for s in recorded}
    source = train_data or (training_data(pipe) if pipe is not None else None)
    if source is None:
        return set()
    root = Path(source)
    if not root.exists() and not any(ch in str(source) for ch in "*?["):
        raise FileNotFoundError(f"{root}: no such training data")
    return _sizes_in(root)


@dataclass
class Case:
    spec: object  # toyworld.ClipSpec
    group: str  # "trained", "unseen" or "any" (when the training sizes are unknown)

    @property
    def prompt(self) -> str:
        return self.spec.caption


def draw_cases(num: int, seed: int, trained: set[tuple[int, int, int]]) -> list[Case]:
    """`num` toy-world prompts at native sizes: half from `trained`, half never seen (when known)."""
    from sorakit.data.toyworld import sample_spec

    rng = np.random.default_rng(seed)
    pool = sorted(trained)
    cases = []
    for i in range(num):
        if not pool:
            cases.append(Case(sample_spec(rng, seed), "any"))
        elif i % 2 == 0:
            w, h, t = pool[int(rng.integers(len(pool)))]
            cases.append(Case(sample_spec(rng, seed, width=w, height=h, num_frames=t), "trained"))
        else:
            spec = sample_spec(rng, seed)
            while (spec.width, spec.height, spec.num_frames) in trained:
                spec = sample_spec(rng, seed)
            cases.append(Case(spec, "unseen"))
    return cases


def draw_join_clips(num: int, seed: int, trained: set[tuple[int, int, int]]) -> list[object]:
    """Clips of moving objects (a still clip has no frame steps to compare a seam with), at trained
    frame sizes when known (joins are tested here, not size generalisation), long enough to cut."""
    from sorakit.data.toyworld import FRAMES_RANGE, MOTIONS, sample_spec

    rng = np.random.default_rng([seed, 1])
    moving = [m for m in MOTIONS if m != "still"]
    pool = sorted(trained)
    out = []
    for _ in range(num):
        frames = int(rng.integers(max(MIN_JOIN_FRAMES, FRAMES_RANGE[0]), FRAMES_RANGE[1] + 1))
        out.append(sample_spec(rng, seed, motion=str(rng.choice(moving)), num_frames=frames, **_frame_size(rng, pool)))
    return out


def draw_i2v_clips(num: int, seed: int, trained: set[tuple[int, int, int]]) -> list[object]:
    """Clips of every motion (still included) for image-to-video, at trained frame sizes when known."""
    from sorakit.data.toyworld import sample_spec

    rng = np.random.default_rng([seed, 2])
    pool = sorted(trained)
    return [sample_spec(rng, seed, **_frame_size(rng, pool)) for _ in range(num)]


def _frame_size(rng: np.random.Generator, pool: list[tuple[int, int, int]]) -> dict:
    """A (width, height) drawn from the training sizes, or nothing (sample_spec draws one) when unknown."""
    if not pool:
        return {}
    w, h, _ = pool[int(rng.integers(len(pool)))]
    return {"width": w, "height": h}


def encoded_clip(spec) -> np.ndarray:
    """A toy clip as a real video file carries it: rendered, H.264-encoded as toy-world clips are, decoded."""
    from sorakit.data.toyworld import write_clip
    from sorakit.media import read_video

    with tempfile.TemporaryDirectory() as tmp:
        return read_video(write_clip(Path(tmp), "clip", spec))


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "mean": round(statistics.fmean(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
        f"within_{SEAM_BAR}": round(sum(v <= SEAM_BAR for v in values) / len(values), 4),
    }


def score_join(frames: np.ndarray, mode: str, joins: list[int], prompt: str) -> dict:
    """Seam ratio at the joins, step ratio, and the generated part's attributes against the prompt.
    mode: one of JOIN_MODES; with `joins` it says which frames are new."""
    if mode == "interpolate":
        new = slice(joins[0], joins[-1])
    else:
        new = slice(joins[0], None) if mode == "extend_forward" else slice(0, joins[0])
    part = frames[new]
    scale = len(part) / max(1, len(frames))
    score = toyscore.score_video(part, prompt, travel_scale=scale)
    try:
        step = round(toyscore.step_ratio(frames, new), 4)
    except ValueError:  # a part of one frame has no step inside it
        step = None
    return {"seam": round(toyscore.seam_ratio(frames, joins), 4), "step": step,
            "kept": score.correct, "all_kept": score.followed, "predicted": score.predicted}


def _summarize_joins(results: list[dict]) -> dict:
    if not results:
        return {"n": 0}
    kept = {a: round(sum(r["kept"][a] for r in results) / len(results), 4) for a in toyscore.ATTRIBUTES}
    steps = [r["step"] for r in results if r["step"] is not None]
    step = {"mean": round(statistics.fmean(steps), 4), "median": round(statistics.median(steps), 4)} if steps else None
    return {"n": len(results), "seam": _stats([r["seam"] for r in results]), "kept": kept, "step": step,
            "all_kept": round(sum(r["all_kept"] for r in results) / len(results), 4)}


def _summarize_t2v(scores: list[tuple[Case, toyscore.ToyScore]]) -> dict:
    out = {"all": toyscore.summarize(s for _, s in scores)}
    for group in ("trained", "unseen"):
        members = [s for c, s in scores if c.group == group]
        if members:
            out[group] = toyscore.summarize(members)
    return out


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def _save(save_dir: Path | None, name: str, gen, score: dict) -> None:
    if save_dir is None:
        return
    from sorakit.generation.outputs import write_generation

    gen.record["toyworld_score"] = score
    write_generation(save_dir / f"{name}.mp4", gen.frames, gen.fps, gen.record, preview=True)


def _t2v(pipe, cases: list[Case], cfg: GenerationConfig, save_dir, tag: str, log) -> tuple[dict, list[dict]]:
    from sorakit.generation.modes import text_to_video

    scores, rows, seconds, step_s = [], [], [], []
    for i, case in enumerate(cases):
        s = case.spec
        gen = text_to_video(pipe, case.prompt, cfg.replace(width=s.width, height=s.height, frames=s.num_frames,
                                                            fps=float(s.fps), seed=cfg.seed + i, expand=False))
        score = toyscore.score_video(gen.frames, case.prompt)
        scores.append((case, score))
        timing = gen.record["timing"]
        seconds.append(timing["seconds"])
        if timing.get("seconds_per_step"):
            step_s.append(timing["seconds_per_step"])
        rows.append({"prompt": case.prompt, "group": case.group, "size": [s.width, s.height, s.num_frames],
                     "tokens": gen.record["plan"]["tokens"], **score.to_dict(), "seconds": timing["seconds"]})
        log(f"{tag} {i + 1}/{len(cases)} [{case.group}] {'ok ' if score.followed else 'MISS'} {case.prompt} "
            f"({s.width}x{s.height}x{s.num_frames})")
        _save(save_dir, f"{tag}-{i:03d}", gen, score.to_dict())
    summary = _summarize_t2v(scores)
    summary["seconds_per_video"] = round(statistics.fmean(seconds), 3) if seconds else None
    summary["seconds_per_step"] = round(statistics.fmean(step_s), 4) if step_s else None
    return summary, rows


def _i2v(pipe, specs: list, cfg: GenerationConfig, save_dir, log) -> tuple[dict, list[dict]]:
    from sorakit.generation.modes import image_to_video

    scores, rows = [], []
    for i, spec in enumerate(specs):
        clip = encoded_clip(spec)
        gen = image_to_video(pipe, spec.caption, clip[0], cfg.replace(frames=len(clip), fps=float(spec.fps),
                                                                    seed=cfg.seed + i, expand=False))
        score = toyscore.score_video(gen.frames, spec.caption)
        scores.append(score)
        rows.append({"prompt": spec.caption, "size": [spec.width, spec.height, len(clip)], **score.to_dict()})
        log(f"i2v {i + 1}/{len(specs)} {'ok ' if score.followed else 'MISS'} {spec.caption}")
        _save(save_dir, f"i2v-{i:03d}", gen, score.to_dict())
    return toyscore.summarize(scores), rows


def _joins(pipe, specs: list, cfg: GenerationConfig, save_dir, log) -> tuple[dict, list[dict]]:
    from sorakit.generation.modes import extend, interpolate

    results = {m: [] for m in JOIN_MODES}
    rows = []
    for i, spec in enumerate(specs):
        clip = encoded_clip(spec)
        t = len(clip)
        c = cfg.replace(seed=cfg.seed + i, expand=False, fps=float(spec.fps))
        half, third = t // 2, t // 3
        tf = pipe.vae.temporal_factor
        gap = max(tf, (t - 2 * third) // tf * tf)  # whole VAE time steps, so the rebuilt clip is as long as the real one
        runs = {
            "extend_forward": lambda: extend(pipe, clip[:half], c, direction="forward", num_frames=t - half, prompt=spec.caption),
            "extend_backward": lambda: extend(pipe, clip[half:], c, direction="backward", num_frames=half, prompt=spec.caption),
            "interpolate": lambda: interpolate(pipe, clip[: t - third - gap], clip[t - third :], c, num_frames=gap,
                                               prompt=spec.caption),
        }
        for mode, run in runs.items():
            gen = run()
            r = score_join(gen.frames, mode, gen.record["joins"], spec.caption)
            results[mode].append(r)
            rows.append({"mode": mode, "prompt": spec.caption, "size": [spec.width, spec.height, t], **r})
            log(f"{mode} {i + 1}/{len(specs)} seam {r['seam']:.2f} {'kept' if r['all_kept'] else 'LOST'} {spec.caption}")
            _save(save_dir, f"{mode}-{i:03d}", gen, r)
    return {m: _summarize_joins(v) for m, v in results.items()}, rows


def eval_model(model: str | Path, ecfg: EvalConfig, cfg: GenerationConfig, *, train_data: str | Path | None = None,
               save_dir: str | Path | None = None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Generate and score; returns the report (see the module docstring)."""
    from sorakit.generation.modes import model_identity
    from sorakit.generation.outputs import load_model

    ecfg.validate()
    start = time.perf_counter()
    pipe = load_model(model)
    trained = training_sizes(pipe, train_data)
    save = Path(save_dir) if save_dir else None
    report: dict = {"model": model_identity(pipe), "settings": dataclasses.asdict(cfg), "eval": dataclasses.asdict(ecfg),
                    "trained_sizes_known": len(trained)}
    cases = draw_cases(ecfg.num, ecfg.seed, trained)
    cases_out: dict = {}
    if cases:
        report["text_to_video"], cases_out["text_to_video"] = _t2v(pipe, cases, cfg, save, "t2v", log)
        if ecfg.compare:
            sampler, steps = parse_compare(ecfg.compare)
            ref, cases_out["compare"] = _t2v(pipe, cases, cfg.replace(sampler=sampler, steps=steps), save, f"{sampler}{steps}", log)
            a, b = report["text_to_video"]["all"]["all"], ref["all"]["all"]
            report["compare"] = {"sampler": sampler, "steps": steps, "text_to_video": ref,
                                 "gap_points": round(100 * (a - b), 2) if a is not None and b is not None else None}
    if ecfg.i2v:
        report["image_to_video"], cases_out["image_to_video"] = _i2v(
            pipe, draw_i2v_clips(ecfg.i2v, ecfg.seed, trained), cfg, save, log)
    if ecfg.joins:
        joins, cases_out["joins"] = _joins(pipe, draw_join_clips(ecfg.joins, ecfg.seed, trained), cfg, save, log)
        report.update(joins)
    report["cases"] = cases_out
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def eval_videos(root: str | Path, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Score every video under `root` that has a sidecar with a toy-world prompt (sorakit's, or a
    toy-world clip's JSON with its `caption`); videos from extend/interpolate get seam ratios too."""
    from sorakit.media import read_video

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    import json

    scores: list[tuple[Case, toyscore.ToyScore]] = []
    joins = {m: [] for m in JOIN_MODES}
    rows, skipped = [], []
    for video in sorted(root.rglob("*.mp4")):
        side = video.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
            prompt = meta.get("prompt") or meta.get("caption")
            if not prompt:
                raise ValueError("its sidecar has no prompt")
            toyscore.expected_attributes(prompt)
            frames = read_video(video)
        except FileNotFoundError:
            skipped.append({"video": str(video), "reason": "no sidecar"})
            continue
        except ValueError as e:
            skipped.append({"video": str(video), "reason": str(e)})
            continue
        mode = str(meta.get("mode", "text-to-video")).replace("-", "_")
        if mode in JOIN_MODES and meta.get("joins"):
            r = score_join(frames, mode, [int(v) for v in meta["joins"]], prompt)
            joins[mode].append(r)
            rows.append({"video": str(video), "mode": mode, "prompt": prompt, **r})
        else:
            score = toyscore.score_video(frames, prompt)
            scores.append((Case(None, "any"), score))
            rows.append({"video": str(video), "mode": mode, "prompt": prompt, **score.to_dict()})
        log(f"scored {video.name}")
    report: dict = {"videos": str(root), "scored": len(rows), "skipped": skipped}
    if scores:
        report["text_to_video"] = _summarize_t2v(scores)
    for m, v in joins.items():
        if v:
            report[m] = _summarize_joins(v)
    report["cases"] = rows
    return report


def format_report(report: dict) -> list[str]:
    """Human-readable lines of a report (the JSON holds every case as well)."""
    lines = []
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}%"  # noqa: E731

    def accuracy_row(label: str, s: dict) -> str:  # under the text-to-video header's columns
        a = s["accuracy"]
        return (f"{label:<35}{pct(a['color'])} {pct(a['shape'])} {pct(a['motion'])}   {pct(a['background'])}     "
                f"{pct(s['all'])}")

    t2v = report.get("text_to_video")
    if t2v:
        lines.append("text-to-video prompt following      color  shape  motion  background  all four")
        for group in ("trained", "unseen", "all"):
            s = t2v.get(group)
            if s and s["n"]:
                lines.append(accuracy_row(f"  {group:<8} n={s['n']}", s))
        if t2v.get("seconds_per_video"):
            lines.append(f"  {t2v['seconds_per_video']:.2f} s per video, {t2v['seconds_per_step']:.3f} s per step")
    cmp_ = report.get("compare")
    if cmp_:
        ref = cmp_["text_to_video"]["all"]
        lines.append(f"  {cmp_['sampler']} {cmp_['steps']} steps: all four {pct(ref['all'])} "
                     f"(gap {cmp_['gap_points']:+.1f} points)")
    i2v = report.get("image_to_video")
    if i2v and i2v.get("n"):
        lines.append(accuracy_row(f"image-to-video n={i2v['n']}", i2v))
    for mode in JOIN_MODES:
        s = report.get(mode)
        if s and s.get("n"):
            seam = s["seam"]
            kept = s["kept"]
            step = f"{s['step']['mean']:.2f}" if s.get("step") else "-"
            lines.append(f"{mode:<16} n={s['n']:<3} seam mean {seam['mean']:.2f} median {seam['median']:.2f} "
                         f"max {seam['max']:.2f}; new/kept frame step {step}; "
                         f"kept color {pct(kept['color'])} shape {pct(kept['shape'])} "
                         f"motion {pct(kept['motion'])} all {pct(s['all_kept'])}")
    if report.get("skipped"):
        lines.append(f"skipped {len(report['skipped'])} video(s): " + "; ".join(
            f"{Path(s['video']).name} ({s['reason']})" for s in report["skipped"][:5]))
    return lines
