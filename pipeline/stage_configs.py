"""The stage registry: one `StageSpec` per stage, importable without torch or mlflow.

Everything the rest of the code knows about a stage by its name is a field here: its order in the chain,
its upstream stages, its suite section, its package (whose `stage` module runs it and is the root of its
fingerprinted code set, pipeline/codeset.py; whose `options` module holds its command-line hooks), its
config model, its command-line help, and the few behaviours that differ between stages (system metrics,
`--resume`, torchrun, being optional in a chain). The CLI, the chain, `pipeline/stages.py`,
`pipeline/suite.py` and the docs' stage table read it (docs/ARCHITECTURE.md, "Five stages"), and
`tests/foundation/test_stage_registry.py` checks that they agree with it.

The CLI and `pipeline/suite.py` use only this module until a command has been validated, so that a typo in
a suite, a manifest or a flag is reported before the heavy imports (issue 18 item 3; README, "Command
line"); `tests/foundation/test_cli_imports.py` checks it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel

# What a stage's own command is given: a data manifest (ingest); a suite, whose latest upstream run it
# consumes unless `--from RUN_ID` names one; or an optional suite and `--model REF`, a meta-model (adapt).
CliInput = Literal["manifest", "suite", "model"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    package: str  # `<package>.stage` runs the stage; `<package>.options` holds its command-line hooks
    config_model: tuple[str, str]  # (module, class) of its pydantic config; the stage module's CONFIG
    upstream: tuple[str, ...]  # the stages whose runs it consumes
    section: str | None  # its key in a suite file; None: configured by the data manifest (ingest)
    cli_input: CliInput
    summary: str  # one line, in `fewscan --help`
    description: str  # the paragraph of `fewscan <stage> --help`
    set_example: str  # a `--set` override valid for its config (tests/foundation/test_cli_help.py)
    optional: bool = False  # in a chain only when the suite has its section
    system_metrics: bool = False  # its runs record MLflow system metrics (CPU, memory, GPU) for the UI
    resumable: bool = False  # `fewscan <stage> --resume [RUN_ID]` continues an interrupted run
    # May run under torchrun: every rank executes it on the upstream run rank 0 resolved, and ranks > 0
    # get a `FollowerRun` that never talks to MLflow (pipeline/distributed.py; docs/scaling.md).
    distributed: bool = False

    @property
    def entry_module(self) -> str:
        """The stage module: what `pipeline/stages.py` runs and where its code set starts (codeset.py)."""
        return f"{self.package}.stage"

    @property
    def options_module(self) -> str:
        return f"{self.package}.options"

    @property
    def per_dataset(self) -> bool:
        """Configured by the data manifest alone, so that its runs serve every suite on the dataset: they
        are found by the dataset tag, not the suite's (ingest)."""
        return self.section is None


SPECS: tuple[StageSpec, ...] = (
    StageSpec(
        name="ingest",
        package="pipeline.ingest",
        config_model=("pipeline.ingest.manifest", "IngestConfig"),
        upstream=(),
        section=None,
        cli_input="manifest",
        summary="decode and de-identify a study into a scan index + image store",
        description=(
            "Ingest a study: read the data manifest (scan root, labels, preprocessing), decode DICOM/NIfTI/"
            "PNG/MedMNIST scans in parallel, de-identify them, and write the scan index, the image store and "
            "ingest_report.json as artifacts of an MLflow run tagged fewscan.stage=ingest."
        ),
        set_example="preprocess.image_size=[64,64]",
    ),
    StageSpec(
        name="episodes",
        package="pipeline.episodes",
        config_model=("pipeline.episodes.config", "EpisodesConfig"),
        upstream=("ingest",),
        section="episodes",
        cli_input="suite",
        summary="build the condition split and fixed few-shot episodes from an ingest run",
        description=(
            "Build the few-shot problem from an ingest run and a task suite: the condition split (common = "
            "meta-train, validation, rare = meta-test), patient-disjoint pools, fixed validation/test "
            "episodes (episodes/val.jsonl, episodes/test.jsonl), split.json and leakage_audit.json. Reads "
            "no images."
        ),
        set_example="k_shot=[1,5]",
    ),
    StageSpec(
        name="meta-train",
        package="pipeline.metatrain",
        config_model=("pipeline.metatrain.config", "MetaTrainConfig"),
        upstream=("episodes",),
        section="meta_train",
        cli_input="suite",
        summary="meta-train MAML-family methods and ProtoNet on the common conditions",
        description=(
            "Meta-train on episodes of the common conditions (MAML family, ProtoNet) from an episodes run; "
            "writes checkpoints (resumable with --resume), learning curves and the meta-learned "
            "initialization (state dict + meta_model.json), registered in the model registry."
        ),
        set_example="outer.steps=200",
        system_metrics=True,
        resumable=True,
        distributed=True,
    ),
    StageSpec(
        name="adapt",
        package="pipeline.adapt",
        config_model=("pipeline.adapt.config", "AdaptConfig"),
        upstream=("meta-train",),
        section="adapt",
        cli_input="model",
        summary="adapt a meta-model to a new condition from a few scans",
        description=(
            "Adapt a meta-model to a new condition from a few labelled scans (a folder with one subfolder "
            "per class, or a label CSV); logs support loss per step and, with --query, accuracy/AUC/"
            "sensitivity/specificity; saves and registers the adapted model as a servable MLflow pyfunc."
        ),
        set_example="threshold=argmax",
        optional=True,
    ),
    StageSpec(
        name="evaluate",
        package="pipeline.evaluate",
        config_model=("pipeline.evaluate.config", "EvaluateConfig"),
        upstream=("meta-train",),
        section="evaluate",
        cli_input="suite",
        summary="compare meta-learning with traditional training on the rare conditions",
        description=(
            "Evaluate the meta-trained methods against traditional training (pretrain + fine-tune), "
            "training from scratch and ProtoNet on the fixed test episodes of the rare conditions, with 95% "
            "intervals; writes results.json, report.md and plots/*.png. Hyper-parameters are chosen on "
            "validation episodes."
        ),
        set_example="finetune.steps=[10,50]",
        system_metrics=True,
    ),
)
BY_NAME = {s.name: s for s in SPECS}

# Derived views, for the code that only needs one fact per stage.
ORDER = tuple(s.name for s in SPECS)
SECTIONS = {s.name: s.section for s in SPECS if s.section is not None}
UPSTREAM = {s.name: s.upstream for s in SPECS}
PACKAGES = {s.name: s.package for s in SPECS}
CONFIG_MODELS = {s.name: s.config_model for s in SPECS}


def spec(stage: str) -> StageSpec:
    """The spec of `stage`; an unknown name is a KeyError listing the stages."""
    try:
        return BY_NAME[stage]
    except KeyError:
        raise KeyError(f"unknown stage '{stage}'; stages: {', '.join(ORDER)}") from None


def chain_stages(suite_cfg: Any) -> list[str]:
    """The stages `fewscan run` runs for a suite (its `SuiteConfig`), in order: an optional stage only when
    the suite has its section."""
    return [s.name for s in SPECS if not s.optional or getattr(suite_cfg, str(s.section), None) is not None]


def config_model(stage: str) -> type[BaseModel]:
    """The pydantic model that validates `stage`'s config (its suite section; ingest: the manifest)."""
    mod_name, cls_name = spec(stage).config_model
    model: type[BaseModel] = getattr(importlib.import_module(mod_name), cls_name)
    return model


def options(stage: str) -> ModuleType:
    """`stage`'s command-line hooks: `add_arguments`, `overrides_from_args`, optionally `compose_section`."""
    return importlib.import_module(spec(stage).options_module)


def _check_links(specs: tuple[StageSpec, ...]) -> None:
    """Each upstream names an earlier stage (the chain runs in table order); fails at import, not mid-chain."""
    names = tuple(s.name for s in specs)
    for i, s in enumerate(specs):
        for up in s.upstream:
            if up not in names[:i]:
                raise ValueError(f"stage '{s.name}': upstream '{up}' is not an earlier stage of {names}")
        if s.cli_input == "suite" and len(s.upstream) != 1:
            raise ValueError(f"stage '{s.name}': a suite command takes `--from` for exactly one upstream")


_check_links(SPECS)
