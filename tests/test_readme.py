"""The README's commands stay true: each `raydistill` line parses with the CLI and loads its config
(with its overrides; for `submit`, the job's), each `make` target exists, each `jobs/` script exists
and takes the same arguments, each cluster config exists, and the README states the exit codes the
CLI returns."""

import os
import re
import shlex

import numpy as np
import pytest

from raydistill.cli import build_parser, main
from raydistill.config import (
    ClassifierJob,
    PairsJob,
    PipelineJob,
    TeacherJob,
    TrainJob,
    TuneJob,
    load,
    read_config,
)
from raydistill.dryrun import dry_run_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {"teacher": TeacherJob, "classifier": ClassifierJob, "pairs": PairsJob, "train": TrainJob,
        "run": PipelineJob, "tune": TuneJob}


def readme_commands() -> list[str]:
    """Every command line in the README's bash blocks (continuations joined, comments dropped)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert COMMANDS[:2] == ["make demo", "make test"]
    assert sum(c.startswith("raydistill ") for c in COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command(command, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)
    if argv[0] == "make":
        assert re.search(rf"^{argv[1]}:", open("Makefile").read(), flags=re.M), command
        return
    if argv[0] == "ray" and argv[1] in ("up", "dashboard", "down"):    # the cluster launcher
        assert os.path.isfile(argv[2]), command
        return
    if argv[:3] == ["ray", "job", "submit"]:
        argv = argv[argv.index("--") + 1:]
    if argv[0] == "python":
        if argv[1] == "-c":
            return
        assert os.path.isfile(argv[1]), command
        verb = {"generate_pairs.py": "pairs", "train_student.py": "train",
                "pipeline.py": "run"}[os.path.basename(argv[1])]
        argv = ["raydistill", verb, *argv[2:]]
    assert argv[0] == "raydistill", command
    mine = str(tmp_path / "mine.npz")          # the README's placeholder for the user's arrays
    np.savez(mine, images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    argv = [arg.replace("mine.npz", mine) for arg in argv]
    args = build_parser().parse_args(argv[1:])
    if args.verb == "submit" and "job" in args:     # the arguments the job's entrypoint will parse
        args = build_parser().parse_args([args.job, *args.args])
    if args.verb in JOBS:
        assert os.path.isfile(args.config), command
        if os.path.dirname(args.config) == os.path.join("configs", "sd15"):
            # its files are on the cluster: every other key is checked as its dry run reads it
            dry_run_job(read_config(args.config, args.overrides), str(tmp_path / "dry"))
        else:
            load(JOBS[args.verb], args.config, args.overrides)


def test_the_exit_codes_the_readme_states(capsys, tmp_path, monkeypatch):
    """`submit` exits as its job ended, and 2 without a cluster to submit to; an unknown method is
    refused by key (exit 2)."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "exits 0 if the job SUCCEEDED, 1 if it FAILED or was STOPPED" in readme
    config = os.path.join(ROOT, "configs", "smoke", "guided.yaml")
    assert main(["train", "--config", config, "--out", str(tmp_path / "o"), "method=sid"]) == 2
    assert "method: must be one of ['guided', 'progressive', 'kd', 'dmd']" in \
        capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["submit", "train", "--", "--config", config, "--out", "o"]) == 2
    assert "--address: no cluster given" in capsys.readouterr().err
    assert "../shared" not in readme, "the README must not point outside the repository"
