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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import DataError

IMAGES, INDEX, META = "images.npy", "scan_index.parquet", "store.json"


def atomic_write_text(path: Path, text: str, private: bool = False) -> None:
    """Write `text` via a temp file + os.replace. `private`: readable by the owner only (0600), for the
    local reports that hold clear paths (docs/ARCHITECTURE.md principle 10)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600) if private else os.open(tmp, flags, 0o666)
    if private:
        os.fchmod(fd, 0o600)  # an old temp file of this pid keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    atomic_write_text(path, json_text(obj) + "\n", private)


class StoreWriter:
    """Append (k, *item_shape) float16 blocks; `commit` publishes images + index + meta atomically."""

    def __init__(self, store_dir: Path, item_shape: tuple[int, ...]):
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # leftovers of an ingest that was killed (SIGKILL skips cleanup): never part of a store
        for stale in self.dir.glob(".*.tmp-*"):
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
        pid = os.getpid()
        tmp_idx = self.dir / f".{INDEX}.tmp-{pid}"
        try:
            # the final row count into the header written first: numpy pads the header for the longest
            # row count, so it keeps its length and the image bytes stay where they are
            self._raw.seek(0)
            if self._write_header(self._raw, self.n) != self._header_len:
                raise RuntimeError("the .npy header changed size; the image store was not written")
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            index.to_parquet(tmp_idx, index=False)
            meta = dict(meta, shape=[self.n, *self.item_shape], dtype="float16", n_images=self.n)
            os.replace(self._raw_path, self.dir / IMAGES)
            os.replace(tmp_idx, self.dir / INDEX)
            atomic_write_json(self.dir / META, meta)
        finally:
            self.abort()


class ImageStore:
    """Read side: `images` memmap (N, C, H, W) or (N, C, D, H, W) float16, `index`, `meta`."""

    def __init__(self, images: np.ndarray, index: pd.DataFrame, meta: dict[str, Any]):
        self.images, self.index, self.meta = images, index, meta
        self._row = {k: i for i, k in enumerate(index["scan_key"])}

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
        """Store rows (int64) of the given scan keys, in order; KeyError-free: unknown keys raise DataError."""
        try:
            return np.fromiter((self._row[k] for k in scan_keys), dtype=np.int64)
        except KeyError as e:
            raise DataError(
                f"scan key {e.args[0]} is not in this image store (episodes from another ingest run?)"
            ) from None
