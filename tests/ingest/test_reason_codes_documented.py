"""Every reason code of pipeline/ingest/reasons.py is explained in docs/ingest.md ("Reason codes"), and the
table names no code the module does not define (issue 14: the docs list every reason code)."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.ingest import reasons as R

DOC = Path(__file__).parents[2] / "docs" / "ingest.md"


def _documented() -> list[str]:
    text = DOC.read_text()
    section = text.split("### Reason codes", 1)[1].split("\n#", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def test_every_reason_code_is_in_the_docs_table_and_no_other() -> None:
    codes = _documented()
    assert len(codes) == len(set(codes)), "a code is listed twice"
    assert set(codes) == set(R.ALL)


def test_all_holds_every_code_the_module_defines() -> None:
    defined = {
        v
        for k, v in vars(R).items()
        if k.isupper() and isinstance(v, str) and k not in ("NOTE",) and not k.startswith("_")
    }
    assert defined == set(R.ALL) and len(R.ALL) == len(set(R.ALL))
