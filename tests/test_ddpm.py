"""Numbers of ddpm.py checked against closed forms, float64 numpy recomputations and hand cases."""
import math

import numpy as np
import pytest
import torch

import ddpm
from ddpm import Diffusion, get_betas, space_timesteps, timestep_probs, normal_kl, discretized_gaussian_log_likelihood


def cosine_alpha_bar_np(T, s=0.008):
    """Independent float64 abar of App. A.3 Eq. 10, before clipping beta."""
    t = np.arange(T + 1) / T
    f = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    return f / f[0]


class ConstModel:
    """model(x, t) -> fixed output; records the timesteps it was called with."""

    def __init__(self, out):
        self.out, self.seen = out, []

    def __call__(self, x, t):
        self.seen.append(t.clone())
        return self.out


# --- schedules -------------------------------------------------------------------------------

def test_cosine_schedule_facts_and_independent_recomputation():
    betas = get_betas("cosine", 4000)
    assert betas.dtype == np.float64 and betas.shape == (4000,)
    assert betas[0] == pytest.approx(9.8658e-06, rel=1e-4)   # Eq. 10, T = 4000 (App. C)
    assert betas[-1] == 0.999                                 # clipped
    abar = cosine_alpha_bar_np(4000)
    expected = np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    np.testing.assert_allclose(betas, expected, rtol=0, atol=1e-15)
    # Before the clip, abar of the schedule equals Eq. 10 exactly.
    np.testing.assert_allclose(np.cumprod(1 - betas)[:3990], abar[1:3991], rtol=1e-10)


def test_linear_schedule_scaled_by_1000_over_T():
    b = get_betas("linear", 1000)
    assert (b[0], b[-1]) == pytest.approx((1e-4, 0.02))
    b = get_betas("linear", 4000)
    assert (b[0], b[-1]) == pytest.approx((2.5e-5, 0.005))
    np.testing.assert_allclose(np.diff(b), (0.005 - 2.5e-5) / 3999)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown schedule"):
        get_betas("quadratic", 10)
    with pytest.raises(ValueError, match="positive"):
        get_betas("cosine", 0)


def test_space_timesteps_reference_semantics():
    kept = space_timesteps(4000, "250")
    assert len(kept) == 250
    assert kept[:10] == [0, 16, 32, 48, 64, 80, 96, 112, 128, 145]  # App. C; authors' released respacing
    assert kept[-1] == 3999
    ddim = space_timesteps(4000, "ddim250")
    assert len(ddim) == 250 and ddim[-1] == 3984 and ddim[1] == 16
    # Sections: 300 steps cut into 3 sections of 100; 10 / 15 / 20 evenly spread steps in each.
    sec = space_timesteps(300, "10,15,20")
    assert len(sec) == 45
    assert sec[:10] == list(range(0, 100, 11))
    assert sec[10] == 100 and sec[24] == 199 and sec[25] == 200 and sec[-1] == 299
    # Uneven split: 10 steps into 3 sections -> sizes 4, 3, 3.
    assert space_timesteps(10, "2,1,2") == [0, 3, 4, 7, 9]
    assert space_timesteps(1000, "1000") == list(range(1000))
    for bad in ("ddim999", "abc", "2000", "0"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


def test_timestep_probs_closed_form():
    assert np.array_equal(timestep_probs(8, 0.0), np.full(8, 1 / 8))          # the paper's uniform t
    assert np.allclose(timestep_probs(4, 2.0), np.array([1.0, 1.5, 2.0, 2.5]) / 7.0, rtol=0, atol=1e-15)  # 1 + 2 t / 4
    p = timestep_probs(1000, 4.0)
    assert p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12
    assert abs(p[-1] / p[0] - (1 + 4 * 999 / 1000)) < 1e-12                  # the noisiest step ~5x the cleanest
    assert abs(p[667:].sum() - sum(1 + 4 * t / 1000 for t in range(667, 1000)) / (1000 + 4 * 999 / 2)) < 1e-12
    with pytest.raises(ValueError, match=">= 0"):
        timestep_probs(10, -1.0)

# --- forward process and posterior ----------------------------------------------------------------

@pytest.fixture(scope="module")
def diff1000():
    return Diffusion(get_betas("cosine", 1000), learn_sigma=True)


def test_golden_values_at_0_mid_end(diff1000):
    abar = np.cumprod(1 - get_betas("cosine", 1000))
    for t in (0, 500, 999):
        assert diff1000.alphas_cumprod[t].item() == pytest.approx(abar[t], rel=1e-6, abs=1e-12)
    # Pinned numbers (cosine, T = 1000).
    assert diff1000.float64["alphas_cumprod"][0] == pytest.approx(0.99995872, rel=1e-7)
    assert diff1000.float64["alphas_cumprod"][500] == pytest.approx(0.49228517, rel=1e-7)
    assert diff1000.float64["alphas_cumprod"][999] < 1e-8
    assert diff1000.alphas_cumprod.dtype == torch.float32


def test_q_sample_exact_and_moments(diff1000):
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7)
    t = torch.full((200_000,), 300, dtype=torch.long)
    noise = torch.randn_like(x0)
    xt = diff1000.q_sample(x0, t, noise)
    abar = diff1000.float64["alphas_cumprod"][300]
    torch.testing.assert_close(xt, math.sqrt(abar) * 0.7 + math.sqrt(1 - abar) * noise)
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=5e-3)   # Eq. 4 mean
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)                 # Eq. 4 variance


def posterior_closed_form(abar_prev, abar, x0, xt):
    """Bayes on q(x_{t-1}|x_0) N(sqrt(abar_prev) x0, 1 - abar_prev) and q(x_t|x_{t-1}) N(sqrt(a) x, beta)."""
    alpha = abar / abar_prev
    beta = 1 - alpha
    precision = 1 / (1 - abar_prev) + alpha / beta
    var = 1 / precision
    mean = var * (math.sqrt(abar_prev) * x0 / (1 - abar_prev) + math.sqrt(alpha) * xt / beta)
    return mean, var


def test_q_posterior_is_the_gaussian_product(diff1000):
    rng = np.random.default_rng(0)
    x0, xt = rng.normal(size=(2, 4, 1, 3, 3))
    t = torch.tensor([1, 10, 500, 998])
    mean, var, logvar = diff1000.q_posterior(torch.tensor(x0, dtype=torch.float32),
                                             torch.tensor(xt, dtype=torch.float32), t)
    abar = diff1000.float64["alphas_cumprod"]
    for i, ti in enumerate(t.tolist()):
        m, v = posterior_closed_form(abar[ti - 1], abar[ti], x0[i], xt[i])
        np.testing.assert_allclose(mean[i].numpy(), m, rtol=1e-4, atol=1e-5)
        assert var[i].item() == pytest.approx(v, rel=1e-5)
        assert logvar[i].item() == pytest.approx(math.log(v), abs=1e-5)
    # t = 0: beta~_0 = 0, its log is clipped to the value at t = 1.
    _, var0, logvar0 = diff1000.q_posterior(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0]))
    assert var0.item() == 0.0
    assert logvar0.item() == pytest.approx(math.log(diff1000.float64["posterior_variance"][1]), rel=1e-6)


def test_mean_from_eps_matches_eq7_and_variance_interpolation_eq8(diff1000):
    torch.manual_seed(1)
    xt = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 2, 4, 4)
    v = torch.tensor([-1.0, 1.0, 0.0]).reshape(3, 1, 1, 1).expand(3, 2, 4, 4)
    t = torch.tensor([700, 700, 700])
    out = diff1000.p_mean_variance(ConstModel(torch.cat([eps, v], 1)), xt, t, clip=False)
    f = diff1000.float64
    beta, abar = f["betas"][700], f["alphas_cumprod"][700]
    eq7 = (xt - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)   # Eq. 7 with alpha_t = 1 - beta_t
    torch.testing.assert_close(out["mean"], eq7, rtol=1e-4, atol=1e-5)
    log_tilde = f["posterior_log_variance_clipped"][700]
    assert out["log_variance"][0].flatten()[0].item() == pytest.approx(log_tilde, rel=1e-5)      # v = 0
    assert out["log_variance"][1].flatten()[0].item() == pytest.approx(math.log(beta), rel=1e-5)  # v = 1
    assert out["log_variance"][2].flatten()[0].item() == pytest.approx(0.5 * (log_tilde + math.log(beta)), rel=1e-5)


# --- the variational bound -----------------------------------------------------------------------

def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    s1, s2 = math.sqrt(0.5), math.sqrt(2.0)
    expected = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    assert normal_kl(torch.tensor(m1), torch.tensor(lv1), m2, lv2).item() == pytest.approx(expected, rel=1e-6)
    assert normal_kl(torch.tensor(1.0), torch.tensor(0.3), 1.0, 0.3).item() == 0.0


def test_discretized_gaussian_matches_erf_and_normalises():
    levels = torch.linspace(-1, 1, 256)                      # every 8-bit value
    mean, log_scale = torch.tensor(0.1), torch.tensor(math.log(0.3))
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale).double()
    assert torch.exp(logp).sum().item() == pytest.approx(1.0, abs=1e-5)   # the bins tile the line
    x = levels.double().numpy()
    cdf = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))   # Python's float64 erf
    upper = np.where(x > 0.999, 1.0, cdf((x + 1 / 255 - 0.1) / 0.3))
    lower = np.where(x < -0.999, 0.0, cdf((x - 1 / 255 - 0.1) / 0.3))
    np.testing.assert_allclose(logp.numpy(), np.log(upper - lower), rtol=2e-4, atol=2e-5)


def test_vb_terms_equal_hand_kl_and_decoder(diff1000):
    torch.manual_seed(2)
    C = 1
    x0 = torch.randint(0, 256, (2, C, 2, 2)).float() / 127.5 - 1
    xt = torch.randn(2, C, 2, 2)
    eps = torch.randn(2, C, 2, 2)
    v = torch.rand(2, C, 2, 2) * 2 - 1
    model = ConstModel(torch.cat([eps, v], 1))
    t = torch.tensor([400, 0])
    vb = diff1000._vb_terms_bpd(model, x0, xt, t)["output"]
    f = diff1000.float64
    # t = 400: KL(q posterior || p_theta) by hand in float64, averaged over dims, in bits.
    ti = 400
    x0n, xtn, epsn, vn = (a[0].double().numpy() for a in (x0, xt, eps, v))
    true_mean, true_var = posterior_closed_form(f["alphas_cumprod"][ti - 1], f["alphas_cumprod"][ti], x0n, xtn)
    pred_x0 = xtn / math.sqrt(f["alphas_cumprod"][ti]) - math.sqrt(1 / f["alphas_cumprod"][ti] - 1) * epsn
    model_mean = f["posterior_mean_coef1"][ti] * pred_x0 + f["posterior_mean_coef2"][ti] * xtn
    frac = (vn + 1) / 2
    model_logvar = frac * math.log(f["betas"][ti]) + (1 - frac) * f["posterior_log_variance_clipped"][ti]
    kl = 0.5 * (-1 + model_logvar - np.log(true_var) + true_var / np.exp(model_logvar)
                + (true_mean - model_mean) ** 2 / np.exp(model_logvar))
    assert vb[0].item() == pytest.approx(kl.mean() / math.log(2), rel=1e-3)
    # t = 0: the decoder NLL -log p(x_0 | x_1) in bits/dim.
    out = diff1000.p_mean_variance(model, xt, torch.tensor([0, 0]), clip=False)
    nll = -discretized_gaussian_log_likelihood(x0[1], out["mean"][1], 0.5 * out["log_variance"][1]).mean()
    assert vb[1].item() == pytest.approx(nll.item() / math.log(2), rel=1e-5)


class ParamModel(torch.nn.Module):
    """Outputs learnable eps and v maps directly, to follow gradients into each half."""

    def __init__(self, shape):
        super().__init__()
        self.eps = torch.nn.Parameter(torch.randn(shape))
        self.v = torch.nn.Parameter(torch.rand(shape) * 2 - 1)

    def forward(self, x, t):
        return torch.cat([self.eps, self.v], 1)


def test_hybrid_loss_stop_gradient_on_the_mean(diff1000):
    torch.manual_seed(3)
    model = ParamModel((2, 1, 4, 4))
    x0, noise = torch.rand(2, 1, 4, 4) * 2 - 1, torch.randn(2, 1, 4, 4)
    t = torch.tensor([10, 600])
    terms = diff1000.training_losses(model, x0, t, noise)
    g_eps, g_v = torch.autograd.grad(terms["vb"].sum(), [model.eps, model.v], allow_unused=True)
    assert g_eps is None or torch.count_nonzero(g_eps) == 0      # vb never moves the mean
    assert torch.count_nonzero(g_v) > 0                          # it trains the variance
    g_eps, g_v = torch.autograd.grad(terms["mse"].sum(), [model.eps, model.v], allow_unused=True)
    assert g_v is None or torch.count_nonzero(g_v) == 0
    # L_hybrid = L_simple + vb T/1000 and mse is the per-example mean squared noise error.
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    torch.testing.assert_close(terms["mse"], ((noise - model.eps) ** 2).mean((1, 2, 3)))
    xt = diff1000.q_sample(x0, t, noise)
    raw = diff1000._vb_terms_bpd(model, x0, xt, t)["output"]
    torch.testing.assert_close(terms["vb"], raw * 1.0)     # T / 1000 = 1 here
    d4000 = Diffusion(get_betas("cosine", 4000))
    xt = d4000.q_sample(x0, t, noise)
    torch.testing.assert_close(d4000.training_losses(model, x0, t, noise)["vb"],
                               d4000._vb_terms_bpd(model, x0, xt, t)["output"] * 4.0)


def test_simple_and_kl_losses():
    betas = get_betas("cosine", 100)
    torch.manual_seed(4)
    x0, noise, t = torch.rand(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([3, 50])
    eps = torch.randn(2, 1, 2, 2)
    simple = Diffusion(betas, learn_sigma=False, loss="simple").training_losses(ConstModel(eps), x0, t, noise)
    torch.testing.assert_close(simple["loss"], ((noise - eps) ** 2).mean((1, 2, 3)))
    kl_d = Diffusion(betas, learn_sigma=False, loss="kl")
    kl = kl_d.training_losses(ConstModel(eps), x0, t, noise)
    torch.testing.assert_close(kl["loss"], kl["vb"] * 100)
    with pytest.raises(ValueError, match="trains no variance"):
        Diffusion(betas, learn_sigma=True, loss="simple")


def test_prior_bpd_closed_form(diff1000):
    x0 = torch.full((1, 1, 1, 1), 0.5)
    abar = diff1000.float64["alphas_cumprod"][-1]
    m, var = math.sqrt(abar) * 0.5, 1 - abar
    expected = 0.5 * (-1 - math.log(var) + var + m ** 2) / math.log(2)
    assert diff1000.prior_bpd(x0).item() == pytest.approx(expected, abs=1e-6)


# --- respacing --------------------------------------------------------------------------------------

def test_respaced_chain_is_the_sub_chain():
    betas = get_betas("cosine", 1000)
    abar_full = np.cumprod(1 - betas)
    kept = space_timesteps(1000, "50")
    d = Diffusion(betas, timesteps=kept)
    assert d.num_timesteps == 50 and d.timestep_map == kept
    np.testing.assert_allclose(d.float64["alphas_cumprod"], abar_full[kept], rtol=1e-10)  # same marginals
    rng = np.random.default_rng(5)
    x0, xt = rng.normal(size=(2, 1, 3))
    for i in (1, 7, 49):
        mean, var, _ = d.q_posterior(torch.tensor(x0, dtype=torch.float32), torch.tensor(xt, dtype=torch.float32),
                                     torch.tensor([i]))
        m, v = posterior_closed_form(abar_full[kept[i - 1]], abar_full[kept[i]], x0, xt)
        np.testing.assert_allclose(mean.numpy(), m, rtol=1e-4, atol=1e-5)
        assert var.item() == pytest.approx(v, rel=1e-5)
    # The network is always called with the ORIGINAL step index.
    model = ConstModel(torch.zeros(1, 2, 3))
    d.p_mean_variance(model, torch.zeros(1, 1, 3), torch.tensor([7]))
    assert model.seen[-1].tolist() == [kept[7]]


# --- samplers ----------------------------------------------------------------------------------------

class ExactEps:
    """The exact noise predictor for data that is a single point x_star: eps = (x - sqrt(abar) x*) / sqrt(1 - abar)."""

    def __init__(self, x_star, abar_full, learn_sigma=False):
        self.x_star, self.abar, self.learn_sigma = x_star, torch.tensor(abar_full), learn_sigma

    def __call__(self, x, t):
        a = self.abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def test_guidance_shift_is_variance_times_gradient(diff1000):
    torch.manual_seed(6)
    out = torch.cat([torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) * 2 - 1], 1)
    xt, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    g = torch.randn(2, 1, 4, 4)
    t = torch.tensor([0, 321])
    seen = []
    cond_fn = lambda x, tm: (seen.append(tm.clone()), g)[1]  # noqa: E731
    plain = diff1000.p_sample(ConstModel(out), xt, t, noise=noise)
    guided = diff1000.p_sample(ConstModel(out), xt, t, noise=noise, cond_fn=cond_fn)
    torch.testing.assert_close(guided["mean"] - plain["mean"], plain["variance"] * g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided["sample"] - plain["sample"], plain["variance"] * g, rtol=1e-5, atol=1e-6)
    assert seen[0].tolist() == [0, 321]
    # Step t = 0 returns the (guided) mean without noise.
    torch.testing.assert_close(guided["sample"][0], guided["mean"][0])


def test_ddim_guidance_shifts_eps_by_sqrt_one_minus_abar(diff1000):
    torch.manual_seed(7)
    eps = torch.randn(1, 1, 3, 3)
    xt, g = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    t = torch.tensor([250])
    model = ConstModel(torch.cat([eps, torch.zeros_like(eps)], 1))
    guided = diff1000.ddim_step(model, xt, t, cond_fn=lambda x, tm: g, clip=False)
    abar = diff1000.float64["alphas_cumprod"][250]
    shifted = eps - math.sqrt(1 - abar) * g
    torch.testing.assert_close(guided["eps"], shifted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided["pred_x0"], (xt - math.sqrt(1 - abar) * shifted) / math.sqrt(abar),
                               rtol=1e-4, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_inverts_an_exact_model():
    # For data that is a single point x*, the exact eps keeps the noise direction fixed along the
    # DDIM path: x_s = sqrt(abar_s) x* + sqrt(1 - abar_s) e for one e. So encoding and decoding are
    # exact, and x_T has a closed form.
    betas = get_betas("cosine", 1000)
    abar_full = np.cumprod(1 - betas)
    kept = space_timesteps(1000, "ddim50")
    d = Diffusion(betas, learn_sigma=True, timesteps=kept)
    torch.manual_seed(8)
    x_star = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    model = ExactEps(x_star, abar_full, learn_sigma=True)
    e = torch.randn_like(x_star)
    x_s = d.q_sample(x_star, torch.full((2,), 10), e)                  # a noisy image at chain step 10
    # Encode from step 10 (start_t) to x_T: the noise direction is kept.
    xT = d.ddim_invert(model, x_s, start_t=10)
    torch.testing.assert_close(xT, d.q_sample(x_star, torch.full((2,), 49), e), rtol=0, atol=1e-4)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = d.sample_loop(model, x_star.shape, sampler="ddim", eta=0.0, noise=xT, generator=g1, progress=False, stop_t=10)
    b = d.sample_loop(model, x_star.shape, sampler="ddim", eta=0.0, noise=xT, generator=g2, progress=False, stop_t=10)
    assert torch.equal(a, b)                              # eta = 0: no randomness used
    torch.testing.assert_close(a, x_s, rtol=0, atol=1e-4)  # decode(encode(x_s)) = x_s
    # From a clean image: step 0 sees x_0 as x_t, so e = eps(x*, 0); decoding all the way lands on x*.
    xT = d.ddim_invert(model, x_star)
    a0 = abar_full[kept[0]]
    e0 = x_star * (1 - math.sqrt(a0)) / math.sqrt(1 - a0)
    torch.testing.assert_close(xT, d.q_sample(x_star, torch.full((2,), 49), e0), rtol=0, atol=1e-5)
    back = d.sample_loop(model, x_star.shape, sampler="ddim", noise=xT, progress=False)
    torch.testing.assert_close(back, x_star, rtol=0, atol=1e-4)


def test_ancestral_sampling_is_seeded_and_exact_model_lands_on_the_data():
    betas = get_betas("cosine", 200)
    d = Diffusion(betas, learn_sigma=False, loss="simple", timesteps=space_timesteps(200, "20"))
    x_star = torch.tensor([-0.5, 0.25]).reshape(1, 2, 1, 1).expand(3, 2, 2, 2).contiguous()
    model = ExactEps(x_star, np.cumprod(1 - betas))
    s1 = d.sample_loop(model, x_star.shape, generator=torch.Generator().manual_seed(0), progress=False)
    s2 = d.sample_loop(model, x_star.shape, generator=torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(s1, x_star, rtol=0, atol=1e-3)


def test_unknown_loss_and_sampler():
    with pytest.raises(ValueError, match="unknown loss"):
        Diffusion(get_betas("cosine", 10), loss="l1")
    with pytest.raises(ValueError, match="unknown sampler"):
        Diffusion(get_betas("cosine", 10)).sample_loop(None, (1, 1), sampler="euler")


def test_cli_prints_facts():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, ddpm.__file__, "--T", "4000", "--sample-steps", "ddim250"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "beta_1 = 9.86582e-06" in r.stdout and "3984" in r.stdout
    r = subprocess.run([sys.executable, ddpm.__file__, "--sample-steps", "ddim999"], capture_output=True, text=True)
    assert r.returncode == 2 and "--sample-steps" in r.stderr and "Traceback" not in r.stderr


# --- the loss resolved by noise level (a diagnostic) ------------------------------------------

def test_losses_by_timestep_against_training_losses_and_an_exact_model():
    """Each t's numbers are training_losses averaged with the noise of Generator(seed + t); batching does
    not change them; a model that returns the exact noise of each x_t has mse 0; t >= T is refused."""
    d = Diffusion(get_betas("cosine", 100), learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    w = torch.randn(6, 3, 1, 1, generator=g) * 0.3
    net = lambda x, t: torch.tanh((w[None] * x.repeat(1, 2, 1, 1)[:, :, None]).sum(2) + t[:, None, None, None] / 100.0)  # noqa: E731
    ts = [0, 7, 50, 99]
    got = d.losses_by_timestep(net, x0, ts, seed=3, batch=2)
    assert got["t"] == ts and got == d.losses_by_timestep(net, x0, ts, seed=3, batch=5)
    for k, t in enumerate(ts):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3 + t))
        terms = d.training_losses(net, x0, torch.full((5,), t), noise)
        assert got["mse"][k] == pytest.approx(float(terms["mse"].double().mean()), rel=1e-6)
        assert got["vb"][k] == pytest.approx(float(terms["vb"].double().mean()), rel=1e-6)

    def exact(x, t):  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar), and v = 0
        a = torch.as_tensor(d.alphas_cumprod, dtype=torch.float64)[t][:, None, None, None]
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        return torch.cat([eps.float(), torch.zeros_like(x)], dim=1)
    assert max(d.losses_by_timestep(exact, x0, [10, 50, 99], batch=5)["mse"]) < 1e-9
    with pytest.raises(ValueError, match="outside this diffusion's chain 0 .. 99"):
        d.losses_by_timestep(net, x0, [100])


def test_a_chain_needs_two_steps():
    """check_chain: the kept steps, or a ValueError for a chain of fewer than 2 (Diffusion refuses it too:
    a reverse step reads beta~ at chain index 1)."""
    from ddpm import check_chain
    assert check_chain(1000, "2") == [0, 999]
    assert check_chain(10) == list(range(10))
    assert check_chain(1000, "50") == space_timesteps(1000, "50")
    for T, spec in ((1000, "1"), (1, None), (1, "1")):
        with pytest.raises(ValueError, match="at least 2 steps"):
            check_chain(T, spec)
    with pytest.raises(ValueError, match="at least 2 steps"):
        Diffusion(get_betas("cosine", 1000), timesteps=[500])
    with pytest.raises(ValueError, match="at least 2 steps"):
        Diffusion(get_betas("cosine", 1))


# --- the velocity parameterisation (Salimans & Ho 2022; the circles CPU preset) ----------------------

def test_velocity_output_gives_back_eps_and_x0_in_float64():
    """A network that outputs the exact velocity u = sqrt(abar) eps - sqrt(1 - abar) x0 of x_t yields the
    exact eps and x0 (and so Eq. 7's mean of the eps network that outputs that eps), for learned and fixed
    variance, against float64 numpy."""
    betas = get_betas("cosine", 100)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1, torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 50, 98])
    for learn_sigma in (True, False):
        d = Diffusion(betas, learn_sigma=learn_sigma, loss="hybrid" if learn_sigma else "simple", prediction="velocity")
        e = Diffusion(betas, learn_sigma=learn_sigma, loss="hybrid" if learn_sigma else "simple")
        xt = d.q_sample(x0, t, noise)
        a = np.sqrt(d.float64["alphas_cumprod"][t.numpy()])[:, None, None, None]
        xtn = a * x0.double().numpy() + np.sqrt(1 - a ** 2) * noise.double().numpy()
        u = a * noise.double().numpy() - np.sqrt(1 - a ** 2) * x0.double().numpy()   # the velocity, float64
        np.testing.assert_allclose(d.velocity(x0, t, noise).double().numpy(), u, atol=1e-6)
        extra = [torch.zeros(4, 3, 4, 4)] if learn_sigma else []
        out = d.p_mean_variance(ConstModel(torch.cat([torch.tensor(u, dtype=torch.float32), *extra], 1)), xt, t, clip=False)
        np.testing.assert_allclose(out["eps"].double().numpy(), noise.double().numpy(), atol=2e-5)
        np.testing.assert_allclose(out["pred_x0"].double().numpy(), x0.double().numpy(), atol=2e-5)
        same = e.p_mean_variance(ConstModel(torch.cat([out["eps"], *extra], 1)), xt, t, clip=False)
        torch.testing.assert_close(out["mean"], same["mean"], rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(out["log_variance"], same["log_variance"])
        assert np.abs(xtn - xt.double().numpy()).max() < 1e-5


def test_velocity_loss_is_the_eps_loss_over_abar_and_its_vb_trains_only_v():
    """u_theta = u + delta is the eps network eps + sqrt(abar) delta: L_simple of the velocity is mean delta^2,
    the eps network's is abar mean delta^2 (the ratio 1 / abar_t, closed form); the L_vlb terms agree, and
    under L_hybrid the velocity output gets exactly L_simple's gradient."""
    betas = get_betas("cosine", 100)
    dv, de = Diffusion(betas, prediction="velocity"), Diffusion(betas)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1, torch.randn(3, 1, 4, 4, generator=g)
    delta, v = 0.1 * torch.randn(3, 1, 4, 4, generator=g), torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([5, 40, 90])
    xt = dv.q_sample(x0, t, noise)
    a = dv._extract(dv.sqrt_alphas_cumprod, t, xt)
    pred = (dv.velocity(x0, t, noise) + delta).requires_grad_(True)
    lv = dv.training_losses(ConstModel(torch.cat([pred, v], 1)), x0, t, noise)
    eps_net = (a * pred + dv._extract(dv.sqrt_one_minus_alphas_cumprod, t, xt) * xt).detach()
    le = de.training_losses(ConstModel(torch.cat([eps_net, v], 1)), x0, t, noise)
    mean_d2 = (delta ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lv["mse"], mean_d2, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(le["mse"], mean_d2 * (a.flatten() ** 2), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(lv["vb"], le["vb"], rtol=1e-3, atol=1e-5)
    lv["loss"].sum().backward()
    torch.testing.assert_close(pred.grad, 2 * delta / delta[0].numel(), rtol=1e-3, atol=1e-6)


def test_a_diffusion_config_without_prediction_predicts_eps():
    d = dict(schedule="cosine", T=50, learn_sigma=True, loss="hybrid", respacing="")
    assert ddpm.diffusion_from_config(d).prediction == "eps"                     # checkpoints written before it
    assert ddpm.diffusion_from_config(dict(d, prediction="velocity"), "10").prediction == "velocity"
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        Diffusion(get_betas("cosine", 50), prediction="x0")
