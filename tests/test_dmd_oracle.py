"""DMD and KD against the analytic mixture teacher (exact conditional score, w = 0), with MLP
generators trained by a plain Adam loop over the methods' own phases (the method math alone; the
Ray Train + DeepSpeed loop is tested in test_dmd.py and test_phases.py).

The setting is the paper's: a regression set much smaller than what the generator sees (128 ODE
pairs here; the distribution-matching gradient draws fresh noise every step), both networks
initialised from "the teacher's network" (an MLP fitted to the exact denoiser), DMD2's two
time-scale rule (5 fake-score updates per generator update) and Adam betas (0, 0.999).
"""

import copy

import pytest
import torch

from raydistill.conditions import Conditions
from raydistill.config import MLPConfig, ModelConfig
from raydistill.diffusion import CFG, CosineSchedule, renoise_sample, renoise_states, sample
from raydistill.eval.distances import exact_distances
from raydistill.methods.base import PAIRS, regression_loss
from raydistill.methods.dmd import DistributionMatching, DMDConfig, FakeScore, dm_gradient
from raydistill.methods.generator import distance, make_distance
from raydistill.methods.kd import KnowledgeDistillation
from raydistill.models import AnalyticTeacher, GaussianMixture, build_network
from raydistill.models.checkpoint import as_denoiser
from raydistill.pretrain.teacher import ema_update
from raydistill.schedules import ema_decay

SCHEDULE = CosineSchedule()
MSE = make_distance("mse", "", torch.device("cpu"))
DIM, BATCH, STEPS, PAIRS_MADE = 8, 128, 1500, 128
EMA = 0.995                  # the generators compared with KD are their weights' EMA, as saved
CONFIG = ModelConfig(kind="mlp", prediction="v",
                     mlp=MLPConfig(dim=DIM, width=64, depth=3, num_classes=3))


@pytest.fixture(scope="module")
def oracle():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as the figures in the note were measured
    mixture = GaussianMixture.random(num_classes=3, components_per_class=2, dim=DIM, seed=3)
    yield mixture, AnalyticTeacher(mixture, SCHEDULE)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_network(oracle):
    """An MLP fitted to the exact denoiser at every t: what DMD initialises both networks from."""
    mixture, exact = oracle
    torch.manual_seed(123)
    net = build_network(CONFIG)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(600):
        c = torch.randint(0, 3, (256,))
        x = mixture.sample(c).float()
        t = torch.rand(256).clamp_min(1e-3)
        alpha, sigma = SCHEDULE.alpha_sigma(t)
        z_t = alpha[:, None] * x + sigma[:, None] * torch.randn_like(x)
        with torch.no_grad():
            target = exact(z_t, t, {"c": c}).float()
        loss = regression_loss(net, CONFIG, SCHEDULE, "snr_plus_one", z_t, t, {"c": c},
                               target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def ode_pairs(oracle):
    """PAIRS_MADE (noise, the exact teacher's 128-step Heun ODE solution) pairs."""
    _, exact = oracle
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(PAIRS_MADE, DIM, generator=g)
    c = torch.randint(0, 3, (PAIRS_MADE,), generator=g)
    with torch.no_grad():
        image = sample(exact, noise, {"c": c}, SCHEDULE, steps=128, solver="heun", w=0.0)
    return {"noise": noise, "image": image.float(), "c": c, "w": torch.zeros(PAIRS_MADE)}


def fit(method, pairs: dict | None, lrs: dict[str, float], betas: tuple[float, float],
        steps: int = STEPS, ema: float = 0.0) -> None:
    """Adam per module over the method's phases: a phase trains only its module and reads a
    batch of pairs only when it names the stream. With `ema`, the generator ends as the
    exponential moving average of its weights (decay `ema`), as `optim.ema_decay` saves it."""
    modules = method.modules()
    average = copy.deepcopy(modules["generator"]).requires_grad_(False)
    opts = {name: torch.optim.Adam(m.parameters(), lr=lrs[name], betas=betas)
            for name, m in modules.items()}
    g = torch.Generator().manual_seed(0)
    method.micro_batch = BATCH
    for step in range(steps):
        method.seed(step, torch.device("cpu"))
        for phase in method.phases():
            for name, module in modules.items():
                module.requires_grad_(name == phase.module)
            for _ in range(phase.updates):
                batch = {}
                if PAIRS in phase.reads:
                    rows = torch.randint(0, PAIRS_MADE, (BATCH,), generator=g)
                    batch[PAIRS] = {k: v[rows] for k, v in pairs.items()}
                loss = method.loss(batch, phase)["loss"]
                opts[phase.module].zero_grad()
                loss.backward()
                opts[phase.module].step()
        ema_update(average, modules["generator"], ema_decay(ema, step))
    modules["generator"].load_state_dict(average.state_dict())


def draws(generator, steps: int = 1, pooled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """6000 samples (x, c) of the generator's `steps`-step re-noising sampler (one step: G(z, c)),
    2000 per class; `pooled`: each sample's output at exit i mod steps of that chain instead."""
    g = torch.Generator().manual_seed(99)
    z, c = torch.randn(6000, DIM, generator=g), torch.arange(3).repeat(2000)
    xi = torch.randn(6000, steps - 1, DIM, generator=g)
    denoiser = as_denoiser(generator, CONFIG)
    with torch.no_grad():
        if not pooled:
            return renoise_sample(denoiser, z, {"c": c}, SCHEDULE, steps=steps, xi=xi), c
        exits = torch.stack([denoiser(z_t, t, {"c": c}) for t, z_t in
                             renoise_states(denoiser, z, {"c": c}, SCHEDULE, steps=steps, xi=xi)])
    return exits[torch.arange(6000) % steps, torch.arange(6000)], c


def scores(generator, mixture, steps: int = 1, pooled: bool = False) -> dict[str, float]:
    """Exact distances of the generator's samples (`draws`) to p(x | c), the share of samples near
    no component of their class (> 2 std out, per dimension on average), and each component's
    share of the samples against its true share."""
    x, c = draws(generator, steps, pooled)
    x = x.double()
    distances = exact_distances(x, c, mixture)
    d2 = ((x[:, None, :] - mixture.means[None]) ** 2).sum(-1) / (mixture.stds[None] ** 2 * DIM)
    d2 = d2.masked_fill(mixture.classes[None] != c[:, None], float("inf"))
    nearest = d2.argmin(1)
    shares = torch.bincount(nearest, minlength=len(mixture.weights)).double() / len(x)
    in_class = torch.stack([mixture.weights[mixture.classes == k].sum()
                            for k in mixture.classes.tolist()])
    truth = mixture.weights / in_class / 3
    return {**distances, "off_mode": float((d2.min(1).values > 4.0).double().mean()),
            "share_ratio": (shares / truth).tolist()}


def print_table(rows: dict[str, dict]) -> None:
    width = max(map(len, rows))
    print(f"\n{'':{width}s} frechet  sliced_w2  off_mode  component share / true share")
    for name, r in rows.items():
        print(f"{name:{width}s} {r['frechet']:.4f}   {r['sliced_w2']:.4f}     {r['off_mode']:.3f}    "
              + " ".join(f"{v:.2f}" for v in r["share_ratio"]))


def test_dm_gradient_points_from_fake_to_real():
    """grad = (x_fake - x_real) / mean|x - x_real| per sample: a step against it moves x toward
    the real denoiser's output; a zero normaliser gives 0, not NaN."""
    x = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    x_real = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    x_fake = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    grad = dm_gradient(x=x, x_real=x_real, x_fake=x_fake)
    assert torch.equal(grad, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(distance(x, x_real, "mse"), torch.tensor([1.0, 0.0]))
    c = 0.00054 * 2 ** 0.5
    torch.testing.assert_close(distance(x, x_real, "pseudo_huber"),
                               torch.tensor([(2 + c * c) ** 0.5 - c, 0.0]))


def test_dmd_matches_the_mixture_and_beats_kd_on_the_same_pairs(oracle, teacher_network,
                                                                ode_pairs):
    """DMD (DM + regression on the 128 pairs) against KD (regression alone), both saved as their
    weights' EMA: DMD is closer to the mixture in sliced W2 and puts fewer samples between the
    modes. Measured over three seeds of the draws and pairs (the note on issue 12), these two
    orderings held at all three (sliced W2 by 5-23%), KD's Gaussian-fit Frechet distance was the
    lower one at all three; without the EMA, DMD's sliced W2 was the higher one at two of three."""
    mixture, exact = oracle
    kd_generator = copy.deepcopy(teacher_network)
    kd = KnowledgeDistillation(generator=kd_generator, config=CONFIG, schedule=SCHEDULE,
                               distance=MSE, w=0.0, steps=STEPS)
    fit(kd, ode_pairs, {"generator": 2e-4}, (0.9, 0.999), ema=EMA)

    generator = copy.deepcopy(teacher_network)
    fake = FakeScore(copy.deepcopy(teacher_network), CONFIG, head=None)
    dmd = DistributionMatching(
        teacher=CFG(exact), generator=generator, fake_score=fake, generator_config=CONFIG,
        fake_config=CONFIG, schedule=SCHEDULE, dmd=DMDConfig(regression_weight=0.25,
                                                             fake_updates=5),
        w=0.0, conditions=Conditions(3), shape=(DIM,), weighting="snr_plus_one", distance=MSE,
        steps=STEPS)
    fit(dmd, ode_pairs, {"generator": 2e-4, "fake_score": 1e-3}, (0.0, 0.999), ema=EMA)

    rows = {"kd (regression only)": scores(kd_generator, mixture),
            "dmd (DM + regression)": scores(generator, mixture)}
    print_table(rows)
    ours, baseline = rows["dmd (DM + regression)"], rows["kd (regression only)"]
    assert ours["frechet"] < 0.03
    assert min(ours["share_ratio"]) > 0.75            # every component keeps its mass
    assert ours["sliced_w2"] < baseline["sliced_w2"]
    assert ours["off_mode"] < baseline["off_mode"]     # sharper: fewer samples between modes


@pytest.mark.slow    # 70 s: the suite keeps one-step DMD's oracle; test-all runs this
def test_a_four_step_generator_trained_by_backward_simulation(oracle, teacher_network):
    """DMD2's multi-step generator: 4 steps, no regression, 800 steps. With exit_step last (the
    sampled output is the trained one) its samples match the mixture, far better than the
    teacher's network sampled the same way. With DMD2's uniform exit, one fake score tracks the
    mixture of the four exits: training reaches the fixed point where that mixture matches the
    data, while the last exit alone, what the sampler returns, is far off."""
    mixture, exact = oracle
    rows = {"teacher's network, 4 re-noising steps": scores(teacher_network, mixture, 4)}
    for exit_step in ("last", "uniform"):
        generator = copy.deepcopy(teacher_network)
        method = DistributionMatching(
            teacher=CFG(exact), generator=generator,
            fake_score=FakeScore(copy.deepcopy(teacher_network), CONFIG, head=None),
            generator_config=CONFIG, fake_config=CONFIG, schedule=SCHEDULE,
            dmd=DMDConfig(regression_weight=0.0, fake_updates=5, generator_steps=4,
                          exit_step=exit_step),
            w=0.0, conditions=Conditions(3), shape=(DIM,), weighting="snr_plus_one", distance=None,
            steps=800)
        fit(method, None, {"generator": 2e-4, "fake_score": 1e-3}, (0.0, 0.999), steps=800)
        rows[f"exit {exit_step}: sampled"] = scores(generator, mixture, 4)
        rows[f"exit {exit_step}: 4 exits pooled"] = scores(generator, mixture, 4, pooled=True)
    print_table(rows)
    last, uniform = rows["exit last: sampled"], rows["exit uniform: sampled"]
    assert last["frechet"] < 0.03 and min(last["share_ratio"]) > 0.75
    assert last["frechet"] < 0.25 * rows["teacher's network, 4 re-noising steps"]["frechet"]
    assert rows["exit uniform: 4 exits pooled"]["frechet"] < 0.03
    assert uniform["frechet"] > 10 * last["frechet"]



def test_the_fake_score_learns_the_generators_distribution(oracle, teacher_network):
    """The fake-score phase alone, the generator held at its start (the teacher's network at
    t = 1: samples far from the data): the fake score's denoising loss on the generator's samples
    falls as it learns their distribution (it starts as the teacher's network, a denoiser of the
    data)."""
    _, exact = oracle
    fake = FakeScore(copy.deepcopy(teacher_network), CONFIG, head=None)
    dmd = DistributionMatching(
        teacher=CFG(exact), generator=copy.deepcopy(teacher_network).requires_grad_(False),
        fake_score=fake, generator_config=CONFIG, fake_config=CONFIG, schedule=SCHEDULE,
        dmd=DMDConfig(regression_weight=0.0), w=0.0, conditions=Conditions(3), shape=(DIM,),
        weighting="snr_plus_one", distance=None, steps=300)
    dmd.micro_batch = BATCH
    phase = dmd.phases()[0]
    assert phase.module == "fake_score" and phase.reads == ()
    opt = torch.optim.Adam(fake.parameters(), lr=1e-3, betas=(0.0, 0.999))
    losses = []
    for step in range(300):
        dmd.seed(step, torch.device("cpu"))
        values = dmd.loss({}, phase)
        opt.zero_grad()
        values["loss"].backward()
        opt.step()
        losses.append(float(values["loss_denoise"]))
    start, end = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"\nfake score's denoising loss on the generator's samples: {start:.4f} over the first "
          f"20 updates, {end:.4f} over the last 20")
    assert end < 0.8 * start          # measured: 0.183 -> 0.121
