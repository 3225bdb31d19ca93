"""pipeline/cpus.py: the CPUs this process may use (affinity, cgroup v1/v2 quota, FEWSCAN_CPUS), torch's
threads sized from them and restored after a stage, and OpenMP kept from spinning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import cpus
from pipeline.errors import ConfigError


@pytest.fixture
def fake_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host with 8 CPUs in the affinity mask and an empty cgroup tree; no overrides in the environment."""
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("0::/\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv(cpus.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return root


def test_affinity_without_quota(fake_host: Path) -> None:
    assert cpus.cgroup_quota_cpus() is None
    assert cpus.available_cpus() == 8


def test_affinity_mask_smaller_than_machine(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})  # taskset -c 3,5
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cpus.available_cpus() == 2


def test_no_affinity_api_falls_back_to_cpu_count(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert cpus.available_cpus() == 6


def test_cgroup_v2_quota_rounds_down(fake_host: Path) -> None:
    (fake_host / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs
    assert cpus.cgroup_quota_cpus() == 2
    assert cpus.available_cpus() == 2


def test_cgroup_v2_unlimited(fake_host: Path) -> None:
    (fake_host / "cpu.max").write_text("max 100000\n")
    assert cpus.available_cpus() == 8


def test_cgroup_quota_below_one_cpu_gives_one(fake_host: Path) -> None:
    (fake_host / "cpu.max").write_text("50000 100000\n")
    assert cpus.available_cpus() == 1


def test_cgroup_quota_larger_than_affinity(fake_host: Path) -> None:
    (fake_host / "cpu.max").write_text("1600000 100000\n")  # 16 CPUs of quota, 8 in the mask
    assert cpus.available_cpus() == 8


def test_cgroup_v2_tightest_of_own_cgroup_and_ancestors(fake_host: Path, tmp_path: Path) -> None:
    (tmp_path / "proc_self_cgroup").write_text("0::/jobs/job42\n")
    (fake_host / "jobs" / "job42").mkdir(parents=True)
    (fake_host / "jobs" / "job42" / "cpu.max").write_text("max 100000\n")
    (fake_host / "jobs" / "cpu.max").write_text("300000 100000\n")  # the parent limits the job to 3
    (fake_host / "cpu.max").write_text("700000 100000\n")
    assert cpus.available_cpus() == 3


def test_cgroup_v1_quota(fake_host: Path, tmp_path: Path) -> None:
    (tmp_path / "proc_self_cgroup").write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    d = fake_host / "cpu,cpuacct"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text("300000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    # the container's own path does not exist under the mount (the mount is its cgroup): the root counts
    assert cpus.available_cpus() == 3


def test_cgroup_v1_no_quota(fake_host: Path, tmp_path: Path) -> None:
    (tmp_path / "proc_self_cgroup").write_text("1:cpu:/\n")
    d = fake_host / "cpu"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.available_cpus() == 8


def test_unreadable_cgroup_files_are_no_quota(fake_host: Path, tmp_path: Path) -> None:
    (tmp_path / "proc_self_cgroup").unlink()
    (fake_host / "cpu.max").write_text("garbage\n")
    assert cpus.cgroup_quota_cpus() is None
    assert cpus.available_cpus() == 8


def test_env_override_wins(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fake_host / "cpu.max").write_text("100000 100000\n")
    monkeypatch.setenv(cpus.ENV, "4")
    assert cpus.available_cpus() == 4


@pytest.mark.parametrize("bad", ["0", "-2", "two", "1.5"])
def test_env_override_invalid(fake_host: Path, monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(cpus.ENV, bad)
    with pytest.raises(ConfigError, match=rf"FEWSCAN_CPUS='{bad}' is not a positive whole number"):
        cpus.available_cpus()


def test_default_threads_honours_omp_num_threads(fake_host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (fake_host / "cpu.max").write_text("200000 100000\n")
    assert cpus.default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpus.default_threads() == 1


def test_torch_threads_sets_and_restores(fake_host: Path) -> None:
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    with cpus.torch_threads(other) as n:
        assert n == other
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before


def test_torch_threads_default_is_available_cpus(fake_host: Path) -> None:
    before = torch.get_num_threads()
    (fake_host / "cpu.max").write_text("100000 100000\n")
    with cpus.torch_threads(None) as n:
        assert n == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_torch_threads_restores_after_an_error(fake_host: Path) -> None:
    before = torch.get_num_threads()
    other = 3 if before != 3 else 2
    with pytest.raises(RuntimeError, match="boom"):
        with cpus.torch_threads(other):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_openmp_does_not_spin_unless_the_user_says_so(tmp_path: Path) -> None:
    """Importing fewscan sets OMP_WAIT_POLICY=PASSIVE before torch loads its OpenMP runtime; a user's own
    value is kept."""
    code = "import os, pipeline, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME")}
    root = str(Path(cpus.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


class _FakeUpstream:
    """Just enough of an UpstreamRun for meta-train's execute to reach its thread setting."""

    def upstream(self, name: str) -> _FakeUpstream:
        return self

    def artifact(self, name: str) -> Path:
        return Path(name)

    def read_json(self, name: str) -> dict[str, object]:
        return {}


@pytest.mark.parametrize("stage", ["evaluate", "metatrain"])
@pytest.mark.parametrize("threads", [3, None])
def test_stage_threads_restored_when_the_stage_ends(
    fake_host: Path, monkeypatch: pytest.MonkeyPatch, stage: str, threads: int | None
) -> None:
    """evaluate and meta-train run with the configured threads (None: the available CPUs, here a quota of 2)
    and leave torch as they found it, whether they finish or fail."""
    import importlib
    import types

    mod = importlib.import_module(f"pipeline.{stage}.stage")
    (fake_host / "cpu.max").write_text("200000 100000\n")
    seen: list[int] = []

    def body(*args: object) -> str:
        seen.append(torch.get_num_threads())
        if len(seen) == 2:
            raise RuntimeError("stage failed")
        return "done"

    monkeypatch.setattr(mod, "_execute", body)
    if stage == "metatrain":
        monkeypatch.setattr(mod.ImageStore, "open", staticmethod(lambda p: None))
        monkeypatch.setattr(mod, "load_episodes", lambda p: [])
        monkeypatch.setattr(mod, "read_artifact", lambda model, path: None)  # split.json: not read here
    cfg = types.SimpleNamespace(threads=threads)
    up = {"episodes": _FakeUpstream()}
    original = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert mod.execute(cfg, None, up) == "done"
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError, match="stage failed"):
            mod.execute(cfg, None, up)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(original)
    assert seen == [threads or 2] * 2


def test_ingest_sizes_its_decode_pool_from_the_available_cpus(
    fake_host: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `workers:` in the manifest: one decode process per available CPU (a quota of 3 on 8 cores), and
    decoding in this process leaves torch's thread setting as it found it."""
    from pipeline.ingest import build as build_mod
    from tests.ingest.helpers import make_study, manifest

    make_study(tmp_path / "s")
    (fake_host / "cpu.max").write_text("300000 100000\n")
    seen: list[int] = []
    real = build_mod._pool_map

    def spy(tasks: list[object], workers: int, desc: str) -> object:
        seen.append(workers)
        return real(tasks, 1, desc)  # decode here (this test checks the size, not the pool)

    monkeypatch.setattr(build_mod, "_pool_map", spy)
    before = torch.get_num_threads()
    build_mod.build_store(manifest(tmp_path / "s", cache_dir=None, workers=0), tmp_path / "out")
    assert seen and set(seen) == {3}
    assert torch.get_num_threads() == before
