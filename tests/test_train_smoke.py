"""The smoke contract: `raydistill train` with configs/smoke/guided.yaml, progressive.yaml and
dmd.yaml runs standalone (building the tiny teacher it needs) with 2 workers under ZeRO-2 (DMD: two
engines), and leaves a student that `raydistill sample` loads at its steps (2; DMD's generator 1).
The terminal shows one progress bar for the run, and the engines' INFO lines go to the workers'
log files; TensorBoard events hold the logged losses."""

import json
import os

import pytest
import ray
from event_files import read_scalars

from raydistill.cli import main
from raydistill.models import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from raydistill.cluster import init_ray

    init_ray(num_cpus=3, dashboard=True)
    yield
    ray.shutdown()


# The guided run's path (inline CFG targets, ZeRO-2, consolidation) is also covered by the faster
# analytic-teacher tests, so its smoke run is left to `make test-all`.
@pytest.mark.parametrize("method, steps", [pytest.param("guided", 60, marks=pytest.mark.slow),
                                           ("progressive", 60), ("dmd", 30)])
def test_smoke_config_trains_a_student_that_samples(tmp_path_factory, method, steps, capsys):
    teacher = str(tmp_path_factory.getbasetemp() / "smoke-teacher")      # built once, then reused
    out = str(tmp_path_factory.mktemp(method) / "run")
    assert main(["train", "--config", f"{ROOT}/configs/smoke/{method}.yaml", "--out", out,
                 f"teacher.checkpoint={teacher}",
                 f"teacher.build={ROOT}/configs/smoke/teacher.yaml"]) == 0
    console = capsys.readouterr()
    assert f"train: {method} student after {steps} steps" in console.out
    assert f"train {method}: 100%" in console.err and f"{steps}/{steps}" in console.err
    assert "Reporting training result" not in console.out + console.err      # Ray Train's INFO
    assert "Reporting training result" in open(os.path.join(out, "logs", "train-rank0.log")).read()
    assert "Starting execution of Dataset" not in console.out + console.err   # Ray Data's INFO
    logged = [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]
    events = read_scalars(os.path.join(out, "tensorboard"))
    assert events["loss"] == pytest.approx({row["step"]: row["loss"] for row in logged})
    assert len(events["loss"]) == steps // (10 if method != "dmd" else 5)
    student = load_checkpoint(os.path.join(out, "student"))
    assert student.extra["teacher_fingerprint"] == load_checkpoint(teacher).fingerprint
    if method == "guided":
        assert student.config.unet.w_embedding and student.extra["w_max"] == 4.0
    elif method == "progressive":
        assert student.extra["steps"] == 2
        assert sorted(os.listdir(os.path.join(out, "rounds"))) == ["2-steps", "4-steps"]
    else:
        assert student.extra["steps"] == 1 and student.sampling.built_in_w == 1.0
        assert "fake_score " in console.err and "generator " in console.err    # each phase's loss
    grid = os.path.join(out, "grid.png")
    sample_steps = student.sampling.distilled_sampler.steps if student.sampling.distilled_sampler else 2
    assert main(["sample", "--checkpoint", os.path.join(out, "student"), "--steps",
                 str(sample_steps), "--out", grid]) == 0
    assert os.path.getsize(grid) > 0
