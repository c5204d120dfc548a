"""DMD and KD in the training loop: two engines resume exactly (generator, fake score, both data
streams), and a killed worker costs nothing; the method math on the analytic mixture is in
test_dmd_oracle.py."""

import os

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from resume_harness import run_and_resume
from safetensors.torch import load_file

from raydistill.config import TrainJob, load
from raydistill.train.build import prepare
from raydistill.train.driver import setup_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"


def test_a_restored_dmd_run_continues_exactly(single_process_group, tmp_path):
    """Restored from its step-4 checkpoint, a DMD run (ZeRO-2, two fake-score updates per step, the
    GAN head reading real data) logs the same losses of both phases at steps 5-8 and ends with the
    same generator and fake score as the run that never stopped."""
    job = load(TrainJob, ANALYTIC_DMD, ["workers.num=1", "optim.steps=8", "checkpoint_every=4",
                                        "dmd.gan_weight=0.05", "dmd.gan_head_weight=0.1"])
    plan = prepare(job)
    assert sorted(setup_worker(job, plan.student_config, 0, 1).streams) == ["data"]

    def fake_score(directory):
        return get_fp32_state_dict_from_zero_checkpoint(
            os.path.join(directory, "engines", "fake_score"), tag="state")

    run = run_and_resume(job, plan, str(tmp_path), at=4,
                         losses=lambda m: {k: v for k, v in m.items() if "loss" in k})
    assert {"generator/loss_dm", "generator/loss_gan", "fake_score/loss_head"} <= set(
        run.losses[8])
    assert run.resumed_losses == {step: run.losses[step] for step in (5, 6, 7, 8)}
    generator = load_file(os.path.join(run.checkpoints[8], "student", "model.safetensors"))
    again = load_file(os.path.join(run.resumed, "student", "model.safetensors"))
    assert all(torch.equal(again[name], value) for name, value in generator.items())
    fake, again = fake_score(run.checkpoints[8]), fake_score(run.resumed)
    assert again.keys() == fake.keys() and any(name.startswith("head.") for name in fake)
    assert all(torch.equal(again[name], value) for name, value in fake.items())
