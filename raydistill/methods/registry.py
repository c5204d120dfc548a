"""Every distillation method by name (see base.MethodSpec for what an entry holds).

Adding a method: one module under raydistill/methods/ (its Method and its MethodSpec, `SPEC`), one
line here, and its name and config section in raydistill/config.py (TrainJob).
"""

from __future__ import annotations

from raydistill.config import ConfigError
from raydistill.methods import dmd, guided, kd, progressive
from raydistill.methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (guided.SPEC, progressive.SPEC,
                                                                kd.SPEC, dmd.SPEC)}


def method_spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError("method", f"unknown method {name!r} (expected one of {sorted(METHODS)})")
    return METHODS[name]
