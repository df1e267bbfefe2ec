"""a2 -- the posterior and the variational bound: ddpm.Diffusion.q_posterior (App. A.2 Eq. 5-6),
ddpm.normal_kl and ddpm.discretized_gaussian_log_likelihood (the L_{t-1} and L_0 terms of Eq. 9),
and the L_vlb term of L_hybrid in ddpm.Diffusion.training_losses (App. A.3).

Expected values are computed here in float64 numpy: the posterior by Bayes' rule (not by the
coefficients of Eq. 5), the KL in another closed form, the decoder with Python's math.erf. The
L_hybrid test replaces q_sample (assignment a1) by a reference written here, so it grades a2 alone.
"""
import math

import numpy as np
import pytest
import torch

BETAS = np.array([0.02, 0.1, 0.3, 0.6, 0.9])   # a hand-written 5-step schedule


def posterior_by_bayes(betas, t, x0, xt):
    """q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0): precisions add, means are precision-weighted.
    Returns (mean, variance) in float64; at t = 0 the posterior is the point x_0 (variance 0)."""
    alphas, abar = 1.0 - betas, np.cumprod(1.0 - betas)
    if t == 0:
        return x0.copy(), 0.0
    abar_prev = abar[t - 1]
    precision = alphas[t] / betas[t] + 1.0 / (1.0 - abar_prev)
    mean = (np.sqrt(alphas[t]) / betas[t] * xt + np.sqrt(abar_prev) / (1.0 - abar_prev) * x0) / precision
    return mean, 1.0 / precision


def kl_gaussians(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) = ln(s2 / s1) + (v1 + (m1 - m2)^2) / (2 v2) - 1/2, float64."""
    return 0.5 * np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / (2.0 * v2) - 0.5


def bin_log_mass(x, mean, std):
    """log of the N(mean, std^2) mass of the 8-bit bin of each x in [-1, 1], with math.erf (float64)."""
    cdf = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))
    upper = np.where(x > 0.999, 1.0, cdf((x + 1 / 255 - mean) / std))
    lower = np.where(x < -0.999, 0.0, cdf((x - 1 / 255 - mean) / std))
    with np.errstate(divide="ignore"):                # far from the mean a bin's mass underflows to 0
        return np.log(upper - lower)


@pytest.mark.assignment("a2", points=2)
def test_q_posterior_is_bayes_rule():
    import ddpm
    d = ddpm.Diffusion(BETAS, learn_sigma=False, loss="simple")
    g = torch.Generator().manual_seed(1)
    x0, xt = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 1, 2, 3, 4])
    mean, variance, log_variance = d.q_posterior(x0, xt, t)
    variances = []
    for b in range(5):
        m, v = posterior_by_bayes(BETAS, b, x0[b].double().numpy(), xt[b].double().numpy())
        variances.append(v)
        np.testing.assert_allclose(mean[b].numpy(), m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.broadcast_to(variance[b].numpy(), m.shape), v, rtol=1e-5, atol=1e-9)
    # the log variance is clipped at t = 0 (beta~ = 0 there) to its value at t = 1
    clipped = np.log([variances[1]] + variances[1:])
    for b in range(5):
        np.testing.assert_allclose(np.broadcast_to(log_variance[b].numpy(), (2, 3, 3)), clipped[b], rtol=1e-5)


@pytest.mark.assignment("a2", points=1)
def test_normal_kl_closed_form():
    import ddpm
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    lv1, lv2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    kl = ddpm.normal_kl(m1, lv1, m2, lv2)
    m1n, v1, m2n, v2 = m1.double().numpy(), np.exp(lv1.double().numpy()), m2.double().numpy(), np.exp(lv2.double().numpy())
    expected = kl_gaussians(m1n, v1, m2n, v2)
    assert kl.shape == (3, 4)
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ddpm.normal_kl(m1, lv1, m1, lv1), torch.zeros(3, 4), atol=1e-6)   # KL(p || p) = 0
    prior = ddpm.normal_kl(m1, lv1, 0.0, 0.0)              # against N(0, 1), given as Python floats (L_T)
    np.testing.assert_allclose(prior.numpy(), kl_gaussians(m1n, v1, 0.0, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.assignment("a2", points=2)
def test_discretized_gaussian_log_likelihood_sums_to_one_over_the_256_bins():
    import ddpm
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0           # the 256 pixel values in [-1, 1]
    for mean, std in ((0.1, 0.3), (-0.95, 0.05), (0.7, 1.5)):
        ll = ddpm.discretized_gaussian_log_likelihood(levels, torch.full((256,), mean),
                                                      torch.full((256,), math.log(std)))
        assert ll.shape == (256,)
        expected = bin_log_mass(levels.double().numpy(), mean, std)
        mass = np.exp(ll.double().numpy())
        np.testing.assert_allclose(mass, np.exp(expected), rtol=2e-3, atol=2e-6)
        assert mass.sum() == pytest.approx(1.0, abs=1e-4)                       # the bins cover the real line
        big = expected > math.log(1e-3)                                          # bins with real mass: log agrees
        np.testing.assert_allclose(ll.numpy()[big], expected[big], rtol=1e-3, atol=1e-3)


def reference_q_sample(self, x0, t, noise):
    """Eq. 4 from the diffusion's own float64 abar, so this test does not depend on assignment a1."""
    abar = torch.tensor(self.float64["alphas_cumprod"])[t].reshape(-1, *([1] * (x0.dim() - 1)))
    return (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).float()


@pytest.mark.assignment("a2", points=3)
def test_hybrid_loss_value_and_stop_gradient(monkeypatch):
    import ddpm
    monkeypatch.setattr(ddpm.Diffusion, "q_sample", reference_q_sample)
    d = ddpm.Diffusion(BETAS, learn_sigma=True, loss="hybrid")
    T, B, C, H = len(BETAS), 4, 2, 3
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (B, C, H, H), generator=g).float() / 127.5 - 1.0    # 8-bit data (the decoder's bins)
    noise = torch.randn(B, C, H, H, generator=g)
    t = torch.tensor([0, 1, 2, 4])
    out = (0.3 * torch.randn(B, 2 * C, H, H, generator=g)).requires_grad_(True)   # the network's (eps, v)
    seen = []

    def model(x, t_model):
        seen.append(t_model.clone())
        return out

    terms = d.training_losses(model, x0, t, noise)
    # float64 reference: L_simple + (the Eq. 9 term of step t, in bits/dim) * T / 1000
    abar = np.cumprod(1.0 - BETAS)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = BETAS * (1 - abar_prev) / (1 - abar)
    log_beta_tilde_clipped = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    o, x0n, nz = out.detach().double().numpy(), x0.double().numpy(), noise.double().numpy()
    for b, tb in enumerate(t.tolist()):
        eps, v = o[b, :C], o[b, C:]
        xt = np.sqrt(abar[tb]) * x0n[b] + np.sqrt(1 - abar[tb]) * nz[b]
        mse = np.mean((nz[b] - eps) ** 2)
        frac = (v + 1) / 2                                                          # Eq. 8
        log_var = frac * np.log(BETAS[tb]) + (1 - frac) * log_beta_tilde_clipped[tb]
        pred_x0 = (xt - np.sqrt(1 - abar[tb]) * eps) / np.sqrt(abar[tb])              # Eq. 4 solved for x_0
        model_mean, _ = posterior_by_bayes(BETAS, tb, pred_x0, xt)                  # Eq. 7 through Eq. 5
        if tb == 0:   # L_0: the decoder's negative log-likelihood of the 8-bit x_0
            nats = -np.mean(bin_log_mass(x0n[b], model_mean, np.exp(0.5 * log_var)))
        else:         # L_{t-1}: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))
            true_mean, true_var = posterior_by_bayes(BETAS, tb, x0n[b], xt)
            nats = np.mean(kl_gaussians(true_mean, true_var, model_mean, np.exp(log_var)))
        vb = nats / math.log(2.0) * T / 1000.0
        assert terms["mse"][b].item() == pytest.approx(mse, rel=1e-5)
        assert terms["vb"][b].item() == pytest.approx(vb, rel=2e-3, abs=1e-8)
        assert terms["loss"][b].item() == pytest.approx(mse + vb, rel=2e-3, abs=1e-8)
    assert torch.equal(seen[0], t)                     # the network sees the (original) step index
    # stop-gradient (App. A.3): the vb term trains only v; eps gets exactly the L_simple gradient
    terms["loss"].sum().backward()
    grad_eps = -2.0 * (noise - out.detach()[:, :C]) / (C * H * H)
    np.testing.assert_allclose(out.grad[:, :C].numpy(), grad_eps.numpy(), rtol=1e-4, atol=1e-7)
    assert out.grad[:, C:].abs().sum() > 0             # ... and the variance is trained by L_vlb
