"""An adapted model on disk and in memory: the meta-model + what adaptation learned + how to read scans.

Folder layout (the `adapted` artifact inside the pyfunc model; no mlflow needed to read it):

    meta_model/state_dict.pth, meta_model/meta_model.json   # the meta-model adapted from (copied verbatim)
    adapted_state.pth     # the `Adapted` tensors: "params.<name>" (gradient methods, head (n_way, F)) or
                          # "prototypes" (ProtoNet, (n_way, F)); plain torch.save of a dict of tensors
                          # (read back by model_io.load_tensors, weights_only=True: any other object is
                          # refused unread)
    adapted.json          # classes (label index order), condition, method, steps, lr, loss, ScanSpec
                          # (ingest preprocessing, input shape, modalities), provenance run ids, and
                          # "decision": how probabilities become a predicted class (decision.py)

`AdaptedClassifier` turns scans into probabilities, and probabilities into a predicted class by the card's
decision rule: a binary model predicts the condition when p(condition) >= its threshold (chosen by adapt on
the support scans, docs/adapt.md), so `fewscan predict` and `mlflow models serve` apply the same rule; the
probabilities are the network's, untouched. It reads every file with `scan_read.read_scan`, i.e. the
same ingest preprocessing as the support set. Predictions never depend on the batch a scan is in: with
the default per-sample normalisations (GroupNorm/instance/layer) batching is exact; with the
`batch_transductive` policy (BatchNorm on batch statistics) every scan is scored alone, so a scan's
probabilities are the same whether it is predicted by itself or in a folder of 1000.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.adapt.decision import predicted_index
from pipeline.adapt.listing import ScanRef
from pipeline.adapt.reports import write_json_atomic
from pipeline.adapt.scan_read import read_ref, read_scan, read_scan_bytes
from pipeline.adapt.scan_spec import ScanSpec, check_array
from pipeline.atomic import atomic_open
from pipeline.cpus import torch_threads as torch_threads  # re-exported: adapt and predict use it from here
from pipeline.errors import DataError
from pipeline.meta.methods import Adapted, FewShotMethod
from pipeline.meta.model_io import MetaModel, load_meta_model, load_tensors

FORMAT = "fewscan-adapted-model"
# 2: the card's "decision" (a binary model's threshold). A version-1 model (no decision) predicts the argmax;
# a fewscan that reads only version 1 refuses a version-2 model rather than ignore its threshold.
VERSION = 2
CARD_FILE = "adapted.json"
STATE_FILE = "adapted_state.pth"
META_DIR = "meta_model"


def decode_blob(v: bytes | bytearray | str) -> bytes:
    """Raw bytes as they are; text is base64 (how a scoring request carries a file)."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    try:
        return base64.b64decode(str(v), validate=True)
    except (binascii.Error, ValueError):
        raise DataError("not valid base64: send the scan file's bytes base64-encoded") from None


def prob_column(cls: str) -> str:
    """Column name of a class's probability in predictions (CSV and pyfunc output)."""
    return f"prob_{cls}"


def adapted_to_state(adapted: Adapted) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    if adapted.params is not None:
        state.update({f"params.{k}": v.detach().cpu().contiguous() for k, v in adapted.params.items()})
    if adapted.prototypes is not None:
        state["prototypes"] = adapted.prototypes.detach().cpu().contiguous()
    if not state:
        raise ValueError("this Adapted holds neither parameters nor prototypes: nothing to save")
    return state


def adapted_from_state(state: dict[str, torch.Tensor], n_way: int) -> Adapted:
    params = {k[len("params.") :]: v for k, v in state.items() if k.startswith("params.")}
    return Adapted(n_way=n_way, params=params or None, prototypes=state.get("prototypes"))


def save_adapted(
    folder: Path,
    *,
    meta_model_dir: Path,
    adapted: Adapted,
    classes: Sequence[str],
    spec: ScanSpec,
    card: dict[str, Any],
) -> Path:
    """Write an adapted model folder (see module docstring). `card` adds provenance (no PHI)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / META_DIR
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for name in ("state_dict.pth", "meta_model.json"):
        shutil.copy2(Path(meta_model_dir) / name, dst / name)
    with atomic_open(folder / STATE_FILE, "wb") as f:
        torch.save(adapted_to_state(adapted), f)
    if len(classes) != adapted.n_way:
        raise ValueError(f"{len(classes)} class names for an adapted {adapted.n_way}-way model")
    write_json_atomic(
        folder / CARD_FILE,
        {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(classes),
            "n_way": adapted.n_way,
            "spec": spec.to_json(),
            **card,
        },
    )
    return folder


@dataclass
class AdaptedClassifier:
    """Scans -> class probabilities with an adapted model (pure torch; no mlflow)."""

    meta_model: MetaModel
    method: FewShotMethod
    adapted: Adapted
    classes: list[str]
    spec: ScanSpec
    card: dict[str, Any]

    @property
    def threshold(self) -> float | None:
        """The binary decision threshold on p(condition) (card "decision"); None: the argmax."""
        decision = self.card.get("decision") or {}
        t = decision.get("threshold") if decision.get("rule") == "threshold" else None
        return float(t) if t is not None and len(self.classes) == 2 else None

    def predicted(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class index of each row of `proba`'s output, by the model's decision rule."""
        return predicted_index(probs, self.threshold)

    @property
    def per_scan(self) -> bool:
        """True when the network normalises over the batch (BatchNorm on batch stats): score one by one."""
        return self.meta_model.meta.normalization == "batch_transductive"

    @classmethod
    def load(cls, folder: str | Path) -> AdaptedClassifier:
        folder = Path(folder)
        card_path = folder / CARD_FILE
        if not card_path.is_file() or not (folder / STATE_FILE).is_file():
            raise DataError(
                f"{folder} is not an adapted fewscan model (it needs {CARD_FILE} and {STATE_FILE}); give the "
                "model of an adapt run, e.g. models:/fewscan-<suite>-<condition>-<hash>@current (the adapt "
                "summary names it)"
            )
        card = json.loads(card_path.read_text())
        if card.get("format") != FORMAT:
            raise DataError(f"{card_path} is not an adapted fewscan model (format={card.get('format')!r})")
        if int(card.get("version", 0)) > VERSION:
            raise DataError(f"{card_path} has version {card['version']}; this fewscan reads up to {VERSION}")
        mm = load_meta_model(folder / META_DIR)  # tensors with weights_only=True, as below
        method = mm.method()  # prediction only: steps/lr play no part
        adapted = adapted_from_state(load_tensors(folder / STATE_FILE), int(card["n_way"]))
        return cls(mm, method, adapted, list(card["classes"]), ScanSpec.from_json(card["spec"]), card)

    # ------------------------------------------------------------------------------ probabilities
    def proba(self, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """x (n, C, *spatial) float32 preprocessed -> (n, n_way) float64 probabilities."""
        if x.shape[0] == 0:
            return np.zeros((0, len(self.classes)))
        step = 1 if self.per_scan else max(1, batch_size)
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], step):
                outs.append(self.method.predict_proba(self.adapted, x[i : i + step]).double().cpu().numpy())
        return np.concatenate(outs)

    def _rows(self, arrays: list[np.ndarray | str], batch_size: int) -> list[dict[str, Any]]:
        """One row per item: an array gets probabilities, a string is that item's error."""
        ok = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
        probs = (
            self.proba(torch.from_numpy(np.stack([arrays[i] for i in ok])), batch_size)  # type: ignore[misc]
            if ok
            else np.zeros((0, len(self.classes)))
        )
        rows: list[dict[str, Any]] = []
        by_pos = {i: k for k, i in enumerate(ok)}
        pred = self.predicted(probs)
        for i, a in enumerate(arrays):
            if isinstance(a, str):
                row: dict[str, Any] = {"predicted_class": None, "error": a}
                row.update({prob_column(c): math.nan for c in self.classes})
            else:
                p = probs[by_pos[i]]
                row = {"predicted_class": self.classes[int(pred[by_pos[i]])], "error": ""}
                row.update({prob_column(c): float(v) for c, v in zip(self.classes, p)})
            rows.append(row)
        return rows

    def _read(self, fn: Any, item: Any) -> np.ndarray | str:
        try:
            return fn(item)
        except DataError as err:  # ScanMismatch included: reported in the row, never a crash
            return str(err)

    def predict_paths(self, paths: Sequence[Path], batch_size: int = 64) -> list[dict[str, Any]]:
        """Read and score scan files, `batch_size` at a time (memory stays bounded for large folders)."""
        from pipeline.progress import progress

        rows: list[dict[str, Any]] = []
        chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
        for chunk in progress(chunks, total=len(chunks), desc="predicting"):
            arrays = [self._read(lambda p: read_scan(Path(p), self.spec), p) for p in chunk]
            rows.extend(self._rows(arrays, batch_size))
        return rows

    def predict_refs(self, refs: Sequence[ScanRef], batch_size: int = 64) -> list[dict[str, Any]]:
        """Like predict_paths for listed scans (`scan_read.scan_units`): a 3D DICOM series is one scan."""
        from pipeline.progress import progress

        rows: list[dict[str, Any]] = []
        chunks = [refs[i : i + batch_size] for i in range(0, len(refs), batch_size)]
        for chunk in progress(chunks, total=len(chunks), desc="predicting"):
            arrays = [self._read(lambda r: read_ref(r, self.spec), r) for r in chunk]
            rows.extend(self._rows(arrays, batch_size))
        return rows

    def predict_bytes(self, blobs: Sequence[bytes | str], batch_size: int = 64) -> list[dict[str, Any]]:
        """Score scans held in memory: raw file bytes, or the file's bytes as base64 text (JSON requests)."""
        return self._rows(
            [self._read(lambda b: read_scan_bytes(decode_blob(b), self.spec), b) for b in blobs], batch_size
        )

    def check_array(self, a: Any) -> np.ndarray:
        """A caller-preprocessed array (as ingest stores it, shape `spec.shape`) -> float32, or DataError."""
        return check_array(a, self.spec, caller_array=True)

    def predict_arrays(self, arrays: Sequence[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        return self._rows([self._read(self.check_array, a) for a in arrays], batch_size)
