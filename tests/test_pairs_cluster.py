"""Elasticity on a multi-node Ray cluster on one machine (ray.cluster_utils.Cluster): a node added
mid-run receives work; a node removed mid-run loses none."""

import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from raydistill.cli import main
from raydistill.config import PairsJob, from_dict
from raydistill.pairs.format import shard_name
from raydistill.pairs.manifest import Manifest
from raydistill.pairs.pool import generate_pairs
from raydistill.storage import Location

SHARDS = 48


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def job(slow_teacher):
    """A pool whose floor (2 actors) is above the 1-CPU head's capacity: the second actor waits
    for a node, so a joining node gets work as soon as Ray schedules the actor there. (Growing a
    min-1 pool instead goes through Ray Data's autoscaler, which re-requests resources every few
    seconds: that path works, 8 of 40 shards in a trial, but its timing makes a flaky test.)"""
    return from_dict(PairsJob, {
        "teacher": {"checkpoint": slow_teacher}, "num_shards": SHARDS, "samples_per_shard": 32,
        "batch_size": 32, "solver": {"steps": 24}, "workers": {"min": 2, "max": 4}})


def run_in_background(job, out):
    errors = []

    def target():
        try:
            generate_pairs(job, out, progress=False)
        except BaseException as exc:           # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def wait_for_shards(out, n, timeout=120):
    deadline = time.time() + timeout
    while len(Manifest.read(Location.parse(out))) < n:
        assert time.time() < deadline, f"fewer than {n} shards after {timeout} s"
        time.sleep(0.05)


def test_added_node_receives_work(cluster, job, tmp_path):
    out = str(tmp_path / "pairs")
    thread, errors = run_in_background(job, out)
    wait_for_shards(out, 1)
    new_node = cluster.add_node(num_cpus=1)
    thread.join(timeout=300)
    assert not errors and not thread.is_alive()
    rows = Manifest.read(Location.parse(out)).rows
    assert sorted(rows) == [shard_name(k) for k in range(SHARDS)]
    on_new = [name for name, row in rows.items() if row["node"] == new_node.node_id]
    print(f"{len(on_new)} of {SHARDS} shards made on the node added mid-run")
    assert on_new
    assert main(["verify", out]) == 0


def test_removed_node_loses_nothing(cluster, job, tmp_path):
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out = str(tmp_path / "pairs")
    thread, errors = run_in_background(job, out)
    wait_for_shards(out, 3)
    rows = Manifest.read(Location.parse(out)).rows
    cluster.remove_node(doomed, allow_graceful=False)
    thread.join(timeout=300)
    assert not errors and not thread.is_alive()
    rows = Manifest.read(Location.parse(out)).rows
    assert sorted(rows) == [shard_name(k) for k in range(SHARDS)]
    assert main(["verify", out]) == 0
