"""Pruning ingest's decode cache (`cache_dir` of a data manifest, default `.fewscan/cache/ingest`).

The cache holds one file per decoded scan or series, `<dir>/<2 hex>/<key>.fsc` (pipeline/ingest/worker.py),
written whole by a rename and read whole, so removing an entry at any moment only turns a later hit into
a miss (the scan is decoded again). Nothing here knows what an entry contains.

An entry's "last use" is the later of its access and modification times: it is written on a miss, read on
a hit; with the usual `relatime` mount option the access time moves at most once a day, which is the
granularity `--cache-max-age DAYS` asks for (docs/storage.md, "The decode cache").
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

_ENTRY = re.compile(r"^[0-9a-f]{40}\.fsc$")
# a write cut short (worker.py `_cache_save`): pipeline/atomic.py's temp name, or the older ".tmp-<pid>"
_TEMP = re.compile(r"^\.[0-9a-f]{40}\.fsc\.(?:[A-Za-z0-9_]+\.tmp|tmp-\d+)$")
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class Entry:
    path: Path
    nbytes: int
    last_used: float  # unix seconds


def parse_size(text: str) -> int:
    """'500M', '2G', '1.5GB', '123' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ConfigError(
            f"--cache-max-bytes '{text}' is not a size: give a number of bytes with an optional unit, "
            "e.g. 500M, 2G or 1073741824"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def entries(cache_dir: Path) -> list[Entry]:
    """Every entry (and every left-over temporary file) under `cache_dir`; nothing else is touched."""
    out: list[Entry] = []
    if not cache_dir.is_dir():
        return out
    for sub in cache_dir.iterdir():
        if not (sub.is_dir() and not sub.is_symlink() and re.fullmatch(r"[0-9a-f]{2}", sub.name)):
            continue
        for f in sub.iterdir():
            if not (_ENTRY.match(f.name) or _TEMP.match(f.name)):
                continue
            with contextlib.suppress(FileNotFoundError):  # an ingest may replace it right now
                st = f.lstat()
                if f.is_file() and not f.is_symlink():
                    out.append(Entry(f, st.st_size, max(st.st_atime, st.st_mtime)))
    return out


def select(
    found: list[Entry], max_bytes: int | None, max_age_days: float | None, now: float | None = None
) -> list[Entry]:
    """The entries to remove: those unused for more than `max_age_days`, then the least recently used
    until what remains fits in `max_bytes`. The newest entries are kept."""
    now = time.time() if now is None else now
    newest_first = sorted(found, key=lambda e: e.last_used, reverse=True)
    drop: list[Entry] = []
    keep: list[Entry] = []
    for e in newest_first:
        if max_age_days is not None and now - e.last_used > max_age_days * 86400:
            drop.append(e)
        else:
            keep.append(e)
    if max_bytes is not None:
        total = 0
        for e in keep:
            total += e.nbytes
            if total > max_bytes:
                drop.append(e)
    return drop


def remove(doomed: list[Entry]) -> int:
    """Remove the entries; the bytes actually removed (an entry gone meanwhile counts for nothing)."""
    freed = 0
    for e in doomed:
        try:
            size = e.path.lstat().st_size
            os.unlink(e.path)
        except FileNotFoundError:
            continue
        freed += size
        with contextlib.suppress(OSError):
            e.path.parent.rmdir()  # only when empty
    return freed
