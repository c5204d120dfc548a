"""The manifest (`manifest.parquet`): one row per committed shard, rewritten atomically after each
commit, plus `pairs.json`: the run's identity (teacher fingerprint, mode, solver, ...) that every
later run on the same location must match.

pairs.json formats (an identity must survive the schema growing, so sections are compared after
filling the defaults of fields added since, and older formats are migrated explicitly on read):

    1 (no `format` key)   no `stochastic` (its progressive targets were all deterministic) and no
                          `teacher_steps`; read and verified, never extended or regenerated
                          (its guided t draws and discrete-schedule targets differ from today's)
    raydistill-pairs/2    `stochastic` (progressive mode) and `teacher_steps`: the step count of a
                          teacher that is itself a progressive student, else null; since ode
                          pairs can come from the stochastic sampler, ode identities record
                          `stochastic` too (absent: false, as every earlier ode set was made)
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.config import (
    ConfigError,
    DataConfig,
    GuidanceRange,
    PairsJob,
    SolverConfig,
)
from raydistill.models.checkpoint import Checkpoint
from raydistill.pairs.modes import MODES
from raydistill.storage import Location

MANIFEST, RUN = "manifest.parquet", "pairs.json"
FORMAT = "raydistill-pairs/2"
SECTIONS = {"guidance": GuidanceRange, "solver": SolverConfig, "data": DataConfig}

SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("index", pa.int64()),
    ("count", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("seed", pa.int64()),
    ("mode", pa.string()),
    ("teacher_fingerprint", pa.string()),
    ("solver", pa.string()),
    ("steps", pa.int64()),
    ("w_min", pa.float64()),
    ("w_max", pa.float64()),
    ("created_at", pa.timestamp("ms", tz="UTC")),
    ("node", pa.string()),
    ("worker", pa.string()),
])
COLUMNS = SCHEMA.names


@dataclass(frozen=True)
class PairSet:
    """What a training job checks of its pair set: the identity its pairs.json records, the mode
    and conditioning of its shards, how many shards and rows it holds."""

    identity: dict
    mode: str
    text: bool
    shards: int
    rows: int


def run_identity(job: PairsJob, teacher: Checkpoint) -> dict:
    """What makes two runs' shards interchangeable: all of it must match to add to a location.
    `teacher_steps` follows from the teacher's fingerprint; it is recorded for the reader. A text
    model's pairs record its prompt table (what c indexes), and their samples carry its rows."""
    distilled = teacher.sampling.distilled_sampler
    identity = {"mode": job.mode, "teacher_fingerprint": teacher.fingerprint,
                "teacher_steps": distilled.steps if distilled else None,
                "samples_per_shard": job.samples_per_shard, "seed": job.seed,
                "guidance": asdict(job.guidance)}
    identity.update(MODES[job.mode].identity(job))
    if teacher.conditioning.text:
        table = teacher.conditioning.conditions.prompts
        identity["prompts"] = {"sha256": table.digest(), "count": table.count}
    return identity


def _migrate(run: dict) -> dict:
    """pairs.json in the current format (see the module docstring), sections with defaults filled."""
    identity = dict(run["identity"])
    if "format" not in run:
        identity.setdefault("teacher_steps", None)
    for key, value in MODES[identity["mode"]].identity(PairsJob()).items():
        identity.setdefault(key, value)       # a key the mode's identity gained since: default
    for key, section in SECTIONS.items():
        if key in identity:
            identity[key] = asdict(section(**identity[key]))      # flat; no validation on read
    return {**run, "format": FORMAT, "written_format": run.get("format", 1), "identity": identity}


class Manifest:
    def __init__(self, rows: dict[str, dict] | None = None):
        self.rows = rows or {}

    @classmethod
    def read(cls, location: Location) -> Manifest:
        if not location.exists(MANIFEST):
            return cls()
        try:
            table = pq.read_table(io.BytesIO(location.read(MANIFEST)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(location.uri, f"{MANIFEST} is unreadable ({exc})") from None
        return cls({row["shard"]: row for row in table.to_pylist()})

    def add(self, row: dict) -> None:
        self.rows[row["shard"]] = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}

    def write(self, location: Location) -> None:
        rows = [self.rows[name] for name in sorted(self.rows)]
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        location.write_atomic(MANIFEST, buffer.getvalue())

    def __contains__(self, shard: str) -> bool:
        return shard in self.rows

    def __len__(self) -> int:
        return len(self.rows)


def read_run(location: Location) -> dict | None:
    """pairs.json (migrated to the current format), None if the location has none."""
    if not location.exists(RUN):
        return None
    return _migrate(json.loads(location.read(RUN)))


def check_regenerable(run: dict, uri: str) -> None:
    """Refuse to add shards to a format-1 set (see the module docstring): they would mix two
    definitions of its samples in one set."""
    if run["written_format"] == 1:
        raise ConfigError(uri, "holds a pair set of format 1, whose per-sample draws and "
                               "discrete-schedule targets today's code no longer makes: it can be "
                               "read and verified as it is, but not extended or regenerated; "
                               "generate a new set")


def identity_difference(theirs: dict, mine: dict) -> tuple[str, Any, Any] | None:
    """The first key on which two run identities differ (mode and teacher first), with its
    values in each; None if they are the same run."""
    others = sorted((set(mine) | set(theirs)) - {"mode", "teacher_fingerprint"})
    for key in ["mode", "teacher_fingerprint", *others]:
        if mine.get(key) != theirs.get(key):
            return key, theirs.get(key), mine.get(key)
    return None


def claim_location(location: Location, job: PairsJob, teacher: Checkpoint) -> dict:
    """Check that `location` is empty or holds shards of this same run; record the run there
    (its identity, shard count, and the job, from which `raydistill verify --repair` regenerates).

    Raises ConfigError naming the first difference, before any worker starts.
    """
    identity = run_identity(job, teacher)
    previous = read_run(location)
    if previous is not None:
        check_regenerable(previous, location.uri)
    if previous is None:
        if location.list():
            stray = [n for n in location.list() if n.endswith(".tar")]
            if stray:
                raise ConfigError(location.uri, f"holds shards ({stray[0]}, ...) but no {RUN}; "
                                                "refusing to mix runs")
    else:
        difference = identity_difference(previous["identity"], identity)
        if difference is not None:
            key, theirs, mine = difference
            raise ConfigError(location.uri, f"holds shards with {key}={theirs!r}, "
                                            f"this job has {key}={mine!r}")
    num_shards = max(job.num_shards, previous["num_shards"] if previous else 0)
    run = {"format": FORMAT, "identity": identity, "num_shards": num_shards,
           "job": asdict(job)}
    location.write_atomic(RUN, json.dumps(run, indent=2, sort_keys=True).encode())
    return run
