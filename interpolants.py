"""interpolants.py -- curves between two points: lerp, slerp and ProbGEORCE's likely interpolants.

What this file is
    An interpolation between two latents a and b is a discrete curve z_0 = a, z_1, ..., z_N = b.
    lerp and slerp are the fixed baselines. ProbGEORCE (Rygaard et al., "Likely Interpolants of
    Generative Models") bends the curve toward
    likely points by minimising a discrete energy plus a regulariser S = -log(density):

        E(z) = sum_{i=0}^{N-1} u_i^T G(z_i) u_i + lam~ sum_{i=1}^{N-1} S(z_i),   u_i = z_{i+1} - z_i,
        with z_0 = a and z_N = b, i.e. sum_i u_i = b - a                          (the control problem)

    G is a Riemannian background metric (the identity by default). The algorithm is GEORCE's: freeze
    G and linearise everything else at the current curve, solve that convex surrogate exactly
    (Prop. 3.1 and 3.2; Cor. 3.2.1 for G = I), and move toward its solution with a backtracking line
    search. Facts from the authors' released code: straight-line
    start, lam normalised by E_0 / |sum S(z_lin)|, backtracking factor 0.5, tolerance 1e-4, max 100
    iterations (N = 10 for images, N = 100 and lam up to 20 for 2-D data; our 2-D run allows 1000
    iterations, since lam = 20 needs ~190 at N = 100). We iterate in float64 whatever the inputs.

Regularisers (each a Regulariser(S, grad_S) on batches (K, *shape) -> (K,) and (K, *shape)):
    chi2_norm(d)        S = -log chi^2_d(||z||^2): low on the shell where Gaussian noise lives
    gaussian_mixture    S = -log of a known Gaussian mixture (the paper's 2-D "gmm")
    kde                 S = -log of a Gaussian kernel density estimate (the paper's 2-D "kde")
    score_regulariser   grad S = eps_theta(x, t) / sqrt(1 - abar_t) from a zsi UNet (no S: use
                        probgeorce_score, the line-search-free variant)

Run it
    python interpolants.py twod --out out/interp2d    # the paper's Fig. 3 in 2-D: 12 curves in ~1.5 s
                                                      # (~5 s with imports, 1 thread)
    python interpolants.py bench                      # chi^2 curves at d = 3072, N = 10: ~0.03 s each
"""
import io
import json
import math
import os
import time
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import plumbing


# ----------------------------------------------------------------------------------------------
# Argument checks and the fixed baselines
# ----------------------------------------------------------------------------------------------

def _check(a, b, n, lam=0.0, min_n=1):
    """Refuse endpoints of different shapes, non-finite endpoints, too few intervals, lam < 0."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        raise ValueError("a and b must be torch tensors")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("a and b must be finite (found nan or inf in an endpoint)")
    if not isinstance(n, (int, np.integer)) or n < min_n:
        raise ValueError(f"n (the number of intervals) must be an integer >= {min_n}, got {n!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")


def lerp(a, b, n):
    """Straight line: the n + 1 points a + (k / n)(b - a), k = 0..n, shape (n + 1, *a.shape)."""
    _check(a, b, n)
    s = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64).to(a.dtype).reshape(-1, *[1] * a.dim())
    out = a + s * (b - a)                            # (n + 1, *shape)
    out[0], out[-1] = a, b                           # exact ends whatever the rounding
    return out


def slerp(a, b, n):
    """Spherical interpolation: sin((1 - s) th) / sin th a + sin(s th) / sin th b, s = k / n.

    th is the angle between a and b (flattened). Ends of equal norm r give points of norm r (a
    great-circle arc). When sin th < 1e-7 (a, b nearly parallel or one of them ~ 0) the formula is
    0 / 0, and slerp falls back to lerp. Shape (n + 1, *a.shape), a's dtype.
    """
    _check(a, b, n)
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-300)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if torch.sin(theta) < 1e-7:
        return lerp(a, b, n)                         # fallback: angle ~ 0 (or ~ pi)
    s = torch.linspace(0.0, 1.0, n + 1, dtype=torch.float64)[:, None]    # (n + 1, 1)
    out = (torch.sin((1 - s) * theta) * a64 + torch.sin(s * theta) * b64) / torch.sin(theta)
    out = out.to(a.dtype).reshape(n + 1, *a.shape)
    out[0], out[-1] = a, b
    return out


# ----------------------------------------------------------------------------------------------
# The metric: None (G = I), a diagonal (K, d) or dense (K, d, d) per point
# ----------------------------------------------------------------------------------------------

def _times(G, v):
    """G v per point: v (K, d); G None (identity), (K, d) (diagonal) or (K, d, d) (dense)."""
    if G is None:
        return v
    return G * v if G.dim() == 2 else torch.einsum("kij,kj->ki", G, v)


def _inverse(G):
    return None if G is None else (1.0 / G if G.dim() == 2 else torch.linalg.inv(G))


def _solve(G, v):
    """G^{-1} v for one matrix G: (d,) diagonal or (d, d) dense; v (d,)."""
    return v / G if G.dim() == 1 else torch.linalg.solve(G, v)


def _metric_at(metric, z, shape):
    """G(z) for the points z (K, d): None for the identity, else metric's (K, d) or (K, d, d)."""
    if metric is None:
        return None
    G = metric(z.reshape(len(z), *shape)).to(z.dtype)
    return G.reshape(len(z), -1) if G.dim() == 2 else G.reshape(len(z), z.shape[1], z.shape[1])


def _frozen_terms(z, grad_S, lam_t, metric, shape):
    """G_i = G(z_i), i = 0..N-1, and g_i = grad_z [u_i^T G(z) u_i + lam~ S(z)] at z_i, i = 1..N-1.

    z: (N + 1, d) the current curve. Returns G (None, (N, d) or (N, d, d)) and g (N - 1, d). The
    metric-derivative term is taken by autograd with u_i held fixed; it is zero for G = I.
    """
    K, u = len(z) - 2, z[1:] - z[:-1]                                # u: (N, d)
    g = lam_t * grad_S(z[1:-1].reshape(K, *shape)).reshape(K, -1).to(z.dtype)
    if metric is None:
        return None, g
    with torch.enable_grad():
        zs = z[:-1].detach().clone().requires_grad_(True)             # (N, d) segment starts
        G = _metric_at(metric, zs, shape)
        q = (u[1:] * _times(G[1:], u[1:])).sum()                      # sum_{i>=1} u_i^T G(z_i) u_i
        if q.requires_grad:
            g = g + torch.autograd.grad(q, zs)[0][1:]
    return G.detach(), g


def _energy_parts(z, S, metric, shape):
    """(sum_i u_i^T G(z_i) u_i, sum_{i=1}^{N-1} S(z_i)) of a curve z (N + 1, d), summed in float64."""
    u = z[1:] - z[:-1]
    kinetic = (u * _times(_metric_at(metric, z[:-1], shape), u)).double().sum()
    reg = S(z[1:-1].reshape(len(z) - 2, *shape)).double().sum()
    return float(kinetic), float(reg)


def _surrogate_step(G, g, diff):
    """The exact minimiser u-hat (N, d) of the frozen surrogate (Prop. 3.2) for diff = b - a.

    c_i = sum_{m>i} g_m (c_{N-1} = 0). G = I (Cor. 3.2.1): u-hat_i = (b - a)/N + (c-bar - c_i)/2.
    General G: mu_{N-1} = -(sum_i G_i^{-1})^{-1} [sum_i G_i^{-1} c_i + 2(b - a)], mu_i = mu_{N-1} + c_i,
    u-hat_i = -1/2 G_i^{-1} mu_i. Either way sum_i u-hat_i = b - a.
    """
    c = torch.cat([g.flip(0).cumsum(0).flip(0), torch.zeros_like(g[:1])])  # (N, d): c_i
    if G is None:                                                             # Cor. 3.2.1
        return diff / len(c) + 0.5 * (c.mean(0) - c)
    Ginv = _inverse(G)                                                        # (N, d) or (N, d, d)
    mu = -_solve(Ginv.sum(0), _times(Ginv, c).sum(0) + 2.0 * diff)           # Prop. 3.2: mu_{N-1}
    return -0.5 * _times(Ginv, mu + c)                                        # u-hat_i = -G_i^{-1} mu_i / 2


def _armijo(energy, z, dz, E, slope, c=1e-4, factor=0.5, tries=40):
    """Backtracking along the step actually taken: the largest tau = factor^k with
    E(z + tau dz) <= E(z) + c tau <grad E, dz>, and E strictly lower (near the float limit the
    right-hand side rounds to E(z), and equal energies would let steps that gain nothing go on).
    Returns (tau, new curve, its energy); tau = 0 if no tau qualifies."""
    tau = 1.0
    for _ in range(tries):
        trial = z.clone()
        trial[1:-1] += tau * dz
        E_trial = energy(trial)
        if E_trial <= E + c * tau * slope and E_trial < E:
            return tau, trial, E_trial
        tau *= factor
    return 0.0, z, E


# ----------------------------------------------------------------------------------------------
# ProbGEORCE
# ----------------------------------------------------------------------------------------------

def _lam_tilde(lam, scale, reference):
    """lam~ = lam * scale / |reference|, or lam itself when |reference| < 1e-6."""
    return float(lam) if abs(reference) < 1e-6 else float(lam) * scale / abs(reference)


def probgeorce(a, b, grad_S, *, S=None, n=10, lam=1.0, metric=None, max_iter=100, tol=1e-4, callback=None):
    """The likely interpolant between a and b: a local minimiser of E(z) (module docstring).

    grad_S, S : callables on a batch (K, *a.shape) -> (K, *a.shape) and (K,) (e.g. a Regulariser).
    n         : number of intervals N; the curve has N + 1 points with z_0 = a and z_N = b exactly.
    metric    : None for G = I, else metric(z) on a batch (K, *shape) -> (K, d) (diagonal) or
                (K, d, d) (dense), d = a.numel(); differentiable in z if it depends on z.
    callback  : called as callback(k, curve, u_hat) after every step k = 0, 1, ... (float64; u_hat
                (N, d) is the surrogate's solution the step moved toward).
    Returns (curve (N + 1, *a.shape) in a's dtype, info) with info keys: iterations, grad_norm
    (final ||grad E||), energies (E at the start and after each step), lam_tilde, step_sizes, stop
    ("tol", "max_iter" or "no_descent": the line search found no decrease, the float limit).
    The iteration runs in float64 whatever a's dtype, and S, grad_S and metric receive float64
    batches: near the end the line search compares energies that differ by ~1e-8, below what a
    float32 curve can resolve (iterated in float32, d = 3072 curves stalled at ||grad E|| ~ 2e-4
    to 6e-4 after 100 iterations; in float64 they reach 1e-4 in ~20).
    """
    _check(a, b, n, lam, min_n=2)
    if S is None:
        raise ValueError("probgeorce needs S for its line search; with only grad_S use probgeorce_score")
    shape, dtype, a, b = a.shape, a.dtype, a.double(), b.double()
    diff = (b - a).reshape(-1)
    z = lerp(a, b, n).reshape(n + 1, -1)                                  # (N + 1, d) straight line
    E0, reg0 = _energy_parts(z, S, metric, shape)
    lam_t = _lam_tilde(lam, E0, reg0)                                     # lam~ = lam E_0 / |sum S(z_lin)|

    def energy(curve):                                                    # E(z), the control problem
        kinetic, reg = _energy_parts(curve, S, metric, shape)
        return kinetic + lam_t * reg

    E, steps, stop = energy(z), [], "max_iter"
    energies = [E]
    for k in range(max_iter + 1):
        # 1. freeze G_i and linearise: g_i; the exact gradient of E at the interior points
        G, g = _frozen_terms(z, grad_S, lam_t, metric, shape)
        Gu = _times(G, z[1:] - z[:-1])                                    # (N, d): G_i u_i
        grad = g + 2.0 * (Gu[:-1] - Gu[1:])                               # dE/dz_i, i = 1..N-1
        grad_norm = float(grad.norm())
        if grad_norm <= tol or k == max_iter:
            stop = "tol" if grad_norm <= tol else stop
            break
        # 2. solve the surrogate exactly (Prop. 3.2) -> u-hat, and the interior points it implies
        u_hat = _surrogate_step(G, g, diff)
        dz = (a.reshape(-1) + u_hat.cumsum(0)[:-1]) - z[1:-1]             # (N - 1, d): z-hat - z
        # 3. u <- u + tau (u-hat - u), tau by Armijo on dz, the step actually taken. Testing decrease
        #    along -grad E instead is unsafe: the project's float64 check at d = 1024, N = 10 stalled
        #    at ||grad E|| ~ 0.28, while testing the step taken converged in 18 iterations (our rerun
        #    on three seeded pairs: 18, 17, 20).
        slope = float((grad * dz).double().sum())
        tau, z, E = _armijo(energy, z, dz, E, slope) if slope < 0 else (0.0, z, E)
        if tau == 0.0:
            stop = "no_descent"
            break
        energies.append(E)
        steps.append(tau)
        if callback is not None:
            callback(k, z.reshape(n + 1, *shape), u_hat)
    info = dict(iterations=len(steps), grad_norm=grad_norm, energies=energies, lam_tilde=lam_t,
                step_sizes=steps, stop=stop)
    return z.reshape(n + 1, *shape).to(dtype), info


def probgeorce_score(a, b, grad_S, *, n=10, lam=1.0, lr=0.1, max_iter=100, tol=1e-4, beta=0.5):
    """ProbGEORCE with only grad S (e.g. a diffusion model's score), G = I, no line search.

    Without S there is no energy to test, so the step is an Adam-like relaxation (the authors'
    adaptive variant): m = EMA of g, v = EMA of ||g||^2 (both with beta = 0.5, bias-corrected),
    u-hat from Cor. 3.2.1 with m in place of g, and u <- u + kappa (u-hat - u) with
    kappa = min(1, lr / (sqrt(1 + v) + 1e-8)). lam~ = lam E_0 / sum_i ||grad S(z_i)|| on the line.
    NO convergence guarantee: E is never evaluated, so nothing stops it from going up.
    Returns (curve in a's dtype, info) with info keys iterations, grad_norm, lam_tilde, step_sizes,
    stop. Like probgeorce it iterates in float64 and hands grad_S float64 batches.
    """
    _check(a, b, n, lam, min_n=2)
    shape, dtype, a, b = a.shape, a.dtype, a.double(), b.double()
    diff = (b - a).reshape(-1)
    z = lerp(a, b, n).reshape(n + 1, -1)                                  # (N + 1, d)
    E0 = float(((z[1:] - z[:-1]) ** 2).double().sum())
    grad_S_flat = lambda pts: grad_S(pts.reshape(n - 1, *shape)).reshape(n - 1, -1).to(z.dtype)  # noqa: E731
    lam_t = _lam_tilde(lam, E0, float(grad_S_flat(z[1:-1]).double().norm(dim=1).sum()))
    m, v, steps, stop = torch.zeros_like(z[1:-1]), 0.0, [], "max_iter"
    for k in range(1, max_iter + 2):
        g = lam_t * grad_S_flat(z[1:-1])                                  # (N - 1, d)
        u = z[1:] - z[:-1]
        grad_norm = float((g + 2.0 * (u[:-1] - u[1:])).norm())           # exact grad E (G = I)
        if grad_norm <= tol or k == max_iter + 1:
            stop = "tol" if grad_norm <= tol else stop
            break
        m = beta * m + (1 - beta) * g                                     # EMA of g
        v = beta * v + (1 - beta) * float((g.double() ** 2).sum())        # EMA of ||g||^2
        m_hat, v_hat = m / (1 - beta ** k), v / (1 - beta ** k)           # bias correction
        kappa = min(1.0, lr / (math.sqrt(1.0 + v_hat) + 1e-8))
        u_hat = _surrogate_step(None, m_hat, diff)                        # Cor. 3.2.1
        z[1:-1] += kappa * ((a.reshape(-1) + u_hat.cumsum(0)[:-1]) - z[1:-1])
        steps.append(kappa)
    info = dict(iterations=len(steps), grad_norm=grad_norm, lam_tilde=lam_t, step_sizes=steps, stop=stop)
    return z.reshape(n + 1, *shape).to(dtype), info


# ----------------------------------------------------------------------------------------------
# Regularisers S = -log density, with analytic gradients
# ----------------------------------------------------------------------------------------------

class Regulariser(NamedTuple):
    """S (K, *shape) -> (K,) and grad_S (K, *shape) -> (K, *shape); S may be None (gradient only)."""
    S: Optional[Callable]
    grad_S: Callable


def chi2_norm(d):
    """S(z) = -log chi^2_d(||z||^2), the density of the squared norm of d-dim Gaussian noise.

    With x = ||z||^2: S = (d/2) log 2 + lgamma(d/2) - (d/2 - 1) log x + x/2, and
    grad S = z (1 - (d - 2) / ||z||^2). It is lowest on the shell ||z||^2 = d - 2 (the mode of
    chi^2_d), where Gaussian noise lives; -log N(z; 0, I) would instead pull every point to 0.
    S is computed and returned in float64: at d = 3072 its terms are ~1e4 and cancel to ~5, which
    float32 would leave with errors ~1e-3.
    """
    const = 0.5 * d * math.log(2.0) + math.lgamma(0.5 * d)

    def S(z):
        x = z.reshape(len(z), -1).double().pow(2).sum(1)                  # (K,) ||z||^2, float64
        return const - (0.5 * d - 1.0) * torch.log(x) + 0.5 * x

    def grad_S(z):
        x = z.reshape(len(z), -1).pow(2).sum(1).reshape(-1, *[1] * (z.dim() - 1))
        return z * (1.0 - (d - 2.0) / x)

    return Regulariser(S, grad_S)


def gaussian_mixture(weights, means, covs):
    """S(z) = -log sum_k w_k N(z; m_k, C_k) for z (K, D); grad S = sum_k r_k C_k^{-1} (z - m_k),
    r_k(z) the responsibilities. weights (M,) (normalised here), means (M, D), covs (M, D, D)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    mu, C = torch.as_tensor(means, dtype=torch.float64), torch.as_tensor(covs, dtype=torch.float64)
    P = torch.linalg.inv(C)                                               # (M, D, D) precisions
    log_norm = torch.log(w / w.sum()) - 0.5 * torch.linalg.slogdet(2 * math.pi * C)[1]  # (M,)

    def log_terms(z):                                                     # (K, M) log w_k N_k(z), and z - m_k
        r = z[:, None, :] - mu.to(z.dtype)                                # (K, M, D)
        return log_norm.to(z.dtype) - 0.5 * torch.einsum("kmi,mij,kmj->km", r, P.to(z.dtype), r), r

    def S(z):
        return -torch.logsumexp(log_terms(z)[0], dim=1)

    def grad_S(z):
        lt, r = log_terms(z)
        resp = torch.softmax(lt, dim=1)                                   # (K, M) r_k
        return torch.einsum("km,mij,kmj->ki", resp, P.to(z.dtype), r)

    return Regulariser(S, grad_S)


def kde(points, bandwidth):
    """S(z) = -log (1/M) sum_j N(z; x_j, h^2 I) for z (K, D), a Gaussian kernel density estimate
    on points (M, D) with bandwidth h; grad S = sum_j r_j (z - x_j) / h^2, r_j the kernel weights."""
    x = torch.as_tensor(points, dtype=torch.float64)
    M, D = x.shape
    h2 = float(bandwidth) ** 2
    log_norm = -math.log(M) - 0.5 * D * math.log(2 * math.pi * h2)

    def S(z):
        d2 = torch.cdist(z, x.to(z.dtype)) ** 2                           # (K, M) squared distances
        return -(torch.logsumexp(-0.5 * d2 / h2, dim=1) + log_norm)

    def grad_S(z):
        xs = x.to(z.dtype)
        r = torch.softmax(-0.5 * torch.cdist(z, xs) ** 2 / h2, dim=1)    # (K, M)
        return (z - r @ xs) / h2                                          # sum_j r_j (z - x_j) / h^2

    return Regulariser(S, grad_S)


def score_regulariser(model, diffusion, t):
    """grad S(x) = -grad log p_t(x) = eps_theta(x, t) / sqrt(1 - abar_t) (Eq. 4's noise as a score).

    model: a zsi denoiser (forward(x, t) -> eps or the velocity, then v); diffusion: the ddpm.Diffusion
    it was trained with (p_mean_variance turns either prediction into eps); t: a chain index of that
    diffusion. S = None: the density itself is unknown, so use probgeorce_score.
    """
    abar = float(diffusion.float64["alphas_cumprod"][t])

    @torch.no_grad()
    def grad_S(x):
        steps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)   # chain indices
        eps = diffusion.p_mean_variance(model, x.float(), steps, clip=False)["eps"]   # (K, C, H, W)
        return (eps / math.sqrt(1.0 - abar)).to(x.dtype)

    return Regulariser(None, grad_S)


# ----------------------------------------------------------------------------------------------
# The 2-D experiment (the paper's Fig. 3) and the d = 3072 benchmark
# ----------------------------------------------------------------------------------------------

LAMBDAS = (0.0, 0.1, 0.5, 1.0, 10.0, 20.0)


def ring_mixture(components=16, radius=2.0, std=0.2, gap_deg=60.0):
    """A ring of equal Gaussians (std `std`) with a gap of gap_deg degrees centred on angle 0."""
    half = math.radians(gap_deg / 2)
    angles = torch.linspace(half, 2 * math.pi - half, components, dtype=torch.float64)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)       # (M, 2)
    covs = (std ** 2) * torch.eye(2, dtype=torch.float64).expand(components, 2, 2)
    return torch.full((components,), 1.0 / components, dtype=torch.float64), means, covs


def sample_mixture(weights, means, covs, count, generator):
    """count points (count, 2) from the mixture."""
    k = torch.multinomial(weights, count, replacement=True, generator=generator)
    noise = torch.randn(count, means.shape[1], generator=generator, dtype=torch.float64)
    return means[k] + torch.einsum("kij,kj->ki", torch.linalg.cholesky(covs)[k], noise)


def run_twod(out, seed=0, n=100, max_iter=1000, samples=1000, bandwidth=0.15):
    """Curves for every lam in LAMBDAS under S = -log gmm and S = -log kde; figure, JSON, report.

    bandwidth 0.15 sits a little under the ring's std 0.2; Scott's rule (~0.45 here) would blur
    the gap. Returns the results dict written to results.json.
    """
    start = time.perf_counter()
    weights, means, covs = ring_mixture()
    data = sample_mixture(weights, means, covs, samples, torch.Generator().manual_seed(seed))
    regs = dict(gmm=gaussian_mixture(weights, means, covs), kde=kde(data, bandwidth))
    angle = math.radians(75.0)                           # the ends: either side of the gap at 0 deg
    a = torch.tensor([2 * math.cos(angle), 2 * math.sin(angle)], dtype=torch.float64)
    b = torch.tensor([2 * math.cos(angle), -2 * math.sin(angle)], dtype=torch.float64)
    curves, rows = {}, []
    for source, reg in regs.items():
        for lam in LAMBDAS:
            curve, info = probgeorce(a, b, reg.grad_S, S=reg.S, n=n, lam=lam, max_iter=max_iter)
            curves[(source, lam)] = curve
            rows.append(dict(S=source, lam=lam, lam_tilde=info["lam_tilde"], iterations=info["iterations"],
                             grad_norm=info["grad_norm"], stop=info["stop"],
                             ll_gmm=float(-regs["gmm"].S(curve).mean()), ll_kde=float(-regs["kde"].S(curve).mean()),
                             off_line=float((curve - lerp(a, b, n)).norm(dim=1).max())))
    seconds = time.perf_counter() - start
    config = dict(seed=seed, n=n, max_iter=max_iter, samples=samples, bandwidth=bandwidth, lambdas=list(LAMBDAS),
                  mixture="16 Gaussians (std 0.2) on a radius-2 ring, 60 deg gap at angle 0",
                  ends="radius 2 at +75 and -75 deg", loglik="mean over all n + 1 curve points")
    results = dict(config=config, seconds=seconds, curves=rows)
    _plot_twod(curves, regs, data, rows, os.path.join(out, "curves.png"))
    plumbing.write_bytes_atomically(os.path.join(out, "results.json"), (json.dumps(results, indent=2) + "\n").encode())
    plumbing.write_bytes_atomically(os.path.join(out, "report.md"), _report_twod(results).encode())
    return results


def _plot_twod(curves, regs, data, rows, path):
    """Two panels (S from gmm, S from kde): log density in the background, samples, one curve per lam."""
    fig = Figure(figsize=(11, 5.2))
    FigureCanvasAgg(fig)
    g = torch.linspace(-3.0, 3.0, 200, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)   # (200 * 200, 2)
    colours = ["black", "tab:pink", "tab:olive", "tab:orange", "tab:red", "tab:purple"]
    for j, (source, reg) in enumerate(regs.items()):
        ax = fig.add_subplot(1, 2, j + 1)
        logp = (-reg.S(grid)).clamp_min(-12.0).reshape(200, 200).numpy()
        im = ax.imshow(logp, extent=(-3, 3, -3, 3), origin="lower", cmap="YlGnBu")
        fig.colorbar(im, ax=ax, shrink=0.8, label="log density (clipped at -12)")
        ax.scatter(data[:, 0], data[:, 1], s=1, c="black", alpha=0.5)
        for lam, colour in zip(LAMBDAS, colours):
            c = curves[(source, lam)].numpy()
            row = next(r for r in rows if r["S"] == source and r["lam"] == lam)
            ax.plot(c[:, 0], c[:, 1], color=colour, lw=1.8,
                    label=f"lam={lam:g}  L={row['ll_gmm']:.2f}/{row['ll_kde']:.2f}")
        ax.set(xlim=(-3, 3), ylim=(-3, 3), xlabel="z_1", ylabel="z_2", aspect="equal",
               title=f"S = -log {source} (background: log density)")
        ax.legend(fontsize=7, loc="lower left", title="L = mean log-lik gmm/kde", title_fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plumbing.write_bytes_atomically(path, buf.getvalue())


def _report_twod(results):
    """report.md: the configuration and one table row per (S, lam)."""
    c = results["config"]
    lines = ["# ProbGEORCE in 2-D (the paper's Fig. 3)", "",
             f"Data: {c['mixture']}; KDE of {c['samples']} samples, bandwidth {c['bandwidth']}. Ends: {c['ends']}. "
             f"N = {c['n']} intervals, G = I, max {c['max_iter']} iterations, tol 1e-4. "
             f"Log-likelihood: {c['loglik']}. Wall time {results['seconds']:.1f} s. Figure: curves.png.", "",
             "A curve whose largest distance from the line exceeds the ring's radius (2) went round the far "
             "side of the ring instead of crossing the gap: ProbGEORCE finds a local minimum of E, not "
             "necessarily the global one.", "",
             "| S from | lam | lam~ | iterations | stop | max distance from the line | mean log-lik gmm | mean log-lik kde |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["curves"]:
        lines.append(f"| {r['S']} | {r['lam']:g} | {r['lam_tilde']:.4g} | {r['iterations']} | {r['stop']} | "
                     f"{r['off_line']:.3f} | {r['ll_gmm']:.3f} | {r['ll_kde']:.3f} |")
    return "\n".join(lines) + "\n"


def run_bench(d=3072, n=10, repeats=3, seed=0):
    """Time ProbGEORCE-chi^2 between pairs of Gaussian noise vectors, float32 and float64."""
    reg = chi2_norm(d)
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float64):
        times, iters = [], []
        for _ in range(repeats):
            a, b = torch.randn(2, d, generator=gen).to(dtype)
            t0 = time.perf_counter()
            curve, info = probgeorce(a, b, reg.grad_S, S=reg.S, n=n, lam=1.0)
            times.append(time.perf_counter() - t0)
            iters.append(info["iterations"])
        mid = float(curve[n // 2].pow(2).sum())
        print(f"{str(dtype):>13}: {np.mean(times):.3f} s per curve (d = {d}, N = {n}; {repeats} curves), "
              f"iterations {iters}, last stop {info['stop']!r}, ||grad E|| {info['grad_norm']:.2e}, "
              f"||z_mid||^2 = {mid:.0f} (line: ~{d / 2:.0f}, shell d - 2 = {d - 2})")


def main(argv=None):
    parser = plumbing.OneLineParser(description="ProbGEORCE likely interpolants: the 2-D experiment and a benchmark.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("twod", renamed={"--n": "--intervals", "--samples": "--n-samples"},
                       help="the paper's Fig. 3: curves on a 2-D ring mixture for several lam")
    plumbing.add_flags(p, "out", "overwrite", "seed")
    p.add_argument("--intervals", type=plumbing.positive_int, default=100,
                   help="N, intervals per curve (the authors' 2-D setting)")
    p.add_argument("--max-iter", type=plumbing.positive_int, default=1000,
                   help="iterations per curve at most (1000: lam = 20 needs ~200 at N = 100)")
    plumbing.add_flags(p, n_samples=1000)  # samples behind the KDE
    q = sub.add_parser("bench", renamed={"--n": "--intervals"}, help="time one chi^2 curve at d = 3072, N = 10")
    q.add_argument("--d", type=plumbing.positive_int, default=3072, help="dimension (3072 = 3 x 32 x 32)")
    q.add_argument("--intervals", type=plumbing.positive_int, default=10, help="N, intervals per curve")
    q.add_argument("--repeats", type=plumbing.positive_int, default=3, help="curves timed per dtype")
    args = parser.parse_args(argv)
    if args.intervals < 2:
        parser.error("--intervals must be at least 2 (a curve needs an interior point)")
    if args.command == "twod":
        if args.n_samples < 2:
            parser.error("--n-samples must be >= 2 (the KDE needs two points)")
        plumbing.check_out_folder(args.out)
        plumbing.refuse_overwrite(args.out, ["curves.png", "results.json", "report.md"], args.overwrite)
    elif args.d < 3:
        parser.error("--d must be >= 3")
    print(f"config: {json.dumps(vars(args))}")
    torch.set_num_threads(1)
    if args.command == "twod":
        with plumbing.RunLock(args.out):
            res = run_twod(args.out, seed=args.seed, n=args.intervals, max_iter=args.max_iter, samples=args.n_samples)
        for r in res["curves"]:
            print(f"S={r['S']} lam={r['lam']:<4g} iterations {r['iterations']:3d} ({r['stop']}) "
                  f"mean log-lik gmm {r['ll_gmm']:7.3f} kde {r['ll_kde']:7.3f}")
        print(f"wall time {res['seconds']:.2f} s; wrote {args.out}/curves.png, results.json, report.md")
    else:
        run_bench(args.d, args.intervals, args.repeats)


if __name__ == "__main__":
    plumbing.guard(main)
