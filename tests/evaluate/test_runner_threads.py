"""Evaluate spreads episodes over task threads, one intra-op thread each (issue 17 item 5): the results are
the same whatever the thread count, in episode order, and torch's thread setting is restored."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipeline.cpus import torch_threads
from pipeline.evaluate import runner
from pipeline.meta.methods import GradientMethod, ProtoNetMethod
from tests.evaluate.world import SIZE, SPEC, World, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), n_test=24, n_val=4)


def _maml(seed: int = 0) -> GradientMethod:
    torch.manual_seed(seed)
    model = runner_model()
    return GradientMethod(model, dict(model.named_parameters()), steps=3, lr=0.3, name="maml")


def runner_model() -> torch.nn.Module:
    from pipeline.meta.models import build_model

    return build_model(SPEC, 1, (SIZE, SIZE))


@pytest.mark.parametrize("make", [_maml, lambda: ProtoNetMethod(runner_model(), name="protonet")])
def test_outcomes_do_not_depend_on_the_thread_count(world: World, make) -> None:
    method = make()
    with torch_threads(1):
        one = runner.run_episodes(method, world.test, world.load, steps=3)
    with torch_threads(2):
        two = runner.run_episodes(method, world.test, world.load, steps=3)
        assert torch.get_num_threads() == 2  # restored after the episodes' one-thread work
    assert [o.episode_id for o in two] == [e.id for e in world.test]  # episode order kept
    for a, b in zip(one, two):
        assert np.array_equal(a.probs, b.probs)  # bit-identical, not merely close
        assert a.query_keys == b.query_keys
    # and they are real predictions: a trained-free net is not uniform on every query
    assert any(not np.allclose(o.probs, 1.0 / o.probs.shape[1]) for o in two)


def test_accuracy_by_steps_does_not_depend_on_the_thread_count(world: World) -> None:
    method = _maml()
    with torch_threads(1):
        one = runner.accuracy_by_steps(method, world.test[:10], world.load, [0, 1, 3])
    with torch_threads(2):
        two = runner.accuracy_by_steps(method, world.test[:10], world.load, [3, 0, 1])
    assert sorted(one) == sorted(two) == [0, 1, 3]
    for s in one:
        assert np.array_equal(one[s], two[s])
        assert one[s].shape == (10,)
    # the columns belong to their episodes: the one-episode call gives the same number
    first = runner.accuracy_by_steps(method, world.test[3:4], world.load, [3])
    assert first[3][0] == two[3][3]


class Recorder:
    """Records, per fit, the thread, torch's intra-op thread count and which method object ran it."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []  # shared by the copies (the list is copied by reference)
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Recorder:
        twin = type(self).__new__(type(self))
        twin.seen, twin.lock = self.seen, self.lock
        return twin

    def fit(self, x_s, y_s, n_way, steps=None):
        time.sleep(0.01)  # long enough that both task threads get work
        with self.lock:
            self.seen.append((threading.current_thread().name, torch.get_num_threads(), id(self)))
        return n_way

    def predict_proba(self, adapted, x):
        return torch.full((x.shape[0], adapted), 1.0 / adapted)


def test_episodes_run_on_task_threads_with_one_intra_op_thread_each(world: World) -> None:
    rec = Recorder()
    with torch_threads(2):
        out = runner.run_episodes(rec, world.test, world.load)
        assert torch.get_num_threads() == 2
    assert len(out) == len(rec.seen) == len(world.test)
    threads = {name for name, _, _ in rec.seen}
    assert len(threads) == 2 and all(n.startswith("fewscan-episode") for n in threads)
    assert {n for _, n, _ in rec.seen} == {1}
    # each thread works on its own copy of the method, never on the caller's object
    assert id(rec) not in {i for _, _, i in rec.seen} and len({i for _, _, i in rec.seen}) == 2


def test_one_thread_runs_in_the_callers_thread_with_one_intra_op_thread(world: World) -> None:
    rec = Recorder()
    with torch_threads(1):
        runner.run_episodes(rec, world.test[:3], world.load)
    assert {name for name, _, _ in rec.seen} == {threading.current_thread().name}
    assert {n for _, n, _ in rec.seen} == {1}


def test_an_error_in_one_episode_reaches_the_caller_and_threads_are_restored(world: World) -> None:
    class Broken(Recorder):
        def fit(self, x_s, y_s, n_way, steps=None):
            raise ValueError("support set has no class 1")

    with torch_threads(2):
        with pytest.raises(ValueError, match="no class 1"):
            runner.run_episodes(Broken(), world.test, world.load)
        assert torch.get_num_threads() == 2


def test_auc_and_sensitivity_are_computed_only_when_read(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.evaluate import metrics

    calls: list[str] = []
    real_auc, real_ss = metrics.macro_auc, metrics.sensitivity_specificity
    monkeypatch.setattr(metrics, "macro_auc", lambda p, y: calls.append("auc") or real_auc(p, y))
    monkeypatch.setattr(metrics, "sensitivity_specificity", lambda p, y: calls.append("ss") or real_ss(p, y))
    out = runner.run_episodes(ProtoNetMethod(runner_model(), name="protonet"), world.test[:4], world.load)
    assert calls == []  # the validation search and the curves read only acc
    o = out[0]
    assert o.auc == real_auc(o.probs, o.y) and (o.sens, o.spec) == real_ss(o.probs, o.y)
    assert o.auc == o.auc and o.sens == o.sens  # read again: cached, not recomputed
    assert calls == ["auc", "ss"]
