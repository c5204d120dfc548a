import pytest
import torch

from raydistill.diffusion import (
    PREDICTIONS,
    CosineSchedule,
    DiscreteSchedule,
    broadcast_like,
    eps_from_v,
    eps_from_x,
    loss_weight,
    output_weight,
    prediction_from_x,
    prediction_target,
    v_from_eps,
    v_from_x,
    x_from_eps,
    x_from_prediction,
    x_from_v,
    x_jacobian,
)


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    alpha, sigma = (broadcast_like(v, x) for v in CosineSchedule().alpha_sigma(t))
    return x, eps, alpha, sigma, alpha * x + sigma * eps


def test_round_trips(state):
    x, eps, alpha, sigma, z = state
    kw = {"z": z, "alpha": alpha, "sigma": sigma}
    v = alpha * eps - sigma * x
    for got, want in [
        (x_from_eps(eps=eps_from_x(x=x, **kw), **kw), x),
        (eps_from_x(x=x_from_eps(eps=eps, **kw), **kw), eps),
        (x_from_v(v=v_from_x(x=x, **kw), **kw), x),
        (v_from_x(x=x_from_v(v=v, **kw), **kw), v),
        (eps_from_v(v=v_from_eps(eps=eps, **kw), **kw), eps),
        (v_from_eps(eps=eps_from_v(v=v, **kw), **kw), v),
        (v_from_x(x=x, **kw), v),
        (eps_from_v(v=v, **kw), eps),
    ]:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_round_trips_float32(state):
    x, eps, alpha, sigma, z = (s.float() for s in state)
    kw = {"z": z, "alpha": alpha, "sigma": sigma}
    torch.testing.assert_close(x_from_v(v=v_from_x(x=x, **kw), **kw), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_from_eps(eps=eps_from_x(x=x, **kw), **kw), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_target_and_jacobian(state, prediction):
    x, eps, alpha, sigma, z = state
    kw = {"z": z, "alpha": alpha, "sigma": sigma}
    target = prediction_target(prediction, x=x, eps=eps, alpha=alpha, sigma=sigma)
    torch.testing.assert_close(x_from_prediction(prediction, out=target, **kw), x, atol=1e-9, rtol=0)
    torch.testing.assert_close(prediction_from_x(prediction, x=x, **kw), target, atol=1e-9, rtol=0)
    # x_hat is affine in the output: its slope is the Jacobian.
    bump = 1e-3
    dx = x_from_prediction(prediction, out=target + bump, **kw) - x
    torch.testing.assert_close(dx.abs() / bump,
                               x_jacobian(prediction, alpha=alpha, sigma=sigma).expand_as(dx),
                               rtol=1e-6, atol=1e-9)


def test_loss_weightings():
    logsnr = torch.tensor([-4.0, 0.0, 3.0], dtype=torch.float64)
    snr = logsnr.exp()
    torch.testing.assert_close(loss_weight("snr", logsnr), snr)
    torch.testing.assert_close(loss_weight("truncated_snr", logsnr), snr.clamp(min=1))
    torch.testing.assert_close(loss_weight("snr_plus_one", logsnr), snr + 1)
    torch.testing.assert_close(loss_weight("constant", logsnr), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight("snr2", logsnr)


def test_weighted_x_loss_is_the_native_loss(state):
    """SNR weighting in x space is the eps loss; SNR + 1 is the v loss (Salimans & Ho 2022)."""
    x, eps, alpha, sigma, z = state
    x_hat = x + 0.1 * torch.randn_like(x)
    logsnr = torch.log(alpha**2 / sigma**2).flatten()
    x_err = (x_hat - x).pow(2).flatten(1).sum(1)
    kw = {"z": z, "alpha": alpha, "sigma": sigma}
    eps_err = (eps_from_x(x=x_hat, **kw) - eps).pow(2).flatten(1).sum(1)
    v_err = (v_from_x(x=x_hat, **kw) - (alpha * eps - sigma * x)).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(loss_weight("snr", logsnr) * x_err, eps_err)
    torch.testing.assert_close(loss_weight("snr_plus_one", logsnr) * x_err, v_err)


def test_output_weights_are_the_x_space_weights_on_the_networks_own_output():
    """An x-space weighting is weight(lambda) J^2 on the network's own output: SNR on an eps
    network and SNR + 1 on a v network are its plain loss (weight 1, what `output` gives any
    network); SNR + 1 on an eps network is 1 + 1/SNR, 214 at t = 1 of Stable Diffusion's schedule
    (DMD2 trains its fake score with weight 1)."""
    schedule = DiscreteSchedule.scaled_linear()
    t = torch.tensor([0.02, 0.5, 1.0], dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(t)
    kw = {"logsnr": schedule.logsnr(t), "alpha": alpha, "sigma": sigma}
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(output_weight("snr", "eps", **kw), ones)
    torch.testing.assert_close(output_weight("snr_plus_one", "v", **kw), ones)
    for prediction in PREDICTIONS:
        torch.testing.assert_close(output_weight("output", prediction, **kw), ones)
    eps = output_weight("snr_plus_one", "eps", **kw)
    torch.testing.assert_close(eps, 1 + 1 / kw["logsnr"].exp())
    assert 213 < float(eps[-1]) < 215
