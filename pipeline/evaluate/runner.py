"""Run a few-shot method over fixed episodes: per-episode outcomes, adaptation curves, validation search.

Everything here is protocol-level: a method is anything with `fit(x_s, y_s, n_way, steps=None)` and
`predict_proba(adapted, x)` (the engine's `FewShotMethod`). A method may also offer
`fit_trajectory(x_s, y_s, n_way, steps) -> list[Adapted]` (the states after 0..steps inner steps of ONE
adaptation run); curves and step grids then cost one adaptation instead of one per step count.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from pipeline.errors import DataError
from pipeline.evaluate import metrics
from pipeline.meta import inner
from pipeline.meta.methods import Adapted, GradientMethod
from pipeline.progress import progress

# (x_s, y_s, x_q, y_q): x (n, C, H, W) float32, y (n,) int64 = position of the class in episode.classes
Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpisodeLike(Protocol):
    id: int
    kind: str
    k_shot: int
    classes: list[str]
    support: dict[str, list[str]]
    query: dict[str, list[str]]


# Query rows come in the order of `query_keys(ep)`: class by class in `ep.classes`, each class's scans
# as listed (the order `pipeline.episodes.batch.episode_arrays` produces).
Loader = Callable[[Any], Arrays]
T = TypeVar("T")


def query_keys(ep: EpisodeLike) -> list[str]:
    """The scan key of every query row of `ep`, in the row order a Loader returns them."""
    return [k for c in ep.classes for k in ep.query[c]]


class Method(Protocol):
    name: str

    def fit(self, x_s: torch.Tensor, y_s: torch.Tensor, n_way: int, steps: int | None = None) -> Any: ...

    def predict_proba(self, adapted: Any, x: torch.Tensor) -> torch.Tensor: ...


Group = tuple[str, int]  # (episode kind, k_shot)


@dataclass
class EpisodeOutcome:
    """One episode's query predictions. probs (q, n_way), y (q,); query_keys (q,): the scan key of each
    query row (None when unknown), which the patient-level bootstrap maps to the scan's patient."""

    episode_id: int
    kind: str
    k_shot: int
    classes: list[str]
    y: np.ndarray
    probs: np.ndarray
    query_keys: list[str] | None = None
    acc: float = field(init=False)

    def __post_init__(self) -> None:
        if self.query_keys is not None and len(self.query_keys) != self.y.size:
            raise ValueError(
                f"episode {self.episode_id}: {len(self.query_keys)} query keys for {self.y.size} query rows"
            )
        self.acc = metrics.accuracy(self.probs, self.y)

    # AUC, sensitivity and specificity come from scikit-learn, whose input checks cost ~4.3 ms per binary
    # episode against 0.006 ms for the accuracy (idle 2-core machine, 20 queries, 2026-12-03): computed when
    # first read, so that the validation search and the curves, which read only `acc`, never pay for them.
    @functools.cached_property
    def auc(self) -> float | None:
        return metrics.macro_auc(self.probs, self.y)

    @functools.cached_property
    def _sens_spec(self) -> tuple[float | None, float | None]:
        if self.probs.shape[1] == 2 and self.kind == "binary":
            return metrics.sensitivity_specificity(self.probs, self.y)
        return None, None

    @property
    def sens(self) -> float | None:
        return self._sens_spec[0]

    @property
    def spec(self) -> float | None:
        return self._sens_spec[1]

    def class_recall(self) -> dict[str, float]:
        """Recall of every class present in this episode's queries, by condition name."""
        recalls = metrics.class_recalls(self.probs.argmax(axis=1), self.y, list(range(len(self.classes))))
        return {name: r for name, r in zip(self.classes, recalls) if r is not None}

    def correct(self) -> np.ndarray:
        """(q,) 1.0 where the query row's argmax is its label, else 0.0."""
        return (self.probs.argmax(axis=1) == self.y).astype(np.float64)


def _checked_query_keys(ep: EpisodeLike, y: np.ndarray) -> list[str] | None:
    """`query_keys(ep)` when they account for the loaded query rows (same count, each key's class equal
    to the row's label); None otherwise (e.g. a loader that does not read scans by key)."""
    counts = [len(ep.query.get(c, ())) for c in ep.classes]
    if sum(counts) != y.size or not np.array_equal(np.repeat(np.arange(len(counts)), counts), y):
        return None
    return query_keys(ep)


def group_episodes(episodes: Iterable[EpisodeLike]) -> dict[Group, list[EpisodeLike]]:
    """Episodes by (kind, k_shot), in file order inside a group, groups sorted."""
    groups: dict[Group, list[EpisodeLike]] = {}
    for ep in episodes:
        groups.setdefault((ep.kind, int(ep.k_shot)), []).append(ep)
    return dict(sorted(groups.items()))


def _probs(method: Method, adapted: Any, x_q: torch.Tensor, n_way: int) -> np.ndarray:
    with torch.no_grad():
        p = method.predict_proba(adapted, x_q)
    p_np = p.detach().float().cpu().numpy().astype(np.float64)
    if p_np.shape != (x_q.shape[0], n_way):
        raise ValueError(
            f"{method.name}.predict_proba returned {p_np.shape}, expected {(x_q.shape[0], n_way)}"
        )
    return p_np


def fit_trajectory(method: Method, x_s: torch.Tensor, y_s: torch.Tensor, n_way: int, steps: int) -> list[Any]:
    """The adapted states after 0..steps inner steps of ONE adaptation run (steps + 1 states).

    Methods may provide `fit_trajectory` (the engine's `GradientMethod` does: one run of the inner loop
    with `trajectory=True`); anything else falls back to one `fit` per step count.
    """
    own = getattr(method, "fit_trajectory", None)
    if own is not None:
        states = list(own(x_s, y_s, n_way, steps))
    else:
        states = [method.fit(x_s, y_s, n_way, steps=s) for s in range(steps + 1)]
    if len(states) != steps + 1:
        raise ValueError(f"{method.name}: trajectory has {len(states)} states for {steps} steps")
    return states


def _gradient_adapt(
    method: GradientMethod, x_s: torch.Tensor, y_s: torch.Tensor, n_way: int, steps: int, trajectory: bool
) -> Any:
    """The engine method's own adaptation (same start, learning rates, trainable set, first order),
    through `inner.adapt`, without the support-loss bookkeeping of `GradientMethod.fit`: evaluation
    needs only the adapted parameters, and those two extra forward passes cost ~40% of an episode.
    No outer graph is kept (no_grad); `torch.func.grad` still differentiates inside."""
    device = next(iter(method.params.values())).device
    x_s, y_s = x_s.to(device), y_s.to(device)
    with torch.no_grad():
        p0 = method.model.task_params(n_way, method.params, support=(x_s, y_s))
        return inner.adapt(
            method.model,
            p0,
            x_s,
            y_s,
            steps=steps,
            lr=method.lr,
            trainable=method.trainable,
            trajectory=trajectory,
            clip_grad=method.clip_grad,
        )


def fit(method: Method, x_s: torch.Tensor, y_s: torch.Tensor, n_way: int, steps: int | None) -> Any:
    """`method.fit`, with the bookkeeping-free path for the engine's GradientMethod (same parameters)."""
    if isinstance(method, GradientMethod):
        n = method.steps if steps is None else int(steps)
        params = _gradient_adapt(method, x_s, y_s, n_way, n, trajectory=False)
        return Adapted(n_way=n_way, params=params)
    return method.fit(x_s, y_s, n_way, steps=steps)


def has_inner_loop(method: Method) -> bool:
    """Whether the number of inner steps means anything for `method` (not for ProtoNet)."""
    return hasattr(method, "fit_trajectory") or isinstance(method, GradientMethod)


def _trajectory(
    method: Method, x_s: torch.Tensor, y_s: torch.Tensor, n_way: int, steps: Sequence[int]
) -> list[Any]:
    """Adapted states after each count in `steps`, from one run."""
    states = fit_trajectory(method, x_s, y_s, n_way, max(steps))
    return [states[s] for s in steps]


def _device(method: Method) -> torch.device:
    """Where `method`'s tensors live (CPU when it holds none that say otherwise)."""
    params = getattr(method, "params", None)
    if isinstance(params, dict) and params:
        return next(iter(params.values())).device
    model = getattr(method, "model", None)
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def map_episodes(
    method: Method, episodes: Sequence[EpisodeLike], work: Callable[[Method, EpisodeLike], T], desc: str
) -> list[T]:
    """`[work(method, ep) for ep in episodes]`, in episode order, with a progress line.

    On the CPU the episodes are spread over task threads, as many as torch's intra-op threads in force
    (evaluate's `threads`, sized from the CPUs this process may use: `pipeline/cpus.py`), and each episode
    runs with ONE intra-op thread on the thread's own copy of the method (`functional_call` swaps a module's
    tensors in place, so threads cannot share one). An episode is a few small scans: intra-op threads
    only add synchronisation there, and on a busy machine their barriers turn a proportional slowdown into
    a collapse (issue 17; benchmarks/RESULTS.md, "A busy machine"). Since every episode runs single-threaded
    whatever the thread count, the results do not depend on it (tests/evaluate/test_runner_threads.py).
    This needs a method whose fit depends on the episode alone, as every fewscan method's does: a method
    that carried state from one episode to the next (a random generator it draws from) would give each
    thread's copy its own stream.
    """
    workers = min(torch.get_num_threads(), len(episodes))
    label = desc or getattr(method, "name", "episodes")
    if _device(method).type != "cpu":
        return [work(method, ep) for ep in progress(episodes, total=len(episodes), desc=label)]
    if workers <= 1:
        with _one_intra_op_thread():
            return [work(method, ep) for ep in progress(episodes, total=len(episodes), desc=label)]
    local = threading.local()

    def one(ep: EpisodeLike) -> T:
        torch.set_num_threads(1)
        m = getattr(local, "method", None)
        if m is None:
            m = local.method = copy.deepcopy(method)
        return work(m, ep)

    before = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewscan-episode")
    try:
        return list(progress(pool.map(one, episodes), total=len(episodes), desc=label))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)


class _one_intra_op_thread:
    """Run the block with one intra-op thread (restored after), so that one task thread computes exactly
    what each of several would."""

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


def run_episodes(
    method: Method,
    episodes: Sequence[EpisodeLike],
    load: Loader,
    steps: int | None = None,
    desc: str = "",
) -> list[EpisodeOutcome]:
    """Adapt `method` on each episode's support set and predict its query set (episodes spread over task
    threads: `map_episodes`)."""

    def one(m: Method, ep: EpisodeLike) -> EpisodeOutcome:
        x_s, y_s, x_q, y_q = load(ep)
        n_way = len(ep.classes)
        adapted = fit(m, x_s, y_s, n_way, steps)
        y = y_q.cpu().numpy().copy()
        return EpisodeOutcome(
            ep.id,
            ep.kind,
            int(ep.k_shot),
            list(ep.classes),
            y,
            _probs(m, adapted, x_q, n_way),
            _checked_query_keys(ep, y),
        )

    return map_episodes(method, episodes, one, desc=desc or method.name)


def accuracy_by_steps(
    method: Method, episodes: Sequence[EpisodeLike], load: Loader, steps: Sequence[int], desc: str = ""
) -> dict[int, np.ndarray]:
    """Per-episode query accuracy after each inner-step count in `steps`: {steps: (n_episodes,)}."""
    grid = sorted(set(int(s) for s in steps))

    def one(m: Method, ep: EpisodeLike) -> list[float]:
        x_s, y_s, x_q, y_q = load(ep)
        n_way = len(ep.classes)
        return [
            metrics.accuracy(_probs(m, state, x_q, n_way), y_q.numpy())
            for state in _trajectory(m, x_s, y_s, n_way, grid)
        ]

    per_episode = map_episodes(method, episodes, one, desc=desc or f"{method.name} steps")
    accs = np.array(per_episode, dtype=np.float64).reshape(len(episodes), len(grid)).T
    return {s: accs[i] for i, s in enumerate(grid)}


def truncate_support(ep: Any, k: int) -> Any:
    """The same episode with only the first k support scans per class (same query)."""
    return dataclasses.replace(ep, k_shot=k, support={c: list(keys[:k]) for c, keys in ep.support.items()})


def shot_curve(
    method: Method, episodes: Sequence[EpisodeLike], load: Loader, steps: int | None = None, desc: str = ""
) -> dict[int, metrics.MeanCI]:
    """Accuracy with k' = 1..k support scans per class, on the same episodes and queries."""
    if not episodes:
        return {}
    k_max = min(int(ep.k_shot) for ep in episodes)
    out = {}
    for k in range(1, k_max + 1):
        sub = [truncate_support(ep, k) for ep in episodes]
        res = run_episodes(method, sub, load, steps=steps, desc=desc or f"{method.name} k'={k}")
        out[k] = metrics.mean_ci95([r.acc for r in res])
    return out


def assert_from_pool(episodes: Iterable[EpisodeLike], pool_keys: set[str], pool: str) -> None:
    """Refuse episodes with a scan outside `pool` — the guard that keeps test scans out of selection."""
    for ep in episodes:
        for part in (ep.support, ep.query):
            for keys in part.values():
                bad = [k for k in keys if k not in pool_keys]
                if bad:
                    raise DataError(
                        f"episode {ep.id} holds scan {bad[0]} that is not in the {pool} pool; hyper-parameters "
                        f"may only be chosen on {pool} episodes (pass episodes/val.jsonl, never test.jsonl)"
                    )


@dataclass
class Candidate:
    """One point of a validation grid: a label, the hyper-parameters it stands for, a method to build."""

    hparams: dict[str, Any]
    build: Callable[[], Method]


@dataclass
class Selection:
    """Which hyper-parameters won on the validation episodes, out of which grid, by how much."""

    group: Group
    n_val_episodes: int
    grid: list[dict[str, Any]]  # every candidate: its hparams + val accuracy mean and ci95
    chosen: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": {"kind": self.group[0], "k_shot": self.group[1]},
            "selected_on": "validation",
            "n_val_episodes": self.n_val_episodes,
            "grid": self.grid,
            "chosen": self.chosen,
        }


def select_on_validation(
    candidates: Sequence[Candidate],
    step_grid: Sequence[int | None],
    val_episodes: Sequence[EpisodeLike],
    load: Loader,
    val_pool_keys: set[str],
    group: Group,
    desc: str = "",
) -> tuple[Selection, Method]:
    """Choose (candidate, steps) by mean validation accuracy; ties go to the earlier candidate and fewer steps.

    `step_grid` lists inner-step counts to try for every candidate (None = the method's own default, for
    methods without a step knob). One adaptation run per candidate and episode covers the whole step grid.
    """
    if not val_episodes:
        raise DataError(
            f"no validation episodes for {group[0]} k={group[1]}: the episodes run must provide some"
        )
    assert_from_pool(val_episodes, val_pool_keys, "val")
    grid_rows: list[dict[str, Any]] = []
    best: tuple[float, int, int | None] | None = None
    methods = []
    for ci, cand in enumerate(candidates):
        m = cand.build()
        methods.append(m)
        if step_grid == [None] or list(step_grid) == [None]:
            res = run_episodes(m, val_episodes, load, steps=None, desc=desc or f"select {m.name}")
            per_steps: dict[int | None, np.ndarray] = {None: np.array([r.acc for r in res])}
        else:
            ints = [int(s) for s in step_grid if s is not None]
            per_steps = {}
            for s_, v_ in accuracy_by_steps(
                m, val_episodes, load, ints, desc=desc or f"select {m.name}"
            ).items():
                per_steps[s_] = v_
        for s in step_grid:
            acc = metrics.mean_ci95(per_steps[s])
            grid_rows.append({**cand.hparams, "steps": s, "val_acc": acc.mean, "val_acc_ci95": acc.ci95})
            if best is None or acc.mean > best[0] + 1e-12:
                best = (acc.mean, ci, s)
    assert best is not None
    _, ci, s = best
    chosen = {**candidates[ci].hparams, "steps": s, "val_acc": best[0]}
    return Selection(group, len(val_episodes), grid_rows, chosen), methods[ci]
