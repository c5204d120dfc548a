"""Writing a benchmark's JSON record, with the machine it ran on."""

import json
import os
import platform

import torch


def write_record(path: str, record: dict) -> None:
    record = {**record, "cpus": os.cpu_count(), "machine": platform.machine(),
              "torch": torch.__version__}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
