"""Patient-level (cluster) bootstrap intervals of accuracy, and of paired differences of accuracy.

Why: fixed test episodes drawn from a small pool of rare-condition patients reuse the same query scans
many times (600 episodes × 20 query slots may hold only a few hundred scans of ~200 patients). Episodes
are then far from independent, and 1.96·s/√n over episodes understates the uncertainty: what varies
from one study to the next is the patients, not the episodes. The honest unit of resampling is the
patient.

How (plain numpy, no torch and no mlflow):
- every query slot (one query row of one episode) is assigned to the patient of its scan;
- one bootstrap resample draws the P distinct patients P times with replacement; a patient drawn m times
  contributes all of its query slots m times; the resample's accuracy is
  sum_p m_p · correct_p / sum_p m_p · slots_p (per-patient sums of correctness and of slot counts);
- all resamples at once: an index matrix (B, P) of drawn patients → counts (B, P) → two matrix-vector
  products with the per-patient sums;
- the interval is the percentile one (2.5% and 97.5% quantiles of the B resampled accuracies);
- a paired difference uses the SAME resamples for both methods, so patient difficulty shared by the
  methods cancels out of the difference.

Seeds (a two-level bootstrap): a method run with S seeds (meta-training seeds for the meta-learned
methods, pretraining / initialization seeds for the baselines) has a correctness matrix (S, Q). Each
resample also draws the S seeds with replacement (weights = times drawn / S), so the interval includes
how much the result moves from one training run to the next, not only which patients were tested.
Seed draws are independent between methods (seed 0 of one method has nothing to do with seed 0 of
another); the patient draws stay shared, so differences remain paired over patients. With one seed this
is exactly the patient bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
# Resample rows generated at a time: bounds the int64 index matrix to ~8 MB per block.
_BLOCK_CELLS = 1_000_000


@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate (on all query slots) with its percentile bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


class PatientBootstrap:
    """B resamples of the distinct patients of one set of query slots, shared by every method scored on
    those slots (so that differences between methods are paired).

    `slot_patient`: (Q,) the (salted) patient key of each query slot, in a fixed slot order; every
    correctness vector handed to this object must follow that order.
    """

    def __init__(
        self, slot_patient: Sequence[str] | np.ndarray, n_resamples: int, seed: int | Sequence[int]
    ) -> None:
        keys = np.asarray(slot_patient, dtype=str)
        if keys.ndim != 1 or keys.size == 0:
            raise ValueError(
                f"the patient bootstrap needs a non-empty 1-d list of slot patients, got {keys.shape}"
            )
        if n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
        # sorted distinct keys → the patient order (and so the resamples) does not depend on slot order
        _, self.slot_index = np.unique(keys, return_inverse=True)  # (Q,) patient index of each slot
        self.n_slots = int(keys.size)
        self.n_patients = int(self.slot_index.max()) + 1
        self.n_resamples = int(n_resamples)
        p = self.n_patients
        rng = np.random.default_rng(seed)
        counts = np.empty((self.n_resamples, p), dtype=np.float64)  # (B, P): times patient p is drawn
        step = max(1, _BLOCK_CELLS // p)
        for b0 in range(0, self.n_resamples, step):
            b1 = min(self.n_resamples, b0 + step)
            drawn = rng.integers(0, p, size=(b1 - b0, p))  # (b, P) resampled patient indices
            offset = (np.arange(b1 - b0) * p)[:, None]
            counts[b0:b1] = np.bincount((drawn + offset).ravel(), minlength=(b1 - b0) * p).reshape(-1, p)
        self.counts = counts
        slots_per_patient = np.bincount(self.slot_index, minlength=p).astype(np.float64)  # (P,)
        self._slots = counts @ slots_per_patient  # (B,) query slots in each resample (> 0: P draws)

    def _check(self, correct: np.ndarray) -> np.ndarray:
        c = np.asarray(correct, dtype=np.float64).ravel()
        if c.size != self.n_slots:
            raise ValueError(f"expected correctness for {self.n_slots} query slots, got {c.size}")
        if not np.all(np.isfinite(c)):
            raise ValueError("the patient bootstrap got non-finite correctness values")
        return c

    def samples(self, correct: np.ndarray) -> np.ndarray:
        """(B,) the accuracy in each resample; `correct` (Q,) in [0, 1] per slot (mean over seeds)."""
        c = self._check(correct)
        per_patient = np.bincount(self.slot_index, weights=c, minlength=self.n_patients)  # (P,)
        result: np.ndarray = (self.counts @ per_patient) / self._slots
        return result

    def accuracy(self, correct: np.ndarray, level: float = LEVEL) -> BootstrapCI:
        """Mean correctness over all slots and its percentile interval."""
        c = self._check(correct)
        return _percentile(float(c.mean()), self.samples(c), level)

    def seed_weights(self, n_seeds: int, key: int | Sequence[int]) -> np.ndarray:
        """(B, S) seed weights of every resample: each resample draws the S seeds with replacement, and a
        seed drawn m times weighs m / S. `key` seeds the draws (one stream per method)."""
        if n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {n_seeds}")
        if n_seeds == 1:
            return np.ones((self.n_resamples, 1))
        rng = np.random.default_rng(key)
        drawn = rng.integers(0, n_seeds, size=(self.n_resamples, n_seeds))
        offset = (np.arange(self.n_resamples) * n_seeds)[:, None]
        counts = np.bincount((drawn + offset).ravel(), minlength=self.n_resamples * n_seeds)
        return counts.reshape(self.n_resamples, n_seeds) / n_seeds

    def samples_over_seeds(self, correct: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(B,) accuracy per resample for a (S, Q) correctness matrix, seeds drawn by `weights` (B, S)."""
        c = np.asarray(correct, dtype=np.float64)
        if c.ndim == 1:
            c = c[None]
        if weights.shape != (self.n_resamples, c.shape[0]):
            raise ValueError(f"seed weights {weights.shape} do not fit {c.shape[0]} seeds")
        per_patient = np.stack([np.bincount(self.slot_index, weights=self._check(row), minlength=self.n_patients)
                                for row in c])  # (S, P)  # fmt: skip
        result: np.ndarray = (self.counts * (weights @ per_patient)).sum(axis=1) / self._slots
        return result

    def accuracy_over_seeds(
        self, correct: np.ndarray, key: int | Sequence[int], level: float = LEVEL
    ) -> BootstrapCI:
        """Mean correctness over seeds and slots, with the seed + patient interval."""
        c = np.atleast_2d(np.asarray(correct, dtype=np.float64))
        return _percentile(
            float(c.mean()), self.samples_over_seeds(c, self.seed_weights(c.shape[0], key)), level
        )

    def difference_over_seeds(
        self,
        a: np.ndarray,
        b: np.ndarray,
        key_a: int | Sequence[int],
        key_b: int | Sequence[int],
        level: float = LEVEL,
    ) -> BootstrapCI:
        """acc(a) - acc(b) for (S_a, Q) and (S_b, Q) matrices: shared patient draws, independent seed draws."""
        ca, cb = (
            np.atleast_2d(np.asarray(a, dtype=np.float64)),
            np.atleast_2d(np.asarray(b, dtype=np.float64)),
        )
        sa = self.samples_over_seeds(ca, self.seed_weights(ca.shape[0], key_a))
        sb = self.samples_over_seeds(cb, self.seed_weights(cb.shape[0], key_b))
        return _percentile(float(ca.mean() - cb.mean()), sa - sb, level)

    def difference(self, a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> BootstrapCI:
        """acc(a) - acc(b) on the same slots and the same resamples (paired), with its interval."""
        ca, cb = self._check(a), self._check(b)
        # accuracy is linear in the correctness for a fixed resample: samples(a) - samples(b) = samples(a - b)
        return _percentile(float(ca.mean() - cb.mean()), self.samples(ca - cb), level)


def _percentile(mean: float, samples: np.ndarray, level: float) -> BootstrapCI:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return BootstrapCI(mean=mean, low=float(low), high=float(high))
