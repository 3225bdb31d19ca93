"""`Episode`: one few-shot task as data (scan keys of support and query per class), not tensors.

The JSON form is one line of `episodes/val.jsonl` / `episodes/test.jsonl`:
`{"id", "kind", "k_shot", "classes", "support": {name: [scan_key, ...]}, "query": {name: [...]}}`.
The label of a scan is the position of its class in `classes`; for binary episodes
`classes == [condition, normal_label]`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_open
from pipeline.errors import DataError


@dataclass
class Episode:
    id: int
    kind: str  # "binary" | "n_way"
    k_shot: int
    classes: list[str]
    support: dict[str, list[str]] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)
    # class -> degrees (counterclockwise) its images are rotated by when assembled into tensors; only
    # meta-training episodes with meta_train.train_episodes.rotations have any (docs/tasks.md).
    rotations: dict[str, int] = field(default_factory=dict)

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def q_query(self) -> int:
        """Query scans per class (episodes are balanced; the first class is representative)."""
        return len(self.query[self.classes[0]]) if self.classes else 0

    def to_dict(self) -> dict[str, Any]:
        # Classes in `classes` order so that the file reads in label order.
        out: dict[str, Any] = {
            "id": int(self.id),
            "kind": self.kind,
            "k_shot": int(self.k_shot),
            "classes": list(self.classes),
            "support": {c: list(self.support[c]) for c in self.classes},
            "query": {c: list(self.query[c]) for c in self.classes},
        }
        if self.rotations:  # absent otherwise: fixed val/test files keep their exact format
            out["rotations"] = {c: int(self.rotations[c]) for c in self.classes if c in self.rotations}
        return out

    def to_json(self) -> str:
        """One JSON line (no newline)."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> Episode:
        """From a JSON line or an already-parsed dict."""
        d = json.loads(data) if isinstance(data, str) else data
        missing = [k for k in ("id", "kind", "k_shot", "classes", "support", "query") if k not in d]
        if missing:
            raise DataError(f"episode record lacks {missing}: {str(d)[:120]}")
        classes = [str(c) for c in d["classes"]]
        for part in ("support", "query"):
            if set(d[part]) != set(classes):
                raise DataError(
                    f"episode {d['id']}: {part} classes {sorted(d[part])} differ from classes {classes}"
                )
        return cls(
            id=int(d["id"]),
            kind=str(d["kind"]),
            k_shot=int(d["k_shot"]),
            classes=classes,
            support={c: [str(k) for k in d["support"][c]] for c in classes},
            query={c: [str(k) for k in d["query"][c]] for c in classes},
            rotations={str(c): int(v) for c, v in (d.get("rotations") or {}).items()},
        )


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> int:
    """Write one episode per line, atomically (`pipeline/atomic.py`). Returns the count."""
    n = 0
    with atomic_open(path) as f:
        for ep in episodes:
            f.write(ep.to_json())
            f.write("\n")
            n += 1
    return n


def load_episodes(path: str | Path) -> list[Episode]:
    """Read a `.jsonl` file of episodes (as written by the episodes stage)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"episode file not found: {p} (is this the output folder of an episodes run?)")
    out: list[Episode] = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(Episode.from_json(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{p}:{lineno} is not valid JSON: {err}") from None
    return out
