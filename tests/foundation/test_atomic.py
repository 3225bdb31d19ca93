"""pipeline/atomic.py: the one atomic-write helper (temp file beside the target, fsync, rename)."""

from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

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


# Every file fewscan writes goes through pipeline/atomic.py (docs/ARCHITECTURE.md principle 12); a rename
# anywhere else is a hand-rolled copy of it unless it is one of these, each with the reason it is not a write.
# Keyed by (file, enclosing function) so an entry names one place, not a whole module.
RENAMES_ALLOWED = {
    ("pipeline/meta/native.py", "_compile"): (
        "the C compiler writes the library by name, not through a file object; its finished output is "
        "renamed into the cache, under a file lock"
    ),
    ("pipeline/ingest/store.py", "commit"): (
        "the image store's images file is appended to block by block over the whole ingest (larger than "
        "memory), then fsynced: publishing the complete file is a rename"
    ),
    ("pipeline/ingest/stage.py", "keep_outputs"): (
        "moves the finished store folder and report out of the run's temporary folder: a move of what is "
        "already written, not a write"
    ),
    ("pipeline/tracking/artifacts.py", "artifact_path"): (
        "renames what MLflow finished downloading (a file or a whole folder) into the download cache, and "
        "moves a partial folder aside"
    ),
}
SCANNED = ("pipeline", "tools", "benchmarks")
MOVES = {"os.replace", "os.rename", "os.renames", "shutil.move"}
REPO = Path(__file__).resolve().parents[2]


def _renames(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function, call) of each rename or move in `source`: os.replace / os.rename /
    os.renames / shutil.move (however imported), and `<path>.replace(target)` / `<path>.rename(target)`:
    one positional argument and no keyword (str.replace needs two; dataclasses.replace, datetime.replace
    and DataFrame.rename take keywords)."""
    tree = ast.parse(source)
    names = {}  # local name -> what it is: "os", "shutil", or a function such as "os.replace"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name: a.name for a in node.names if a.name in ("os", "shutil")})
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil"):
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Call):
                f = child.func
                if isinstance(f, ast.Name):
                    what = names.get(f.id, "")
                elif isinstance(f, ast.Attribute):
                    owner = names.get(f.value.id, f.value.id) if isinstance(f.value, ast.Name) else ""
                    what = f"{owner}.{f.attr}"
                    if owner not in ("os", "shutil", "dataclasses") and f.attr in ("replace", "rename"):
                        if len(child.args) == 1 and not child.keywords:  # Path.replace / Path.rename
                            what = "os.replace"
                else:
                    what = ""
                if what in MOVES:
                    found.append((child.lineno, func, ast.unparse(f)))
            visit(child, func)

    visit(tree, "<module>")
    return found


def test_the_rename_scanner_finds_hand_rolled_writes_and_nothing_else():
    source = """
import os, shutil, dataclasses
import os as _os
from shutil import move
def save(path, text, ep):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    tmp.replace(path)
    tmp.rename(path)
    shutil.move(tmp, path)
    name = text.replace("a", "b")
    ep = dataclasses.replace(ep, k_shot=1)
    when = ep.when.replace(year=2020)
    table = ep.table.rename(columns={"a": "b"})
    os.rename(tmp, path)
    _os.replace(tmp, path)
    move(tmp, path)
"""
    assert _renames(source) == [
        (8, "save", "os.replace"),
        (9, "save", "tmp.replace"),
        (10, "save", "tmp.rename"),
        (11, "save", "shutil.move"),
        (16, "save", "os.rename"),
        (17, "save", "_os.replace"),
        (18, "save", "move"),
    ]


def test_no_hand_rolled_atomic_writes():
    """Every rename in pipeline/, tools/ and benchmarks/ is in pipeline/atomic.py or in RENAMES_ALLOWED."""
    found = {}
    for top in SCANNED:
        for py in sorted((REPO / top).rglob("*.py")):
            rel = py.relative_to(REPO).as_posix()
            if rel == "pipeline/atomic.py":
                continue
            for line, func, call in _renames(py.read_text(encoding="utf-8")):
                found.setdefault((rel, func), []).append(f"{rel}:{line} {call}() in {func}")
    hand_rolled = [hit for key, hits in found.items() if key not in RENAMES_ALLOWED for hit in hits]
    assert not hand_rolled, (
        "hand-rolled temp-file renames; write through pipeline/atomic.py (atomic_open, write_text, "
        "write_bytes, write_json), or, for a rename that is not a file write, add the place to "
        f"RENAMES_ALLOWED with the reason: {hand_rolled}"
    )
    stale = sorted(set(RENAMES_ALLOWED) - set(found))
    assert not stale, f"RENAMES_ALLOWED names places that no longer rename anything; remove them: {stale}"
