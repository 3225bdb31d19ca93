"""The whole store as `fewscan gc` sees it, and removing a run: every fewscan experiment in scope, every run
in them (deleted ones too), what the model registry points at, a run's stored bytes, and the deletion of a
run, its registry versions and its artifacts. The rules for what gc keeps are `pipeline/gc_runs.py`'s; this
module is the MLflow half of them (docs/storage.md, "What gc keeps").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from pipeline.progress import log
from pipeline.tracking import owners
from pipeline.tracking.experiments import experiment_name
from pipeline.tracking.store import client, retry, tracking_uri


@dataclass
class Scope:
    """The fewscan experiments gc reads (`every`: a run in any of them may reference a candidate), those
    whose runs it may delete (`mine`), and the server user whose runs alone are candidates (None locally)."""

    every: list[Any]
    mine: list[Any]
    user: str | None


def _pages(fetch: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every item of a paged MLflow search, `fetch(page_token)` being one page."""
    token = None
    while True:
        page = retry(lambda: fetch(token), "read the tracking store")  # noqa: B023
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


def gc_scope(suite: str | None) -> Scope:
    """Every fewscan experiment, and those whose runs gc may delete: the suite's (or every fewscan one), on
    a server only those this user created (owners.is_owned, the rule of `search_scope`)."""
    c = client()  # opening the store marks runs of dead processes KILLED
    every = list(
        _pages(
            lambda tok: c.search_experiments(
                filter_string="name LIKE 'fewscan/%'", max_results=1000, page_token=tok
            )
        )
    )
    mine = every
    if suite is not None:
        mine = [e for e in mine if e.name == experiment_name(suite, None)]
    user = owners.server_user()
    if user:
        owned = [e for e in mine if owners.is_owned(e, user)]
        for e in mine:
            if e not in owned:
                log(
                    f"gc: leaving experiment '{e.name}' alone: it was not created by you ({user}) with fewscan"
                )
        mine = owned
    return Scope(every, mine, user)


def all_runs(exp_ids: list[str], *, deleted: bool = False) -> list[Any]:
    """Every active run (`deleted`: every deleted run) of these experiments."""
    c = client()
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    out: list[Any] = []
    for i in range(0, len(exp_ids), 50):
        out += _pages(partial(_runs_page, c, exp_ids[i : i + 50], view))
    return out


def _runs_page(c: Any, exp_ids: list[str], view: int, token: str | None) -> Any:
    return c.search_runs(exp_ids, "", run_view_type=view, max_results=1000, page_token=token)


def registry_needs() -> tuple[set[str], dict[str, list[tuple[str, str]]]]:
    """(run ids a registered model needs: aliased versions and each model's newest version,
    {run id: [(model, version)] of every version})."""
    c = client()
    needed: set[str] = set()
    by_run: dict[str, list[tuple[str, str]]] = {}
    newest: dict[str, Any] = {}
    for mv in _pages(lambda tok: c.search_model_versions(max_results=1000, page_token=tok)):
        if not mv.run_id:
            continue
        by_run.setdefault(str(mv.run_id), []).append((str(mv.name), str(mv.version)))
        if getattr(mv, "aliases", None):
            needed.add(str(mv.run_id))
        if mv.name not in newest or int(mv.version) > int(newest[mv.name].version):
            newest[mv.name] = mv
    # search results may leave `aliases` empty: the registered models carry them for certain
    for rm in _pages(lambda tok: c.search_registered_models(max_results=1000, page_token=tok)):
        for version in dict(getattr(rm, "aliases", None) or {}).values():
            with contextlib.suppress(MlflowException):
                mv = retry(partial(c.get_model_version, rm.name, str(version)), "read the model registry")
                if mv.run_id:
                    needed.add(str(mv.run_id))
    needed.update(str(mv.run_id) for mv in newest.values())
    return needed, by_run


def remote_bytes(run_id: str) -> int:
    """Bytes of run `run_id`'s artifacts as the tracking server lists them."""
    c = client()
    total = 0
    todo: list[str | None] = [None]  # folders to list; None = the run's root
    while todo:
        path = todo.pop()
        for f in retry(partial(c.list_artifacts, run_id, path), "list artifacts"):
            if f.is_dir:
                todo.append(f.path)
            else:
                total += int(f.file_size or 0)
    return total


def delete_remote_artifacts(artifact_uri: str) -> None:
    """Delete the artifacts behind `artifact_uri` through the store's artifact repository (a server's)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri())
    retry(lambda: repo.delete_artifacts(), "delete artifacts")


def run_state(run_id: str) -> tuple[str, str]:
    """(lifecycle stage: "active" or "deleted", status) of a run, read now."""
    run = retry(lambda: client().get_run(run_id), "read a run")
    return str(run.info.lifecycle_stage), str(run.info.status)


def runs_naming(exp_ids: list[str], tag: str, run_id: str, limit: int = 50) -> list[str]:
    """Ids of the runs of these experiments whose tag `tag` is `run_id` (the runs that use it as an
    upstream or a chain stage), newest first: a run started since a listing comes first."""
    found = retry(
        partial(
            client().search_runs,
            exp_ids,
            f"tags.`{tag}` = '{run_id}'",
            max_results=limit,
            order_by=["attributes.start_time DESC"],
        ),
        "search runs that use a run",
    )
    return [str(run.info.run_id) for run in found]


def unregister(name: str, version: str) -> str | None:
    """Delete version `version` of registered model `name`; None when done, else MLflow's refusal (a store
    that stays locked still raises TrackingError, as every other call here)."""
    try:
        retry(lambda: client().delete_model_version(name, version), "unregister a model version")
    except MlflowException as err:
        return str(err)
    return None


def delete_run(run_id: str, tag: str, note: str) -> None:
    """Tag run `run_id` with `note` (what a restored run then says), then delete it in MLflow."""
    c = client()
    retry(lambda: c.set_tag(run_id, tag, note), "tag a run")
    retry(lambda: c.delete_run(run_id), "delete a run")
