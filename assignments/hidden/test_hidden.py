"""Hidden tests, one per graded assignment: each checks a value against a closed form that the
public tests do not spell out. Instructor only (never in a student copy)."""
import math

import numpy as np
import pytest
import torch


@pytest.mark.assignment("a1", points=1)
def test_cosine_abar_is_the_ratio_of_f_at_every_quarter():
    # prod_{i <= t} (1 - beta_i) telescopes to f(t) / f(0) wherever the 0.999 clip is not reached
    import ddpm
    T, s = 4000, 0.008
    abar = np.cumprod(1.0 - ddpm.get_betas("cosine", T))
    for t in (T // 4, T // 2, 3 * T // 4):
        closed = math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
        assert abar[t - 1] == pytest.approx(closed, rel=1e-9)


@pytest.mark.assignment("a2", points=1)
def test_normal_kl_closed_form_for_shifted_wider_gaussian():
    # KL(N(0, 1) || N(1, e^2)) = 0.5 (-1 + 2 + e^-2 + e^-2) = 0.5 + e^-2; and 0 between equal Gaussians
    import ddpm
    kl = ddpm.normal_kl(torch.zeros(3), torch.zeros(3), torch.ones(3), torch.full((3,), 2.0))
    np.testing.assert_allclose(kl.numpy(), np.full(3, 0.5 + math.exp(-2.0)), rtol=1e-6)
    same = ddpm.normal_kl(torch.tensor([0.3, -2.0]), torch.tensor([0.1, -1.0]), torch.tensor([0.3, -2.0]),
                          torch.tensor([0.1, -1.0]))
    assert torch.allclose(same, torch.zeros(2), atol=1e-7)


@pytest.mark.assignment("a3", points=1)
def test_ddim_respacing_is_a_fixed_stride():
    import ddpm
    assert ddpm.space_timesteps(100, "ddim25") == list(range(0, 100, 4))
    assert ddpm.space_timesteps(12, "ddim12") == list(range(12))
    with pytest.raises(ValueError):
        ddpm.space_timesteps(10, "11")                   # more steps than the chain has


@pytest.mark.assignment("a4", points=1)
def test_timestep_embedding_at_zero_is_ones_then_zeros():
    # cos(0) = 1 on the first half, sin(0) = 0 on the second, and an odd dim ends with the zero pad
    import unet
    emb = unet.timestep_embedding(torch.tensor([0, 0]), 7)
    assert emb.shape == (2, 7)
    assert emb.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]] * 2


class Logistic(torch.nn.Module):
    """Two classes, logits (0, w . x): log p(1 | x) has the gradient (1 - sigmoid(w . x)) w."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x, t):
        z = x.reshape(x.shape[0], -1) @ self.w
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.mark.assignment("a5", points=1)
def test_guidance_grad_of_a_logistic_classifier():
    import multiguide
    w = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    x = torch.tensor([[0.2, 0.1, -0.3, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    grad = multiguide.multi_guidance_grad(Logistic(w), x, torch.tensor([5, 9]), [0.0, 3.0])
    z = x.reshape(2, -1) @ w
    expected = 3.0 * (1 - torch.sigmoid(z))[:, None] * w[None, :]
    np.testing.assert_allclose(grad.reshape(2, -1).detach().numpy(), expected.numpy(), rtol=1e-9)


@pytest.mark.assignment("a6", points=1)
def test_one_score_per_bin_is_uniform_and_one_bin_is_log_bins():
    import evaluate
    centres = (np.arange(8) + 0.5) / 8
    h = evaluate.histogram_vs_uniform(centres, bins=8)
    assert list(h["counts"]) == [1] * 8
    assert h["mse"] == pytest.approx(0.0, abs=1e-12) and h["kld"] == pytest.approx(0.0, abs=1e-12)
    h = evaluate.histogram_vs_uniform([0.51, 0.52, 0.53], bins=8)   # all mass in one of 8 bins
    assert h["kld"] == pytest.approx(math.log(8)) and h["mse"] == pytest.approx(math.sqrt(7 / 8))


@pytest.mark.assignment("a7", points=1)
def test_chernoff_tail_at_k_equals_n_is_p_to_the_n():
    import filter_data
    for n, p in ((20, 0.3), (7, 0.9)):
        assert filter_data.chernoff_tail(n, p, n) == pytest.approx(p ** n, rel=1e-9)
    assert filter_data.chernoff_tail(50, 0.2, 10) == 1.0            # k = np exactly: the bound is 1
