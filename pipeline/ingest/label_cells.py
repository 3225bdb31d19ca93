"""How one row of a label table names its conditions (docs/ingest.md, "Label layouts").

* `separated` (default): one column, findings joined by `labels.separator` (`Effusion|Mass`, NIH).
* `list`: one column holding a JSON or Python list of names (`['pleural effusion', 'cardiomegaly']`,
  PadChest). Parsed with `json.loads`, else `ast.literal_eval` (literals only; never `eval`).
* `one_hot`: one column per condition (`labels.label_columns`) holding 1 / 0 / -1 (uncertain) / blank
  (CheXpert, MIMIC-CXR); `labels.uncertain` and `labels.blank` say what -1 and blank mean.

A value that does not parse is reported with its data row; `LabelErrors` gathers them so that one run
of the ingest lists every bad row at once, before any file is decoded.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DataError
from pipeline.ingest.manifest import LabelsConfig

# The scan index joins a scan's labels with this character (docs/CONTRACTS.md, scan_index `labels`), so
# it can never be part of a condition name.
INDEX_SEPARATOR = "|"
MAX_LIST_CHARS = 20_000  # a longer cell is no label list; literal_eval on huge input only costs time


class LabelParseError(ValueError):
    """One cell of a label row cannot be read; the message names no key or patient value."""


def tidy(labels: Iterable[str], normal: str) -> list[str]:
    """Sorted, unique, stripped; the normal label only when alone ("No Finding|Mass": the finding wins)."""
    labs = sorted({t.strip() for t in labels if t and t.strip()})
    if len(labs) > 1 and normal in labs:
        labs.remove(normal)
    return labs


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def check_name(name: str, cfg: LabelsConfig | None = None) -> None:
    """A condition name must not hold the scan index's separator (issue 18: `Mass|Nodule` read with
    `separator: ";"` became one name that every later stage split into two conditions)."""
    if INDEX_SEPARATOR in name:
        hint = (
            f"; with labels.separator '{cfg.separator}' it was read as one name: if the cell lists several "
            f"findings set labels.separator: '{INDEX_SEPARATOR}'"
            if cfg is not None and cfg.format == "separated" and cfg.separator != INDEX_SEPARATOR
            else ""
        )
        raise LabelParseError(
            f"condition name {_short(name)!r} contains '{INDEX_SEPARATOR}', which the scan index uses between "
            f"labels{hint}"
        )


def parse_list(text: str) -> list[str]:
    """ "['a', 'b']" or '["a", "b"]' -> ['a', 'b']; blank -> []. Anything else raises LabelParseError."""
    t = str(text).strip()
    if not t:
        return []
    if len(t) > MAX_LIST_CHARS:
        raise LabelParseError(f"a cell of {len(t)} characters is not a label list")
    try:
        value: Any = json.loads(t)
    except ValueError:
        try:
            value = ast.literal_eval(t)  # Python literals only: no names, calls or attribute access
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise LabelParseError(
                f"{_short(t)!r} is not a JSON or Python list of condition names (labels.format: list)"
            ) from None
    if not isinstance(value, list | tuple):
        raise LabelParseError(
            f"{_short(t)!r} is a {type(value).__name__}, not a list of condition names (labels.format: list)"
        )
    out = []
    for v in value:
        if not isinstance(v, str):
            raise LabelParseError(f"{_short(t)!r} holds {v!r}, not a condition name (a string)")
        out.append(v)
    return out


_ONE_HOT = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


def parse_one_hot(rec: dict[str, Any], cfg: LabelsConfig) -> tuple[list[str], str]:
    """(labels, why excluded or "") from one 0/1/-1/blank column per condition, by the manifest policy."""
    found: list[str] = []
    excluded = ""
    for col in cfg.label_columns or []:
        cell = str(rec[col]).strip()
        if cell == "":
            state = "blank"
        else:
            try:
                state = _ONE_HOT.get(float(cell), "")
            except ValueError:
                state = ""
            if not state:
                raise LabelParseError(f"column {col!r} holds {_short(cell)!r}; expected 1, 0, -1 or blank")
        if state == "positive":
            found.append(col)
            continue
        rule = {"uncertain": cfg.uncertain, "blank": cfg.blank}.get(state, "negative")
        if rule == "positive":
            found.append(col)
        elif rule == "exclude" and not excluded:
            excluded = f"{'uncertain (-1)' if state == 'uncertain' else 'blank'} for {col!r} (labels.{state}: exclude)"
    return (tidy(found, cfg.normal_label) or [cfg.normal_label]), excluded


def row_labels(rec: dict[str, Any], cfg: LabelsConfig) -> tuple[list[str], str]:
    """The conditions of one table row and, when the manifest's policy excludes the row, why."""
    excluded = ""
    col = cfg.label_column or ""  # set for these formats (LabelsConfig checks it)
    if cfg.format == "one_hot":
        labs, excluded = parse_one_hot(rec, cfg)
    elif cfg.format == "list":
        labs = tidy(parse_list(rec[col]), cfg.normal_label)
    else:
        labs = tidy(str(rec[col]).split(cfg.separator), cfg.normal_label)
    for name in labs:
        check_name(name, cfg)
    return labs, excluded


@dataclass
class LabelErrors:
    """Problems of a label table by data row (1 = the first row under the header), raised together."""

    file: str
    problems: list[tuple[int, str]] = field(default_factory=list)

    def add(self, row: int, message: str) -> None:
        self.problems.append((row, message))

    def raise_if_any(self) -> None:
        if not self.problems:
            return
        shown = "; ".join(f"data row {r} (line {r + 1}): {m}" for r, m in self.problems[:5])
        more = f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        raise DataError(
            f"label file {self.file}: {len(self.problems)} row(s) cannot be used: {shown}{more}. Fix or remove "
            "them and re-run (nothing was decoded yet)"
        )
