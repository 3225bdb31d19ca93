"""The evaluate stage's command-line options and how they map onto its config section.

Apart from `stage.py` (which re-exports them) because they import neither torch nor mlflow: the CLI builds
its parser and validates the command line, the suite and the manifest before it imports either, so that a
config error is reported at once (docs/CONTRACTS.md, "Stage modules").
"""

from __future__ import annotations

import argparse

from pipeline.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluate options (override the suite's evaluate: section)")
    g.add_argument("--seeds", dest="ev_seeds", metavar="S[,S...]", help="evaluation seeds, e.g. 0,1,2")
    g.add_argument(
        "--max-episodes",
        dest="ev_max_episodes",
        type=int,
        metavar="N",
        help="test episodes per kind and k_shot",
    )
    g.add_argument(
        "--methods", dest="ev_methods", metavar="M[,M...]", help="meta-trained methods to evaluate"
    )
    g.add_argument(
        "--val-episodes", dest="ev_val_episodes", type=int, metavar="N", help="validation episodes per group"
    )


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ConfigError(f"{flag} takes integers separated by commas, e.g. 0,1,2 (got '{text}')") from None


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    if getattr(args, "ev_seeds", None):
        out.append(f"seeds={_ints(args.ev_seeds, '--seeds')}")
    if getattr(args, "ev_max_episodes", None) is not None:
        out.append(f"max_episodes={args.ev_max_episodes}")
    if getattr(args, "ev_methods", None):
        names = [m.strip() for m in args.ev_methods.split(",") if m.strip()]
        out.append(f"methods=[{','.join(names)}]")
    if getattr(args, "ev_val_episodes", None) is not None:
        out.append(f"val_episodes={args.ev_val_episodes}")
    return out
