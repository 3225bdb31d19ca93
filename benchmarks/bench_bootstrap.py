"""Benchmark of the patient-level bootstrap comparison (pipeline/evaluate/summary.py `compare`): four
methods, 600 binary episodes x 20 queries drawn from 463 scans of 202 patients, 2000 resamples. Prints its
figures; never part of the test run (tests/evaluate/test_bootstrap.py checks, without a clock, that the
Python work does not grow with the resamples).

    python benchmarks/bench_bootstrap.py [--repeats 5] [--resamples 2000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.evaluate import summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/

# the test's builder of binary episodes with planted correctness: one definition of the fixture data
from tests.evaluate.test_bootstrap import _outcomes as outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=2000)
    a = ap.parse_args()
    rng = np.random.default_rng(4)
    keys = rng.integers(0, 463, size=(600, 20))
    patient_of = {str(k): f"p{k % 202}" for k in range(463)}
    outs = {m: outcomes(rng.random((600, 20)) < 0.6, keys) for m in ("a", "b", "c", "d")}
    scans = summary.slot_scans(next(iter(outs.values())))
    assert scans is not None
    slots = {slot: patient_of[k] for slot, k in scans.items()}
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        summary.compare(
            {m: summary.episode_acc_over_seeds([o]) for m, o in outs.items()},
            {m: summary.query_correct_over_seeds([o]) for m, o in outs.items()},
            slots,
            resamples=a.resamples,
            seed=0,
        )
        times.append(time.perf_counter() - t0)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(
        f"compare: 4 methods, 600 episodes x 20 queries, 202 patients, {a.resamples} resamples: "
        f"median {np.median(times):.3f} s, min {min(times):.3f} s over {a.repeats} repeats"
    )


if __name__ == "__main__":
    main()
