"""Shared fixtures. Every test makes its own data: nothing is downloaded."""

from __future__ import annotations

import os

import pytest

# Tests run on 2 CPU cores shared with the test runner: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A small toy-world training set: 8 real H.264 clips with JSON sidecars."""
    from sorakit.data.toyworld import make_toyworld

    out = tmp_path_factory.mktemp("toyworld")
    make_toyworld(out, num_clips=8, seed=0, split="train")
    return out
