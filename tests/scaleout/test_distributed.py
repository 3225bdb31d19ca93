"""Single-process behaviour of pipeline.distributed: sharding arithmetic, the launch-environment checks,
the no-op context, the error messages. (The multi-process behaviour is in test_distributed_e2e.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from pipeline import distributed as D
from pipeline.errors import FewscanError


@pytest.fixture(autouse=True)
def _fresh_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_current", None)


@given(st.integers(0, 200), st.integers(1, 16))
def test_shards_partition_the_meta_batch_in_order(n: int, world: int) -> None:
    items = list(range(n))
    parts = [D.shard(items, D.DistContext(rank=r, world_size=world)) for r in range(world)]
    assert [x for p in parts for x in p] == items  # union in rank order == the single-process batch
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    if n:
        weights = [D.shard_weight(n, D.DistContext(rank=r, world_size=world)) for r in range(world)]
        assert sum(weights) == pytest.approx(1.0)
        assert weights == pytest.approx([s / n for s in sizes])


def test_shard_bounds_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        D.shard_bounds(5, 2, 2)
    with pytest.raises(ValueError):
        D.shard_weight(0, D.DistContext())


def test_no_torchrun_gives_the_single_process_context() -> None:
    ctx = D.init_from_env(env={}, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    assert ctx.backend is None and ctx.device == torch.device("cpu")
    assert D.current() is ctx  # idempotent, process-wide
    ctx.barrier()  # no-op
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    D.average_gradients([p], ctx, 1.0)
    assert p.grad.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="weight must be 1"):
        D.average_gradients([p], ctx, 0.5)
    m = nn.Linear(2, 2)
    before = D.state_digest(m)
    assert D.broadcast_state(m, ctx) is m and D.state_digest(m) == before
    assert D.broadcast_object({"a": 1}, ctx) == {"a": 1}
    assert D.weighted_mean({"loss": 0.25}, ctx, 1.0) == {"loss": 0.25}
    ctx.shutdown()
    assert D._current is None


def test_world_size_one_is_single_process() -> None:
    ctx = D.init_from_env(env={"WORLD_SIZE": "1", "RANK": "0"}, device="cpu")
    assert not ctx.is_distributed


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
        (
            {
                "WORLD_SIZE": "2",
                "RANK": "2",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1",
            },
            "RANK=2 is outside 0..1",
        ),
        ({"FEWSCAN_DIST_TIMEOUT_S": "-3"}, "must be > 0"),
    ],
)
def test_bad_launch_environment_is_named(env: dict[str, str], needle: str) -> None:
    with pytest.raises(D.DistributedError, match=needle) as exc:
        D.init_from_env(env=env, device="cpu")
    assert isinstance(exc.value, FewscanError)  # the CLI prints it as one line, exit 2
    assert D._current is None


def test_timeout_from_env() -> None:
    assert D.timeout_from_env({}) == D.DEFAULT_TIMEOUT_S
    assert D.timeout_from_env({D.TIMEOUT_ENV: "12.5"}) == 12.5
    with pytest.raises(D.DistributedError, match="not a number"):
        D.timeout_from_env({D.TIMEOUT_ENV: "soon"})


def test_collective_errors_say_what_happened() -> None:
    ctx = D.DistContext(rank=0, world_size=2, backend="gloo", timeout_s=30)
    died = D._collective_error("the all-reduce", ctx, RuntimeError("[pair.cc:553] Connection closed by peer"))
    assert "rank 0/2: the all-reduce failed: another rank died" in str(died)
    stuck = D._collective_error("the all-reduce", ctx, RuntimeError("Timed out waiting 30000ms for recv"))
    assert "did not reach it within 30 s" in str(stuck) and D.TIMEOUT_ENV in str(stuck)


def test_follower_run_records_nothing() -> None:
    run = D.FollowerRun("meta-train", rank=1)
    assert run.outdir.is_dir() and "rank1" in run.outdir.name
    run.log_params({"a": 1})
    run.log_metrics({"loss": 1.0}, step=3)
    run.log_artifact(run.outdir)
    assert run.own_artifact("checkpoints/last.pt") is None
    assert run.register_model("models/maml", "x") == ""
    assert run.resumed is False and run.run_id == ""


def test_a_missing_prerequisite_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-rank tests cannot vanish from CI: `require` skips only where CI is not set."""
    from .helpers import require

    require(True, "never raised")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no gloo here"):
        require(False, "no gloo here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"no gloo here \(CI is set: .* a failure, not a skip\)"):
        require(False, "no gloo here")
