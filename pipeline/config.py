"""Typed, strict configuration: one pydantic model per stage and per YAML file.

Unknown keys and impossible values fail up front with a message that names the key, the bad value and
the valid choices (docs/ARCHITECTURE.md, principle 3), instead of surfacing as a KeyError deep in a stage.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at `loc` inside `model`, for 'did you mean' hints."""
    cur: Any = model
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(str(part))
        if field is None:
            return []
        cur = field.annotation
        # unwrap Optional[Model] / Model | None
        args = getattr(cur, "__args__", None)
        if args:
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            cur = models[0] if models else cur
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e.get("type") == "extra_forbidden":
            valid = _field_names(model, loc)
            hint = ""
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            if close:
                hint = f" Did you mean '{close[0]}'?"
            lines.append(f"  - unknown key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}")
        else:
            got = e.get("input")
            got_s = repr(got)
            if len(got_s) > 80:
                got_s = got_s[:77] + "..."
            lines.append(f"  - {key}: {e.get('msg')} (got {got_s})")
    return "\n".join(lines)


def validate(data: dict[str, Any], model: type[M], source: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last value
    silently, so a suite with two `k_shot:` lines would run with one of them unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' on line {line} (first given on line {first})",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file not found: {p} (check the path; relative paths resolve against {Path.cwd()})"
        )
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p} must hold a mapping of keys to values at the top level, got {type(data).__name__}"
        )
    return data


def load_yaml(path: str | Path, model: type[M], overrides: list[str] | None = None) -> M:
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, model, str(path))


def _parse_value(text: str) -> Any:
    # YAML scalars: "5" -> 5, "[1,5]" -> [1, 5], "true" -> True, "abc" -> "abc"
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (YAML-parsed values) to a nested dict, returning a new dict."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override '{item}' has an empty key")
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = {}
                cur[p] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            cur = nxt
        cur[parts[-1]] = _parse_value(raw)
    return out
