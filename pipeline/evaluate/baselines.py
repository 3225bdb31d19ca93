"""The traditional baselines MAML is compared against, as `FewShotMethod`s.

- Traditional transfer learning: the meta-model's backbone architecture, trained with plain cross-entropy
  on every single-finding scan of the meta-train pool (common conditions + normal), then fine-tuned on
  each episode's support set with a fresh zero-initialised n-way head: head only (the pretrained features
  frozen, a linear classifier on top) or the whole network.
- Training from scratch: the same architecture from a seeded random initialization, trained on the
  support set alone.

All per-episode adaptation goes through the one inner loop `pipeline.meta.inner.adapt` (plain gradient
descent on the support cross-entropy). Pretraining is ordinary minibatch Adam training, not adaptation.

The head each support set starts from (`evaluate.finetune.head_init`, `evaluate.scratch.head_init`): the
label order of an episode is arbitrary, so no class may start favoured. `proto` (default) starts from the
prototypical classifier of the support set's features (row c = 2·μ_c, bias −‖μ_c‖², the same start the
meta-learned `head: proto` uses; docs/evaluation.md, "Stable MAML settings"); `zero` starts at zero (the
"zeroing trick", Kao et al. 2022), whose first steps on features with a large shared component favour
one class for every query unless many steps are taken. Giving every method the same start keeps the
comparison about features and adaptation, not about a bias term.
Head-only fine-tuning computes the frozen features once and runs the inner loop on the linear head alone:
mathematically the same as `adapt(..., trainable=head)` on the whole network (no batch statistics are
kept by any of our normalization policies), at a fraction of the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupShuffleSplit
from torch import Tensor, nn

from pipeline.artifacts import SplitFile
from pipeline.errors import DataError
from pipeline.evaluate import metrics
from pipeline.evaluate.config import PretrainConfig
from pipeline.meta import inner
from pipeline.meta.methods import Adapted, GradientMethod
from pipeline.meta.models import FewShotNet, ModelSpec, build_model
from pipeline.progress import Bar

Params = dict[str, Tensor]


# --------------------------------------------------------------------------------------------- data
@dataclass
class PretrainData:
    """Single-finding scans of the meta-train pool. rows index the image store; y index `classes`."""

    rows: np.ndarray  # (n,) int, store rows
    y: np.ndarray  # (n,) int
    patients: np.ndarray  # (n,) str, salted patient keys (for a patient-level hold-out)
    classes: list[str]
    n_multi_label_dropped: int


def pretrain_data(split: SplitFile, index: pd.DataFrame, rows_for: Any) -> PretrainData:
    """The traditional classifier's training set: every train-pool scan with exactly one label.

    Multi-label policy: a scan with two or more findings is left out (its class is ambiguous for a
    single-label softmax classifier, and it may carry a finding of a rare condition). Normal scans
    (the normal label alone) are a class of their own.
    """
    pools = split.pools.get("train")
    if not pools:
        raise DataError("split.json has no train pool; the traditional baseline needs the meta-train pool")
    classes = sorted(pools)
    by_key = index.set_index("scan_key")
    keys: list[str] = []
    ys: list[int] = []
    dropped: set[str] = set()
    seen: set[str] = set()
    for ci, c in enumerate(classes):
        for key in pools[c]:
            if key in seen or key in dropped:
                continue
            labels = str(by_key.at[key, "labels"]).split("|")
            if len(labels) != 1:
                dropped.add(key)
                continue
            if labels[0] != c:
                continue  # listed under a class that is not its label; keep it only under its own
            seen.add(key)
            keys.append(key)
            ys.append(ci)
    if not keys:
        raise DataError("the train pool has no single-label scans to pretrain the traditional classifier on")
    present = sorted(set(ys))
    if len(present) < 2:
        raise DataError(
            f"the train pool has single-label scans of only {[classes[i] for i in present]}; need >= 2 classes"
        )
    # The head gets one output per class that has examples: a class listed in the pool without a single
    # single-label scan (e.g. the normal label of an n-way-only suite) would be an output never trained.
    remap = {old: new for new, old in enumerate(present)}
    rows = np.asarray(rows_for(keys), dtype=np.int64)
    patients = by_key.loc[keys, "patient_key"].astype(str).to_numpy()
    y = np.asarray([remap[v] for v in ys], dtype=np.int64)
    return PretrainData(rows, y, patients, [classes[i] for i in present], len(dropped))


def _stratified_cap(y: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a class-stratified subsample of at most `cap` items (proportional, at least 1 per class)."""
    if cap >= y.size:
        return np.arange(y.size)
    out = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = max(1, int(round(cap * idx.size / y.size)))
        out.append(rng.choice(idx, size=min(take, idx.size), replace=False))
    return np.sort(np.concatenate(out))


# --------------------------------------------------------------------------------------------- pretrain
def _seeded_model(
    spec: ModelSpec, in_channels: int, image_size: tuple[int, ...], seed: int, head: str = "zero"
) -> FewShotNet:
    """Build the network with its default initialization drawn from torch's RNG seeded with `seed`.

    Module constructors draw from the global torch generator; `fork_rng` scopes the seed so nothing
    else in the process is affected and the same seed always gives the same weights.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(spec.model_copy(update={"head": head}), in_channels, image_size)


@dataclass
class Pretrained:
    """The traditional classifier: a FewShotNet (zero or proto head) whose backbone was pretrained."""

    model: FewShotNet
    report: dict[str, Any]


def _split_holdout(
    patients: np.ndarray, idx: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(train, stop, report) index arrays and the patient counts of the two hold-out halves.

    Whole patients go to the hold-out (their scans never train the classifier): `floor(fraction * n)` of
    the n patients, drawn by sklearn's `GroupShuffleSplit` with the patient as the group; the hold-out
    patients are split the same way in two halves: "stop" decides when training ends, "report" measures
    the result. Fewer than two hold-out patients: no hold-out (nothing to stop on and report on apart).
    """
    pat = patients[idx]
    n_hold = int(math.floor(fraction * np.unique(pat).size))
    if n_hold < 2:
        return idx, idx[:0], idx[:0], 0, 0
    # GroupShuffleSplit takes an int seed; drawing it from `rng` keeps the split a function of the seed
    seed = int(rng.integers(2**31 - 1))
    train_pos, hold_pos = next(
        GroupShuffleSplit(n_splits=1, test_size=n_hold, random_state=seed).split(idx, groups=pat)
    )
    # an int test_size counts groups: the report half gets n_hold - n_hold // 2 patients, the stop half the rest
    stop_pos, rep_pos = next(
        GroupShuffleSplit(n_splits=1, test_size=n_hold - n_hold // 2, random_state=seed + 1).split(
            hold_pos, groups=pat[hold_pos]
        )
    )
    stop, rep = hold_pos[stop_pos], hold_pos[rep_pos]
    n_stop, n_rep = np.unique(pat[stop]).size, np.unique(pat[rep]).size
    return idx[np.sort(train_pos)], idx[np.sort(stop)], idx[np.sort(rep)], n_stop, n_rep


def _class_probs(
    model: FewShotNet, clf: nn.Module, images: np.ndarray, rows: np.ndarray, device: torch.device
) -> np.ndarray:
    """(n, n_classes) softmax probabilities of the classifier on store rows (eval mode, no grad)."""
    out = []
    with torch.no_grad():
        for s in range(0, rows.size, 256):
            x = torch.from_numpy(np.asarray(images[rows[s : s + 256]], dtype=np.float32)).to(device)
            out.append(torch.softmax(clf(model.features(x)), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def pretrain_classifier(
    spec: ModelSpec,
    in_channels: int,
    image_size: tuple[int, ...],
    images: np.ndarray,
    data: PretrainData,
    cfg: PretrainConfig,
    seed: int,
    device: torch.device | None = None,
    head: str = "zero",
) -> Pretrained:
    """Train backbone + a (n_classes) linear head with cross-entropy to convergence; keep the backbone
    (in a FewShotNet whose per-episode head starts as `head`: zero or proto).

    Class-balanced sampling (each class drawn equally often) so that the abundant normal scans do not
    dominate the representation. Held-out train-pool PATIENTS decide when to stop (early stopping on their
    loss, best epoch kept) and, separately, measure the classifier: its macro AUC on the "report" patients
    is the study's positive control (can the common findings be learned at all at this image size?).
    """
    device = device or torch.device("cpu")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E7A]))
    idx = np.arange(data.y.size)
    if cfg.max_images is not None:
        idx = _stratified_cap(data.y, cfg.max_images, rng)
    tr, stop, rep, n_stop_p, n_rep_p = _split_holdout(data.patients, idx, cfg.holdout_fraction, rng)

    model = _seeded_model(spec, in_channels, image_size, seed, head).to(device)
    n_cls = len(data.classes)
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(model.feat_dim, n_cls)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) / math.sqrt(model.feat_dim))
        clf.bias.zero_()
    clf = clf.to(device)
    opt = torch.optim.Adam(
        list(model.backbone.parameters()) + list(clf.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    # class-balanced draws: P(scan) ∝ 1 / count(its class)
    counts = np.bincount(data.y[tr], minlength=n_cls).astype(np.float64)
    w = 1.0 / np.maximum(counts[data.y[tr]], 1.0)
    w /= w.sum()
    n_batches = max(1, tr.size // cfg.batch_size)
    stop_y = torch.from_numpy(data.y[stop])

    def stop_loss() -> float:
        model.eval()
        probs = _class_probs(model, clf, images, data.rows[stop], device)
        model.train()
        return float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)), stop_y))

    bar = Bar(cfg.max_epochs * n_batches, desc=f"pretrain traditional classifier (seed {seed})")
    losses: list[float] = []
    stop_curve: list[float] = []
    best = (math.inf, -1)
    best_state: dict[str, Tensor] | None = None
    epochs_run = 0
    model.train()
    for epoch in range(cfg.max_epochs):
        order = rng.choice(tr, size=n_batches * cfg.batch_size, replace=True, p=w)
        for b in range(n_batches):
            sel = np.sort(order[b * cfg.batch_size : (b + 1) * cfg.batch_size])
            x = torch.from_numpy(np.asarray(images[data.rows[sel]], dtype=np.float32)).to(device)
            y = torch.from_numpy(data.y[sel]).to(device)
            loss = F.cross_entropy(clf(model.features(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(loss=losses[-1])
        epochs_run = epoch + 1
        if stop.size == 0:
            continue
        sl = stop_loss()
        stop_curve.append(sl)
        if sl < best[0] - cfg.min_delta:
            best = (sl, epoch)
            best_state = {
                k: v.detach().clone()
                for k, v in [
                    *model.state_dict().items(),
                    *(("clf." + n, t) for n, t in clf.state_dict().items()),
                ]
            }
        elif epoch - best[1] >= cfg.patience:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict({k: v for k, v in best_state.items() if not k.startswith("clf.")})
        clf.load_state_dict({k[4:]: v for k, v in best_state.items() if k.startswith("clf.")})
    model.eval()

    report: dict[str, Any] = {
        "classes": data.classes,
        "n_train_images": int(tr.size),
        "n_stop_images": int(stop.size),
        "n_stop_patients": n_stop_p,
        "n_holdout_images": int(rep.size),
        "n_holdout_patients": n_rep_p,
        "n_multi_label_dropped": data.n_multi_label_dropped,
        "train_class_counts": {c: int(n) for c, n in zip(data.classes, counts)},
        "max_epochs": cfg.max_epochs,
        "epochs": epochs_run,
        "best_epoch": best[1] + 1 if best[1] >= 0 else epochs_run,
        "stopped": (
            "early (held-out loss stopped improving)"
            if stop.size and epochs_run < cfg.max_epochs
            else ("max_epochs reached" if stop.size else "max_epochs (no hold-out to stop on)")
        ),
        "stop_loss_curve": [round(v, 4) for v in stop_curve],
        "batches": len(losses),
        "final_loss": float(np.mean(losses[-max(1, n_batches) :])),
        "sampling": "class-balanced",
    }
    if rep.size:
        probs = _class_probs(model, clf, images, data.rows[rep], device)
        yh = data.y[rep]
        pred = probs.argmax(1)
        present = np.unique(yh)
        report["holdout_acc"] = float((pred == yh).mean())
        report["holdout_balanced_acc"] = metrics.balanced_accuracy(pred, yh)
        report["holdout_chance_balanced_acc"] = 1.0 / present.size
        report["holdout_macro_auc"] = metrics.macro_auc(probs, yh)
        report["holdout_auc_per_class"] = {
            data.classes[c]: metrics.binary_auc(probs[:, c], yh == c) for c in present
        }
    report["near_chance"] = near_chance(report)
    return Pretrained(model=model, report=report)  # on `device`, like the episodes the loader yields


# A classifier whose held-out macro AUC stays below this learned (almost) nothing: evaluate marks every
# verdict that rests on it (docs/evaluation.md, "The positive control").
NEAR_CHANCE_AUC = 0.6


def near_chance(report: dict[str, Any]) -> bool | None:
    """True when the pretrained classifier ended near chance on its held-out patients (None: no hold-out)."""
    auc = report.get("holdout_macro_auc")
    if auc is None:
        return None
    return bool(auc < NEAR_CHANCE_AUC)


def scratch_model(
    spec: ModelSpec, in_channels: int, image_size: tuple[int, ...], seed: int, head: str = "zero"
) -> FewShotNet:
    """The same architecture at a seeded random initialization (one draw per evaluation seed)."""
    return _seeded_model(spec, in_channels, image_size, seed + 1_000_003, head)


# --------------------------------------------------------------------------------------------- methods
def whole_network_method(name: str, model: FewShotNet, lr: float, steps: int) -> GradientMethod:
    """Every parameter of `model` (zero n-way head) trained on the support set by the engine's method."""
    if model.head_policy not in ("zero", "proto"):
        raise ValueError(
            f"{name}: baselines start from a zero or proto head (never a learned one), got '{model.head_policy}'"
        )
    # all named parameters: the zero head is not a meta-parameter but task_params needs its shape
    return GradientMethod(
        model, dict(model.named_parameters()), steps=steps, lr=float(lr), trainable="all", name=name
    )


class HeadOnlyMethod:
    """Frozen pretrained features + a zero-initialised linear head trained on the support set by inner.adapt.

    `Adapted.params` holds the head only: {"weight": (n_way, F), "bias": (n_way,)}.
    """

    def __init__(self, name: str, model: FewShotNet, lr: float, steps: int, head_init: str = "zero"):
        if head_init not in ("zero", "proto"):
            raise ValueError(f"{name}: head_init must be 'zero' or 'proto', got '{head_init}'")
        self.name = name
        self.head_init = head_init
        self.model = model
        self.lr = float(lr)
        self.steps = int(steps)
        self._head = nn.Linear(model.feat_dim, 1)  # structure only; the n-way weights come in params

    def _start(self, x_s: Tensor, y_s: Tensor, n_way: int) -> tuple[Tensor, Params]:
        with torch.no_grad():
            feats = self.model.features(x_s)  # (n_support, F)
        if (
            self.head_init == "proto"
        ):  # the prototypical classifier in linear form, as FewShotNet's proto head
            onehot = F.one_hot(y_s, n_way).to(feats.dtype)
            mu = (onehot.T @ feats) / onehot.sum(0).clamp_min(1.0)[:, None]
            return feats, {"weight": 2.0 * mu, "bias": -(mu * mu).sum(-1)}
        z = {"weight": feats.new_zeros(n_way, feats.shape[1]), "bias": feats.new_zeros(n_way)}
        return feats, z

    def fit(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int | None = None) -> Adapted:
        return self.fit_trajectory(x_s, y_s, n_way, self.steps if steps is None else int(steps))[-1]

    def fit_trajectory(self, x_s: Tensor, y_s: Tensor, n_way: int, steps: int) -> list[Adapted]:
        """The head after 0..steps inner steps of one run (steps + 1 states)."""
        feats, z = self._start(x_s, y_s, n_way)
        with torch.no_grad():  # no outer graph; torch.func.grad differentiates inside regardless
            out = inner.adapt(self._head, z, feats, y_s, steps=steps, lr=self.lr, trajectory=True)
        assert isinstance(out, list)
        return [Adapted(n_way=n_way, params=p) for p in out]

    def predict_proba(self, adapted: Adapted, x: Tensor) -> Tensor:
        if adapted.params is None:
            raise ValueError(f"{self.name}: this Adapted holds no head parameters")
        with torch.no_grad():
            logits = inner.forward(self._head, adapted.params, self.model.features(x))
            return torch.softmax(logits, dim=-1)
