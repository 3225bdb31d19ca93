"""Study: how an adapted binary model should decide (docs/adapt.md, "Decision threshold", "Class balance").

For random few-shot support sets of a condition the meta-model never trained on, drawn from a finished
ingest run's store, the query set being the condition's other scans and normal scans of other patients:
query balanced accuracy, sensitivity, specificity, and how often every query scan got the same predicted
class, for

    loss:   plain cross-entropy | class-balanced (pipeline.meta.methods.class_balanced_cross_entropy)
    rule:   argmax (0.5)
            support  - midpoint in log-odds of the two classes' mean support scores of the adapted model
                       (in-sample; what adapt does by default)
            heldout  - the same midpoint on held-out scores (each support scan scored by a model adapted
                       without it, leave-one-out up to 10 scans, decision.stratified_folds)

and how the held-out estimate of the `support` rule (decision.cross_validate) compares with the query.
Support and query are patient-disjoint; normal scans are from patients without the condition. The meta-model
has seen normal scans in meta-training (its pool), never the condition.

    python benchmarks/study_adapt_decision.py --store mlflow/artifacts/<ingest run>/artifacts/store \\
        --meta-model mlflow/artifacts/<meta-train run>/artifacts/models/maml \\
        --conditions Hernia,Pneumonia,Fibrosis,Edema --trials 8 --k-pos 5 --k-neg 10
    python benchmarks/study_adapt_decision.py --synthetic --k-pos 2 --k-neg 10   # the adapt tests' task
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.adapt import decision as D  # noqa: E402
from pipeline.evaluate import metrics as M  # noqa: E402
from pipeline.meta.methods import class_balanced_cross_entropy  # noqa: E402
from pipeline.meta.model_io import load_meta_model  # noqa: E402

RULES = ("argmax", "support", "heldout")
# (support x, support y, query x, query y)
Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]


def support_sets_from_store(a: argparse.Namespace) -> Iterator[Sample]:
    """Support/query sets of the `--conditions` from an ingest store (see the module docstring)."""
    import pandas as pd

    images = np.load(a.store / "images.npy", mmap_mode="r")
    index = pd.read_parquet(a.store / "scan_index.parquet", columns=["labels", "patient_key"])
    labels = index["labels"].astype(str).str.split("|").tolist()
    patient = index["patient_key"].astype(str).to_numpy()
    rng = np.random.default_rng(a.seed)
    for cond in a.conditions.split(","):
        pos = [i for i, ls in enumerate(labels) if cond in ls]
        with_cond = set(patient[pos])
        neg_all = [i for i, ls in enumerate(labels) if ls == ["No Finding"] and patient[i] not in with_cond]
        neg = list(np.random.default_rng(a.seed + 1).permutation(neg_all)[: a.normals])
        for _ in range(a.trials):
            sp = set(rng.permutation(sorted(set(patient[pos])))[: a.k_pos])
            sn = set(rng.permutation(sorted(set(patient[neg])))[: a.k_neg])
            s_idx = [next(i for i in pos if patient[i] == p) for p in sorted(sp)]
            s_idx += [next(i for i in neg if patient[i] == p) for p in sorted(sn)]
            q_pos = [i for i in pos if patient[i] not in sp]
            q_idx = q_pos + [i for i in neg if patient[i] not in sn]
            yield (
                torch.from_numpy(np.asarray(images[s_idx], dtype=np.float32)),
                torch.tensor([0] * len(sp) + [1] * len(sn)),
                torch.from_numpy(np.asarray(images[q_idx], dtype=np.float32)),
                np.array([0] * len(q_pos) + [1] * (len(q_idx) - len(q_pos))),
            )


def support_sets_synthetic(a: argparse.Namespace) -> Iterator[Sample]:
    """The adapt tests' task (tests/adapt/helpers.py): discs (never meta-trained on) vs normal noise fields."""
    from tests.adapt import helpers as h

    rng = np.random.default_rng(a.seed)

    def draw(n: int, pattern: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([h.as_model_input(h.render(pattern, rng)) for _ in range(n)]))

    for _ in range(a.trials * 4):
        xs = torch.cat([draw(a.k_pos, "disc"), draw(a.k_neg, "normal")])
        xq = torch.cat([draw(15, "disc"), draw(15, "normal")])
        yield xs, torch.tensor([0] * a.k_pos + [1] * a.k_neg), xq, np.array([0] * 15 + [1] * 15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="an ingest run's store/ folder")
    ap.add_argument("--meta-model", type=Path, help="a meta-train run's models/<method> folder")
    ap.add_argument(
        "--synthetic",
        action="store_true",
        help="the adapt tests' synthetic task and tiny meta-model instead of --store/--meta-model",
    )
    ap.add_argument("--conditions", default="Hernia,Pneumonia,Fibrosis,Edema")
    ap.add_argument("--trials", type=int, default=8, help="support sets per condition (synthetic: x4)")
    ap.add_argument("--k-pos", type=int, default=5)
    ap.add_argument("--k-neg", type=int, default=10)
    ap.add_argument("--normals", type=int, default=60, help="normal scans drawn from (support + query)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.synthetic:
        from tests.adapt import helpers as h

        a.meta_model = h.meta_train_tiny(
            Path(tempfile.mkdtemp(prefix="fewscan-study-")) / "m", outer_steps=25
        )
        sets = support_sets_synthetic(a)
    elif a.store is None or a.meta_model is None:
        ap.error("give --store and --meta-model (or --synthetic)")
    else:
        sets = support_sets_from_store(a)
    mm = load_meta_model(a.meta_model)
    if a.synthetic:
        shutil.rmtree(a.meta_model.parent)  # read: the tiny meta-model lives in memory from here on
    res: dict[tuple[bool, str], list[tuple[float, float, float, float]]] = {}
    estimate: list[tuple[float, float]] = []
    aucs: list[float] = []
    t0 = time.perf_counter()
    for xs, ys, xq, yq in sets:
        for balanced in (False, True):
            method = mm.method(loss_fn=class_balanced_cross_entropy if balanced else None)
            steps = int(getattr(method, "steps", 0))
            adapted = method.fit(xs, ys, 2, steps=steps)
            ps = method.predict_proba(adapted, xs).double().numpy()
            pq = method.predict_proba(adapted, xq).double().numpy()
            heldout = np.zeros(len(ys))
            for held in D.stratified_folds(ys.numpy(), 10):
                keep = torch.from_numpy(np.setdiff1d(np.arange(len(ys)), held))
                fold = method.fit(xs[keep], ys[keep], 2, steps=steps)
                heldout[held] = method.predict_proba(fold, xs[torch.from_numpy(held)]).double().numpy()[:, 0]
            thresholds = {
                "argmax": 0.5,
                "support": D.midpoint_threshold(ps[:, 0], ys.numpy()),
                "heldout": D.midpoint_threshold(heldout, ys.numpy()),
            }
            for rule, t in thresholds.items():
                pred = D.predicted_index(pq, t)
                res.setdefault((balanced, rule), []).append(
                    (
                        D.balanced_accuracy(pred, yq),
                        float(np.mean(pred[yq == 0] == 0)),
                        float(np.mean(pred[yq == 1] == 1)),
                        float(len(np.unique(pred)) == 1),
                    )
                )
            if not balanced:
                auc = M.binary_auc(pq[:, 0], yq == 0)
                aucs.append(float("nan") if auc is None else auc)
                cv = D.cross_validate("support", method, xs, ys, 2, steps, 10)
                estimate.append((cv["cv_balanced_accuracy"], res[(False, "support")][-1][0]))
    print(
        f"{a.meta_model} ({mm.meta.method}, inner lr {mm.meta.inner.lr}), support {a.k_pos}+{a.k_neg}, "
        f"{len(aucs)} support sets, query AUC {np.nanmean(aucs):.3f}, {time.perf_counter() - t0:.0f} s"
    )
    print("| loss | rule | balanced acc | sensitivity | specificity | one class for every query scan |")
    print("|---|---|---|---|---|---|")
    for (balanced, rule), v in res.items():
        m = np.array(v).mean(axis=0)
        loss = "class-balanced" if balanced else "plain"
        print(f"| {loss} | {rule} | {m[0]:.3f} | {m[1]:.3f} | {m[2]:.3f} | {m[3] * 100:.0f}% |")
    e = np.array(estimate)
    print(
        f"held-out estimate of the support rule (plain loss): {e[:, 0].mean():.3f}; on the query: {e[:, 1].mean():.3f}"
    )


if __name__ == "__main__":
    main()
