"""`fewscan make-demo-data`: the command-line face of `generate_study` (wired in by pipeline/cli.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

# the defaults only: the generator (numpy, pydicom) is imported when it runs, not to build --help
from pipeline.demodata.defaults import DEFAULT_CONSPICUITY, DEFAULT_MIN_PER_FINDING, MODALITIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("demo_data"), help="output folder (default: demo_data)"
    )
    parser.add_argument("--images", type=int, default=3000, help="labelled images (CT: series); default 3000")
    parser.add_argument("--patients", type=int, default=None,
                        help="number of patients (default: follows from ~2.5 images per patient)")  # fmt: skip
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    parser.add_argument(
        "--modality", choices=MODALITIES, default="DX", help="DX or CR radiographs, or CT series"
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: available CPU cores)")
    parser.add_argument("--min-per-finding", type=int, default=DEFAULT_MIN_PER_FINDING,
                        help=f"floor of images per finding (default {DEFAULT_MIN_PER_FINDING})")  # fmt: skip
    parser.add_argument("--conspicuity", type=float, default=DEFAULT_CONSPICUITY,
                        help="how strongly findings show against the anatomy, a factor on what they draw "
                        f"(default {DEFAULT_CONSPICUITY}; 1 = as faint as the anatomy model draws them)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pipeline.demodata.generate import generate_study, one_line

    summary = generate_study(
        args.out,
        n_images=args.images,
        size=args.size,
        seed=args.seed,
        modality=args.modality,
        workers=args.workers,
        min_per_finding=getattr(args, "min_per_finding", DEFAULT_MIN_PER_FINDING),
        n_patients=args.patients,
        conspicuity=args.conspicuity,
    )
    print(one_line(summary), flush=True)
    return 0
