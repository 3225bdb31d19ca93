"""Stage fingerprints follow the code a stage can reach (C sources included) and the numerics it runs with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import codeset, stages, tracking
from pipeline.chain import run_chain
from pipeline.meta import native

from . import fake_stages
from .test_chain import SUITE  # the fake-stage suite the chain tests run

ORDER = stages.ORDER
ENGINE_STAGES = {"meta-train", "adapt", "evaluate"}
C_SOURCES = {"meta/csrc/fastops.c", "meta/csrc/fastops_impl.h", "meta/csrc/pool_avx512.h"}


def _fingerprints(device: str = "auto") -> dict[str, str]:
    return {s: tracking.fingerprint(s, {"k": 1}, {}, None, device=device) for s in ORDER}


def _use_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "pkg" / "pipeline"
    shutil.copytree(codeset.ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    monkeypatch.setattr(codeset, "ROOT", root)
    return root


@pytest.fixture
def pkg_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the package that the code sets are read from, to edit without touching the checkout."""
    return _use_copy(tmp_path, monkeypatch)


def _edit(path: Path) -> None:
    comment = b"\n/* edited */\n" if path.suffix in (".c", ".h") else b"\n# edited\n"
    path.write_bytes(path.read_bytes() + comment)


# ------------------------------------------------------------------------------------- the code sets
def test_code_sets_follow_the_imports() -> None:
    sets = {s: set(tracking.code_files(s)) for s in ORDER}
    # adapt imports the metrics of evaluate and loads a meta-model on the kernels; serving is its pyfunc
    assert {"adapt/stage.py", "evaluate/metrics.py", "serving.py", "meta/native.py"} <= sets["adapt"]
    for stage in ENGINE_STAGES:
        assert sets[stage] >= C_SOURCES, stage
    assert "distributed.py" in sets["meta-train"] and "ingest/store.py" in sets["meta-train"]
    for stage in ("ingest", "episodes"):
        assert not any(f.startswith("meta/") for f in sets[stage]), stage
    assert not any(f.startswith(("evaluate/", "adapt/", "meta/")) for f in sets["ingest"])
    for stage in ORDER:
        # every module runs pipeline/__init__.py; the orchestration modules are no stage's code
        assert "__init__.py" in sets[stage] and not sets[stage] & codeset.ORCHESTRATION
        assert not any(f.startswith("demodata/") for f in sets[stage])


def test_code_sets_cover_what_importing_the_stage_loads() -> None:
    """The static walk misses no module that a plain import of the stage really loads."""
    # one process, third-party modules imported once; the package's modules are dropped between stages
    script = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    for n in [n for n in sys.modules if n.split('.')[0] == 'pipeline']:\n"
        "        del sys.modules[n]\n"
        "    importlib.import_module(name)\n"
        "    out[name] = sorted(m.__file__ for n, m in list(sys.modules.items())\n"
        "                       if n.split('.')[0] == 'pipeline' and getattr(m, '__file__', None))\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, *(stages.MODULES[s] for s in ORDER)],
        cwd=codeset.ROOT.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded_by = json.loads(out)
    for stage in ORDER:
        loaded = {
            Path(f).resolve().relative_to(codeset.ROOT).as_posix() for f in loaded_by[stages.MODULES[stage]]
        }
        assert "meta/native.py" in loaded or stage in ("ingest", "episodes")
        missing = loaded - set(tracking.code_files(stage)) - codeset.ORCHESTRATION - {"codeset.py"}
        assert not missing, (stage, missing)


def test_walker_follows_every_import_form(tmp_path: Path) -> None:
    root = tmp_path / "pipeline"
    files = {
        "__init__.py": "",
        "a/__init__.py": "from . import b\n",
        "a/b.py": "X = 1\n",
        "a/stage.py": (
            "import importlib\nfrom pipeline.a.c import thing\n"
            "def f():\n    from ..d import helper\n    return importlib.import_module('pipeline.e')\n"
        ),
        "a/c.py": "thing = 1\n",
        "a/unused.py": "",
        "d/helper.py": "import pipeline.k\n",  # `from ..d import helper` names a module of a namespace package
        "e.py": "CODE_DEPENDENCIES = ['data/*.txt']\n",
        "k.py": "from pipeline.tracking import log\n",
        "tracking/__init__.py": "import pipeline.never\n",  # orchestration: left out and not followed
        "never.py": "",
        "data/x.txt": "x",
        "data/y.bin": "y",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert codeset.code_files("pipeline.a.stage", root) == (
        "__init__.py",
        "a/__init__.py",
        "a/b.py",
        "a/c.py",
        "a/stage.py",
        "d/helper.py",
        "data/x.txt",
        "e.py",
        "k.py",
    )


# --------------------------------------------------------------------------- what invalidates what
@pytest.mark.parametrize(
    "rel",
    [
        "meta/csrc/fastops.c",
        "meta/csrc/pool_avx512.h",
        "evaluate/metrics.py",  # reached by adapt through an import the old hand-kept list missed
        "ingest/store.py",
        "episodes/sampler.py",
        "meta/protonet.py",  # imported only inside functions
        "config.py",
        "tracking/store.py",  # orchestration (the whole tracking package): changes no stage's result
        "tracking/runs.py",
    ],
)
def test_an_edit_changes_exactly_the_stages_that_reach_the_file(pkg_copy: Path, rel: str) -> None:
    before = _fingerprints()
    reach = {s for s in ORDER if rel in tracking.code_files(s)}
    _edit(pkg_copy / rel)
    after = _fingerprints()
    assert {s for s in ORDER if after[s] != before[s]} == reach
    if rel.startswith("meta/csrc/"):
        assert reach == ENGINE_STAGES
    if rel.startswith("tracking/"):
        assert reach == set()


def test_a_new_import_extends_the_code_set(pkg_copy: Path) -> None:
    stage_py = pkg_copy / "ingest" / "stage.py"
    stage_py.write_text(stage_py.read_text() + "\n\ndef _late():\n    from pipeline.meta import device\n")
    files = tracking.code_files("ingest")
    assert {"meta/__init__.py", "meta/device.py"} <= set(files)


def test_a_copy_of_the_package_elsewhere_gives_the_same_fingerprints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = _fingerprints()
    _use_copy(tmp_path, monkeypatch)
    assert _fingerprints() == here  # paths enter relative to the package: a clone elsewhere reuses runs


# ----------------------------------------------------------------------------------------- numerics
def test_kernel_switch_and_device_change_only_engine_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("FEWSCAN_NATIVE", "0")
    off = _fingerprints("cpu")
    assert "lib" not in native._state or native._state["lib"] is None
    assert tracking.numerics("meta-train", "cpu") == {
        "torch": __import__("torch").__version__,
        "device": "cpu",
        "cpu_kernels": "torch",
    }

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.delenv("FEWSCAN_NATIVE")
    for stage in ("ingest", "episodes"):  # no engine: no numerics, and the kernels are not even built
        assert tracking.numerics(stage, "cpu") is None
        tracking.fingerprint(stage, {}, {}, None, device="cpu")
    assert "lib" not in native._state
    on = _fingerprints("cpu")
    if native.build_id() == "torch":
        pytest.skip(f"the CPU kernels cannot be built here ({native.status()})")
    assert native.build_id().startswith("native-")
    changed = {s for s in ORDER if on[s] != off[s]}
    assert changed == ENGINE_STAGES

    on_cuda = _fingerprints("cuda:0")  # the type only: no CUDA is needed to name it
    assert {s for s in ORDER if on_cuda[s] != on[s]} == ENGINE_STAGES
    assert tracking.numerics("adapt", "cuda")["device"] == "cuda"  # type: ignore[index]


# ------------------------------------------------------------------------------ through the chain


def test_chain_reuses_until_the_code_set_or_the_kernels_change(
    tmp_store: Path, pkg_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_stages.install(monkeypatch)
    (tmp_store / "m.yaml").write_text("name: fakedata\nsize: 8\n")
    suite = tmp_store / "suite.yaml"
    suite.write_text(SUITE.format(manifest=tmp_store / "m.yaml"))
    first = run_chain(str(suite))
    numerics_tag = (
        tracking.client().get_run(first.outcomes["meta-train"].run_id).data.tags["fewscan.numerics"]
    )
    assert json.loads(numerics_tag)["torch"]
    assert "fewscan.numerics" not in tracking.client().get_run(first.outcomes["ingest"].run_id).data.tags

    fake_stages.CALLS.clear()
    assert all(o.reused for o in run_chain(str(suite)).outcomes.values())
    assert fake_stages.CALLS == []

    _edit(pkg_copy / "evaluate" / "metrics.py")  # reached by adapt and evaluate only
    third = run_chain(str(suite))
    assert fake_stages.CALLS == ["adapt", "evaluate"]
    assert [s for s in ORDER if third.outcomes[s].reused] == ["ingest", "episodes", "meta-train"]

    if native.build_id() == "torch":
        return  # no compiler here: there is no kernel path to switch away from
    fake_stages.CALLS.clear()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("FEWSCAN_NATIVE", "0")
    run_chain(str(suite))  # the fake stages have no device setting: auto
    assert fake_stages.CALLS == (
        ["meta-train", "adapt", "evaluate"] if codeset.device_type() == "cpu" else []
    )
