"""Evaluation: FID / KID through torchmetrics in a pluggable feature space, exact distances on the
analytic teacher, and `raydistill eval` drawing its sample sets on the pairs actor pool."""

import dataclasses
import json
import os

import pytest
import ray
import torch

from raydistill.cli import main
from raydistill.config import (
    ConfigError,
    DataConfig,
    EvalJob,
    EvalStudent,
    FeaturesConfig,
    MixtureConfig,
    TeacherRef,
    load,
)
from raydistill.data import load_images
from raydistill.eval.distances import class_moments, exact_distances, fid_kid
from raydistill.eval.evaluate import plan_rows
from raydistill.eval.features import load_features
from raydistill.models.gmm import GaussianMixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval") / "classifier")
    assert main(["classifier", "--config", f"{CONFIGS}/smoke/classifier.yaml", "--out", out,
                 "--quiet"]) == 0
    return out


def test_fid_of_a_set_against_itself_is_zero_and_rises_with_noise(classifier):
    """Classifier features of the digits: FID(real, real) ~ 0, and FID and KID rise
    monotonically as Gaussian noise of growing strength is added to the real images."""
    features = load_features(FeaturesConfig(path=classifier))
    split = load_images(DataConfig(resolution=16))
    images = torch.cat([split.train.images, split.test.images])
    real = features(images)
    assert abs(fid_kid(real, real)["fid"]) < 1e-6
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    scores = [fid_kid(real, features((images + level * noise).clamp(-1, 1)))
              for level in (0.05, 0.1, 0.2, 0.4, 0.8)]
    print("\nFID / KID with noise 0.05 .. 0.8:",
          [f"{s['fid']:.2f} / {s['kid']:.4f}" for s in scores])
    fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
    assert fids == sorted(fids) and kids == sorted(kids) and fids[0] > 0


def test_exact_distances_vanish_on_exact_draws_and_see_a_shift():
    mixture = GaussianMixture.random(num_classes=3, components_per_class=2, dim=4, seed=1)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (6000,), generator=g)
    x = mixture.sample(labels, generator=g)
    mean, cov = class_moments(mixture, 1)
    ones = x[labels == 1]
    torch.testing.assert_close(ones.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(ones.T), cov, atol=0.05, rtol=0)
    exact, shifted = exact_distances(x, labels, mixture), exact_distances(x + 0.2, labels, mixture)
    assert exact["frechet"] < 0.01 and shifted["frechet"] > 0.1      # 4 dims x 0.2^2 = 0.16
    assert exact["sliced_w2"] < 0.06 and shifted["sliced_w2"] > 0.15


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_eval_ranks_samplers_by_exact_distance_on_the_analytic_teacher(local_ray, tmp_path,
                                                                       capsys):
    """1-step DDIM lands far from p(x | c), 64 steps close: the exact view of the eval table. A
    re-run reuses the sample sets and gives the same numbers."""
    config = tmp_path / "eval.yaml"
    config.write_text(
        "teacher: {analytic: {num_classes: 3, components_per_class: 2, dim: 4, seed: 1}}\n"
        "teacher_steps: 64\nbaseline_steps: [1, 4]\nbaseline_solvers: [ddim]\nw: 0\n"
        "num_samples: 1500\nsamples_per_shard: 500\n")
    out = str(tmp_path / "eval")
    assert main(["eval", "--config", str(config), "--out", out, "--quiet"]) == 0
    report = json.load(open(os.path.join(out, "eval.json")))
    rows = {(row["name"], row["steps"]): row for row in report["rows"]}
    print("\n" + capsys.readouterr().out)
    full, one, four = rows["teacher", 64], rows["ddim", 1], rows["ddim", 4]
    assert full["nfe"] == 128 and one["nfe"] == 2 and four["nfe"] == 8      # CFG: two per step
    assert full["samples"] == one["samples"] == 1500
    assert full["frechet"] < 0.5 * one["frechet"] and full["sliced_w2"] < 0.5 * one["sliced_w2"]
    assert four["frechet"] < one["frechet"]
    assert main(["eval", "--config", str(config), "--out", out, "--quiet"]) == 0
    again = json.load(open(os.path.join(out, "eval.json")))
    assert [r["frechet"] for r in again["rows"]] == [r["frechet"] for r in report["rows"]]


class TinyDetector(torch.nn.Module):
    """Stands in for the TorchScript Inception-v3 detector: uint8 [N, 3, H, W] -> features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        pooled = x.float().mean(dim=(2, 3))
        return torch.cat([pooled, pooled.pow(2)], dim=1) if return_features else pooled


def test_inception_features_load_a_local_torchscript_detector(tmp_path):
    path = str(tmp_path / "inception.pt")
    torch.jit.script(TinyDetector()).save(path)
    features = load_features(FeaturesConfig(kind="inception", path=path, batch_size=3))
    images = torch.linspace(-1, 1, 7)[:, None, None, None].expand(7, 1, 4, 4)
    got = features(images)
    level = ((images[:, 0, 0, 0] + 1) * 127.5).round()
    assert got.shape == (7, 6) and got.dtype == torch.float64
    torch.testing.assert_close(got[:, 0], level.double())
    assert features.identity.startswith("inception:")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(Exception, match="features.path: .*junk.pt is not a TorchScript"):
        load_features(FeaturesConfig(kind="inception", path=str(tmp_path / "junk.pt")))


def test_eval_scores_image_samplers_with_cached_reference_features(local_ray, classifier,
                                                                   tmp_path):
    out = tmp_path / "run"
    teacher = str(out / "teacher")
    assert main(["teacher", "--config", f"{CONFIGS}/smoke/teacher.yaml", "--out", teacher,
                 "--quiet"]) == 0
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"teacher: {{checkpoint: {teacher}}}\nteacher_steps: 16\nbaseline_steps: [1]\n"
        f"baseline_solvers: [ddim, dpmpp_2m]\nw: 1\nnum_samples: 400\nsamples_per_shard: 200\n"
        f"data: {{resolution: 16}}\nfeatures: {{path: {classifier}}}\nfloor: true\n")
    assert main(["eval", "--config", str(config), "--out", str(out / "eval"), "--quiet"]) == 0
    report = json.load(open(out / "eval" / "eval.json"))
    rows = {(row["name"], row["steps"]): row for row in report["rows"]}
    assert report["reference_images"] == 1797 and report["metric"].startswith("classifier:")
    assert all(torch.isfinite(torch.tensor([r["fid"], r["kid"]])).all() for r in rows.values())
    assert rows["teacher", 16]["fid"] < rows["ddim", 1]["fid"]
    assert rows["teacher", 16]["fid_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert 0 < rows["dpmpp_2m", 1]["fid_to_teacher"] and 0 < rows["ddim", 1]["fid_to_teacher"]
    # the floor: the teacher's own sampler at seed + 1, so its samples share no noise with the
    # teacher's row and its FID to them is the finite-sample floor, far above the same draw's 0
    floor = rows["floor", 16]
    assert floor["sample_set"] == "floor-ddim-16" and floor["nfe"] == rows["teacher", 16]["nfe"]
    drawn = {name: json.load(open(out / "eval" / "samples" / f"{name}-ddim-16" / "pairs.json"))
             for name in ("teacher", "floor")}
    assert (drawn["teacher"]["identity"]["seed"], drawn["floor"]["identity"]["seed"]) == (0, 1)
    assert floor["fid_to_teacher"] > 1e-3
    assert floor["fid"] == pytest.approx(rows["teacher", 16]["fid"], rel=0.5)
    cached = os.listdir(out / "eval" / "reference")
    assert len(cached) == 1 and cached[0].endswith(".pt")


def test_the_guidance_sweep_scores_the_teacher_ddim_and_w_students_at_each_w(local_ray, tmp_path):
    """w_sweep: at each further w, the teacher, plain DDIM at sweep_steps and every w-conditioned
    student distilled for that w get a row (their own sample sets, drawn at that w); a student
    outside its range and one with w built in get none."""
    from raydistill.config import MLPConfig, ModelConfig
    from raydistill.models import build_network, save_checkpoint

    config = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(
        dim=4, width=32, depth=2, num_classes=3, w_embedding=True))
    guided = build_network(config)
    with torch.no_grad():                        # its w input starts at zero: let w matter
        for name, p in guided.named_parameters():
            if name.startswith(guided.W_INPUTS):
                p.normal_(std=0.5)
    save_checkpoint(str(tmp_path / "guided"), guided, config,
                    extra={"method": "guided", "w_min": 0.0, "w_max": 2.0})
    fixed = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(dim=4, width=32, depth=2,
                                                                  num_classes=3))
    save_checkpoint(str(tmp_path / "kd"), build_network(fixed), fixed,
                    extra={"method": "kd", "steps": 1, "stochastic": True, "sampler": "renoise",
                           "w_min": 1.0, "w_max": 1.0})
    job = tmp_path / "eval.yaml"
    job.write_text(
        "teacher: {analytic: {num_classes: 3, components_per_class: 2, dim: 4, seed: 1}}\n"
        "teacher_steps: 8\nbaseline_steps: [1]\nbaseline_solvers: [ddim]\nw: 1\n"
        "w_sweep: [0, 3]\nsweep_steps: 4\nnum_samples: 200\nsamples_per_shard: 200\n"
        f"students: [{{name: guided, checkpoint: {tmp_path / 'guided'}, steps: [8]}},\n"
        f"           {{name: kd, checkpoint: {tmp_path / 'kd'}}}]\n")
    out = tmp_path / "eval"
    assert main(["eval", "--config", str(job), "--out", str(out), "--quiet"]) == 0
    rows = json.load(open(out / "eval.json"))["rows"]
    assert [(r["name"], r["steps"], r["w"], r.get("sweep", False)) for r in rows] == [
        ("teacher", 8, 1.0, False), ("ddim", 1, 1.0, False), ("guided", 8, 1.0, False),
        ("kd", 1, 1.0, False), ("teacher", 8, 0.0, True), ("ddim", 4, 0.0, True),
        ("guided", 8, 0.0, True), ("teacher", 8, 3.0, True), ("ddim", 4, 3.0, True)]
    assert len({r["sample_set"] for r in rows}) == len(rows)
    pairs = json.load(open(out / "samples" / "guided-ddim-8-w0" / "pairs.json"))
    assert pairs["identity"]["guidance"] == {"w_min": 0.0, "w_max": 0.0}
    assert rows[6]["frechet"] != rows[2]["frechet"]
    # scoring the students alone (a tuning trial's score) keeps their sweep rows and only theirs
    alone = dataclasses.replace(load(EvalJob, str(job)), students_only=True)
    assert [(r.name, r.w, r.sweep) for r in plan_rows(alone)] == [
        ("guided", 1.0, False), ("kd", 1.0, False), ("guided", 0.0, True)]


def test_the_floor_follows_the_teacher_at_each_w_and_needs_an_image_teachers_rows(tmp_path):
    """With `floor`, each w's teacher row is followed by the teacher drawn again at a second seed;
    it is refused where there are no teacher rows, or where exact distances replace FID."""
    job = EvalJob(teacher=TeacherRef(checkpoint=str(tmp_path / "teacher")), teacher_steps=8,
                  baseline_steps=[1], baseline_solvers=["ddim"], w_sweep=[0.0], floor=True,
                  features=FeaturesConfig(path=str(tmp_path / "classifier")))
    job.validate()
    assert [(r.name, r.steps, r.w, r.sweep) for r in plan_rows(job)] == [
        ("teacher", 8, 1.0, False), ("floor", 8, 1.0, False), ("ddim", 1, 1.0, False),
        ("teacher", 8, 0.0, True), ("floor", 8, 0.0, True), ("ddim", 16, 0.0, True)]
    with pytest.raises(ConfigError, match="floor: needs the teacher's rows"):
        dataclasses.replace(job, students_only=True, students=[
            EvalStudent(name="kd", checkpoint=str(tmp_path / "kd"))]).validate()
    with pytest.raises(ConfigError, match="floor: is for an image teacher"):
        dataclasses.replace(job, teacher=TeacherRef(analytic=MixtureConfig())).validate()
    os.makedirs(tmp_path / "kd")
    with pytest.raises(ConfigError, match="students: names a student floor, the name of the "
                                          "evaluation's own row"):
        dataclasses.replace(job, students=[EvalStudent(name="floor",
                                                       checkpoint=str(tmp_path / "kd"))]).validate()


def test_a_re_run_after_a_student_changed_replaces_its_sample_set_only(local_ray, tmp_path,
                                                                       capsys):
    """The sample sets under eval/samples are eval's own cache: a student retrained at the same
    path gets its row drawn again (the log says why), and the rows whose model did not change
    reuse theirs."""
    from raydistill.config import MLPConfig, ModelConfig
    from raydistill.models import build_network, save_checkpoint

    config = ModelConfig(kind="mlp", prediction="v", mlp=MLPConfig(dim=4, width=32, depth=2,
                                                                   num_classes=3))
    student = str(tmp_path / "kd")

    def save_student(seed):
        torch.manual_seed(seed)
        save_checkpoint(student, build_network(config), config,
                        extra={"method": "kd", "steps": 1, "stochastic": True,
                               "sampler": "renoise", "w_min": 1.0, "w_max": 1.0})

    job = tmp_path / "eval.yaml"
    job.write_text(
        "teacher: {analytic: {num_classes: 3, components_per_class: 2, dim: 4, seed: 1}}\n"
        "teacher_steps: 8\nbaseline_steps: [1]\nbaseline_solvers: [ddim]\nw: 1\n"
        f"num_samples: 200\nsamples_per_shard: 200\nstudents: [{{name: kd, checkpoint: {student}}}]\n")
    out = tmp_path / "eval"
    save_student(0)
    assert main(["eval", "--config", str(job), "--out", str(out), "--quiet"]) == 0
    first = {r["name"]: r for r in json.load(open(out / "eval.json"))["rows"]}
    drawn = {name: os.path.getmtime(out / "samples" / r["sample_set"] / "manifest.parquet")
             for name, r in first.items()}
    save_student(1)
    capsys.readouterr()
    assert main(["eval", "--config", str(job), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    again = {r["name"]: r for r in json.load(open(out / "eval.json"))["rows"]}
    assert again["kd"]["fingerprint"] != first["kd"]["fingerprint"]
    assert again["kd"]["frechet"] != first["kd"]["frechet"]
    assert (f"eval: kd-renoise-1: its sample set was drawn with teacher_fingerprint="
            f"'{first['kd']['fingerprint']}'; drawing it again") in printed
    for name in ("teacher", "ddim"):
        assert again[name]["frechet"] == first[name]["frechet"]
        assert os.path.getmtime(out / "samples" / first[name]["sample_set"] /
                                "manifest.parquet") == drawn[name]
