
import pytest
import torch

from hpdm.config import DiffusionConfig
from hpdm.diffusion import EDM, Condition
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from tests.helpers import tiny_model_config

SHAPE = (2, 3, 3, 4, 8, 8)


def _oracle(edm: EDM, x0: torch.Tensor):
    """A network whose EDM-preconditioned output is exactly x0 (the denoiser of a one-point dataset)."""
    sd = edm.cfg.sigma_data

    def net(x_in, c_noise, boxes, labels, text, mask):
        s = (4 * c_noise).exp().view(*c_noise.shape, 1, 1, 1, 1)
        x = x_in * (s ** 2 + sd ** 2).sqrt()
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
        return (x0[:, :x.shape[1]] - c_skip * x) / c_out
    return net


def test_preconditioning_and_loss_of_perfect_denoiser_is_zero():
    edm = EDM(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    sigma = edm.sample_sigma(2, 3, "cpu", g)
    loss, per_level = edm.loss(_oracle(edm, x0), x0, torch.zeros(2, 3, 6), Condition(), sigma, torch.randn(SHAPE, generator=g))
    assert loss.item() < 1e-8 and per_level.shape == (3,)
    # a network that outputs zero gives D = c_skip * x, and the EDM weighting puts the loss near 1 at every sigma
    zero = lambda x, *a: torch.zeros_like(x)  # noqa: E731
    noise = torch.randn(SHAPE, generator=g)
    for s in (0.01, 0.5, 20.0):
        data = torch.randn(SHAPE, generator=g) * 0.5
        loss, _ = edm.loss(zero, data, torch.zeros(2, 3, 6), Condition(), torch.full((2, 3), s), noise)
        assert 0.5 < loss.item() < 1.6


def test_sigma_shared_by_levels_unless_independent():
    shared = EDM(DiffusionConfig()).sample_sigma(1000, 3, "cpu", torch.Generator().manual_seed(0))
    assert (shared == shared[:, :1]).all()
    assert abs(shared.log().mean().item() + 1.2) < 0.1 and abs(shared.log().std().item() - 1.2) < 0.1
    indep = EDM(DiffusionConfig(independent_levels=True)).sample_sigma(1000, 3, "cpu", torch.Generator().manual_seed(0))
    assert (indep[:, 0] != indep[:, 1]).all()


def test_condition_dropout_rate():
    cond = Condition(labels=torch.arange(10000) % 7).dropped(0.1, torch.Generator().manual_seed(0))
    rate = (cond.labels == -1).float().mean().item()
    assert 0.09 < rate < 0.11
    text = Condition(text=torch.ones(4, 3, 2)).dropped(1.0)
    assert not text.text_mask.any()


@pytest.mark.parametrize("order,churn", [(2, 0.0), (1, 0.0), (2, 40.0)])
def test_sampler_recovers_single_point_dataset(order, churn):
    edm = EDM(DiffusionConfig())
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(1, 1, 3, 4, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return edm.denoise(_oracle(edm, x0), x, torch.full((1, 1), sigma), torch.zeros(1, 1, 6), Condition()).double()

    x = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    out = edm.solve(denoise, x, steps=12, churn=churn, order=order, noise=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert len(calls) == (2 * 12 - 1 if order == 2 else 12)
    assert calls[0] >= 80.0 and min(calls) >= 0.002


def test_sampler_started_from_a_noisy_estimate_follows_the_exact_ode():
    """Data N(mu, tau^2) per pixel: the probability-flow ODE from x at sigma s ends at mu + tau (x - mu) / sqrt(tau^2
    + s^2). Started at ``start + s z`` (``start``, ``sigma_max``), the sampler must land there."""
    edm = EDM(DiffusionConfig())
    mu, tau, s = 0.3, 0.5, 1.5
    g = torch.Generator().manual_seed(2)
    start = torch.rand(3, 4, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(start.shape, generator=g, dtype=torch.float64)
    calls = []

    def denoise(x, sigma):
        calls.append(sigma)
        return mu + tau ** 2 / (tau ** 2 + sigma ** 2) * (x - mu)

    out = edm.solve(denoise, z, steps=64, churn=0.0, order=2, noise=None, start=start, sigma_max=s)
    torch.testing.assert_close(out, mu + tau * (start + s * z - mu) / (tau ** 2 + s ** 2) ** 0.5, rtol=0, atol=2e-3)
    assert calls[0] == pytest.approx(s) and edm.sigma_steps(8, sigma_max=s)[0] == pytest.approx(s)


def test_tiny_model_overfits_one_clip():
    torch.manual_seed(0)
    cfg = tiny_model_config(num_latents=16, token_dim=64, latent_dim=64, head_dim=32)
    model, edm = HPDM(cfg), EDM(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(1, 1, 3, *cfg.patch, generator=g).expand(1, cfg.levels, -1, -1, -1, -1) * 2 - 1
    boxes = boxes_from_offsets(sample_offsets(1, cfg.levels, cfg.patch, g), cfg.patch)
    cond = Condition(labels=torch.tensor([2]))
    # a fixed evaluation set: 16 noise levels across the training distribution, fixed noise
    sig_eval = torch.exp(torch.linspace(-3.0, 1.5, 16))[:, None].expand(16, cfg.levels)
    noise_eval = torch.randn((16, *clip.shape[1:]), generator=g)
    many = lambda t: t.expand(16, *t.shape[1:])  # noqa: E731

    def eval_loss():
        with torch.no_grad():
            return edm.loss(model, many(clip), many(boxes), Condition(labels=cond.labels.expand(16)), sig_eval, noise_eval)[0].item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    after = before
    for steps in range(1, 301):  # counted in steps, not seconds: a loaded machine must not fail it
        sigma = edm.sample_sigma(8, cfg.levels, "cpu", g)
        loss, _ = edm.loss(model, many(clip)[:8], many(boxes)[:8], Condition(labels=cond.labels.expand(8)), sigma,
                           torch.randn((8, *clip.shape[1:]), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if steps % 20 == 0:
            after = eval_loss()
            if after < before / 5:
                break
    assert after < before / 5, f"loss {before:.4f} -> {after:.4f} in {steps} steps"
