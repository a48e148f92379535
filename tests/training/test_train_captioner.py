"""`sorakit train captioner`: a tiny run end to end on toy shards, then a resume."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sorakit.cli import main
from sorakit.config import ConfigError, load_config
from sorakit.models.io import load_pretrained, read_model_config
from sorakit.models.text_encoder import load_text_encoder
from sorakit.training.captioner import TrainCaptionerConfig
from tests.data.test_captioning import make_toy_shards


def steps_logged(out) -> list[int]:
    with open(out / "logs" / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("loss")]


def test_train_export_and_resume(tmp_path):
    shards = make_toy_shards(tmp_path, 6, 3)
    out = tmp_path / "run"
    common = ["train", "captioner", "--config", "recipes/toy/captioner.yaml", "--out", str(out),
              "--set", f"data.shards={shards}", "--set", "preset=tiny", "--set", "data.batch_size=3",
              "--set", "trainer.log_every_n_steps=1", "--set", "trainer.checkpoint_every_n_steps=2",
              "--set", "optim.warmup_steps=1"]
    assert main(common + ["--set", "trainer.max_steps=2"]) == 0
    meta = read_model_config(out)
    assert meta["kind"] == "captioner" and meta["trained_steps"] == 2
    vocab = meta["config"]["text"]["vocab"]
    assert vocab and len(vocab) < 40  # trimmed to the toy captions' tokens
    model = load_pretrained(out)
    enc = load_text_encoder(out / "text_encoder")
    assert torch.allclose(enc.encode(["a red circle"]).pooled,
                          load_text_encoder(out).encode(["a red circle"]).pooled, atol=1e-6)
    assert model.config.num_frames == 2 and (out / "checkpoints" / "last.ckpt").is_file()

    # resume continues from the checkpoint's step with the saved model config
    assert main(common + ["--set", "trainer.max_steps=4", "--resume"]) == 0
    assert read_model_config(out)["trained_steps"] == 4
    assert steps_logged(out)[-1] == 3 and 2 in steps_logged(out)
    assert json.loads((out / "model_config.json").read_text())["text"]["vocab"] == vocab


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown key data.shardz"):
        load_config(TrainCaptionerConfig, "recipes/toy/captioner.yaml", ["data.shardz=x"])
    with pytest.raises(ValueError, match="batch_size"):
        load_config(TrainCaptionerConfig, "recipes/toy/captioner.yaml", ["data.batch_size=1"])
    assert main(["train", "captioner", "--config", "recipes/toy/captioner.yaml", "--set",
                 f"data.shards={tmp_path / 'none'}", "--out", str(tmp_path / "o")]) == 1


def test_ddp_training_gathers_the_ranks_clips_for_the_contrastive_loss(tmp_path):
    """Two CPU processes of two clips each train and export one model (the loss over gathered
    features is checked against one process's in tests/models/test_captioner.py)."""
    shards = make_toy_shards(tmp_path, 8, 4)
    out = tmp_path / "ddp"
    assert main(["train", "captioner", "--config", "recipes/toy/captioner.yaml", "--out", str(out),
                 "--set", f"data.shards={shards}", "--set", "preset=tiny", "--set", "data.batch_size=2",
                 "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp_spawn", "--set", "cpu_threads=1",
                 "--set", "trainer.max_steps=2", "--set", "trainer.log_every_n_steps=1",
                 "--set", "optim.warmup_steps=1"]) == 0
    assert read_model_config(out)["trained_steps"] == 2
    assert steps_logged(out) == [0, 1]
    # The weights trained in the worker processes came back: the zero-initialised motion stem moved.
    assert load_pretrained(out).motion_stem.weight.abs().max() > 0
