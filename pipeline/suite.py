"""Suite files (`tasks/<suite>.yaml`) and data manifests: finding them and validating them.

A suite names its data manifest and holds one section per stage; each section is validated by that
stage's own config model, so an unknown key is reported with the section it is in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import field_validator

from pipeline import stage_configs
from pipeline.config import StrictModel, apply_overrides, read_yaml, validate
from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


class SuiteConfig(StrictModel):
    name: str
    description: str = ""
    dataset: str  # path of the data manifest (relative to the working directory, or the repo's own)
    episodes: dict[str, Any] = {}
    meta_train: dict[str, Any] = {}
    adapt: dict[str, Any] | None = None
    evaluate: dict[str, Any] = {}
    # Only for the built-in suites: how `fewscan demo` generates their data (keyword arguments of
    # pipeline.demodata.generate.generate_study, plus `out`, the folder the manifest points at).
    demo_data: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("use letters, digits, '_', '-', '.' only (it names the MLflow experiment)")
        return v


def find_file(ref: str | Path, folder: str) -> Path:
    """`ref` as a path, else `<cwd>/<folder>/<ref>.yaml`, else the repo's own `<folder>/<ref>.yaml`."""
    p = Path(ref)
    candidates = [p]
    if p.suffix not in (".yaml", ".yml"):
        candidates += [Path(folder) / f"{ref}.yaml", REPO_ROOT / folder / f"{ref}.yaml"]
    else:
        candidates += [REPO_ROOT / p] if not p.is_absolute() else []
    for c in candidates:
        if c.is_file():
            return c
    listing = (
        sorted(x.stem for x in (REPO_ROOT / folder).glob("*.yaml")) if (REPO_ROOT / folder).is_dir() else []
    )
    raise ConfigError(
        f"cannot find '{ref}': tried {', '.join(str(c) for c in candidates)}. "
        f"Give a path to a YAML file" + (f", or one of: {', '.join(listing)}" if listing else "")
    )


@dataclass
class Suite:
    path: Path
    cfg: SuiteConfig
    raw: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def manifest_path(self) -> Path:
        return find_file(self.cfg.dataset, "data_manifests")

    def stage_config(self, stage: str, extra_overrides: list[str] | None = None) -> Any:
        """The validated config of one stage (ingest: the data manifest). Imports the stage's config model
        only, not the stage (torch, mlflow): commands validate every config before those imports."""
        section = stage_configs.spec(stage).section
        if section is None:  # ingest: the data manifest
            return load_manifest(self.manifest_path, extra_overrides)
        data = getattr(self.cfg, section) or {}
        if extra_overrides:
            data = override_section(stage, data, extra_overrides)
        return validate(data, stage_configs.config_model(stage), f"{self.path} (section '{section}')")


def override_section(stage: str, section: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """One stage's section with command-line overrides applied, through the stage's `compose_section` hook
    when it has one, so that an override does not silently combine with suite values that belong to what
    it replaces (e.g. `adapt --support DIR` and the suite's query set of another support set; docs/tasks.md,
    "Command-line overrides")."""
    hook = getattr(stage_configs.options(stage), "compose_section", None)
    if hook is None:
        return apply_overrides(section, overrides)
    return dict(hook(dict(section), list(overrides)))


def _override_suite(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` overrides of a whole suite (`fewscan run --set`); each stage section's go
    through `override_section`, the rest (name, dataset, ...) are applied as they are."""
    by_section = {section: stage for stage, section in stage_configs.SECTIONS.items()}
    rest: list[str] = []
    mine: dict[str, list[str]] = {}
    for o in overrides:
        head, dot, tail = o.strip().partition(".")
        if dot and head in by_section and "=" not in head:
            mine.setdefault(head, []).append(tail)
        else:
            rest.append(o)
    out = apply_overrides(raw, rest) if rest else dict(raw)
    for section, items in mine.items():
        current = out.get(section)
        out[section] = override_section(
            by_section[section], current if isinstance(current, dict) else {}, items
        )
    return out


def load_suite(ref: str | Path, overrides: list[str] | None = None) -> Suite:
    path = find_file(ref, "tasks")
    raw = read_yaml(path)
    if overrides:
        raw = _override_suite(raw, overrides)
    cfg = validate(raw, SuiteConfig, str(path))
    return Suite(path=path, cfg=cfg, raw=raw)


def load_manifest(path: str | Path, overrides: list[str] | None = None) -> Any:
    p = find_file(path, "data_manifests")
    data = read_yaml(p)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, stage_configs.config_model("ingest"), str(p))


def dataset_name(manifest_cfg: Any, manifest_path: Path) -> str:
    return str(getattr(manifest_cfg, "name", None) or manifest_path.stem)
