"""Tiny generated studies shared by the demodata tests (generated once per session, in seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.demodata.generate import generate_study

TINY = dict(n_images=60, size=64, seed=3, min_per_finding=3, workers=1,
            adapt_support_per_class=2, adapt_query_per_class=3)  # fmt: skip


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "study"
    return out, generate_study(out, **TINY)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo_ct") / "study"
    summary = generate_study(out, n_images=16, size=32, seed=5, modality="CT", min_per_finding=1, workers=1,
                             adapt_support_per_class=1, adapt_query_per_class=1)  # fmt: skip
    return out, summary
