"""Tests for generalization.py: subsets, pair and memorisation measures, the denoiser Jacobian, the CLI."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm
import generalization as gen
import plumbing
import toy_circles as tc

from conftest import ENV, ROOT  # noqa: E402


def run_cli(*args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "generalization.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


class OracleDenoiser(torch.nn.Module):
    """eps(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t): the exact noise if the data were the
    single image x*, so DDIM (eta = 0) maps every x_T to x*, and f(y) = x* for every y (Eq. 4)."""

    def __init__(self, target, diffusion):
        super().__init__()
        self.register_buffer("target", target)                     # (1, C, S, S) in [-1, 1]
        self.register_buffer("abar", diffusion.alphas_cumprod.clone())
        self.config = dict(in_channels=target.shape[1], image_size=target.shape[2])

    def forward(self, x, t):
        a = self.abar[torch.as_tensor(t).reshape(-1)].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def disc(cx, cy, radius=2.5, size=32):
    return tc.render_discs(size, [[cx, cy]], radius)                # (1, S, S, 1) uint8


D_CFG = dict(schedule="cosine", T=100, learn_sigma=False, loss="simple", respacing="")


def test_split_pool_disjoint_nested_and_seeded():
    a1, a2 = gen.split_pool(100, 20, seed=3)
    assert len(a1) == len(a2) == 20 and not set(a1) & set(a2)          # disjoint
    b1, b2 = gen.split_pool(100, 20, seed=3)
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)            # a seed fixes them
    c1, c2 = gen.split_pool(100, 50, seed=3)
    assert np.array_equal(c1[:20], a1) and np.array_equal(c2[:20], a2)  # nested in N (the paper's first/last N)
    assert not set(c1) & set(c2) and len(set(c1) | set(c2)) == 100
    assert not np.array_equal(gen.split_pool(100, 20, seed=4)[0], a1)
    with pytest.raises(ValueError, match="half the pool"):
        gen.split_pool(100, 51, seed=0)


def test_identical_models_from_the_same_x_T_agree_exactly():
    # two copies of one model, DDIM eta = 0 from the same seed: centre distance 0 and cosine 1;
    # the oracle's samples are its disc, so a second oracle shifted by 1.5 px lands 1.5 px away
    diffusion = ddpm.diffusion_from_config(D_CFG)
    target = plumbing.to_tensor(disc(12.3, 17.8))
    a = OracleDenoiser(target, diffusion)
    cfg = gen.GenConfig(sample_steps="10", T=100)
    rt = type("RT", (), {"device": torch.device("cpu")})()
    s1 = gen.sample_images(a, D_CFG, 6, cfg, rt, seed=5)
    s2 = gen.sample_images(copy.deepcopy(a), D_CFG, 6, cfg, rt, seed=5)
    pair = gen.compare_pair(s1, s2, 2.5)
    assert np.array_equal(pair["centre_dist"], np.zeros(6)) and np.allclose(pair["cos01"], 1.0)
    assert np.abs(s1.astype(int) - disc(12.3, 17.8).astype(int)).max() <= 1   # the sample is the disc
    shifted = OracleDenoiser(plumbing.to_tensor(disc(13.8, 17.8)), diffusion)
    pair = gen.compare_pair(s1, gen.sample_images(shifted, D_CFG, 6, cfg, rt, seed=5), 2.5)
    assert np.allclose(pair["centre_dist"], 1.5, atol=0.05)


def test_measures_on_constructed_pairs():
    a, b = disc(10.3, 12.6), disc(13.05, 12.6)                          # a known shift of 2.75 px
    c = gen.disc_centres(np.concatenate([a, b, np.zeros_like(a)]), 2.5)
    assert np.allclose(c[0], [10.3, 12.6], atol=0.05) and np.allclose(c[1], [13.05, 12.6], atol=0.05)
    assert np.isnan(c[2]).all()                                         # no circle: no centre
    assert np.allclose(gen.compare_pair(a, b, 2.5)["centre_dist"], 2.75, atol=0.05)
    assert np.isclose(gen.pair_cosine(a, a)[0], 1.0)                    # a disc vs itself
    far = disc(25.0, 25.0)
    assert gen.pair_cosine(a, far)[0] == 0.0                            # no overlap on [0, 1] images ...
    assert gen.pair_cosine(a, far, raw=True)[0] > 0.9                   # ... but the raw cosine is ~1
    # nearest training image and centre: a sample equal to training image 1 finds it at distance ~0
    train = dict(images=np.concatenate([far, b, a]), centres=np.array([[25.0, 25.0], [13.05, 12.6], [10.3, 12.6]]))
    near = gen.nearest_training(b, gen.disc_centres(b, 2.5), train["images"], train["centres"])
    assert near["index"][0] == 1 and np.isclose(near["cos"][0], 1.0) and near["centre_dist"][0] < 0.05
    fresh = dict(images=far, centres=gen.disc_centres(far, 2.5))
    m = gen.memorisation(b, gen.disc_centres(b, 2.5), train, dict(images=a, centres=train["centres"][2:]), fresh)
    assert m["copy_own"] == 1.0 and m["copy_other"] == 0.0 and np.isclose(m["d_other"]["median"], 2.75, atol=0.05)


def test_jacobian_of_a_linear_denoiser_is_its_matrix():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(18, 18, generator=g, dtype=torch.float64)
    f = lambda y: (A @ y.reshape(-1)).reshape(y.shape)               # f(y) = A y on (2, 3, 3) images
    ys = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64)
    J = gen.jacobian(f, ys, chunk_size=5)
    assert J.shape == (3, 18, 18) and all(torch.allclose(J[i], A) for i in range(3))


def test_effective_dimension_of_a_projection_is_its_rank():
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(40, 3)))                    # orthonormal basis of a 3-D subspace
    P = Q @ Q.T
    y = rng.normal(size=40)
    a = gen.jacobian_analysis(P, tangents=Q[:, :2] @ rng.normal(size=(2, 2)), f_y=P @ y, y=y)
    assert np.isclose(a["effective_dim"], 3.0) and a["kept_dims"] == 3
    assert np.allclose(a["eigenvalues"][:3], 1.0) and np.allclose(a["eigenvalues"][3:], 0.0, atol=1e-12)
    assert a["asymmetry"] < 1e-12 and a["homogeneity"] < 1e-12          # symmetric; f(y) = J y (no bias)
    assert np.isclose(a["tangent_energy"][4], 1.0) and a["tangent_energy"][1] <= 0.5 + 1e-12
    K = rng.normal(size=(40, 40))
    K = (K - K.T) / 2                                                   # an antisymmetric part
    b = gen.jacobian_analysis(P + K)
    assert np.isclose(b["asymmetry"], np.linalg.norm(K) / np.linalg.norm(P + K))


def test_denoiser_of_y_matches_the_eps_parametrisation():
    # f(y) = y - sigma eps(sqrt(abar) y): for eps(x) = c x it is (1 - c sqrt(1 - abar)) y, so
    # tr grad f = D (1 - c sqrt(1 - abar)); for the single-image oracle f(y) = x* and grad f = 0.
    diffusion = ddpm.diffusion_from_config(D_CFG)
    t, c = 40, 0.7
    linear = lambda x, t_model: c * x
    f, sigma = gen.denoiser(linear, diffusion, t)
    abar = diffusion.float64["alphas_cumprod"][t]
    assert math.isclose(sigma, math.sqrt((1 - abar) / abar))
    ys = torch.randn(2, 1, 4, 4)
    J = gen.jacobian(f, ys)
    assert torch.allclose(J[0], (1 - c * math.sqrt(1 - abar)) * torch.eye(16), atol=1e-5)
    # the same x0_hat as ddpm's pred_x0_from_eps at x_t = sqrt(abar) y
    xt = math.sqrt(abar) * ys
    ref = diffusion.pred_x0_from_eps(xt, torch.full((2,), t), c * xt)
    assert torch.allclose(torch.stack([f(y) for y in ys]), ref, atol=1e-5)
    oracle = OracleDenoiser(plumbing.to_tensor(disc(3.2, 4.1, 1.5, 8)), diffusion)
    f, _ = gen.denoiser(oracle, diffusion, t)
    y = torch.randn(1, 1, 8, 8)
    assert torch.allclose(f(y[0]), oracle.target[0], atol=1e-4)
    assert gen.jacobian(f, y).abs().max() < 1e-3


TINY = ["--quick", "--size", "16", "--radius", "2", "--ns", "2,8", "--pool", "32", "--steps", "10", "--batch", "8",
        "--n-samples", "4", "--n-eval", "8", "--eval-t", "5,50", "--jac-t", "5,50", "--T", "100", "--twist-n", "8",
        "--twist-n-samples", "4", "--clf-steps", "5", "--channels", "8", "--clf-channels", "8", "--sample-steps", "5",
        "--threads", "1", "--init", "both"]


def test_tiny_end_to_end_run_and_resume(tmp_path):
    out = tmp_path / "gen"
    r = run_cli(*TINY, "--out", str(out))
    stdout, stderr = r.communicate(timeout=120)
    assert r.returncode == 0, stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert [row["n"] for row in res["per_n"]] == [2, 8] and res["config"]["init"] == "both"
    for row in res["per_n"]:
        assert set(row["pairs"]) == {"A-B", "A-B0"} and set(row["memorisation"]) == {"A", "B", "B0"}
        assert {"centre_dist", "cos01", "cos_raw"} <= set(row["pairs"]["A-B"])
        assert set(row["mse"]["A"]["heldout"]) == {"5", "50"} and set(row["disagreement"]["A-B"]) == {"5", "50"}
        assert [j["t"] for j in row["jacobian"]] == [5, 50]
        assert all(np.isfinite(j["effective_dim"]) and 0 <= j["tangent_energy"]["2"] <= 1 + 1e-9 for j in row["jacobian"])
    assert res["twist"]["n"] == 8 and "guided" in res["twist"] and "unguided" in res["twist"]
    samples = np.load(out / "samples" / "N8_A.npz")
    assert samples["images"].dtype == np.uint8 and samples["images"].shape == (4, 16, 16, 1)
    for name in ("fig1_pairs", "vs_n", "effective_dim", "eigenvectors", "twist", "training_data"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    assert "| 8 |" in (out / "report.md").read_text()
    # a rerun (here of N = 8 alone, without the twist) picks the finished models up instead of
    # retraining them, and gives the same numbers
    r = run_cli(*TINY, "--ns", "8", "--twist-n", "0", "--out", str(out))
    stdout2, stderr2 = r.communicate(timeout=120)
    assert r.returncode == 0 and (stdout2 + stderr2).count("resumed from") == 3, stderr2[-2000:]   # A, B, B0
    assert json.loads((out / "results.json").read_text())["per_n"] == res["per_n"][1:]


@pytest.mark.parametrize("args, words", [(["--ns", "8,5000", "--pool", "8192"], "larger than half the pool"),
                                         (["--n-samples", "0"], "--n-samples"), (["--preset", "huge"], "invalid choice"),
                                         (["--quick", "--ns", "8,x"], "--ns"), (["--lambdas", "30"], "--lambdas")])
def test_bad_input_is_one_line_and_exit_status_2(args, words, capsys):
    # the CLI's parser (plumbing.OneLineParser), called as main() calls it: SystemExit(2), one stderr line
    with pytest.raises(SystemExit) as exit_info:
        gen.parse_config(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and words in err and err.count("\n") == 1, err


def test_torchrun_is_refused_before_any_work(tmp_path, monkeypatch):
    # every rank would train, sample and write the same files: one line, nothing written
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="runs in one process; start it with python, not torchrun"):
        gen.main(["--quick", "--out", str(tmp_path / "g")])
    assert not (tmp_path / "g").exists()
