"""Synthetic scans and a tiny meta-model for the adapt tests. Every identifier here is fake (no PHI).

The task family: 32x32 radiograph-like noise fields, "normal" (`No Finding`) or carrying one bright
pattern. The meta-model is meta-trained (first-order MAML, a few dozen outer steps) on binary tasks
"pattern vs normal" for bars, squares and crosses; the adapt tests use a pattern it never saw (a disc,
standing in for a rare condition), so what the query accuracy shows is adaptation, not recall.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

SIZE = 32
NORMAL = "No Finding"
CONDITION = "Hernia"
TRAIN_PATTERNS = ("bar_h", "bar_v", "square", "cross")


def preprocessing(size: int | None = None) -> dict[str, Any]:
    """The `preprocessing` dict an ingest of these scans records (as pipeline.ingest.build does)."""
    size = size or SIZE
    from pipeline.ingest.manifest import PreprocessConfig
    from pipeline.ingest.preprocess import PREPROCESS_VERSION

    prep = PreprocessConfig(image_size=[size, size], voi="minmax").model_dump(mode="json")
    prep["version"] = PREPROCESS_VERSION
    prep["dtype"] = "float16"
    return prep


def render(pattern: str, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
    """(size, size) float in [0, 1]: smooth background + noise, plus the pattern (none for 'normal')."""
    size = size or SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = 0.3 + 0.1 * (yy / size) + rng.normal(0, 0.06, (size, size))
    cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
    if pattern == "disc":
        img += 0.45 * (((yy - cy) ** 2 + (xx - cx) ** 2) < (size * 0.16) ** 2)
    elif pattern == "bar_h":
        img += 0.45 * (np.abs(yy - cy) < 2)
    elif pattern == "bar_v":
        img += 0.45 * (np.abs(xx - cx) < 2)
    elif pattern == "square":
        img += 0.45 * ((np.abs(yy - cy) < 5) & (np.abs(xx - cx) < 5))
    elif pattern == "cross":
        img += 0.45 * (
            ((np.abs(yy - cy) < 1.5) & (np.abs(xx - cx) < 7))
            | ((np.abs(xx - cx) < 1.5) & (np.abs(yy - cy) < 7))
        )
    elif pattern != "normal":
        raise ValueError(pattern)
    return np.clip(img, 0, 1)


def as_model_input(img: np.ndarray) -> np.ndarray:
    """What ingest would store for the image (min-max to [0, 1], float16 precision), (1, H, W) float32."""
    lo, hi = img.min(), img.max()
    x = (img - lo) / (hi - lo if hi > lo else 1.0)
    return x.astype(np.float16).astype(np.float32)[None]


def dicom_image(px: np.ndarray, sop_class: str, *, study: str, series: str) -> Dataset:
    """A 12-bit MONOCHROME2 DICOM dataset holding `px` (uint16), with fresh instance UIDs; the caller
    sets patient, modality and geometry. Shared by the 2D and the series (3D) writers."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    return ds


def write_dicom(path: Path, img: np.ndarray, *, patient_id: str, modality: str = "DX") -> Path:
    """`img` in [0, 1] as a 12-bit MONOCHROME2 DICOM with fake identifiers."""
    px = np.round(img * 4000).astype(np.uint16)
    ds = dicom_image(px, SecondaryCaptureImageStorage, study=generate_uid(), series=generate_uid())
    ds.PatientID = patient_id
    ds.PatientName = "Synthetic^Adapttest"
    ds.Modality = modality
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_set(
    root: Path, counts: dict[str, int], seed: int, *, first_patient: int = 0, modality: str = "DX"
) -> Path:
    """A class-folder set: counts {class: n}; the condition is a disc, 'No Finding' is normal."""
    rng = np.random.default_rng(seed)
    pid = first_patient
    for cls, n in counts.items():
        pattern = "normal" if cls == NORMAL else "disc"
        for i in range(n):
            write_dicom(
                root / cls / f"scan_{i:03d}.dcm",
                render(pattern, rng),
                patient_id=f"SYN{pid:05d}",
                modality=modality,
            )
            pid += 1
    return root


def meta_train_tiny(
    folder: Path, *, seed: int = 0, outer_steps: int = 40, extra: dict[str, Any] | None = None
) -> Path:
    """Meta-train a small Conv-4 with first-order MAML on the training patterns; save it as a meta-model."""
    from pipeline.meta.algorithms import InnerConfig, MetaLearner, make_algorithm
    from pipeline.meta.model_io import save_meta_model
    from pipeline.meta.models import ModelSpec, build_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    spec = ModelSpec(backbone="conv4", filters=8, blocks=3, norm="group", norm_groups=4, head="shared")
    model = build_model(spec, 1, (SIZE, SIZE))
    inner = InnerConfig(steps=3, eval_steps=8, lr=0.3, second_order=False)
    learner = MetaLearner(model, make_algorithm("fomaml", inner), inner)
    opt = torch.optim.Adam(learner.parameters(), lr=3e-3)
    tasks, k, q = 4, 3, 4

    def episode() -> tuple[torch.Tensor, ...]:
        pat = TRAIN_PATTERNS[int(rng.integers(len(TRAIN_PATTERNS)))]
        xs, ys, xq, yq = [], [], [], []
        for label, p in enumerate((pat, "normal")):
            for j in range(k + q):
                x = as_model_input(render(p, rng))
                (xs if j < k else xq).append(x)
                (ys if j < k else yq).append(label)
        return tuple(
            torch.from_numpy(np.stack(a)) if isinstance(a[0], np.ndarray) else torch.tensor(a)
            for a in (xs, ys, xq, yq)
        )

    for _ in range(outer_steps):
        eps = [episode() for _ in range(tasks)]
        batch = [torch.stack([e[i] for e in eps]) for i in range(4)]
        loss, _acc = learner.meta_loss(*batch, n_way=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_meta_model(
        folder,
        model,
        method="fomaml",
        model_spec=spec,
        image_shape=(1, SIZE, SIZE),
        inner={"steps": 3, "eval_steps": 8, "lr": 0.3, "trainable": "all", "second_order": False},
        extra={"preprocessing": preprocessing(), "label_names": [*TRAIN_PATTERNS, NORMAL], **(extra or {})},
    )


def make_upstream_runs(
    meta_model_dir: Path, *, seen_patients: list[str] = (), suite: str = "adapttest"
) -> dict[str, str]:
    """In the current tracking store: an ingest run (store.json + scan index of DX scans, whose patients
    include `seen_patients`) and a meta-train run holding `meta_model_dir` as models/fomaml, as the real
    stages lay them out. Returns their run ids."""
    import json
    import shutil

    import pandas as pd

    from pipeline import tracking
    from pipeline.ingest.deid import load_or_create_salt, salt_id, salted_key

    salt = load_or_create_salt(Path(".fewscan/salt"))
    with tracking.stage_run(
        "ingest",
        run_name="ingest synthetic",
        config={},
        upstream={},
        fp="i" * 24,
        suite=None,
        dataset="synthetic",
    ) as run:
        store = run.outdir / "store"
        store.mkdir()
        pats = [salted_key(salt, "patient", p) for p in [*seen_patients, "SYN77777", "SYN77778"]]
        pd.DataFrame(
            {"scan_key": [f"{i:016x}" for i in range(len(pats))], "patient_key": pats, "modality": "DX"}
        ).to_parquet(store / "scan_index.parquet")
        (store / "store.json").write_text(
            json.dumps({"preprocessing": preprocessing(), "normal_label": NORMAL, "salt_id": salt_id(salt)})
        )
        ingest_id = run.run_id
    ing = tracking.UpstreamRun.from_id(ingest_id, "ingest")
    with tracking.stage_run(
        "meta-train",
        run_name="meta-train synthetic",
        config={"methods": ["fomaml"]},
        upstream={},
        fp="m" * 24,
        suite=suite,
        dataset="synthetic",
    ) as run:
        dst = run.outdir / "models" / "fomaml"
        shutil.copytree(meta_model_dir, dst)
        # what meta-train records of its ingest (pipeline/metatrain/stage.py ingest_facts_of): adapt reads
        # these from the meta-model alone
        meta = json.loads((dst / "meta_model.json").read_text())
        meta["ingest_run_id"] = ing.run_id
        meta["schema_version"] = 2
        meta["ingest"] = {
            "run_id": ing.run_id,
            "preprocessing": preprocessing(),
            "modalities": ["DX"],
            "normal_label": NORMAL,
            "salt_id": salt_id(salt),
            "n_patients": len(set(pats)),
            "patients_file": "ingest_patients.txt",
        }
        (dst / "meta_model.json").write_text(json.dumps(meta))
        (dst / "ingest_patients.txt").write_text("".join(f"{k}\n" for k in sorted(set(pats))))
        mt_id = run.run_id
    return {"ingest": ingest_id, "meta-train": mt_id}


def phi_strings(*roots: Path) -> set[str]:
    """What must never reach MLflow from these sets: patient ids/names, file names, folder paths."""
    import pydicom

    out: set[str] = set()
    for root in roots:
        out.add(str(root))
        for p in root.rglob("*"):
            if p.is_file():
                out.add(p.name)
                try:
                    ds = pydicom.dcmread(p, stop_before_pixels=True)
                except Exception:  # noqa: BLE001 - junk files are part of the sets on purpose
                    continue
                out.update(
                    {str(ds.PatientID), str(ds.PatientName), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)}
                )
    return out


def store_blobs(root: Path) -> list[bytes]:
    """Every row of the SQLite tracking store and every artifact byte under ./mlflow."""
    import sqlite3

    con = sqlite3.connect(root / "mlflow" / "mlflow.db")
    blobs = []
    for (table,) in con.execute("select name from sqlite_master where type='table'"):
        for row in con.execute(f'select * from "{table}"'):
            blobs.append(" ".join(str(v) for v in row).encode())
    con.close()
    blobs += [p.read_bytes() for p in (root / "mlflow" / "artifacts").rglob("*") if p.is_file()]
    return blobs
