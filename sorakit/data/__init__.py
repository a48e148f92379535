"""Data: the toy world, ingest of raw videos into WebDataset shards, and the shard reader.

`from sorakit.data import clip_pipeline` is what training stages use; the submodules import
lazily so that `sorakit --help` and the shard tools stay fast.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "clip_pipeline": "sorakit.data.reader",
    "decode_sample": "sorakit.data.reader",
    "list_shards": "sorakit.data.shards",
    "iter_tar_samples": "sorakit.data.shards",
    "write_tar_atomic": "sorakit.data.shards",
    "read_manifest": "sorakit.data.shards",
    "write_manifest": "sorakit.data.shards",
    "merge_manifests": "sorakit.data.shards",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sorakit.data' has no attribute {name!r}")
