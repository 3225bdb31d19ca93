"""The model registry: registering a run's model as a new version, moving its alias once the run has
FINISHED (docs/adapt.md, "Registered name"), and turning a model reference (`models:/NAME@ALIAS`, a run
id, ...) into the run it came from."""

from __future__ import annotations

import contextlib
import re

from mlflow.exceptions import MlflowException

from pipeline.errors import TrackingError, UpstreamError
from pipeline.progress import log
from pipeline.tracking.store import client, retry, tracking_uri
from pipeline.tracking.tags import TAG_STAGE

DEFAULT_ALIAS = "current"  # MLflow reserves the alias "latest"


_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def resolve_model_ref(ref: str) -> str:
    """A meta-train run id from a run id, `models:/name@alias`, `models:/name/3`, `name@alias` or `runs:/id/...`."""
    c = client()
    ref = ref.strip()
    if _RUN_ID.match(ref):
        return ref
    if ref.startswith("runs:/"):
        return ref[len("runs:/") :].split("/")[0]
    body = ref[len("models:/") :] if ref.startswith("models:/") else ref
    try:
        if "@" in body and body.split("@", 1)[1].lower() != "latest":
            name, alias = body.split("@", 1)
            mv = retry(lambda: c.get_model_version_by_alias(name, alias), "read the model registry")
        elif "@" in body or body.endswith("/latest"):
            name = body.split("@", 1)[0] if "@" in body else body[: -len("/latest")]
            versions = retry(lambda: c.search_model_versions(f"name = '{name}'"), "read the model registry")
            if not versions:
                raise MlflowException(f"no versions of '{name}'")
            mv = max(versions, key=lambda v: int(v.version))
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            mv = retry(lambda: c.get_model_version(name, version), "read the model registry")
        else:
            versions = retry(lambda: c.search_model_versions(f"name = '{body}'"), "read the model registry")
            if not versions:
                raise MlflowException(f"no versions of '{body}'")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException:
        raise UpstreamError(
            f"model '{ref}' was not found in the registry of {tracking_uri()}. Give a meta-train run id, "
            "'models:/NAME@ALIAS', 'NAME@ALIAS' or 'models:/NAME/VERSION' (see the Models tab of `fewscan ui`)."
        ) from None
    if not mv.run_id:
        raise UpstreamError(f"registered model '{ref}' has no source run")
    return str(mv.run_id)


def register_version(run_id: str, artifact_uri: str, stage: str, artifact_path: str, name: str) -> str:
    """Register `<artifact_uri>/<artifact_path>` of run `run_id` as a new version of `name` (the registered
    model is created if missing); the version number. Aliases are moved separately (`move_aliases`)."""
    c = client()
    with contextlib.suppress(MlflowException):  # it exists already
        retry(lambda: c.create_registered_model(name), "create a registered model")
    source = f"{artifact_uri.rstrip('/')}/{artifact_path}"
    mv = retry(
        lambda: c.create_model_version(name, source, run_id=run_id, tags={TAG_STAGE: stage}),
        "register a model version",
    )
    return str(mv.version)


def alias_name(alias: str) -> str:
    """`alias`, or DEFAULT_ALIAS for "latest": MLflow reserves it (models:/NAME/latest already names the
    newest version)."""
    return DEFAULT_ALIAS if alias.lower() == "latest" else alias


def move_aliases(stage: str, run_id: str, pending: list[tuple[str, str, str]]) -> None:
    """Point each (name, alias, version) the run asked for at its version; called once the run is
    FINISHED. A failure here leaves the run FINISHED and says which alias did not move."""
    for name, alias, version in pending:
        try:
            retry(lambda: client().set_registered_model_alias(name, alias, version), "set a model alias")  # noqa: B023
        except MlflowException as err:
            raise TrackingError(
                f"{stage} run {run_id} FINISHED and registered {name} version {version}, but the alias "
                f"'{alias}' could not be moved to it ({err}). Set it in the Models tab of `fewscan ui`, or "
                f"use models:/{name}/{version}."
            ) from None
        log(f"{name}@{alias} -> version {version} (also models:/{name}/latest)")
