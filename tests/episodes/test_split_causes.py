"""When the split leaves a pool short of patients, the error names the cause: which pool rule took which
patients into which pool, and which held-out conditions made it (docs/tasks.md, "Patient pools")."""

from __future__ import annotations

import pytest

from pipeline.episodes.config import EpisodesConfig
from pipeline.episodes.labels import LabelTable
from pipeline.episodes.split import build_split
from pipeline.errors import DataError

from .helpers import NORMAL, index_from_rows, patients

N = NORMAL


def _error(rows, **cfg) -> str:
    with pytest.raises(DataError) as err:
        build_split(LabelTable.from_index(index_from_rows(rows), N), EpisodesConfig(**cfg))
    return str(err.value)


def test_a_patient_column_shared_across_classes_empties_the_train_pool_and_says_why() -> None:
    # Omniglot with the drawer number as the patient: drawer d drew every character, so each drawer has a
    # test-alphabet drawing and rule 1 takes all of them into the test pool.
    chars = [f"{a}/c{c}" for a in ("Greek", "Latin", "Korean") for c in range(3)]
    rows = [(drawer, ch) for ch in chars for drawer in range(8)]
    msg = _error(
        rows,
        split={"rare": [c for c in chars if c.startswith("Korean")]},
        kinds=["n_way"],
        n_way=2,
        k_shot=1,
        q_query=1,
        val_episodes=0,
    )
    assert "train pool: 0 patients." in msg
    assert "Of the 8 patients with a scan of a common condition, 0 are in it." in msg
    assert (
        "Rule 1 (a patient with any scan of a rare condition -> test) took 8 of them into the test pool, because "
        "they also have scans of rare conditions (patients per condition: Korean/c0 (8), Korean/c1 (8), "
        "Korean/c2 (8))." in msg
    )
    assert "median of 9 distinct conditions" in msg and "labels.patient_column" in msg
    assert "not enough patients" in msg  # the counts table is still there, the cause comes with it


def test_a_common_condition_that_loses_patients_to_validation_names_rule_2() -> None:
    # 5 of Effusion's 7 patients also have an Emphysema (validation) scan
    rows = patients(5, "Effusion|Emphysema", 0) + patients(2, "Effusion", 10)
    rows += patients(8, "Mass", 20) + patients(8, "Hernia", 30) + patients(8, "Nodule", 40)
    msg = _error(
        rows,
        split={"common": ["Effusion", "Mass"], "validation": ["Emphysema", "Nodule"], "rare": ["Hernia"]},
        kinds=["binary"],
        k_shot=1,
        q_query=2,
        val_episodes=0,
        normal_fraction={"train": 1.0, "val": 0.0, "test": 0.0},
    )
    # the cause of the Effusion shortage; the test pool's normal shortage is explained too (rule 4)
    assert (
        "train pool: 10 patients. Of the 15 patients with a scan of a common condition, 10 are in it." in msg
    )
    assert "Rule 2 (else, a patient with any scan of a validation condition -> val) took 5 of them" in msg
    assert "Emphysema (5)" in msg
    assert "test pool:" in msg and "gave it 0 of 0" in msg
    assert "labels.patient_column" not in msg  # only when a pool lost every patient


def test_normal_fraction_that_gives_a_pool_no_normal_patients_names_rule_4() -> None:
    rows = patients(8, "Effusion", 0) + patients(8, "Hernia", 100) + patients(40, N, 200)
    msg = _error(
        rows,
        split={"common": ["Effusion"], "rare": ["Hernia"]},
        kinds=["binary"],
        k_shot=1,
        q_query=2,
        val_episodes=0,
        normal_fraction={"train": 0.0, "val": 0.0, "test": 1.0},
    )
    assert "train pool: 8 patients." in msg
    assert (
        "Rule 4 (patients without a scan of a used condition, shared by normal_fraction train 0 / val 0 / "
        in msg
    )
    assert "gave it 0 of 40." in msg


def test_too_few_conditions_error_explains_the_pool_too() -> None:
    # every Mass patient also has Hernia (rare): the common split keeps Effusion only, n_way 2 needs 2
    rows = patients(6, "Mass|Hernia", 0) + patients(6, "Effusion", 10) + patients(6, "Edema", 20)
    rows += patients(6, "Hernia", 30)
    msg = _error(
        rows,
        split={"common": ["Mass", "Effusion"], "rare": ["Hernia", "Edema"]},
        kinds=["n_way"],
        n_way=2,
        k_shot=1,
        q_query=2,
        val_episodes=0,
        on_insufficient="drop",
    )
    assert "common (meta-train) split has 1 usable condition(s) ['Effusion'] (Mass dropped" in msg
    assert (
        "Rule 1 (a patient with any scan of a rare condition -> test) took 6 of them into the test pool"
        in msg
    )
    assert "Hernia (6)" in msg
