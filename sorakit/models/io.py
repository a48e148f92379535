"""Self-describing model directories: `config.json` + `model.safetensors`.

A model class registers under a kind with `@register("vae")` and has a `config_class` dataclass
attribute and an `__init__(self, config)`. `load_pretrained(dir)` rebuilds it from the directory
alone, without executing any code from the directory.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sorakit import __version__
from sorakit.config import from_dict, to_dict
from sorakit.utils.fs import atomic_path, atomic_write_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# Where each kind is defined, so loading a directory imports only what it needs.
KIND_MODULES = {
    "vae": "sorakit.models.vae",
    "captioner": "sorakit.models.captioner",
    "text_encoder": "sorakit.models.text_encoder",
    "dit": "sorakit.models.dit",
    "refiner": "sorakit.models.refiner",
}

_REGISTRY: dict[str, type] = {}


def register(kind: str):
    def deco(cls):
        _REGISTRY[kind] = cls
        cls.kind = kind
        return cls

    return deco


def model_class(kind: str) -> type:
    if kind not in _REGISTRY:
        if kind not in KIND_MODULES:
            raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(sorted(KIND_MODULES))})")
        importlib.import_module(KIND_MODULES[kind])
    return _REGISTRY[kind]


def read_model_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a sorakit model directory (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if "kind" not in meta or "config" not in meta:
        raise ValueError(f"{cfg_file}: missing 'kind' or 'config'")
    return meta


def save_pretrained(model: torch.nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (a registered class) as a directory; weights first, so config.json marks completeness."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "sorakit_kind": model.kind})
    meta = {"kind": model.kind, "sorakit_version": __version__, "config": to_dict(model.config)}
    meta.update(extra or {})
    atomic_write_json(path / CONFIG_FILE, meta)
    return path


def load_pretrained(path: str | Path, kind: str | None = None, map_location: str = "cpu") -> torch.nn.Module:
    path = Path(path)
    meta = read_model_config(path)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{path}: holds a {meta['kind']} model, expected {kind}")
    cls = model_class(meta["kind"])
    config = from_dict(cls.config_class, meta["config"])
    model = cls(config)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_FILE}")
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.eval()
    return model
