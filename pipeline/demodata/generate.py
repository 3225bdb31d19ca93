"""Generate the built-in study: plan (cheap, serial) -> render + write (process pool) -> labels.

`generate_study` is the entry point (`fewscan make-demo-data` and `fewscan demo` call it). Planning
draws from one stream (seed, 0); each image renders from its own streams (see `render.py`), so the
pixels are byte-identical for a seed whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from multiprocessing.context import BaseContext
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.cpus import available_cpus
from pipeline.demodata import ct as ctmod
from pipeline.demodata.defaults import DEFAULT_MIN_PER_FINDING, MODALITIES
from pipeline.demodata.dicomio import write_radiograph, write_text_sr
from pipeline.demodata.labels import label_row, write_labels
from pipeline.demodata.plan import ImagePlan, plan_patients_labels, realize
from pipeline.demodata.prevalence import FINDINGS, NORMAL
from pipeline.demodata.render import DEFAULT_CONSPICUITY, render_radiograph
from pipeline.demodata.vendors import VENDORS
from pipeline.errors import ConfigError, DataError
from pipeline.progress import log, progress

JUNK_RATE = 0.01
JUNK_KINDS = ("truncated", "sr", "not_dicom", "missing_image")
CHUNK = 16  # images per pool task: amortises pickling, keeps progress lively


def _station(im: ImagePlan) -> str:
    """Portable units take the AP films; each vendor's fixed room the PA ones."""
    if im.view == "AP":
        return ("ED-PORTABLE", "ICU-PORT1")[im.index % 2]
    return ("XR-ROOM1", "XR-ROOM2", "OPD-DR", "XR-ROOM3")[im.vendor % 4]


def _write_chunk(
    seed: int,
    size: int,
    modality: str,
    out: str,
    chunk: list[ImagePlan],
    conspicuity: float = DEFAULT_CONSPICUITY,
) -> list[dict]:
    """Worker: render and write a chunk of planned images; returns what was written."""
    done = []
    for im in chunk:
        path = Path(out) / im.rel_path
        if modality == "CT":
            info = ctmod.write_series(seed, im, size, path)
        else:
            vendor = VENDORS[im.vendor]
            stored, hdr = render_radiograph(
                seed, im.patient.index, im.index, im.labels, im.view, size, vendor, conspicuity
            )
            write_radiograph(seed, im, path, modality, stored, hdr, vendor, _station(im))
            info = {"files": 1, "spacing": round(vendor.detector_mm / size, 4), "vendor": vendor.key,
                    "photometric": vendor.photometric, "bits": vendor.bits_stored, "rle": int(im.rle)}  # fmt: skip
        if im.extra.get("junk") == "truncated":
            target = path if path.is_file() else sorted(path.iterdir())[0]
            data = target.read_bytes()
            keep = int(len(data) * (0.35 + 0.3 * ((im.index * 7919) % 100) / 100))
            atomic.write_bytes(target, data[:keep])
        done.append({"index": im.index, **info})
    return done


OWN_FILES = ("labels.csv", "study.json", ".fewscan-demo.json", "salt")
# "*.part": the temp names of the generator before pipeline/atomic.py, still accepted in a folder it wrote
OWN_ENTRIES = {"dicom", "adapt", *OWN_FILES, "labels.csv.part", "study.json.part", "salt.part"}
# a write killed midway leaves its temp file beside the target, named `.<target>.<random>.tmp` by atomic.py
_OWN_TEMP = re.compile(r"\.(?:{})\.\w+\.tmp".format("|".join(map(re.escape, OWN_FILES))))
_REPLACED = ("labels.csv", "study.json", "labels.csv.part", "study.json.part")  # the salt and marker stay
DEMO_SALT_FILE = "salt"


def demo_salt(seed: int) -> str:
    """The salt of the synthetic study: derived from the generator seed, public, the same on every machine.

    Why: the split into common / validation / rare pools and the episodes are drawn from patients ordered by
    their salted keys, so a random salt per working folder (the default for real data, where it must stay
    secret) gives every fresh checkout another split and other numbers than the README's. The demo's
    patients are invented, so a fixed salt protects nothing and buys reproducible demo results.
    """
    import hashlib

    return hashlib.sha256(f"fewscan-demo-salt\x00{int(seed)}".encode()).hexdigest()


def write_demo_salt(out: Path, seed: int) -> Path:
    """Write (or repair) `<out>/salt` for the study generated with `seed`; returns its path."""
    path = Path(out) / DEMO_SALT_FILE
    want = demo_salt(seed) + "\n"
    if not path.is_file() or path.read_text() != want:
        atomic.write_text(path, want)
    return path


def _mp_context() -> BaseContext:
    """fork when this process has no other Python threads (fast, and works from a REPL or stdin);
    spawn otherwise (forking a threaded process can deadlock). Workers use only numpy/scipy/pydicom."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    return mp.get_context("spawn")


def _is_own(name: str) -> bool:
    return name in OWN_ENTRIES or _OWN_TEMP.fullmatch(name) is not None


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder that holds anything else; replace a previous (or partial) study."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; --out must name a folder")
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if not _is_own(p.name))
        if foreign:
            raise DataError(
                f"{out} holds files that are not a generated study ({', '.join(foreign[:3])}); "
                f"choose an empty or new folder for --out"
            )
        for sub in ("dicom", "adapt"):
            shutil.rmtree(out / sub, ignore_errors=True)
        for p in out.iterdir():
            if p.name in _REPLACED or _OWN_TEMP.fullmatch(p.name):
                p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _plan_junk(images: list[ImagePlan], patients_normal_only: list[list[ImagePlan]], rng: np.random.Generator,
               first_image: int) -> tuple[list[ImagePlan], list[dict]]:  # fmt: skip
    """Extra images that are broken (truncated file, or a label row without its file) and stray files."""
    n = max(len(JUNK_KINDS), int(round(JUNK_RATE * len(images))))
    extra_images: list[ImagePlan] = []
    strays: list[dict] = []
    next_fu: dict[int, int] = {}
    for j in range(n):
        kind = JUNK_KINDS[j % len(JUNK_KINDS)]
        if kind in ("truncated", "missing_image"):
            pool = patients_normal_only or [[im] for im in images]
            last = pool[int(rng.integers(len(pool)))][-1]
            fu = next_fu.get(last.patient.index, last.follow_up + 1)
            next_fu[last.patient.index] = fu + 1
            idx = first_image + len(extra_images)
            base = last.rel_path.rsplit("/", 1)[0]
            name = f"{last.patient.index + 1:08d}_{fu:03d}" + (
                ".dcm" if last.image_index.endswith(".dcm") else ""
            )
            extra_images.append(
                replace(
                    last,
                    index=idx,
                    follow_up=fu,
                    labels=(),
                    rel_path=f"{base}/{name}",
                    image_index=name,
                    extra={**last.extra, "junk": kind},
                )  # fmt: skip
            )
        else:
            host = images[int(rng.integers(len(images)))]
            strays.append({"kind": kind, "host": host, "n": j})
    return extra_images, strays


def _write_strays(seed: int, out: Path, strays: list[dict], rng: np.random.Generator, ct: bool) -> None:
    for s in strays:
        host: ImagePlan = s["host"]
        # 2D: dicom/<pid>/<date_acc>/<series>/<file>; CT: dicom/<pid>/<date_acc>/<series folder>
        study_dir = out / host.rel_path.rsplit("/", 1 if ct else 2)[0]
        study_dir.mkdir(parents=True, exist_ok=True)
        if s["kind"] == "sr":
            text = (
                "No acute cardiopulmonary process."
                if not host.labels
                else f"Findings: {', '.join(host.labels)}."
            )
            write_text_sr(
                seed, replace(host, index=1_000_000 + s["n"]), study_dir / f"SR{s['n']:06d}.dcm", text
            )
        elif s["n"] % 2:  # an export log next to the images
            atomic.write_text(study_dir / "EXPORT.LOG", "export job finished\nfiles: see index\n")
        else:  # a stray binary blob with an image-like name and no DICOM preamble
            atomic.write_bytes(study_dir / f"I9{s['n']:06d}", rng.bytes(2048))


def generate_study(
    out_dir: Path,
    *,
    n_images: int,
    size: int = 256,
    seed: int = 0,
    modality: str = "DX",
    workers: int | None = None,
    min_per_finding: int = DEFAULT_MIN_PER_FINDING,
    adapt_condition: str = "Hernia",
    adapt_support_per_class: int = 10,
    adapt_query_per_class: int = 20,
    n_patients: int | None = None,
    conspicuity: float = DEFAULT_CONSPICUITY,
) -> dict:
    """Write the synthetic study under `out_dir`; return a summary (counts, patients, files, junk, seconds).

    `n_images` labelled images (CT: series), each finding >= `min_per_finding` images; `adapt/` holds
    `adapt_*_per_class` images of `adapt_condition` and of No Finding from fresh patients (one image
    each, support and query patient-disjoint and absent from labels.csv). `conspicuity` scales how strongly
    the findings show (radiographs only; pipeline/demodata/render.py says why the default is 3).
    """
    t0 = time.monotonic()
    out = Path(out_dir)
    if modality not in MODALITIES:
        raise ConfigError(f"modality={modality!r}: choose one of {', '.join(MODALITIES)}")
    if not 0 < conspicuity <= 20:
        raise ConfigError(
            f"conspicuity={conspicuity}: choose a factor in (0, 20]; 1 draws findings as faint as the anatomy model does"
        )
    if size < 32 or size > 2048:
        raise ConfigError(f"size={size}: choose 32..2048 pixels")
    if adapt_condition not in FINDINGS:
        raise ConfigError(f"adapt_condition={adapt_condition!r}: choose one of {', '.join(FINDINGS)}")
    if adapt_support_per_class < 0 or adapt_query_per_class < 0:
        raise ConfigError("adapt_support_per_class and adapt_query_per_class must be >= 0")
    ct = modality == "CT"
    n_vendors = len(ctmod.CT_VENDORS) if ct else len(VENDORS)
    vkw = dict(n_vendors=n_vendors, ct=ct,
               vendor_weights=tuple(v.weight for v in ctmod.CT_VENDORS) if ct else None,
               rle_fractions=tuple(v.rle_fraction for v in ctmod.CT_VENDORS) if ct else None)  # fmt: skip
    rng = np.random.default_rng([seed, 0])
    label_plan = plan_patients_labels(n_images, min_per_finding, n_patients, rng)
    patients, images = realize(label_plan, rng, **vkw)  # type: ignore[arg-type]
    adapt: list[ImagePlan] = []
    for role, k in (("support", adapt_support_per_class), ("query", adapt_query_per_class)):
        dirs = {(adapt_condition,): f"adapt/{role}/{adapt_condition}", (): f"adapt/{role}/{NORMAL}"}
        fresh = [[(adapt_condition,)]] * k + [[()]] * k
        order = rng.permutation(len(fresh))
        ps, ims = realize([fresh[i] for i in order], rng, first_patient=len(patients) + len(adapt),
                          first_image=len(images) + len(adapt), role=role, flat_dirs=dirs, **vkw)  # type: ignore[arg-type]  # fmt: skip
        adapt.extend(ims)
    by_patient: dict[int, list[ImagePlan]] = {}
    for im in images:
        by_patient.setdefault(im.patient.index, []).append(im)
    normal_only = [v for v in by_patient.values() if all(not im.labels for im in v)]
    junk_images, strays = _plan_junk(images, normal_only, rng, first_image=len(images) + len(adapt) + 1000)
    _prepare_out(out)
    to_write = images + adapt + [im for im in junk_images if im.extra["junk"] == "truncated"]
    n_workers = workers if workers is not None else min(available_cpus(), 8)
    n_workers = max(1, n_workers)
    log(f"demo study: {len(images)} {'series' if ct else 'images'} of {size}x{size} {modality}, "
        f"{len(by_patient)} patients, + {len(adapt)} adapt, {len(junk_images) + len(strays)} junk; "
        f"{n_workers} worker(s) -> {out}")  # fmt: skip
    chunks = [to_write[i : i + CHUNK] for i in range(0, len(to_write), CHUNK)]
    results: list[dict] = []
    if n_workers == 1 or len(chunks) <= 2:
        for ch in progress(chunks, total=len(chunks), desc="writing DICOM (chunks)"):
            results.extend(_write_chunk(seed, size, modality, str(out), ch, conspicuity))
    else:
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context()) as pool:
            futs = [
                pool.submit(_write_chunk, seed, size, modality, str(out), ch, conspicuity) for ch in chunks
            ]
            for fut in progress(as_completed(futs), total=len(futs), desc="writing DICOM (chunks)"):
                results.extend(fut.result())
    _write_strays(seed, out, strays, rng, ct)
    info = {r["index"]: r for r in results}
    rows = []
    for im in images + junk_images:
        r = info.get(im.index, {"spacing": round(VENDORS[0].detector_mm / size, 4)})
        rows.append(label_row(im, size, size, r["spacing"]))
    write_labels(out / "labels.csv", rows)
    counts = Counter(lab for im in images for lab in im.labels)
    pats = {f: len({im.patient.index for im in images if f in im.labels}) for f in FINDINGS}
    junk_counts = Counter(im.extra["junk"] for im in junk_images) + Counter(s["kind"] for s in strays)
    study_results = [info[im.index] for im in images]
    summary = {
        "modality": modality,
        "size": size,
        "seed": seed,
        "n_images": len(images),
        "n_patients": len(by_patient),
        "counts": {NORMAL: sum(1 for im in images if not im.labels), **{f: counts[f] for f in FINDINGS}},
        "patients_per_finding": pats,
        "multi_label_images": sum(1 for im in images if len(im.labels) > 1),
        "files": sum(r["files"] for r in results) + sum(1 for _ in strays),
        "junk": dict(junk_counts),
        "vendors": dict(Counter(r["vendor"] for r in study_results)),
        "rle_files": sum(r["rle"] for r in results),
        "adapt": {
            "condition": adapt_condition,
            "support_per_class": adapt_support_per_class,
            "query_per_class": adapt_query_per_class,
            "patients": len({im.patient.index for im in adapt}),
        },
        "labels_csv_rows": len(rows),
        "seconds": round(time.monotonic() - t0, 2),
    }
    params = {"n_images": n_images, "size": size, "seed": seed, "modality": modality, "workers": n_workers,
              "min_per_finding": min_per_finding, "adapt_condition": adapt_condition,
              "adapt_support_per_class": adapt_support_per_class,
              "adapt_query_per_class": adapt_query_per_class, "n_patients": n_patients,
              "conspicuity": conspicuity, "labels_unit": "series" if ct else "image"}  # fmt: skip
    study = {"generator": "fewscan.demodata", "parameters": params, "summary": summary}
    atomic.write_json(out / "study.json", study, indent=2)
    write_demo_salt(out, seed)
    return summary


def one_line(summary: dict) -> str:
    """The command's closing line."""
    c = summary["counts"]
    rare = min(reversed(FINDINGS), key=lambda f: c[f])  # ties at the floor: the table's rarest
    unit = "series" if summary["modality"] == "CT" else "images"
    return (
        f"demo study: {summary['n_images']} {unit} ({c[NORMAL]} normal, {len(FINDINGS)} findings, rarest "
        f"{rare}={c[rare]} from {summary['patients_per_finding'][rare]} patients), {summary['n_patients']} "
        f"patients, {summary['files']} files, {sum(summary['junk'].values())} junk, "
        f"{summary['rle_files']} RLE, in {summary['seconds']:.1f}s"
    )
