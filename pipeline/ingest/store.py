"""The image store: one memory-mappable float16 array + the scan index + store.json.

Writing is crash-safe: images are streamed to a temporary `.npy` file (memory stays flat whatever the study
size) whose header, written first for zero rows, is rewritten in place with the final row count at commit
(numpy reserves room for the row count's digits, so the header keeps its size and the images are never
copied); the index and store.json are also written to temporary names, and only then are the three
renamed into place (store.json last, carrying the row count). An interrupted ingest therefore leaves the previous store untouched, and `ImageStore.open`
refuses a store whose three files disagree.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipeline.atomic import atomic_open, write_text
from pipeline.errors import DataError

IMAGES, INDEX, META = "images.npy", "scan_index.parquet", "store.json"


_ENCODER = json.JSONEncoder(sort_keys=True, default=str)


def _is_container(v: Any) -> bool:
    return isinstance(v, dict | list)


def json_text(obj: Any) -> str:
    """Sorted-key JSON laid out for reading: one top-level key per line, and one element per line in a
    list or mapping of objects (a report's 100k files), each element on its line in compact form.

    Every piece goes through json's C encoder: `indent=` makes json use its pure-Python encoder, which
    spent 7 s of CPU on the report of a 112k-file ingest (benchmarks/bench_nih_scale.py)."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return _ENCODER.encode(obj)

    def value(v: Any) -> str:
        if isinstance(v, list) and v and all(map(_is_container, v)):
            return "[\n" + ",\n".join("    " + _ENCODER.encode(x) for x in v) + "\n  ]"
        if (
            isinstance(v, dict)
            and v
            and all(isinstance(k, str) for k in v)
            and all(map(_is_container, v.values()))
        ):
            inner = ",\n".join(f"    {_ENCODER.encode(k)}: {_ENCODER.encode(v[k])}" for k in sorted(v))
            return "{\n" + inner + "\n  }"
        return _ENCODER.encode(v)

    return "{\n" + ",\n".join(f"  {_ENCODER.encode(k)}: {value(obj[k])}" for k in sorted(obj)) + "\n}"


def atomic_write_json(path: Path, obj: Any, private: bool = False) -> None:
    """`obj` laid out by `json_text`, written atomically (pipeline/atomic.py). `private`: readable by the
    owner only (0600), for the local reports that hold clear paths (docs/ARCHITECTURE.md principle 10)."""
    write_text(path, json_text(obj) + "\n", private=private)


class StoreWriter:
    """Append (k, *item_shape) float16 blocks; `commit` publishes images + index + meta atomically."""

    def __init__(self, store_dir: Path, item_shape: tuple[int, ...]):
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # leftovers of an ingest that was killed (SIGKILL skips cleanup): never part of a store (the raw
        # images file's name, and pipeline/atomic.py's temp files)
        for pattern in (".*.tmp-*", ".*.tmp"):
            for stale in self.dir.glob(pattern):
                stale.unlink(missing_ok=True)
        self.item_shape = tuple(item_shape)
        self.n = 0
        self._raw_path = self.dir / f".images.raw.tmp-{os.getpid()}"
        self._raw = open(self._raw_path, "wb")
        self._header_len = self._write_header(self._raw, 0)

    def _write_header(self, f: Any, n: int) -> int:
        """The .npy header for `n` rows at the file's current position; its length in bytes."""
        start = f.tell()
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)),
            "fortran_order": False,
            "shape": (n, *self.item_shape),
        }
        np.lib.format.write_array_header_1_0(f, header)
        return int(f.tell() - start)

    def append(self, block: np.ndarray) -> range:
        """Rows appended: `range(first, last+1)` (store indices of this block)."""
        if tuple(block.shape[1:]) != self.item_shape:
            raise ValueError(f"block shape {block.shape[1:]} != store item shape {self.item_shape}")
        self._raw.write(np.ascontiguousarray(block, dtype=np.float16).tobytes())
        start = self.n
        self.n += block.shape[0]
        return range(start, self.n)

    def abort(self) -> None:
        if not self._raw.closed:
            self._raw.close()
        for p in self.dir.glob(f".*.tmp-{os.getpid()}*"):
            p.unlink(missing_ok=True)

    def commit(self, index: pd.DataFrame, meta: dict[str, Any]) -> None:
        if len(index) != self.n:
            raise ValueError(f"index has {len(index)} rows for {self.n} images")
        try:
            # the final row count into the header written first: numpy pads the header for the longest
            # row count, so it keeps its length and the image bytes stay where they are
            self._raw.seek(0)
            if self._write_header(self._raw, self.n) != self._header_len:
                raise RuntimeError("the .npy header changed size; the image store was not written")
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            meta = dict(meta, shape=[self.n, *self.item_shape], dtype="float16", n_images=self.n)
            # the images file is complete and fsynced: publishing it is a rename, not a write
            os.replace(self._raw_path, self.dir / IMAGES)
            with atomic_open(self.dir / INDEX, "wb") as f:
                index.to_parquet(f, index=False)
            atomic_write_json(self.dir / META, meta)  # last: it carries the row count
        finally:
            self.abort()


class ImageStore:
    """Read side: `images` memmap (N, C, H, W) or (N, C, D, H, W) float16, `index`, `meta`."""

    def __init__(self, images: np.ndarray, index: pd.DataFrame, meta: dict[str, Any]):
        self.images, self.index, self.meta = images, index, meta

    @classmethod
    def open(cls, store_dir: str | Path) -> ImageStore:
        d = Path(store_dir)
        missing = [n for n in (IMAGES, INDEX, META) if not (d / n).is_file()]
        if missing:
            raise DataError(
                f"image store {d} lacks {', '.join(missing)} (not an ingest store, or an ingest never finished)"
            )
        meta = json.loads((d / META).read_text())
        images = np.load(d / IMAGES, mmap_mode="r")
        index = pd.read_parquet(d / INDEX)
        if not (len(index) == images.shape[0] == int(meta.get("n_images", -1))):
            raise DataError(
                f"image store {d} is inconsistent: {images.shape[0]} images, {len(index)} index rows, store.json says {meta.get('n_images')}; re-run ingest"
            )
        return cls(images, index, meta)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def rows_for(self, scan_keys: Any) -> np.ndarray:
        """Store rows (int64) of the given scan keys, in order; unknown keys raise DataError (RowMap)."""
        return RowMap.of(self)(scan_keys)


class StoreLike(Protocol):
    """What reading rows needs of an ImageStore (tests hand in small in-memory stores)."""

    images: Any  # (N, C, H, W) or (N, C, D, H, W) array / memmap
    index: pd.DataFrame  # columns scan_key and store_index (the row of `images`)


class RowMap:
    """scan_key -> row of the store's `images`: the one mapping, used by episodes' batches
    (pipeline/episodes/batch.py), evaluate's baselines and `ImageStore.rows_for`.

    The row is the index's `store_index` column (ingest writes it; the index's own row order is not
    relied on), or the index row when a hand-made index has none. Built once per store (`RowMap.of`):
    a pandas object Index hashes Python strings fastest, and a meta-batch looks up hundreds of keys."""

    def __init__(self, index: pd.DataFrame):
        if "scan_key" not in index.columns:
            raise DataError(
                f"scan index lacks the scan_key column (it has {list(index.columns)}); is it the "
                "store/scan_index.parquet of an ingest run?"
            )
        rows = index["store_index"] if "store_index" in index.columns else np.arange(len(index))
        self.rows = np.asarray(rows, dtype=np.int64)
        self.keys = pd.Index(index["scan_key"].astype(str).to_numpy(), dtype=object)
        if not self.keys.is_unique:
            n = int(self.keys.duplicated().sum())
            raise DataError(f"image store index has {n} duplicate scan key(s); re-run ingest")

    def __len__(self) -> int:
        return len(self.keys)

    def __call__(self, scan_keys: Any) -> np.ndarray:
        """Rows (int64) of `scan_keys`, in order. A key the store does not hold raises DataError naming how
        many are missing and the fix: the keys were written from another ingest run than this store."""
        keys = pd.Index(np.asarray(list(scan_keys), dtype=object), dtype=object)
        pos = self.keys.get_indexer(keys)
        if (pos < 0).any():
            missing = keys[pos < 0]
            raise DataError(
                f"{len(missing)} of {len(keys)} scan key(s) are not in the image store, which holds "
                f"{len(self.keys)} (e.g. {list(missing[:3])}): the episodes or split come from another ingest "
                "run than this store; run episodes again on this ingest run, or consume the ingest run they "
                "were made from"
            )
        return self.rows[pos]

    @staticmethod
    def of(store: StoreLike) -> RowMap:
        """The store's RowMap, built on first use and kept while the store lives."""
        try:
            m = _MAPS.get(store)
            if m is None:
                m = _MAPS[store] = RowMap(store.index)
            return m
        except TypeError:  # a store that cannot be weak-referenced (or hashed): kept by id, checked
            hit = _MAPS_BY_ID.get(id(store))
            if hit is None or hit[0] is not store:
                hit = _MAPS_BY_ID[id(store)] = (store, RowMap(store.index))
            return hit[1]


_MAPS: weakref.WeakKeyDictionary[Any, RowMap] = weakref.WeakKeyDictionary()
_MAPS_BY_ID: dict[int, tuple[Any, RowMap]] = {}
