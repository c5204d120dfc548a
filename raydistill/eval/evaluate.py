"""`raydistill eval`: every sampler scored the same way, at one w and the same seeds.

Rows: the teacher at its full step count, plain DDIM and DPM-Solver++(2M) (`baseline_solvers`) on
the teacher at `baseline_steps`, and each student as it was distilled; with `floor`, the teacher
again at a second seed (FLOOR_ROW). A row's samples are an `ode`
pair set drawn on the pairs actor pool (raydistill.pairs.pool: elastic, exactly-once, resumable)
under DIR/samples/ROW with the job's seed, so every row sees the same noise and classes, and a
re-run reuses the sample sets it already has. Each row is then scored against the reference
images (FID / KID, reference features cached by extractor and data set) and against the teacher's
own samples (`fid_to_teacher`: how faithfully a fast sampler reproduces the teacher, which FID
against the data cannot tell apart from a change of guidance strength), or, for an analytic
teacher, by exact distances to p(x | c).

NFE counts the network evaluations per sample: the solver's calls (counted by running it on a stub
denoiser), doubled for a model guided by CFG (conditional and unconditional branches).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from raydistill.config import (
    FLOOR_ROW,
    ConfigError,
    EvalJob,
    GuidanceRange,
    PairsJob,
    SolverConfig,
    TeacherRef,
)
from raydistill.data import load_images
from raydistill.diffusion.guidance import CFG
from raydistill.diffusion.solvers import sample
from raydistill.eval.distances import exact_distances, fid, fid_kid
from raydistill.eval.features import Features, load_features
from raydistill.models.checkpoint import Checkpoint, load_teacher
from raydistill.pairs.pool import PairsPlan, plan_pairs, run_pairs
from raydistill.pairs.reader import PairReader
from raydistill.sampling import save_grid

GRID_SAMPLES = 50                    # per row's grid: 5 rows of 10
STOCHASTIC = ("stochastic", "renoise")  # the rows' samplers with re-noise draws


@dataclass(frozen=True)
class Row:
    name: str                        # teacher | a baseline solver | a student's name
    model: TeacherRef
    solver: str                      # ddim | heun | dpmpp_2m | stochastic | renoise
    steps: int
    w: float
    sweep: bool = False              # a row of the guidance sweep (EvalJob.w_sweep)

    @property
    def key(self) -> str:
        """The row's sample-set directory name."""
        return f"{self.name}-{self.solver}-{self.steps}" + (f"-w{self.w:g}" if self.sweep else "")


def plan_rows(job: EvalJob, load: Callable[[TeacherRef], Checkpoint] = load_teacher) -> list[Row]:
    """The rows of the evaluation; `load` gives a student's checkpoint (what it records decides
    how it is sampled). The guidance sweep's rows follow, w by w: the teacher, plain DDIM at
    `sweep_steps` (neither with `students_only`) and each w-conditioned student distilled for
    that w."""
    w = job.w
    rows = [] if job.students_only else _teacher_rows(job, w, sweep=False)
    rows += [Row(solver, job.teacher, solver, steps, w)
             for solver in job.baseline_solvers for steps in job.baseline_steps
             if not job.students_only]
    sweeping = []
    for student in job.students:
        ref = TeacherRef(checkpoint=student.checkpoint)
        model = load(ref)
        solver = model.sampling.default_solver
        steps = student.steps or [model.sampling.default_steps(job.teacher_steps)]
        rows += [Row(student.name, ref, solver, n, w) for n in steps]
        if model.config.w_conditioned:
            sweeping.append((student.name, ref, model, solver, steps))
    for w in job.w_sweep:
        if not job.students_only:
            rows += [*_teacher_rows(job, w, sweep=True),
                     Row("ddim", job.teacher, "ddim", job.sweep_steps, w, True)]
        for name, ref, model, solver, steps in sweeping:
            if _distilled_for(model, w):
                rows += [Row(name, ref, solver, n, w, True) for n in steps]
    return rows


def _teacher_rows(job: EvalJob, w: float, sweep: bool) -> list[Row]:
    """The teacher's row at w (the first, whose samples the later rows at w are compared with),
    and its floor row."""
    names = ["teacher", FLOOR_ROW] if job.floor else ["teacher"]
    return [Row(name, job.teacher, "ddim", job.teacher_steps, w, sweep) for name in names]


def _distilled_for(model: Checkpoint, w: float) -> bool:
    try:
        model.sampling.check_guidance(w, w, "w")
    except ConfigError:
        return False
    return True


def network_evaluations(model: Checkpoint, solver: str, steps: int) -> int:
    """Network evaluations per sample: the solver's denoiser calls, times 2 under CFG."""
    calls = 0

    def stub(z, t, cond):
        nonlocal calls
        calls += 1
        return torch.zeros_like(z)

    z = torch.zeros(1, *model.data_shape)
    schedule = model.denoiser.schedule
    if solver in STOCHASTIC:
        model.sampling.stochastic_sampler(stub, z, {}, schedule, steps=steps,
                                          xi=torch.zeros(1, steps - 1, *model.data_shape))
    else:
        sample(stub, z, {}, schedule, steps=steps, solver=solver)
    return calls * (2 if isinstance(model.w_denoiser, CFG) else 1)


def sample_job(job: EvalJob, row: Row) -> PairsJob:
    """The ode pair set that holds a row's samples."""
    solver = "ddim" if row.solver in STOCHASTIC else row.solver
    return PairsJob(mode="ode", teacher=row.model, stochastic=row.solver in STOCHASTIC,
                    solver=SolverConfig(steps=row.steps, solver=solver),
                    guidance=GuidanceRange(w_min=row.w, w_max=row.w),
                    num_shards=job.num_samples // job.samples_per_shard,
                    samples_per_shard=job.samples_per_shard, batch_size=job.samples_per_shard,
                    seed=job.seed + 1 if row.name == FLOOR_ROW else job.seed, workers=job.workers)


def sample_plan(job: EvalJob, row: Row, out: str, log) -> PairsPlan:
    """The plan of a row's sample set under DIR/samples: eval's own cache, so a set drawn by
    another model at that key (a student trained again) is drawn again, not refused."""
    plan = plan_pairs(sample_job(job, row), os.path.join(out, "samples", row.key), replace=True)
    if plan.replaced:
        log(f"eval: {row.key}: its sample set was drawn with {plan.replaced}; drawing it again")
    return plan


def read_samples(uri: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` images and classes of a sample set, in shard order (a set drawn earlier
    for more samples holds these same ones first)."""
    samples = list(itertools.islice(PairReader(uri), count))
    return (torch.stack([s["image"] for s in samples]),
            torch.tensor([int(s["c"]) for s in samples]))


def reference_features(job: EvalJob, features: Features, cache: str) -> torch.Tensor:
    """Features of every reference image (train and held-out), cached under a key of the
    extractor's identity and the data set (its config, and the size and mtime of its file)."""
    data = dataclasses.asdict(job.data)
    if job.data.path and os.path.exists(job.data.path):
        stat = os.stat(job.data.path)
        data["stat"] = [stat.st_size, stat.st_mtime_ns]
    key = hashlib.sha256(json.dumps({"features": features.identity, "data": data},
                                    sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(cache, f"{key}.pt")
    if os.path.isfile(path):
        return torch.load(path, weights_only=True)["features"]
    split = load_images(job.data)
    feats = features(torch.cat([split.train.images, split.test.images]))
    os.makedirs(cache, exist_ok=True)
    torch.save({"features": feats, "identity": features.identity, "data": data}, path + ".partial")
    os.replace(path + ".partial", path)
    return feats


def evaluate(job: EvalJob, out: str, *, progress: bool = True, log=print) -> dict:
    """Draw (or reuse) every row's sample set on Ray (initialised by the caller), score it, and
    write DIR/eval.json; returns its contents."""
    rows = plan_rows(job)
    teacher = load_teacher(job.teacher)
    analytic = job.teacher.analytic is not None
    plans = {row.key: sample_plan(job, row, out, log)
             for row in rows}                     # every input checked before any work starts
    features = None if analytic else load_features(job.features)
    real = None if analytic else reference_features(
        job, features, job.reference_cache or os.path.join(out, "reference"))
    results, teacher_features = [], {}          # the teacher's sample features at each w
    for row in rows:
        start = time.perf_counter()
        run_pairs(plans[row.key], progress=progress)
        samples, labels = read_samples(plans[row.key].location.uri, job.num_samples)
        images = teacher.conditioning.images(samples)           # a latent teacher's decoded
        grid = None
        if not analytic:              # the first samples: the same noise and classes in every grid
            grid = os.path.join("grids", f"{row.key}.png")
            save_grid(images[:GRID_SAMPLES], GRID_SAMPLES // 10, os.path.join(out, grid))
        if analytic:
            scores = exact_distances(images, labels, teacher.network, seed=job.seed)
        else:
            mine = features(images)
            if row.name == "teacher":                 # each w's first row
                teacher_features[row.w] = mine
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                scores = fid_kid(real, mine, kid_subset_size=job.kid_subset_size, seed=job.seed)
                if row.w in teacher_features:
                    scores["fid_to_teacher"] = fid(teacher_features[row.w], mine)
        model = teacher if row.model == job.teacher else load_teacher(row.model)
        result = {"name": row.name, "solver": row.solver, "steps": row.steps, "w": row.w,
                  **({"sweep": True} if row.sweep else {}),
                  "nfe": network_evaluations(model, row.solver, row.steps),
                  "samples": len(labels), "fingerprint": model.fingerprint, **scores,
                  "sample_set": row.key, "grid": grid, "seconds": time.perf_counter() - start}
        results.append(result)
        log(format_row(result))
    report = {"w": job.w, "seed": job.seed, "num_samples": job.num_samples,
              "metric": "exact" if analytic else features.identity,
              "reference_images": None if analytic else len(real),
              "teacher_fingerprint": teacher.fingerprint, "rows": results,
              "job": dataclasses.asdict(job)}
    path = os.path.join(out, "eval.json")
    with open(path + ".partial", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".partial", path)
    return report


def format_row(result: dict) -> str:
    if "fid" in result:
        score = f"FID {result['fid']:8.3f}  KID {result['kid']:.4f} ± {result['kid_std']:.4f}"
        if result["name"] != "teacher" and "fid_to_teacher" in result:
            score += f"  FID to teacher {result['fid_to_teacher']:.3f}"
    else:
        score = f"Frechet {result['frechet']:.4f}  sliced W2 {result['sliced_w2']:.4f}"
    at = f" w={result['w']:g}" if result.get("sweep") else ""
    return (f"{result['name']:>12} {result['solver']:>10} {result['steps']:>4} steps{at} "
            f"{result['nfe']:>4} NFE  {score}")
