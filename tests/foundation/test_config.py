from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import StrictModel, apply_overrides, load_yaml
from pipeline.errors import ConfigError


class Inner(StrictModel):
    k_shot: int = 1


class Outer(StrictModel):
    name: str
    inner: Inner = Inner()


def test_unknown_key_names_key_and_closest_match(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner: {k_shots: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(p, Outer)
    msg = str(e.value)
    assert "unknown key 'inner.k_shots'" in msg and "Did you mean 'k_shot'" in msg


def test_wrong_type_and_missing(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("inner: {k_shot: many}\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(p, Outer)
    assert "inner.k_shot" in str(e.value) and "'many'" in str(e.value) and "name" in str(e.value)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml", Outer)
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml", Outer)


def test_overrides_parse_yaml_values() -> None:
    out = apply_overrides({"a": {"b": 1}}, ["a.b=[1, 5]", "a.c=true", "d=text"])
    assert out == {"a": {"b": [1, 5], "c": True}, "d": "text"}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"a": 1}, ["a.b=2"])
