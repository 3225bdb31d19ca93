"""The MLflow pyfunc of an adapted model: scans in, class probabilities out, preprocessing inside.

The one module besides the tracking layer (pipeline/tracking/) that imports mlflow: a pyfunc must subclass
`mlflow.pyfunc.PythonModel` (pipeline/adapt/fewscan_model.py, the model's code file, only instantiates it).
All the work is done by `pipeline.adapt.adapted.AdaptedClassifier` (no mlflow).

How the model is stored and loaded (docs/CONTRACTS.md, "Adapted model"): an MLflow "model from code" whose
code file is pipeline/adapt/fewscan_model.py and whose one artifact is the `adapted` folder (JSON + plain
tensor files); nothing in it is pickled. `load_adapted`, fewscan's own loader, never goes through
`mlflow.pyfunc.load_model`: that would run the code file the model folder carries, whoever wrote it. It
checks the MLmodel file (plain YAML) is fewscan's form and reads the `adapted` folder with the installed
fewscan, tensors with `weights_only=True`.

Input (`mlflow models serve` JSON or `pyfunc.load_model(...).predict(...)`), one scan per row:
- a DataFrame (or `{"dataframe_split"/"dataframe_records": ...}` in a scoring request) with ONE of the
  columns `path` (a scan file readable by the server), `dicom_base64` (a DICOM/PNG/NIfTI file's bytes,
  base64-encoded: what a remote client sends), `bytes` (raw bytes, in-process) or `array` (an array already
  preprocessed like the meta-model's store, shape (C, H, W));
- or, in-process: a list of paths / bytes / arrays, a single path, or a numpy array (n, C, H, W).

Output: a DataFrame, one row per input row: `predicted_class`, `prob_<class>` for every class (label
index order, the condition first), `error` (empty when the scan was scored; otherwise why not — a bad
scan in a batch never fails the whole request). `predicted_class` follows the model's decision rule, the
same as `fewscan predict`'s: a binary model names the condition when `prob_<condition>` reaches the
threshold adapt chose on the support scans (adapted.json "decision"; docs/adapt.md), not the argmax; the
probabilities are the network's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import yaml
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema

from pipeline.adapt.adapted import AdaptedClassifier, prob_column
from pipeline.errors import DataError, UpstreamError

ARTIFACT_KEY = "adapted"  # the key of the adapted-model folder in the pyfunc's artifacts
INPUT_COLUMNS = ("path", "dicom_base64", "bytes", "array")


class FewscanAdaptedModel(PythonModel):  # type: ignore[misc]
    """Built empty by the model's code file; the adapted model is loaded from the artifacts in load_context."""

    def __init__(self) -> None:
        self._clf: AdaptedClassifier | None = None

    def load_context(self, context: Any) -> None:
        self._clf = AdaptedClassifier.load(Path(context.artifacts[ARTIFACT_KEY]))

    @property
    def classifier(self) -> AdaptedClassifier:
        if self._clf is None:
            raise RuntimeError("the adapted model is not loaded (load it with mlflow.pyfunc.load_model)")
        return self._clf

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """A scoring request's DataFrame (one scan per row) -> one row of probabilities per scan.

        Typed `pd.DataFrame`, a hint from which MLflow infers no input schema and so validates nothing:
        a request may carry any one of the input columns, and in process MLflow passes the other accepted
        forms (a list, an array, a path; see the module docstring) through to `predict_any` untouched.
        """
        clf = self.classifier
        batch_size = int((params or {}).get("batch_size", 64))
        rows = predict_any(clf, model_input, batch_size)
        cols = ["predicted_class", *(prob_column(c) for c in clf.classes), "error"]
        df = pd.DataFrame(rows, columns=cols)
        if (df["error"] != "").any():
            # unscored rows: None, not NaN, so a scoring response stays strict JSON (null, not NaN)
            df = df.astype(object).where(df.notna(), None)
        return df


def predict_any(clf: AdaptedClassifier, model_input: Any, batch_size: int = 64) -> list[dict[str, Any]]:
    """Dispatch the accepted input forms (see module docstring) to the classifier."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, (str, Path)):
        return clf.predict_paths([Path(model_input)], batch_size)
    if isinstance(model_input, (bytes, bytearray)):
        return clf.predict_bytes([bytes(model_input)], batch_size)
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        x = model_input
        if x.ndim == len(clf.spec.shape):
            x = x[None]
        return clf.predict_arrays(list(x), batch_size)
    if isinstance(model_input, (list, tuple)):
        if not model_input:
            return []
        first = model_input[0]
        if isinstance(first, (str, Path)):
            return clf.predict_paths([Path(p) for p in model_input], batch_size)
        if isinstance(first, (bytes, bytearray)):
            return clf.predict_bytes([bytes(b) for b in model_input], batch_size)
        return clf.predict_arrays(list(model_input), batch_size)
    if isinstance(model_input, pd.Series):
        model_input = model_input.to_frame()
    if isinstance(model_input, pd.DataFrame):
        present = [c for c in INPUT_COLUMNS if c in model_input.columns]
        if len(present) != 1:
            raise DataError(
                f"the input needs exactly one of the columns {', '.join(INPUT_COLUMNS)} (one scan per row); "
                f"got columns: {', '.join(map(str, model_input.columns)) or 'none'}"
            )
        col = model_input[present[0]].tolist()
        if present[0] == "path":
            return clf.predict_paths([Path(str(p)) for p in col], batch_size)
        if present[0] in ("dicom_base64", "bytes"):
            return clf.predict_bytes(col, batch_size)  # base64 text or raw bytes, per row
        return clf.predict_arrays(col, batch_size)
    raise DataError(
        f"cannot score input of type {type(model_input).__name__}; send a DataFrame with a column "
        f"{' / '.join(INPUT_COLUMNS)}, or a list of paths, bytes or arrays"
    )


MODEL_ARTIFACT = "adapted_model"  # where the adapt stage logs the pyfunc inside its run
MODEL_CODE_FILE = "fewscan_model.py"  # pipeline/adapt/fewscan_model.py, copied into the model folder
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"  # the loader_module MLflow records for a model from code
# The input example saved with the model: a template of a scoring request (what MLflow's UI shows), no scan.
INPUT_EXAMPLE = {"dicom_base64": ["<a scan file's bytes, base64-encoded>"]}


def model_signature(classes: list[str]) -> ModelSignature:
    """The output columns of the model (see the module docstring). No input schema: a request carries any
    one of INPUT_COLUMNS, and MLflow would refuse the in-process forms against a column schema."""
    probs = [ColSpec(DataType.double, prob_column(c), required=False) for c in classes]
    out = Schema(
        [
            ColSpec(DataType.string, "predicted_class", required=False),
            *probs,
            ColSpec(DataType.string, "error"),
        ]
    )
    return ModelSignature(inputs=None, outputs=out)


def adapted_dir(folder: Path, model_uri: str) -> Path:
    """The `adapted` artifact folder of the model at `folder`, once its MLmodel file is found to be the form
    `fewscan adapt` saves: one python_function flavor, loaded as a model from code by fewscan's code file,
    no pickled model, no code paths, the `adapted` artifact inside the folder. Anything else is refused
    here, before any of the model is unpickled or run: the MLmodel is read as plain YAML."""

    def refuse(why: str) -> NoReturn:
        raise UpstreamError(
            f"refusing to load '{model_uri}': {why}. fewscan loads only models saved by `fewscan adapt` (code "
            "from the installed fewscan, weights as plain tensors), as loading any other could run code it "
            "carries; re-run `fewscan adapt` to make the model again"
        )

    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        refuse(f"its MLmodel file is unreadable ({str(err).splitlines()[0]})")
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"}:
        names = sorted(map(str, flavors)) if isinstance(flavors, dict) else []
        refuse(f"its MLmodel has the flavors {names}, not python_function alone")
    pf = flavors["python_function"]
    if not isinstance(pf, dict):
        refuse("its MLmodel has no python_function settings")
    if "python_model" in pf or any(folder.glob("*.pkl*")):
        refuse("it is a pickled (cloudpickle) Python model")
    code_file = Path(str(pf.get("model_code_path") or "")).name
    if pf.get("loader_module") != CODE_LOADER or code_file != MODEL_CODE_FILE:
        refuse(
            f"it is loaded by {pf.get('loader_module')!r} with code file {code_file or None!r}, not as a "
            f"model from code by fewscan's {MODEL_CODE_FILE}"
        )
    if pf.get("code"):
        refuse("it carries code paths")
    artifacts = pf.get("artifacts")
    if not isinstance(artifacts, dict) or set(artifacts) != {ARTIFACT_KEY}:
        refuse(f"its artifacts are not the one '{ARTIFACT_KEY}' folder")
    info = artifacts[ARTIFACT_KEY]
    rel = str(info.get("path") or "") if isinstance(info, dict) else ""
    target = (folder / rel).resolve()
    if not rel or not target.is_relative_to(folder.resolve()) or not target.is_dir():
        refuse(f"its '{ARTIFACT_KEY}' artifact is not a folder inside the model")
    return target


def local_model_dir(model_uri: str) -> Path:
    """The local folder of an adapted pyfunc model: `models:/NAME@ALIAS`, `NAME@ALIAS`, `models:/NAME/N`,
    `runs:/RUN_ID[/PATH]`, an adapt run id, or a local model folder.

    Resolved with fewscan's own tracking store (pipeline.tracking: MLFLOW_TRACKING_URI or ./mlflow), never
    MLflow's process-global default, and downloaded to the local cache when the store is remote.
    """
    from pipeline import tracking

    local = Path(model_uri)
    if local.is_dir():
        if not (local / "MLmodel").is_file():
            raise UpstreamError(f"{local} is a folder but not an MLflow model (no MLmodel file in it)")
        return local
    ref = model_uri.strip()
    if ref.startswith("runs:/"):
        run_id, _, rel = ref[len("runs:/") :].partition("/")
        rel = rel.strip("/") or MODEL_ARTIFACT
    else:
        run_id, rel = tracking.resolve_model_ref(ref), MODEL_ARTIFACT
    run = tracking.UpstreamRun.from_id(run_id, expect_stage="adapt")
    return run.artifact(rel)


def load_adapted(model_uri: str) -> AdaptedClassifier:
    """The classifier of an adapted model (see `local_model_dir` for the accepted references).

    Not `mlflow.pyfunc.load_model`, which would run the code file in the model folder: the MLmodel is
    checked (`adapted_dir`) and the `adapted` folder read by the installed fewscan, tensors with
    `weights_only=True`. So loading a model someone else logged runs none of their code."""
    folder = local_model_dir(model_uri)
    try:
        return AdaptedClassifier.load(adapted_dir(folder, model_uri))
    except DataError as err:
        raise UpstreamError(
            f"cannot load the adapted model '{model_uri}': {err}; re-run `fewscan adapt` to make it again"
        ) from None
