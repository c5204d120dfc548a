"""`raydistill submit` against a Ray cluster this module starts with `ray start --head` on loopback
(2 CPUs): the smoke pairs job end to end from an uploaded copy of the checkout, a failed job's
status reaching the caller, --no-wait / status / logs / stop, and bad input (no cluster needed)."""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil
import pytest
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from raydistill import submit
from raydistill.cli import main
from raydistill.submit import EXCLUDES, runtime_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_PAIRS = ["--config", "configs/smoke/pairs.yaml"]
# Prepended to the uploaded copy's jobs/generate_pairs.py: where the job imports raydistill from,
# its working directory, and a variable the runtime-env file sets.
PROBE = ("import os, raydistill; print('probe:', raydistill.__file__, os.getcwd(), "
         "os.environ['PROBE_WORD'], flush=True)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str          # the job server (dashboard), http://127.0.0.1:PORT
    temp_dir: str         # Ray's --temp-dir: sessions, logs, unpacked working directories
    client: JobSubmissionClient


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster, as `ray start --head --block` makes it, ended by ending that process and
    its descendants (only those: a Ray another test runs is left alone)."""
    temp_dir = tempfile.mkdtemp(prefix="rds", dir="/tmp")   # short: Ray's Unix sockets live in it
    dashboard = free_port()
    bin_dir = os.path.dirname(sys.executable)                # jobs run `python`: this venv's
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield Cluster(f"http://127.0.0.1:{dashboard}", temp_dir, job_server(head, dashboard))
    finally:
        ours = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        head.terminate()                       # a graceful stop takes ~30 s once jobs have run
        for process in psutil.wait_procs(ours, timeout=5)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_server(head: subprocess.Popen, port: int) -> JobSubmissionClient:
    deadline = time.monotonic() + 60
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            return JobSubmissionClient(f"http://127.0.0.1:{port}")
        except ConnectionError:
            assert time.monotonic() < deadline, "the job server did not come up in 60 s"
            time.sleep(0.5)


def submitted_id(stderr: str) -> str:
    return re.search(r"^submit: (raysubmit_\w+) submitted: ", stderr, flags=re.M).group(1)


def wait_for(client: JobSubmissionClient, job_id: str, status: JobStatus, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while (now := client.get_job_status(job_id)) != status:
        assert not now.is_terminal() and time.monotonic() < deadline, f"{job_id} is {now}"
        time.sleep(0.2)


# ---------------------------------------------------------------------------- bad input, no cluster

def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """Caught before any upload; an unknown job is argparse's (usage line, then the error)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = ["--", *SMOKE_PAIRS, "--out", "x"]
    with pytest.raises(SystemExit) as exit_:
        main(["submit", "pair", *job])
    assert exit_.value.code == 2
    assert "invalid choice: 'pair' (choose from 'pairs', 'generate_pairs', 'train', " in \
        capsys.readouterr().err
    assert main(["submit", "pairs", *job]) == 2
    assert one_line_error(capsys) == ("raydistill submit: error: --address: no cluster given: pass "
                                      "--address http://HEAD:8265 (the head's dashboard) or set "
                                      "RAY_ADDRESS\n")
    assert main(["submit", "status", "raysubmit_x"]) == 2
    assert "--address: no cluster given" in one_line_error(capsys)
    address = ["--address", "http://127.0.0.1:1"]
    missing = str(tmp_path / "nowhere")
    assert main(["submit", "train", *address, "--working-dir", missing, *job]) == 2
    assert one_line_error(capsys) == f"raydistill submit: error: --working-dir: no such directory: " \
                                     f"{missing}\n"
    assert main(["submit", "run", *address, "--working-dir", str(tmp_path), *job]) == 2
    assert f"{tmp_path} has no jobs/pipeline.py: give a raydistill checkout" in one_line_error(capsys)
    assert main(["submit", "pairs", *address, "--runtime-env", missing, *job]) == 2
    assert f"--runtime-env: cannot read {missing}: [Errno 2] No such file or directory" in \
        one_line_error(capsys)
    for text, message in [("- pip\n", "must hold a mapping of runtime_env keys"),
                          ("working_dir: .\n", "working_dir: give it with --working-dir"),
                          ("env_vars: {A: [1}\n", "cannot read")]:
        (tmp_path / "env.yaml").write_text(text)
        assert main(["submit", "pairs", *address, "--runtime-env", str(tmp_path / "env.yaml"),
                     *job]) == 2
        assert message in one_line_error(capsys)


def test_an_unreachable_cluster_is_one_line_naming_it(monkeypatch, capsys):
    """Nothing listens on the port: exit 1; an explicit --address wins over $RAY_ADDRESS."""
    address = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    assert main(["submit", "pairs", "--address", address, "--", *SMOKE_PAIRS, "--out", "x"]) == 1
    assert one_line_error(capsys) == (f"raydistill submit: error: cannot reach a Ray job server at "
                                      f"{address}: is the cluster up, and is this its dashboard "
                                      f"address (http://HEAD:8265)?\n")
    assert main(["submit", "logs", "raysubmit_x"]) == 1
    assert "cannot reach a Ray job server at http://127.0.0.1:1:" in one_line_error(capsys)


def test_the_runtime_env_adds_the_file_and_pip_to_the_working_dir(tmp_path):
    """The file's keys kept, its excludes after ours, --pip as the pip list (not twice)."""
    path = tmp_path / "env.yaml"
    path.write_text("env_vars: {OMP_NUM_THREADS: '1'}\nexcludes: [data/, '*.pyc']\n")
    env = runtime_env("train", ROOT, str(path), ["einops", "lpips==0.1.4"])
    assert env == {"env_vars": {"OMP_NUM_THREADS": "1"}, "pip": ["einops", "lpips==0.1.4"],
                   "working_dir": ROOT, "excludes": [*EXCLUDES, "data/"]}
    path.write_text("pip: [einops]\n")
    assert runtime_env("run", ROOT, str(path), [])["pip"] == ["einops"]
    with pytest.raises(ValueError, match="--pip: .* already sets pip: list the packages in one"):
        runtime_env("run", ROOT, str(path), ["lpips"])


# ------------------------------------------------------------------------------ on a Ray cluster

def test_the_smoke_pairs_job_runs_from_the_uploaded_working_dir(cluster, tmp_path, capsys):
    """The job imports the uploaded raydistill (not the one installed from this checkout), with
    the runtime-env file's variables, without what the excludes leave behind; its logs stream to
    stdout and the pair set it writes verifies."""
    checkout = tmp_path / "checkout"
    for name in ("raydistill", "jobs", "configs"):
        shutil.copytree(os.path.join(ROOT, name), checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    script = checkout / "jobs" / "generate_pairs.py"
    script.write_text(PROBE + script.read_text())
    (checkout / "runs").mkdir()
    (checkout / "runs" / "old.bin").write_bytes(bytes(2**20))
    (checkout / "raydistill" / "stale.pyc").write_bytes(b"\0")
    (tmp_path / "env.yaml").write_text("env_vars: {PROBE_WORD: uploaded}\n")
    out = tmp_path / "pairs out"                         # a space: the entrypoint quotes it
    assert main(["submit", "pairs", "--address", cluster.address, "--working-dir", str(checkout),
                 "--runtime-env", str(tmp_path / "env.yaml"), "--", *SMOKE_PAIRS,
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    job_id = submitted_id(printed.err)
    module, cwd, word = re.search(r"^probe: (\S+) (\S+) (\S+)$", printed.out, flags=re.M).groups()
    assert module == os.path.join(cwd, "raydistill", "__init__.py")
    assert cwd.startswith(os.path.join(cluster.temp_dir, "session_")) and \
        "/runtime_resources/working_dir_files/" in cwd
    assert word == "uploaded"
    assert os.path.isfile(os.path.join(cwd, "configs", "smoke", "pairs.yaml"))
    assert not os.path.exists(os.path.join(cwd, "runs"))
    assert not os.path.exists(os.path.join(cwd, "raydistill", "stale.pyc"))
    assert "pairs: 4 shards generated in" in printed.out and f"{out} holds 4 shards" in printed.out
    assert f"submit: {job_id} SUCCEEDED (Job finished successfully.)\n" in printed.err
    assert main(["verify", str(out)]) == 0
    assert f"verify: ok: {out}: 4 shards, 256 samples" in capsys.readouterr().out


def test_a_failed_job_exits_1_and_status_and_logs_tell_why(cluster, monkeypatch, capsys):
    """From the default working directory (this checkout); the job's own exit code 2 (an unknown
    config key) is in the status line."""
    command = ["--", *SMOKE_PAIRS, "--out", "/nonexistent/pairs", "nope=1"]
    assert main(["submit", "pairs", "--address", cluster.address, *command]) == 1
    printed = capsys.readouterr()
    job_id = submitted_id(printed.err)
    assert "raydistill pairs: error: nope: unknown key" in printed.out
    failed = f"{job_id} FAILED (Job entrypoint command failed with exit code 2"
    assert f"submit: {failed}" in printed.err
    assert main(["submit", "status", job_id, "--address", cluster.address]) == 1
    assert capsys.readouterr().out.startswith(f"submit: {failed}")
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    assert main(["submit", "logs", job_id]) == 0
    logs = capsys.readouterr().out
    assert f"Running entrypoint for job {job_id}: python jobs/generate_pairs.py --config " \
           f"configs/smoke/pairs.yaml --out /nonexistent/pairs nope=1\n" in logs
    assert "raydistill pairs: error: nope: unknown key" in logs
    assert main(["submit", "status", "raysubmit_unknown"]) == 1
    assert one_line_error(capsys) == "raydistill submit: error: Job raysubmit_unknown does not " \
                                     "exist.\n"


def test_no_wait_then_status_an_interrupted_follow_and_stop(cluster, tmp_path, monkeypatch,
                                                           capsys):
    """Ctrl-C while following leaves the job running; stop ends it: STOPPED, exit 1 from then."""
    job_id = f"raydistill-stop-{os.getpid()}"
    address = ["--address", cluster.address]
    assert main(["submit", "run", *address, "--no-wait", "--job-id", job_id, "--", "--config",
                 "configs/smoke/pipeline.yaml", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{job_id}\n"
    wait_for(cluster.client, job_id, JobStatus.RUNNING)
    assert main(["submit", "status", job_id, *address]) == 0
    assert capsys.readouterr().out == f"submit: {job_id} RUNNING (Job is currently running.)\n"

    async def interrupted(self, job_id):
        yield "the first lines\n"
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(JobSubmissionClient, "tail_job_logs", interrupted)
        assert main(["submit", "logs", job_id, "--follow", *address]) == 1
    printed = capsys.readouterr()
    assert printed.out == "the first lines\n"
    assert printed.err == (f"submit: stopped following {job_id}; the job keeps running (stop it "
                           f"with `raydistill submit stop {job_id} --address {cluster.address}`)\n")
    assert cluster.client.get_job_status(job_id) == JobStatus.RUNNING
    assert main(["submit", "stop", job_id, *address]) == 0
    assert capsys.readouterr().out == f"submit: {job_id} STOPPED (Job was intentionally stopped.)\n"
    assert main(["submit", "status", job_id, *address]) == 1
    assert main(["submit", "logs", job_id, "--follow", *address]) == 1
    printed = capsys.readouterr()
    assert f"Running entrypoint for job {job_id}: python jobs/pipeline.py --config " \
           f"configs/smoke/pipeline.yaml --out {tmp_path / 'run'} --quiet\n" in printed.out
    assert printed.err == f"submit: {job_id} STOPPED (Job was intentionally stopped.)\n"


def test_a_driver_that_needs_a_gpu_waits_for_a_gpu_node(cluster, monkeypatch, capsys):
    """--entrypoint-gpus reserves GPUs for the driver: on this CPU-only cluster the job waits, and a
    stop cannot end it until it starts (Ray's job server queues the stop): exit 1, saying so."""
    address = ["--address", cluster.address]
    assert main(["submit", "run", *address, "--no-wait", "--entrypoint-gpus", "1", "--",
                 "--config", "configs/smoke/pipeline.yaml", "--out", "x"]) == 0
    job_id = capsys.readouterr().out.strip()
    assert main(["submit", "status", job_id, *address]) == 0
    assert capsys.readouterr().out.startswith(
        f"submit: {job_id} PENDING (Job has not started yet. It may be waiting for resources "
        f"(CPUs, GPUs, memory, custom resources) to become available.")
    monkeypatch.setattr(submit, "STOP_WAIT_S", 1.0)
    assert main(["submit", "stop", job_id, *address]) == 1
    assert one_line_error(capsys) == (f"raydistill submit: error: {job_id} is still PENDING 1 s "
                                      f"after the stop request (Ray stops a job that waits for "
                                      f"resources once it gets them)\n")


def test_the_cluster_launcher_config(tmp_path):
    """configs/cluster/cluster.yaml passes Ray's cluster-config schema; a head, a CPU worker type
    that scales from zero for pairs, a GPU worker type for training."""
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "cluster", "cluster.yaml")))
    schema_path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    jsonschema.validate(config, json.load(open(schema_path)))
    types = config["available_node_types"]
    head, cpu, gpu = (types[name] for name in ("head", "cpu_worker", "gpu_worker"))
    assert config["head_node_type"] == "head" and head["resources"]["CPU"] == 0
    assert cpu["resources"]["CPU"] >= 8 and "GPU" not in cpu["resources"]
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["CPU"] >= 8
    for worker in (cpu, gpu):
        assert worker["min_workers"] == 0 < worker["max_workers"]
    assert cpu["max_workers"] + gpu["max_workers"] <= config["max_workers"]
    setup = config["setup_commands"]
    assert "torch" in setup[0] and "pip install" in setup[-1] and "raydistill" in setup[-1]
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
