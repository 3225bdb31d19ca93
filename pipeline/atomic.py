"""The one way fewscan writes a file: into a temp file beside it, flushed and fsynced, then renamed.

A reader (another stage, a resumed run, the user) sees the old file or the new one, never half of one; a
crash or a kill mid-write leaves the previous content and no stray temp file behind (docs/ARCHITECTURE.md,
principle 12). The temp file sits in the target's folder because `os.replace` is atomic only within one
file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, overload


@overload
def atomic_open(
    path: str | Path,
    mode: Literal["w"] = "w",
    *,
    private: bool = False,
    newline: str | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[IO[str]]: ...
@overload
def atomic_open(
    path: str | Path,
    mode: Literal["wb"],
    *,
    private: bool = False,
    newline: str | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[IO[bytes]]: ...
def atomic_open(
    path: str | Path,
    mode: str = "w",
    *,
    private: bool = False,
    newline: str | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[IO[Any]]:
    """`with atomic_open(path) as f: ...` writes `path` atomically; an exception inside leaves it untouched.

    mode: "w" (text, UTF-8) or "wb". private: the file is created 0600 (owner only), for local reports that
    hold clear paths (docs/ARCHITECTURE.md principle 10); otherwise it gets the usual umask-derived mode.
    The parent folder is created if missing. durable=False skips the fsync (the rename stays atomic, so a
    reader still never sees half a file, but a power cut may lose the write): only for a cache entry, whose
    loss is a miss, written once per decoded file, where an fsync each would cost more than the decode."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', not {mode!r}")
    return _atomic_open(Path(path), mode, private, newline, durable)


@contextlib.contextmanager
def _atomic_open(
    path: Path, mode: str, private: bool, newline: str | None, durable: bool
) -> Iterator[IO[Any]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if not private:
            # mkstemp creates 0600; a shared result file should get the mode any other file would
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
        if mode == "wb":
            f: IO[Any] = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding="utf-8", newline=newline)
        with f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, *, private: bool = False) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w", private=private) as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes, *, private: bool = False) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb", private=private) as f:
        f.write(data)


def write_json(
    path: str | Path, obj: Any, *, indent: int | None = None, private: bool = False, **kw: Any
) -> None:
    """Write `obj` as JSON (plus a final newline) to `path` atomically; kw go to `json.dumps`.

    json.dumps, not json.dump: dump always takes json's pure-Python encoder (1 s of CPU for the split.json
    of a 112k-scan index); dumps uses the C one, for the same text."""
    write_text(path, json.dumps(obj, indent=indent, **kw) + "\n", private=private)
