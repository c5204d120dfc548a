"""The training loop with real DeepSpeed engines: ZeRO stages agree, the consolidated student equals
the gathered ZeRO-3 shards, non-finite losses are skipped and bounded, bad input fails up front."""

import dataclasses
import itertools
import json
import math
import os
import shutil
import sys

import pytest
import torch
import yaml
from resume_harness import run_and_resume, train_in_process
from safetensors.torch import load_file

from raydistill.cli import main
from raydistill.config import (
    ConfigError,
    ModelConfig,
    TrainJob,
    from_dict,
    load,
    to_dict,
    with_absolute_paths,
)
from raydistill.train.build import prepare
from raydistill.train.driver import check_resumable, setup_worker
from raydistill.train.engine import fp32_master
from raydistill.train.loop import NonFiniteLoss, WorkerContext, run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC = f"{ROOT}/configs/tests/analytic_guided.yaml"
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"


def zero_stages_worker(config: dict) -> None:
    """Runs the same job under ZeRO 0, 2 and 3 (and ZeRO-2 in bf16) on one worker group, recording
    losses and the final checkpoint of each run (Ray Train start-up is paid once)."""
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    base = from_dict(TrainJob, config["job"])
    student = from_dict(ModelConfig, config["student"])
    for stage, precision in ((0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")):
        job = dataclasses.replace(base, deepspeed=dataclasses.replace(
            base.deepspeed, zero_stage=stage, precision=precision))
        setup = setup_worker(job, student, rank, world)
        name = f"zero{stage}" + ("-bf16" if precision == "bf16" else "")
        losses, out = [], os.path.join(config["out"], name)

        def report(metrics, directory, out=out):
            if metrics["step"] == base.optim.steps:
                shutil.copytree(directory, out, dirs_exist_ok=True)

        context = WorkerContext(rank, world, setup.device, report, logged=lambda metrics, losses=losses:
                                losses.append({k: v for k, v in metrics.items()
                                               if k == "loss" or "/loss" in k}))
        run_worker(job, setup.method, setup.streams, context, student, setup.teacher)
        if rank == 0:
            with open(f"{out}.json", "w") as f:
                json.dump(losses, f)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, logging_level="ERROR")
    yield
    ray.shutdown()


def on_two_workers(worker, job: TrainJob, out) -> None:
    """Run `worker(config)` on 2 Ray Train workers, config holding the job, its student and `out`."""
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    plan = prepare(job)
    TorchTrainer(worker,
                 train_loop_config={"job": to_dict(job), "student": to_dict(plan.student_config),
                                    "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name=worker.__name__, storage_path=str(out / "ray"))).fit()


def test_zero_stages_agree_and_zero3_consolidates(ray_local, tmp_path):
    job = load(TrainJob, ANALYTIC)
    on_two_workers(zero_stages_worker, job, tmp_path)
    losses = {stage: [row["loss"] for row in json.load(open(tmp_path / f"zero{stage}.json"))]
              for stage in (0, 2, 3)}
    print("\nstep  ZeRO-0     ZeRO-2     ZeRO-3")
    for step, row in enumerate(zip(*losses.values()), 1):
        print(f"{step:4d}  " + "  ".join(f"{v:.6f}" for v in row))
    assert len(losses[0]) == job.optim.steps and sum(losses[0][-4:]) < 0.8 * sum(losses[0][:4])
    for stage in (2, 3):
        torch.testing.assert_close(torch.tensor(losses[stage]), torch.tensor(losses[0]), rtol=1e-4,
                                   atol=1e-6)
    bf16 = [row["loss"] for row in json.load(open(tmp_path / "zero2-bf16.json"))]
    print("bf16 ZeRO-2 losses:", " ".join(f"{v:.4f}" for v in bf16))
    assert sum(bf16[-4:]) < 0.8 * sum(bf16[:4])                 # trains under bf16 as well
    torch.testing.assert_close(torch.tensor(bf16[0]), torch.tensor(losses[0][0]), rtol=0.05, atol=0)

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    final = tmp_path / "zero3"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(final / "engines" / "student"), tag="state")
    student = load_file(str(final / "student" / "model.safetensors"))
    assert set(gathered) == set(student)
    for name, value in gathered.items():
        torch.testing.assert_close(student[name], value.float(), rtol=0, atol=0)
    bf16_final = tmp_path / "zero2-bf16"          # the student is the fp32 master, not bf16 weights
    masters = get_fp32_state_dict_from_zero_checkpoint(str(bf16_final / "engines" / "student"),
                                                       tag="state")
    bf16_student = load_file(str(bf16_final / "student" / "model.safetensors"))
    for name, value in masters.items():
        torch.testing.assert_close(bf16_student[name], value.float(), rtol=0, atol=0)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in bf16_student.values())
    zero0 = load_file(str(tmp_path / "zero0" / "student" / "model.safetensors"))
    for name, value in zero0.items():
        torch.testing.assert_close(student[name], value, rtol=1e-3, atol=1e-5)


def test_non_finite_losses_are_skipped_then_stop_the_run(single_process_group, tmp_path):
    """A non-finite loss (NaN added to it: its gradients alone would be finite) skips its update;
    the weights stay as they were, the window reports it, and max_nan_steps skipped updates in a
    row stop the run."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=6", "max_nan_steps=3"])
    plan = prepare(job)
    reports, weights = [], []

    def run(bad_calls):
        setup = setup_worker(job, plan.student_config, 0, 1)
        calls, loss = [0], setup.method.loss

        def flaky_loss(batch, phase):
            calls[0] += 1
            weights.append([p.detach().clone() for p in setup.method.student.network.parameters()])
            out = loss(batch, phase)
            bad = calls[0] in bad_calls
            return {"loss": out["loss"] + torch.tensor(float("nan"))} if bad else out

        setup.method.loss = flaky_loss
        context = WorkerContext(0, 1, setup.device, lambda m, d: None, logged=reports.append)
        run_worker(job, setup.method, setup.streams, context, plan.student_config,
                   setup.teacher)

    run({2, 4, 5})                        # three skipped updates, never three in a row
    assert [(r["step"], r["nan_skipped"], r["grad_skipped"]) for r in reports] == [
        (1, 0, 0), (2, 1, 1), (3, 1, 1), (4, 2, 2), (5, 3, 3), (6, 3, 3)]
    assert [math.isfinite(r["loss"]) for r in reports] == [True, False, True, False, False, True]
    unchanged = [all(torch.equal(a, b) for a, b in zip(before, after))
                 for before, after in zip(weights, weights[1:])]
    assert unchanged == [False, True, False, True, True]   # the updates of steps 1..5
    with pytest.raises(NonFiniteLoss, match=r"step 5: 3 updates in a row were skipped"):
        run({3, 4, 5})


def nan_on_one_rank_worker(config: dict) -> None:
    """Rank 1's loss at step 3 is NaN (added: its gradients alone stay finite); each rank records
    its full weights before steps 3 and 4 and at the end, under ZeRO 0, 2 and 3."""
    import ray.train

    from raydistill.train.engine import full_state_dict

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    base = from_dict(TrainJob, config["job"])
    student = from_dict(ModelConfig, config["student"])
    for stage in (0, 2, 3):
        job = dataclasses.replace(base, deepspeed=dataclasses.replace(base.deepspeed,
                                                                      zero_stage=stage))
        setup = setup_worker(job, student, rank, world)
        method, calls, seen, logs = setup.method, [0], {}, []

        def flaky_loss(batch, phase, method=method, loss=method.loss, calls=calls, seen=seen):
            calls[0] += 1
            if calls[0] in (3, 4):                  # a collective: both ranks are at this call
                seen[calls[0]] = full_state_dict(method.student.network)
            out = loss(batch, phase)
            bad = rank == 1 and calls[0] == 3
            return {"loss": out["loss"] + torch.tensor(float("nan"))} if bad else out

        setup.method.loss = flaky_loss
        run_worker(job, setup.method, setup.streams,
                   WorkerContext(rank, world, setup.device, lambda m, d: None, logged=logs.append),
                   student, setup.teacher)
        torch.save({"seen": seen, "final": full_state_dict(method.student.network), "logs": logs},
                   os.path.join(config["out"], f"zero{stage}-rank{rank}.pt"))


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(ray_local, tmp_path):
    job = load(TrainJob, ANALYTIC, ["optim.steps=5", "log_every=1", "checkpoint_every=5"])
    on_two_workers(nan_on_one_rank_worker, job, tmp_path)
    for stage in (0, 2, 3):
        ranks = [torch.load(tmp_path / f"zero{stage}-rank{r}.pt") for r in (0, 1)]
        for record in ranks:              # step 3's update was skipped on both ranks
            assert all(torch.equal(record["seen"][3][n], v) for n, v in record["seen"][4].items())
        assert all(torch.equal(ranks[0]["final"][n], v) for n, v in ranks[1]["final"].items())
        last = ranks[0]["logs"][-1]
        assert (last["step"], last["nan_skipped"], last["grad_skipped"]) == (5, 1, 1), stage
        assert math.isfinite(ranks[0]["logs"][2]["loss"])      # rank 0's finite loss of step 3


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_non_finite_gradients_behind_a_finite_loss_are_skipped(single_process_group, stage,
                                                               precision):
    """sqrt(0 * p) adds 0 to the loss and NaN to the gradient. The update is skipped (DeepSpeed's
    own check at ZeRO-2 and under bf16, FiniteAdamW at ZeRO-0 in fp32, where DeepSpeed hands the
    step to the torch optimizer unchecked), counted, and the weights stay as they were."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=4", "log_every=1",
                                    f"deepspeed.zero_stage={stage}",
                                    f"deepspeed.precision={precision}"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    calls, loss, seen = [0], setup.method.loss, {}

    def poisoned_loss(batch, phase):
        calls[0] += 1
        out = loss(batch, phase)
        params = list(setup.method.student.network.parameters())
        if calls[0] == 3:
            seen["before"] = [p.detach().clone() for p in params]
            return {"loss": out["loss"] + torch.sqrt((params[0] * 0).sum())}
        if calls[0] == 4:
            seen["after"] = [p.detach().clone() for p in params]
        return out

    setup.method.loss, reports = poisoned_loss, []
    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, lambda m, d: None, logged=reports.append),
               plan.student_config, setup.teacher)
    assert reports[-1]["grad_skipped"] == 1 and reports[-1]["nan_skipped"] == 0
    assert all(torch.equal(a, b) for a, b in zip(seen["before"], seen["after"]))
    assert all(torch.isfinite(p).all() for p in setup.method.student.network.parameters())


def test_gradients_that_stay_non_finite_stop_the_run_under_accumulation(single_process_group):
    """With grad_accum 2 every update is skipped: the streak counts skipped updates, and the
    finite micro-batches between accumulation boundaries do not reset it."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=8", "max_nan_steps=3",
                                    "deepspeed.grad_accum=2"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    loss = setup.method.loss

    def poisoned_loss(batch, phase):
        out = loss(batch, phase)
        first = next(setup.method.student.network.parameters())
        return {"loss": out["loss"] + torch.sqrt((first * 0).sum())}

    setup.method.loss = poisoned_loss
    with pytest.raises(NonFiniteLoss, match=r"step 3: 3 updates in a row were skipped"):
        run_worker(job, setup.method, setup.streams, WorkerContext(0, 1, setup.device,
                                                                  lambda m, d: None),
                   plan.student_config, setup.teacher)


def test_dmd_zero_stages_agree_on_both_engines(ray_local, tmp_path):
    """DMD's two engines (generator, fake score; two fake-score updates per step, the GAN head
    on, a 2-step generator whose backward simulation runs the generator's engine without
    gradients before the exit's forward) on 2 workers: ZeRO 0, 2 and 3 give the same losses of
    both phases, and the same final generator and fake score."""
    job = load(TrainJob, ANALYTIC_DMD, ["dmd.gan_weight=0.05", "dmd.gan_head_weight=0.1",
                                        "dmd.generator_steps=2", "dmd.exit_step=uniform"])
    on_two_workers(zero_stages_worker, job, tmp_path)
    losses = {stage: json.load(open(tmp_path / f"zero{stage}.json")) for stage in (0, 2, 3)}
    keys = ["fake_score/loss", "generator/loss", "generator/loss_dm", "generator/loss_gan"]
    print("\nstep  " + "  ".join(f"{k} (ZeRO 0/2/3)" for k in keys))
    for step, rows in enumerate(zip(*losses.values()), 1):
        print(f"{step:4d}  " + "  ".join("/".join(f"{r[k]:.5f}" for r in rows) for k in keys))
    assert len(losses[0]) == job.optim.steps and set(keys) <= set(losses[0][0])
    # The DM surrogate divides by a per-sample mean |x - x_real| that is small at low noise, so
    # the ranks' different fp32 reduction orders under ZeRO 2/3 show up at 1e-4 there (step 6:
    # 330.868 vs 330.911); the fake score's and the GAN losses agree to 1e-4 like the student's.
    for stage in (2, 3):
        for key in keys:
            torch.testing.assert_close(torch.tensor([r[key] for r in losses[stage]]),
                                       torch.tensor([r[key] for r in losses[0]]),
                                       rtol=1e-3 if key.startswith("generator") else 1e-4,
                                       atol=1e-6)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    generators = [load_file(str(tmp_path / f"zero{stage}" / "student" / "model.safetensors"))
                  for stage in (0, 2, 3)]
    fake_zero0 = torch.load(tmp_path / "zero0" / "engines" / "fake_score" / "state" /
                            "mp_rank_00_model_states.pt", weights_only=False)["module"]
    fakes = [fake_zero0] + [get_fp32_state_dict_from_zero_checkpoint(
        str(tmp_path / f"zero{stage}" / "engines" / "fake_score"), tag="state") for stage in (2, 3)]
    assert any(name.startswith("head.") for name in fake_zero0)
    for states in (generators, fakes):
        for state in states[1:]:
            assert state.keys() == states[0].keys()
            for name, value in state.items():
                torch.testing.assert_close(value.float(), states[0][name].float(), rtol=1e-3,
                                           atol=1e-5)


@pytest.mark.parametrize("config, overrides, message", [
    (ANALYTIC, ["deepspeed.zero_stage=3", "optim.ema_decay=0.99"],
     "optim.ema_decay: must be 0 with deepspeed.zero_stage 3"),
    (ANALYTIC, ["optim.batch_size=63"], "optim.batch_size: 63 is not divisible by workers.num x"),
    (ANALYTIC, ["deepspeed.zero_stage=5"], "deepspeed.zero_stage: must be 0..3"),
    (ANALYTIC, ["student.mlp.w_embedding=false"], "student: a guided student must take w"),
    (ANALYTIC, ["optim.warmup_steps=12"], "optim.warmup_steps: is 12, not below optim.steps = 12"),
    (ANALYTIC, ["student.prediction=eps"],
     "student.prediction: an eps-prediction student cannot be distilled"),
    (ANALYTIC, ["optim.betas=[0.9]"], "optim.betas: must be two numbers in [0, 1), got [0.9]"),
    (ANALYTIC, ["optim.modules={critic: {lr: 0.1}}"],
     "optim.modules.critic: is not a module of method guided"),
    (ANALYTIC, ["optim.modules={student: {lrr: 0.1}}"], "optim.modules.student.lrr: unknown key"),
    (ANALYTIC, ["optim.modules={student: {warmup_steps: 12}}"],
     "optim.modules.student.warmup_steps: is 12, not below optim.steps = 12"),
    (ANALYTIC_DMD, ["dmd.regression_weight=0.25"],
     "pairs: dmd.regression_weight is 0.25: the regression loss needs ODE pairs"),
    (ANALYTIC_DMD, ["guidance.w_max=1"],
     "guidance: a generator distils one guidance strength"),
    (ANALYTIC_DMD, ["dmd.gan_weight=0.1"], "dmd.gan_weight: and gan_head_weight must both be set"),
    (ANALYTIC_DMD, ["dmd.generator_steps=2", "dmd.regression_weight=0.25"],
     "dmd.regression_weight: must be 0 for a 2-step generator (DMD2 trains it by backward"),
    (ANALYTIC_DMD, ["dmd.exit_step=first"],
     "dmd.exit_step: must be one of last, uniform, got 'first'"),
    (ANALYTIC_DMD, ["student.mlp.w_embedding=true"],
     "student: a generator takes no w input"),
    (ANALYTIC_DMD, ["method=kd"], "optim.modules.fake_score: is not a module of method kd"),
    (ANALYTIC_DMD, ["dmd.fake_weighting=snr"],
     "dmd.fake_weighting: snr weights a v-prediction network's loss on its own output from "),
    (ANALYTIC_DMD, ["loss_weighting=snr_plus_one"],
     "loss_weighting: does not apply to method dmd: dmd's fake score is weighted by "
     "dmd.fake_weighting"),
    (ANALYTIC_DMD, ["optim.modules={fake_score: {warmup_steps: 24}}"],
     "optim.modules.fake_score.warmup_steps: is 24, not below the 24 updates of fake_score in "
     "optim.steps = 12 steps (2 a step)"),
    (ANALYTIC_DMD, ["method=kd", "optim.modules={}"], "pairs: kd trains on ODE pairs"),
    (ANALYTIC, ["memory.offload_optimizer=true", "deepspeed.zero_stage=0"],
     "memory.offload_optimizer: needs deepspeed.zero_stage 1, 2 or 3"),
    (ANALYTIC, ["memory.activation_checkpointing=true"],
     "memory.activation_checkpointing: the student is a mlp network, which has no blocks to "
     "recompute (the built-in UNet and diffusers UNets have)"),
])
def test_bad_train_config_is_one_line_before_workers_start(cli_stderr, tmp_path, config, overrides,
                                                           message):
    assert main(["train", "--config", config, "--out", str(tmp_path / "run"), *overrides]) == 2
    err = cli_stderr()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_modules_warmup_counts_its_own_updates_per_step():
    """DMD2's fake score makes dmd.fake_updates updates a step, and its warm-up counts them (as
    its learning-rate schedule does in the loop): 20 warm-up updates of the 24 it makes in 12
    steps are valid (the rule that compared them with optim.steps refused them)."""
    from raydistill.methods.registry import method_spec
    from raydistill.train.build import build_method
    from raydistill.train.loop import updates_per_step

    job = load(TrainJob, ANALYTIC_DMD, ["optim.modules={fake_score: {warmup_steps: 20}}"])
    plan = prepare(job)
    method = build_method(job, plan.teacher, plan.student_config, torch.device("cpu"))
    loop = updates_per_step(method.phases(), method.modules(), {"data": None, "pairs": None})
    assert loop == method_spec("dmd").updates_per_step(job) == {"generator": 1, "fake_score": 2}


def test_eps_students_where_the_schedule_allows_them_and_v_students_elsewhere(tmp_path):
    """x_hat = (z_t - sigma eps_hat) / alpha: an eps student's x-space loss weight is SNR^-1 at
    high noise (~4.9e8 at t = 1 of the cosine schedule under truncated-SNR weighting), so there an
    eps student is refused and an eps teacher's default student predicts v (starting fresh: the eps
    weights read as v would be another function). Stable Diffusion's scaled_linear schedule ends at
    sigma / alpha = 14.6: its eps teacher's student stays eps and starts from the teacher's weights
    (DMD2's one-step generators convert eps to x there)."""
    from raydistill.config import ScheduleConfig, UNetConfig
    from raydistill.diffusion import CosineSchedule, loss_weight, x_jacobian
    from raydistill.models import build_network, save_checkpoint
    from raydistill.train.build import build_student, starts_from_teacher, student_config

    schedule, t = CosineSchedule(), torch.ones(1)
    alpha, sigma = schedule.alpha_sigma(t)
    weight = loss_weight("truncated_snr", schedule.logsnr(t)) * x_jacobian("eps", alpha=alpha,
                                                                           sigma=sigma) ** 2
    assert float(weight) > 4e8
    unet = UNetConfig(base_channels=8, attention_resolutions=[])
    stable = ScheduleConfig(kind="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for schedule_config, student_prediction in ((ScheduleConfig(), "v"), (stable, "eps")):
        config = ModelConfig(prediction="eps", unet=unet, schedule=schedule_config)
        teacher = str(tmp_path / schedule_config.kind)
        save_checkpoint(teacher, build_network(config), config)
        for method in ("guided", "progressive"):
            job = load(TrainJob, None, [f"teacher.checkpoint={teacher}", f"method={method}",
                                        "guidance.w_max=0.0", "optim.warmup_steps=0"])
            plan = prepare(job)
            assert plan.student_config.prediction == student_prediction \
                == student_config(job, plan.teacher).prediction
            if student_prediction == "v":
                with pytest.raises(ConfigError, match="^student.prediction: an eps-prediction "
                                                      "student cannot be distilled on a cosine"):
                    prepare(dataclasses.replace(job, student=config))
        teacher_weights = plan.teacher.network.state_dict()
        student = build_student(plan.student_config, plan.teacher, seed=0).state_dict()
        copied = all(torch.equal(student[k], teacher_weights[k]) for k in teacher_weights)
        assert starts_from_teacher(plan.student_config, plan.teacher) == copied \
            == (student_prediction == "eps")


def test_gradient_accumulation_and_ema(single_process_group, tmp_path):
    """grad_accum micro-batches make one optimizer step; the saved student is the EMA of the
    weights (decay 0.5 here, so it trails the last update visibly)."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=6", "deepspeed.grad_accum=2",
                                    "optim.ema_decay=0.5", "checkpoint_every=6"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    calls, loss = [0], setup.method.loss

    def counting_loss(batch, phase):
        calls[0] += 1
        assert len(batch["data"]["x"]) == 32                # 64 = 2 micro-batches of 32
        return loss(batch, phase)

    setup.method.loss = counting_loss
    final = {}

    def report(metrics, directory):
        if directory:
            final["student"] = load_file(os.path.join(directory, "student", "model.safetensors"))

    run_worker(job, setup.method, setup.streams, WorkerContext(0, 1, setup.device, report),
               plan.student_config, setup.teacher)
    assert calls[0] == 12
    raw = setup.method.student.network.state_dict()
    assert final["student"].keys() == raw.keys()
    differs = [name for name, value in raw.items()
               if not torch.equal(final["student"][name], value.float())]
    assert differs, "the saved student should be the EMA, not the raw weights"


def saved_student(job: TrainJob, plan, setup) -> dict:
    """Train a worker set up in-process to the end; the weights of the student it saves."""
    saved = {}

    def report(metrics, directory):
        if directory:
            saved.update(load_file(os.path.join(directory, "student", "model.safetensors")))

    run_worker(job, setup.method, setup.streams, WorkerContext(0, 1, setup.device, report),
               plan.student_config, setup.teacher)
    return saved


def test_the_saved_student_leaves_its_starting_weights(single_process_group):
    """The EMA starts at the weights the student starts from (a teacher's, in most methods) and is
    warmed up (decay min(0.999, (1 + k) / (10 + k)) at update k), so after 40 steps the saved
    student is within a quarter of the raw weights' distance travelled from there. A fixed 0.999
    would leave 0.999^40 = 96% of the start in it (Salimans & Ho distil without an EMA)."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=40", "optim.ema_decay=0.999",
                                    "checkpoint_every=40"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    start = {name: value.clone() for name, value in setup.method.student.network.state_dict().items()}
    saved = saved_student(job, plan, setup)
    raw = setup.method.student.network.state_dict()

    def distance(a, b):
        return math.sqrt(sum(float((a[name].float() - b[name].float()).square().sum())
                             for name in raw))

    travelled = distance(raw, start)
    assert travelled > 0.1
    assert distance(saved, raw) <= 0.25 * travelled


@pytest.mark.parametrize("overrides, per_sample", [
    (["optim.steps=6"], [2] * 6),                  # one CFG call, both branches: 2 per sample
    (["method=progressive", "halving.start_steps=4", "halving.end_steps=1",
      "halving.steps_per_round=2", "guidance.w_max=0.0", "optim.warmup_steps=0"],
     [4] * 2 + [2] * 2),            # two DDIM steps of the CFG teacher, then of a w-student
])
def test_teacher_evaluations_are_counted(single_process_group, overrides, per_sample):
    """The loop reports the samples the frozen teacher evaluated, counted at its network (the
    progressive rounds' frozen students included), as a running total."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "log_every=1", *overrides])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    counts = []
    run_worker(job, setup.method, setup.streams,
               WorkerContext(0, 1, setup.device, lambda m, d: None,
                             logged=lambda m: counts.append(m["teacher_evaluations"])),
               plan.student_config, setup.teacher)
    batch = job.optim.batch_size
    assert counts == list(itertools.accumulate(n * batch for n in per_sample))


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (2, "bf16")])
def test_a_restored_run_continues_exactly(single_process_group, tmp_path, stage, precision):
    """Restored from its step-4 checkpoint, a run reports the same losses at steps 5-8, and saves
    the same student (the EMA), as the run that never stopped: the engines, the EMA, the data
    position and the method's draws all continue where they were. A checkpoint without its
    DeepSpeed state stops the worker instead of training fresh weights."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=8", "optim.ema_decay=0.5",
                                    "checkpoint_every=4", "log_every=1",
                                    f"deepspeed.zero_stage={stage}",
                                    f"deepspeed.precision={precision}"])
    plan = prepare(job)
    run = run_and_resume(job, plan, str(tmp_path), at=4, losses=lambda m: m["loss"])
    assert run.resumed_losses == {step: run.losses[step] for step in (5, 6, 7, 8)}
    final = load_file(os.path.join(run.checkpoints[8], "student", "model.safetensors"))
    student = load_file(os.path.join(run.resumed, "student", "model.safetensors"))
    assert all(torch.equal(student[name], value) for name, value in final.items())
    shutil.rmtree(os.path.join(run.checkpoints[4], "engines"))
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint for module student"):
        train_in_process(job, plan, lambda m, d: None, run.checkpoints[4])


def test_a_run_stopped_at_until_exports_its_student_and_continues_exactly(single_process_group,
                                                                       tmp_path):
    """`until: 3` stops an 8-step run after step 3 with a checkpoint holding the student of that
    step (what a tuning trial scores at each rung); resumed from it with `until: 0`, the run logs
    the same losses at steps 4-8 and ends with the same student as a run that never stopped (the
    learning-rate schedule spans all 8 steps either way)."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=8", "optim.ema_decay=0.9",
                                    "checkpoint_every=8", "log_every=1"])
    plan = prepare(job)
    whole, stopped, continued = {}, {}, {}
    ends = {}

    def keep(name):
        def report(metrics, directory):
            ends[name] = str(tmp_path / name)
            shutil.copytree(directory, ends[name], dirs_exist_ok=True)
        return report

    train_in_process(job, plan, keep("whole"), logged=lambda m: whole.update({m["step"]: m["loss"]}))
    train_in_process(dataclasses.replace(job, until=3), plan, keep("stopped"),
                     logged=lambda m: stopped.update({m["step"]: m["loss"]}))
    assert sorted(stopped) == [1, 2, 3] and all(stopped[s] == whole[s] for s in stopped)
    student = json.load(open(os.path.join(ends["stopped"], "student", "config.json")))
    assert student["extra"]["train_steps"] == 3
    train_in_process(job, plan, keep("continued"), ends["stopped"],
                     logged=lambda m: continued.update({m["step"]: m["loss"]}))
    assert continued == {step: whole[step] for step in range(4, 9)}
    final = load_file(os.path.join(ends["whole"], "student", "model.safetensors"))
    again = load_file(os.path.join(ends["continued"], "student", "model.safetensors"))
    assert all(torch.equal(again[name], value) for name, value in final.items())


@pytest.mark.parametrize("stage", [0, 2])
def test_the_ema_under_bf16_follows_the_fp32_master(single_process_group, tmp_path, stage):
    """Saved students come from the fp32 master weights; so does their EMA (decay 1e-6 here, so it
    equals the last master to 1e-6), not from the bf16 module weights that round them."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=4", "optim.ema_decay=1e-6",
                                    "checkpoint_every=4", f"deepspeed.zero_stage={stage}",
                                    "deepspeed.precision=bf16"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    final = saved_student(job, plan, setup)
    rounding = 0.0
    for name, param in setup.method.student.network.named_parameters():
        master = fp32_master(param).detach().float().reshape(param.shape)
        torch.testing.assert_close(final[name], master, rtol=1e-5, atol=1e-7)
        rounding = max(rounding, float((param.detach().float() - master).abs().max()))
    assert rounding > 1e-4, "bf16 rounding too small to tell the master from the module weights"


def test_resume_compares_the_job_with_absolute_paths(tmp_path, monkeypatch):
    """A config with relative paths resumes from any working directory; a changed key that defines
    the training is refused by name, logging and checkpoint cadence may change."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/teacher")
    os.makedirs("data")
    open("data/x.npz", "wb").close()
    job = load(TrainJob, None, ["teacher.checkpoint=runs/teacher", "data.source=npz",
                                "data.path=data/x.npz"])
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "train.yaml"), "w") as f:
        yaml.safe_dump(to_dict(with_absolute_paths(job)), f)
    check_resumable(with_absolute_paths(dataclasses.replace(job, log_every=5)), out)
    changed = dataclasses.replace(job, optim=dataclasses.replace(job.optim, lr=0.5))
    with pytest.raises(ConfigError, match=r"^optim.lr: is 0.5, but the run in .* was started"):
        check_resumable(with_absolute_paths(changed), out)


@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (0, "bf16"), (2, "bf16")])
def test_progressive_round_restarts_the_student_from_its_ema_teacher(single_process_group, stage,
                                                                     precision):
    """With an EMA, round k+1's frozen teacher is round k's EMA, and its student starts from those
    same weights (also in the optimizer's fp32 master copy), not from the live ones. Under bf16
    the teacher's weights come from the fp32 master copy, not the bf16 module."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "method=progressive", "halving.start_steps=4",
                                    "halving.end_steps=1", "halving.steps_per_round=3",
                                    "guidance.w_max=0.0", "optim.warmup_steps=0",
                                    "optim.ema_decay=0.5", "checkpoint_every=6", "log_every=3",
                                    f"deepspeed.zero_stage={stage}",
                                    f"deepspeed.precision={precision}"])
    plan = prepare(job)
    setup = setup_worker(job, plan.student_config, 0, 1)
    method, seen = setup.method, {}
    start_round, loss = method.start_round, method.loss

    def spying_start(index, weights):
        if index == 1:
            seen["teacher"] = {n: v.clone() for n, v in weights["student"].items()}
            seen["live"] = {n: p.detach().clone()
                            for n, p in method.student.network.named_parameters()}
        start_round(index, weights)

    def spying_loss(batch, phase):
        if method.round == 1 and "student" not in seen:
            params = dict(method.student.network.named_parameters())
            seen["student"] = {n: p.detach().clone() for n, p in params.items()}
            seen["master"] = {n: fp32_master(p).clone() for n, p in params.items()}
        return loss(batch, phase)

    method.start_round, method.loss = spying_start, spying_loss
    run_worker(job, method, setup.streams, WorkerContext(0, 1, setup.device, lambda m, d: None),
               plan.student_config, setup.teacher)
    assert any(not torch.equal(seen["live"][n], v) for n, v in seen["teacher"].items())
    for name, value in seen["teacher"].items():
        live = seen["student"][name]                 # the module's own weights: bf16 under bf16
        torch.testing.assert_close(live, value.to(live.dtype), rtol=0, atol=0)
        torch.testing.assert_close(seen["master"][name].cpu(), value, rtol=0, atol=0)
    if precision == "bf16":
        assert any(not torch.equal(v, v.bfloat16().float()) for v in seen["teacher"].values())


def test_progressive_resume_rebuilds_the_rounds_teacher(single_process_group, tmp_path):
    """Checkpoints carry the weights a round started from only from the second round on; a run
    resumed inside that round rebuilds its frozen teacher from them."""
    job = load(TrainJob, ANALYTIC, ["workers.num=1", "method=progressive", "halving.start_steps=8",
                                    "halving.end_steps=2", "halving.steps_per_round=4",
                                    "guidance.w_max=0.0", "optim.warmup_steps=0",
                                    "checkpoint_every=2", "log_every=2"])
    plan = prepare(job)
    kept = {}

    def keep(metrics, directory):
        if directory:
            kept[metrics["step"]] = str(tmp_path / f"step{metrics['step']}")
            shutil.copytree(directory, kept[metrics["step"]])

    def run(report, restored=None):
        setup = setup_worker(job, plan.student_config, 0, 1)
        started = []
        start_round = setup.method.start_round
        setup.method.start_round = lambda i, w: (started.append((i, w)), start_round(i, w))
        run_worker(job, setup.method, setup.streams,
                   WorkerContext(0, 1, setup.device, report, restored), plan.student_config,
                   setup.teacher)
        return started

    run(keep)
    has_weights = {step: os.path.isfile(os.path.join(d, "round_weights.safetensors"))
                   for step, d in kept.items()}
    assert has_weights == {2: False, 4: False, 6: True, 8: True}
    started = run(lambda m, d: None, kept[6])
    assert started[0][0] == 1
    saved = load_file(os.path.join(kept[6], "round_weights.safetensors"))
    for name, value in started[0][1]["student"].items():
        torch.testing.assert_close(value, saved[f"student/{name}"], rtol=0, atol=0)


def test_a_stochastic_sampler_teacher_needs_stochastic_rounds(tmp_path):
    """A teacher distilled for Meng's stochastic sampler makes its round-1 targets with its own 1/N
    jumps; a deterministic round from it is refused up front."""
    from raydistill.config import MLPConfig
    from raydistill.models import build_network, load_checkpoint, save_checkpoint
    from raydistill.train.build import build_method

    config = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(dim=16, shape=[1, 4, 4],
                                                                   num_classes=4, w_embedding=True))
    teacher = str(tmp_path / "teacher")
    save_checkpoint(teacher, build_network(config), config,
                    extra={"method": "progressive", "steps": 8, "stochastic": True, "w_min": 0.0,
                           "w_max": 2.0})
    args = [f"teacher.checkpoint={teacher}", "method=progressive", "halving.start_steps=8",
            "halving.end_steps=4", "halving.steps_per_round=10", "optim.warmup_steps=0",
            "guidance.w_max=2.0", "data.source=mixture"]
    with pytest.raises(ConfigError, match="^halving.stochastic: is false, but the teacher is a"):
        prepare(load(TrainJob, None, args))
    job = load(TrainJob, None, [*args, "halving.stochastic=true"])
    checkpoint = load_checkpoint(teacher)
    method = build_method(job, checkpoint, config, torch.device("cpu"))
    method.start_round(0, {})
    assert method.teacher_is_stochastic


def test_the_step_bar_shows_the_last_step_posted(ray_local, capsys):
    """Rank 0 posts without waiting; the driver's bar ends at the last step posted, even one
    posted after its last poll."""
    from raydistill.train.progress import StepBar

    with StepBar("train guided") as bar:
        for step in (10, 20):
            StepBar.put(bar.channel, {"step": step, "total": 40, "start": 0, "round": "4-steps",
                                      "loss": 0.5, "samples_per_s": 100.0, "data_wait": 0.01})
    err = capsys.readouterr().err
    assert "train guided" in err and "20/40" in err and "loss 0.5" in err


#: DMD with its GAN head into a small UNet generator of an 8x8 analytic mixture (the fake score a
#: copy of the generator, so both trained networks are UNets, one inside FakeScore), with dropout
UNET_DMD = ["teacher.analytic.dim=64", "teacher.analytic.shape=[1,8,8]", "student.kind=unet",
            "student.unet={in_channels: 1, resolution: 8, base_channels: 8, channel_mult: [1, 2],"
            " num_res_blocks: 1, attention_resolutions: [4], dropout: 0.1, num_classes: 3}",
            "dmd.gan_weight=0.01", "dmd.gan_head_weight=0.01", "dmd.gan_head=conv",
            "workers.num=1", "optim.steps=3", "optim.batch_size=8"]


@pytest.mark.parametrize("stage", [2, 3])
def test_activation_checkpointing_leaves_the_losses_as_they_were(single_process_group, stage):
    """With memory.activation_checkpointing the generator and the fake score recompute their
    blocks' activations in the backward pass; every logged loss, and the trained weights, are those
    of the run that held them (dropout draws the same masks again), under ZeRO-2 and ZeRO-3."""
    runs = []
    for lever in (False, True):
        torch.manual_seed(0)                   # dropout draws from torch's global generator
        job = load(TrainJob, ANALYTIC_DMD, [*UNET_DMD, f"deepspeed.zero_stage={stage}",
                                            f"memory.activation_checkpointing={lever}"])
        plan = prepare(job)
        setup = setup_worker(job, plan.student_config, 0, 1)
        unets = [m for m in setup.method.fake_score.network.modules() if hasattr(m, "down")]
        assert [u.checkpoint_activations for u in unets] == [lever]
        losses = []
        run_worker(job, setup.method, setup.streams,
                   WorkerContext(0, 1, setup.device, lambda m, d: None,
                                 logged=lambda m, losses=losses: losses.append(
                                     {k: v for k, v in m.items() if "loss" in k})),
                   plan.student_config, setup.teacher)
        runs.append((losses, setup.method.modules()))
    (held, held_nets), (recomputed, recomputed_nets) = runs
    assert len(held) == 3 and held == recomputed
    for name, network in held_nets.items():
        for (key, a), b in zip(network.state_dict().items(),
                               recomputed_nets[name].state_dict().values(), strict=True):
            assert torch.equal(a, b), f"{name}.{key}"



def test_optimizer_offload_trains_as_the_optimizer_on_the_device_does(single_process_group):
    """memory.offload_optimizer keeps ZeRO's fp32 partition and the moments in host memory and
    steps DeepSpeed's CPU AdamW there: a ZeRO-2 run's losses follow those of the run with torch's
    AdamW (the same update, another kernel)."""
    runs = []
    for lever in (False, True):
        job = load(TrainJob, ANALYTIC, ["workers.num=1", "optim.steps=8", "log_every=1",
                                        "optim.weight_decay=0.5",
                                        "deepspeed.zero_stage=2",
                                        f"memory.offload_optimizer={lever}"])
        plan = prepare(job)
        setup = setup_worker(job, plan.student_config, 0, 1)
        losses = []
        run_worker(job, setup.method, setup.streams,
                   WorkerContext(0, 1, setup.device, lambda m, d: None,
                                 logged=lambda m, losses=losses: losses.append(m["loss"])),
                   plan.student_config, setup.teacher)
        runs.append((losses, setup.method.student.engine))
    (held, engine), (offloaded, offloading) = runs
    assert offloading.zero_cpu_offload() and not engine.zero_cpu_offload()
    assert type(offloading.optimizer.optimizer).__name__ == "DeepSpeedCPUAdam"
    assert len(held) == 8 and held[-1] < held[0]
    torch.testing.assert_close(offloaded, held, rtol=1e-4, atol=0.0)
