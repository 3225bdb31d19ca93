"""Device choice, in one place so that every stage agrees."""

from __future__ import annotations

import torch

from pipeline.errors import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU. `cpu` / `cuda` / `cuda:N` are honoured or refused clearly."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device '{requested}' was requested but CUDA is not available; use device: auto or cpu"
        )
    try:
        return torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"unknown device '{requested}'; valid: auto, cpu, cuda, cuda:N") from None
