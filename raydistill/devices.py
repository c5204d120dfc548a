"""Device selection: `auto` takes the accelerator when there is one and never silently falls back
to the CPU when one was asked for."""

from __future__ import annotations

import torch

from raydistill.config import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda[:N]' must exist; 'cpu' is always there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name} requested but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(key, f"{name} requested but only {torch.cuda.device_count()} "
                                   "CUDA devices are visible")
    return device
