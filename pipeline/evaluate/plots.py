"""Figures of the evaluation, drawn from results.json alone (its model, pipeline/artifacts.py
`ResultsFile`; the plot functions also take the dict `evaluation.run` returns) (matplotlib, Agg backend).

One PNG per figure kind and episode group: adaptation curves (vs inner steps, vs k-shot), per-condition
accuracy bars with 95% intervals, reliability diagrams and confusion matrices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.artifacts import ResultsFile  # noqa: E402
from pipeline.atomic import atomic_open  # noqa: E402

PCT = 100.0


def _seed_of(per_seed: dict[str, Any], seed: str) -> Any:
    """That seed's numbers, else the method's first seed's (meta-learned methods are keyed by their
    meta-training seeds, which need not include the first evaluation seed)."""
    return per_seed.get(seed) or next(iter(per_seed.values()))


def _title(gkey: str) -> str:
    kind, _, k = gkey.partition(".k")
    return f"{'binary' if kind == 'binary' else 'n-way'}, {k}-shot"


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:  # a file object: matplotlib takes the format from the argument
            fig.savefig(f, format="png", dpi=110)
    finally:
        plt.close(fig)


Results = ResultsFile | Mapping[str, Any]


def _groups(results: ResultsFile) -> list[str]:
    return list(results.comparisons)


def _color(results: ResultsFile, method: str) -> Any:
    """One colour per method across every figure (by its position in results.methods)."""
    return plt.get_cmap("tab10")(list(results.methods).index(method) % 10)


def _ordered(results: ResultsFile, g: str) -> list[str]:
    """Methods of group g in one fixed order (that of results.methods)."""
    present = set(results.comparisons[g]["ranking"])
    return [m for m in results.methods if m in present]


def _curve_figure(results: ResultsFile, which: str, xlabel: str, path: Path) -> bool:
    groups = _groups(results)
    curves = results.curves
    if not any(curves.get(m, {}).get(g, {}).get(which) for m in curves for g in groups):
        return False
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False)
    rings = False
    for ax, g in zip(axes[0], groups):
        for m in _ordered(results, g):
            cur = curves.get(m, {}).get(g, {}).get(which)
            if not cur:
                continue
            xs = np.array([int(x) for x in cur])
            mean = np.array([v["mean"] for v in cur.values()]) * PCT
            ci = np.array([v["ci95"] or 0.0 for v in cur.values()]) * PCT
            ax.plot(xs, mean, marker="o", ms=3, label=m, color=_color(results, m))
            ax.fill_between(xs, mean - ci, mean + ci, color=_color(results, m), alpha=0.12)
            chosen = _chosen_steps(results, m, g) if which == "steps" else None
            if chosen is not None and chosen in set(xs.tolist()):
                # The verdict uses the steps chosen on validation episodes; this curve is measured on the
                # test episodes, so its peak may sit elsewhere. The ring says which point the tables report.
                y = mean[list(xs).index(chosen)]
                ax.plot([chosen], [y], marker="o", ms=10, mfc="none", mec=_color(results, m), mew=1.5)
                rings = True
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        n_way = results.setup.n_way.get(g)
        if n_way:
            ax.axhline(PCT / n_way, color="grey", ls=":", lw=1, label="chance")
        ax.set_title(_title(g))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("query accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if rings:
        fig.text(
            0.01,
            0.005,
            "ringed: the steps chosen on validation episodes, used in the report's tables",
            fontsize=7,
            color="dimgrey",
        )
    _save(fig, path)
    return True


def _chosen_steps(results: ResultsFile, method: str, g: str) -> int | None:
    """The inner steps evaluate chose on validation for this method and group (first seed), if any."""
    by_seed = results.selection.get(method) or {}
    seeds = results.setup.seeds
    sel = (by_seed.get(str(seeds[0])) if seeds else None) or next(iter(by_seed.values()), None) or {}
    steps = ((sel.get(g) or {}).get("chosen") or {}).get("steps")
    return int(steps) if steps is not None else None


def plot_step_curves(results: Results, path: Path) -> bool:
    return _curve_figure(ResultsFile.of(results), "steps", "inner steps on the support set", path)


def plot_shot_curves(results: Results, path: Path) -> bool:
    return _curve_figure(ResultsFile.of(results), "shots", "support scans per class (k)", path)


def plot_per_condition(results: Results, path: Path, seed: str) -> bool:
    results = ResultsFile.of(results)
    groups = _groups(results)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.4 * len(groups)), squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        methods = _ordered(results, g)
        per = {m: _seed_of(results.results[m][g]["per_seed"], seed)["per_condition"] for m in methods}
        conds = sorted({c for m in methods for c in per[m]})
        # patient-level intervals where the results have them (episodes reuse patients), else episode CIs
        pcp = results.comparisons[g].get("per_condition_patient")
        width = 0.8 / max(1, len(methods))
        x = np.arange(len(conds))
        for i, m in enumerate(methods):
            if pcp:
                cis = [pcp["acc"][m].get(c) for c in conds]
                mean = [ci["mean"] * PCT if ci else np.nan for ci in cis]
                err: Any = np.array(
                    [
                        [(ci["mean"] - ci["low"]) * PCT if ci else 0.0 for ci in cis],
                        [(ci["high"] - ci["mean"]) * PCT if ci else 0.0 for ci in cis],
                    ]
                )
            else:
                mean = [per[m].get(c, {}).get("mean", np.nan) * PCT for c in conds]
                err = [(per[m].get(c, {}).get("ci95") or 0.0) * PCT for c in conds]
            ax.bar(
                x + (i - (len(methods) - 1) / 2) * width,
                mean,
                width,
                yerr=err,
                capsize=2,
                label=m,
                color=_color(results, m),
            )
        n_way = results.setup.n_way.get(g)
        if n_way:  # binary: accuracy on the condition's episodes; n-way: the condition's recall
            ax.axhline(PCT / n_way, color="grey", ls=":", lw=1, label="chance")
        ax.set_xticks(x, conds, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("accuracy / recall (%)")
        ax.set_ylim(0, 100)
        what = "95% patient CI, seeds pooled" if pcp else f"seed {seed}, 95% episode CI"
        ax.set_title(f"per rare condition — {_title(g)} ({what})")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(methods), 5))
    _save(fig, path)
    return True


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_reliability(results: Results, g: str, path: Path, seed: str) -> bool:
    results = ResultsFile.of(results)
    methods = _ordered(results, g)
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(methods) :]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), methods):
        s = _seed_of(results.results[m][g]["per_seed"], seed)
        rel = s.get("reliability")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        if rel:
            edges = np.array(rel["edges"])
            acc = np.array([np.nan if v is None else v for v in rel["accuracy"]], dtype=float)
            centers = (edges[:-1] + edges[1:]) / 2
            ax.bar(centers, np.nan_to_num(acc), width=edges[1] - edges[0], edgecolor="k", alpha=0.7)
        ax.set_title(f"{m}  ECE {s['ece']:.3f}" if s.get("ece") is not None else m, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    fig.suptitle(f"reliability — {_title(g)}", fontsize=10)
    _save(fig, path)
    return True


def plot_confusion(results: Results, g: str, path: Path, seed: str) -> bool:
    results = ResultsFile.of(results)
    methods = _ordered(results, g)
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(methods) :]:
        ax.axis("off")
    for ax, m in zip(axes.ravel(), methods):
        conf = _seed_of(results.results[m][g]["per_seed"], seed)["confusion"]
        mat = np.array(conf["matrix"], dtype=float)
        norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        labels = conf["labels"]
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if len(labels) <= 8:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    ax.text(
                        j,
                        i,
                        f"{norm[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black",
                    )
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.suptitle(f"confusion (row-normalised) — {_title(g)}", fontsize=10)
    _save(fig, path)
    return True


def write_all(results: Results, outdir: Path) -> list[str]:
    """Write every figure under outdir/plots; returns their paths relative to outdir."""
    results = ResultsFile.of(results)
    seed = str(results.setup.seeds[0])
    written: list[str] = []

    def add(ok: bool, rel: str) -> None:
        if ok:
            written.append(rel)

    add(plot_step_curves(results, outdir / "plots/adaptation_vs_steps.png"), "plots/adaptation_vs_steps.png")
    add(plot_shot_curves(results, outdir / "plots/adaptation_vs_kshot.png"), "plots/adaptation_vs_kshot.png")
    add(plot_per_condition(results, outdir / "plots/per_condition.png", seed), "plots/per_condition.png")
    for g in _groups(results):
        rel = f"plots/reliability_{g.replace('.', '_')}.png"
        add(plot_reliability(results, g, outdir / rel, seed), rel)
        rel = f"plots/confusion_{g.replace('.', '_')}.png"
        add(plot_confusion(results, g, outdir / rel, seed), rel)
    return written
