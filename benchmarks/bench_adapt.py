"""Benchmark: adapt and predict (issue 7 targets, CPU).

- adaptation of a 5-shot 2-class support set: <= 2 s of compute after loading
  (measured twice: in this process, `method.fit` warm median over repeats against a reference in the same
  process, a hand-written `torch.optim.SGD` loop on the same network, data and step count, as a ratio;
  and cold, in a fresh `fewscan adapt` process: the stage's own `adapt_seconds` / `adapt_cpu_seconds`);
- the whole `fewscan adapt` command, start-up to exit, as a user runs it: <= 15 s;
- prediction of 100 scans: <= 10 s (the whole `fewscan predict` command, and in-process after loading).

By default the meta-model and scans are synthetic (tests/adapt/helpers.py: a Conv-4 meta-trained for a
few FO-MAML steps, 12-bit DICOMs). `--size`/`--filters` set the geometry, e.g. the demo's. Every figure is
printed with the machine's load average: on a shared machine wall time alone says little.

    /work/venv/bin/python benchmarks/bench_adapt.py [--size 64] [--filters 32] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        GIT_PYTHON_REFRESH="quiet",
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"fewscan {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return wall, res


def bench_fit(mm_dir: Path, support: Path, steps: int, repeats: int) -> dict[str, float]:
    """Cold and warm `fit` of the engine vs a plain SGD loop on the same network and data."""
    from pipeline.adapt.listing import list_labelled
    from pipeline.adapt.scan_spec import ScanSpec
    from pipeline.adapt.support import load_labelled
    from pipeline.meta.model_io import load_meta_model
    from tests.adapt import helpers as h

    mm = load_meta_model(mm_dir)
    spec = ScanSpec(preprocessing=mm.meta.preprocessing or {}, shape=tuple(mm.image_shape))
    s = load_labelled(list_labelled(support), [h.CONDITION, h.NORMAL], spec, b"0" * 64)
    method = mm.method(steps=steps)
    t0 = time.perf_counter()
    method.fit(s.x, s.y, 2)
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        method.fit(s.x, s.y, 2)
        warm.append(time.perf_counter() - t0)

    # reference: the textbook loop (module + optimizer), same initial head policy, steps and lr
    lr = mm.meta.inner.lr
    ref = []
    for _ in range(repeats):
        net = type(mm.model)(mm.model.backbone, mm.model.feat_dim, mm.model.head_policy)
        net.load_state_dict(mm.model.state_dict())
        with torch.no_grad():  # the shared head replicated to 2 rows, as task_params does
            w, b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
            net.head = torch.nn.Linear(w.shape[1], 2)
            net.head.weight.copy_(w.expand(2, -1))
            net.head.bias.copy_(b.expand(2))
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(s.x), s.y).backward()
            opt.step()
        ref.append(time.perf_counter() - t0)
    w_med, r_med = statistics.median(warm), statistics.median(ref)
    return {
        "cold_s": cold,
        "warm_median_s": w_med,
        "sgd_loop_median_s": r_med,
        "ratio_vs_sgd_loop": w_med / r_med,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32, help="image size (the demo_quick manifest: 32)")
    ap.add_argument("--filters", type=int, default=16, help="Conv-4 width (demo_quick: 16)")
    ap.add_argument("--steps", type=int, default=10, help="inner steps at adaptation")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline import tracking
    from tests.adapt import helpers as h

    h.SIZE = args.size
    root = Path(tempfile.mkdtemp(prefix="bench-adapt-"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"geometry: 1x{args.size}x{args.size}, conv4 filters {args.filters}, {args.steps} inner steps, 5-shot 2-class"
    )
    try:
        os.chdir(root)
        support = h.write_set(root / "support", {h.CONDITION: 5, h.NORMAL: 5}, seed=1)
        query = h.write_set(root / "query", {h.CONDITION: 10, h.NORMAL: 10}, seed=2, first_patient=100)
        batch = root / "predict100"
        rng = np.random.default_rng(3)
        for i in range(100):
            h.write_dicom(
                batch / f"s{i:03d}.dcm",
                h.render("disc" if i % 2 else "normal", rng, args.size),
                patient_id=f"B{i:05d}",
            )
        mm_dir = _meta_model(h, root / "mm" / "fomaml", args.filters, args.steps)

        fit = bench_fit(mm_dir, support, args.steps, args.repeats)
        print(
            f"adapt compute: cold {fit['cold_s']:.3f} s (first call: includes torch.func's lazy imports), "
            f"warm median {fit['warm_median_s']:.3f} s; plain SGD loop {fit['sgd_loop_median_s']:.3f} s "
            f"(ratio {fit['ratio_vs_sgd_loop']:.2f}x)  [target <= 2 s]  load {os.getloadavg()[0]:.1f}"
        )

        ids = h.make_upstream_runs(mm_dir)
        # adapt without a suite files its run under the meta-model's suite, and names the model after it
        from pipeline.names import adapted_model_name

        model_uri = f"models:/{adapted_model_name('adapttest', h.CONDITION)}@current"
        tracking.store._client = None
        wall, res = _cli(
            [
                "adapt",
                "--model",
                ids["meta-train"],
                "--support",
                str(support),
                "--query",
                str(query),
                "--condition",
                h.CONDITION,
                "--steps",
                str(args.steps),
            ],
            root,
        )
        line = [ln for ln in res.stdout.splitlines() if "adapt finished" in ln]
        print(
            f"fewscan adapt (whole command, 5-shot, 20 query scans): {wall:.1f} s  [target <= 15 s]  "
            f"load {os.getloadavg()[0]:.1f}\n  {line[0][:300] if line else ''}"
        )

        out = root / "pred.csv"
        wall_p, _ = _cli(
            [
                "predict",
                "--model",
                model_uri,
                "--input",
                str(batch),
                "--output",
                str(out),
            ],
            root,
        )
        n_rows = sum(1 for _ in out.open()) - 1
        print(
            f"fewscan predict, 100 scans (whole command): {wall_p:.1f} s for {n_rows} rows  [target <= 10 s]  "
            f"load {os.getloadavg()[0]:.1f}"
        )

        from pipeline.serving import load_adapted

        t0 = time.perf_counter()
        clf = load_adapted(model_uri)
        t_load = time.perf_counter() - t0
        paths = sorted(batch.glob("*.dcm"))
        t0 = time.perf_counter()
        clf.predict_paths(paths)
        t_pred = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in paths[:20]:
            clf.predict_paths([p])
        t_single = (time.perf_counter() - t0) / 20
        print(
            f"in-process: load {t_load:.2f} s, 100 scans {t_pred:.2f} s (read+preprocess+forward), "
            f"one scan alone {t_single * 1000:.0f} ms"
        )
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _meta_model(h, folder: Path, filters: int, steps: int) -> Path:
    """The helpers' FO-MAML meta-model at this width (a few outer steps: speed does not depend on them)."""
    import json

    from pipeline.meta.models import ModelSpec

    path = h.meta_train_tiny(folder, outer_steps=5)
    if filters != 8:  # rebuild at the requested width (random init: timing only)
        from pipeline.meta.model_io import save_meta_model
        from pipeline.meta.models import build_model

        spec = ModelSpec(
            backbone="conv4", filters=filters, blocks=4 if h.SIZE >= 64 else 3, norm="group", head="shared"
        )
        shutil.rmtree(folder)
        save_meta_model(
            folder,
            build_model(spec, 1, (h.SIZE, h.SIZE)),
            method="fomaml",
            model_spec=spec,
            image_shape=(1, h.SIZE, h.SIZE),
            inner={"steps": steps, "eval_steps": steps, "lr": 0.3, "trainable": "all", "second_order": False},
            extra={"preprocessing": h.preprocessing(h.SIZE)},
        )
    meta = json.loads((path / "meta_model.json").read_text())
    assert meta["image_shape"] == [1, h.SIZE, h.SIZE]
    return path


if __name__ == "__main__":
    main()
