"""Tests for interpolants.py: ProbGEORCE against direct linear solves, autograd and hand computations."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm
import interpolants as ip
from conftest import ENV, ROOT

F64 = torch.float64


def quadratic(c):
    """S(z) = 1/2 ||z - c||^2 on a batch, and its gradient z - c."""
    return ip.Regulariser(lambda z: 0.5 * ((z - c) ** 2).sum(1), lambda z: z - c)


def tridiagonal_minimiser(a, b, c, n, lam_t, A):
    """Independent float64 solve of grad E = 0 for E = sum u_i^T A u_i + lam~/2 sum ||z_i - c||^2:
    2A(2 z_i - z_{i-1} - z_{i+1}) + lam~ (z_i - c) = 0, i = 1..N-1, with z_0 = a, z_N = b."""
    K, d = n - 1, len(a)
    L = 2 * np.eye(K) - np.eye(K, k=1) - np.eye(K, k=-1)              # path Laplacian
    M = 2 * np.kron(L, A) + lam_t * np.eye(K * d)                      # (K d, K d) block tridiagonal
    rhs = np.tile(lam_t * c, K)
    rhs[:d] += 2 * A @ a                                               # boundary z_0 = a
    rhs[-d:] += 2 * A @ b                                              # boundary z_N = b
    return np.linalg.solve(M, rhs).reshape(K, d)


def endpoints(d=3, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype), \
        torch.randn(d, generator=g, dtype=dtype)


def test_quadratic_S_euclidean_minimiser_matches_tridiagonal_solve():
    a, b, c = endpoints()
    reg = quadratic(c)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=8, lam=0.7, tol=1e-9, max_iter=2000)
    assert info["stop"] in ("tol", "no_descent") and info["grad_norm"] < 1e-7   # float64's limit on E
    z = tridiagonal_minimiser(a.numpy(), b.numpy(), c.numpy(), 8, info["lam_tilde"], np.eye(3))
    np.testing.assert_allclose(curve[1:-1].numpy(), z, atol=1e-6, rtol=0)


def test_lam_zero_returns_the_straight_line():
    a, b, _ = endpoints(5)
    reg = ip.chi2_norm(5)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=6, lam=0.0)
    assert info["iterations"] == 0 and info["stop"] == "tol" and info["lam_tilde"] == 0.0
    assert torch.equal(curve, ip.lerp(a, b, 6))


def test_endpoints_exact_and_steps_sum_to_b_minus_a_at_every_iteration():
    a, b, _ = endpoints(16, seed=1)
    reg, seen = ip.chi2_norm(16), []

    def check(k, curve, u_hat):
        assert torch.equal(curve[0], a) and torch.equal(curve[-1], b)                    # z_0 = a, z_N = b
        torch.testing.assert_close((curve[1:] - curve[:-1]).sum(0), b - a, atol=1e-12, rtol=0)  # sum u_i
        torch.testing.assert_close(u_hat.sum(0), b - a, atol=1e-12, rtol=0)              # sum u-hat_i (Prop. 3.2)
        seen.append(k)

    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=6, lam=1.0, callback=check)
    assert seen == list(range(info["iterations"])) and len(seen) >= 3
    assert torch.equal(curve[0], a) and torch.equal(curve[-1], b)


def test_energy_never_increases_and_float32_ends_stay_exact():
    a, b, _ = endpoints(64, seed=2, dtype=torch.float32)
    reg = ip.chi2_norm(64)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=10, lam=10.0)
    E = np.array(info["energies"])
    assert len(E) == info["iterations"] + 1 and np.all(np.diff(E) <= 0) and E[-1] < E[0]
    assert len(info["step_sizes"]) == info["iterations"] and all(0 < t <= 1 for t in info["step_sizes"])
    assert curve.dtype == torch.float32 and torch.equal(curve[0], a) and torch.equal(curve[-1], b)
    assert info["stop"] == "tol" and info["grad_norm"] <= 1e-4


def test_chi2_S_is_the_chi2_log_density_and_its_gradient_matches_autograd():
    d = 7
    z = torch.randn(4, d, dtype=F64, generator=torch.Generator().manual_seed(3)) * 2
    reg = ip.chi2_norm(d)
    expected = -torch.distributions.Chi2(torch.tensor(float(d), dtype=F64)).log_prob((z ** 2).sum(1))
    torch.testing.assert_close(reg.S(z), expected, atol=1e-12, rtol=0)
    zz = z.clone().requires_grad_(True)
    auto = torch.autograd.grad(reg.S(zz).sum(), zz)[0]
    torch.testing.assert_close(reg.grad_S(z), auto, atol=1e-12, rtol=0)
    # grad S = z (1 - (d - 2)/||z||^2) vanishes on the shell ||z||^2 = d - 2
    shell = torch.ones(1, d, dtype=F64) * math.sqrt((d - 2) / d)
    assert float(reg.grad_S(shell).abs().max()) < 1e-14


def test_lam_tilde_is_lam_E0_over_abs_sum_S_on_the_line():
    a = torch.tensor([3.0, 0.0, 0.0, 1.0], dtype=F64)
    b = torch.tensor([0.0, 2.0, 0.0, -1.0], dtype=F64)
    reg, n, lam = ip.chi2_norm(4), 5, 0.3
    _, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=n, lam=lam, max_iter=1)
    E0 = float(((b - a) ** 2).sum()) / n                              # the line: n steps of (b - a)/n
    total = 0.0
    for k in range(1, n):                                             # interior points only
        x = float(((a + k / n * (b - a)) ** 2).sum())
        total += math.log(4.0) + math.lgamma(2.0) - math.log(x) + x / 2   # -log chi^2_4(x)
    assert info["lam_tilde"] == pytest.approx(lam * E0 / abs(total), rel=1e-12)
    zero = ip.Regulariser(lambda z: torch.zeros(len(z), dtype=z.dtype), lambda z: torch.zeros_like(z))
    _, info = ip.probgeorce(a, b, zero.grad_S, S=zero.S, n=n, lam=lam)
    assert info["lam_tilde"] == lam                                   # |sum S| < 1e-6 keeps lam


def test_constant_metric_fixed_point_matches_direct_solve_and_unit_weights_match_euclid():
    a, b, c = endpoints(3, seed=4)
    reg, w = quadratic(c), torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    diag = lambda z: w.expand(len(z), 3)                              # noqa: E731  G = diag(w)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=7, lam=2.0, metric=diag, tol=1e-9, max_iter=3000)
    z = tridiagonal_minimiser(a.numpy(), b.numpy(), c.numpy(), 7, info["lam_tilde"], np.diag(w.numpy()))
    np.testing.assert_allclose(curve[1:-1].numpy(), z, atol=1e-6, rtol=0)
    E0 = float((w * (b - a) ** 2).sum()) / 7                          # E_0 = sum u^T G u on the line
    line_S = float(reg.S(ip.lerp(a, b, 7)[1:-1]).sum())
    assert info["lam_tilde"] == pytest.approx(2.0 * E0 / line_S, rel=1e-12)
    # a dense constant metric A goes through the matrix branch of Prop. 3.2
    A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], dtype=F64)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=7, lam=2.0, metric=lambda z: A.expand(len(z), 3, 3),
                                tol=1e-9, max_iter=3000)
    z = tridiagonal_minimiser(a.numpy(), b.numpy(), c.numpy(), 7, info["lam_tilde"], A.numpy())
    np.testing.assert_allclose(curve[1:-1].numpy(), z, atol=1e-6, rtol=0)
    # w = 1: the general update (Prop. 3.2) takes the same steps as Cor. 3.2.1, to rounding
    ones = lambda z: torch.ones(len(z), 3, dtype=F64)                 # noqa: E731
    for max_iter, atol in ((5, 1e-12), (3000, 1e-7)):
        general = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=7, lam=2.0, metric=ones, tol=1e-9, max_iter=max_iter)
        euclid = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=7, lam=2.0, tol=1e-9, max_iter=max_iter)
        torch.testing.assert_close(general[0], euclid[0], atol=atol, rtol=0)
        assert general[1]["step_sizes"][:5] == euclid[1]["step_sizes"][:5]


def test_position_dependent_metric_reaches_a_stationary_point_of_E():
    """The metric-derivative term of g_i: at the result, autograd of the full E must vanish."""
    a, b, _ = endpoints(4, seed=5)
    reg = ip.chi2_norm(4)
    metric = lambda z: 1.0 + z ** 2                                   # noqa: E731  G(z) = diag(1 + z^2)
    curve, info = ip.probgeorce(a, b, reg.grad_S, S=reg.S, n=6, lam=1.0, metric=metric, tol=1e-9, max_iter=3000)
    assert info["stop"] in ("tol", "no_descent") and info["grad_norm"] < 1e-7   # float64's limit on E
    z = curve.clone().requires_grad_(True)
    u = z[1:] - z[:-1]
    E = (u * metric(z[:-1]) * u).sum() + info["lam_tilde"] * reg.S(z[1:-1]).sum()
    grad = torch.autograd.grad(E, z)[0][1:-1]
    assert float(grad.norm()) < 1e-7
    assert info["energies"][-1] == pytest.approx(E.item(), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lerp_and_slerp_hit_both_ends_and_slerp_keeps_the_norm(dtype):
    a = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=dtype)
    b = torch.tensor([[0.0, 5.0], [0.0, 0.0]], dtype=dtype)          # ||a|| = ||b|| = 5
    for f in (ip.lerp, ip.slerp):
        out = f(a, b, 4)
        assert out.shape == (5, 2, 2) and out.dtype == dtype
        assert torch.equal(out[0], a) and torch.equal(out[-1], b)
    norms = ip.slerp(a, b, 4).reshape(5, -1).double().norm(dim=1)
    torch.testing.assert_close(norms, torch.full((5,), 5.0, dtype=F64), atol=1e-5, rtol=0)
    torch.testing.assert_close(ip.lerp(a, b, 4)[2], (a + b) / 2)
    torch.testing.assert_close(ip.slerp(a, 2 * a, 4), ip.lerp(a, 2 * a, 4))   # angle 0: falls back to lerp


def test_gmm_and_kde_match_direct_densities_and_autograd_gradients():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 2, dtype=F64, generator=g)
    weights, means = torch.tensor([0.2, 0.5, 0.3], dtype=F64), torch.randn(3, 2, dtype=F64, generator=g)
    covs = torch.stack([torch.tensor([[0.5, 0.1], [0.1, 0.3]]), torch.eye(2) * 0.2,
                        torch.tensor([[1.0, -0.4], [-0.4, 0.6]])]).to(F64)
    points, h = torch.randn(50, 2, dtype=F64, generator=g), 0.4
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(weights),
                                                torch.distributions.MultivariateNormal(means, covs))
    kernels = torch.distributions.MultivariateNormal(points, h ** 2 * torch.eye(2, dtype=F64))
    direct = dict(gmm=-mix.log_prob(z),
                  kde=-torch.log(kernels.log_prob(z[:, None, :]).exp().mean(1)))
    for name, reg in dict(gmm=ip.gaussian_mixture(weights, means, covs), kde=ip.kde(points, h)).items():
        torch.testing.assert_close(reg.S(z), direct[name], atol=1e-10, rtol=0)
        zz = z.clone().requires_grad_(True)
        auto = torch.autograd.grad(reg.S(zz).sum(), zz)[0]
        torch.testing.assert_close(reg.grad_S(z), auto, atol=1e-10, rtol=0)


def test_score_only_variant_lowers_the_regulariser_along_the_curve():
    weights, means, covs = ip.ring_mixture()
    reg = ip.gaussian_mixture(weights, means, covs)
    a, b = torch.tensor([0.5, 1.9], dtype=F64), torch.tensor([0.5, -1.9], dtype=F64)
    curve, info = ip.probgeorce_score(a, b, reg.grad_S, n=20, lam=1.0, lr=1.0, max_iter=200)
    line = ip.lerp(a, b, 20)
    assert torch.equal(curve[0], a) and torch.equal(curve[-1], b)
    assert float(reg.S(curve).sum()) < float(reg.S(line).sum()) - 20.0   # mean -log p falls by > 1 nat
    expected = float(((b - a) ** 2).sum()) / 20 / float(reg.grad_S(line[1:-1]).norm(dim=1).sum())
    assert info["lam_tilde"] == pytest.approx(expected, rel=1e-12)        # lam E_0 / sum ||grad S||
    assert all(0 < k <= 1 for k in info["step_sizes"])


def test_score_regulariser_is_eps_over_sqrt_one_minus_abar_at_the_model_step():
    seen = []

    def model(x, t):                                                  # eps = 2x, then a v channel block
        seen.append(t.clone())
        return torch.cat([2 * x, torch.zeros_like(x)], dim=1)

    diffusion = ddpm.Diffusion(ddpm.get_betas("cosine", 100), timesteps=ddpm.space_timesteps(100, "10"))
    reg = ip.score_regulariser(model, diffusion, 3)
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    abar = diffusion.float64["alphas_cumprod"][3]
    assert reg.S is None
    torch.testing.assert_close(reg.grad_S(x), 2 * x / math.sqrt(1 - abar), atol=1e-6, rtol=1e-6)
    assert seen[0].tolist() == [diffusion.timestep_map[3]] * 2      # the ORIGINAL step index
    # a velocity network's u = 2x is the eps sqrt(abar) 2x + sqrt(1 - abar) x (ddpm.Diffusion, prediction)
    velocity = ddpm.Diffusion(ddpm.get_betas("cosine", 100), timesteps=ddpm.space_timesteps(100, "10"),
                              prediction="velocity")
    eps = (2 * math.sqrt(abar) + math.sqrt(1 - abar)) * x
    torch.testing.assert_close(ip.score_regulariser(model, velocity, 3).grad_S(x), eps / math.sqrt(1 - abar),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call, message", [
    (lambda r, a: ip.probgeorce(a, a[:2], r.grad_S, S=r.S), "same shape"),
    (lambda r, a: ip.probgeorce(a, a, r.grad_S, S=r.S, n=1), "n (the number of intervals)"),
    (lambda r, a: ip.probgeorce(a, a, r.grad_S, S=r.S, lam=-1.0), "lam must"),
    (lambda r, a: ip.probgeorce(a, a * float("nan"), r.grad_S, S=r.S), "a and b must be finite"),
    (lambda r, a: ip.probgeorce(a, a, r.grad_S), "probgeorce_score"),
    (lambda r, a: ip.probgeorce_score(a, a, r.grad_S, lam=float("inf")), "lam must"),
    (lambda r, a: ip.slerp(a, a[None], 3), "same shape"),
])
def test_bad_inputs_raise_one_line_value_errors(call, message):
    reg, a = ip.chi2_norm(3), torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match=None) as err:
        call(reg, a)
    assert message in str(err.value) and "\n" not in str(err.value)


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, os.path.join(ROOT, "interpolants.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=timeout)


def test_twod_cli_writes_loglikelihoods_that_rise_with_lambda(tmp_path):
    r = run_cli("twod", "--out", str(tmp_path), "--intervals", "20", "--n-samples", "200", "--max-iter", "300")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wall time" in r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and "| gmm | 20 |" in (tmp_path / "report.md").read_text()
    for source in ("gmm", "kde"):
        rows = [row for row in res["curves"] if row["S"] == source]
        assert [row["lam"] for row in rows] == list(ip.LAMBDAS)
        own = [row[f"ll_{source}"] for row in rows]
        assert all(y >= x for x, y in zip(own, own[1:])) and own[-1] > own[0] + 5, own
        assert rows[0]["off_line"] == 0.0                          # lam = 0: the straight line


def test_bench_runs_small(capsys):
    ip.run_bench(d=64, n=10, repeats=1)
    out = capsys.readouterr().out
    assert out.count("s per curve") == 2 and "float32" in out and "float64" in out, out


def test_bad_cli_input_in_a_real_process_gives_one_line_and_exit_2():
    r = run_cli("twod", "--out", "x", "--seed", "abc")
    assert r.returncode == 2 and "--seed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["twod"], "--out"),
    (["twod", "--out", "x", "--intervals", "1"], "--intervals"),
    (["twod", "--out", "x", "--max-iter", "0"], "--max-iter"),
    (["bench", "--d", "2"], "--d"),
    (["sideways"], "invalid choice"),
    ([], "command"),
])
def test_bad_cli_input_gives_one_line_and_nonzero_exit(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        ip.main(args)
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
