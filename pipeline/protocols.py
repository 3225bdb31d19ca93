"""What a stage module is and what the run object a stage is handed offers, as `typing.Protocol`s.

`pipeline/stages.py` runs any stage through `StageModule`; a stage logs only through the `RunLike` it
gets. Three kinds of object play that run: `pipeline.tracking.StageRun` (an MLflow run, rank 0),
`pipeline.distributed.FollowerRun` (the other torchrun ranks: logs nothing) and the recording fakes of the
stage tests. mypy checks each against `RunLike` (`.ci/run`, `mypy`; pyproject's `[tool.mypy]` covers the
stage tests that define fakes), so none of them can drift silently from what the stages call, and a stage
that calls a method the protocol lacks fails the type check instead of a follower rank at run time.
`tests/foundation/test_protocols.py` shows mypy catching such drift. docs/CONTRACTS.md, "Stage modules".

No heavy imports: the tracking types are named for the type checker only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pipeline.tracking import StageResult, UpstreamRun


class RunLike(Protocol):
    """The members of a stage run that the stage modules use, and nothing more."""

    @property
    def run_id(self) -> str: ...  # "" on a follower rank
    @property
    def outdir(self) -> Path: ...  # scratch folder; uploaded as the run's artifacts when the stage succeeds
    @property
    def resumed(self) -> bool: ...  # a `--resume`d run: the stage continues from its own artifacts
    @property
    def suite(self) -> str | None: ...  # the suite the run is filed under (names registered models)

    def log_params(self, d: dict[str, Any]) -> None: ...
    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None: ...
    def set_tags(self, d: dict[str, Any]) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_dataset(
        self, df: Any, name: str, digest: str, context: str, source: str | None = None
    ) -> None: ...
    def own_artifact(self, rel: str) -> Path | None: ...
    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str: ...
    def log_pyfunc(
        self,
        artifact_path: str,
        python_model: Path,
        artifacts: dict[str, str] | None = None,
        input_example: Any = None,
        signature: Any = None,
        pip_requirements: list[str] | None = None,
    ) -> str: ...


class StageModule(Protocol):
    """`pipeline.<stage>.stage` (the package is named in its StageSpec, pipeline/stage_configs.py).

    Optional module members, read with `getattr` by pipeline/stages.py: `public_config(cfg) -> dict` (the
    config as it may be logged), `fingerprint_inputs(cfg)` (a digest of inputs outside the config) and
    `FINGERPRINT_EXCLUDE` (config keys that do not change the result)."""

    @property
    def CONFIG(self) -> type[BaseModel]: ...  # noqa: N802 (a module constant)

    def run_name(self, cfg: Any) -> str: ...
    def execute(self, cfg: Any, run: RunLike, upstream: dict[str, UpstreamRun]) -> StageResult: ...


class NullRun:
    """A `RunLike` that records nothing: a torchrun follower rank's run (`FollowerRun`) and the base of the
    stage tests' fakes, which override only what they record."""

    def __init__(self, outdir: Path, run_id: str = "", suite: str | None = None, resumed: bool = False):
        self.outdir = outdir
        self.run_id = run_id
        self.suite = suite
        self.resumed = resumed

    def log_params(self, d: dict[str, Any]) -> None:
        return None

    def log_metrics(self, d: dict[str, float], step: int | None = None) -> None:
        return None

    def set_tags(self, d: dict[str, Any]) -> None:
        return None

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        return None

    def log_dataset(self, df: Any, name: str, digest: str, context: str, source: str | None = None) -> None:
        return None

    def own_artifact(self, rel: str) -> Path | None:
        return None

    def register_model(self, artifact_path: str, name: str, alias: str = "current") -> str:
        return ""

    def log_pyfunc(
        self,
        artifact_path: str,
        python_model: Path,
        artifacts: dict[str, str] | None = None,
        input_example: Any = None,
        signature: Any = None,
        pip_requirements: list[str] | None = None,
    ) -> str:
        return ""


if TYPE_CHECKING:
    # mypy fails here when NullRun (hence FollowerRun and every test fake built on it) lacks a member of
    # RunLike or has one with another signature.
    _NULL_RUN_IS_A_RUN: type[RunLike] = NullRun
