"""a3 -- respacing and DDIM: ddpm.space_timesteps (App. C: 250 of the 4000 steps) and
ddpm.Diffusion.ddim_step (Song et al. 2021, Eq. 12; guidance on eps, Dhariwal & Nichol Alg. 2).

The respacing tests compare with closed forms and hand-worked cases. The DDIM tests replace
p_mean_variance (it calls q_posterior, assignment a2) by a reference written here, and use an
"exact" network for a single data point x0*, eps(x_t, t) = (x_t - sqrt(abar_t) x0*) / sqrt(1 - abar_t),
for which one DDIM step has a closed form.
"""
import numpy as np
import pytest
import torch

BETAS = np.array([0.02, 0.05, 0.1, 0.2, 0.35, 0.5])   # a hand-written 6-step schedule
ABAR = np.cumprod(1.0 - BETAS)


@pytest.mark.assignment("a3", points=1)
def test_even_respacing_keeps_rounded_evenly_spread_steps():
    import ddpm
    kept = ddpm.space_timesteps(4000, "250")
    assert kept[:10] == [0, 16, 32, 48, 64, 80, 96, 112, 128, 145] and len(kept) == 250 and kept[-1] == 3999
    for T, n in ((1000, 50), (100, 7), (10, 10)):
        assert ddpm.space_timesteps(T, str(n)) == [round(i * (T - 1) / (n - 1)) for i in range(n)]


@pytest.mark.assignment("a3", points=1)
def test_section_respacing_hand_worked_cases():
    import ddpm
    assert ddpm.space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]      # sections 0..4 and 5..9
    assert ddpm.space_timesteps(11, "2,3") == [0, 5, 6, 8, 10]     # the first section gets the extra step
    assert ddpm.space_timesteps(12, "1,1,2") == [0, 4, 8, 11]
    with pytest.raises(ValueError):
        ddpm.space_timesteps(10, "6,1")                             # a section of 5 steps cannot keep 6


@pytest.mark.assignment("a3", points=1)
def test_ddim_respacing_uses_one_fixed_stride():
    import ddpm
    kept = ddpm.space_timesteps(4000, "ddim250")
    assert kept == list(range(0, 4000, 16)) and kept[-1] == 3984
    assert ddpm.space_timesteps(100, "ddim10") == list(range(0, 100, 10))
    assert ddpm.space_timesteps(10, "ddim10") == list(range(10))
    with pytest.raises(ValueError):
        ddpm.space_timesteps(10, "ddim7")                           # no stride gives exactly 7 steps


def reference_p_mean_variance(self, model, xt, t, clip=True, **kwargs):
    """eps from the network (at the ORIGINAL step), x_0 from Eq. 4, the posterior mean of Eq. 5 (float64)."""
    f64 = self.float64
    shape = (-1,) + (1,) * (xt.dim() - 1)
    col = lambda name: torch.tensor(f64[name])[t].reshape(shape)  # noqa: E731
    eps = model(xt, self.model_timesteps(t)).double()
    pred_x0 = (xt.double() - col("sqrt_one_minus_alphas_cumprod") * eps) / col("sqrt_alphas_cumprod")
    pred_x0 = pred_x0.clamp(-1, 1) if clip else pred_x0
    abar, abar_prev, betas = col("alphas_cumprod"), col("alphas_cumprod_prev"), col("betas")
    mean = (betas * abar_prev.sqrt() * pred_x0 + (1 - abar_prev) * (1 - betas).sqrt() * xt.double()) / (1 - abar)
    var = col("posterior_variance").expand_as(xt)
    return dict(mean=mean.float(), variance=var.float(), log_variance=torch.log(var.clamp(min=1e-20)).float(),
                pred_x0=pred_x0.float(), eps=eps.float())


def exact_model(x0_star):
    """The exact noise predictor of a data set with one point x0*, called with ORIGINAL step indices."""
    def model(x, t_model):
        a = torch.tensor(ABAR)[t_model].reshape(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0_star.double()) / (1 - a).sqrt()).float()
    return model


@pytest.mark.assignment("a3", points=2)
def test_ddim_step_of_an_exact_model_follows_the_closed_form(monkeypatch):
    import ddpm
    monkeypatch.setattr(ddpm.Diffusion, "p_mean_variance", reference_p_mean_variance)
    kept = [0, 2, 3, 5]                                    # respaced: chain step i is original step kept[i]
    d = ddpm.Diffusion(BETAS, learn_sigma=False, loss="simple", timesteps=kept)
    g = torch.Generator().manual_seed(4)
    x0_star = torch.rand(1, 2, 3, 3, generator=g) * 1.6 - 0.8
    e = torch.randn(4, 2, 3, 3, generator=g)
    z = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([3, 2, 1, 0])
    a = torch.tensor(ABAR[kept], dtype=torch.float64)[t].reshape(-1, 1, 1, 1)
    a_prev = torch.tensor(np.append(1.0, ABAR[kept][:-1]))[t].reshape(-1, 1, 1, 1)
    xt = (a.sqrt() * x0_star + (1 - a).sqrt() * e).float()
    for eta in (0.0, 1.0):
        out = d.ddim_step(exact_model(x0_star), xt, t, eta=eta, noise=z, clip=False)
        # Song et al. Eq. 12: x_{t-1} = sqrt(abar_{t-1}) x0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        nonzero = (t != 0).reshape(-1, 1, 1, 1)                         # no noise at the last step
        expected = a_prev.sqrt() * x0_star + (1 - a_prev - sigma ** 2).sqrt() * e + sigma * z * nonzero
        np.testing.assert_allclose(out["sample"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out["pred_x0"].numpy(), x0_star.expand(4, -1, -1, -1).numpy(), atol=1e-4)


@pytest.mark.assignment("a3", points=1)
def test_ddim_step_guidance_shifts_eps_by_sqrt_one_minus_abar_times_g(monkeypatch):
    import ddpm
    monkeypatch.setattr(ddpm.Diffusion, "p_mean_variance", reference_p_mean_variance)
    d = ddpm.Diffusion(BETAS, learn_sigma=False, loss="simple", timesteps=[0, 2, 3, 5])
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(3, 1, 2, 2, generator=g)
    eps = torch.randn(3, 1, 2, 2, generator=g)
    grad = torch.randn(3, 1, 2, 2, generator=g)
    t = torch.tensor([3, 2, 1])
    seen = []

    def cond_fn(x, t_model):
        seen.append(t_model.clone())
        return grad

    out = d.ddim_step(lambda x, tm: eps, xt, t, eta=0.0, cond_fn=cond_fn, clip=False)
    a = torch.tensor(ABAR[[0, 2, 3, 5]])[t].reshape(-1, 1, 1, 1)
    a_prev = torch.tensor(ABAR[[0, 2, 3]])[t - 1].reshape(-1, 1, 1, 1)
    eps_hat = eps.double() - (1 - a).sqrt() * grad.double()                # eps - sqrt(1 - abar_t) g
    x0_hat = (xt.double() - (1 - a).sqrt() * eps_hat) / a.sqrt()
    expected = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat
    np.testing.assert_allclose(out["sample"].numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert torch.equal(seen[0], torch.tensor([5, 3, 2]))                    # g at the ORIGINAL step index
