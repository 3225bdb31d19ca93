"""pipeline/atomic.py: the one atomic-write helper (temp file beside the target, fsync, rename)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from pipeline import atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_json_round_trips_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "deep" / "results.json"
    atomic.write_json(target, {"acc": 0.75, "name": "肺炎"}, indent=1, sort_keys=True)
    assert json.loads(target.read_text(encoding="utf-8")) == {"acc": 0.75, "name": "肺炎"}
    assert target.read_text(encoding="utf-8").endswith("}\n")
    assert _leftovers(target.parent) == []


def test_a_failure_mid_write_keeps_the_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "report.md"
    atomic.write_text(target, "old report\n")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic.atomic_open(target) as f:
            f.write("half of a new rep")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old report\n"
    assert _leftovers(tmp_path) == []


def test_unserialisable_json_leaves_the_old_file(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert _leftovers(tmp_path) == []


def test_private_files_are_owner_only_and_shared_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "shared.txt", "x")
        atomic.write_text(tmp_path / "private.txt", "x", private=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600


def test_bytes_and_an_invalid_mode(tmp_path):
    atomic.write_bytes(tmp_path / "w.bin", b"\x00\x01")
    assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match="'w' or 'wb'"):
        atomic.atomic_open(tmp_path / "a", "a")  # type: ignore[call-overload]


def test_a_cache_write_skips_the_fsync_but_stays_atomic(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    with atomic.atomic_open(tmp_path / "entry.fsc", "wb", durable=False) as f:
        f.write(b"cached")
    assert synced == [] and (tmp_path / "entry.fsc").read_bytes() == b"cached"
    atomic.write_bytes(tmp_path / "result.bin", b"kept")
    assert len(synced) == 1  # a result file is fsynced before the rename
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(tmp_path / "entry.fsc", "wb", durable=False) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert (tmp_path / "entry.fsc").read_bytes() == b"cached" and _leftovers(tmp_path) == []
