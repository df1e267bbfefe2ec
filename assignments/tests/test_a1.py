"""a1 -- schedules and the forward process: ddpm.get_betas (App. A.3 Eq. 10, and the linear schedule of
Ho et al.) and ddpm.Diffusion.q_sample (App. A.1 Eq. 4).

The cosine schedule is checked against values of Eq. 10 computed once at 40 digits and stored here; q_sample
against Eq. 4 in float64 numpy.
Diffusions are built from hand-written betas, never from get_betas, so that q_sample is graded even
when get_betas is not written yet.
"""
import numpy as np
import pytest
import torch


# Eq. 10 evaluated once at 40 significant digits (mpmath), stored here rather than recomputed: T = 10 at
# every step, T = 1000 and 4000 at seven steps from the first to the last (0-based indices, beta_1 first).
COSINE = {
    10: (list(range(10)), [0.027907262886030826, 0.075493637296722584, 0.12439598636904837, 0.17718952540157394,
                           0.23728153019052486, 0.30988344010857231, 0.40400314303967557, 0.53699817764288509,
                           0.74382936689542715, 0.999]),
    1000: ([0, 1, 250, 500, 750, 998, 999],
           [4.1284224821777802e-5, 4.6141752736694508e-5, 0.0013272239542118194, 0.0031556914415850029,
            0.0075791226547337291, 0.74999939290116203, 0.999]),
    4000: ([0, 1, 1000, 2000, 3000, 3998, 3999],
           [9.8658188135916325e-6, 1.0169414884318671e-5, 0.00033143349273653394, 0.00078893555351058431,
            0.0018970293898134461, 0.74999996205638022, 0.999]),
}


@pytest.mark.assignment("a1", points=2)
def test_cosine_schedule_is_eq10_in_float64():
    import ddpm
    for T, (steps, expected) in COSINE.items():
        betas = ddpm.get_betas("cosine", T)
        assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (T,)
        np.testing.assert_allclose(betas[steps], expected, rtol=1e-8, atol=1e-14)
    betas = ddpm.get_betas("cosine", 4000)
    assert betas[0] == pytest.approx(9.8658e-06, rel=1e-4)   # golden value, the paper's T = 4000
    assert betas[-1] == 0.999                                # abar_T = 0: the clip keeps beta_T finite
    assert np.all(np.diff(betas) > 0)                        # noise is added faster and faster


@pytest.mark.assignment("a1", points=1)
def test_linear_schedule_from_1e4_to_002_scaled_by_1000_over_T():
    import ddpm
    for T, first, last in ((1000, 1e-4, 0.02), (4000, 2.5e-5, 0.005), (250, 4e-4, 0.08)):
        betas = ddpm.get_betas("linear", T)
        assert isinstance(betas, np.ndarray) and betas.dtype == np.float64 and betas.shape == (T,)
        assert betas[0] == pytest.approx(first, rel=1e-12) and betas[-1] == pytest.approx(last, rel=1e-12)
        np.testing.assert_allclose(np.diff(betas), (last - first) / (T - 1), rtol=1e-9)   # evenly spaced


@pytest.mark.assignment("a1", points=2)
def test_q_sample_is_eq4_at_every_step_and_after_respacing():
    import ddpm
    betas = np.array([0.01, 0.05, 0.2, 0.5, 0.9])           # a hand-written schedule
    abar = np.cumprod(1.0 - betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 2, 3, 4])
    d = ddpm.Diffusion(betas, learn_sigma=False, loss="simple")
    xt = d.q_sample(x0, t, noise)
    a = abar[t.numpy()][:, None, None, None]
    expected = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()   # Eq. 4
    assert xt.shape == x0.shape and xt.dtype == torch.float32
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-6)
    # a respaced chain keeps steps 0, 2, 4: its step 1 is the original step 2, with the same abar
    r = ddpm.Diffusion(betas, learn_sigma=False, loss="simple", timesteps=[0, 2, 4])
    xt = r.q_sample(x0[:3], torch.tensor([0, 1, 2]), noise[:3])
    a = abar[[0, 2, 4]][:, None, None, None]
    expected = np.sqrt(a) * x0[:3].double().numpy() + np.sqrt(1 - a) * noise[:3].double().numpy()
    np.testing.assert_allclose(xt.numpy(), expected, rtol=1e-5, atol=1e-6)
