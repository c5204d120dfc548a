"""The loop's phases: each module updated by its own phase only (gradient isolation, under ZeRO 0,
2 and 3), K updates of a module per step with its own LR schedule and optimizer settings, only
the data a phase reads consumed, and per-phase metrics and per-module bytes in the log."""

import dataclasses
import os

import pytest
import torch
from torch import nn

from raydistill.config import ModuleOptim, TrainJob, load
from raydistill.methods.base import DATA, Method, Phase, Trainable
from raydistill.models import build_network
from raydistill.schedules import lr_factor
from raydistill.train.build import prepare
from raydistill.train.driver import setup_worker
from raydistill.train.loop import GradientScope, WorkerContext, run_worker
from raydistill.train.progress import step_postfix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC = f"{ROOT}/configs/tests/analytic_guided.yaml"
STEPS, CRITIC_UPDATES = 6, 3


class ThroughCritic(Method):
    """The student's loss passes through a second module, the critic, whose own loss has zero
    gradients: whatever moves the critic leaked in from the student's backward."""

    def __init__(self, student: nn.Module, critic: nn.Module, teacher: nn.Module):
        self.student, self.critic = Trainable(student), Trainable(critic)
        self.count_evaluations(teacher)

    def trainables(self) -> dict[str, Trainable]:
        return {"student": self.student, "critic": self.critic}

    def phases(self) -> list[Phase]:
        return [Phase("critic", "critic", updates=CRITIC_UPDATES),
                Phase("student", "student", reads=(DATA,))]

    @property
    def total_steps(self) -> int:
        return STEPS

    def loss(self, batch, phase):
        if phase.name == "critic":
            assert batch == {}
            n = self.micro_batch
            cond = {"c": torch.zeros(n, dtype=torch.long), "w": torch.zeros(n)}
            zero = self.critic(torch.zeros(n, 2), torch.full((n,), 0.5), cond).sum() * 0
            return {"loss": zero, "drawn": torch.tensor(float(n))}
        x, c = batch[DATA]["x"], batch[DATA]["c"]
        t, cond = torch.full((len(x),), 0.5), {"c": c, "w": torch.zeros(len(x))}
        out = self.critic(self.student(x, t, cond), t, cond)
        return {"loss": out.pow(2).mean(), "first": out[:, 0].mean().detach()}


def run(stage: int, tmp_path):
    job = load(TrainJob, ANALYTIC, ["workers.num=1", f"optim.steps={STEPS}",
                                    f"deepspeed.zero_stage={stage}", f"checkpoint_every={STEPS}"])
    plan = prepare(job)
    job = dataclasses.replace(job, optim=dataclasses.replace(
        job.optim, modules={"critic": ModuleOptim(lr=0.05, warmup_steps=4)}))
    setup = setup_worker(job, plan.student_config, 0, 1)
    torch.manual_seed(0)
    student, critic = build_network(plan.student_config), build_network(plan.student_config)
    method = ThroughCritic(student, critic, setup.teacher.denoiser)
    before = {name: [p.detach().clone() for p in m.parameters()]
              for name, m in method.modules().items()}
    logged = []
    run_worker(job, method, setup.streams, WorkerContext(0, 1, setup.device, lambda m, d: None,
                                                         logged=logged.append),
               plan.student_config, setup.teacher)
    return job, method, setup.streams, before, logged


def full(param):
    return param.ds_tensor if hasattr(param, "ds_tensor") else param


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_phase_updates_only_its_module(single_process_group, tmp_path, stage):
    job, method, streams, before, logged = run(stage, tmp_path)
    critic = [full(p) for p in method.critic.network.parameters()]
    student = [full(p) for p in method.student.network.parameters()]
    assert all(torch.equal(a, b.reshape(a.shape) if a.numel() == b.numel() else b)
               for a, b in zip(critic, before["critic"]) if a.numel() == b.numel()), \
        "the student's loss, which passes through the critic, moved the critic"
    assert any(not torch.equal(a, b.reshape(a.shape)) for a, b in zip(student, before["student"])
               if a.numel() == b.numel())
    assert method.critic.engine.global_steps == CRITIC_UPDATES * STEPS
    assert method.student.engine.global_steps == STEPS
    # the student's phase read one micro-batch per update; the critic's read nothing
    assert list(streams) == [DATA] and streams[DATA].position.rows == STEPS * 64
    last = logged[-1]
    assert last["loss"] == last["student/loss"] and "student/first" in last
    assert last["critic/loss"] == 0.0 and last["critic/drawn"] == 64.0
    for row in logged:              # each module's schedule counts its own updates
        s = row["step"]
        assert row["lr"] == pytest.approx(job.optim.lr * lr_factor(s % STEPS, 2, STEPS))
        k = CRITIC_UPDATES * s
        assert row["critic/lr"] == pytest.approx(
            0.05 * lr_factor(k % (CRITIC_UPDATES * STEPS), 4, CRITIC_UPDATES * STEPS))
    assert last["bytes/student"] > 0 and last["bytes/critic"] > 0 and last["bytes/teacher"] > 0


def test_without_the_scope_the_critic_moves(single_process_group, tmp_path, monkeypatch):
    """The wrong variant: every module's parameters take gradients in every phase. At ZeRO-0 the
    student's loss silently moves the critic (so the test above can fail); at ZeRO-2 the critic's
    reduction hooks fire inside the student's backward and DeepSpeed stops the run."""
    def route_only(scope, name):
        for other, handle in scope.handles.items():
            handle.trains = other == name

    monkeypatch.setattr(GradientScope, "enter", route_only)
    _, method, _, before, _ = run(0, tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(method.critic.network.parameters(),
                                                     before["critic"]))
    with pytest.raises(AssertionError, match="already been reduced"):
        run(2, tmp_path)


def test_the_step_line_shows_each_phases_loss():
    line = step_postfix({"round": "train", "loss": 0.1, "fake_score/loss": 0.4,
                         "fake_score/loss_denoise": 0.4, "generator/loss": 0.1,
                         "generator/loss_dm": 0.1, "samples_per_s": 10.0, "data_wait": 0.0})
    assert line == "train  fake_score 0.4  generator 0.1  10 samples/s  data wait 0%"
    single = step_postfix({"round": "train", "loss": 0.5, "samples_per_s": 10.0, "data_wait": 0.0})
    assert single == "train  loss 0.5  10 samples/s  data wait 0%"
    # an SD-sized student on one GPU makes a few samples a second: no rounding to 0 or 1
    slow = step_postfix({"round": "train", "loss": 0.5, "samples_per_s": 1.46, "data_wait": 0.0})
    assert slow == "train  loss 0.5  1.5 samples/s  data wait 0%"


@pytest.mark.parametrize("method", ["guided", "dmd"])
def test_the_frozen_teacher_is_held_in_bf16_when_training_bf16(slow_teacher, method):
    """Built once per worker, in no optimizer, and in bf16 under bf16 training: half the bytes;
    the modules that start from its weights copied them in fp32 first."""
    from raydistill.config import TeacherRef, from_dict
    from raydistill.models import load_checkpoint
    from raydistill.models.checkpoint import load_teacher
    from raydistill.train.build import build_method, student_config
    from raydistill.train.engine import tensor_bytes

    fp32, sizes = load_checkpoint(slow_teacher).network.state_dict(), {}
    for precision in ("fp32", "bf16"):
        job = from_dict(TrainJob, {"method": method, "teacher": {"checkpoint": slow_teacher},
                                   "guidance": {"w_min": 1.0, "w_max": 1.0 if method == "dmd"
                                                else 2.0},
                                   **({"dmd": {"regression_weight": 0.0}} if method == "dmd"
                                      else {}),
                                   "deepspeed": {"precision": precision}})
        teacher = load_teacher(TeacherRef(checkpoint=slow_teacher))
        method_ = build_method(job, teacher, student_config(job, teacher), torch.device("cpu"))
        frozen = method_.frozen_modules()["teacher"]
        dtypes = {p.dtype for p in frozen.parameters()}
        assert dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
        assert not any(p.requires_grad for p in frozen.parameters())
        sizes[precision] = tensor_bytes(frozen)
        for module in method_.modules().values():      # trained modules: fp32 copies
            state = module.state_dict()
            prefix = "net." if "net.out.2.weight" in state else ""
            for name, value in fp32.items():
                assert torch.equal(state[prefix + name], value)
    assert sizes["bf16"] * 2 == sizes["fp32"]
