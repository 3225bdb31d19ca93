"""Find scan files under a root by content, not by extension.

Real exports name DICOM files `IM0001`, `1.2.840....`, `image.dcm` or nothing at all, and nest them in
PATIENT/STUDY/SERIES folders; PNG sets are sometimes saved as `.jpg`. So every file's first bytes decide
its format. A file nothing recognises is still listed (as "unknown") so that the report accounts for it.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError

HEAD_BYTES = 352  # enough for the DICOM preamble (132) and the NIfTI-1 magic at 344


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute
    rel: str  # POSIX path relative to the scan root (may hold PHI: never leaves the machine in clear)
    fmt: str  # dicom | nifti | png | jpeg | npz | unknown


def sniff(path: Path, head: bytes | None = None) -> str:
    """The format of one file from its leading bytes (and, for gzip/zip containers, its name)."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError:
            return "unknown"
    name = path.name.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "nifti"
    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if head.startswith(b"\x1f\x8b") and (name.endswith(".nii.gz") or name.endswith(".nii")):
        return "nifti"
    if head.startswith(b"PK\x03\x04") and name.endswith(".npz"):
        return "npz"
    # DICOM without the 128-byte preamble (old ACR-NEMA style exports): starts with a group 0002/0008
    # element in little endian; dicom_read confirms or rejects it as unreadable
    if len(head) >= 8 and head[1] == 0 and head[0] in (0x02, 0x08) and head[3] == 0:
        return "dicom"
    return "unknown"


def discover(root: Path, exclude: list[str] | None = None, skip: set[Path] | None = None) -> list[Candidate]:
    """All regular files under `root` (recursively, sorted by relative path), with their sniffed format.

    Hidden files and folders (".DS_Store", ".git") are not scans and are skipped silently; `skip` holds
    absolute paths to leave out (e.g. the label table when it lives inside the scan root).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"scan root {root} is not a folder (check scans.root; relative paths resolve against {Path.cwd()})"
        )
    skip = {p.resolve() for p in (skip or set())}
    out: list[Candidate] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if exclude and any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            if not p.is_file() or p.resolve() in skip:
                continue
            out.append(Candidate(p, rel, sniff(p)))
    out.sort(key=lambda c: c.rel)
    return out
