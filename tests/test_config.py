from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from cascade.config import ConfigError, apply_overrides, from_dict, load, parse_override, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    mlp: tuple[int, ...] = (64, 32)
    opt: Literal["adamw", "adagrad"] = "adamw"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    seed: int = 0
    inner: Inner = field(default_factory=Inner)
    path: str | None = None

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def test_from_dict_builds_nested_and_coerces():
    c = from_dict(Outer, {"seed": 3, "inner": {"lr": 1, "mlp": [8, 4]}})
    assert c.seed == 3 and c.inner.lr == 1.0 and isinstance(c.inner.lr, float)
    assert c.inner.mlp == (8, 4)
    assert to_dict(c) == {"name": "x", "seed": 3, "inner": {"lr": 1.0, "mlp": [8, 4], "opt": "adamw"}, "path": None}


def test_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError, match=r"'inner\.lrr'"):
        from_dict(Outer, {"inner": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"seed": "3"}, "seed: expected an integer"),
        ({"seed": True}, "seed: expected an integer"),
        ({"inner": {"mlp": [8, "a"]}}, r"inner.mlp\[1\]"),
        ({"inner": {"opt": "sgd"}}, "inner.opt"),
        ({"inner": 5}, "inner: expected a table"),
    ],
)
def test_wrong_types_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(Outer, data)


def test_post_init_validation_is_reported_as_config_error():
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        from_dict(Outer, {"seed": -1})


def test_overrides_parse_toml_values_and_type_check(tmp_path):
    assert parse_override("inner.mlp=[1,2]") == (["inner", "mlp"], [1, 2])
    assert parse_override("name=hello") == (["name"], "hello")
    p = tmp_path / "c.toml"
    p.write_text('seed = 1\n[inner]\nlr = 0.5\n')
    c = load(Outer, p, ["inner.lr=0.25", "path=data/x"])
    assert c.inner.lr == 0.25 and c.seed == 1 and c.path == "data/x"
    with pytest.raises(ConfigError, match="seed"):
        load(Outer, p, ["seed=1.5"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "missing.toml")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
