"""One SOP instance, one file in the store, whatever form each copy has (docs/ingest.md, "Duplicates").

A SOP Instance UID names one DICOM object. Archives hold the same object twice (exported twice, stored
once as a single frame and again inside a multi-frame file, once compressed and once not); keeping both
would count one image twice and can put it on both sides of a split. The rule: the first file, by
relative path, in which the instance is stored is kept; every later file with the same SOP Instance UID
is rejected whole as `duplicate_sop_instance`, its report entry naming the kept file by its `file_key`.
First by path, not by form or size, because it is the order files are read in, so the choice does not
depend on the number of workers or on which decode finishes first, and a researcher can predict it (and
change it with `scans.exclude`).
"""

from __future__ import annotations

from typing import Any

from pipeline.ingest import reasons as R
from pipeline.ingest.deid import salted_key
from pipeline.ingest.reasons import Rejected


class SopLedger:
    """Which file holds each SOP instance (salted `sop_key` -> relative path of the kept file)."""

    def __init__(self, salt: bytes):
        self.salt = salt
        self.kept: dict[str, str] = {}

    @staticmethod
    def _sop(kind: str, items: list[dict[str, Any]]) -> str:
        # a whole-file task only: a 3D series task's items carry its first slice's key, and duplicate
        # slices within a series are dropped before decoding (build.py, header pass)
        return str(items[0].get("sop_key") or "") if kind == "file" and items else ""

    def check(self, kind: str, items: list[dict[str, Any]], rel: str) -> None:
        """Raise `duplicate_sop_instance` if another file already holds this file's SOP instance."""
        sop = self._sop(kind, items)
        first = self.kept.get(sop) if sop else None
        if first is not None and first != rel:
            raise Rejected(
                R.DUPLICATE_SOP,
                f"same SOP Instance UID as file {salted_key(self.salt, 'file', first)}, which is kept "
                "(the first file by path holding it)",
            )

    def keep(self, kind: str, items: list[dict[str, Any]], rel: str) -> None:
        """Record `rel` as the file of its SOP instance (call once some image of it was stored)."""
        sop = self._sop(kind, items)
        if sop:
            self.kept.setdefault(sop, rel)
