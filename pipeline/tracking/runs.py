"""`StageRun`, the open run a stage is handed, and `StageResult`, what the stage returns.

A stage logs through its `StageRun` only: params, metrics, tags, its description in the UI, files (written
into `outdir` and uploaded when the run ends: pipeline/tracking/lifecycle.py), datasets and models
(docs/CONTRACTS.md, "StageRun"). Opening and closing the run is `lifecycle.stage_run`'s job.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline import ui_view
from pipeline.errors import UpstreamError
from pipeline.progress import log
from pipeline.tracking import artifacts, datasets, registry
from pipeline.tracking.experiments import run_url, set_experiment_tag
from pipeline.tracking.store import client, retry
from pipeline.tracking.tags import TAG_NOTE
from pipeline.tracking.upstream import UpstreamRun, lineage

_MAX_PARAM_LEN = 6000


@dataclass
class StageResult:
    """What a stage returns: its one-line summary and a few headline metrics."""

    summary: str
    metrics: dict[str, float] = field(default_factory=dict)


def _flatten(d: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(d, (list, tuple)):
        s = json.dumps(d, default=str)
    else:
        s = str(d)
    out[key] = s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."
    return out


class StageRun:
    """An open MLflow run of one stage. Stages write files into `outdir`; they are uploaded at the end."""

    def __init__(
        self,
        run_id: str,
        stage: str,
        experiment_id: str,
        outdir: Path,
        artifact_uri: str,
        resumed: bool,
        suite: str | None = None,
    ):
        self.run_id = run_id
        self.stage = stage
        self.experiment_id = experiment_id
        self.outdir = outdir
        self.artifact_uri = artifact_uri
        self.resumed = resumed
        self.suite = suite  # the suite the run is filed under (names its registered models)
        self.ui_url = run_url(experiment_id, run_id)
        # (name, alias, version) set by `stage_run` once the run is FINISHED (see `register_model`)
        self.pending_aliases: list[tuple[str, str, str]] = []

    # -- values
    def log_params(self, d: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(d)
        items = [Param(k, v) for k, v in flat.items()]
        c = client()
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            try:
                retry(partial(c.log_batch, self.run_id, params=chunk), "log params")
            except MlflowException as err:
                # a resumed run may re-log identical params; a *changed* value is a real error
                if "already logged" not in str(err) and "Changing param values" not in str(err):
                    raise

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in d.items() if v is not None]
        c = client()
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            retry(partial(c.log_batch, self.run_id, metrics=chunk), "log metrics")

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step=step)

    def set_tags(self, d: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)[:5000]) for k, v in d.items()]
        retry(lambda: client().log_batch(self.run_id, tags=tags), "set tags")

    def set_description(self, text: str) -> None:
        self.set_tags({TAG_NOTE: text})

    def describe(self, summary: str, upstream: dict[str, UpstreamRun]) -> None:
        """The run's description in the UI: `summary`, links to its upstream runs back to ingest and, for
        a run that wrote `report.md` (evaluate), its first plots and as much of the report as fits."""
        report = self.outdir / "report.md"
        plots = sorted(p.relative_to(self.outdir).as_posix() for p in self.outdir.glob("plots/*.png"))
        if report.is_file():  # the plots in the order the report lists them
            text = report.read_text()
            plots.sort(key=lambda p: (text.find(p) if p in text else len(text), p))
        self.set_tags(
            {
                TAG_NOTE: ui_view.stage_description(
                    summary,
                    self.experiment_id,
                    self.run_id,
                    lineage(upstream),
                    report=report.read_text() if report.is_file() else None,
                    plots=ui_view.write_previews(self.outdir, plots[: ui_view.MAX_PLOTS]),
                )
            }
        )

    def publish_view(self) -> None:
        """Add this run's key metrics to the columns of its experiment's shared run-table view."""
        c = client()
        run = retry(lambda: c.get_run(self.run_id), "read the run")
        exp = retry(lambda: c.get_experiment(self.experiment_id), "read the experiment")
        state = ui_view.view_state(exp.tags.get(ui_view.TAG_VIEW), run.data.metrics)
        if state != exp.tags.get(ui_view.TAG_VIEW):
            set_experiment_tag(self.experiment_id, ui_view.TAG_VIEW, state, "set the run view")

    # -- files
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        c = client()
        if p.is_dir():
            retry(lambda: c.log_artifacts(self.run_id, str(p), artifact_path), f"upload {p.name}")
        else:
            retry(lambda: c.log_artifact(self.run_id, str(p), artifact_path), f"upload {p.name}")

    def log_state_dict(self, state_dict: dict[str, Any], artifact_path: str) -> None:
        """Save a state dict the way `mlflow.pytorch.log_state_dict` does (loadable with load_state_dict)."""
        import mlflow.pytorch

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_state_dict(state_dict, tmp)
            self.log_artifact(tmp, artifact_path)

    def own_artifact(self, rel: str) -> Path | None:
        """An artifact this run already uploaded (used to resume), or None."""
        try:
            return artifacts.artifact_path(self.run_id, self.artifact_uri, rel)
        except UpstreamError:
            return None

    def log_dataset(self, df: Any, name: str, digest: str, context: str, source: str | None = None) -> None:
        """Record a (PHI-free) table as an MLflow dataset input with a content digest (`source`: where the
        table lives among this run's artifacts, e.g. store/scan_index.parquet)."""
        datasets.log_dataset(self.run_id, self.artifact_uri, df, name, digest, context, source)

    # -- models
    def log_pyfunc(
        self,
        artifact_path: str,
        python_model: Path,
        artifacts: dict[str, str] | None = None,
        input_example: Any = None,
        signature: Any = None,
        pip_requirements: list[str] | None = None,
    ) -> str:
        """Save an MLflow pyfunc model into this run's artifacts; returns its `runs:/` URI.

        `python_model`: the path of the model's code file (a model from code). Never a model object: MLflow
        would cloudpickle it, and loading a pickle runs code (docs/CONTRACTS.md, "Adapted model")."""
        import mlflow.pyfunc

        if not isinstance(python_model, (str, Path)):
            raise TypeError("log_pyfunc takes the path of a model's code file, not an object to pickle")
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                str(target),
                python_model=python_model,
                artifacts=artifacts,
                input_example=input_example,
                signature=signature,
                pip_requirements=pip_requirements,
            )
            self.log_artifact(target, artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
        """Register `runs:/<this run>/<artifact_path>` as a new version of `name`; `alias` moves to it when
        the run ends FINISHED (`lifecycle.stage_run`), never before: a run that fails or is killed after
        registering leaves the alias where it was (docs/adapt.md, "Registered name")."""
        version = registry.register_version(self.run_id, self.artifact_uri, self.stage, artifact_path, name)
        alias = registry.alias_name(alias)
        self.pending_aliases.append((name, alias, version))
        log(f"registered {name} version {version} (alias '{alias}' moves to it when the run finishes)")
        return version
