"""Ray jobs on a cluster: a `jobs/` entrypoint submitted with the Ray Job Submission SDK, its logs
streamed, its status, logs and stop by job id.

The working directory (by default the checkout this raydistill is imported from) is uploaded with the
job, and Ray puts it first on the job's PYTHONPATH: the job runs the uploaded raydistill, not a copy
installed on the cluster. The cluster needs only the dependencies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import yaml

from raydistill.config import ConfigError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

JOBS = {"pairs": "generate_pairs", "train": "train_student", "run": "pipeline"}  # -> jobs/NAME.py

# Never uploaded, and neither is what a .gitignore in the working directory lists: Ray refuses a
# working directory over 500 MiB.
EXCLUDES = [".git", ".venv", "venv", "/runs/", "__pycache__", "*.pyc", ".pytest_cache",
            ".ruff_cache", "*.egg-info"]

POLL_S = 0.5
STOP_WAIT_S = 15.0       # Ray sends SIGTERM, then SIGKILL 3 s later ($RAY_JOB_STOP_WAIT_TIME_S)


class ClusterError(RuntimeError):
    """The cluster could not be reached, or its job server refused a request."""


def checkout_root() -> str:
    """The directory holding the raydistill package imported here (and, in a checkout, jobs/)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def entrypoint(job: str, args: list[str]) -> str:
    """The shell command the job runs in its working directory: `python jobs/NAME.py ARGS`."""
    return shlex.join(["python", f"jobs/{JOBS[job]}.py", *args])


def runtime_env(job: str, working_dir: str, env_file: str | None, pip: list[str]) -> dict:
    """The job's runtime_env: `env_file`'s keys (a YAML or JSON mapping), the working directory
    and its excludes, and `pip` packages to install for the job."""
    script = os.path.join(working_dir, "jobs", f"{JOBS[job]}.py")
    if not os.path.isdir(working_dir):
        raise ConfigError("--working-dir", f"no such directory: {working_dir}")
    if not os.path.isfile(script):
        raise ConfigError("--working-dir", f"{working_dir} has no jobs/{JOBS[job]}.py: give a "
                                           "raydistill checkout")
    env = _read_env_file(env_file) if env_file else {}
    if "working_dir" in env:
        raise ConfigError("--runtime-env", "working_dir: give it with --working-dir")
    if pip:
        if "pip" in env:
            raise ConfigError("--pip", f"{env_file} already sets pip: list the packages in one place")
        env["pip"] = list(pip)
    env["working_dir"] = os.path.abspath(working_dir)
    env["excludes"] = EXCLUDES + [e for e in env.get("excludes", []) if e not in EXCLUDES]
    return env


def _read_env_file(path: str) -> dict:
    try:
        with open(path) as f:
            env = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError("--runtime-env", f"cannot read {path}: {_one_line(str(err))}") from None
    if not isinstance(env, dict):
        raise ConfigError("--runtime-env", f"{path} must hold a mapping of runtime_env keys")
    return env


def connect(address: str | None) -> JobSubmissionClient:
    """The job server at `address` (e.g. http://HEAD:8265), else at $RAY_ADDRESS. An explicit
    address wins over $RAY_ADDRESS, which the SDK alone would prefer."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address", "no cluster given: pass --address http://HEAD:8265 (the "
                                       "head's dashboard) or set RAY_ADDRESS")
    try:
        with _environ(RAY_ADDRESS=None, RAY_API_SERVER_ADDRESS=None):
            return JobSubmissionClient(address)
    except ConnectionError:
        raise ClusterError(f"cannot reach a Ray job server at {address}: is the cluster up, and is "
                           "this its dashboard address (http://HEAD:8265)?") from None
    except RuntimeError as err:              # e.g. a cluster too old for the jobs API
        raise ClusterError(_one_line(str(err))) from None


@contextmanager
def sdk_errors() -> Iterator[None]:
    """The SDK's errors (connections, HTTP failures, tracebacks of the job server) as one-line
    ClusterErrors."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        raise ClusterError(_one_line(str(err))) from None


@contextmanager
def quiet_sdk() -> Iterator[None]:
    """Ray's SDK without its INFO lines (packaging, upload, log socket closed) and without warning
    that .git, .venv and __pycache__ stay behind, which EXCLUDES leaves out itself; other warnings
    (a very large file, say) still show."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with _environ(RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=""):
            yield
    finally:
        logging.disable(previous)


@contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """os.environ with `values` set (None: unset) while the block runs."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _one_line(message: str) -> str:
    """The informative line of an SDK error: the exception a traceback ends in, or the first line,
    without the HTTP status prefix."""
    lines = [line.strip() for line in message.splitlines() if line.strip(" .")]
    line = lines[-1] if "Traceback (most recent call last)" in message else lines[0] if lines else ""
    return re.sub(r"^Request failed with status code \d+: ", "", line)


def submit_job(client: JobSubmissionClient, command: str, env: dict, *, job_id: str | None,
               entrypoint_gpus: float | None) -> str:
    """Submit `command` with the runtime_env `env`; the job's id (`job_id`, else one Ray makes up).
    `entrypoint_gpus` GPUs are reserved for the driver."""
    with sdk_errors():
        try:
            return client.submit_job(entrypoint=command, runtime_env=env, submission_id=job_id,
                                     entrypoint_num_gpus=entrypoint_gpus)
        except (TypeError, ValueError) as err:   # Ray's checks of the runtime_env and its package
            raise ConfigError("", _one_line(str(err))) from None


def summary(job_id: str, info: JobDetails) -> str:
    """`ID STATUS (what Ray says about it)`."""
    message = (info.message or "").strip().splitlines()
    return f"{job_id} {info.status.value}" + (f" ({message[0]})" if message else "")


def exit_code(info: JobDetails) -> int:
    """0 unless the job FAILED or was STOPPED (1)."""
    return 1 if info.status.value in ("FAILED", "STOPPED") else 0


def follow(client: JobSubmissionClient, job_id: str) -> JobDetails:
    """Stream the job's logs to stdout from its start until it ends; its final details."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with sdk_errors():
        asyncio.run(tail())
    return wait(client, job_id)


def wait(client: JobSubmissionClient, job_id: str, timeout_s: float = math.inf) -> JobDetails:
    """The job's details once it has ended, or as they are after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with sdk_errors():
        while (not (info := client.get_job_info(job_id)).status.is_terminal()
               and time.monotonic() < deadline):
            time.sleep(POLL_S)
    return info
