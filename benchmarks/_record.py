"""Writing a benchmark's JSON record, with the machine it ran on and the commit it measured."""

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable

import torch


def write_record(path: str, record: dict) -> None:
    record = {**record, "commit": commit(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")


def commit() -> str:
    """HEAD of the checkout the benchmarks are in, marked when tracked files other than the
    records under benchmarks/results differ from it (a run rewrites those it has written)."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                  ":(top,exclude)benchmarks/results")
    return head + ("+uncommitted changes" if changed else "")


def spread(values: Iterable[float]) -> dict:
    """One figure over rounds: its median and range."""
    values = list(values)
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
