"""The one scan-key -> store-row mapping (pipeline/ingest/store.py RowMap), used by ImageStore.rows_for,
episodes' batches and evaluate's baselines (issue 16 item 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import DataError
from pipeline.ingest.store import ImageStore, RowMap


def _store(perm: list[int]) -> ImageStore:
    n = len(perm)
    images = np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1)  # image r holds the value r
    index = pd.DataFrame({"scan_key": [f"k{i}" for i in range(n)], "store_index": perm})
    return ImageStore(images, index, {"n_images": n})


def test_rows_follow_store_index_not_the_index_order() -> None:
    st = _store([4, 2, 0, 1, 3])
    assert st.rows_for(["k0", "k2", "k4"]).tolist() == [4, 0, 3]
    assert st.rows_for(np.array(["k1"], dtype=object)).dtype == np.int64
    assert RowMap.of(st) is RowMap.of(st)  # built once per store


def test_an_index_without_store_index_maps_to_its_own_rows() -> None:
    m = RowMap(pd.DataFrame({"scan_key": ["a", "b", "c"]}))
    assert m(["c", "a"]).tolist() == [2, 0] and len(m) == 3


def test_unknown_keys_name_how_many_and_the_fix() -> None:
    st = _store([0, 1, 2])
    with pytest.raises(DataError) as e:
        st.rows_for(["k1", "zz1", "zz2"])
    msg = str(e.value)
    assert "2 of 3 scan key(s) are not in the image store, which holds 3" in msg
    assert "'zz1'" in msg and "run episodes again on this ingest run" in msg


def test_duplicate_or_missing_key_columns_are_refused() -> None:
    with pytest.raises(DataError, match="2 duplicate scan key"):
        RowMap(pd.DataFrame({"scan_key": ["a", "a", "b", "b"]}))
    with pytest.raises(DataError, match="lacks the scan_key column"):
        RowMap(pd.DataFrame({"key": ["a"]}))


def test_stores_that_cannot_be_weak_referenced_get_their_own_map() -> None:
    class Plain:  # unhashable (a dataclass with eq), like the tests' in-memory stores
        __hash__ = None  # type: ignore[assignment]

        def __init__(self, keys: list[str]) -> None:
            self.images = np.zeros((len(keys), 1))
            self.index = pd.DataFrame({"scan_key": keys})

    a, b = Plain(["x", "y"]), Plain(["y", "x"])
    assert RowMap.of(a)(["y"]).tolist() == [1] and RowMap.of(b)(["y"]).tolist() == [0]
