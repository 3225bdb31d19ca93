"""Meta-model on disk: `state_dict.pth` + `meta_model.json` in one folder (`models/<method>` of a
meta-train run), enough to rebuild the network and adapt it again without the training code's config.

state_dict.pth: the `FewShotNet` state dict, plus learned inner learning rates under
    `inner_lr.<step>.<parameter name>` (`<step>` = `all` for Meta-SGD's per-parameter rates, or the
    step index 0.. for MAML++'s per-layer per-step rates). Plain `torch.save` of a dict of tensors, i.e.
    exactly what `mlflow.pytorch.log_state_dict` writes, so either writer may be used.
meta_model.json: `pipeline.meta.model_file.MetaModelFile`, written and read through that model: {"format":
    "fewscan-meta-model", "version": 1, "schema_version": 2, "method", "model": ModelSpec, "in_channels",
    "image_shape": [C, *spatial], "spatial_dims", "head", "normalization", "inner": {"steps", "eval_steps",
    "lr", "learned_lr", "trainable", "second_order"}, "ingest_run_id", "preprocessing", "label_names",
    "ingest": {the ingest facts adapt needs}, ...extra}
ingest_patients.txt (optional, named by `ingest.patients_file`): the salted patient keys of the ingest,
    one a line, for adapt's check that a query patient was not in the meta-model's data. Beside the JSON,
    not in it: an adapted model copies meta_model.json and has no use for the list.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline import atomic
from pipeline.artifacts import parse_artifact
from pipeline.errors import DataError
from pipeline.meta.inner import LossFn, LRSpec
from pipeline.meta.methods import FewShotMethod, GradientMethod, ProtoNetMethod
from pipeline.meta.model_file import META_FORMAT, IngestFacts, MetaModelFile
from pipeline.meta.models import FewShotNet, ModelSpec, build_model

FORMAT = META_FORMAT
VERSION = MetaModelFile.VERSION
STATE_FILE = "state_dict.pth"
META_FILE = MetaModelFile.FILE
PATIENTS_FILE = "ingest_patients.txt"


def lr_to_state(lr: LRSpec) -> dict[str, Tensor]:
    """Learned learning rates → flat `inner_lr.<step>.<name>` entries (floats are not stored here)."""
    if isinstance(lr, (int, float)):
        return {}
    if isinstance(lr, Mapping):
        return {f"inner_lr.all.{k}": v.detach().cpu() for k, v in lr.items()}
    out: dict[str, Tensor] = {}
    for i, d in enumerate(lr):
        out.update({f"inner_lr.{i}.{k}": v.detach().cpu() for k, v in d.items()})
    return out


def lr_from_state(state: Mapping[str, Tensor], default: float) -> LRSpec:
    per_step: dict[int, dict[str, Tensor]] = {}
    per_param: dict[str, Tensor] = {}
    for key, v in state.items():
        if not key.startswith("inner_lr."):
            continue
        _, step, name = key.split(".", 2)
        if step == "all":
            per_param[name] = v
        else:
            per_step.setdefault(int(step), {})[name] = v
    if per_step:
        return [per_step[i] for i in sorted(per_step)]
    if per_param:
        return per_param
    return default


def meta_model_files(
    model: FewShotNet,
    *,
    method: str,
    model_spec: ModelSpec,
    image_shape: Sequence[int],
    inner: Mapping[str, Any],
    inner_lr: LRSpec | None = None,
    extra: Mapping[str, Any] | None = None,
    ingest: IngestFacts | None = None,
) -> tuple[dict[str, Tensor], MetaModelFile]:
    """The two things a meta-model folder holds: (state dict, meta_model.json content).

    `image_shape` is (C, *spatial) of the images the model was trained on; `inner` must hold at least
    `steps` and `lr`; `extra` adds provenance (ingest_run_id, preprocessing, label_names, ...); `ingest`
    the facts adapt reads instead of the ingest run (meta-train records them).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if inner_lr is not None:
        state.update(lr_to_state(inner_lr))
    meta = MetaModelFile.model_validate(
        {
            **dict(extra or {}),
            "format": FORMAT,
            "version": VERSION,
            "schema_version": MetaModelFile.SCHEMA_VERSION,
            "method": method,
            "model": model_spec,
            "in_channels": int(image_shape[0]),
            "image_shape": [int(s) for s in image_shape],
            "spatial_dims": len(image_shape) - 1,
            "head": model_spec.head,
            "normalization": model_spec.norm,
            "inner": dict(inner),
            "ingest": ingest,
        }
    )
    return state, meta


def save_meta_model(
    folder: str | Path, model: FewShotNet, *, patient_keys: Sequence[str] | None = None, **kw: Any
) -> Path:
    """Write `state_dict.pth` and `meta_model.json` into `folder` atomically; kw as `meta_model_files`.
    `patient_keys` (with `ingest=`): the ingest's salted patient keys, written to PATIENTS_FILE."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, meta = meta_model_files(model, **kw)
    if patient_keys is not None and meta.ingest is not None:
        atomic.write_text(folder / PATIENTS_FILE, "".join(f"{k}\n" for k in sorted(set(patient_keys))))
        meta.ingest = meta.ingest.model_copy(update={"patients_file": PATIENTS_FILE})
    with atomic.atomic_open(folder / STATE_FILE, "wb") as f:
        torch.save(state, f)
    atomic.write_text(folder / META_FILE, meta.model_dump_json(indent=2) + "\n")
    return folder


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=2, sort_keys=True, default=str)


@dataclass
class MetaModel:
    """A loaded meta-model: the network with its meta-learned parameters, and its description."""

    model: FewShotNet
    meta: MetaModelFile
    inner_lr: LRSpec
    folder: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.method

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta.image_shape)

    def training_patients(self) -> set[str] | None:
        """The salted patient keys of the ingest it was trained on (None when the folder records none)."""
        ing = self.meta.ingest
        if ing is None or ing.patients_file is None or self.folder is None:
            return None
        path = self.folder / ing.patients_file
        if not path.is_file():
            return None
        return {line for line in path.read_text().splitlines() if line}

    def method(
        self,
        steps: int | None = None,
        lr: float | None = None,
        batch_size: int = 64,
        loss_fn: LossFn | None = None,
    ) -> FewShotMethod:
        """The method to adapt with: learned inner rates unless `lr` overrides them; `steps` defaults to the
        recorded `inner.eval_steps` (else `inner.steps`); `loss_fn` replaces the inner loop's cross-entropy
        (gradient methods; ProtoNet has no inner loop)."""
        if self.meta.method == "protonet":
            return ProtoNetMethod(self.model, name="protonet", batch_size=batch_size)
        inner = self.meta.inner
        n = steps if steps is not None else int(inner.eval_steps or inner.steps)
        return GradientMethod(
            self.model,
            steps=n,
            lr=self.inner_lr if lr is None else lr,
            trainable=inner.trainable,
            name=self.name,
            batch_size=batch_size,
            clip_grad=inner.clip_grad,
            loss_fn=loss_fn,
        )


def load_tensors(path: Path) -> dict[str, Tensor]:
    """A file of named tensors, read with `torch.load(weights_only=True)`. A file that holds anything else
    (a pickled object, whose unpickling could run code) is refused by torch before any of it runs, and
    reported here as a DataError; so is a dict of something other than tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(
            f"{path} holds more than tensors (a pickled object); refused unread, as unpickling it could run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable tensor file ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise DataError(f"{path} is not a dict of named tensors")
    return state


def load_meta_model(folder: str | Path, device: str | torch.device = "cpu") -> MetaModel:
    """Rebuild a meta-model from a `models/<method>` folder (see module docstring)."""
    folder = Path(folder)
    meta_path, state_path = folder / META_FILE, folder / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise DataError(
            f"{folder} is not a meta-model folder: it needs {META_FILE} and {STATE_FILE} "
            f"(the models/<method> artifact folder of a meta-train run)"
        )
    text = meta_path.read_bytes()
    # format and version first, as older fewscan versions check them: a file that is not a meta-model
    # at all gets that message, not a list of missing fields
    fmt, version = _format_of(text)
    if fmt != FORMAT:
        raise DataError(f"{meta_path} is not a fewscan meta-model (format={fmt!r})")
    if version > VERSION:
        raise DataError(f"{meta_path} has version {version}; this fewscan reads up to {VERSION}, upgrade it")
    meta = parse_artifact(MetaModelFile, text, str(meta_path))
    spec = meta.model
    shape = meta.image_shape
    model = build_model(spec, int(shape[0]), tuple(shape[1:]))
    state = load_tensors(state_path)
    model_state = {k: v for k, v in state.items() if not k.startswith("inner_lr.")}
    model.load_state_dict(model_state, strict=True)
    model.to(device).eval()
    lr = lr_from_state({k: v.to(device) for k, v in state.items()}, meta.inner.lr)
    return MetaModel(model=model, meta=meta, inner_lr=lr, folder=folder)


def _format_of(text: bytes) -> tuple[Any, int]:
    try:
        raw = json.loads(text)
    except ValueError:
        return None, 0
    if not isinstance(raw, dict):
        return None, 0
    v = raw.get("version", 0)
    return raw.get("format"), v if isinstance(v, int) else 0
