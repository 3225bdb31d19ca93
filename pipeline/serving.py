"""The MLflow pyfunc of an adapted model: scans in, class probabilities out, preprocessing inside.

The one module besides pipeline/tracking.py that imports mlflow: a pyfunc must subclass
`mlflow.pyfunc.PythonModel`. All the work is done by `pipeline.adapt.adapted.AdaptedClassifier` (no mlflow).

Input (`mlflow models serve` JSON or `pyfunc.load_model(...).predict(...)`), one scan per row:
- a DataFrame (or `{"dataframe_split"/"dataframe_records": ...}` in a scoring request) with ONE of the
  columns `path` (a scan file readable by the server), `dicom_base64` (a DICOM/PNG/NIfTI file's bytes,
  base64-encoded: what a remote client sends), `bytes` (raw bytes, in-process) or `array` (an array already
  preprocessed like the meta-model's store, shape (C, H, W));
- or, in-process: a list of paths / bytes / arrays, a single path, or a numpy array (n, C, H, W).

Output: a DataFrame, one row per input row: `predicted_class`, `prob_<class>` for every class (label
index order, the condition first), `error` (empty when the scan was scored; otherwise why not — a bad
scan in a batch never fails the whole request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from pipeline.adapt.adapted import AdaptedClassifier, prob_column
from pipeline.errors import DataError, UpstreamError

ARTIFACT_KEY = "adapted"  # the key of the adapted-model folder in the pyfunc's artifacts
INPUT_COLUMNS = ("path", "dicom_base64", "bytes", "array")


class FewscanAdaptedModel(PythonModel):  # type: ignore[misc]
    """Holds nothing heavy when pickled; the adapted model is loaded from the artifacts in load_context."""

    def __init__(self) -> None:
        self._clf: AdaptedClassifier | None = None

    def load_context(self, context: Any) -> None:
        self._clf = AdaptedClassifier.load(Path(context.artifacts[ARTIFACT_KEY]))

    @property
    def classifier(self) -> AdaptedClassifier:
        if self._clf is None:
            raise RuntimeError("the adapted model is not loaded (load it with mlflow.pyfunc.load_model)")
        return self._clf

    def predict(self, context, model_input, params=None):  # noqa: ANN001 - untyped: no MLflow schema check
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
    """The classifier of an adapted model (see `local_model_dir` for the accepted references)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import load_model

    folder = local_model_dir(model_uri)
    try:
        model = load_model(str(folder))
    except (MlflowException, OSError) as err:
        raise UpstreamError(
            f"cannot load the adapted model '{model_uri}' from {folder}: {str(err).splitlines()[0]}"
        ) from None
    py = model.unwrap_python_model()
    if not isinstance(py, FewscanAdaptedModel):
        raise UpstreamError(f"'{model_uri}' is not a fewscan adapted model (it is a {type(py).__name__})")
    return py.classifier
