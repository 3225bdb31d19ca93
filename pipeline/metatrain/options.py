"""The meta-train stage's command-line options and how they map onto its config section.

Apart from `stage.py` (which re-exports them) because they import neither torch nor mlflow: the CLI builds
its parser and validates the command line, the suite and the manifest before it imports either, so that a
config error is reported at once (docs/CONTRACTS.md, "Stage modules").
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.errors import ConfigError
from pipeline.progress import log


def compose_section(section: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The suite's meta_train section with command-line overrides applied (pipeline/suite.py calls it), so
    that a flag replaces what it names instead of clashing with it: `--seeds` replaces the suite's older
    single `seed:` (and `--set seed=N` its `seeds:`), which would otherwise be refused together; `--methods`
    leaves out the suite's `train_episodes.per_method` settings of methods it does not train, which would
    otherwise be refused as naming methods not in `methods`. Both are logged."""
    from pipeline.config import apply_overrides

    given = apply_overrides({}, overrides)
    out = apply_overrides(section, overrides)
    for new, old in (("seeds", "seed"), ("seed", "seeds")):
        if new in given and old not in given and old in out:
            log(f"meta-train: the command line gives {new}; the suite's meta_train.{old} is replaced")
            del out[old]
    per_method = (out.get("train_episodes") or {}).get("per_method")
    if "methods" in given and isinstance(per_method, dict) and isinstance(given["methods"], list):
        stray = sorted(m for m in per_method if m not in given["methods"])
        if stray:
            log(
                f"meta-train: --methods {','.join(map(str, given['methods']))}: the suite's "
                f"train_episodes.per_method settings of {', '.join(stray)} are not used"
            )
            out["train_episodes"] = {
                **out["train_episodes"],
                "per_method": {m: v for m, v in per_method.items() if m not in stray},
            }
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("meta-train options (override the suite's meta_train: section)")
    g.add_argument(
        "--methods", dest="mt_methods", metavar="M[,M...]", help="e.g. maml,protonet (first = primary)"
    )
    g.add_argument("--steps", dest="mt_steps", type=int, metavar="N", help="outer steps per method")
    g.add_argument(
        "--inner-steps", dest="mt_inner_steps", type=int, metavar="N", help="inner steps in training"
    )
    g.add_argument("--meta-batch", dest="mt_meta_batch", type=int, metavar="T", help="tasks per outer step")
    g.add_argument(
        "--second-order",
        dest="mt_second_order",
        action="store_true",
        default=None,
        help="full second-order meta-gradient",
    )
    g.add_argument("--device", dest="mt_device", metavar="DEV", help="auto, cpu, cuda, cuda:N")
    g.add_argument(
        "--seeds",
        dest="mt_seeds",
        metavar="S[,S...]",
        help="meta-training seeds, e.g. 0,1,2 (first = registered)",
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if getattr(args, "mt_methods", None):
        out.append(f"methods=[{','.join(m.strip() for m in args.mt_methods.split(',') if m.strip())}]")
    for dest, key in (
        ("mt_steps", "outer.steps"),
        ("mt_inner_steps", "inner.steps"),
        ("mt_meta_batch", "meta_batch"),
        ("mt_device", "device"),
    ):
        v = getattr(args, dest, None)
        if v is not None:
            out.append(f"{key}={v}")
    if getattr(args, "mt_second_order", None):
        out.append("inner.second_order=true")
    if getattr(args, "mt_seeds", None):
        try:
            seeds = [int(x) for x in args.mt_seeds.replace(" ", "").split(",") if x]
        except ValueError:
            raise ConfigError(
                f"--seeds takes integers separated by commas, e.g. 0,1,2 (got '{args.mt_seeds}')"
            ) from None
        out.append(f"seeds={seeds}")
    return out
