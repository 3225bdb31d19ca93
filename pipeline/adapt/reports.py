"""adapt's JSON reports (support/query reports, the adapted model's card, the local-only path reports),
written atomically through the one helper, pipeline/atomic.py (docs/ARCHITECTURE.md principle 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.atomic import write_json


def write_json_atomic(path: Path, obj: Any, private: bool = False) -> None:
    """`obj` as indented JSON with sorted keys (values JSON cannot hold written as text), atomically.
    `private`: owner-only (0600 file, a new folder 0700), for the local reports that hold clear paths
    (docs/ARCHITECTURE.md principle 10)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    write_json(path, obj, indent=2, sort_keys=True, default=str, private=private)
