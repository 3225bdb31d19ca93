"""NIH ChestX-ray14-sized ingest and episodes, run as a user runs them (issue 14, "Scale").

    python benchmarks/bench_nih_scale.py [--files 112120] [--size 128] [--out 64] [--workers 2]
                                         [--data DIR] [--no-cache] [--skip-ingest]

1. Writes an NIH-shaped study into `--data` (default: a temporary folder, deleted afterwards; a folder
   given with --data is kept and its files are reused when they are already there): `--files` 8-bit
   grayscale PNG files of `--size`^2 pixels named like NIH's (`images/00000001_000.png`), and
   `Data_Entry_2017.csv` with NIH's columns (Image Index, Finding Labels '|'-separated with ChestX-ray14
   prevalence and findings clustered within patients, Follow-up #, Patient ID, Patient Age, Patient
   Gender, View Position, ...; the trailing comma of the real file included), a data manifest
   `data_manifests/nih.yaml` and a suite `tasks/nih.yaml` (binary + 3-way episodes, k in {1, 5}, q 15,
   100 val + 600 test episodes per kind and k: the suite of bench_episodes.py).
2. `fewscan ingest data_manifests/nih.yaml --workers W` in that folder (a fresh local SQLite MLflow store
   under ./mlflow, the default decode cache filled for the first time unless --no-cache): wall seconds,
   files/s and CPU-ms per file (this command and every process it started: the benchmark makes itself
   the child subreaper, so pool workers and the forkserver are counted too).
3. `fewscan episodes tasks/nih.yaml`: wall seconds of the command and the stage's own `stage_seconds`.
4. The episodes stage once more in a child process with timers around its parts (reading the ingest
   artifacts, parsing the index, split, episode building, audit, writing the files, MLflow logging),
   printed as a breakdown.

Not a test: the numbers depend on the machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSV = "Data_Entry_2017.csv"
MANIFEST = """\
# NIH ChestX-ray14-shaped synthetic study written by benchmarks/bench_nih_scale.py
name: nih
scans:
  root: images
  formats: [png]
labels:
  source: csv
  path: {csv}
  join: file_name
  key_column: Image Index
  label_column: Finding Labels
  separator: "|"
  patient_column: Patient ID
  age_column: Patient Age
  sex_column: Patient Gender
  normal_label: No Finding
preprocess:
  spatial_dims: 2
  image_size: [{out}, {out}]
  channels: 1
  normalize: unit
"""
SUITE = """\
name: nih
dataset: data_manifests/nih.yaml
episodes:
  split:
    rare: [Hernia, Pneumonia, Fibrosis, Edema]
    validation: [Emphysema, Cardiomegaly, Pleural_Thickening]
  kinds: [binary, n_way]
  n_way: 3
  k_shot: [1, 5]
  q_query: 15
  val_episodes: 100
  test_episodes: 600
  seed: 0
  on_insufficient: {on_insufficient}
"""


# ------------------------------------------------------------------------------------------- the study
def _write_pngs(args: tuple[str, list[str], int, int]) -> int:
    """Worker: write the PNG files named in `names` (smooth anatomy-like background + noise)."""
    import numpy as np
    from PIL import Image

    folder, names, size, seed = args
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 90 + 80 * np.exp(-(((xx - 0.3) ** 2 + (yy - 0.5) ** 2) / 0.05))
    base += 80 * np.exp(-(((xx - 0.7) ** 2 + (yy - 0.5) ** 2) / 0.05))
    for name in names:
        img = base + rng.normal(0, 6, (size, size)) + rng.uniform(-20, 20)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(Path(folder) / name)
    return len(names)


def write_study(root: Path, n: int, size: int, workers: int) -> float:
    """NIH-shaped PNG files + label CSV under `root`; returns seconds. Reuses complete existing data."""
    import multiprocessing as mp

    import numpy as np
    import pandas as pd

    from pipeline.episodes.synthetic import NIH_IMAGES, NIH_PATIENTS, synthetic_index

    images = root / "images"
    stamp = root / ".study.json"
    want = {"files": n, "size": size}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return 0.0
    t0 = time.perf_counter()
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    n_pat = max(1, round(n * NIH_PATIENTS / NIH_IMAGES))
    df = synthetic_index(n, n_pat, seed=0)
    # NIH names: <patient id, 8 digits>_<follow-up #, 3 digits>.png
    pid = pd.factorize(df["patient_key"], sort=True)[0] + 1
    df["pid"] = pid
    df = df.sort_values(["pid", "store_index"], kind="stable").reset_index(drop=True)
    follow = df.groupby("pid").cumcount().to_numpy()
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(df["pid"], follow)]
    rng = np.random.default_rng(1)
    age = rng.integers(1, 95, n_pat + 1)[df["pid"]]
    sex = np.where(rng.random(n_pat + 1) < 0.56, "M", "F")[df["pid"]]
    view = np.where(rng.random(n) < 0.6, "PA", "AP")
    lines = [
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    ]
    for i, name in enumerate(names):
        lines.append(
            f"{name},{df['labels'][i]},{follow[i]},{df['pid'][i]},{age[i]},{sex[i]},{view[i]},"
            f"{size},{size},0.143,0.143,"
        )
    (root / CSV).write_text("\n".join(lines) + "\n")
    step = 2000
    jobs = [(str(images), names[s : s + step], size, s) for s in range(0, n, step)]
    done = 0
    with mp.get_context("fork").Pool(max(1, workers)) as pool:
        for k in pool.imap_unordered(_write_pngs, jobs):
            done += k
            print(f"\r  writing PNG files: {done}/{n}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    stamp.write_text(json.dumps(want))
    return time.perf_counter() - t0


def write_configs(root: Path, out: int, on_insufficient: str) -> None:
    (root / "data_manifests").mkdir(exist_ok=True)
    (root / "tasks").mkdir(exist_ok=True)
    (root / "data_manifests" / "nih.yaml").write_text(MANIFEST.format(csv=CSV, out=out))
    (root / "tasks" / "nih.yaml").write_text(SUITE.format(on_insufficient=on_insufficient))


# ------------------------------------------------------------------------------------------- measuring
def become_subreaper() -> bool:
    """Orphaned descendants (the forkserver and its pool workers outlive the command that started them)
    are re-parented to this process, so that waiting for them adds their CPU time to RUSAGE_CHILDREN."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_orphans(timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fewscan(root: Path, *args: str) -> tuple[float, float, str]:
    """Run `fewscan ARGS` in `root` like a user; (wall s, CPU s of it and its descendants, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO)
    exe = shutil.which("fewscan", path=str(Path(sys.executable).parent)) or "fewscan"
    c0, t0 = children_cpu(), time.perf_counter()
    p = subprocess.run([exe, *args], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    reap_orphans()
    cpu = children_cpu() - c0
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"fewscan {' '.join(args)} failed with exit code {p.returncode}")
    return wall, cpu, p.stdout + p.stderr


def breakdown_child(root: Path) -> None:
    """In `root`: run the episodes stage through the CLI entry point with timers around its parts."""
    os.chdir(root)
    from collections import defaultdict

    import pandas as pd

    import pipeline.episodes.build as B
    import pipeline.episodes.stage as S
    from pipeline import cli, stages, tracking
    from pipeline.episodes.labels import LabelTable

    spent: dict[str, float] = defaultdict(float)
    active: list[str] = []

    def timed(fn, label):
        def wrapper(*a, **k):
            if active:  # nested in a timed part: counted there only
                return fn(*a, **k)
            active.append(label)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
                active.pop()

        return wrapper

    def wrap(obj, name, label, static=False):
        if hasattr(obj, name):
            fn = timed(getattr(obj, name), label)
            setattr(obj, name, staticmethod(fn) if static else fn)

    wrap(tracking.UpstreamRun, "artifact", "read ingest artifacts (download, parquet, store.json)")
    wrap(tracking.UpstreamRun, "read_json", "read ingest artifacts (download, parquet, store.json)")
    wrap(S.pd, "read_parquet", "read ingest artifacts (download, parquet, store.json)")
    wrap(LabelTable, "from_index", "parse the index (LabelTable)", static=True)
    wrap(B, "build_split", "condition split + pools")
    wrap(B, "fixed_episodes", "fixed val/test episodes")
    wrap(B, "audit", "leakage audit")
    wrap(S, "write_outputs", "write split.json, *.jsonl, audit")
    for name in ("log_params", "log_metrics", "set_tags"):
        wrap(tracking.StageRun, name, "MLflow: params, metrics, tags")
    wrap(S, "pool_tables", "MLflow: dataset inputs (tables + log_inputs)")
    wrap(tracking.StageRun, "log_dataset", "MLflow: dataset inputs (tables + log_inputs)")
    wrap(tracking.StageRun, "log_artifact", "MLflow: artifact upload")
    t_stage = {}
    orig = stages.execute_stage

    def exec_timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig(*a, **k)
        finally:
            t_stage["s"] = time.perf_counter() - t0

    stages.execute_stage = exec_timed
    t0 = time.perf_counter()
    cli.main(["episodes", "tasks/nih.yaml"])
    total = time.perf_counter() - t0
    known = sum(spent.values())
    rows = dict(spent)
    rows["other (run create/finish, tags, fingerprint, config)"] = t_stage["s"] - known
    print("BREAKDOWN " + json.dumps({"stage_s": t_stage["s"], "command_s": total, "parts": rows}))
    _ = pd  # pandas is imported before patching read_parquet through the stage's module


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=112_120, help="PNG files (NIH ChestX-ray14: 112,120)")
    ap.add_argument("--size", type=int, default=128, help="PNG side in pixels")
    ap.add_argument("--out", type=int, default=64, help="stored image side (preprocess.image_size)")
    ap.add_argument("--workers", type=int, default=2, help="ingest decode processes (and PNG writers)")
    ap.add_argument("--data", help="study folder to write (or reuse); default: a temporary folder")
    ap.add_argument("--no-cache", action="store_true", help="ingest with --no-cache (no decode cache)")
    ap.add_argument("--skip-ingest", action="store_true", help="reuse the ingest run already in --data")
    ap.add_argument("--breakdown-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.breakdown_child:
        breakdown_child(Path(args.breakdown_child))
        return
    reaper = become_subreaper()
    tmp = None if args.data else tempfile.mkdtemp(prefix="fewscan-nih-")
    root = Path(args.data or tmp).resolve()  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(
            f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.2f} (1 min) at start",
            flush=True,
        )
        gen = write_study(root, args.files, args.size, args.workers)
        # below NIH's size the rare conditions may lack patients for 600 episodes: drop instead of failing
        write_configs(root, args.out, "fail" if args.files >= 112_120 else "drop")
        print(f"study: {args.files} PNG files {args.size}x{args.size} in {root} "
              f"({'written in ' + format(gen, '.0f') + ' s' if gen else 'reused'})", flush=True)  # fmt: skip
        res: dict[str, object] = {"files": args.files, "size": args.size, "workers": args.workers}
        if not args.skip_ingest:
            shutil.rmtree(root / "mlflow", ignore_errors=True)
            shutil.rmtree(root / ".fewscan" / "cache", ignore_errors=True)  # a first ingest
            extra = ["--no-cache"] if args.no_cache else []
            wall, cpu, out = fewscan(root, "ingest", "data_manifests/nih.yaml", "--workers", str(args.workers), *extra)  # fmt: skip
            m = re.search(r"ingest finished in ([\d.]+) s", out)
            res["ingest"] = {
                "wall_s": round(wall, 1),
                "stage_s": float(m.group(1)) if m else None,
                "files_per_s": round(args.files / wall, 1),
                "cpu_s": round(cpu, 1) if reaper else None,
                "cpu_ms_per_file": round(cpu / args.files * 1e3, 2) if reaper else None,
                "load_average_1min_after": round(os.getloadavg()[0], 2),
            }
            print(f"ingest:   {json.dumps(res['ingest'])}", flush=True)
        wall, cpu, out = fewscan(root, "episodes", "tasks/nih.yaml")
        m = re.search(r"episodes finished in ([\d.]+) s: (.*?) \|", out)
        res["episodes"] = {"wall_s": round(wall, 1), "stage_s": float(m.group(1)) if m else None,
                           "cpu_s": round(cpu, 1), "summary": m.group(2) if m else out[-400:]}  # fmt: skip
        print(f"episodes: {json.dumps(res['episodes'])}", flush=True)
        p = subprocess.run(
            [sys.executable, __file__, "--breakdown-child", str(root)],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        )
        line = next((x for x in p.stdout.splitlines() if x.startswith("BREAKDOWN ")), None)
        if line is None:
            sys.stderr.write(p.stdout + p.stderr)
            raise SystemExit("the episodes breakdown run failed")
        bd = json.loads(line[10:])
        print(
            f"episodes stage, second run in-process: {bd['stage_s']:.2f} s (command {bd['command_s']:.2f} s)"
        )
        for k, v in sorted(bd["parts"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:7.2f} s  {k}")
        res["episodes_breakdown"] = bd
        res["load_average_1min_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(res, indent=1))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
