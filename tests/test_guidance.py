import torch

from raydistill.diffusion import CFG, NULL_CLASS, cfg_combine, cfg_x, fourier_embedding


def _times(noise, value=0.4):
    return torch.full((noise.shape[0],), value, dtype=noise.dtype)


def test_w_zero_is_conditional_and_minus_one_unconditional(teacher, batch):
    noise, cond = batch
    t = _times(noise)
    conditional = teacher(noise, t, cond)
    unconditional = teacher(noise, t, {"c": torch.full_like(cond["c"], NULL_CLASS)})
    torch.testing.assert_close(cfg_x(teacher, noise, t, cond, torch.tensor(0.0)), conditional)
    torch.testing.assert_close(cfg_x(teacher, noise, t, cond, torch.tensor(-1.0)), unconditional)
    assert (conditional - unconditional).abs().max() > 1e-2   # the test is not vacuous


def test_batched_call_equals_two_calls(teacher, batch):
    noise, cond = batch
    t = _times(noise, 0.7)
    w = torch.linspace(0, 4, len(noise), dtype=noise.dtype)
    calls = []

    def counting(z, t, c):
        calls.append(len(z))
        return teacher(z, t, c)

    batched = CFG(counting)(noise, t, {**cond, "w": w})
    separate = cfg_combine(teacher(noise, t, cond),
                           teacher(noise, t, {"c": torch.full_like(cond["c"], NULL_CLASS)}), w)
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-12)
    assert calls == [2 * len(noise)]


def test_unconditional_is_the_prior_mixture_of_conditionals(teacher, mixture, batch):
    """x_hat(z, null) = sum_c p(c | z) x_hat(z, c): the exact mixture identity."""
    noise, _ = batch
    t = _times(noise, 0.5)
    alpha, sigma = teacher.schedule.alpha_sigma(t)
    var = alpha[:, None] ** 2 * mixture.stds[None] ** 2 + sigma[:, None] ** 2
    diff = noise[:, None] - alpha[:, None, None] * mixture.means[None]
    log_p = torch.log(mixture.weights) - 0.5 * (diff.pow(2).sum(-1) / var + mixture.dim * var.log())
    class_post = torch.stack([log_p[:, mixture.classes == c].logsumexp(1)
                              for c in range(mixture.num_classes)], 1).softmax(1)
    per_class = torch.stack([teacher(noise, t, {"c": torch.full((len(noise),), c)})
                             for c in range(mixture.num_classes)], 1)
    expected = (class_post[..., None] * per_class).sum(1)
    got = teacher(noise, t, {"c": torch.full((len(noise),), NULL_CLASS)})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_fourier_embedding():
    emb = fourier_embedding(torch.tensor([0.0, 1.0, 2.5]), 16)
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(8), torch.zeros(8)]))
    torch.testing.assert_close(emb.pow(2).reshape(3, 2, 8).sum(1), torch.ones(3, 8))
