"""Lineage: every stage's output directory holds `lineage.json`, written last, recording the
stage's config, the fingerprints of its inputs and of its output.

A stage is done when its record exists, its config and inputs equal today's, and its output still
has the recorded fingerprint (recomputed, so a corrupted or replaced artifact is found). Anything
else re-runs the stage, and a new output fingerprint re-runs everything downstream through their
inputs. A stage killed midway has no record, so it never counts as done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from raydistill.config import ConfigError, dotted

LINEAGE = "lineage.json"


def read_record(directory: str) -> dict | None:
    path = os.path.join(directory, LINEAGE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def why_rerun(directory: str, config: dict[str, Any], inputs: dict[str, str],
              fingerprint: Callable[[str], str]) -> str | None:
    """None when the stage in `directory` is done with this config and these inputs, else why
    it must run."""
    record = read_record(directory)
    if record is None:
        return "not run yet" if not os.path.exists(directory) else "did not finish"
    config = json.loads(json.dumps(config))
    if record["config"] != config:
        key, then, now = first_difference(record["config"], config)
        return f"its config changed ({key}: {then!r} -> {now!r})"
    if record["inputs"] != inputs:
        changed = sorted(k for k in inputs.keys() | record["inputs"].keys()
                         if inputs.get(k) != record["inputs"].get(k))
        return f"its inputs changed ({', '.join(changed)})"
    try:
        found = fingerprint(directory)
    except (ConfigError, OSError, ValueError) as err:
        return f"its output is unreadable ({str(err).splitlines()[0]})"
    if found != record["fingerprint"]:
        return "its output changed since it was made (fingerprint differs)"
    return None


def first_difference(then: dict, now: dict) -> tuple[str, Any, Any]:
    """The first dotted key at which two configs that differ differ, with its value in each (None
    where it is missing)."""
    then, now = dotted(then), dotted(now)
    key = next(k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k))
    return key, then.get(key), now.get(key)


def forget_record(directory: str) -> None:
    """Drop a stage's record before it runs again: a run killed midway then claims nothing."""
    path = os.path.join(directory, LINEAGE)
    if os.path.isfile(path):
        os.remove(path)


def write_record(directory: str, stage: str, config: dict[str, Any], inputs: dict[str, str],
                 fingerprint: str, seconds: float, **extra: Any) -> dict:
    record = {"stage": stage, "config": config, "inputs": inputs, "fingerprint": fingerprint,
              "seconds": seconds, "finished_at": datetime.now(timezone.utc).isoformat(), **extra}
    path = os.path.join(directory, LINEAGE)
    with open(path + ".partial", "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    os.replace(path + ".partial", path)
    return record
