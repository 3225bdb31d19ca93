"""The experiments fewscan writes to and searches: their names, their ids (created, on a server signed as
the user's: pipeline/tracking/owners.py), their look in the UI (pipeline/ui_view.py) and the UI links."""

from __future__ import annotations

import time
from functools import partial

from mlflow.exceptions import MlflowException

from pipeline import stage_configs, ui_view
from pipeline.errors import TrackingError
from pipeline.progress import log
from pipeline.tracking import owners
from pipeline.tracking.store import client, default_artifact_root, is_default_store, retry, tracking_uri
from pipeline.tracking.tags import TAG_NOTE, TAG_OWNER_PROOF


def search_scope(stage: str, suite: str | None, dataset: str | None) -> list[str]:
    """Ids of the experiments in which a `stage` run for this suite/dataset may be found: the one its
    runs are written to (`fewscan/<suite>`, or `fewscan/dataset-<name>` without a suite) and, for ingest,
    also the dataset's (a standalone `fewscan ingest`). Missing experiments are left out, and on a server
    so are experiments the user did not create (with a log line saying so)."""
    names = [experiment_name(suite, dataset)] if suite or dataset else []
    if stage in stage_configs.BY_NAME and stage_configs.spec(stage).per_dataset and dataset:
        names.append(experiment_name(None, dataset))
    c = client()
    user = owners.server_user()
    ids: list[str] = []
    for name in dict.fromkeys(names):
        exp = retry(partial(c.get_experiment_by_name, name), "look up an experiment")
        if exp is None or exp.lifecycle_stage == "deleted":
            continue
        if user and not owners.is_owned(exp, user):
            log(f"not searching experiment '{name}': {owners.not_owned_message(name, user)}")
            continue
        ids.append(str(exp.experiment_id))
    return ids


def experiment_id(name: str) -> str:
    """The id of experiment `name`, created if missing. On a server with a user it must be one that user
    created (pipeline/tracking/owners.py): refused otherwise, with the fix in the message."""
    c = client()
    user = owners.server_user()
    exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment")
    if exp is None:
        location = default_artifact_root() if is_default_store() else None
        try:
            new_id = str(
                retry(lambda: c.create_experiment(name, artifact_location=location), "create an experiment")
            )
        except MlflowException:
            # another process created it between our lookup and create; if it is ours, its tag follows
            exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment")
            if exp is None:
                raise
            for _ in range(20 if user else 0):
                if any(k.startswith(TAG_OWNER_PROOF) for k in exp.tags):
                    break
                time.sleep(0.5)
                exp = retry(lambda: c.get_experiment_by_name(name), "look up an experiment") or exp
        else:
            if user:
                owners.sign_experiment(new_id, user)
            present_experiment(new_id)  # a model-training experiment, not GenAI (pipeline/ui_view.py)
            return new_id
    if user and not owners.is_owned(exp, user):
        raise TrackingError(owners.not_owned_message(name, user))
    found_id = str(exp.experiment_id)
    if exp.lifecycle_stage == "deleted":
        retry(lambda: c.restore_experiment(found_id), "restore a deleted experiment")
    if exp.tags.get(ui_view.TAG_KIND) != ui_view.KIND:  # made by an older fewscan
        present_experiment(found_id)
    return found_id


def experiment_name(suite: str | None, dataset: str | None) -> str:
    return f"fewscan/{suite}" if suite else f"fewscan/dataset-{dataset}"


def ui_base() -> str:
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return "http://127.0.0.1:5000"


def run_url(experiment: str, run_id: str) -> str:
    """A run's page in the UI's model-training view (pipeline/ui_view.py)."""
    return f"{ui_base()}/{ui_view.run_path(experiment, run_id)}"


def experiment_url(experiment: str, base: str | None = None) -> str:
    """An experiment's run table with fewscan's key-metric columns, in the model-training view."""
    return f"{(base or ui_base()).rstrip('/')}/{ui_view.runs_path(experiment)}"


def ui_lines(base: str) -> list[str]:
    """Where a researcher opens the UI served at `base`: each fewscan experiment's run table in the
    model-training view (without `workflowType` in the URL, MLflow 3.17 opens in its GenAI view)."""
    try:
        exps = list(client().search_experiments(filter_string="name LIKE 'fewscan/%'", max_results=100))
    except Exception:  # noqa: BLE001 - the links are a convenience; the UI starts without them
        exps = []
    lines = [
        f"  {e.name}: {experiment_url(str(e.experiment_id), base)}"
        for e in sorted(exps, key=lambda e: e.name)
    ]
    return lines or [f"  all experiments: {base.rstrip('/')}/#/experiments?{ui_view.WORKFLOW}"]


def present_experiment(exp_id: str, description: str | None = None) -> None:
    """Tag experiment `exp_id` as model training (earlier MLflow 3 UIs open it in that view; 3.17 follows
    the URL, pipeline/ui_view.py) and set its description when given; unchanged tags are not rewritten."""
    c = client()
    exp = retry(lambda: c.get_experiment(exp_id), "read an experiment")
    want = {ui_view.TAG_KIND: ui_view.KIND}
    if description is not None:
        want[TAG_NOTE] = description
    for k, v in want.items():
        if exp.tags.get(k) != v:
            set_experiment_tag(exp_id, k, v, "describe the experiment")


def set_experiment_tag(exp_id: str, key: str, value: str, what: str) -> None:
    """Set an experiment tag. Two commands that write a tag the experiment does not have yet (two chains
    opening a fresh experiment, or finishing their first stages, together) both insert it, and the
    database refuses the second insert (UNIQUE constraint, an MlflowException). The tag exists then, and
    writing it again updates it."""
    c = client()
    try:
        retry(partial(c.set_experiment_tag, exp_id, key, value), what)
    except MlflowException:
        if key not in retry(lambda: c.get_experiment(exp_id), what).tags:
            raise
        retry(partial(c.set_experiment_tag, exp_id, key, value), what)
