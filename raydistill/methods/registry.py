"""Every distillation method by name (see base.MethodSpec for what an entry holds).

Adding a method: one module (its Method, its MethodSpec `SPEC` and, if it has settings, their
dataclass, named in the spec with the config section they are read from) and one registry entry: a
line here for the methods raydistill ships, or `register(SPEC)` in a module of your own, imported
before the job is read.
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


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method defined outside raydistill, by its spec's name. The driver hands the spec to
    the training workers, so its module must be importable where they run (or be pickled by
    value: ray.cloudpickle.register_pickle_by_value). Registering another spec under a name that is
    taken is an error; registering the same spec again is not."""
    known = METHODS.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"method {spec.name!r} is already registered (by {known.build.__module__})")
    owner = next((m for m in METHODS.values() if spec.section and m.section == spec.section
                  and m.name != spec.name), None)
    if owner is not None:
        raise ValueError(f"section {spec.section!r} is method {owner.name!r}'s")
    METHODS[spec.name] = spec
    return spec
