"""`raydistill verify URI`: recompute every shard's checksum and count against the manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

from raydistill.pairs.format import ShardError, shard_name
from raydistill.pairs.manifest import Manifest, read_run
from raydistill.pairs.reader import read_shard
from raydistill.storage import Location


@dataclass
class VerifyReport:
    uri: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return (f"{self.uri}: {self.shards} shards, {self.samples} samples, "
                f"{self.bytes / 2**20:.1f} MiB verified")


def verify_pairs(uri: str) -> VerifyReport:
    """Check every shard the run should hold; collect one problem line per bad or missing shard."""
    report = VerifyReport(uri)
    location = Location.parse(uri)
    run = read_run(location)
    if run is None:
        report.problems.append(f"{uri}: no pairs.json (not a pairs location)")
        return report
    manifest = Manifest.read(location)
    mode = run["identity"]["mode"]
    for index in range(run["num_shards"]):
        name = shard_name(index)
        row = manifest.rows.get(name)
        if row is None:
            report.problems.append(f"shard {name}: missing (not in the manifest)")
            continue
        try:
            samples = read_shard(location, row, mode)
        except ShardError as err:
            report.problems.append(str(err))
            continue
        report.shards += 1
        report.samples += len(samples)
        report.bytes += row["bytes"]
    return report
