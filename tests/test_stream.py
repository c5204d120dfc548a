"""Training streams: what a rank reads is a function of (seed, rank, world, position), and a stream
restored at a recorded position continues with exactly the batches the uninterrupted one read."""

import dataclasses
import os
import sys
import time

import numpy as np
import pytest
import ray
import torch

from raydistill.config import DataConfig
from raydistill.data.ray_source import image_source
from raydistill.data.units import Source, Unit
from raydistill.models import GaussianMixture
from raydistill.pairs.reader import PairShards
from raydistill.train.stream import (
    READ_AHEAD,
    DataTooSmall,
    mixture_stream,
    rebatch,
    source_stream,
)

PAIRS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pairs-v1")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Counted, in Ray tasks
    yield
    ray.shutdown()


def test_rebatch_skips_rows_and_drops_the_partial_batch():
    blocks = [{"a": np.arange(0, 5)}, {"a": np.arange(5, 7)}, {"a": np.arange(7, 13)}]
    got = [b["a"].tolist() for b in rebatch(iter(blocks), 4, skip=3)]
    assert got == [[3, 4, 5, 6], [7, 8, 9, 10]]


def take(stream, n):
    out = []
    for _ in range(n):
        batch = next(stream)
        out.append(({k: v.clone() for k, v in batch.items()},
                    dataclasses.replace(stream.position)))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def check_resumes(make, batches: int, epochs: bool = True):
    """Restored after every batch of `batches` (across epochs, where the stream has them), a
    fresh stream reads on exactly as the uninterrupted one did."""
    run = take(make(), batches)
    if epochs:
        assert len({pos.epoch for _, pos in run}) > 1, "the check must cross an epoch boundary"
    for k in range(batches - 1):
        stream = make()
        stream.restore(dataclasses.replace(run[k][1]))
        for (want, _), (got, _) in zip(run[k + 1:k + 3], take(stream, 2)):
            assert_same(got, want)


def test_mixture_stream_resumes_exactly():
    mixture = GaussianMixture.random(num_classes=3, components_per_class=1, dim=2, seed=0)
    check_resumes(lambda: mixture_stream(mixture, micro=4, seed=1, rank=0), 6, epochs=False)
    one, other = (take(mixture_stream(mixture, micro=4, seed=1, rank=r), 1)[0][0] for r in (0, 1))
    assert not torch.equal(one["x"], other["x"])


def test_pair_stream_resumes_exactly_and_epochs_reorder(local_ray):
    """tests/data/pairs-v1: 2 shards of 4 samples, micro-batches of 3 (2 per epoch, 2 rows left
    over each epoch)."""
    columns = {"z_t": "z_t", "target": "target", "t": "t", "seed": "seed"}

    def make():
        return source_stream(PairShards(PAIRS), micro=3, seed=0, rank=0, columns=columns,
                             name=PAIRS)

    check_resumes(make, 7)
    run = take(make(), 6)
    epochs = [torch.cat([b["seed"] for b, pos in run if pos.epoch == e]) for e in (0, 1, 2)]
    assert len({tuple(e.tolist()) for e in epochs}) > 1       # each epoch in its own order
    with pytest.raises(DataTooSmall, match="8 samples for this worker, fewer than one micro"):
        next(source_stream(PairShards(PAIRS), micro=9, seed=0, rank=0, columns=columns,
                           name=PAIRS))


def test_image_streams_split_ranks_and_resume_exactly(local_ray):
    """Digits at 8x8 over two ranks: every sample on exactly one rank, each rank's stream
    resumable."""
    config = DataConfig(resolution=8)
    sources = [image_source(config, rank=r, world=2) for r in (0, 1)]
    keys = [{row["key"] for unit in source.units(None) for row in source.read(unit.item)}
            for source in sources]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == 1797

    def make():
        return source_stream(sources[1], micro=300, seed=0, rank=1,
                             columns={"image": "x", "label": "c"}, name="digits")

    check_resumes(make, 5)


class Counted(Source):
    """`count` units of 4 rows (values 4i..4i+3), each read appending its index to a file."""

    def __init__(self, log: str, count: int):
        self.log, self.count = log, count

    def units(self, rng):
        order = range(self.count) if rng is None else rng.permutation(self.count)
        return [Unit({"i": int(i), "log": self.log}, 4) for i in order]

    def read(self, item):
        with open(item["log"], "a") as f:
            f.write(f"{item['i']}\n")
        return [{"v": np.float32(4 * item["i"] + r)} for r in range(4)]


def test_source_stream_reads_a_bounded_number_of_units_ahead(local_ray, tmp_path):
    """One unit per micro-batch, 3 units per epoch: the stream has read its next batch, and
    READ_AHEAD units beyond it are read (across epoch ends), no more."""
    log = tmp_path / "reads"
    stream = source_stream(Counted(str(log), 3), micro=4, seed=0, rank=0, columns={"v": "v"},
                           name="counted")
    values = [next(stream)["v"] for _ in range(7)]
    assert stream.position.epoch == 2 and sorted(int(v[0]) for v in values[:3]) == [0, 4, 8]
    expected, deadline = 7 + 1 + READ_AHEAD, time.monotonic() + 30
    while (log.exists() and len(log.read_text().split()) < expected
           and time.monotonic() < deadline):
        time.sleep(0.05)
    time.sleep(0.5)
    assert len(log.read_text().split()) == expected
