"""What a researcher sees of fewscan's runs in the MLflow UI: its mode, the run table's columns, the
descriptions of experiments and runs (docs/ui.md).

Pure text and JSON, no mlflow: the tracking layer (`pipeline/tracking/`) writes what these functions return.

- **Mode.** MLflow 3 opens in its GenAI mode (traces, an AI assistant, "evaluation runs") unless the URL
  says `workflowType=machine_learning` (3.17: a URL parameter, else the browser's last choice) or, in
  earlier 3.x, the experiment is tagged `mlflow.experimentKind = custom_model_development`. fewscan does
  both, and every link it prints carries the parameter.
- **Columns.** The run table's columns are the browser's own state; the one shareable form is a "shared
  view": an experiment tag `mlflow.sharedViewState.<key>` holding the view as JSON, opened with
  `?viewStateShareKey=<key>`. fewscan keeps one such view per experiment, `fewscan`, listing the key
  metrics of the runs logged so far, sorted by end time so that the runs appear flat in lineage order
  (sorted by start time, the UI folds a chain's stage runs under their parent).
- **Descriptions** (tag `mlflow.note.content`) are rendered as markdown: a run's starts with its one-line
  summary (the text the run table's Description column shows), then links to its upstream runs back to
  ingest; evaluate's adds its plots and as much of report.md as fits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from pipeline.atomic import atomic_open

TAG_KIND = "mlflow.experimentKind"
KIND = "custom_model_development"  # MLflow's name for the model-training experiment type
WORKFLOW = "workflowType=machine_learning"
VIEW_KEY = "fewscan"
TAG_VIEW = "mlflow.sharedViewState." + VIEW_KEY
# What StageRun.set_tags keeps of a tag's value (the limit of MLflow servers before 3.x's 8000).
MAX_DESCRIPTION = 5000
MAX_PLOTS = 3  # plots shown in a description; the rest are a click away in the Artifacts tab

# The key metrics shown as run-table columns, in column order: (pattern, why it is key).
KEY_METRICS: tuple[tuple[str, str], ...] = (
    (r"test\.[^.]+\..+\.acc", "evaluate: each method's mean test accuracy per task and k"),
    (
        r"query_balanced_accuracy|query_sensitivity|query_specificity",
        "adapt: the adapted model on its query set",
    ),
    (r"[^.]+\.best_val_acc_seed_mean", "meta-train: best validation accuracy, mean over seeds"),
)  # few: the UI orders metric columns by name and the table scrolls sideways (a stage's time is Duration)


def run_path(experiment_id: str, run_id: str) -> str:
    """The UI route of a run (relative to the UI's address), in the model-training view."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def artifact_path(experiment_id: str, run_id: str, rel: str) -> str:
    """The UI route of one artifact of a run (the UI renders .md as markdown, shows images)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{quote(rel)}?{WORKFLOW}"


def runs_path(experiment_id: str) -> str:
    """The UI route of an experiment's run table with fewscan's shared view, in the model-training view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{WORKFLOW}"


def key_metrics(keys: Iterable[str]) -> list[str]:
    """The metric keys among `keys` that are run-table columns, in KEY_METRICS order then by name."""
    ranked = []
    for key in set(keys):
        for rank, (pattern, _) in enumerate(KEY_METRICS):
            if re.fullmatch(pattern, key):
                ranked.append((rank, key))
                break
    return [k for _, k in sorted(ranked, key=lambda rk: (rk[0], _setting_first(rk[1])))]


def _setting_first(key: str) -> str:
    """`test.<method>.<task>.k<k>.acc` sorted by task and k before method: one setting's methods side by
    side, as the report's tables compare them."""
    parts = key.split(".")
    return ".".join([*parts[2:], parts[1]]) if key.startswith("test.") and len(parts) > 3 else key


def _metric_column(key: str) -> str:
    return f"metrics.`{key}`"


def view_state(old: str | None, metric_keys: Iterable[str]) -> str:
    """The JSON of the shared view: the key metrics among `metric_keys` added to those `old` (the view's
    previous JSON, or None) already shows, then the run's description."""
    shown: list[str] = []
    if old:
        try:
            prev = json.loads(old)
            shown = [
                c[len("metrics.`") : -1] for c in prev.get("selectedColumns", []) if c.startswith("metrics.`")
            ]
        except (ValueError, AttributeError):
            shown = []  # a view someone edited by hand into something else: rebuilt from this run
    columns = [_metric_column(k) for k in key_metrics([*shown, *metric_keys])]
    state = {
        # by end time, newest first: flat rows (the UI nests children only when sorted by start time)
        "orderByKey": "attributes.end_time",
        "orderByAsc": False,
        "selectedColumns": [*columns, "attributes.`Description`"],
    }
    return json.dumps(state, sort_keys=True)


@dataclass(frozen=True)
class Link:
    """One run of a lineage: its stage, its name, where it lives."""

    stage: str
    name: str
    experiment_id: str
    run_id: str


def _md_text(s: str) -> str:
    """`s` safe inside a markdown link text."""
    return re.sub(r"([\\\[\]*_`<>])", r"\\\1", s)


def lineage_markdown(lineage: Sequence[Link]) -> str:
    """The upstream runs as links, nearest first: `meta-train [name](#...) ← episodes [name](#...) ← ...`."""
    if not lineage:
        return ""
    parts = [
        f"{ln.stage} [{_md_text(ln.name or ln.run_id)}]({run_path(ln.experiment_id, ln.run_id)})"
        for ln in lineage
    ]
    return "Upstream: " + " ← ".join(parts)


PREVIEW_DIR = "plots/preview"  # narrower copies of the plots shown in a description
PREVIEW_WIDTH = 640


def write_previews(outdir: Path, plots: Sequence[str]) -> list[str]:
    """Copies of `plots` (paths under `outdir`) at most PREVIEW_WIDTH pixels wide, under PREVIEW_DIR; their
    paths. A description cannot size an image (the UI keeps only an image's src) and the plots are drawn
    for print, ~2000 pixels wide: shown as they are, the first one fills the page."""
    from PIL import Image  # pillow: already a dependency (scan decoding)

    out = []
    for rel in plots:
        dst = outdir / PREVIEW_DIR / Path(rel).name
        try:
            with Image.open(outdir / rel) as im, atomic_open(dst, "wb") as f:
                im.thumbnail((PREVIEW_WIDTH, PREVIEW_WIDTH * 4))
                im.save(f, format="PNG", optimize=True)
        except OSError:  # not an image PIL reads: shown as it is rather than failing the stage
            out.append(rel)
            continue
        out.append(dst.relative_to(outdir).as_posix())
    return out


def _plot_markdown(run_id: str, plots: Sequence[str]) -> str:
    # the UI serves a run's artifacts at get-artifact?path=...&run_uuid=... (relative to its address)
    return "\n".join(
        f"![{_md_text(p)}](get-artifact?path={quote(p, safe='')}&run_uuid={run_id})" for p in plots
    )


def _sections(md: str) -> list[str]:
    """`md` cut before each heading (outside code fences), so that a prefix of sections reads whole."""
    out: list[str] = []
    cur: list[str] = []
    fenced = False
    for line in md.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#") and cur:
            out.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        out.append("".join(cur))
    return out


CUT_NOTE = (
    "\n\n*Left out here to fit the description ({left_out}): read the whole report, report.md, in the "
    "Artifacts tab.*\n"
)


def report_excerpt(report: str, budget: int) -> str:
    """`report` (markdown) if it fits in `budget` characters, else its sections (cut at headings) that fit,
    in order, skipping those too long, then a line naming the top-level sections not shown in full."""
    if len(report) <= budget:
        return report
    names_room = 200
    secs = _sections(report)
    tops: list[int] = []  # the index of the top-level (# or ##) section each section is part of
    for i, s in enumerate(secs):
        tops.append(i if 1 <= len(s) - len(s.lstrip("#")) <= 2 or not tops else tops[-1])
    keep, used = set(), 0
    for i, s in enumerate(secs):
        if used + len(s) + len(CUT_NOTE) + names_room <= budget:
            keep.add(i)
            used += len(s)
    # a kept top-level heading with nothing of its own and none of its subsections kept would dangle
    bare = {i for i, s in enumerate(secs) if len([ln for ln in s.splitlines() if ln.strip()]) == 1}
    for i in sorted(keep & bare):
        if tops[i] == i and not any(tops[j] == i for j in keep if j != i):
            keep.discard(i)
    left_out = []
    for i in sorted(set(range(len(secs))) - bare):
        name = (
            secs[tops[i]].splitlines()[0].lstrip("#").strip()
            if secs[tops[i]].startswith("#")
            else "the start"
        )
        if i not in keep and name not in left_out:
            left_out.append(name)
    kept = [secs[i] for i in sorted(keep)]
    names = "; ".join(left_out)
    if len(names) > names_room:
        names = names[: names_room - 1].rsplit(";", 1)[0] + "; …"
    return "".join(kept).rstrip() + CUT_NOTE.replace("{left_out}", names)


def stage_description(
    summary: str,
    experiment_id: str,
    run_id: str,
    lineage: Sequence[Link],
    *,
    report: str | None = None,
    plots: Sequence[str] = (),
) -> str:
    """A stage run's description: its summary line first (plain text: the run table shows it raw), the run
    id, its upstream runs as links, then (evaluate) a link to the rendered report, the first plots and as
    much of the report as fits."""
    head = [summary.replace("\n", " "), "", f"run id: `{run_id}`"]
    links = lineage_markdown(lineage)
    if links:
        head += ["", links]
    if report is not None:
        shown = f"[report.md]({artifact_path(experiment_id, run_id, 'report.md')})"
        head += [
            "",
            f"Report: {shown} (rendered); plots: [plots/]({artifact_path(experiment_id, run_id, 'plots')})",
        ]
    text = "\n".join(head) + "\n"
    if plots:
        text += "\n" + _plot_markdown(run_id, plots) + "\n"
    if report:
        text += "\n" + report_excerpt(report, MAX_DESCRIPTION - len(text) - 2)
    return text[:MAX_DESCRIPTION]


def chain_description(summary: str, experiment_id: str, runs: Sequence[tuple[str, str, bool]]) -> str:
    """The chain run's description: its summary line, then a link to each stage run it ran or reused
    (`runs`: stage, run id, reused), in chain order."""
    lines = [summary.replace("\n", " "), ""]
    lines += [
        f"- {stage}: [{run_id}]({run_path(experiment_id, run_id)})" + (" (reused)" if reused else "")
        for stage, run_id, reused in runs
    ]
    return "\n".join(lines) + "\n"


def experiment_description(suite: str, description: str, dataset: str | None, experiment_id: str) -> str:
    """The suite's experiment's description: the suite's own words, its dataset, where to look first."""
    lines = [f"**{_md_text(suite)}**" + (f": {description.strip()}" if description.strip() else "")]
    lines.append("")
    lines.append(
        f"fewscan suite `{suite}`" + (f" on dataset `{dataset}`" if dataset else "") + ": one run per stage "
        "(ingest → episodes → meta-train → adapt, evaluate); each run's description links its upstream runs, "
        f"evaluate's holds the report. [Run table with the key metrics]({runs_path(experiment_id)})."
    )
    return "\n".join(lines)
