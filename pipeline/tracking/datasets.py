"""Tables recorded as MLflow dataset inputs of a run (the scan index, the episode pools): a schema, a
content digest and a profile, with the run's artifact as the source. Only PHI-free tables come here
(docs/ARCHITECTURE.md, principle 10)."""

from __future__ import annotations

import json
from typing import Any

from mlflow.exceptions import MlflowException

from pipeline.tracking.store import client, retry


def _schema_sample(df: Any) -> Any:
    """`df`'s first row when every column has one type and no missing value (then MLflow infers the same
    schema from that row as from the whole table); else `df` itself."""
    import pandas as pd

    if len(df) <= 1:
        return df
    for col in df.columns:
        values = df[col]
        if values.isna().any():  # MLflow marks a column with missing values as not required
            return df
        if values.dtype.kind == "O" and pd.api.types.infer_dtype(values, skipna=False) != "string":
            return df  # objects of other or mixed types: MLflow looks at each one
    return df.iloc[:1]


def _dataset_source(uri: str) -> Any:
    """The dataset source for an artifact URI, resolved by one source class.

    MLflow registers its local-artifact source twice (for the schemes "" and "file"), so resolving a plain
    path through its registry matches two identical classes and warns "can be interpreted in multiple
    ways" on every stage. The first class that can resolve the URI is the answer either way."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source

    # the last registered source takes precedence in MLflow's own resolution: keep that order
    for source in reversed(get_registered_sources()):
        if source._can_resolve(uri):
            return resolve_dataset_source(uri, candidate_sources=[source])
    raise MlflowException(f"no dataset source resolves {uri}")


def log_dataset(
    run_id: str, artifact_uri: str, df: Any, name: str, digest: str, context: str, source: str | None = None
) -> None:
    """Record a (PHI-free) table as an MLflow dataset input of run `run_id`, with a content digest."""
    # imported when a table is logged (as before the tracking layer was split): most commands log none
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import Dataset, DatasetInput, InputTag

    # The source names where the table lives: this run's artifact (e.g. store/scan_index.parquet).
    uri = f"{artifact_uri.rstrip('/')}/{source}" if source else ""
    # MLflow infers the table's schema by visiting every cell in Python (18 s of CPU for the three
    # pool tables of a 112k-scan index): it is inferred from one row when that row has the schema of
    # the whole table, and the profile (row and cell counts) is the whole table's.
    sample = _schema_sample(df)
    try:
        if not uri:
            raise MlflowException("no artifact source given")
        ds = from_pandas(sample, source=_dataset_source(uri), name=name, digest=digest)
    except MlflowException:
        src = CodeDatasetSource({"fewscan.run_id": run_id, "fewscan.artifact": source or ""})
        ds = from_pandas(sample, source=src, name=name, digest=digest)
    d = ds.to_dict()
    dataset = Dataset(
        name=d["name"],
        digest=d["digest"],
        source_type=d["source_type"],
        source=d["source"],
        schema=d.get("schema"),
        profile=json.dumps({"num_rows": len(df), "num_elements": int(df.size)}),
    )
    entity = DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])
    retry(lambda: client().log_inputs(run_id, datasets=[entity]), "log dataset input")
