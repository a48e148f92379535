"""One Markdown report for a whole run: every metric in one table, loss curves and contact sheets.

A run directory holds each stage's output; stages that were evaluated leave `metrics/NAME.json`
(whatever their eval command printed with `--json`), trainers leave `STAGE/logs/metrics.csv`
(Lightning's CSV logger). The report reads only those, so it works for any subset of stages.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from sorakit.utils.fs import atomic_write_text

PLOT_SIZE = (640, 360)
MARGIN = 48


# Sections of an eval's JSON that describe the run rather than measure it (paths, hashes, settings).
NOT_METRICS = {"model", "settings", "config", "eval"}


def flatten(obj, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested JSON object under dotted keys.

    Lists (per-clip detail) and the descriptive top-level sections in NOT_METRICS are left out.
    """
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not prefix and k in NOT_METRICS:
                continue
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = obj
    return out


def read_loss_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Columns whose name contains 'loss', as (step, value) points."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for k, v in row.items():
                if "loss" in k and v not in (None, ""):
                    try:
                        curves.setdefault(k, []).append((int(float(step)), float(v)))
                    except ValueError:
                        continue
    return {k: v for k, v in curves.items() if len(v) >= 2}


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str, out: Path) -> Path:
    """A plain line plot (log-scaled y) drawn with Pillow."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    w, h = PLOT_SIZE
    img = Image.new("RGB", PLOT_SIZE, "white")
    d = ImageDraw.Draw(img)
    pts = [p for c in curves.values() for p in c if p[1] > 0]
    if not pts:
        d.text((MARGIN, h // 2), "no positive loss values", fill="black")
        img.save(out)
        return out
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = math.log10(min(p[1] for p in pts)), math.log10(max(p[1] for p in pts))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)

    def xy(step: float, value: float) -> tuple[float, float]:
        px = MARGIN + (step - x0) / (x1 - x0) * (w - 2 * MARGIN)
        py = h - MARGIN - (math.log10(value) - y0) / (y1 - y0) * (h - 2 * MARGIN)
        return px, py

    d.rectangle([MARGIN, MARGIN, w - MARGIN, h - MARGIN], outline="black")
    d.text((MARGIN, 12), title, fill="black")
    d.text((MARGIN, h - MARGIN + 6), f"step {x0}", fill="black")
    d.text((w - MARGIN - 80, h - MARGIN + 6), f"step {x1}", fill="black")
    d.text((4, MARGIN), f"{10 ** y1:.3g}", fill="black")
    d.text((4, h - MARGIN - 12), f"{10 ** y0:.3g}", fill="black")
    for i, (name, curve) in enumerate(sorted(curves.items())):
        colour = colours[i % len(colours)]
        line = [xy(s, v) for s, v in curve if v > 0]
        if len(line) >= 2:
            d.line(line, fill=colour, width=2)
        d.text((w - MARGIN - 200, MARGIN + 6 + 14 * i), name, fill=colour)
    img.save(out)
    return out


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    out = Path(out) if out else run / "report.md"
    plots_dir = out.parent / "plots"
    lines = [f"# sorakit run report: `{run}`", ""]

    metrics = sorted((run / "metrics").glob("*.json")) if (run / "metrics").is_dir() else []
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| stage | metric | value |", "|---|---|---|"]
        for m in metrics:
            try:
                data = json.loads(m.read_text())
            except json.JSONDecodeError:
                lines.append(f"| {m.stem} | (unreadable: {m.name}) | |")
                continue
            for k, v in flatten(data).items():
                value = f"{v:.4g}" if isinstance(v, float) else str(v)
                lines.append(f"| {m.stem} | {k} | {value} |")
    else:
        lines.append("No stage has been evaluated yet.")
    lines.append("")

    logs = sorted(run.glob("*/logs/metrics.csv"))
    if logs:
        lines += ["## Training losses", ""]
        plots_dir.mkdir(parents=True, exist_ok=True)
        for csv_path in logs:
            stage = csv_path.parent.parent.name
            curves = read_loss_curves(csv_path)
            if not curves:
                continue
            png = plot_curves(curves, f"{stage} training losses", plots_dir / f"{stage}_loss.png")
            last = ", ".join(f"{k} {v[-1][1]:.4g} at step {v[-1][0]}" for k, v in sorted(curves.items()))
            lines += [f"### {stage}", "", f"![{stage} losses]({png.relative_to(out.parent)})", "", f"Last: {last}.", ""]

    sheets = sorted(p for p in run.rglob("*.png") if "plots" not in p.parts and p.parent != plots_dir)
    if sheets:
        lines += ["## Contact sheets and previews", ""]
        for p in sheets[:24]:
            rel = p.relative_to(out.parent) if p.is_relative_to(out.parent) else p
            lines += [f"![{p.stem}]({rel})", ""]
    gallery = run / "samples" / "index.html"
    if gallery.is_file():
        lines += ["## Samples", "", f"Gallery: [{gallery.relative_to(run)}]({gallery.relative_to(run)})", ""]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out
