"""Shared fixtures. Every test makes its own data: nothing is downloaded."""

from __future__ import annotations

import os

import pytest

# Tests run tiny models on 2 shared CPU cores: one torch thread per process is several times faster
# there (a second OpenMP thread mostly spin-waits for a core), and the CLI runs the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A small toy-world training set: 8 real H.264 clips with JSON sidecars."""
    from sorakit.data.toyworld import make_toyworld

    out = tmp_path_factory.mktemp("toyworld")
    make_toyworld(out, num_clips=8, seed=0, split="train")
    return out


@pytest.fixture(scope="session")
def toy_shards(toy_world, tmp_path_factory):
    """`toy_world` ingested into WebDataset shards: 2 shards of 4 captioned clips, with manifest.json."""
    from sorakit.data.ingest import IngestConfig, ingest

    out = tmp_path_factory.mktemp("toy_shards")
    result = ingest([str(toy_world)], out, IngestConfig(samples_per_shard=4, workers=1))
    assert result.node_samples == 8, result.manifest
    return out
