"""A planted checkpoint: what a malicious user could upload as `checkpoints/<method>/last.pt` of a run.

Unpickling it runs `exec`, which writes a marker file; fewscan must refuse the file without ever running
that code (pipeline/meta/trainer.py, `load_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('payload ran')",))


def plant_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like fewscan's (version, method, step) with the payload inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 1, "method": "maml", "step": 1, "learner": Payload(marker)}, path)
    return path
