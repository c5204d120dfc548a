"""`raydistill verify URI [--repair]`: recompute every shard's checksum and count against the
manifest; with --repair, regenerate the shards that fail from their seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

from raydistill.config import ConfigError, PairsJob, from_dict
from raydistill.pairs.format import Layout, ShardError, shard_name
from raydistill.pairs.manifest import RUN, Manifest, check_regenerable, read_run
from raydistill.pairs.reader import read_shard
from raydistill.storage import Location


@dataclass
class VerifyReport:
    uri: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    bad: dict[str, str] = field(default_factory=dict)     # shard name -> what is wrong with it
    problems: list[str] = field(default_factory=list)     # one line per bad shard or location

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
        report.problems.append(f"{uri}: no {RUN} (not a pairs location)")
        return report
    manifest = Manifest.read(location)
    layout = Layout.of(run["identity"])
    for index in range(run["num_shards"]):
        name = shard_name(index)
        row = manifest.rows.get(name)
        try:
            if row is None:
                raise ShardError(name, "missing (not in the manifest)")
            samples = read_shard(location, row, layout)
        except ShardError as err:
            report.bad[name] = err.problem
            report.problems.append(str(err))
            continue
        report.shards += 1
        report.samples += len(samples)
        report.bytes += row["bytes"]
    return report


def recorded_job(uri: str) -> PairsJob:
    """The job that last wrote the pair set (pairs.json), to regenerate its shards from."""
    run = read_run(Location.parse(uri))
    if run is None:
        raise ConfigError(uri, f"no {RUN} (not a pairs location)")
    check_regenerable(run, uri)
    try:
        return from_dict(PairsJob, run["job"])
    except ConfigError as err:
        raise ConfigError(f"{uri}/{RUN}", f"its recorded job no longer loads ({err})") from None


def forget_shards(uri: str, names: list[str]) -> None:
    """Drop shards from the manifest (rewritten first) and then their files, so that the next
    `plan_pairs` regenerates them and no reader meanwhile takes them for valid."""
    location = Location.parse(uri)
    manifest = Manifest.read(location)
    for name in names:
        manifest.rows.pop(name, None)
    manifest.write(location)
    present = location.sizes()
    for name in names:
        if name in present:
            location.delete(name)
