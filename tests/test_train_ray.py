"""`raydistill train` end to end on local Ray: a worker killed mid-run resumes from the last
checkpoint and finishes; a stopped run continues with --resume; the student it leaves loads."""

import glob
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest
import ray
import torch
from safetensors.torch import load_file

from raydistill.cli import main
from raydistill.config import TrainJob, load
from raydistill.models import load_checkpoint
from raydistill.train.checkpointer import directory_bytes
from raydistill.train.driver import TrainingFailed, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC = f"{ROOT}/configs/tests/analytic_guided.yaml"
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"
SNAPSHOT = "checkpoint_manager_snapshot.json"
LONG = ["optim.steps=200", "checkpoint_every=25", "log_every=25"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the module, as `train` starts it (CPUs beside the workers for Ray Data)."""
    from raydistill.cluster import init_ray

    init_ray(num_cpus=3, dashboard=True)
    yield
    ray.shutdown()


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline() or [proc.name()])
    except psutil.Error:            # exited meanwhile
        return ""


def finished(out: str) -> bool:
    """Whether the run in `out` has written its student (it ended without the failure a test
    meant to cause)."""
    return os.path.isdir(os.path.join(out, "student"))


def kill_a_worker_after_a_checkpoint(out: str, killed: list) -> threading.Thread:
    def killer():
        # no short deadline: on a loaded machine the first checkpoint can take minutes to come
        # (a 240 s one once expired before it); a run that ends unkilled ends the wait
        deadline = time.time() + 1200
        while time.time() < deadline and not killed and not finished(out):
            # Ray Train writes its snapshot once the controller has registered a checkpoint; a
            # kill before that loses the checkpoint and the run restarts from step 0
            if glob.glob(os.path.join(out, "ray", "**", SNAPSHOT), recursive=True):
                # this session's Ray only: its processes descend from this one
                for proc in psutil.Process().children(recursive=True):
                    if "RayTrainWorker" in _command(proc):
                        proc.kill()
                        killed.append(proc.pid)
                        break
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


def logged_steps(out: str) -> list[int]:
    """Steps in the run's log: each logged step exactly once, however often the run restarted."""
    with open(os.path.join(out, "train_log.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps))
    return steps


def test_worker_killed_mid_run_resumes_and_finishes(tmp_path):
    out, killed = str(tmp_path / "run"), []
    job = load(TrainJob, ANALYTIC, LONG + ["max_failures=1"])
    thread = kill_a_worker_after_a_checkpoint(out, killed)
    result = train(job, out)
    thread.join()
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert result.steps == 200
    assert logged_steps(out)[-1] == 200 and result.metrics["resumes"] == 1
    assert load_checkpoint(result.student).extra["train_steps"] == 200
    # Checkpoints are written where Ray Train keeps them, named by step (not uploaded from a
    # temporary copy, which Ray names by date), and the two latest are kept.
    kept = [os.path.basename(d) for d in glob.glob(os.path.join(out, "ray", "*", "checkpoint*"))
            if os.path.isdir(d)]
    assert sorted(kept) == ["checkpoint-00000175", "checkpoint-00000200"]
    # each logged step gives the last checkpoint's cost: step 200's, that of step 175
    with open(os.path.join(out, "train_log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["step"] == 200 and last["checkpoint_s"] > 0
    assert last["checkpoint_bytes"] == directory_bytes(
        glob.glob(os.path.join(out, "ray", "*", "checkpoint-00000175"))[0])


@pytest.mark.slow    # 70 s: the suite keeps the one-engine kill and resume; test-all runs this
def test_dmd_worker_killed_mid_run_resumes_with_both_engines(tmp_path):
    """A DMD run (ZeRO-2, 2 workers, two engines) loses a worker after a checkpoint, resumes, and
    ends with the generator an uninterrupted run ends with."""
    job = load(TrainJob, ANALYTIC_DMD, LONG + ["max_failures=1"])
    out, killed = str(tmp_path / "run"), []
    thread = kill_a_worker_after_a_checkpoint(out, killed)
    result = train(job, out)
    thread.join()
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert result.metrics["resumes"] == 1 and logged_steps(out)[-1] == 200
    assert {"generator/loss_dm", "fake_score/loss"} <= set(result.metrics)
    uninterrupted = train(job, str(tmp_path / "uninterrupted"))
    assert uninterrupted.metrics["resumes"] == 0
    after_kill = load_file(os.path.join(result.student, "model.safetensors"))
    reference = load_file(os.path.join(uninterrupted.student, "model.safetensors"))
    assert all(torch.equal(after_kill[name], value) for name, value in reference.items())


def test_stopped_run_continues_with_resume(tmp_path, capsys):
    out, killed = str(tmp_path / "run"), []
    job = load(TrainJob, ANALYTIC, LONG + ["max_failures=0"])
    thread = kill_a_worker_after_a_checkpoint(out, killed)
    with pytest.raises(TrainingFailed, match="--resume"):
        train(job, out)
    thread.join()
    assert killed and not os.path.exists(os.path.join(out, "student"))
    args = ["train", "--config", ANALYTIC, "--out", out, *LONG, "--quiet"]
    assert main(args) == 2 and "is not empty; pass --resume" in capsys.readouterr().err
    assert main([*args[:-1], "method=progressive", "halving.start_steps=4", "halving.end_steps=2",
                 "guidance.w_max=0.0", "--quiet", "--resume"]) == 2
    assert "is a guided run" in capsys.readouterr().err
    assert main([*args[:-1], "optim.lr=0.5", "--quiet", "--resume"]) == 2
    assert "optim.lr: is 0.5, but the run in" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert logged_steps(out)[-1] == 200 and "resumed 1 times" in capsys.readouterr().out
    assert load_checkpoint(os.path.join(out, "student")).extra["train_steps"] == 200


def test_an_error_that_would_repeat_stops_the_run_at_once(tmp_path, capsys):
    """Eight images for two workers of micro-batch 8: too little data fails the same way on every
    retry, so the run stops with that error instead of restarting max_failures times."""
    import numpy as np

    data = str(tmp_path / "few.npz")
    np.savez(data, images=np.random.default_rng(0).uniform(0, 1, (8, 1, 8, 8)).astype(np.float32),
             labels=np.arange(8) % 3)
    args = ["train", "--config", ANALYTIC, "--out", str(tmp_path / "run"), "--quiet",
            "teacher.analytic=null", f"teacher.checkpoint={ROOT}/tests/data/unet-v1", "student=null",
            "data.source=npz", f"data.path={data}", "data.resolution=8", "optim.batch_size=16",
            "max_failures=2"]
    started = time.time()
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "4 samples for this worker, fewer than one micro-batch of 8" in captured.err
    assert "restarting" not in captured.out
    print(f"stopped after {time.time() - started:.0f} s")


PAIRS_ARGS = ["--config", f"{ROOT}/configs/smoke/pairs_progressive.yaml", "--quiet",
              "num_shards=2", "samples_per_shard=128", "batch_size=128"]
FROM_PAIRS = ["method=progressive", "teacher.analytic.num_classes=4", "teacher.analytic.dim=16",
              "teacher.analytic.shape=[1,4,4]", "teacher.analytic.seed=0",
              "teacher.analytic.components_per_class=2", "student.mlp.dim=16",
              "student.mlp.shape=[1,4,4]", "student.mlp.num_classes=4", "guidance.w_max=2.0",
              "halving.start_steps=8", "halving.end_steps=4", "halving.steps_per_round=40",
              "checkpoint_every=20", "log_every=10"]


def test_progressive_round_from_precomputed_targets(tmp_path, capsys):
    pairs = str(tmp_path / "pairs")
    assert main(["pairs", *PAIRS_ARGS, "--out", pairs]) == 0
    run = str(tmp_path / "run")
    base = ["train", "--config", ANALYTIC, "--out", run, *FROM_PAIRS, f"pairs={pairs}", "--quiet"]
    capsys.readouterr()
    assert main([*base[:-1], "teacher.analytic.seed=1", "--quiet"]) == 2
    assert "was made by teacher" in capsys.readouterr().err
    assert main([*base[:-1], "method=guided", "--quiet"]) == 2
    assert "holds progressive pairs; method guided needs guided pairs" in capsys.readouterr().err
    assert main([*base[:-1], "halving.end_steps=2", "--quiet"]) == 2
    assert "holds targets for 4-step students" in capsys.readouterr().err
    assert main([*base[:-1], "halving.stochastic=true", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "halving.stochastic: is true, but" in err and "holds deterministic (1/N jumps)" in err
    assert main([*base[:-1], "guidance.w_max=3.0", "--quiet"]) == 2
    assert "guidance: is [0, 3], but" in capsys.readouterr().err
    assert main([*base[:-1], "workers.num=3", "optim.batch_size=48", "--quiet"]) == 2
    assert "pairs: holds 2 shards for 3 workers" in capsys.readouterr().err    # before any worker
    assert not os.path.exists(run)
    assert main(base) == 0
    with open(os.path.join(run, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    losses = [row["loss"] for row in log]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(0.0 <= row["data_wait"] < 1.0 for row in log)
    student = load_checkpoint(os.path.join(run, "student"))
    assert student.extra["steps"] == 4 and os.path.isdir(os.path.join(run, "rounds", "4-steps"))


@pytest.fixture
def failing_method():
    """tests/failing_method.py, registered for one test (its module pickled by value: workers
    cannot import tests/)."""
    import failing_method

    from raydistill.methods.registry import METHODS, register

    ray.cloudpickle.register_pickle_by_value(failing_method)
    register(failing_method.SPEC)
    yield failing_method
    del METHODS[failing_method.SPEC.name]


@pytest.mark.parametrize("error, message", [
    ("cuda_oom", "CUDA out of memory with 8 samples per GPU per micro-batch (optim.batch_size 16 "
                 "over 2 workers and deepspeed.grad_accum 1), ZeRO-2, fp32: raise "
                 "deepspeed.grad_accum or deepspeed.zero_stage, lower optim.batch_size, or train "
                 "in bf16); start a new run with the change"),
    ("host_oom", "a worker ran out of host memory (Ray's memory monitor stopped it): give the "
                 "nodes more memory, or train with fewer workers per node (workers.num 2)"),
])
def test_out_of_memory_stops_the_run_with_one_line_instead_of_retrying(failing_method, tmp_path,
                                                                       capsys, error, message):
    out = str(tmp_path / "run")
    args = ["train", "--config", ANALYTIC, "--out", out, "--quiet", "method=toy-failing",
            f"failing.error={error}", "optim.batch_size=16", "optim.steps=20", "checkpoint_every=2",
            "workers.num=2", "max_failures=2"]
    assert main(args) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "raydistill train: error" in line]
    assert len(errors) == 1 and message in errors[0], captured.err[-2000:]
    assert "restarting" not in captured.out


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB file system of its own (tmpfs; needs the right to mount, as root has)."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({mounted.stderr.decode().strip()})")
    yield str(path)
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill_after_a_checkpoint(out: str, filler: str) -> threading.Thread:
    """Fill the disk `out` is on once the run has its first checkpoint."""
    def fill():
        deadline = time.time() + 1200
        while time.time() < deadline and not finished(out):
            if glob.glob(os.path.join(out, "ray", "**", SNAPSHOT), recursive=True):
                with open(filler, "wb") as f:
                    try:
                        while True:
                            f.write(bytes(1 << 20))
                    except OSError:
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_its_last_checkpoint(small_disk,
                                                                                capsys):
    out, filler = os.path.join(small_disk, "run"), os.path.join(small_disk, "filler")
    args = ["train", "--config", ANALYTIC, "--out", out, *LONG, "max_failures=2", "--quiet"]
    thread = fill_after_a_checkpoint(out, filler)
    assert main(args) == 1
    thread.join()
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "raydistill train: error" in line]
    assert len(errors) == 1 and "no space left on the device" in errors[0], captured.err[-3000:]
    assert "restarting" not in captured.out
    os.remove(filler)
    assert main([*args, "--resume"]) == 0
    assert logged_steps(out)[-1] == 200 and "resumed 1 times" in capsys.readouterr().out


def test_two_runs_on_one_machine_each_use_their_own_ray_instance(tmp_path):
    """Two `raydistill train` runs at once, beside this process's own Ray instance: each starts
    its own and points Ray's components at it, so Ray Train's placement-group cleaner does not
    fail on finding three ("Found multiple active Ray instances")."""
    # this process started its instance the same way, and kept none of it in its environment
    assert "RAY_GCS_SERVER_PORT" not in os.environ
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    runs = [subprocess.Popen([sys.executable, "-m", "raydistill.cli", "train", "--config",
                              ANALYTIC, "--out", str(tmp_path / f"run{i}"), "--quiet",
                              "optim.steps=40", "checkpoint_every=20"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
            for i in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    for output in outputs:
        assert "multiple active Ray instances" not in output, output[-3000:]
        assert "PlacementGroupCleaner" not in output, output[-3000:]


def test_checkpoints_upload_to_remote_storage_and_a_run_resumes_from_there(tmp_path, capsys):
    """With `storage` a URI (file:// standing in for s3:// or gs://) each rank writes its part of a
    checkpoint to a local directory that Ray Train uploads while training goes on and then
    deletes: the storage keeps the two latest checkpoints with both ranks' parts, nothing is left
    in the local directories or under DIR/ray, and a run stopped at `until` continues from the
    uploaded checkpoint with --resume."""
    remote, out = tmp_path / "remote", str(tmp_path / "run")

    def staged() -> set[str]:
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "raydistill-ckpt-*")))

    before = staged()
    args = ["train", "--config", ANALYTIC, "--out", out, "--quiet", *LONG,
            f"storage=file://{remote}"]
    assert main([*args, "until=100"]) == 0
    assert logged_steps(out)[-1] == 100
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert logged_steps(out)[-1] == 200
    assert "resumed 1 times" in capsys.readouterr().out   # from the uploaded step-100 checkpoint
    with open(os.path.join(out, "train_log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    kept = sorted(glob.glob(os.path.join(remote, "*", "checkpoint-*")))
    assert [os.path.basename(d) for d in kept] == ["checkpoint-00000175", "checkpoint-00000200"]
    for checkpoint in kept:
        assert sorted(os.listdir(os.path.join(checkpoint, "streams"))) == ["rank-0.json",
                                                                           "rank-1.json"]
    assert 0 < last["checkpoint_bytes"] < directory_bytes(kept[0])   # rank 0's part of it
    assert not glob.glob(os.path.join(out, "ray", "*", "checkpoint-*"))
    assert staged() == before
    assert load_checkpoint(os.path.join(out, "student")).extra["train_steps"] == 200
