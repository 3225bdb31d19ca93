"""Shared fixtures of the adapt tests: a tiny meta-trained model and synthetic support/query sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.adapt import helpers as h


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """32x32 Conv-4 forwards are tiny: on the shared 2-core CI machine, intra-op threads only contend
    (measured: 130 ms per single-scan forward with 2 threads under load, 14 ms with 1)."""
    threads = torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    # a stage without `threads:` sizes torch from OMP_NUM_THREADS (pipeline/cpus.py): one thread there too
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session")
def meta_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Conv-4 meta-trained (FO-MAML, 25 outer steps) on bars/squares/crosses vs normal; never saw discs."""
    return h.meta_train_tiny(tmp_path_factory.mktemp("meta") / "fomaml", outer_steps=25)


@pytest.fixture(scope="session")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """5-shot support (patients SYN00000-09) and a 2x15 query of other patients (SYN01000-...)."""
    root = tmp_path_factory.mktemp("sets")
    return {
        "support": h.write_set(root / "support", {h.CONDITION: 5, h.NORMAL: 5}, seed=11),
        "query": h.write_set(root / "query", {h.CONDITION: 15, h.NORMAL: 15}, seed=12, first_patient=1000),
    }
