"""Find scan files under a root by content, not by extension.

Real exports name DICOM files `IM0001`, `1.2.840....`, `image.dcm` or nothing at all, and nest them in
PATIENT/STUDY/SERIES folders; PNG sets are sometimes saved as `.jpg`. So every file's first bytes decide
its format. A file nothing recognises is still listed (as "unknown") so that the report accounts for it.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import DataError
from pipeline.ingest import reasons as R

HEAD_BYTES = 352  # enough for the DICOM preamble (132) and the NIfTI-1 magic at 344


@dataclass(frozen=True)
class Candidate:
    path: Path  # absolute
    rel: str  # POSIX path relative to the scan root (may hold PHI: never leaves the machine in clear)
    fmt: str  # dicom | nifti | png | jpeg | npz | unknown | symlink
    reason: str = ""  # set when the walk itself rejects the path (a broken symbolic link)
    detail: str = ""


def sniff(path: Path, head: bytes | None = None) -> str:
    """The format of one file from its leading bytes (and, for gzip/zip containers, its name)."""
    if head is None:
        try:  # os.open/os.read: no buffered file object per file (a study holds 100k+ files)
            fd = os.open(path, os.O_RDONLY)
            try:
                head = os.read(fd, HEAD_BYTES)
            finally:
                os.close(fd)
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


def discover(
    root: Path, exclude: list[str] | None = None, skip: set[Path] | None = None, sniff_files: bool = True
) -> list[Candidate]:
    """All regular files under `root` (recursively, sorted by relative path), with their sniffed format.

    Hidden files and folders (".DS_Store", ".git") are not scans and are skipped silently; `skip` holds
    absolute paths to leave out (e.g. the label table when it lives inside the scan root).
    Symbolic links are followed, files and folders alike, each real folder walked once. A link whose
    target is missing (`dangling_symlink`) or that leads back into itself or a folder that holds it
    (`symlink_loop`) is returned with that reason, so the report accounts for it. `sniff_files=False`
    only lists the files (format "").
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"scan root {root} is not a folder (check scans.root; relative paths resolve against {Path.cwd()})"
        )
    skip = {p.resolve() for p in (skip or set())}
    out: list[Candidate] = []
    seen_dirs: set[tuple[int, int]] = set()

    def broken(p: Path, rel: str) -> Candidate | None:
        """A link that cannot be followed, as a rejected candidate; None if it resolves."""
        try:
            os.stat(p)
        except FileNotFoundError:
            return Candidate(
                p, rel, "symlink", R.DANGLING_SYMLINK, "symbolic link to a path that does not exist"
            )
        except OSError as e:
            if e.errno == errno.ELOOP:
                return Candidate(p, rel, "symlink", R.SYMLINK_LOOP, "symbolic link that leads back to itself")
            return Candidate(
                p, rel, "symlink", R.UNREADABLE, f"symbolic link cannot be followed ({e.strerror})"
            )
        return None

    # The label table is the usual skipped file: only a file of the same name, or a link (which may
    # point at it under another name), is resolved to compare; resolving every file of a 100k-file
    # study cost more than reading its header.
    skip_names = {p.name for p in skip}

    def walk(d: Path, prefix: str, ancestors: tuple[tuple[int, int], ...]) -> None:
        st = os.stat(d)
        ident = (st.st_dev, st.st_ino)
        seen_dirs.add(ident)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = prefix + e.name  # relative POSIX path, built as a string (no Path per file)
            if exclude and any(fnmatch.fnmatch(rel, pat) for pat in exclude):
                continue
            p = Path(e.path)
            link = e.is_symlink()
            if link:
                bad = broken(p, rel)
                if bad is not None:
                    out.append(bad)
                    continue
            if e.is_dir():  # follows a link to a folder
                t = os.stat(p)
                tid = (t.st_dev, t.st_ino)
                if tid in ancestors or tid == ident:
                    out.append(
                        Candidate(p, rel, "symlink", R.SYMLINK_LOOP,
                                  "symbolic link to a folder that holds it: its files are read once, there")
                    )  # fmt: skip
                elif tid not in seen_dirs:  # a second link to a folder already walked adds nothing
                    walk(p, rel + "/", (*ancestors, ident))
                continue
            if not e.is_file():
                continue
            if skip and (link or e.name in skip_names) and p.resolve() in skip:
                continue
            out.append(Candidate(p, rel, sniff(p) if sniff_files else ""))

    walk(root, "", ())
    out.sort(key=lambda c: c.rel)
    return out
