"""`report.md`: the verdict in plain sentences, the comparison tables, and the setup — from results.json.

The report is rendered from results.json's model (pipeline/artifacts.py `ResultsFile`) alone, so every
number in it is one in results.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.artifacts import MethodInfo, ResultsFile
from pipeline.evaluate.metrics import MeanCI

PCT = 100.0


def _pct(d: dict[str, Any] | None) -> str:
    """'72.1 ± 1.8' (percent) from a MeanCI dict, or '—'."""
    if not d:
        return "—"
    ci = d.get("ci95")
    return f"{d['mean'] * PCT:.1f} ± {ci * PCT:.1f}" if ci is not None else f"{d['mean'] * PCT:.1f}"


def _num(v: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if v is None else fmt.format(v)


def _interval(d: dict[str, Any]) -> str:
    if d.get("ci95") is None:
        return f"{d['mean'] * PCT:.1f}% (no interval: one episode)"
    return (
        f"{d['mean'] * PCT:.1f}% [{(d['mean'] - d['ci95']) * PCT:.1f}, {(d['mean'] + d['ci95']) * PCT:.1f}]"
    )


def _span(d: dict[str, Any] | None) -> str:
    """'[53.0, 59.1]' (percent) from a bootstrap dict (mean, low, high), or '—'."""
    if not d:
        return "—"
    return f"[{d['low'] * PCT:.1f}, {d['high'] * PCT:.1f}]"


def _diff(d: dict[str, Any]) -> str:
    """'+2.4 points [-0.5, 5.2]' from a bootstrap dict of a difference."""
    return f"{d['mean'] * PCT:+.1f} points {_span(d)}"


def _group_title(gkey: str) -> str:
    kind, _, k = gkey.partition(".k")
    what = "binary (condition vs normal)" if kind == "binary" else "n-way (among rare conditions)"
    return f"{what}, {k}-shot"


_PD = "paired_diff_patient"


def verdict(gkey: str, comp: dict[str, Any], methods: Mapping[str, MethodInfo]) -> list[str]:
    """Plain sentences: who won this group, and whether its lead over each other method is supported.

    With the patient-level bootstrap in `comp` (`acc_patient`, `paired_diff_patient`), "supported" means the
    patient-bootstrap 95% interval of the paired difference excludes 0; the episode-level intervals are
    quoted but not trusted for that (episodes reuse patients). Without it, the episode-level wording."""
    if not comp.get("acc_patient"):
        return _verdict_episodes(gkey, comp, methods)
    win = comp["winner"]
    acc, pat, vs = comp["acc"], comp["acc_patient"], comp["vs_winner"]
    boot = comp.get("patient_bootstrap") or {}
    ties = [m for m in comp["ranking"][1:] if abs(acc[m]["mean"] - acc[win]["mean"]) < 1e-12]
    shared = f" (equal to {', '.join(ties)})" if ties else ""
    who = (
        f"{boot['n_patients']} query {boot.get('unit', 'patient')}s"
        if "n_patients" in boot
        else "query patients"
    )
    lines = [
        f"**{_group_title(gkey)}** ({comp['n_episodes']} test episodes, {who}): the highest mean accuracy"
        f"{shared} is **{win}** ({methods[win].family}), {_interval(acc[win])} episode CI, "
        f"{_span(pat[win])} patient CI."
    ]
    supported = [m for m, v in vs.items() if v["paired_diff_patient"]["excludes_zero"]]
    unsupported = [m for m in vs if m not in supported]
    if supported:
        lines.append(
            "By the patient-level paired bootstrap (the same patients resampled for both methods) its lead is "
            f"supported over {', '.join(f'{m} ({_diff(vs[m][_PD])})' for m in supported)}: the 95% interval "
            "of the difference excludes 0."
        )
    if unsupported:
        naive = [m for m in unsupported if not vs[m]["overlap"] or vs[m].get("paired_significant")]
        lines.append(
            f"Its lead over {', '.join(f'{m} ({_diff(vs[m][_PD])})' for m in unsupported)} is not supported: "
            "the patient-level 95% interval of the difference includes 0, so these cannot be told apart"
            + (
                f" (the episode-level intervals alone would have separated {', '.join(naive)}; they ignore "
                "that episodes reuse the same patients)."
                if naive
                else "."
            )
        )
    best = _best_meta_vs_traditional(comp, methods)
    if best:
        bm, bt, which = best
        a, b = acc[bm], acc[bt]
        other = bt if win == bm else bm
        line = f"Best meta-learned ({bm}, {_interval(a)}) vs best traditional ({bt}, {_interval(b)}): {which}"
        if other in vs:
            d = vs[other][_PD]
            line += f"; patient-level paired difference {win} − {other} {_diff(d)}: " + (
                "supported (excludes 0)." if d["excludes_zero"] else "not supported (includes 0)."
            )
        else:
            line += "."
        lines.append(line)
    lines += _pair_lines(comp, methods)
    return lines


def _pair(comp: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """The seed + patient bootstrap difference acc(a) − acc(b) from `pairs_patient` (either order stored)."""
    pairs = comp.get("pairs_patient") or {}
    if f"{a} - {b}" in pairs:
        return pairs[f"{a} - {b}"]
    d = pairs.get(f"{b} - {a}")
    if d is None:
        return None
    return {**d, "mean": -d["mean"], "low": -d["high"], "high": -d["low"]}


def _pair_lines(comp: dict[str, Any], methods: Mapping[str, MethodInfo]) -> list[str]:
    """The two questions the study is for, whichever method won: does each method that uses the common
    findings beat training from scratch, and does each gradient-based meta-learner beat fine-tuning?"""
    out = []
    if "scratch" in methods and comp.get("pairs_patient"):
        parts = []
        for m in comp["ranking"]:
            d = _pair(comp, m, "scratch") if m != "scratch" else None
            if d is not None:
                parts.append(f"{m} {_diff(d)} ({'supported' if d['excludes_zero'] else 'NOT supported'})")
        if parts:
            out.append(
                "Against training from scratch (transfer from the common findings at all?): "
                + "; ".join(parts)
                + "."
            )
    if "finetune" in methods and comp.get("pairs_patient"):
        for m in comp["ranking"]:
            if methods[m].family != "meta-learned" or m == "protonet":
                continue
            d = _pair(comp, m, "finetune")
            if d is None:
                continue
            if d["excludes_zero"] and d["mean"] > 0:
                out.append(f"{m} beats fine-tuning: {_diff(d)}.")
            elif d["excludes_zero"]:
                out.append(
                    f"{m} does NOT beat fine-tuning: fine-tuning is better by {_diff({**d, 'mean': -d['mean'], 'low': -d['high'], 'high': -d['low']})}."
                )
            else:
                out.append(f"{m} does not beat fine-tuning: the difference {_diff(d)} includes 0.")
    return out


def _best_meta_vs_traditional(
    comp: dict[str, Any], methods: Mapping[str, MethodInfo]
) -> tuple[str, str, str] | None:
    """(best meta-learned, best traditional, which one is higher) by the group's ranking; None when a
    family is missing. Both verdicts (patient-level and episode-level) end with this comparison."""
    meta = [m for m in comp["ranking"] if methods[m].family == "meta-learned"]
    trad = [m for m in comp["ranking"] if methods[m].family != "meta-learned"]
    if not (meta and trad):
        return None
    bm, bt = meta[0], trad[0]
    a, b = comp["acc"][bm]["mean"], comp["acc"][bt]["mean"]
    which = "their means are equal" if abs(a - b) < 1e-12 else f"{bm if a > b else bt} is higher"
    return bm, bt, which


def _verdict_episodes(gkey: str, comp: dict[str, Any], methods: Mapping[str, MethodInfo]) -> list[str]:
    """The verdict from episode-level intervals only (results without the patient bootstrap)."""
    win = comp["winner"]
    acc = comp["acc"]
    ties = [m for m in comp["ranking"][1:] if abs(acc[m]["mean"] - acc[win]["mean"]) < 1e-12]
    shared = f" (equal to {', '.join(ties)})" if ties else ""
    lines = [
        f"**{_group_title(gkey)}** ({comp['n_episodes']} test episodes): the highest mean accuracy{shared} is "
        f"**{win}** ({methods[win].family}), {_interval(acc[win])}."
    ]
    tied = [m for m, v in comp["vs_winner"].items() if v["overlap"]]
    apart = [m for m, v in comp["vs_winner"].items() if not v["overlap"]]
    if tied:
        lines.append(
            f"Its 95% interval overlaps with {', '.join(f'{m} ({_interval(acc[m])})' for m in tied)}: "
            f"by this criterion these cannot be told apart."
        )
    if apart:
        lines.append(
            f"It is separated from {', '.join(f'{m} ({_interval(acc[m])})' for m in apart)} (intervals do not overlap)."
        )
    sig = [m for m in tied if comp["vs_winner"][m]["paired_significant"]]
    if sig:
        diffs = ", ".join(f"{m}: {_pct(comp['vs_winner'][m]['paired_diff'])} points" for m in sig)
        lines.append(
            f"On the same episodes (paired difference, a more sensitive test), {win} is still ahead of "
            f"{', '.join(sig)} ({diffs})."
        )
    best = _best_meta_vs_traditional(comp, methods)
    if best:
        bm, bt, which = best
        a, b = acc[bm], acc[bt]
        ma = MeanCI(a["mean"], a["ci95"], a["std"], a["n"])
        mb = MeanCI(b["mean"], b["ci95"], b["std"], b["n"])
        lines.append(
            f"Best meta-learned ({bm}, {_interval(a)}) vs best traditional ({bt}, {_interval(b)}): "
            f"{which}; the intervals {'overlap' if ma.overlaps(mb) else 'do not overlap'}."
        )
    return lines


def _width_ratio(results: ResultsFile, gkey: str) -> float | None:
    """Mean over methods of (patient CI width) / (episode CI width) in one group; None if either is missing."""
    comp = results.comparisons.get(gkey) or {}
    pat = comp.get("acc_patient")
    if not pat:
        return None
    ratios = [
        (pat[m]["high"] - pat[m]["low"]) / (2 * a["ci95"])
        for m, a in comp["acc"].items()
        if m in pat and a.get("ci95")
    ]
    return sum(ratios) / len(ratios) if ratios else None


def _hp(chosen: dict[str, Any]) -> str:
    items = [f"{k}={v}" for k, v in chosen.items() if k not in ("val_acc",)]
    return ", ".join(items) if items else "none"


def _seed0(per_seed: dict[str, Any], first: str) -> Any:
    """The first evaluation seed's entry, else the method's first seed (meta-learned methods are keyed by
    their meta-training seeds, which need not include it)."""
    return per_seed.get(first) or next(iter(per_seed.values()))


def render(results: ResultsFile | Mapping[str, Any]) -> str:
    """report.md from results.json's model (or the dict `evaluation.run` returns, validated into it)."""
    results = ResultsFile.of(results)
    setup = results.setup
    methods = results.methods
    seeds = setup.seeds
    first = str(seeds[0])
    multi = any(len(v["per_seed"]) > 1 for r in results.results.values() for v in r.values())
    out: list[str] = ["# Evaluation: meta-learning vs traditional training on the rare conditions", ""]

    out += ["## Verdict", ""]
    for w in results.warnings:
        out.append(
            f"- **WARNING — training ended near chance:** {w}. Verdicts involving it say nothing about the method."
        )
    if results.warnings:
        out.append("")
    for gkey, comp in results.comparisons.items():
        out.append("- " + " ".join(verdict(gkey, comp, methods)))
    boots = {g: c["patient_bootstrap"] for g, c in results.comparisons.items() if c.get("patient_bootstrap")}
    mts = setup.meta_train_seeds
    seeds_note = (
        " Seeds: the meta-learned methods were meta-trained once per seed ("
        + "; ".join(f"{m}: {', '.join(map(str, v))}" for m, v in mts.items())
        + f"), the baselines run once per evaluation seed ({', '.join(map(str, seeds))}). Each bootstrap "
        "resample also draws every method's seeds with replacement, so the patient CIs and the verdicts include "
        "how much a result moves from one training run to the next; the point estimates are means over seeds."
        if multi
        else " One seed per method: the intervals do not include the variance between training runs "
        "(set `meta_train.seeds` and `evaluate.seeds` to several values to include it)."
    )
    if boots:
        b0 = next(iter(boots.values()))
        out += [
            "",
            "Two 95% intervals are reported. The **episode CI** (± after an accuracy, or [low, high] after "
            "'episode CI') is 1.96·s/√n over test episodes; it treats the episodes as independent samples. The "
            f"**patient CI** is a cluster bootstrap over {b0['unit']}s: the distinct query {b0['unit']}s of a "
            f"group are resampled with replacement ({b0['n_resamples']} resamples, seed {b0['seed'][0]}), each "
            f"drawn {b0['unit']} bringing all of its query predictions, and the accuracy's 2.5% and 97.5% "
            "percentiles are read off. Differences between methods use the same resamples for both methods "
            "(paired); the verdict calls a lead supported only when the patient CI of the difference excludes "
            "0." + seeds_note + " Every hyper-parameter was chosen on validation episodes (other conditions, "
            "other patients); none was chosen on test episodes.",
            "",
        ]
    else:
        out += [
            "",
            "Intervals are 95% confidence intervals of the mean over test episodes (1.96·s/√n)"
            + (
                f"; with {len(seeds)} seeds each episode's accuracy is first averaged over the seeds."
                if multi
                else "."
            )
            + " Every hyper-parameter was chosen on validation episodes (other conditions, other patients); "
            "none was chosen on test episodes.",
            "",
        ]
    queries = setup.queries
    if queries:
        parts = [
            f"{g}: {q['distinct_query_scans']} distinct scans of {q['distinct_query_patients']} patients "
            f"fill {q['query_slots']} query slots"
            + (f"; patient CI {r:.1f}× as wide as the episode CI" if (r := _width_ratio(results, g)) else "")
            for g, q in queries.items()
        ]
        if boots:
            out += [
                "Caveat: fixed episodes drawn from a finite pool of rare-condition patients reuse the same scans ("
                + "; ".join(parts)
                + "). The episode CI ignores this reuse and is too narrow when scans recur; the patient CI "
                "accounts for it by resampling patients instead of episodes. It still assumes the test patients "
                "are a random sample of the patients a method will meet, and with few patients it is itself "
                "rough: read differences near the edge of a patient CI with care.",
                "",
            ]
        else:
            out += [
                "Caveat: the interval treats episodes as independent samples, but fixed episodes drawn from a "
                "finite pool of rare-condition patients reuse the same scans ("
                + "; ".join(parts)
                + "). When "
                "scans are reused many times the true uncertainty is larger than the interval shows; "
                "differences of a few points should not be read as real.",
                "",
            ]

    out += ["## Results", ""]
    for gkey in results.comparisons:
        out += [f"### {_group_title(gkey)}", ""]
        binary = gkey.startswith("binary")
        pat = results.comparisons[gkey].get("acc_patient")
        head = "| method | family | accuracy % ± episode CI | " + ("patient CI % | " if pat else "")
        head += "macro AUC | " + ("sensitivity % | specificity % | " if binary else "")
        head += "ECE | chosen on validation |" + (" seeds: mean ± sd % (each seed) |" if multi else "")
        out.append(head)
        out.append("|" + "---|" * (head.count("|") - 1))
        for m in results.comparisons[gkey]["ranking"]:
            r = results.results[m][gkey]
            s0 = _seed0(r["per_seed"], first)
            acc = results.comparisons[gkey]["acc"][m]
            auc = s0["auc"]["mean"] if s0.get("auc") else None
            row = f"| {m} | {methods[m].family} | {_pct(acc)} | " + (f"{_span(pat.get(m))} | " if pat else "")
            row += f"{_num(auc)} | "
            if binary:
                row += f"{_pct(s0.get('sens'))} | {_pct(s0.get('spec'))} | "
            sel = _seed0(results.selection.get(m, {}) or {first: {}}, first).get(gkey)
            row += f"{_num(s0.get('ece'))} | {_hp(sel['chosen']) if sel else 'none (no hyper-parameter)'} |"
            if multi:
                a = r["across_seeds"]
                sd = "—" if a["std"] is None else f"{a['std'] * PCT:.1f}"
                each = ", ".join(f"{v['acc']['mean'] * PCT:.1f}" for v in r["per_seed"].values())
                row += f" {a['mean'] * PCT:.1f} ± {sd} ({each}) |"
            out.append(row)
        out.append("")
        if multi:
            out += [
                "Accuracy and its intervals pool all seeds; AUC, sensitivity, specificity, ECE and the chosen "
                "hyper-parameters are those of each method's first seed.",
                "",
            ]

    out += ["## Per rare condition (accuracy %, seed " + first + ")", ""]
    if any("per_condition_patient" in c for c in results.comparisons.values()):
        out += [
            "Each cell: seed " + first + "'s accuracy ± its episode CI, then [the patient CI] of that "
            "condition's query slots (correctness averaged over seeds). After each condition: the distinct "
            "query patients its interval resamples (binary episodes: the condition's and the normal "
            "class's, which the conditions share).",
            "",
        ]
    for gkey in results.comparisons:
        comp = results.comparisons[gkey]
        ranking = comp["ranking"]
        pcp = comp.get("per_condition_patient")
        conds = sorted(
            {c for m in ranking for c in _seed0(results.results[m][gkey]["per_seed"], first)["per_condition"]}
        )
        out += [f"### {_group_title(gkey)}", "", "| condition | " + " | ".join(ranking) + " |"]
        out.append("|" + "---|" * (len(ranking) + 1))
        for c in conds:
            cells = []
            for m in ranking:
                cell = _pct(_seed0(results.results[m][gkey]["per_seed"], first)["per_condition"].get(c))
                pci = pcp["acc"].get(m, {}).get(c) if pcp else None
                if pci is not None:
                    cell += f" [{pci['low'] * PCT:.1f}, {pci['high'] * PCT:.1f}]"
                cells.append(cell)
            n_pat = f" ({pcp['n_patients'][c]} patients)" if pcp and c in pcp["n_patients"] else ""
            out.append(f"| {c}{n_pat} | " + " | ".join(cells) + " |")
        out.append("")

    out += ["## Adaptation curves (accuracy %, seed " + first + ")", ""]
    for gkey in results.comparisons:
        rows = []
        for m in results.comparisons[gkey]["ranking"]:
            cur = results.curves.get(m, {}).get(gkey)
            if not cur:
                continue
            steps = (
                " ".join(f"{s}:{v['mean'] * PCT:.0f}" for s, v in cur["steps"].items())
                if cur.get("steps")
                else "—"
            )
            shots = (
                " ".join(f"{k}:{v['mean'] * PCT:.0f}" for k, v in cur["shots"].items())
                if cur.get("shots")
                else "—"
            )
            rows.append(f"| {m} | {cur['n_episodes']} | {steps} | {shots} |")
        if rows:
            out += [
                f"### {_group_title(gkey)}",
                "",
                "| method | episodes | vs inner steps (steps:acc) | vs k-shot (k:acc) |",
                "|---|---|---|---|",
                *rows,
                "",
            ]

    out += ["## Setup", ""]
    out += [
        f"- Meta-train run `{setup.meta_train_run}`, episodes run `{setup.episodes_run}`, "
        f"ingest run `{setup.ingest_run}`.",
        f"- Rare (test) conditions: {', '.join(setup.test_conditions)}. Validation conditions: "
        f"{', '.join(setup.val_conditions)}. Normal label: {setup.normal_label}.",
        f"- Seeds: {', '.join(str(s) for s in seeds)}. Test episodes per group: "
        + ", ".join(f"{g} {n}" for g, n in setup.n_test_episodes.items())
        + ". Validation episodes per group used for selection: "
        + ", ".join(f"{g} {n}" for g, n in setup.n_val_episodes.items())
        + ".",
        "",
        "Methods:",
        "",
    ]
    for m, info in methods.items():
        out.append(f"- **{m}** ({info.family}): {info.description}")
    out.append("")
    pre = results.pretrain
    if pre:
        out += [
            "Traditional classifier (pretrained on the meta-train pool, single-label scans only, to convergence "
            "by early stopping on held-out train-pool patients). Its macro AUC on a second set of held-out "
            "patients is the study's positive control: can the common findings be learned at this image size?",
            "",
        ]
        for seed, rep in pre.items():
            ho = rep.get("holdout_balanced_acc")
            auc = rep.get("holdout_macro_auc")
            ho_s = (
                f"macro AUC {auc:.3f} (chance 0.5), balanced accuracy {ho * PCT:.1f}% (chance "
                f"{rep['holdout_chance_balanced_acc'] * PCT:.1f}%) on {rep['n_holdout_images']} held-out "
                f"train-pool scans ({rep['n_holdout_patients']} patients)"
                if ho is not None and auc is not None
                else "no hold-out"
            )
            warn = (
                " **Near chance: the fine-tuning baseline rests on a classifier that learned little.**"
                if rep.get("near_chance")
                else ""
            )
            out.append(
                f"- seed {seed}: {len(rep['classes'])} classes, {rep['n_train_images']} training scans "
                f"({rep['n_multi_label_dropped']} multi-label scans left out), {rep['epochs']} of at most "
                f"{rep.get('max_epochs', rep['epochs'])} epochs ({rep.get('stopped', 'fixed')}; best epoch "
                f"{rep.get('best_epoch', rep['epochs'])}), {ho_s}.{warn}"
            )
        out.append("")
    out += ["Hyper-parameter selection (validation episodes only; grid → choice):", ""]
    for m, by_seed in results.selection.items():
        for seed, by_group in by_seed.items():
            for gkey, sel in by_group.items():
                if sel["n_val_episodes"] == 0:
                    out.append(
                        f"- {m}, seed {seed}, {gkey}: a single configuration ({_hp(sel['chosen'])}), nothing to choose."
                    )
                    continue
                grid = "; ".join(
                    f"{_hp({k: v for k, v in row.items() if k not in ('val_acc', 'val_acc_ci95')})} → "
                    f"{row['val_acc'] * PCT:.1f}%"
                    for row in sel["grid"]
                )
                out.append(
                    f"- {m}, seed {seed}, {gkey}: chose {_hp(sel['chosen'])} on {sel['n_val_episodes']} "
                    f"validation episodes ({grid})."
                )
    out += ["", "Definitions:", ""]
    out += [f"- {k}: {v}" for k, v in results.definitions.items()]
    timing = results.timing_s
    if timing:
        out += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()) + "."]
    plots = results.plots
    if plots:
        out += ["", "## Plots", ""] + [f"- `{p}`" for p in plots]
    return "\n".join(out) + "\n"


def learned_table(results: ResultsFile) -> list[str]:
    """A short plain-text table for the terminal (`fewscan demo`): each method's test accuracy per setting,
    with its seed + patient interval, the chance level, and the differences whose paired interval excludes
    zero. The report (`render`) has the full verdicts; this only says, at a glance, what was learned."""
    comps = results.comparisons
    if not comps:
        return []
    setup = results.setup
    groups = list(comps)
    first = comps[groups[0]]
    order = sorted(first["acc"], key=lambda m: -first["acc"][m]["mean"])

    def cell(comp: dict[str, Any], m: str) -> str:
        pat = (comp.get("acc_patient") or {}).get(m)
        if pat:
            return f"{pat['mean'] * PCT:.1f} {_span(pat)}"
        return _pct(comp["acc"].get(m))

    def title(gk: str) -> str:
        kind, _, k = gk.partition(".k")
        n_way = setup.n_way.get(gk)
        return f"{'binary' if kind == 'binary' else f'{n_way}-way'} {k}-shot"

    head = ["method", *(title(g) for g in groups)]
    rows = [[m, *(cell(comps[g], m) for g in groups)] for m in order]
    rows.append(["chance", *(f"{PCT / (setup.n_way.get(g) or 2):.1f}" for g in groups)])
    width = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in width)
    conds = ", ".join(setup.test_conditions)
    out = [
        f"What was learned: test accuracy (%) on {conds} with a 95% seed + patient interval",
        ("  " + fmt.format(*head)).rstrip(),
        *(("  " + fmt.format(*r)).rstrip() for r in rows),
    ]
    for g in groups:
        clear = [
            f"{p['a']} > {p['b']} ({p['mean'] * PCT:+.1f})"
            for p in (comps[g].get("pairs_patient") or {}).values()
            if p.get("excludes_zero") and p["mean"] > 0
        ]
        out.append(
            f"  {title(g)}: " + ("; ".join(clear) if clear else "no difference whose interval excludes 0")
        )
    if results.warnings:
        out.append(f"  {len(results.warnings)} training warning(s): see the report's verdict")
    return out
