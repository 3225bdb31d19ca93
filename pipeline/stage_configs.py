"""What the command line needs to know about each stage, importable without torch or mlflow.

The stage order, each stage's upstream and suite section, its config model and its command-line options
module. `pipeline/stages.py` (which imports the stage modules, hence torch and mlflow) takes its tables
from here. The CLI and `pipeline/suite.py` use only this module until a command has been validated, so
that a typo in a suite, a manifest or a flag is reported before the heavy imports (issue 18 item 3;
README, "Command line"); `tests/foundation/test_cli_imports.py` checks it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pydantic import BaseModel

ORDER = ("ingest", "episodes", "meta-train", "adapt", "evaluate")
# The key of each stage's section in a suite file (ingest is configured by the data manifest).
SECTIONS = {"episodes": "episodes", "meta-train": "meta_train", "adapt": "adapt", "evaluate": "evaluate"}
UPSTREAM: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "episodes": ("ingest",),
    "meta-train": ("episodes",),
    "adapt": ("meta-train",),
    "evaluate": ("meta-train",),
}
# The package of each stage: `<package>.stage` runs it, `<package>.options` holds its command-line hooks.
PACKAGES = {
    "ingest": "pipeline.ingest",
    "episodes": "pipeline.episodes",
    "meta-train": "pipeline.metatrain",
    "adapt": "pipeline.adapt",
    "evaluate": "pipeline.evaluate",
}
# (module, class) of each stage's config model; the stage module's CONFIG is the same class.
CONFIG_MODELS = {
    "ingest": ("pipeline.ingest.manifest", "IngestConfig"),
    "episodes": ("pipeline.episodes.config", "EpisodesConfig"),
    "meta-train": ("pipeline.metatrain.config", "MetaTrainConfig"),
    "adapt": ("pipeline.adapt.config", "AdaptConfig"),
    "evaluate": ("pipeline.evaluate.config", "EvaluateConfig"),
}


def _check(stage: str) -> None:
    if stage not in PACKAGES:
        raise KeyError(f"unknown stage '{stage}'; stages: {', '.join(ORDER)}")


def config_model(stage: str) -> type[BaseModel]:
    """The pydantic model that validates `stage`'s config (its suite section; ingest: the manifest)."""
    _check(stage)
    mod_name, cls_name = CONFIG_MODELS[stage]
    model: type[BaseModel] = getattr(importlib.import_module(mod_name), cls_name)
    return model


def options(stage: str) -> ModuleType:
    """`stage`'s command-line hooks: `add_arguments`, `overrides_from_args`, optionally `compose_section`."""
    _check(stage)
    return importlib.import_module(PACKAGES[stage] + ".options")
