"""pipeline/names.py: every condition name becomes a key MLflow accepts, and distinct names stay distinct."""

from __future__ import annotations

import re

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    _validate_metric_name,
    _validate_model_name,
    _validate_param_name,
    _validate_tag_name,
)

from pipeline.names import (
    MAX_REGISTRY_NAME,
    adapted_model_name,
    is_valid_key,
    key_part,
    key_parts,
    metric_key,
    registry_name_problem,
)

NASTY = [
    "Effusion (left)",
    "Pleural effusion/thickening",
    "Kerley-B lines",
    "No Finding",
    "Ödem",
    "肺炎",
    "Mass",
    "mass",
    "MASS ",
    "a//b",
    "../etc",
    ".",
    "???",
    "C:\\temp",
    "Tab\there",
    "x" * 400,
    "Kerley B.",
    "pneumonia: viral",
    "50% stenosis",
    "",
]


def _mlflow_accepts(key: str) -> bool:
    try:
        _validate_metric_name(key)
        _validate_param_name(key)
        _validate_tag_name(key)
    except MlflowException:
        return False
    return True


@pytest.mark.parametrize("name", NASTY)
def test_every_name_gives_a_key_mlflow_accepts(name: str) -> None:
    key = metric_key("label_images", key_part(name))
    assert _mlflow_accepts(key), key
    assert is_valid_key(key) and len(key) <= 250 and ":" not in key  # ':' breaks on Windows


def test_readable_parts() -> None:
    assert key_part("Effusion (left)") == "Effusion_left"
    assert key_part("Pleural effusion/thickening") == "Pleural effusion_thickening"
    assert key_part("Kerley-B lines") == "Kerley-B lines"
    assert key_part("No Finding") == "No Finding"
    assert key_part("Ödem") == "Ödem" and key_part("肺炎") == "肺炎"
    assert key_part("  Mass  ") == "Mass" and key_part("Kerley B.") == "Kerley B"
    assert key_part("???").startswith("unnamed_") and key_part("???") != key_part("!!!")
    long = key_part("x" * 400)
    assert len(long) <= 100 and long != key_part("x" * 401)
    # the invalid MLflow key of issue 14 now passes
    assert metric_key("label_images", "Effusion (left)") == "label_images.Effusion_left"
    # fixed identifiers pass unchanged
    assert metric_key("test", "maml", "binary", "k5", "acc") == "test.maml.binary.k5.acc"


def test_collisions_keep_every_name_distinct_and_say_so() -> None:
    names = ["Effusion (left)", "Effusion_left", "Mass", "mass", "Nodule"]
    kp = key_parts(names)
    parts = [kp[n] for n in names]
    assert len({p.casefold() for p in parts}) == len(names)  # distinct even on case-insensitive stores
    assert kp["Nodule"] == "Nodule"  # names without a collision keep their plain part
    assert kp["Mass"].startswith("Mass-") and kp["mass"].startswith("mass-")
    assert len(kp.collisions) == 2
    text = "\n".join(kp.collisions)
    assert "'Effusion (left)'" in text and "'Effusion_left'" in text and "differ only in case" in text
    # the mapping depends only on the colliding names, not on the order or the rest of the set
    assert key_parts(reversed(names))["Mass"] == kp["Mass"]
    assert key_parts(["Mass", "mass"])["Mass"] == kp["Mass"]
    assert key_parts(["Mass", "Nodule"]).collisions == []
    assert all(_mlflow_accepts(metric_key("images", p)) for p in parts)


def test_adapted_model_names_are_readable_valid_and_unique_per_suite_and_condition() -> None:
    name = adapted_model_name("demo_quick", "Pleural Thickening")
    assert re.fullmatch(r"fewscan-demo-quick-pleural-thickening-[0-9a-f]{8}", name)
    assert adapted_model_name("demo_quick", "Pleural Thickening") == name  # stable
    assert re.fullmatch(r"fewscan-s-odem-[0-9a-f]{8}", adapted_model_name("s", "Ödem"))
    # the two Chinese conditions no longer share 'fewscan-condition'
    a, b = adapted_model_name("s", "肺炎"), adapted_model_name("s", "肺癌")
    assert a != b and a.startswith("fewscan-s-condition-") and b.startswith("fewscan-s-condition-")
    # every way two pairs could share readable words: suite, case, punctuation, the join, no suite
    pairs = [
        ("chest", "Hernia"),
        ("demo_quick", "Hernia"),
        ("demo-quick", "Hernia"),
        ("chest", "hernia"),
        ("chest", "HERNIA "),
        ("a-b", "c"),
        ("a", "b-c"),
        (None, "Hernia"),
        ("chest", "Effusion (left)"),
        ("chest", "Effusion left"),
        ("chest", "Straße"),
        ("chest", "Strae"),
        ("s", "肺炎"),
        ("s", "肺癌"),
        ("s", "???"),
        ("s", "x" * 400),
        ("s", "x" * 401),
    ]
    names = [adapted_model_name(s, c) for s, c in pairs]
    assert len({n.casefold() for n in names}) == len(pairs)  # distinct even where case does not count
    for n in names:
        _validate_model_name(n)  # MLflow's own rule (raises if refused)
        assert registry_name_problem(n) is None and n == n.lower() and len(n) <= MAX_REGISTRY_NAME
    # one condition written in two Unicode normal forms (a macOS folder name is NFD) is one model
    assert adapted_model_name("s", "O\u0308dem") == adapted_model_name("s", "\u00d6dem")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("models:x", "':'"),
        ("x@current", "'@'"),
        ("..", "path"),
        ("y" * 257, "longer"),
    ],
)
def test_registry_name_problem_names_what_mlflow_or_a_model_uri_refuses(name: str, why: str) -> None:
    problem = registry_name_problem(name)
    assert problem is not None and why in problem
