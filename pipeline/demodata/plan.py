"""The study plan: which patient has which images, with which findings, when, on which vendor, where.

Planning is separate from rendering so that it is cheap, fully deterministic from the seed, and the
same whatever the number of worker processes. Each image carries its own RNG stream key, so rendering
in any order or process gives byte-identical pixels.

Patients: the images of each finding are grouped into patients by their rarest label (1-3 disease
images per patient, mean 1.5, so a finding with 40 images spans ~27 patients); abnormal patients also
get normal follow-ups, and the remaining normal images form normal-only patients. Patient numbering is
shuffled so that an id does not reveal a condition. A patient's findings keep their location and
shape across follow-ups (drawn from a per-patient stream), as a real lesion would.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np

from pipeline.demodata.phi import Identity, age_at, make_identities
from pipeline.demodata.prevalence import FINDINGS, NORMAL, assign_label_sets, target_counts
from pipeline.demodata.vendors import VENDORS
from pipeline.errors import ConfigError

DISEASE_GROUP_SIZES = (1, 2, 3)  # disease images per patient and finding; mean 1.5
NORMAL_SHARE_ON_ABNORMAL_PATIENTS = 0.35  # normal images that are follow-ups of abnormal patients
HOME_VENDOR_PROB = 0.75  # otherwise the image was taken elsewhere (portable, another site)
AP_PROB = 0.4  # NIH: 40% AP (portable), 60% PA


@dataclass(frozen=True)
class PatientPlan:
    index: int  # stable RNG stream key (main patients first, then adapt patients)
    identity: Identity
    home_vendor: int


@dataclass(frozen=True)
class ImagePlan:
    index: int  # stable RNG stream key
    patient: PatientPlan
    follow_up: int
    labels: tuple[str, ...]  # sorted by table order; () = normal
    study_date: dt.date
    study_time: str  # HHMMSS
    accession: str
    vendor: int  # index into VENDORS (2D) or ct.CT_VENDORS (CT)
    view: str  # "PA" | "AP" (CT: "")
    rle: bool
    rel_path: str  # relative to the output folder; a file (2D) or a series folder (CT)
    image_index: str  # labels.csv "Image Index" == basename of rel_path
    role: str = "study"  # "study" | "support" | "query"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def finding_labels(self) -> str:
        return "|".join(self.labels) if self.labels else NORMAL

    @property
    def age(self) -> int:
        return age_at(self.patient.identity.birth_date, self.study_date)


def _groups(n: int, rng: np.random.Generator) -> list[int]:
    """Split n disease images into ceil(n / 1.5) patients of 1-3 images each (random sizes).

    A fixed number of patients (not a random one) guarantees the floor's patient count for every seed:
    40 images -> 27 patients, 20 -> 14.
    """
    if n == 0:
        return []
    g = -(-2 * n // 3)  # ceil(n / 1.5)
    sizes = np.ones(g, dtype=np.int64)
    for _ in range(n - g):  # n - g <= 2 g, so a slot below 3 always exists
        open_ = np.flatnonzero(sizes < max(DISEASE_GROUP_SIZES))
        sizes[open_[int(rng.integers(len(open_)))]] += 1
    return [int(x) for x in sizes]


def plan_patients_labels(
    n_images: int, min_per_finding: int, n_patients: int | None, rng: np.random.Generator
) -> list[list[tuple[str, ...]]]:
    """Per patient, the label sets of its images in chronological order (before ids/dates/vendors)."""
    counts, n_normal = target_counts(n_images, min_per_finding)
    sets = assign_label_sets(counts, n_images - n_normal, rng)
    rank = {f: i for i, f in enumerate(FINDINGS)}
    by_primary: dict[str, list[tuple[str, ...]]] = {f: [] for f in FINDINGS}
    for s in sets:
        by_primary[max(s, key=rank.__getitem__)].append(tuple(s))
    patients: list[list[tuple[str, ...]]] = []
    for f in FINDINGS:
        imgs = by_primary[f]
        at = 0
        for size in _groups(len(imgs), rng):
            patients.append(imgs[at : at + size])
            at += size
    n_abnormal_patients = len(patients)
    attach = int(round(n_normal * NORMAL_SHARE_ON_ABNORMAL_PATIENTS)) if patients else 0
    if n_patients is not None:
        if n_patients < n_abnormal_patients + (1 if n_normal - attach > 0 else 0):
            raise ConfigError(
                f"--patients {n_patients} is too few: the finding floor alone needs {n_abnormal_patients} "
                f"patients; raise --patients or omit it"
            )
        n_normal_only = n_patients - n_abnormal_patients
        if n_normal_only > n_normal:
            raise ConfigError(f"--patients {n_patients} is too many for {n_images} images")
        attach = min(attach, n_normal - n_normal_only)
    # Normal follow-ups of abnormal patients: before (baseline) or after (resolved) the disease images.
    for _ in range(attach):
        p = patients[int(rng.integers(n_abnormal_patients))]
        pos = 0 if rng.random() < 0.5 else len(p)
        p.insert(pos, ())
    rest = n_normal - attach
    sizes: list[int] = []
    if n_patients is None:
        while sum(sizes) < rest:
            sizes.append(1 + int(rng.poisson(1.5)))
        if sizes:
            sizes[-1] -= sum(sizes) - rest
    else:
        k = n_patients - n_abnormal_patients
        sizes = [int(x) for x in 1 + rng.multinomial(rest - k, np.full(k, 1 / k))] if k else []
    patients.extend([()] * s for s in sizes if s > 0)
    order = rng.permutation(len(patients))  # ids must not reveal the condition
    return [patients[i] for i in order]


def _file_name(vendor_naming: str, patient_no: int, follow_up: int, image_no: int) -> str:
    if vendor_naming == "nih":
        return f"{patient_no:08d}_{follow_up:03d}.dcm"
    return f"I{image_no:07d}"


def realize(
    label_plan: list[list[tuple[str, ...]]],
    rng: np.random.Generator,
    *,
    first_patient: int = 0,
    first_image: int = 0,
    root: str = "dicom",
    role: str = "study",
    ct: bool = False,
    n_vendors: int = len(VENDORS),
    vendor_weights: tuple[float, ...] | None = None,
    rle_fractions: tuple[float, ...] | None = None,
    flat_dirs: dict[tuple[str, ...], str] | None = None,
) -> tuple[list[PatientPlan], list[ImagePlan]]:
    """Give the planned patients identities, dates, vendors, views and file paths."""
    weights = np.array(vendor_weights or [v.weight for v in VENDORS], dtype=float)
    weights /= weights.sum()
    rles = rle_fractions or tuple(v.rle_fraction for v in VENDORS)
    naming = [VENDORS[i % len(VENDORS)].naming for i in range(n_vendors)]
    identities = make_identities(len(label_plan), rng)
    patients, images = [], []
    image_no = first_image
    for p_i, (ident, visits) in enumerate(zip(identities, label_plan)):
        patient = PatientPlan(first_patient + p_i, ident, int(rng.choice(n_vendors, p=weights)))
        patients.append(patient)
        day = dt.date(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
        for fu, labels in enumerate(visits):
            if fu:
                day = day + dt.timedelta(days=1 + int(rng.exponential(90)))
            vendor = patient.home_vendor if rng.random() < HOME_VENDOR_PROB else int(rng.integers(n_vendors))
            view = "" if ct else ("AP" if rng.random() < AP_PROB else "PA")
            time = f"{int(rng.integers(7, 20)):02d}{int(rng.integers(60)):02d}{int(rng.integers(60)):02d}"
            accession = f"A{int(rng.integers(10**8, 10**9))}"
            series = 1 + int(rng.integers(0, 3))
            name = _file_name(naming[vendor], first_patient + p_i + 1, fu, image_no + 1)
            modality = "CT" if ct else "XR"
            study_dir = f"{root}/{ident.patient_id}/{day.strftime('%Y%m%d')}_{accession}"
            if ct:  # the series folder is the labelled unit
                name = f"{first_patient + p_i + 1:08d}_{fu:03d}"
                folder = flat_dirs[labels] if flat_dirs is not None else study_dir
            elif flat_dirs is not None:
                name = f"{first_patient + p_i + 1:08d}_{fu:03d}.dcm"
                folder = flat_dirs[labels]
            else:
                folder = f"{study_dir}/SE{series:03d}_{modality}"
            images.append(
                ImagePlan(
                    index=image_no,
                    patient=patient,
                    follow_up=fu,
                    labels=labels,
                    study_date=day,
                    study_time=time,
                    accession=accession,
                    vendor=vendor,
                    view=view,
                    rle=bool(rng.random() < rles[vendor]),
                    rel_path=f"{folder}/{name}",
                    image_index=name,
                    role=role,
                    extra={"series_number": series},
                )
            )
            image_no += 1
    return patients, images
