import pytest
import torch

from raydistill.diffusion import CosineSchedule, DiscreteSchedule

SCHEDULES = {
    "cosine": CosineSchedule(),
    "linear": DiscreteSchedule.linear(),
    "scaled_linear": DiscreteSchedule.scaled_linear(),
    "squaredcos_cap_v2": DiscreteSchedule.squaredcos_cap_v2(),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_variance_preserving_and_monotone(name):
    schedule = SCHEDULES[name]
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    assert bool((schedule.logsnr(t).diff() < 0).all())


@pytest.mark.parametrize("name", SCHEDULES)
def test_t_from_logsnr_inverts_logsnr(name):
    """Exactly on a continuous schedule; a discrete schedule's t stands for a native timestep
    (snap), whose log-SNR maps back to that timestep's t."""
    schedule = SCHEDULES[name]
    t = torch.rand(500, dtype=torch.float64)
    torch.testing.assert_close(schedule.t_from_logsnr(schedule.logsnr(t)), schedule.snap(t),
                               rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_a_discrete_schedule_is_its_native_timesteps(kind):
    """Every t > 0 has the noise level of the native timestep the network is fed, round(N t) - 1:
    t below 1/N is timestep 0 (not a level between it and the clean image that the network, fed
    timestep 0, would not see), and 3 uniform steps of 1000 are diffusers' trailing 999, 666 and
    332 (not 665.67 and 332.33)."""
    schedule = SCHEDULES[kind]
    tiny = torch.tensor([1e-4, 4e-4, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(schedule.timestep(tiny), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(schedule.logsnr(tiny), schedule.logsnr_table[:1].expand(3))
    grid = torch.tensor([1.0, 2 / 3, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(schedule.timestep(grid),
                               torch.tensor([999.0, 666.0, 332.0], dtype=torch.float64))
    torch.testing.assert_close(schedule.logsnr(grid), schedule.logsnr_table[[999, 666, 332]])
    t = torch.rand(1000, dtype=torch.float64)
    n = schedule.timestep(t)
    assert bool((n == n.round()).all()) and n.min() >= 0
    torch.testing.assert_close(schedule.logsnr(t), schedule.logsnr_table[n.long()])


def test_cosine_clipping_endpoints():
    schedule = CosineSchedule(logsnr_min=-15.0, logsnr_max=12.0)
    ends = schedule.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([12.0, -15.0], dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_matches_diffusers_alphas_cumprod(kind):
    """The continuous map hits the teacher's native alpha_bar_n exactly at t = (n + 1) / N, so the
    uniform t grid of `steps` steps is diffusers' "trailing" DDIM grid; t = 0 is the clean image
    (diffusers' set_alpha_to_one)."""
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule=kind,
                                        beta_start=1e-4 if kind == "linear" else 0.00085,
                                        beta_end=0.02 if kind == "linear" else 0.012,
                                        timestep_spacing="trailing")
    schedule = SCHEDULES[kind]
    n = torch.tensor([0, 1, 250, 500, 999])
    t = (n.double() + 1) / 1000
    torch.testing.assert_close(schedule.alpha(t) ** 2, reference.alphas_cumprod[n].double(),
                               rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(schedule.timestep(t), n.double())
    reference.set_timesteps(8)
    grid = torch.linspace(1, 0, 9, dtype=torch.float64)[:-1]
    torch.testing.assert_close(schedule.timestep(grid), reference.timesteps.double())
    alpha, sigma = schedule.alpha_sigma(torch.zeros(1, dtype=torch.float64))
    assert float(alpha) == 1.0 and float(sigma) == 0.0
    assert schedule.t_from_logsnr(torch.tensor([torch.inf], dtype=torch.float64)).item() == 0.0
