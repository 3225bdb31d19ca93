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


def test_duplicate_yaml_key_is_an_error_naming_key_and_line(tmp_path: Path) -> None:
    from pipeline.config import read_yaml

    p = tmp_path / "suite.yaml"
    p.write_text("name: x\nepisodes:\n  k_shot: [1]\n  n_way: 2\n  k_shot: [5]\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'k_shot' on line 5 \(first given on line 3\)"):
        read_yaml(p)
    top = tmp_path / "manifest.yaml"
    top.write_text("name: a\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name' on line 2"):
        read_yaml(top)
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: {x: 1}\nb: {x: 2}\nc: [1, 1]\n")
    assert read_yaml(ok) == {"a": {"x": 1}, "b": {"x": 2}, "c": [1, 1]}
