"""Naming a file in log lines without its path: salted file keys, and the local-only report behind them.

A folder or file name can hold a patient name (`DOE^JOHN/scan.dcm`), and stderr ends up in CI logs and
terminals, so adapt and predict name a file only by its salted file key (ingest's convention:
`salted_key(salt, "file", path)`, same salt file) and point at the local-only report (`PathLedger`, next
to the salt, never uploaded) that maps the key back to the clear path. Exceptions name the problem and
the fix but never a path (an error's text is recorded in MLflow: `fail`, `scrub`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from pipeline.adapt.reports import write_json_atomic
from pipeline.errors import FewscanError
from pipeline.ingest.deid import salted_key
from pipeline.progress import log


class PathLedger:
    """The local-only record behind the file keys that log lines show instead of clear paths.

    `key(path)` is ingest's file key, `salted_key(salt, "file", <absolute path>)` with ingest's salt;
    `cite(path, note)` records `key -> {path, notes}` in `report` (JSON, next to the salt, never uploaded)
    and returns the text for a log line: "file <key> (clear path in <report>)". The report is merged and
    rewritten atomically (temp file + os.replace), so keys from earlier runs stay resolvable and a crash
    never leaves half a file. With `report=None` nothing is recorded and the citation is the key alone.
    """

    def __init__(self, salt: bytes, report: Path | None):
        self.salt = salt
        self.report = Path(report) if report is not None else None

    def key(self, path: Path | str) -> str:
        return salted_key(self.salt, "file", str(Path(path).resolve()))

    def record(self, entries: Sequence[tuple[Path | str, str]]) -> list[str]:
        """Record several (path, note) at once (one rewrite of the report); their keys, in order."""
        keys = [self.key(p) for p, _ in entries]
        if self.report is None or not entries:
            return keys
        files: dict[str, Any] = {}
        try:
            files = dict(json.loads(self.report.read_text()).get("files") or {})
        except (OSError, ValueError, AttributeError):
            files = {}  # missing or unreadable: start afresh (it only holds local pointers)
        for k, (p, note) in zip(keys, entries):
            entry = files.setdefault(k, {"path": str(Path(p).resolve()), "notes": []})
            if note and note not in entry["notes"]:
                entry["notes"].append(note)
        write_json_atomic(self.report, {"files": files}, private=True)
        return keys

    def where(self) -> str:
        return f"clear path in {self.report}" if self.report is not None else "path not recorded"

    def cite(self, path: Path | str, note: str = "") -> str:
        """Record one path and return how a log line names it."""
        return f"file {self.record([(path, note)])[0]} ({self.where()})"


def fail(exc: type[FewscanError], msg: str, where: Path | str, ledger: PathLedger | None = None) -> NoReturn:
    """Raise `msg` without the path: an error's text is also recorded in the MLflow run (tag
    fewscan.error), and a path may name a patient. stderr gets the file's key and where the local-only
    report records its clear path (nothing when no ledger is given: the message alone must suffice)."""
    if ledger is not None:
        log(f"{msg} [{ledger.cite(where, msg)}]")
    raise exc(msg)


def scrub(text: str, path: Path) -> str:
    """A reader's message without the file's path or name (those may carry PHI; MLflow gets keys only)."""
    for token in (str(path.resolve()), str(path), path.name):
        if token:
            text = text.replace(token, "<file>")
    return text.removeprefix("<file>: ")
