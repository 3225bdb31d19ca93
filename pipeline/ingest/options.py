"""The ingest stage's command-line options and how they map onto its config section.

Apart from `stage.py` (which re-exports them) because they import neither torch nor mlflow: the CLI builds
its parser and validates the command line, the suite and the manifest before it imports either, so that a
config error is reported at once (docs/CONTRACTS.md, "Stage modules").
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: one per CPU)")
    parser.add_argument(
        "--no-cache", action="store_true", help="decode every file again (ignore the local decode cache)"
    )


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "workers", None) is not None:
        out.append(f"workers={int(args.workers)}")
    if getattr(args, "no_cache", False):
        out.append("cache_dir=null")
    return out
