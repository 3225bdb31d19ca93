"""Salted keys: the only form in which patients, studies, scans and file paths leave ingest.

The salt is a random 32-byte secret kept in a local file outside the store and outside MLflow, so the
keys are stable across re-ingests of the same study but cannot be reversed by hashing candidate ids.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from pipeline.errors import ConfigError

KEY_LEN = 16  # hex chars of the salted SHA-256 (64 bits: collisions are negligible at study scale)


def load_or_create_salt(path: Path) -> bytes:
    """Read the salt file, or create it (mode 0600, atomically) on first use."""
    path = Path(path)
    if path.is_file():
        text = path.read_text().strip()
        if len(text) < 32:
            raise ConfigError(f"salt file {path} is shorter than 32 hex characters; delete it to regenerate")
        return text.encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    salt = secrets.token_hex(32)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    try:
        # link() fails if another process created the salt meanwhile: then theirs wins
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip().encode()


def salted_key(salt: bytes, kind: str, value: str) -> str:
    """`kind` separates namespaces so that a patient id and a UID with equal text get different keys."""
    h = hashlib.sha256()
    h.update(salt)
    h.update(b"\x00" + kind.encode() + b"\x00")
    h.update(str(value).strip().encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:KEY_LEN]


def salt_id(salt: bytes) -> str:
    """A non-secret fingerprint of the salt (to tell caches and stores made with different salts apart)."""
    return hashlib.sha256(b"fewscan-salt-id\x00" + salt).hexdigest()[:12]


def age_bin(value: object) -> str:
    """Age as a coarse 5-year bin ("40-44"), 90+ pooled (HIPAA safe harbor); "" when unknown."""
    try:
        text = str(value).strip().upper()
        if text.endswith("Y"):  # DICOM AS format "045Y"
            text = text[:-1]
        age = int(float(text))
    except (TypeError, ValueError):
        return ""
    if age < 0 or age > 130:
        return ""
    if age >= 90:
        return "90+"
    lo = age // 5 * 5
    return f"{lo}-{lo + 4}"


def sex_code(value: object) -> str:
    text = str(value).strip().upper()[:1]
    return text if text in ("M", "F", "O") else ""
