"""DMD and KD in the training loop: two engines resume exactly (generator, fake score, both data
streams), and a killed worker costs nothing; the method math on the analytic mixture is in
test_dmd_oracle.py."""

import os
import shutil

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from raydistill.config import TrainJob, load
from raydistill.train.build import prepare
from raydistill.train.driver import setup_worker
from raydistill.train.loop import WorkerContext, run_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANALYTIC_DMD = f"{ROOT}/configs/tests/analytic_dmd.yaml"


def test_a_restored_dmd_run_continues_exactly(single_process_group, tmp_path):
    """Restored from its step-4 checkpoint, a DMD run (ZeRO-2, two fake-score updates per step, the
    GAN head reading real data) logs the same losses of both phases at steps 5-8 and ends with the
    same generator and fake score as the run that never stopped."""
    job = load(TrainJob, ANALYTIC_DMD, ["workers.num=1", "optim.steps=8", "checkpoint_every=4",
                                        "dmd.gan_weight=0.05", "dmd.gan_head_weight=0.1"])
    plan = prepare(job)
    kept = {}

    def log(metrics):
        kept.setdefault("losses", {})[metrics["step"]] = {
            k: v for k, v in metrics.items() if "loss" in k}

    def keep(metrics, directory):
        kept[metrics["step"]] = str(tmp_path / f"step{metrics['step']}")
        shutil.copytree(directory, kept[metrics["step"]], dirs_exist_ok=True)

    def run(report, restored=None):
        setup = setup_worker(job, plan.student_config, 0, 1)
        assert sorted(setup.streams) == ["data"]
        run_worker(job, setup.method, setup.streams,
                   WorkerContext(0, 1, setup.device, report, restored, logged=log),
                   plan.student_config, setup.teacher.fingerprint)

    def fake_score(directory):
        return get_fp32_state_dict_from_zero_checkpoint(
            os.path.join(directory, "engines", "fake_score"), tag="state")

    run(keep)
    uninterrupted = kept["losses"]
    assert {"generator/loss_dm", "generator/loss_gan", "fake_score/loss_head"} <= set(
        uninterrupted[8])
    generator = load_file(os.path.join(kept[8], "student", "model.safetensors"))
    fake = fake_score(kept[8])
    resumed = str(tmp_path / "resumed")
    kept.clear()
    run(lambda m, d: d and shutil.copytree(d, resumed, dirs_exist_ok=True), str(tmp_path / "step4"))
    assert kept["losses"] == {step: uninterrupted[step] for step in (5, 6, 7, 8)}
    again = load_file(os.path.join(resumed, "student", "model.safetensors"))
    assert all(torch.equal(again[name], value) for name, value in generator.items())
    again = fake_score(resumed)
    assert again.keys() == fake.keys() and any(name.startswith("head.") for name in fake)
    assert all(torch.equal(again[name], value) for name, value in fake.items())
