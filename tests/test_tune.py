"""`raydistill tune` on local Ray: ASHA over a tiny space of a KD job on the analytic teacher's
ODE pairs (two learning rates), each trial trained in two legs (its pairs read by Ray tasks from
inside the Tune trial) and scored after each by the evaluation (exact Frechet distance on the
analytic teacher); the poor trial is stopped at its first rung, the results and the best job are
written, and a search interrupted between trials continues with --resume."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import yaml

from raydistill.cli import main
from raydistill.config import TrainJob, from_dict
from raydistill.pipeline.tune import row_metrics, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = {"analytic": {"num_classes": 4, "components_per_class": 2, "dim": 16,
                        "shape": [1, 4, 4], "seed": 0}}


@pytest.fixture(scope="module")
def kd_job(tmp_path_factory):
    """KD of the analytic teacher (configs/smoke/pairs.yaml's) on 4 shards of its ODE pairs."""
    root = tmp_path_factory.mktemp("kd")
    assert main(["pairs", "--config", os.path.join(ROOT, "configs", "smoke", "pairs.yaml"),
                 "--out", str(root / "pairs"), "--quiet", "guidance.w_min=1.0",
                 "guidance.w_max=1.0", "solver.steps=8"]) == 0
    import ray

    ray.shutdown()
    job = {"method": "kd", "teacher": TEACHER, "pairs": str(root / "pairs"),
           "student": {"kind": "mlp", "prediction": "v",
                       "mlp": {"dim": 16, "shape": [1, 4, 4], "width": 64, "depth": 2,
                               "num_classes": 4}},
           "guidance": {"w_min": 1.0, "w_max": 1.0},
           "optim": {"steps": 40, "batch_size": 64, "lr": 1.0e-3, "warmup_steps": 2,
                     "ema_decay": 0.0},
           "workers": {"num": 1}, "checkpoint_every": 40, "log_every": 10}
    with open(root / "kd.yaml", "w") as f:
        yaml.safe_dump(job, f)
    return str(root / "kd.yaml")


def tune_config(path, train, **changes) -> str:
    config = {"train": train,
              "space": {"optim.lr": {"grid": [1.0e-2, 1.0e-8]}}, "trials": 1, "rungs": 2,
              "eval": {"num_samples": 250, "samples_per_shard": 250, "teacher_steps": 8},
              **changes}
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return str(path)


@pytest.fixture
def ray_off():
    yield
    import ray

    ray.shutdown()


def test_asha_stops_the_poor_trial_and_the_best_job_is_written(kd_job, tmp_path, capsys, ray_off):
    out = tmp_path / "search"
    assert main(["tune", "--config", tune_config(tmp_path / "tune.yaml", kd_job),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.load(open(out / "results.json"))
    trials = {t["values"]["optim.lr"]: t for t in results["trials"]}
    good, poor = trials[1e-2], trials[1e-8]
    assert [s["step"] for s in good["scores"]] == [20, 40] and not good["stopped_early"]
    assert [s["step"] for s in poor["scores"]] == [20] and poor["stopped_early"]
    assert poor["scores"][0]["score"] > good["scores"][0]["score"]
    assert results["best"] == good["trial"]
    assert f"tune: {poor['trial']} stopped by ASHA after rung 1" in printed
    assert "2 trials (1 stopped early, 0 failed)" in printed
    table = open(out / "results.md").read()
    assert "| stopped early |" in table and "| best |" in table
    best = from_dict(TrainJob, yaml.safe_load(open(out / "best.yaml")))
    assert best.optim.lr == 1e-2 and best.until == 0 and best.optim.steps == 40
    assert best.method == "kd" and best.pairs == kd_job.replace("kd.yaml", "pairs")
    for step in (20, 40):         # each rung's score is an eval of the student of that step
        report = json.load(open(out / "trials" / good["trial"] / f"eval-{step}" / "eval.json"))
        assert report["rows"][0]["frechet"] == pytest.approx(good["scores"][step // 20 - 1]["score"])


def test_a_bad_space_is_one_line_and_nothing_runs(kd_job, tmp_path, cli_stderr):
    config = tune_config(tmp_path / "tune.yaml", kd_job, space={"optim.lrr": {"choice": [1.0]}})
    assert main(["tune", "--config", config, "--out", str(tmp_path / "search")]) == 2
    err = cli_stderr()
    assert err.startswith("raydistill tune: error: space.optim.lrr: 1.0: optim.lrr: unknown key")
    assert len(err.splitlines()) == 1 and not (tmp_path / "search").exists()
    config = tune_config(tmp_path / "tune.yaml", kd_job,
                         space={"optim.lr": {"loguniform": [0, 1]}})
    assert main(["tune", "--config", config, "--out", str(tmp_path / "search")]) == 2
    assert "space.optim.lr.loguniform: must be [low, high], low > 0" in cli_stderr()


@pytest.mark.slow          # two processes that start Ray (2-3 min); make test-all runs it
def test_an_interrupted_search_continues_with_resume(kd_job, tmp_path):
    """Interrupted (SIGINT) once its first trial has finished, the search continues with --resume:
    the finished trial keeps its scores and is not trained again, the other one runs."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    config, out = tune_config(tmp_path / "tune.yaml", kd_job), tmp_path / "search"
    command = [sys.executable, "-m", "raydistill.cli", "tune", "--config", config, "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
    finished = None
    for line in first.stdout:
        if line.startswith("tune:") and line.rstrip().endswith(" finished"):
            finished = line.split()[1]
            first.send_signal(signal.SIGINT)
            break
    first.communicate(timeout=300)
    assert finished is not None
    trained = os.path.getmtime(out / "trials" / finished / "eval-40" / "eval.json")
    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    results = json.load(open(out / "results.json"))
    assert len(results["trials"]) == 2 and results["best"] == finished
    assert all(t["scores"] for t in results["trials"])
    assert os.path.getmtime(out / "trials" / finished / "eval-40" / "eval.json") == trained


def test_a_score_over_several_w_ranks_trials_by_their_ratios_to_the_teacher():
    """With eval.w_sweep a trial is scored at several w, where FID differs by an order of
    magnitude (the digits teacher: 0.15 at w = 0, 2.9 at w = 4): the geometric mean ranks trials
    as their FID / the teacher's does. The plain mean (the wrong variant) ranks by the largest."""
    teacher = {0.0: 0.2, 1.0: 1.0, 4.0: 3.0}
    off_at_0 = {0.0: 0.4, 1.0: 1.0, 4.0: 3.0}          # 2x the teacher's at w = 0, equal elsewhere
    off_at_4 = {0.0: 0.2, 1.0: 1.0, 4.0: 3.6}          # 1.2x at w = 4

    def rows(fids):
        return [{"name": "trial", "w": w, "fid": f, "kid": 0.0} for w, f in fids.items()]

    assert score(rows(off_at_4)) < score(rows(off_at_0))
    assert sum(off_at_4.values()) > sum(off_at_0.values())   # what the plain mean would rank
    ratio = {name: math.prod(fids[w] / teacher[w] for w in teacher) for name, fids in
             (("off_at_4", off_at_4), ("off_at_0", off_at_0))}
    assert ratio["off_at_4"] < ratio["off_at_0"]
    assert score(rows({1.0: 0.7})) == pytest.approx(0.7)              # one w: its FID
    assert row_metrics(rows({1.0: 0.7})) == {"fid": 0.7, "kid": 0.0}
    assert row_metrics(rows(teacher))["fid_w4"] == 3.0

