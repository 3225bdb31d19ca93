"""How learnable the demo study's common findings are, as a function of `conspicuity` (the positive control
behind DEFAULT_CONSPICUITY in pipeline/demodata/render.py; results in benchmarks/RESULTS.md, "demo study").

Renders single-finding attenuation maps of the 7 common findings and normal scans (one image per
patient, 256×256, vendor-neutral: attenuation / 1.6 + detector-like noise), block-averages them to 64×64
and min-max normalises each image (roughly what ingest does), then trains the demo's Conv-4 (32 filters,
GroupNorm) as an 8-way classifier with full supervision and prints the held-out macro AUC (one-vs-rest)
and per-class AUCs after every epoch. 20% of the images (= patients) are held out.

    python benchmarks/demo_positive_control.py --conspicuity 1 3 --per-class 100 --epochs 10
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.demodata import render
from pipeline.meta.models import ModelSpec, build_model

COMMON = ["Infiltration", "Effusion", "Atelectasis", "Nodule", "Mass", "Pneumothorax", "Consolidation"]
SIZE = 64


def _one(job: tuple[int, str | None], conspicuity: float) -> np.ndarray:
    pid, lab = job
    view = "PA" if pid % 3 else "AP"
    att, g = render.render_attenuation(7, pid, pid, (lab,) if lab else (), view, 256, conspicuity)
    x = att / 1.6 + g.normal(0, 0.015, att.shape)
    x = x.reshape(SIZE, 256 // SIZE, SIZE, 256 // SIZE).mean((1, 3))
    return ((x - x.min()) / (x.max() - x.min() + 1e-6)).astype(np.float32)


def run(conspicuity: float, per_class: int, epochs: int, workers: int) -> float:
    classes: list[str | None] = [None, *COMMON]
    jobs = [(ci * 100_000 + i, c) for ci, c in enumerate(classes) for i in range(per_class)]
    t0 = time.monotonic()
    with ProcessPoolExecutor(workers) as ex:
        x = np.stack(list(ex.map(partial(_one, conspicuity=conspicuity), jobs, chunksize=16)))[:, None]
    y = np.repeat(np.arange(len(classes)), per_class)
    print(f"conspicuity {conspicuity}: rendered {len(x)} images in {time.monotonic() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    ho, tr = perm[: len(x) // 5], perm[len(x) // 5 :]
    torch.manual_seed(0)
    net = build_model(ModelSpec(filters=32, norm="group", head="zero"), 1, (SIZE, SIZE))
    clf = torch.nn.Linear(net.feat_dim, len(classes))
    opt = torch.optim.Adam(list(net.parameters()) + list(clf.parameters()), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    auc = float("nan")
    for ep in range(epochs):
        net.train()
        order = rng.permutation(tr)
        for b in range(0, len(order), 32):
            s = order[b : b + 32]
            loss = F.cross_entropy(clf(net.features(xt[s])), yt[s])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            pr = torch.softmax(clf(net.features(xt[ho])), 1).numpy()
        auc = float(roc_auc_score(y[ho], pr, multi_class="ovr", average="macro"))
        per = [roc_auc_score(y[ho] == c, pr[:, c]) for c in range(len(classes))]
        print(
            f"conspicuity {conspicuity} epoch {ep + 1}: held-out macro AUC {auc:.3f}; "
            + " ".join(f"{(c or 'Normal')[:6]} {a:.2f}" for c, a in zip(classes, per)),
            flush=True,
        )
    return auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conspicuity", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    final = {k: run(k, a.per_class, a.epochs, a.workers) for k in a.conspicuity}
    print("final held-out macro AUC: " + ", ".join(f"conspicuity {k}: {v:.3f}" for k, v in final.items()))


if __name__ == "__main__":
    main()
