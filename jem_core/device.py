"""Choosing the compute device: CUDA when present and asked for, the CPU otherwise."""
from __future__ import annotations

import torch

from . import JEMError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → cuda if available else cpu; 'cuda' without a GPU is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise JEMError("Device 'cuda' was asked for but no CUDA GPU is available. Use --device cpu or auto.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise JEMError(f"Unknown device '{name}'. Choose one of: {', '.join(DEVICE_CHOICES)}.")
