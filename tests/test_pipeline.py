"""The main job end to end in local Ray (configs/smoke/pipeline.yaml): report files with finite
numbers and a complete lineage chain; a re-run reuses every finished stage; a changed config
re-runs its stage only; a run killed mid-stage resumes without redoing finished stages, and its
report never claims the unfinished one."""

import json
import math
import os
import re
import shutil

import pytest
from event_files import read_scalars

from raydistill.cli import main
from raydistill.config import PipelineJob, load
from raydistill.pipeline.run import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke", "pipeline.yaml")
STAGES = ["teacher", "classifier", "guided-pairs", "guided", "progressive", "stochastic",
          "kd-pairs", "kd", "dmd", "eval"]
PAIRS = ("guided-pairs", "kd-pairs")


@pytest.fixture(scope="module")
def smoke_pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    assert main(["run", "--config", SMOKE, "--out", out, "--quiet"]) == 0
    yield out
    import ray

    ray.shutdown()


def lineage(out, stage):
    with open(os.path.join(out, stage, "lineage.json")) as f:
        return json.load(f)


def test_the_smoke_pipeline_reports_finite_numbers_and_its_lineage(smoke_pipeline, capsys):
    out = smoke_pipeline
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    report = open(os.path.join(out, "report.md")).read()
    rows = {(r["name"], r["steps"]): r for r in metrics["eval"]}
    assert set(rows) == {("teacher", 32), ("ddim", 1), ("ddim", 4), ("dpmpp_2m", 1),
                         ("dpmpp_2m", 4), ("guided", 32), ("progressive", 4), ("progressive", 2),
                         ("progressive", 1), ("stochastic", 4), ("stochastic", 2), ("kd", 1),
                         ("dmd", 1)}
    assert all(math.isfinite(r["fid"]) and math.isfinite(r["kid"]) for r in rows.values())
    assert rows["teacher", 32]["nfe"] == 64 and rows["guided", 32]["nfe"] == 32
    assert rows["progressive", 4]["nfe"] == 4 and rows["ddim", 4]["nfe"] == 8
    assert rows["stochastic", 2]["solver"] == "stochastic" and rows["stochastic", 2]["nfe"] == 2
    assert rows["teacher", 32]["fid"] < rows["ddim", 1]["fid"]
    assert rows["teacher", 32]["fid_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert all(r["fid_to_teacher"] > 0 for key, r in rows.items() if key != ("teacher", 32))
    events = read_scalars(os.path.join(out, "tensorboard"))        # FID against NFE per sampler
    assert events["fid/progressive-ddim"] == pytest.approx(
        {r["nfe"]: r["fid"] for (name, _), r in rows.items() if name == "progressive"})
    assert read_scalars(os.path.join(out, "dmd", "tensorboard"))["generator/loss"]
    stages = metrics["stages"]      # guided: from pairs; two DDIM steps of a guided student
    assert stages["guided-pairs"]["shards"] == 4 and stages["guided-pairs"]["samples_per_s"] > 0
    assert stages["guided-pairs"]["teacher_evaluations"] == 4 * 256 * 2      # CFG: 2 per pair
    assert stages["guided"]["teacher_evaluations"] == 0
    assert stages["progressive"]["teacher_evaluations"] == 3 * 20 * 32 * 2
    assert stages["stochastic"]["teacher_evaluations"] > 0
    # one-step generators sample in one evaluation; dmd trains on the pairs kd's stage made, and
    # evaluates the guided teacher once per generator sample (CFG: 2)
    assert rows["kd", 1]["nfe"] == 1 and rows["dmd", 1]["nfe"] == 1
    assert "dmd-pairs" not in stages and stages["kd"]["teacher_evaluations"] == 0
    assert stages["dmd"]["teacher_evaluations"] == 10 * 32 * 2
    assert lineage(out, "dmd")["inputs"].keys() == {"teacher", "kd-pairs"}
    for name in ("guided", "progressive", "stochastic", "kd", "dmd"):
        assert stages[name]["samples_per_s"] > 0
        outside = stages[name]["outside_loop"]
        assert all(seconds >= 0 for seconds in outside.values())
        assert sum(outside.values()) == pytest.approx(stages[name]["overhead_s"])
        assert sum(outside.values()) < stages[name]["seconds"]
    assert stages["eval"]["network_evaluations"] == sum(r["nfe"] * 500 for r in rows.values())
    assert [g["row"] for g in metrics["goals"]] == ["progressive"] * 2 + ["stochastic"] * 2
    assert all(isinstance(g["met"], bool) for g in metrics["goals"])
    assert [f["row"] for f in metrics["fidelity"]] == ["progressive", "stochastic"]
    for f in metrics["fidelity"]:
        row = rows[f["row"], 4]
        assert f["ratio"] == pytest.approx(row["fid_to_teacher"] / rows["ddim", 4]["fid_to_teacher"])
        assert f"- {f['row']}, beside them: FID to the teacher's samples" in report
    fingerprints = {stage: lineage(out, stage)["fingerprint"] for stage in STAGES}
    assert lineage(out, "guided-pairs")["inputs"] == {"teacher": fingerprints["teacher"]}
    assert lineage(out, "guided")["inputs"] == {"teacher": fingerprints["teacher"],
                                                "guided-pairs": fingerprints["guided-pairs"]}
    assert lineage(out, "progressive")["inputs"] == {"guided": fingerprints["guided"]}
    assert lineage(out, "stochastic")["inputs"] == {"guided": fingerprints["guided"]}
    assert lineage(out, "eval")["inputs"] == {
        k: fingerprints[k] for k in STAGES[:-1] if k not in PAIRS}
    for stage in STAGES:
        assert metrics["stages"][stage]["fingerprint"] == fingerprints[stage]
        assert f"| {stage} | ran |" in report
    assert os.path.getsize(os.path.join(out, "fid_vs_nfe.png")) > 0
    run_log = open(os.path.join(out, "run.log")).read()        # the stage lines, kept
    assert all(f"{stage}: finished in" in run_log for stage in STAGES)
    worker_log = open(os.path.join(out, "guided", "logs", "train-rank0.log")).read()
    assert "Reporting training result" in worker_log
    grids = [os.path.join(out, "eval", r["grid"]) for r in metrics["eval"]]
    assert len(grids) == 13 and all(os.path.getsize(g) > 0 for g in grids)
    assert all(f"](eval/{r['grid']})" in report for r in metrics["eval"])
    capsys.readouterr()
    assert main(["run", "--config", SMOKE, "--out", out, "--quiet"]) == 0
    assert "10 stages done (0 ran, 10 reused)" in capsys.readouterr().out


def _files(directory):
    return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
            for root, _, names in os.walk(directory) for name in names}


def test_check_prints_the_plan_and_what_the_run_would_reuse(smoke_pipeline, capsys):
    """`run --check` validates every stage and prints the plan (each stage, what it reads, its
    settings, whether its lineage lets the run reuse it) and writes nothing; after a finished run
    every stage is reused, and a changed stage runs with everything downstream of it."""
    out, before = smoke_pipeline, _files(smoke_pipeline)
    capsys.readouterr()
    assert main(["run", "--config", SMOKE, "--out", out, "--check"]) == 0
    printed = capsys.readouterr().out
    assert "10 stages checked, every job valid; 0 would run, 10 be reused" in printed
    for i, stage in enumerate(STAGES):
        assert f"[{i + 1}/10] {stage} " in printed
    assert printed.count("reused (lineage matches") == 10
    assert "reads teacher, kd-pairs" in printed
    assert "dmd: optim.steps = 10, batch 32" in printed and "fake_updates=2" in printed
    assert main(["run", "--config", SMOKE, "--out", out, "--check",
                 "students.4.train.optim.lr=2e-4"]) == 0
    printed = capsys.readouterr().out
    assert "8 be reused" in printed and re.search(r"\] dmd +runs: its config changed", printed)
    assert "its config changed (train.optim.lr: 0.0001 -> '2e-4')" in printed
    assert re.search(r"\] eval +runs: after dmd +reads teacher", printed)
    assert _files(out) == before


def test_a_pipeline_directory_copied_elsewhere_reuses_every_stage(smoke_pipeline, tmp_path,
                                                                   capsys):
    """Stages name what they read by stage and fingerprint, not by location: a finished run copied
    to another directory (a user moving a run, a budget run started from hard links) is done."""
    copy = str(tmp_path / "copy")
    shutil.copytree(smoke_pipeline, copy)
    capsys.readouterr()
    assert main(["run", "--config", SMOKE, "--out", copy, "--check"]) == 0
    assert "0 would run, 10 be reused" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("students.4.train.optim.modules={fake_score: {warmup_steps: 20}}",
     "stage dmd [9/10]: students[4].train.optim.modules.fake_score.warmup_steps: is 20, not below "
     "the 20 updates of fake_score in optim.steps = 10 steps (2 a step)"),
    ("students.4.train.guidance={w_min: 1.0, w_max: 2.0}",
     "stage dmd [9/10]: students[4].train.guidance: a generator distils one guidance strength"),
    ("students.3.pairs.solver={steps: 0}",
     "stage kd-pairs [7/10]: students[3].pairs.solver.steps: must be positive, got 0"),
    ("students.1.train.halving.end_steps=3",
     "stage progressive [5/10]: students[1].train.halving.end_steps: must be a power of two"),
    ("eval.w=2", "stage eval [10/10]: eval: row kd-renoise-1: guidance: the model is a distilled "
                 "student with guidance w=1 built in"),
])
def test_a_bad_stage_fails_before_the_first_stage_runs(tmp_path, cli_stderr, override, message):
    """A pipeline checks every stage's job, against what the earlier stages will write, before
    its first stage runs: an error in the last stages names the stage and the key, exits 2, and
    leaves nothing behind."""
    out = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--quiet", override]) == 2
    err = cli_stderr()
    assert err.startswith(f"raydistill run: error: {message}") and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_run_killed_mid_stage_resumes_without_redoing_finished_ones(smoke_pipeline,
                                                                    monkeypatch, capsys):
    """Fewer eval samples change the eval stage's config only; killed after its first row, the
    report shows no quality figures and eval as not finished; the re-run redoes eval and reuses
    the sample set it had drawn. A pair shard deleted meanwhile is found, named and made again,
    byte-identical, so the student trained from the set is not retrained."""
    out = smoke_pipeline
    job = load(PipelineJob, SMOKE, ["eval.num_samples=250"])
    rows_logged = []

    def killing_log(line):
        rows_logged.append(line)
        if "NFE" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Pipeline(job, out, progress=False, log=killing_log).run()
    assert not os.path.exists(os.path.join(out, "eval", "lineage.json"))
    from raydistill.pipeline.report import write_report

    metrics = write_report(out, STAGES, {})
    assert not metrics["stages"]["eval"]["finished"] and metrics["eval"] == []
    assert "No evaluation finished yet" in open(os.path.join(out, "report.md")).read()
    first_set = os.path.join(out, "eval", "samples", "teacher-ddim-32", "manifest.parquet")
    drawn = os.path.getmtime(first_set)
    shard = os.path.join(out, "guided-pairs", "shard-000002.tar")
    with open(shard, "rb") as f:
        shard_bytes = f.read()
    os.remove(shard)
    capsys.readouterr()
    assert main(["run", "--config", SMOKE, "--out", out, "--quiet", "eval.num_samples=250"]) == 0
    printed = capsys.readouterr().out
    assert "guided-pairs: running (its output is unreadable (shard shard-000002.tar is " \
           "missing))" in printed
    assert "guided-pairs: regenerating shard-000002.tar (missing)" in printed
    with open(shard, "rb") as f:
        assert f.read() == shard_bytes
    for stage in [s for s in STAGES[:-1] if s != "guided-pairs"]:
        assert f"{stage}: done already (lineage matches" in printed
    assert "eval: running (did not finish)" in printed and "(2 ran, 8 reused)" in printed
    assert os.path.getmtime(first_set) == drawn
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["samples"] == 250 and {r["samples"] for r in metrics["eval"]} == {250}
