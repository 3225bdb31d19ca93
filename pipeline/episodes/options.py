"""The episodes stage's command-line options and how they map onto its config section.

Apart from `stage.py` (which re-exports them) because they import neither torch nor mlflow: the CLI builds
its parser and validates the command line, the suite and the manifest before it imports either, so that a
config error is reported at once (docs/CONTRACTS.md, "Stage modules").
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.errors import ConfigError


def compose_section(section: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The suite's episodes section with command-line overrides applied (pipeline/suite.py calls it). An
    n_way given on the command line (`--n-way`) with no n_way episodes in `kinds` would do nothing; it is
    refused with the fix, instead of silently building binary episodes only."""
    from pipeline.config import apply_overrides

    given = apply_overrides({}, overrides)
    out = apply_overrides(section, overrides)
    kinds = out.get("kinds", ["binary", "n_way"])
    if "n_way" in given and isinstance(kinds, list) and "n_way" not in kinds:
        raise ConfigError(
            f"--n-way {given['n_way']} sets the size of n_way episodes, but the episodes' kinds are {kinds}: "
            "add --kinds binary,n_way (or --kinds n_way), or leave --n-way out"
        )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("episodes options (override the suite's episodes: section)")
    g.add_argument("--k-shot", dest="ep_k_shot", metavar="K[,K...]", help="support scans per class, e.g. 1,5")
    g.add_argument("--q-query", dest="ep_q_query", type=int, metavar="Q", help="query scans per class")
    g.add_argument("--n-way", dest="ep_n_way", type=int, metavar="N", help="classes of n_way episodes")
    g.add_argument("--kinds", dest="ep_kinds", metavar="KIND[,KIND]", help="binary, n_way or binary,n_way")
    g.add_argument(
        "--val-episodes", dest="ep_val_episodes", type=int, metavar="N", help="per kind and k_shot"
    )
    g.add_argument(
        "--test-episodes", dest="ep_test_episodes", type=int, metavar="N", help="per kind and k_shot"
    )
    g.add_argument(
        "--episode-seed", dest="ep_seed", type=int, metavar="SEED", help="seed of split and episodes"
    )
    g.add_argument(
        "--on-insufficient",
        dest="ep_on_insufficient",
        choices=("fail", "drop"),
        help="too few patients: fail|drop",
    )


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag} takes integers separated by commas, e.g. 1,5 (got '{text}')") from None


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if getattr(args, "ep_k_shot", None):
        out.append(f"k_shot={_int_list(args.ep_k_shot, '--k-shot')}")
    if getattr(args, "ep_kinds", None):
        kinds = [k.strip() for k in args.ep_kinds.split(",") if k.strip()]
        out.append(f"kinds=[{','.join(kinds)}]")
    for dest, key in (
        ("ep_q_query", "q_query"),
        ("ep_n_way", "n_way"),
        ("ep_val_episodes", "val_episodes"),
        ("ep_test_episodes", "test_episodes"),
        ("ep_seed", "seed"),
        ("ep_on_insufficient", "on_insufficient"),
    ):
        v = getattr(args, dest, None)
        if v is not None:
            out.append(f"{key}={v}")
    return out
