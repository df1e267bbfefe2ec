"""a5 -- multi-guidance: the gradient g = grad_x sum_m lambda_m log p(y_m | x_t, t)
(multiguide.multi_guidance_grad; Sec. 4.2, Eq. 2) and the guided ancestral mean mu + Sigma g
(ddpm.Diffusion.p_sample with cond_fn; Sec. 2.2).

The classifier here is linear in x, logits = (1 + t / 10) (W x + c), so the gradient has a closed
form: g_b = (1 + t_b / 10) W^T (lambda - (sum_m lambda_m) softmax(logits_b)). The p_sample test
replaces p_mean_variance (assignment a2's q_posterior lives inside it) by fixed numbers.
"""
import numpy as np
import pytest
import torch


class LinearClassifier(torch.nn.Module):
    """logits (B, K) = (1 + t / 10) (W flatten(x) + c), in float64."""

    def __init__(self, num_classes, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes
        self.W = torch.nn.Parameter(torch.randn(num_classes, dim, generator=g, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.randn(num_classes, generator=g, dtype=torch.float64))

    def forward(self, x, t):
        return (1 + t.double()[:, None] / 10) * (x.reshape(x.shape[0], -1) @ self.W.T + self.c)


def closed_form_grad(clf, x, t, lam):
    """float64 numpy: s W^T (lambda - (sum lambda) softmax(s (W x + c))), s = 1 + t / 10, per sample."""
    W, c = clf.W.detach().numpy(), clf.c.detach().numpy()
    xs, s = x.reshape(x.shape[0], -1).numpy(), 1 + t.double().numpy() / 10
    logits = s[:, None] * (xs @ W.T + c)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), p.shape)
    g = s[:, None] * ((lam - lam.sum(axis=1, keepdims=True) * p) @ W)
    return g.reshape(x.shape)


@pytest.mark.assignment("a5", points=3)
def test_multi_guidance_grad_is_the_sum_of_the_class_scores():
    import multiguide
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 1, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, 10, 50])
    for K, lam in ((2, [2.0, 5.0]), (2, [30.0, 30.0]), (3, [1.5, -0.5, 3.0]), (2, [0.0, 0.0])):
        clf = LinearClassifier(K, 6, seed=K)
        x_before = x.clone()
        grad = multiguide.multi_guidance_grad(clf, x, t, lam)
        assert grad.shape == x.shape
        np.testing.assert_allclose(grad.detach().numpy(), closed_form_grad(clf, x, t, lam), rtol=1e-7, atol=1e-9)
        assert torch.equal(x, x_before) and x.grad is None                  # x itself is left alone
    lam_b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [0.5, 4.0]], dtype=torch.float64)  # per-sample weights
    clf = LinearClassifier(2, 6, seed=9)
    grad = multiguide.multi_guidance_grad(clf, x, t, lam_b)
    np.testing.assert_allclose(grad.detach().numpy(), closed_form_grad(clf, x, t, lam_b.numpy()), rtol=1e-7, atol=1e-9)


@pytest.mark.assignment("a5", points=2)
def test_p_sample_shifts_the_mean_by_sigma_times_g(monkeypatch):
    import ddpm
    betas = np.linspace(0.05, 0.5, 8)
    d = ddpm.Diffusion(betas, learn_sigma=True, loss="hybrid", timesteps=[0, 3, 7])
    g = torch.Generator().manual_seed(8)
    shape = (3, 2, 2, 2)
    mean, var = torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.1
    fixed = dict(mean=mean, variance=var, log_variance=var.log(), pred_x0=torch.zeros(shape), eps=torch.zeros(shape))
    monkeypatch.setattr(ddpm.Diffusion, "p_mean_variance", lambda self, model, xt, t, clip=True, **kw: dict(fixed))
    xt, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([2, 1, 0])
    seen = []

    def cond_fn(x, t_model):
        seen.append((x.clone(), t_model.clone()))
        return 0.5 * x + 1.0                                               # a gradient that depends on x

    out = d.p_sample(lambda x, tm: None, xt, t, cond_fn=cond_fn, noise=z)
    guided = mean + var * (0.5 * xt + 1.0)                                 # Sec. 2.2: mu + Sigma g, g at x_t
    nonzero = (t != 0).float().reshape(-1, 1, 1, 1)                        # no noise at the last step
    np.testing.assert_allclose(out["mean"].numpy(), guided.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["sample"].numpy(), (guided + nonzero * var.sqrt() * z).numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(seen[0][1], torch.tensor([7, 3, 0]))                # g at the ORIGINAL step index
    assert torch.equal(seen[0][0], xt)
