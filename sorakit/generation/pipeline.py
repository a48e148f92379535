"""Pipeline directories: everything `sorakit sample --model DIR` needs, found from DIR alone.

    DIR/pipeline.json   {"format": "sorakit-pipeline", "dit": "dit", "vae": PATH,
                         "text_encoder": PATH, "refiners": [PATH, ...]}
    DIR/dit/            the DiT model directory; its config.json holds the DiffusionConfig under "diffusion"

Each PATH is a self-describing model directory, relative to DIR or absolute. `export_pipeline`
writes paths relative to DIR when they can be (so a run directory moved as a whole keeps working),
or copies the components into DIR with `copy=True` (a pipeline that travels alone).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sorakit.config import from_dict, to_dict
from sorakit.diffusion import DiffusionConfig
from sorakit.generation.refine import refiner_vae_path
from sorakit.models.io import load_pretrained, read_model_config, save_pretrained
from sorakit.utils.fs import atomic_write_json

PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT = "sorakit-pipeline"


@dataclass
class Pipeline:
    dit: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    diffusion_cfg: DiffusionConfig
    refiners: list[torch.nn.Module] = field(default_factory=list)
    # The VAE each refiner works in, in order: `vae` itself for a refiner trained in the base model's
    # latent space, another (the weightless pixels VAE) for one trained elsewhere. Not given: all `vae`.
    refiner_vaes: list[torch.nn.Module] = field(default_factory=list)
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # pipeline.json plus the DiT's extra metadata

    def __post_init__(self) -> None:
        if not self.refiner_vaes:
            self.refiner_vaes = [self.vae] * len(self.refiners)

    def to(self, device: torch.device | str) -> "Pipeline":
        for m in (self.dit, self.vae, self.text_encoder, *self.refiners, *self.refiner_vaes):
            m.to(device)
        return self


def _link(target: str | Path, base: Path) -> str:
    target = Path(target).resolve()
    try:
        return os.path.relpath(target, base.resolve())
    except ValueError:  # another drive
        return str(target)


def export_pipeline(
    out: str | Path,
    dit: torch.nn.Module,
    diffusion_cfg: DiffusionConfig,
    vae: str | Path,
    text_encoder: str | Path,
    refiners: list[str | Path] = (),
    *,
    copy: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the DiT (with its diffusion config) into OUT/dit and OUT/pipeline.json pointing at the rest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, path in [("vae", vae), ("text_encoder", text_encoder)] + [("refiner", r) for r in refiners]:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such {name} directory")
    save_pretrained(dit, out / "dit", extra={"diffusion": to_dict(diffusion_cfg), **(extra or {})})
    parts: dict[str, Any] = {}
    for name, path in [("vae", vae), ("text_encoder", text_encoder)]:
        if copy:
            shutil.copytree(path, out / name, dirs_exist_ok=True)
            parts[name] = name
        else:
            parts[name] = _link(path, out)
    refs = []
    for i, path in enumerate(refiners):
        if copy:
            shutil.copytree(path, out / f"refiner{i}", dirs_exist_ok=True)
            refs.append(f"refiner{i}")
        else:
            refs.append(_link(path, out))
    atomic_write_json(
        out / PIPELINE_FILE,
        {"format": PIPELINE_FORMAT, "dit": "dit", **parts, "refiners": refs},
    )
    return out


def read_pipeline(path: str | Path) -> dict[str, Any]:
    """pipeline.json with every component path resolved; a clear error for anything missing."""
    path = Path(path)
    file = path / PIPELINE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a sorakit pipeline directory (no {PIPELINE_FILE})")
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if meta.get("format") != PIPELINE_FORMAT:
        raise ValueError(f"{file}: format is {meta.get('format')!r}, expected {PIPELINE_FORMAT!r}")
    for key in ("dit", "vae", "text_encoder"):
        if not meta.get(key):
            raise ValueError(f"{file}: missing {key!r}")

    def resolve(p: str) -> Path:
        q = Path(p)
        q = q if q.is_absolute() else path / q
        if not q.is_dir():
            raise FileNotFoundError(f"{file}: component directory {p} does not exist ({q})")
        return q

    resolved = {k: resolve(meta[k]) for k in ("dit", "vae", "text_encoder")}
    resolved["refiners"] = [resolve(r) for r in meta.get("refiners", [])]
    return {**meta, "resolved": resolved}


def set_refiners(path: str | Path, refiners: list[str | Path]) -> list[str]:
    """Make the pipeline at `path` apply these refiner directories after its DiT, in order (replacing
    its list; an empty list clears it). Each must be a refiner whose VAE exists; paths are stored
    relative to the pipeline directory where they can be. Returns the stored paths."""
    path = Path(path)
    meta = {k: v for k, v in read_pipeline(path).items() if k != "resolved"}  # the pipeline must be valid
    refs = []
    for r in refiners:
        kind = read_model_config(r).get("kind")
        if kind != "refiner":
            raise ValueError(f"{r}: holds a {kind} model, expected a refiner")
        refiner_vae_path(r)  # the space it works in must be there when the pipeline loads
        refs.append(_link(r, path))
    atomic_write_json(path / PIPELINE_FILE, {**meta, "refiners": refs})
    return refs


def _refiner_vaes(refiners: list[Path], vae_dir: Path, vae: torch.nn.Module) -> list[torch.nn.Module]:
    """Each refiner's own VAE (recorded in its directory; the pipeline's when it records none), each
    directory loaded once and the pipeline's VAE reused."""
    loaded = {vae_dir.resolve(): vae}
    out = []
    for path in refiners:
        recorded = read_model_config(path).get("vae")
        if not recorded:
            out.append(vae)
            continue
        where = refiner_vae_path(path).resolve()
        if where not in loaded:
            loaded[where] = load_pretrained(where, kind="vae")
        out.append(loaded[where])
    return out


def load_pipeline(path: str | Path, device: torch.device | str = "cpu") -> Pipeline:
    """Load every component of a pipeline directory (weights only, no code from the directory)."""
    from sorakit.models.text_encoder import load_text_encoder

    meta = read_pipeline(path)
    r = meta["resolved"]
    dit_meta = read_model_config(r["dit"])
    if dit_meta.get("kind") != "dit":
        raise ValueError(f"{r['dit']}: holds a {dit_meta.get('kind')} model, expected dit")
    diffusion_cfg = from_dict(DiffusionConfig, dit_meta.get("diffusion", {}), "diffusion")
    vae = load_pretrained(r["vae"], kind="vae")
    pipe = Pipeline(
        dit=load_pretrained(r["dit"], kind="dit"),
        vae=vae,
        text_encoder=load_text_encoder(r["text_encoder"]).eval(),
        diffusion_cfg=diffusion_cfg,
        refiners=[load_pretrained(p, kind="refiner") for p in r["refiners"]],
        refiner_vaes=_refiner_vaes(r["refiners"], r["vae"], vae),
        path=Path(path),
        meta={**{k: v for k, v in meta.items() if k != "resolved"},
              "dit_meta": {k: v for k, v in dit_meta.items() if k != "config"}},
    )
    return pipe.to(device)
