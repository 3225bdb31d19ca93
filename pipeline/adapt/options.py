"""The adapt stage's command-line options and how they map onto its config section.

Apart from `stage.py` (which re-exports them) because they import neither torch nor mlflow: the CLI builds
its parser and validates the command line, the suite and the manifest before it imports either, so that a
config error is reported at once (docs/CONTRACTS.md, "Stage modules").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.progress import log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adapt")
    g.add_argument(
        "--support", type=Path, metavar="DIR", help="support set: one subfolder per class, or a CSV"
    )
    g.add_argument("--query", type=Path, metavar="DIR", help="optional labelled query set (same layout)")
    g.add_argument("--condition", metavar="NAME", help="the positive class (a class folder name)")
    g.add_argument("--steps", type=int, metavar="N", help="inner steps (default: the meta-model's)")
    g.add_argument("--lr", type=float, metavar="X", help="inner learning rate (default: the meta-model's)")
    g.add_argument("--method", metavar="NAME", help="which method of the meta-train run (default: primary)")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for key in ("support", "query", "condition", "steps", "lr", "method"):
        v = getattr(args, key, None)
        if v is not None:
            # JSON is valid YAML: quoting keeps "No Finding: x" or "1e-3" from being reinterpreted
            out.append(f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}")
    return out


# Keys of the adapt section that belong to its support set: its query set, which class of it is the
# condition, the registry name of its model. An override naming another support set (or condition) must not
# inherit them from the suite (docs/adapt.md, "Command line and suite").
TIED_TO = {"support": ("query", "condition", "register_name"), "condition": ("register_name",)}


def compose_section(section: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The suite's adapt section with command-line overrides applied, composed (pipeline/suite.py calls it).

    When the overrides name another support set (`--support DIR`, `--set support=...`), the section's query
    set, condition and registry name, which describe the section's own support set, are not used unless the
    overrides give them too; the log says what was left out (give `--query DIR` to measure on a query set).
    Another condition alone likewise drops the section's registry name. An override that repeats the
    section's own value changes nothing."""
    from pipeline.config import apply_overrides

    given = apply_overrides({}, overrides)
    out = apply_overrides(section, overrides)
    key = next((k for k in TIED_TO if k in given and not _same(k, given[k], section.get(k))), None)
    if key is None:
        return out
    dropped = [k for k in TIED_TO[key] if k not in given and section.get(k) is not None]
    if dropped:
        how = {
            "query": "--query DIR",
            "condition": "--condition NAME",
            "register_name": "--set register_name=NAME",
        }
        what = "support set" if key == "support" else key
        one = len(dropped) == 1
        log(
            f"adapt: the command line names another {what}, so the suite's "
            f"{', '.join(f'adapt.{k}' for k in dropped)} (of its own {what}) {'is' if one else 'are'} not "
            f"used; give {' and '.join(how[k] for k in dropped)} to set {'it' if one else 'them'}"
        )
    return {k: v for k, v in out.items() if k not in dropped}


def _same(key: str, a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if key == "support":
        return bool(Path(str(a)).resolve() == Path(str(b)).resolve())
    return str(a) == str(b)
