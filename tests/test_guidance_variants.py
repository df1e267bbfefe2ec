"""Guidance variants: classifier-free multi-guidance (App. J, Eq. 12 read consistently) in both
parametrisations, the authors' released w (eps = -w eps(null) + (1 + w) mean_m eps(y_m), the default)
and our lambda, with the mapping lambda_m = (1 + w) / M between them; two variables (App. F, region
"corners" and the unseen centre square) and a regressor as the evaluator (App. K)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm
import evaluate
import fit
import multiguide as mg
import plumbing
import toy_circles as tc
import train
import unet

from conftest import ENV, ROOT, perturbed  # noqa: E402
from test_train import TINY  # noqa: E402

DIFFUSION = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(2)
    return perturbed(unet.build_unet("tiny", num_classes=2), seed=2, std=0.02).eval()


def run_cli(*args, script="train.py", timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


class LinearEps(torch.nn.Module):
    """A toy class-conditional denoiser, eps(x, y) = a_y x + b_y (v = 0), y = 2 is the null label."""
    num_classes = 2

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), 2) if y is None else y
        eps = self.a[y][:, None, None, None] * x + self.b[y][:, None, None, None]
        return torch.cat([eps, torch.zeros_like(x)], dim=1)


# --- the conditional U-Net -------------------------------------------------------------------

def test_unet_label_embedding_null_label_and_parameter_count(cond_unet):
    # num_classes = 0 keeps every pinned count; num_classes = 2 adds one (2 + 1) x 4 mc embedding
    assert unet.count_params(unet.build_unet("tiny")) == 191_382
    assert unet.count_params(cond_unet) == 191_382 + 3 * 64 and cond_unet.config["num_classes"] == 2
    x, t = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 50, 99])
    with torch.no_grad():
        assert torch.equal(cond_unet(x, t), cond_unet(x, t, torch.full((3,), 2)))   # y None = null label
        assert not torch.allclose(cond_unet(x, t, torch.zeros(3, dtype=torch.long)), cond_unet(x, t), atol=1e-4)
    with pytest.raises(ValueError, match="unconditional"):
        unet.build_unet("tiny")(x, t, torch.zeros(3, dtype=torch.long))


# --- label dropout -----------------------------------------------------------------------------

class Recorder:
    """A stand-in Diffusion: records the clean batch, t, eps and the labels the net receives."""
    num_timesteps = 100

    def __init__(self):
        self.calls = []

    def training_losses(self, model, x, t, noise):
        seen = {}
        net_out = model(x, t)
        seen.update(x=x, t=t, noise=noise, y=getattr(net_out, "y", None))
        self.calls.append(seen)
        return dict(loss=torch.zeros(x.shape[0]))


class SpyNet:
    num_classes = 2

    def __call__(self, x, t, y=None):
        out = torch.zeros(1)
        out.y = y
        return out


def test_label_dropout_rate_and_flipped_labels_and_unchanged_draws():
    # App. J and the authors' released configuration: labels become the null label (2) with probability 0.1
    data = tc.make_circles(16, "train")
    x0, labels = plumbing.to_tensor(data["images"]), torch.as_tensor(data["labels"])
    rec, rec0 = Recorder(), Recorder()
    cond = fit.ddpm_loss(rec, x0, labels=labels, label_dropout=0.1)
    plain = fit.ddpm_loss(rec0, x0)
    nulls = []
    for step in range(20):
        terms = cond(SpyNet(), 500, fit.step_generator(0, 0, 0, step, "cpu"))
        plain(SpyNet(), 500, fit.step_generator(0, 0, 0, step, "cpu"))
        c, p = rec.calls[-1], rec0.calls[-1]
        y = c["y"]
        null = y == 2
        assert torch.equal(terms["null_label"], null.float())
        # kept labels agree with the (flipped) image: 1 = the circle sits right of the middle column
        side = (c["x"][:, 0].amax(dim=1).argmax(dim=1) >= 8).long()   # (B,) column of the white pixel
        assert torch.equal(y[~null], side[~null])
        # the unconditional path draws the same images, t and eps (dropout uniforms come last)
        assert torch.equal(c["x"], p["x"]) and torch.equal(c["t"], p["t"]) and torch.equal(c["noise"], p["noise"])
        assert p["y"] is None
        nulls.append(null.float().mean().item())
    rate, sd = np.mean(nulls), np.sqrt(0.1 * 0.9 / 10_000)
    assert abs(rate - 0.1) < 4 * sd, rate                          # 10,000 Bernoulli(0.1) draws
    none = fit.ddpm_loss(Recorder(), x0, labels=labels, label_dropout=0.0)
    assert none(SpyNet(), 500, fit.step_generator(0, 0, 0, 0, "cpu"))["null_label"].sum() == 0



def test_tilted_t_draws_follow_timestep_probs_and_no_tilt_is_the_uniform_draw():
    x0 = plumbing.to_tensor(tc.make_circles(8, "train")["images"])
    rec, tilted = Recorder(), Recorder()
    plain, tilt = fit.ddpm_loss(rec, x0), fit.ddpm_loss(tilted, x0, t_tilt=4.0)
    for step in range(40):
        g = fit.step_generator(0, 0, 0, step, "cpu")
        plain(SpyNet(), 500, g)
        tilt(SpyNet(), 500, fit.step_generator(0, 0, 0, step, "cpu"))
        # no tilt: t is exactly torch.randint after the batch's draws (every run before --t-tilt)
        g = fit.step_generator(0, 0, 0, step, "cpu")
        fit.draw_batch(x0, None, 500, g)
        assert torch.equal(rec.calls[-1]["t"], torch.randint(100, (500,), generator=g))
    t = torch.cat([c["t"] for c in tilted.calls]).numpy()                   # 20,000 draws, T = 100
    p = np.array([1 + 4 * k / 100 for k in range(100)]); p /= p.sum()
    for lo, hi in ((0, 25), (25, 50), (50, 75), (75, 100)):                 # each quarter's mass, within 4 SE
        want = p[lo:hi].sum()
        assert abs(np.mean((t >= lo) & (t < hi)) - want) < 4 * np.sqrt(want * (1 - want) / len(t)), (lo, want)
    assert abs(t.mean() - (p * np.arange(100)).sum()) < 4 * np.sqrt((p * (np.arange(100) - (p * np.arange(100)).sum()) ** 2).sum() / len(t))

# --- the classifier-free mix -------------------------------------------------------------------

def test_cfg_mix_special_cases_are_exact():
    model = LinearEps([0.5, -1.0, 2.0], [0.1, 0.2, -0.3])
    x, t = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), torch.arange(4)
    null, c0, c1 = (model(x, t, torch.full((4,), k)) for k in (2, 0, 1))
    assert torch.equal(mg.classifier_free_output(model, x, t, [0.0, 0.0]), null)      # lambda = 0: unconditional
    assert torch.equal(mg.classifier_free_output(model, x, t, [0.0, 1.0]), c1)        # lambda_1 = 1: conditional
    assert torch.equal(mg.classifier_free_output(model, x, t, [1.0, 0.0]), c0)
    mixed = mg.classifier_free_output(model, x, t, [3.0, 0.5])
    expect = null[:, :3] + 3.0 * (c0[:, :3] - null[:, :3]) + 0.5 * (c1[:, :3] - null[:, :3])
    assert torch.allclose(mixed[:, :3], expect, rtol=0, atol=1e-12) and torch.equal(mixed[:, 3:], null[:, 3:])
    # Eq. 12 read with (1 + lambda): -lambda eps(null) + (1 + lambda) (eps(0) + eps(1)) / 2 = lambda_m = (1 + lambda) / 2
    lam = 4.0
    eq12 = -lam * null[:, :3] + (1 + lam) * (c0[:, :3] + c1[:, :3]) / 2
    assert torch.allclose(mg.classifier_free_output(model, x, t, [(1 + lam) / 2] * 2)[:, :3], eq12, atol=1e-12)


class AffineEps(torch.nn.Module):
    """eps(x, y) = a_y x + b_y, v = c_y, for M = len(a) - 1 classes; y = M is the null label (float64)."""

    def __init__(self, a, b, c):
        super().__init__()
        self.num_classes = len(a) - 1
        self.a, self.b, self.c = (torch.tensor(v, dtype=torch.float64) for v in (a, b, c))

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), self.num_classes) if y is None else y
        col = lambda v: v[y][:, None, None, None]  # noqa: E731
        return torch.cat([col(self.a) * x + col(self.b), col(self.c) + torch.zeros_like(x)], dim=1)


@pytest.mark.parametrize("M", [2, 3])
def test_released_w_mix_is_the_lambda_mix_at_one_plus_w_over_m(M):
    # the released sampler: eps = -w eps(null) + (1 + w) mean_m eps(y_m); ours: eps(null) + sum_m lambda_m
    # (eps_m - eps(null)). Closed form: equal lambda_m = (1 + w) / M gives the w mix; w = M lambda - 1.
    a, b, c = [0.5, -1.0, 2.0, 0.25][:M] + [1.5], [0.1, 0.2, -0.3, 0.7][:M] + [-0.2], [0.3, -0.4, 0.9, 0.1][:M] + [0.6]
    model = AffineEps(a, b, c)
    x, t = torch.randn(4, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)), torch.arange(4)
    null = model(x, t)[:, :3]
    conds = [model(x, t, torch.full((4,), m))[:, :3] for m in range(M)]
    for w in (0.1, 0.0, -1.0, 2.5, 7.0):
        by_hand = -w * null + (1 + w) * sum(conds) / M                          # the release, written out
        got = mg.cfg_output(model, x, t, w)
        assert torch.allclose(got[:, :3], by_hand, rtol=0, atol=1e-12)
        assert torch.equal(got[:, 3:], model(x, t)[:, 3:])                     # v of the null-label pass
        lam = mg.cfg_w_lambdas(w, M)
        assert lam == [(1 + w) / M] * M and mg.lambdas_cfg_w(lam) == pytest.approx(w, abs=1e-14)
        assert torch.allclose(mg.classifier_free_output(model, x, t, lam)[:, :3], by_hand, rtol=0, atol=1e-12)
    assert mg.cfg_w_lambdas(0.1, 2) == [0.55, 0.55] and mg.lambdas_cfg_w([0.55, 0.55]) == pytest.approx(0.1)
    assert mg.lambdas_cfg_w([0.0] * M) == -1.0 and mg.lambdas_cfg_w([1.0 / M] * M) == pytest.approx(0.0)
    assert torch.equal(mg.cfg_output(model, x, t, -1.0)[:, :3], null)          # w = -1: the unconditional model
    with pytest.raises(ValueError, match="equal weights"):
        mg.lambdas_cfg_w([0.5, 0.6])


def test_sampler_defaults_to_the_released_w_and_refuses_both_forms(cond_unet):
    kw = dict(respacing="3", seed=4, progress=False, guidance="free")
    default = mg.sample(cond_unet, DIFFUSION, 2, **kw)
    assert mg.CFG_W == 0.1 and torch.equal(default, mg.sample(cond_unet, DIFFUSION, 2, cfg_w=0.1, **kw))
    lam = mg.sample(cond_unet, DIFFUSION, 2, lambdas=[0.55, 0.55], **kw)     # the same mix in our form
    assert (default - lam).abs().max() < 1e-4 and not torch.equal(default, mg.sample(cond_unet, DIFFUSION, 2, cfg_w=3.0, **kw))
    with pytest.raises(ValueError, match="not both"):
        mg.sample(cond_unet, DIFFUSION, 1, lambdas=[1.0, 1.0], cfg_w=0.1, **kw)
    with pytest.raises(ValueError, match="classifier-free"):
        mg.sample(cond_unet, DIFFUSION, 1, cfg_w=0.1, progress=False)


def test_cli_free_guidance_writes_the_w_and_its_lambdas(cond_unet, tmp_path, capsys):
    path = str(tmp_path / "cond.pt")
    plumbing.save_checkpoint(path, dict(kind="ddpm", model_config=cond_unet.config, diffusion=DIFFUSION,
                                        model=cond_unet.state_dict()))
    base = ["--ddpm", path, "--guidance", "free", "--n-samples", "2", "--sample-steps", "3", "--threads", "1"]
    mg.main([*base, "--out", str(tmp_path / "w")])
    with np.load(tmp_path / "w" / "samples.npz") as f:
        assert float(f["cfg_w"]) == 0.1 and f["lambdas"].tolist() == [0.55, 0.55]
    assert json.loads((tmp_path / "w" / "samples.json").read_text())["cfg_w"] == 0.1
    capsys.readouterr()
    for args, message in [(["--cfg-w", "0.1", "--lambdas", "1,1"], "give one of them"),
                          (["--cfg-w", "nan"], "--cfg-w"),
                          (["--lambdas", "1,1,1"], "gives 3 weights")]:
        assert message in refused(mg.main, [*base, *args, "--out", str(tmp_path / "x")], capsys), args
    ddpm_only = ["--ddpm", path, "--cfg-w", "0.1", "--out", str(tmp_path / "x")]
    assert "with --guidance free" in refused(mg.main, ddpm_only, capsys)
    assert not (tmp_path / "x").exists()


def test_cfg_mix_on_the_unet_one_batched_forward(cond_unet):
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([10, 90])
    with torch.no_grad():
        assert torch.equal(mg.classifier_free_output(cond_unet, x, t, [0.0, 0.0]), cond_unet(x, t))
        c1, null = cond_unet(x, t, torch.ones(2, dtype=torch.long)), cond_unet(x, t)
        one = mg.classifier_free_output(cond_unet, x, t, [0.0, 1.0])   # eps of class 1, v of the null pass
        assert torch.allclose(one[:, :3], c1[:, :3], rtol=0, atol=1e-6)
        assert torch.allclose(one[:, 3:], null[:, 3:], rtol=0, atol=1e-6)
        calls = []
        hook = cond_unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        mg.classifier_free_output(cond_unet, x, t, [3.0, 3.0])
        hook.remove()
    assert calls == [6]                                            # one forward of (M + 1) B images


def test_implicit_classifier_gradient_matches_bayes_on_gaussians():
    # p(x_t | y) = N(mu_y, s^2 I): eps(x, y) = sqrt(1 - abar) (x - mu_y) / s^2 is linear in x, and
    # grad log p(y | x_t) = grad [log N(x; mu_y) - log N(x; mu_null)] = (mu_y - mu_null) / s^2 (autograd below)
    diffusion = ddpm.Diffusion(ddpm.get_betas("cosine", 100))
    s2, mus = 0.7, torch.tensor([-0.4, 0.9, 0.1], dtype=torch.float64)   # classes 0, 1 and the null label
    sig = torch.tensor(diffusion.float64["sqrt_one_minus_alphas_cumprod"])

    class Gaussian(torch.nn.Module):
        num_classes = 2

        def forward(self, x, t, y=None):
            y = torch.full((x.shape[0],), 2) if y is None else y
            eps = sig[t][:, None, None, None] * (x - mus[y][:, None, None, None]) / s2
            return torch.cat([eps, torch.zeros_like(x)], dim=1)

    model, lam = Gaussian(), torch.tensor([2.0, 5.0], dtype=torch.float64)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    t = torch.tensor([3, 40, 97])
    log_n = lambda mu: -((x - mu) ** 2).sum() / (2 * s2)  # noqa: E731
    (want,) = torch.autograd.grad(sum(lam[m] * (log_n(mus[m]) - log_n(mus[2])) for m in range(2)), x)
    got = mg.implicit_classifier_grad(model, diffusion, x.detach(), t, lam)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    assert torch.allclose(got[0], torch.full_like(got[0], float(lam @ (mus[:2] - mus[2]) / s2)), rtol=1e-5)
    # DDIM on the mixed eps equals DDIM on eps(null) guided by the implicit classifier (eps - sqrt(1 - abar) g)
    mixed = lambda xx, tt: mg.classifier_free_output(model, xx, tt, lam)  # noqa: E731
    noise = torch.zeros_like(x)
    a = diffusion.ddim_step(mixed, x.detach(), t, noise=noise, clip=False)["sample"]
    b = diffusion.ddim_step(model, x.detach(), t, noise=noise, clip=False,
                            cond_fn=lambda xx, tm: mg.implicit_classifier_grad(model, diffusion, xx, tm, lam))["sample"]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cfg_sampler_zero_lambda_is_unguided_and_refuses_bad_arguments(sampler, cond_unet):
    kw = dict(respacing="4", sampler=sampler, seed=5, progress=False)
    free0 = mg.sample(cond_unet, DIFFUSION, 3, lambdas=[0.0, 0.0], guidance="free", **kw)
    assert torch.equal(free0, mg.sample(cond_unet, DIFFUSION, 3, **kw))
    guided = mg.sample(cond_unet, DIFFUSION, 3, lambdas=[3.0, 3.0], guidance="free", **kw)
    assert guided.shape == (3, 3, 16, 16) and torch.isfinite(guided).all() and not torch.equal(guided, free0)
    with pytest.raises(ValueError, match="2 classes"):
        mg.sample(cond_unet, DIFFUSION, 1, lambdas=[1.0, 1.0, 1.0], guidance="free", **kw)
    with pytest.raises(ValueError, match="class-conditional"):
        mg.sample(unet.build_unet("tiny"), DIFFUSION, 1, lambdas=[1.0, 1.0], guidance="free", **kw)
    with pytest.raises(ValueError, match="unknown guidance"):
        mg.sample(cond_unet, DIFFUSION, 1, guidance="cfg", **kw)


# --- end to end: train.py --cfg and multiguide.py --guidance free --------------------------------

def test_cfg_run_end_to_end_writes_the_lambda_table(tmp_path):
    out = tmp_path / "cfg"
    r = run_cli(*TINY, "--cfg", "--steps", "10", "--clf", "tiny", "--clf-steps", "4", "--clf-batch", "8",
                "--n-samples", "6", "--regressor-steps", "4", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["guidance"] == "free" and [s["lam"] for s in res["lambda_sweep"]] == [0, 1, 3, 10, 30]
    for row in res["lambda_sweep"]:
        images = np.load(out / "samples" / f"cfg_lambda{row['lam']:g}.npz")["images"]
        assert row["free"]["accuracy"] == evaluate.circle_stats(images)["accuracy"]
    uncond = np.load(out / "samples" / "unconditional.npz")["images"]
    assert np.array_equal(np.load(out / "samples" / "cfg_lambda0.npz")["images"], uncond)   # lambda = 0: unguided
    assert np.array_equal(np.load(out / "samples" / "sweep_lambda0.npz")["images"], uncond)
    assert "classifier-free: accuracy" in (out / "report.md").read_text()
    # the released sampler's w = 0.1 (Config.cfg_w), drawn as the lambda form it equals: 0.55 per class
    w = np.load(out / "samples" / "cfg_w0.1.npz")
    assert res["cfg_w"]["w"] == 0.1 and res["cfg_w"]["lambdas"] == [0.55, 0.55] and w["lambdas"].tolist() == [0.55, 0.55]
    assert res["cfg_w"]["accuracy"] == evaluate.circle_stats(w["images"])["accuracy"]
    assert set(res["regressor"]) >= {"regressor", "detector", "mean_abs_difference"}
    ckpt = plumbing.load_checkpoint(str(out / "ddpm.pt"), "ddpm")
    assert ckpt["model_config"]["num_classes"] == 2 and all(0 <= row["null_label"] <= 1 for row in ckpt["log"])
    model, _, _ = mg.load_models(str(out / "ddpm.pt"))
    assert model.num_classes == 2
    r = run_cli("--ddpm", str(out / "ddpm.pt"), "--guidance", "free", "--lambdas", "3,3", "--n-samples", "2", "--sample-steps", "3",
                "--out", str(tmp_path / "mg"), script="multiguide.py")
    assert r.returncode == 0 and np.load(tmp_path / "mg" / "samples.npz")["images"].shape == (2, 16, 16, 3)


def refused(main, argv, capsys):
    """Run a CLI's main in-process: it must exit non-zero with exactly one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code not in (0, None) and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_one_line_and_nonzero_exit(tmp_path, capsys):
    cases = [(["--data", "corners", "--lambdas", "30,30"], "4 for corners"),
             (["--cfg", "--label-dropout", "1.5"], "--label-dropout"),
             (["--cfg", "--frobnicate"], "unrecognized arguments: --frobnicate"),
             (["--guidance", "both"], "invalid choice"),
             (["--regressor-steps", "-1"], "--regressor-steps")]
    for args, message in cases:
        assert message in refused(train.main, [*TINY, *args, "--out", str(tmp_path / "x")], capsys), args
    assert not (tmp_path / "x").exists()
    path = str(tmp_path / "uncond.pt")
    plumbing.save_checkpoint(path, dict(kind="ddpm", model_config=unet.build_unet("tiny").config, diffusion=DIFFUSION,
                                    model=unet.build_unet("tiny").state_dict()))
    for args, message in [(["--guidance", "free"], "is unconditional"),
                          (["--guidance", "free", "--classifier", path], "drop --classifier")]:
        assert message in refused(mg.main, ["--ddpm", path, *args, "--out", str(tmp_path / "mg")], capsys)
    r = run_cli(*TINY, "--cfg", "--frobnicate", "--out", str(tmp_path / "x"))     # and once through the real CLI
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--frobnicate" in r.stderr


# --- two variables (App. F) -----------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 32])
def test_corners_region_geometry_and_labels(size):
    data = tc.make_circles(size, "corners")
    xs, ys, labels = data["centres"][:, 0], data["centres"][:, 1], data["labels"]
    bands = set(tc.grid_positions(size, "left")[0]) | set(tc.grid_positions(size, "right")[0])
    assert set(xs) <= bands and set(ys) <= bands                   # every centre in a corner square
    assert len(xs) == len(bands) ** 2 == {64: 400, 32: 100}[size]
    assert np.array_equal(labels, (xs >= size // 2) + 2 * (ys >= size // 2))
    assert np.bincount(labels).tolist() == [len(xs) // 4] * 4      # balanced quadrants
    z = tc.normalized_x(data["centres"], size)
    inside = (z >= tc.MIDDLE_BAND[0]) & (z <= tc.MIDDLE_BAND[1])
    assert not inside.any()                                        # no coordinate even in the middle band
    # a left-right flip mirrors the image and toggles the x bit of the quadrant: 0 <-> 1, 2 <-> 3
    x = plumbing.to_tensor(data["images"])
    x2, y2 = fit.random_hflip(x, torch.as_tensor(labels), torch.Generator().manual_seed(0))
    flipped = ~torch.isclose(x2, x).all(dim=(1, 2, 3))
    assert flipped.any() and (~flipped).any()
    assert torch.equal(y2[flipped], torch.as_tensor(labels)[flipped] ^ 1)
    assert torch.equal(x2[flipped], x[flipped].flip(-1))


def test_centre_square_fraction_on_hand_made_detections(tmp_path):
    # S = 32: z = (c + 0.5) / 32 in [0.2, 0.8] <=> pixel c in 6..25
    cx = np.array([16, 16, 3, 16, 6, 25, 5, np.nan])
    cy = np.array([16, 16, 16, 28, 25, 6, 16, np.nan])
    n = np.array([1, 2, 1, 1, 1, 1, 1, 0])
    got = evaluate.centre_square_stats(cx, cy, n, 32)
    assert got["in_centre"].tolist() == [True, False, False, False, True, True, False, False]
    assert got["centre_fraction"] == 3 / 8
    # the same through the detector on drawn discs
    one = [(16, 16), (3, 16), (16, 28), (6, 25), (25, 6), (5, 16)]
    images = np.stack([tc.draw_disc(32, x, y, 1.0) for x, y in one])
    stats = evaluate.circle_stats(images)
    assert stats["centre_fraction"] == 3 / 6 and stats["in_centre"].tolist() == [True, False, False, True, True, False]
    path = tmp_path / "centres.png"
    evaluate.plot_centre_heatmap(stats["cx"], stats["cy"], 32, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the regressor evaluator (App. K) --------------------------------------------------------

def test_regressor_recovers_x_on_held_out_positions(tmp_path):
    data = tc.make_circles(16, "all")
    held = np.random.default_rng(0).random(len(data["labels"])) < 0.2
    cfg = train.Config(out=str(tmp_path), image_size=16, clf="tiny", regressor_steps=300, clf_lr=1e-3,
                       clf_batch=16, log_every=50, threads=1)
    model, log = train.train_regressor(cfg, fit.Runtime(0, 1, torch.device("cpu")),
                                       {k: v[~held] for k, v in data.items()})
    assert log[-1]["loss"] < 0.1 * log[0]["loss"]
    pred = evaluate.regressor_scores(model, data["images"][held])                 # (N, 2) in (0, 1)
    err_px = np.abs(pred[:, 0] - tc.normalized_x(data["centres"][held, 0], 16)) * 16
    assert err_px.mean() < 0.5 and err_px.max() < 1.5, (err_px.mean(), err_px.max())
    g = evaluate.regressor_vs_detector(pred, evaluate.circle_stats(data["images"][held]))
    assert g["n_one_circle"] == held.sum() and g["mean_abs_difference"] < 0.5 / 16
    assert set(g["regressor"]) == {"unit", "data"} and g["regressor"]["unit"]["kld"] >= 0
    assert plumbing.load_checkpoint(str(tmp_path / "regressor.pt"), "regressor")["model_config"]["num_classes"] == 2
