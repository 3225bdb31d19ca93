"""Ingest decode throughput and peak memory against a single-process MONAI LoadImage + Resize loop.

    python benchmarks/bench_ingest.py [--files 600] [--size 256] [--out 64] [--workers 2] [--demo]

Writes `--files` uncompressed 256x256 MONOCHROME2 DICOM files (fake identifiers) into a temp folder
(or, with --demo, generates the built-in demo study at that size: ~30% RLE, nested folders, junk) and
measures, each in a fresh subprocess so that peak memory (max RSS, workers included) is its own:

  monai : for each file: monai LoadImage(PydicomReader) + Resize to (out, out), single process
  serial: fewscan build_store in this process only (workers=1, no cache): CPU seconds per file
  cold  : fewscan build_store, `--workers` processes, decode cache off (pool start-up included)
  fill  : the same with the decode cache on and empty (decode + cache write: a first ingest)
  warm  : the same ingest again with the decode cache filled (re-ingest)

Prints files/s and the ratio to the MONAI loop. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_files(root: Path, n: int, size: int) -> None:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rng = np.random.default_rng(0)
    rows = ["Image Index,Finding Labels,Patient ID"]
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"BENCH{i // 3:05d}"
        ds.Modality = "DX"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        name = f"{i:08d}.dcm"
        p = root / "dicom" / f"p{i // 3:05d}" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p, enforce_file_format=True)
        rows.append(f"{name},{'No Finding' if i % 2 else 'Mass'},{ds.PatientID}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def peak_mb() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((self_kb + kids_kb) / 1024, 1)


def cpu_s() -> float:
    """User+system CPU seconds of this process and its (finished) worker processes."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_monai(root: Path, out: int) -> dict:
    import numpy as np
    from monai.transforms import LoadImage, Resize

    from pipeline.ingest.discover import discover

    files = [c.path for c in discover(root / "dicom") if c.fmt == "dicom"]
    load = LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)
    resize = Resize(spatial_size=(out, out), mode="area")
    t0, c0 = time.perf_counter(), cpu_s()
    ok = 0
    for f in files:
        try:
            x = resize(load(str(f)))
            _ = np.asarray(x, dtype=np.float16)
            ok += 1
        except Exception:
            pass
    dt, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {"files": len(files), "ok": ok, "seconds": round(dt, 3), "files_per_s": round(len(files) / dt, 1),
            "cpu_s": round(cpu, 3), "files_per_cpu_s": round(len(files) / cpu, 1), "peak_mb": peak_mb()}  # fmt: skip


def run_fewscan(root: Path, out: int, workers: int, cache: bool, labels: str) -> dict:
    from pipeline.ingest.build import build_store
    from pipeline.ingest.manifest import IngestConfig

    cfg = IngestConfig.model_validate({
        "name": "bench", "scans": {"root": str(root / "dicom")},
        "labels": {"path": str(root / labels), "key_column": "Image Index", "label_column": "Finding Labels",
                   "patient_column": "Patient ID"},
        "preprocess": {"image_size": [out, out]}, "workers": workers,
        "cache_dir": str(root / "cache") if cache else None,
        "salt_file": str(root / "salt"), "local_report_dir": str(root / "reports"),
    })  # fmt: skip
    t0, c0 = time.perf_counter(), cpu_s()
    s = build_store(cfg, root / f"out-{os.getpid()}")
    dt, cpu = time.perf_counter() - t0, cpu_s() - c0  # the pool has exited: its workers are counted
    return {"files": s.n_files, "images": s.n_images, "cached": s.cached, "seconds": round(dt, 3),
            "files_per_s": round(s.n_files / dt, 1), "cpu_s": round(cpu, 3),
            "files_per_cpu_s": round(s.n_files / cpu, 1), "peak_mb": peak_mb()}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    root = Path(args.root)
    if args.mode == "monai":
        res = run_monai(root, args.out)
    else:
        res = run_fewscan(root, args.out, args.workers, cache=args.mode == "warm", labels="labels.csv")
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=int, default=64, help="stored image size (both sides resize to out x out)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--demo", action="store_true", help="use the built-in demo study instead of plain files")
    ap.add_argument("--mode", choices=["monai", "cold", "warm"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="fewscan-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        if args.demo:
            from pipeline.demodata.generate import generate_study

            generate_study(root, n_images=args.files, size=args.size, workers=args.workers, min_per_finding=5)
        else:
            write_files(root, args.files, args.size)
        print(
            f"data: {'demo study' if args.demo else 'uncompressed DICOM'} {args.files} x {args.size}^2 in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        results = {}
        # fill = first ingest with the decode cache on (decode + cache write); warm = the re-ingest
        runs = (("monai", "monai", args.workers), ("serial", "cold", 1), ("cold", "cold", args.workers),
                ("fill", "warm", args.workers), ("warm", "warm", args.workers))  # fmt: skip
        for mode, arg, w in runs:
            cmd = [sys.executable, __file__, "--mode", arg, "--root", str(root), "--out", str(args.out), "--workers", str(w)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
            results[mode] = json.loads(line[7:])
            print(f"{mode:5s}: {results[mode]}", flush=True)
        base = results["monai"]["files_per_s"]
        print(json.dumps({
            "machine": f"{platform.processor() or platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
            "cold_files_per_s": results["cold"]["files_per_s"], "fill_files_per_s": results["fill"]["files_per_s"],
            "warm_files_per_s": results["warm"]["files_per_s"],
            "monai_files_per_s": base, "cold_vs_monai": round(results["cold"]["files_per_s"] / base, 2),
            "fill_vs_monai": round(results["fill"]["files_per_s"] / base, 2),
            "warm_vs_monai": round(results["warm"]["files_per_s"] / base, 2),
            "load_average_1min": round(os.getloadavg()[0], 1),
            # CPU time is only complete for in-process runs (monai, serial): pool workers are children
            # of the forkserver, not of this process, so their CPU is not in RUSAGE_CHILDREN
            "files_per_cpu_s": {k: results[k]["files_per_cpu_s"] for k in ("monai", "serial")},
            "serial_vs_monai_per_cpu_s": round(results["serial"]["files_per_cpu_s"] / results["monai"]["files_per_cpu_s"], 2),
            "peak_mb": {k: v["peak_mb"] for k, v in results.items()},
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
