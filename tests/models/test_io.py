from dataclasses import dataclass

import pytest
import torch

from sorakit.models.io import load_pretrained, register, save_pretrained


@dataclass
class LinearConfig:
    dim: int = 4


@register("test_linear")
class Linear(torch.nn.Module):
    config_class = LinearConfig

    def __init__(self, config: LinearConfig):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(config.dim, config.dim)


def test_round_trip_rebuilds_from_the_directory_alone(tmp_path):
    model = Linear(LinearConfig(dim=3))
    save_pretrained(model, tmp_path / "m", extra={"note": "hi"})
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.dim == 3
    assert torch.equal(loaded.proj.weight, model.proj.weight)


def test_wrong_kind_and_missing_dir_are_clear_errors(tmp_path):
    save_pretrained(Linear(LinearConfig()), tmp_path / "m")
    with pytest.raises(ValueError, match="holds a test_linear model, expected vae"):
        load_pretrained(tmp_path / "m", kind="vae")
    with pytest.raises(FileNotFoundError, match="not a sorakit model directory"):
        load_pretrained(tmp_path / "nothing")
