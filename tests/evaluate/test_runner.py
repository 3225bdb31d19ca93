"""The runner with small fake methods: chance stays chance, a real learner beats it, selection is
validation-only, trajectories match step-by-step fits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import DataError
from pipeline.evaluate import metrics, runner
from pipeline.meta.methods import GradientMethod
from pipeline.meta.models import build_model
from tests.evaluate.world import SIZE, SPEC, World, build_world


class RandomGuesser:
    """Ignores the images: a seeded random class distribution per query scan."""

    name = "guesser"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def fit(self, x_s, y_s, n_way, steps=None):
        return n_way

    def predict_proba(self, adapted, x):
        return torch.from_numpy(self.rng.dirichlet(np.ones(adapted), size=x.shape[0]))


class NearestCentroid:
    """Class means of the raw pixels; softmax of negative distances. A real (if simple) learner."""

    name = "centroid"

    def fit(self, x_s, y_s, n_way, steps=None):
        flat = x_s.flatten(1)
        return torch.stack([flat[y_s == c].mean(0) for c in range(n_way)])

    def predict_proba(self, adapted, x):
        d = torch.cdist(x.flatten(1), adapted) ** 2
        return torch.softmax(-d / d.shape[1], dim=-1)


class StepSensitive:
    """Correct only after exactly `good` steps (uniform otherwise): selection must find that count."""

    name = "stepper"

    def __init__(self, good: int):
        self.good = good

    def fit(self, x_s, y_s, n_way, steps=None):
        return (steps, n_way)

    def fit_trajectory(self, x_s, y_s, n_way, steps):
        return [(s, n_way) for s in range(steps + 1)]

    def predict_proba(self, adapted, x):
        steps, n_way = adapted
        return torch.full((x.shape[0], n_way), 1.0 / n_way)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("world"), n_test=30, n_val=10)


def _chance_episodes(n: int) -> tuple[list, runner.Loader]:
    """n binary episodes of pure noise (5-shot, 15 queries per class), loaded from memory."""
    from pipeline.episodes.episode import Episode

    rng = np.random.default_rng(11)
    eps = [Episode(id=i, kind="binary", k_shot=5, classes=["c", "n"], support={}, query={}) for i in range(n)]
    data = {
        i: (
            torch.from_numpy(rng.normal(size=(10, 1, 4, 4)).astype(np.float32)),
            torch.tensor([0] * 5 + [1] * 5),
            torch.from_numpy(rng.normal(size=(30, 1, 4, 4)).astype(np.float32)),
            torch.tensor([0] * 15 + [1] * 15),
        )
        for i in range(n)
    }
    return eps, lambda ep: data[ep.id]


def test_random_guesser_scores_chance_within_its_interval() -> None:
    eps, load = _chance_episodes(600)
    res = runner.run_episodes(RandomGuesser(0), eps, load)
    acc = metrics.mean_ci95([r.acc for r in res])
    assert acc.n == 600
    assert acc.low <= 0.5 <= acc.high, acc
    # the interval is tight enough to mean something: 600 episodes of 30 queries
    assert acc.ci95 < 0.02
    auc = metrics.mean_ci95([r.auc for r in res])
    assert auc.low <= 0.5 <= auc.high


def test_a_learner_beats_chance_beyond_its_interval(world: World) -> None:
    test = [e for e in world.test if e.kind == "binary"]
    res = runner.run_episodes(NearestCentroid(), test, world.load)
    acc = metrics.mean_ci95([r.acc for r in res])
    assert acc.low > 0.6, acc
    guess = metrics.mean_ci95([r.acc for r in runner.run_episodes(RandomGuesser(1), test, world.load)])
    assert not acc.overlaps(guess)


def test_outcomes_hold_per_episode_metrics(world: World) -> None:
    res = runner.run_episodes(NearestCentroid(), world.test[:3], world.load)
    for ep, r in zip(world.test[:3], res):
        assert r.episode_id == ep.id and r.classes == ep.classes
        assert r.probs.shape == (len(ep.classes) * 3, len(ep.classes))
        assert r.acc == pytest.approx(np.mean(r.probs.argmax(1) == r.y))
        assert r.sens is not None and r.spec is not None  # binary episodes
        assert r.acc == pytest.approx((r.sens + r.spec) / 2)  # balanced queries


def test_outcomes_know_the_scan_of_every_query_row(world: World) -> None:
    # the patient bootstrap maps each query row to its scan's patient: the keys must follow the loaded rows
    eps = world.test[:4]
    res = runner.run_episodes(NearestCentroid(), eps, world.load)
    label = {k: i for ep in eps for i, c in enumerate(ep.classes) for k in ep.query[c]}
    for ep, r in zip(eps, res):
        assert r.query_keys == [k for c in ep.classes for k in ep.query[c]]
        assert [label[k] for k in r.query_keys] == r.y.tolist()
        assert r.correct().tolist() == (r.probs.argmax(1) == r.y).astype(float).tolist()
    # a loader that does not read scans by key (queries not listed in the episode): no keys, no guess
    chance, load = _chance_episodes(2)
    assert all(r.query_keys is None for r in runner.run_episodes(RandomGuesser(0), chance, load))


def test_group_episodes_by_kind_and_k(world: World) -> None:
    groups = runner.group_episodes(world.test)
    assert list(groups) == [("binary", 2), ("n_way", 2)]
    assert sum(len(v) for v in groups.values()) == len(world.test)


def test_selection_refuses_test_episodes(world: World) -> None:
    val_keys = world.split.pool_keys("val")
    cands = [runner.Candidate({}, NearestCentroid)]
    with pytest.raises(DataError, match="not in the val pool"):
        runner.select_on_validation(cands, [None], world.test, world.load, val_keys, ("binary", 2))
    val = [e for e in world.val if e.kind == "binary"]
    sel, m = runner.select_on_validation(cands, [None], val, world.load, val_keys, ("binary", 2))
    assert sel.n_val_episodes == len(val) and sel.to_dict()["selected_on"] == "validation"


def test_selection_picks_the_better_candidate_and_step_count(world: World) -> None:
    val_keys = world.split.pool_keys("val")
    val = [e for e in world.val if e.kind == "binary"]
    cands = [
        runner.Candidate({"which": "guess"}, lambda: RandomGuesser(3)),
        runner.Candidate({"which": "centroid"}, NearestCentroid),
    ]
    sel, m = runner.select_on_validation(cands, [None], val, world.load, val_keys, ("binary", 2))
    assert sel.chosen["which"] == "centroid" and isinstance(m, NearestCentroid)
    assert len(sel.grid) == 2 and all("val_acc" in row for row in sel.grid)

    class Good(StepSensitive):
        def predict_proba(self, adapted, x):
            steps, n_way = adapted
            if steps != self.good:
                return super().predict_proba(adapted, x)
            # right answer after exactly `good` steps: the query order is class-major, q=3 per class
            y = torch.arange(n_way).repeat_interleave(x.shape[0] // n_way)
            return torch.nn.functional.one_hot(y, n_way).float() * 0.9 + 0.1 / n_way

    sel, _ = runner.select_on_validation(
        [runner.Candidate({}, lambda: Good(4))], [2, 4, 8], val, world.load, val_keys, ("binary", 2)
    )
    assert sel.chosen["steps"] == 4 and sel.chosen["val_acc"] == 1.0


def test_gradient_trajectory_equals_separate_fits(world: World) -> None:
    torch.manual_seed(0)
    model = build_model(SPEC.model_copy(update={"head": "zero"}), 1, (SIZE, SIZE))
    m = GradientMethod(model, dict(model.named_parameters()), steps=3, lr=0.2, name="g")
    x_s, y_s, x_q, _ = world.load(world.test[0])
    traj = runner.fit_trajectory(m, x_s, y_s, 2, 3)
    assert len(traj) == 4
    for s in (0, 1, 3):
        direct = m.predict_proba(m.fit(x_s, y_s, 2, steps=s), x_q)
        assert torch.allclose(m.predict_proba(traj[s], x_q), direct, atol=1e-6)
        # the runner's bookkeeping-free fit gives the engine's fit, parameter for parameter
        fast = runner.fit(m, x_s, y_s, 2, s)
        ref = m.fit(x_s, y_s, 2, steps=s)
        assert all(torch.allclose(fast.params[k], ref.params[k], atol=1e-6) for k in ref.params)
    assert not torch.allclose(traj[3].params["head.weight"], traj[0].params["head.weight"])
    by = runner.accuracy_by_steps(m, world.test[:4], world.load, [0, 3])
    assert set(by) == {0, 3} and by[0].shape == (4,)
    assert np.allclose(by[0], 0.5)  # zero head: uniform predictions, argmax = class 0 = half the queries


def test_shot_curve_truncates_support_and_keeps_query(world: World) -> None:
    seen = []

    class Spy(NearestCentroid):
        def fit(self, x_s, y_s, n_way, steps=None):
            seen.append(x_s.shape[0])
            return super().fit(x_s, y_s, n_way, steps)

    eps = world.test[:3]
    curve = runner.shot_curve(Spy(), eps, world.load)
    assert list(curve) == [1, 2]
    assert seen == [2, 2, 2, 4, 4, 4]  # k'=1 then k'=2, two classes
    t = runner.truncate_support(eps[0], 1)
    assert t.query == eps[0].query and all(len(v) == 1 for v in t.support.values())
    assert eps[0].k_shot == 2  # the original is untouched


def test_run_is_deterministic(world: World, tmp_path: Path) -> None:
    a = runner.run_episodes(NearestCentroid(), world.test, world.load)
    b = runner.run_episodes(NearestCentroid(), world.test, world.load)
    assert all(np.array_equal(x.probs, y.probs) for x, y in zip(a, b))
