from dataclasses import dataclass, field
from typing import Literal

import pytest

from sorakit.config import ConfigError, from_dict, load_config, save_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    kind: Literal["a", "b"] = "a"
    dims: list[int] = field(default_factory=lambda: [1, 2])
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, f, ["inner.betas=[0.5, 0.6]", "kind=b", "path=/data"])
    assert cfg.steps == 20 and cfg.inner.lr == 0.5 and cfg.inner.betas == (0.5, 0.6)
    assert cfg.kind == "b" and cfg.path == "/data" and cfg.dims == [1, 2]


def test_int_is_accepted_where_a_float_is_expected():
    assert from_dict(Inner, {"lr": 1}).lr == 1.0


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-3` as a string; users write learning rates that way.
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: 5e-4\n")
    assert load_config(Outer, f).inner.lr == 5e-4
    assert load_config(Outer, f, ["inner.lr=2e-3"]).inner.lr == 2e-3
    with pytest.raises(ConfigError, match="inner.lr: expected a number, got 'fast'"):
        load_config(Outer, f, ["inner.lr=fast"])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 3}, "unknown key stepz"),
        ({"inner": {"lrr": 1}}, "unknown key inner.lrr"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"kind": "c"}, "not one of"),
        ({"inner": {"betas": [1]}}, "expected 2 items"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_error_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: [\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Outer, f)
    with pytest.raises(ConfigError, match="missing.yaml: no such config file"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.lr=0.25", "dims=[3]"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Outer, tmp_path / "saved.yaml") == cfg
    assert to_dict(cfg)["inner"]["betas"] == [0.9, 0.99]
