"""Fake but realistic identities for DICOM headers: names, ids, dates, institutions, physicians.

Every name here is a common given name or surname and every institution is invented; combinations are
random, so no real person is described. The data exists so that ingest's de-identification is exercised
against headers that look like a real export (PHI must never reach MLflow).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

MALE = (
    "JAMES JOHN ROBERT MICHAEL WILLIAM DAVID RICHARD JOSEPH THOMAS CHARLES DANIEL MATTHEW ANTHONY MARK "
    "PAUL STEVEN ANDREW KENNETH JOSHUA KEVIN BRIAN GEORGE TIMOTHY RONALD JASON EDWARD JEFFREY RYAN JACOB "
    "LUIS CARLOS JOSE AHMED OMAR WEI HIROSHI RAJ ARJUN IVAN PIOTR"
).split()
FEMALE = (
    "MARY PATRICIA JENNIFER LINDA ELIZABETH BARBARA SUSAN JESSICA SARAH KAREN LISA NANCY BETTY MARGARET "
    "SANDRA ASHLEY KIMBERLY EMILY DONNA MICHELLE CAROL AMANDA MELISSA DEBORAH STEPHANIE MARIA ANA FATIMA "
    "MEI YUKI PRIYA ANYA OLGA INGRID CHLOE SOFIA AMARA LEILA NADIA HANNA"
).split()
SURNAMES = (
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ GONZALEZ "
    "WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE HARRIS SANCHEZ CLARK "
    "RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL FLORES GREEN ADAMS "
    "NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS KOWALSKI MUELLER SCHMIDT NOVAK PETROV "
    "IVANOVA TANAKA SATO KIM PARK CHEN WANG SINGH PATEL KHAN OKAFOR MENSAH HANSEN LARSEN"
).split()
INSTITUTIONS = (
    ("St. Brigid General Hospital", "12 Harbour Road, Eastport"),
    ("Riverside Community Medical Center", "400 Mill Street, Riverside"),
    ("Northgate University Hospital", "1 University Drive, Northgate"),
    ("Valley Regional Health", "88 Orchard Avenue, Greenvale"),
)


def _name(rng: np.random.Generator, sex: str) -> str:
    given = FEMALE if sex == "F" else MALE
    middle = chr(ord("A") + int(rng.integers(26)))
    return f"{SURNAMES[int(rng.integers(len(SURNAMES)))]}^{given[int(rng.integers(len(given)))]}^{middle}"


@dataclass(frozen=True)
class Identity:
    """The PHI of one patient (fake)."""

    patient_id: str  # the hospital MRN, also labels.csv's "Patient ID"
    name: str  # DICOM PN: FAMILY^GIVEN^MIDDLE
    sex: str  # "M" | "F"
    birth_date: dt.date
    institution: str
    institution_address: str
    referring_physician: str
    other_ids: str  # a second id system (e.g. the regional health number), as real exports carry


def make_identities(
    n: int, rng: np.random.Generator, first_age_range: tuple[int, int] = (18, 90)
) -> list[Identity]:
    """`n` distinct fake patients. MRNs are unique 8-digit numbers (no structure that leaks order)."""
    mrns = rng.choice(90_000_000, size=n, replace=False) + 10_000_000
    out = []
    for i in range(n):
        sex = "F" if rng.random() < 0.44 else "M"  # NIH: 56.5% male
        age = int(rng.integers(first_age_range[0], first_age_range[1] + 1))
        birth = dt.date(2018 - age, 1, 1) + dt.timedelta(days=int(rng.integers(365)))
        inst, addr = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
        phys_sex = "F" if rng.random() < 0.5 else "M"
        out.append(
            Identity(
                patient_id=f"{int(mrns[i]):08d}",
                name=_name(rng, sex),
                sex=sex,
                birth_date=birth,
                institution=inst,
                institution_address=addr,
                referring_physician=_name(rng, phys_sex),
                other_ids=f"HN{int(rng.integers(10**9)):09d}",
            )
        )
    return out


def age_at(birth: dt.date, when: dt.date) -> int:
    return when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))


def dicom_date(d: dt.date) -> str:
    return d.strftime("%Y%m%d")
