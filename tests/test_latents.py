"""latents.py: DDIM inversion and decoding against a float64 recursion and a single-point oracle, the
curves' exact ends, the path and energy metrics by hand, the per-step-eta DDIM of App. N against
ddpm's sample_loop, App. N's eta_t = t / T_inv with the paper's numbers (T = 4000, 2000 inversion
steps), its single-class guidance (the target class's gradient only) against our multi-guided variant, the variational bound on a respaced chain against a float64 recomputation, and
both CLIs (a tiny run, and one-line refusals of bad input)."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import classifier as C
import ddpm
import latents
import multiguide
import plumbing
import toy_circles
import unet

from conftest import ENV, ROOT, perturbed  # noqa: E402

T = 100
DIFFUSION = dict(schedule="cosine", T=T, learn_sigma=True, loss="hybrid", respacing="")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(unet.build_unet("tiny"), seed=0, std=0.05).eval()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double().eval()


def chain(spec="10"):
    return ddpm.diffusion_from_config(DIFFUSION, spec)


class SinglePointEps:
    """The exact eps for data that is one point x*: eps = (x - sqrt(abar_t) x*) / sqrt(1 - abar_t), v = 0."""

    def __init__(self, x_star):
        self.x_star = x_star
        self.abar = torch.tensor(np.cumprod(1 - ddpm.get_betas("cosine", T)))

    def __call__(self, x, t):
        a = self.abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (x - a.sqrt() * self.x_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1)


# --- inversion and decoding --------------------------------------------------------------------

def test_chain_level_picks_the_kept_step_nearest_the_fraction():
    d = ddpm.diffusion_from_config(dict(DIFFUSION, T=1000), "50")
    assert latents.chain_level(d, "T") == 49 and d.timestep_map[49] == 999
    assert latents.chain_level(d, "half") == 25 and d.timestep_map[25] == 510     # 489 is 11 away, 510 is 10
    level = latents.chain_level(d, 0.3)
    assert all(abs(d.timestep_map[level] - 300) <= abs(s - 300) for s in d.timestep_map)
    with pytest.raises(ValueError):
        latents.chain_level(d, 1.5)


def test_inversion_is_exact_along_the_straight_ode_path_of_a_single_point_model():
    # Song et al. 2021, Sec. 4.3: DDIM is an Euler step of an ODE; for one data point x* the exact eps
    # stays constant along the path x_s = sqrt(abar_s) x* + sqrt(1 - abar_s) e, so every step is exact.
    d = chain("10")
    g = torch.Generator().manual_seed(1)
    x_star = torch.rand(1, 3, 4, 4, generator=g) * 1.6 - 0.8           # one point, broadcast over the batch
    x = torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8                  # a different "real image"
    model = SinglePointEps(x_star)
    abar = d.float64["alphas_cumprod"]
    e = (x.double() - math.sqrt(abar[0]) * x_star.double()) / math.sqrt(1 - abar[0])  # step 0 sees x at level 0
    for level in (4, 9):
        z = latents.invert(model, d, x, level, batch=1)                  # batch 1: the chunks change nothing
        expected = math.sqrt(abar[level]) * x_star.double() + math.sqrt(1 - abar[level]) * e
        torch.testing.assert_close(z.double(), expected, rtol=2e-5, atol=2e-5)  # |e| ~ 40: float32 rounding
        back = latents.decode(model, d, z, level, stop_level=0)           # down to level 0: x itself
        torch.testing.assert_close(back, x, rtol=0, atol=1e-4)          # |x_s| up to ~40 on the way
        # the last step (level 0 -> clean) returns x_0-hat, which for this model is x*, not x
        torch.testing.assert_close(latents.decode(model, d, z, level), x_star.expand_as(x), rtol=0, atol=3e-5)


def test_a_finer_inversion_chain_lands_on_the_decoders_level():
    coarse, level = chain("10"), 5
    t = coarse.timestep_map[level]
    fine, k = latents.inversion_chain(DIFFUSION, "40", t)
    assert fine.timestep_map[k] == t and fine.num_timesteps >= 40 and k > level
    assert fine.float64["alphas_cumprod"][k] == coarse.float64["alphas_cumprod"][level]   # the same abar_t
    g = torch.Generator().manual_seed(4)
    x_star, x = torch.rand(2, 1, 3, 4, 4, generator=g) * 1.6 - 0.8
    model = SinglePointEps(x_star)
    z = latents.invert(model, fine, x, k)                                 # exact on any chain (straight path)
    torch.testing.assert_close(latents.decode(model, coarse, z, level, stop_level=0), x, rtol=0, atol=1e-4)


@torch.no_grad()
def ddim_float64(model64, d, x, level, up):
    """The DDIM recursion (Song et al. 2021, Eq. 12, eta = 0) written out in float64 from abar alone."""
    abar = d.float64["alphas_cumprod"]
    x = x.double()
    steps = range(level) if up else range(level, -1, -1)
    for i in steps:
        eps = model64(x, torch.full((len(x),), d.timestep_map[i]))[:, :3]
        x0 = (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])
        if up:                                                            # inversion: level i -> i + 1
            x = math.sqrt(abar[i + 1]) * x0 + math.sqrt(1 - abar[i + 1]) * eps
        else:                                                             # decoding, x_0-hat clipped
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(abar[i]) * x0) / math.sqrt(1 - abar[i])
            prev = abar[i - 1] if i > 0 else 1.0
            x = math.sqrt(prev) * x0 + math.sqrt(1 - prev) * eps
    return x


def test_invert_and_decode_match_a_float64_ddim_recursion(model, model64):
    d = chain("10")
    images = toy_circles.make_circles(16, "train")["images"][[0, 60]]   # a left and a right circle
    x = plumbing.to_tensor(images)
    for level in (5, 9):
        z = latents.invert(model, d, x, level)
        ref = ddim_float64(model64, d, x, level, up=True)
        assert (z.double() - ref).abs().max() < 1e-4 * ref.abs().max()
        out = latents.decode(model, d, z, level)
        ref = ddim_float64(model64, d, z, level, up=False)
        assert (out.double() - ref).abs().max() < 1e-4
        assert out.abs().max() > 0.1                                      # not a trivial zero


# --- curves and the decoder's batch -----------------------------------------------------------

def test_every_curve_has_exact_ends_and_the_frame_batch_holds_each_curve():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 32, 32, generator=g)                         # d = 3072, like x_T of the circles
    curves, info = latents.latent_curves(a, b, 6, score=lambda z: z)     # grad S = z: the N(0, I) score
    assert list(curves) == ["lerp", "slerp", "probgeorce-chi2 lam=0.1", "probgeorce-chi2 lam=0.5",
                            "probgeorce-chi2 lam=1", "probgeorce-chi2 lam=10", "probgeorce-score lam=1"]
    for name, c in curves.items():
        assert c.shape == (7, 3, 32, 32) and c.dtype == torch.float32
        assert torch.equal(c[0], a) and torch.equal(c[-1], b), name
    assert set(info) == {n for n in curves if n.startswith("probgeorce")}
    batch = latents.frame_batch(curves)
    assert len(batch) == 2 + 7 * 5
    for name, idx in latents.frame_index(list(curves), 6).items():
        assert torch.equal(batch[idx], curves[name])                      # what the decoder sees, ends included
    # ||z||^2 / d of the midpoint: ~1/2 on the straight line (two independent Gaussians), ~1 on the
    # slerp arc; chi^2 regularisation (lam = 10) pulls it toward the shell d - 2.
    mid = {n: float(c[3].pow(2).sum()) / 3072 for n, c in curves.items()}
    assert abs(mid["lerp"] - 0.5) < 0.05 and abs(mid["slerp"] - 1.0) < 0.05
    assert mid["lerp"] < mid["probgeorce-chi2 lam=1"] < mid["probgeorce-chi2 lam=10"] < 1.05
    ll = {n: float(latents.chi2_loglik(c[1:-1]).mean()) for n, c in curves.items()}
    assert ll["lerp"] < ll["probgeorce-chi2 lam=10"]


# --- metrics by hand -------------------------------------------------------------------------

def test_centre_path_monotonicity_and_largest_jump_on_hand_made_sequences():
    up = latents.centre_path([2, 3, 3.3, 3.1, 10, 29], [5] * 6)         # steps back 0.2 px <= 0.5: monotone
    assert up == dict(monotone=True, largest_jump_px=19.0, one_circle_frames=6)
    back = latents.centre_path([2, 5, 4, 29], [0, 0, 0, 0])               # steps back 1 px
    assert back["monotone"] is False and back["largest_jump_px"] == 25.0
    down = latents.centre_path([29, 20, 20.4, 3], [0, 0, 3, 4])          # right to left, +0.4 tolerated
    assert down["monotone"] is True
    assert down["largest_jump_px"] == pytest.approx(math.hypot(17.4, 1.0), abs=1e-12)
    gap = latents.centre_path([2, np.nan, 29], [1, np.nan, 1])           # a frame without one circle
    assert gap == dict(monotone=False, largest_jump_px=27.0, one_circle_frames=2)
    none = latents.centre_path([np.nan, np.nan], [np.nan, np.nan])
    assert none["monotone"] is False and math.isnan(none["largest_jump_px"])


def test_image_energy_is_the_sum_of_squared_frame_differences():
    frames = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0],
                           [0.5, 1.0, -1.0, 1.0]]).reshape(4, 1, 2, 2)
    # ||x1 - x0||^2 = 1, ||x2 - x1||^2 = 3, ||x3 - x2||^2 = 0.25 + 4 = 4.25
    assert latents.image_energy(frames) == 8.25


# --- App. N: DDIM with a per-step eta ---------------------------------------------------------

def test_per_step_eta_ddim_equals_sample_loop_and_its_noise_is_seeded(model):
    d = chain("10")
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    guide = lambda x, t: -0.3 * x  # noqa: E731  a guidance gradient g (shifts eps by -sqrt(1 - abar) g)
    for eta, cond in ((0.0, None), (0.6, None), (0.0, guide)):
        mine = latents.ddim_loop(model, d, z, 7, lambda i: eta, cond, gen(4))
        ref = d.sample_loop(model, z.shape, sampler="ddim", eta=eta, noise=z, cond_fn=cond, start_t=7,
                            generator=gen(4), progress=False)
        assert torch.equal(mine, ref)
    # App. N: eta_t = t / T_inv; from level 1 the first step has eta = 1 and the last (t = 0) adds no noise
    eta = latents.app_n_eta(24)
    assert eta(24) == 1.0 and eta(12) == 0.5 and eta(1) == 1 / 24 and eta(0) == 0.0
    mine = latents.ddim_loop(model, d, z, 1, latents.app_n_eta(1), None, gen(5))
    ref = d.sample_loop(model, z.shape, sampler="ddim", eta=1.0, noise=z, start_t=1, generator=gen(5), progress=False)
    assert torch.equal(mine, ref)
    a = latents.ddim_loop(model, d, z, 7, latents.app_n_eta(7), None, gen(6))
    b = latents.ddim_loop(model, d, z, 7, latents.app_n_eta(7), None, gen(6))
    c = latents.ddim_loop(model, d, z, 7, latents.app_n_eta(7), None, gen(7))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3               # seeded, and the noise matters
    zero = [latents.ddim_loop(model, d, z, 7, lambda i: 0.0, None, gen(s)) for s in (6, 7)]
    assert torch.equal(*zero)                                            # eta = 0 uses no randomness


def test_app_n_eta_is_t_over_t_inv_with_the_papers_numbers():
    # App. N: 2000 inversion steps of T = 4000, eta_t = t / 2000 for t = 1 .. 2000, linearly decaying
    d = ddpm.diffusion_from_config(dict(DIFFUSION, T=4000), "")            # the full chain, no respacing
    level = latents.chain_level(d, "half")
    assert level == 2000 and d.timestep_map[level] == 2000                  # invert(x, 2000): 2000 steps
    eta = latents.app_n_eta(level)
    values = [eta(i) for i in range(level, 0, -1)]                          # the decode's noisy steps, in order
    assert values == [t / 2000 for t in range(2000, 0, -1)]
    assert values[0] == 1.0 and values[1000] == 0.5 and values[-1] == 0.0005      # t = 2000, 1000, 1
    assert all(a - b == pytest.approx(1 / 2000, abs=1e-15) for a, b in zip(values, values[1:]))   # linear


class Args:
    """The edit subcommand's weight options."""

    def __init__(self, guide="single", strength=30.0, target=1, lambdas=None):
        self.guide, self.strength, self.target, self.lambdas = guide, strength, target, lambdas


def test_single_class_edit_guides_with_the_target_class_gradient_only(model):
    torch.manual_seed(9)
    clf = perturbed(C.build_classifier("tiny"), seed=9).eval()
    assert latents.edit_lambdas(Args(), 2) == [0.0, 30.0]                  # App. N: strength 30 toward class 1
    assert latents.edit_lambdas(Args(target=0, strength=12.5), 2) == [12.5, 0.0]
    assert latents.edit_lambdas(Args(guide="multi"), 2) == [30.0, 30.0]    # our variant, Eq. 2
    assert latents.edit_lambdas(Args(lambdas=[1.0, 2.0]), 2) == [1.0, 2.0]
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10)), torch.tensor([20, 70])
    xi = x.clone().requires_grad_(True)
    log_p = torch.nn.functional.log_softmax(clf(xi, t), dim=1)
    (g_target,) = torch.autograd.grad(30.0 * log_p[:, 1].sum(), xi, retain_graph=True)
    (g_other,) = torch.autograd.grad(30.0 * log_p[:, 0].sum(), xi)
    single = multiguide.make_cond_fn(clf, latents.edit_lambdas(Args(), 2))(x, t)
    multi = multiguide.make_cond_fn(clf, latents.edit_lambdas(Args(guide="multi"), 2))(x, t)
    assert torch.equal(single, g_target)                                     # only the target's score, bit for bit
    torch.testing.assert_close(multi, g_target + g_other, rtol=1e-5, atol=1e-5)
    assert (single - multi).abs().max() > 1e-3
    # through the App. N decode: the edit with --guide single is DDIM with eta_t and g = 30 grad log p(1 | x_t)
    d, z = chain("10"), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    by_hand = lambda xx, tm: _target_grad(clf, xx, tm)  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(12)  # noqa: E731
    edit = latents.ddim_loop(model, d, z, 5, latents.app_n_eta(5), multiguide.make_cond_fn(clf, [0.0, 30.0]), gen())
    assert torch.equal(edit, latents.ddim_loop(model, d, z, 5, latents.app_n_eta(5), by_hand, gen()))


def _target_grad(clf, x, t):
    """30 grad_x log p(y = 1 | x, t), written out."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        return torch.autograd.grad(30.0 * torch.nn.functional.log_softmax(clf(xi, t), 1)[:, 1].sum(), xi)[0]


# --- the variational bound on a respaced chain ------------------------------------------------

@torch.no_grad()
def bound_float64(model64, d, x0, seed):
    """Eq. 9 over the respaced chain, written out in float64: the prior KL, KL terms of the chain's own
    posteriors (beta_i = 1 - abar_i / abar_{i-1}), the discretised decoder at i = 0; draws like calc_bpd_loop."""
    abar = d.float64["alphas_cumprod"]
    K, x0d = len(abar), x0.double()
    g = torch.Generator().manual_seed(seed)
    kl = lambda m1, lv1, m2, lv2: 0.5 * (-1 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))  # noqa: E731
    bits = lambda v: v.flatten(1).mean(1) / math.log(2)  # noqa: E731
    total = bits(kl(math.sqrt(abar[-1]) * x0d, math.log(1 - abar[-1]), torch.zeros_like(x0d), torch.zeros_like(x0d)))
    prev = np.append(1.0, abar[:-1])
    beta = 1 - abar / prev
    tilde = beta * (1 - prev) / (1 - abar)
    log_tilde = np.log(np.append(tilde[1], tilde[1:]))                   # beta~_0 = 0 is clipped to beta~_1
    for i in range(K - 1, -1, -1):
        noise = torch.randn(x0.shape, generator=g).double()
        xt = math.sqrt(abar[i]) * x0d + math.sqrt(1 - abar[i]) * noise
        out = model64(xt, torch.full((len(x0),), d.timestep_map[i]))
        eps, frac = out[:, :3], (out[:, 3:] + 1) / 2
        x0_hat = ((xt - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])).clamp(-1, 1)
        c1, c2 = math.sqrt(prev[i]) * beta[i] / (1 - abar[i]), math.sqrt(1 - beta[i]) * (1 - prev[i]) / (1 - abar[i])
        mean, logvar = c1 * x0_hat + c2 * xt, frac * math.log(beta[i]) + (1 - frac) * log_tilde[i]
        if i > 0:
            total = total + bits(kl(c1 * x0d + c2 * xt, torch.full_like(xt, log_tilde[i]), mean, logvar))
        else:                                                             # L_0: 8-bit bins of width 2/255
            s = torch.exp(-0.5 * logvar)
            up, lo = torch.special.ndtr(s * (x0d - mean + 1 / 255)), torch.special.ndtr(s * (x0d - mean - 1 / 255))
            p = torch.where(x0d < -0.999, up, torch.where(x0d > 0.999, 1 - lo, up - lo))
            total = total + bits(-torch.log(p.clamp(min=1e-12)))         # the code's floor of 1e-12
    return total


def test_variational_bound_on_a_respaced_chain_matches_float64(model, model64):
    # App. A.3, Eq. 9 on a 7-step respacing of T = 100: calc_bpd_loop works on the respaced process.
    images = toy_circles.make_circles(16, "train")["images"][[3, 70]]
    nll = latents.nll_bpd(model, DIFFUSION, images, steps="7", seed=5)
    ref = bound_float64(model64, chain("7"), plumbing.to_tensor(images), seed=5).numpy()
    assert nll.shape == (2,) and np.all(nll > 0)
    np.testing.assert_allclose(nll, ref, rtol=1e-5)                     # measured: 2e-7


# --- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    net = perturbed(unet.build_unet("tiny"), seed=1, std=0.02)
    plumbing.save_checkpoint(str(folder / "ddpm.pt"), dict(kind="ddpm", model_config=net.config, diffusion=DIFFUSION,
                                                       model=net.state_dict(), ema=net.state_dict()))
    for name, size in (("clf.pt", 16), ("clf32.pt", 32)):
        clf = perturbed(C.build_classifier("tiny", image_size=size), seed=2)
        plumbing.save_checkpoint(str(folder / name), dict(kind="classifier", model_config=clf.config, diffusion=DIFFUSION,
                                                      model=clf.state_dict(), ema=None))
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "latents.py"), *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=ROOT)


def test_interp_and_edit_cli_end_to_end(checkpoints, tmp_path):
    out = tmp_path / "interp"
    r = run_cli("interp", "--ddpm", str(checkpoints / "ddpm.pt"), "--out", str(out), "--pairs", "2", "--frames", "3",
                "--sample-steps", "5", "--nll-steps", "3")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert set(res["settings"]) == {"T", "half"} and res["data_nll_bpd"] > 0
    half = res["settings"]["half"]
    assert half["level"] == 2 and len(half["methods"]) == 7                 # score variant at T/2 only
    assert len(res["settings"]["T"]["methods"]) == 6
    for m in half["methods"].values():
        assert {"chi2_loglik", "nll_bpd", "one_circle", "middle_band", "monotone", "largest_jump_px_mean",
                "energy", "per_pair"} <= set(m) and len(m["per_pair"]) == 2 and len(m["per_pair"][0]["cx"]) == 4
    assert {"mean_abs_error", "flipped_pixels", "centre_kept"} <= set(half["reconstruction"])
    for name in ("strips_T.png", "strips_half.png", "centres_T.png", "centres_half.png", "report.md",
                 "strips/half_slerp.png"):
        assert (out / name).stat().st_size > 100, name
    out = tmp_path / "edit"
    r = run_cli("edit", "--ddpm", str(checkpoints / "ddpm.pt"), "--classifier", str(checkpoints / "clf.pt"),
                "--out", str(out), "--n-samples", "3", "--sample-steps", "5")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["level"] == 2 and len(res["runs"]) == 3
    for run in res["runs"].values():
        assert {"one_circle", "middle_band", "moved_right", "cx_before", "z_hist"} <= set(run)
    assert (out / "edit_grid.png").stat().st_size > 100 and (out / "centre_hist.png").stat().st_size > 100
    assert res["guide"] == "single" and res["lambdas"] == [0.0, 30.0]                  # App. N by default
    assert "single-class guidance to class 1, strength 30" in list(res["runs"])[2]
    # the defaults are App. N's chain: all T = 100 steps, inverted by T/2 = 50 steps, decoded by 51
    out = tmp_path / "edit_multi"
    r = run_cli("edit", "--ddpm", str(checkpoints / "ddpm.pt"), "--classifier", str(checkpoints / "clf.pt"),
                "--out", str(out), "--n-samples", "2", "--guide", "multi")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["lambdas"] == [30.0, 30.0] and "multi-guidance lambda = 30,30" in list(res["runs"])[2]
    assert (res["level"], res["t_model"], res["invert_steps"], res["decode_steps"]) == (50, 50, 50, 51)
    assert res["config"]["sample_steps"] == res["config"]["invert_steps"] == "100"
    assert res["eta"].startswith("eta_i = i / 50")


def test_bad_input_is_refused_with_one_line(checkpoints, tmp_path):
    ddpm_pt, out = str(checkpoints / "ddpm.pt"), str(tmp_path / "o")
    cases = [(("interp", "--ddpm", str(tmp_path / "missing.pt"), "--out", out), "does not exist"),
             (("edit", "--ddpm", ddpm_pt, "--classifier", str(checkpoints / "clf32.pt"), "--out", out), "image_size"),
             (("interp", "--ddpm", ddpm_pt, "--out", out, "--frames", "1"), "--frames"),
             (("interp", "--ddpm", ddpm_pt, "--out", out, "--pairs", "0"), "--pairs"),
             (("edit", "--ddpm", ddpm_pt, "--classifier", str(checkpoints / "clf.pt"), "--out", out, "--target", "2"),
              "--target 2"),
             (("edit", "--ddpm", ddpm_pt, "--classifier", str(checkpoints / "clf.pt"), "--out", out, "--guide", "both"),
              "--guide")]
    for args, needle in cases:
        r = run_cli(*args)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, (args, r.stderr)
    assert not os.path.exists(out)
