"""The evaluate tests run tiny tensors: one intra-op thread avoids OpenMP spin contention on a shared
2-core machine (measured: a tiny pretraining takes 4 s with 2 threads under load, 0.2 s with 1)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    # a stage without `threads:` sizes torch from OMP_NUM_THREADS (pipeline/cpus.py): one thread there too
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
