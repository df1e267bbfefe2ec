"""multiguide.py: the multi-guidance gradient of Eq. 2 (against per-class autograd and float64 finite
differences), its special cases (lambda = 0 is the unguided sampler, [0, c] is single-class guidance),
Eq. 2's sum over several classifiers (two one-output classifiers = one two-head classifier computing
the same functions; per-class and per-classifier weights), the mean shift of Sec. 2.2 through
ddpm.p_sample, checkpoint loading and the CLI (several --classifier files included)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classifier as C
import ddpm
import multiguide as mg
import plumbing
import unet

from conftest import ENV, ROOT, perturbed  # noqa: E402

DIFFUSION = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return perturbed(C.build_classifier("tiny")).eval()


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(1)
    return perturbed(unet.build_unet("tiny"), seed=1, std=0.02).eval()


def objective(clf, x, t, lambdas):
    return (F.log_softmax(clf(x, t), dim=1) * torch.as_tensor(lambdas, dtype=x.dtype)).sum()


# --- the gradient ----------------------------------------------------------------------------

def test_gradient_equals_sum_of_per_class_gradients(clf):
    torch.manual_seed(2)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 95])
    lam = [3.0, -1.5]
    g = mg.multi_guidance_grad(clf, x, t, lam)
    # Eq. 2 written out: one forward and backward per class, lambda_m grad log p(y_m | x, t), summed
    expected = torch.zeros_like(x)
    for m, weight in enumerate(lam):
        xi = x.clone().requires_grad_(True)
        log_p = F.log_softmax(clf(xi, t), dim=1)[:, m].sum()
        expected += weight * torch.autograd.grad(log_p, xi)[0]
    assert g.shape == x.shape and g.dtype == torch.float32 and not g.requires_grad
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
    assert g.abs().max() > 1e-4


def test_gradient_matches_central_finite_differences_in_float64(clf):
    c64 = C.NoisyClassifier(**clf.config)
    c64.load_state_dict(clf.state_dict())
    c64 = c64.double().eval()
    torch.manual_seed(3)
    x, t, lam = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.tensor([7, 70]), [30.0, 30.0]
    g = mg.multi_guidance_grad(c64, x, t, lam)
    assert g.dtype == torch.float64
    h = 1e-4  # float64: truncation O(h^2) ~ 1e-10; a smaller h lets roundoff of the large objective dominate
    for b, ch, i, j in [(0, 0, 0, 0), (0, 1, 7, 8), (1, 2, 15, 3), (1, 0, 4, 12), (0, 2, 11, 11)]:
        e = torch.zeros_like(x)
        e[b, ch, i, j] = h
        with torch.no_grad():
            fd = (objective(c64, x + e, t, lam) - objective(c64, x - e, t, lam)) / (2 * h)
        assert g[b, ch, i, j].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-8)


def test_single_class_guidance_and_linearity(clf):
    torch.manual_seed(4)
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([30, 60]), 30.0
    # ordinary classifier guidance towards y = 1 (Dhariwal & Nichol): c grad log p(y = 1 | x, t)
    xi = x.clone().requires_grad_(True)
    single = torch.autograd.grad(c * F.log_softmax(clf(xi, t), dim=1)[:, 1].sum(), xi)[0]
    multi = mg.multi_guidance_grad(clf, x, t, [0.0, c])
    assert torch.equal(multi, single)                                   # the same numbers, bit for bit
    # c applied after the backward pass differs only by float32 rounding
    unit = torch.autograd.grad(F.log_softmax(clf(xi, t), dim=1)[:, 1].sum(), xi)[0]
    torch.testing.assert_close(multi, c * unit, rtol=1e-5, atol=1e-6)
    # linearity in lambda: g(l1 + l2) = g(l1) + g(l2)
    l1, l2 = torch.tensor([2.0, -7.0]), torch.tensor([5.0, 11.0])
    torch.testing.assert_close(mg.multi_guidance_grad(clf, x, t, l1 + l2),
                               mg.multi_guidance_grad(clf, x, t, l1) + mg.multi_guidance_grad(clf, x, t, l2),
                               rtol=1e-5, atol=1e-6)
    # two classes with equal weights: sum_m log p_m = log p_0 + log p_1, gradient of both at once
    eq = mg.multi_guidance_grad(clf, x, t, [c, c])
    torch.testing.assert_close(eq, mg.multi_guidance_grad(clf, x, t, [c, 0.0]) + multi, rtol=1e-5, atol=1e-6)


def test_gradient_is_float32_under_bf16_autocast(clf):
    torch.manual_seed(5)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    plain = mg.multi_guidance_grad(clf, x, t, [30.0, 30.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = mg.multi_guidance_grad(clf, x, t, [30.0, 30.0])
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain)


def test_lambda_count_and_zero_lambdas(clf):
    with pytest.raises(ValueError, match="3 guidance weight.*2 classes"):
        mg.multi_guidance_grad(clf, torch.randn(1, 3, 16, 16), torch.tensor([1]), [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="1 guidance weight.*2 classes"):
        mg.make_cond_fn(clf, [1.0])
    assert mg.make_cond_fn(clf, [0.0, 0.0]) is None
    assert callable(mg.make_cond_fn(clf, [0.0, 1.0]))


# --- Eq. 2 over several classifiers ------------------------------------------------------------

class OneLogit(torch.nn.Module):
    """A one-output classifier: the log-odds z_m - z_other of class m of a two-head classifier, so that
    p(y | x_t) = sigmoid(z_m - z_other) = softmax(z)_m: the same function as that head."""
    num_classes = 1

    def __init__(self, two_head, m):
        super().__init__()
        self.two_head, self.m = two_head, m

    def forward(self, x, t):
        z = self.two_head(x, t)
        return (z[:, self.m] - z[:, 1 - self.m])[:, None]


def test_two_one_output_classifiers_guide_like_one_two_head_classifier(clf):
    c64 = C.NoisyClassifier(**clf.config)
    c64.load_state_dict(clf.state_dict())
    c64 = c64.double().eval()
    torch.manual_seed(7)
    x, t = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([4, 40, 90])
    pair = [OneLogit(c64, 0), OneLogit(c64, 1)]
    for lam in ([30.0, 30.0], [2.0, -5.0], [0.0, 30.0]):
        one = mg.multi_guidance_grad(c64, x, t, lam)                          # sum_m lambda_m grad log p(y_m | x)
        two = mg.multi_classifier_grad(pair, x, t, lam)                       # sum_k lambda_k grad log sigmoid(l_k)
        assert two.dtype == torch.float64 and one.abs().max() > 1e-3
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)         # float64: the same function
    # a per-sample (B, 1) weight for each one-output classifier, and the sampler's cond_fn, in float32
    x32 = x.float()
    lam_b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    two = mg.multi_classifier_grad([OneLogit(clf, 0), OneLogit(clf, 1)], x32, t, [lam_b[:, :1], lam_b[:, 1:]])
    torch.testing.assert_close(two, mg.multi_guidance_grad(clf, x32, t, lam_b), rtol=1e-4, atol=1e-6)
    cond = mg.make_cond_fn([OneLogit(clf, 0), OneLogit(clf, 1)], [30.0, 30.0])
    torch.testing.assert_close(cond(x32, t), mg.make_cond_fn(clf, [30.0, 30.0])(x32, t), rtol=1e-4, atol=1e-5)


def test_several_classifiers_sum_their_scores_with_weights_per_class_or_per_classifier(clf):
    torch.manual_seed(8)
    other = perturbed(C.build_classifier("tiny"), seed=8).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 80])
    g1, g2 = mg.multi_guidance_grad(clf, x, t, [1.0, 2.0]), mg.multi_guidance_grad(other, x, t, [3.0, -4.0])
    both = [clf, other]
    for lambdas in ([[1.0, 2.0], [3.0, -4.0]], [1.0, 2.0, 3.0, -4.0]):     # nested, or flat per class
        assert torch.equal(mg.multi_classifier_grad(both, x, t, lambdas), g1 + g2)
    per_clf = mg.multi_classifier_grad(both, x, t, [5.0, 7.0])               # one weight per classifier
    assert torch.equal(per_clf, mg.multi_guidance_grad(clf, x, t, [5.0, 5.0]) + mg.multi_guidance_grad(other, x, t, [7.0, 7.0]))
    assert torch.equal(mg.multi_classifier_grad(both, x, t, [[1.0, 2.0], 0.0]), g1)   # a zero classifier adds nothing
    spy = Spy(other)
    mg.make_cond_fn([clf, spy], [1.0, 2.0, 0.0, 0.0])(x, t)
    assert spy.seen == []                                                    # ... and is never called
    assert mg.make_cond_fn([clf, other], [0.0, 0.0]) is None
    assert torch.equal(mg.multi_classifier_grad([clf], x, t, [1.0, 2.0]), g1)   # one classifier: bit for bit
    for bad, message in (([1.0, 2.0, 3.0], r"3 guidance weight.*2 classifiers with 2\+2 = 4 classes.*\(4\).*\(2\)"),
                         ([[1.0, 2.0]], "1 entries.*2 classifiers"), ([[1.0], 2.0], "1 guidance weight.*2 classes")):
        with pytest.raises(ValueError, match=message):
            mg.multi_classifier_grad(both, x, t, bad)


# --- through the samplers --------------------------------------------------------------------

class FixedOutput:
    """model(x, t) -> a fixed (eps, v) output, whatever x and t."""

    def __init__(self, out):
        self.out = out

    def __call__(self, x, t):
        return self.out


class Spy(torch.nn.Module):
    """Wraps a classifier; records the timesteps it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.num_classes, self.seen = inner, inner.num_classes, []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.inner(x, t)


def test_mean_shift_equals_variance_times_gradient(clf):
    # Sec. 2.2: mu~ = mu + Sigma g, with g the multi-guidance gradient of make_cond_fn
    torch.manual_seed(6)
    d = ddpm.diffusion_from_config(DIFFUSION, "10")                    # respaced: t_model != t
    out = torch.cat([torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16) * 2 - 1], 1)
    xt, noise, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([3, 8])
    spy, lam = Spy(clf), [2.0, 5.0]
    plain = d.p_sample(FixedOutput(out), xt, t, noise=noise)
    guided = d.p_sample(FixedOutput(out), xt, t, noise=noise, cond_fn=mg.make_cond_fn(spy, lam))
    t_model = torch.tensor(d.timestep_map)[t]
    assert spy.seen[0].tolist() == t_model.tolist() == [33, 88]      # the ORIGINAL step indices
    g = mg.multi_guidance_grad(clf, xt, t_model, lam)
    torch.testing.assert_close(guided["mean"] - plain["mean"], plain["variance"] * g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided["sample"] - plain["sample"], plain["variance"] * g, rtol=1e-5, atol=1e-6)
    # DDIM form: eps~ = eps - sqrt(1 - abar_t) g
    ddim = d.ddim_step(FixedOutput(out), xt, t, cond_fn=mg.make_cond_fn(clf, lam), clip=False)
    root = d.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(ddim["eps"], out[:, :3] - root * g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_zero_lambdas_reproduce_the_unguided_sampler_exactly(sampler, denoiser, clf):
    spy = Spy(clf)
    kw = dict(respacing="5", sampler=sampler, batch=2, seed=11, progress=False)
    uncond = mg.sample(denoiser, DIFFUSION, 3, **kw)
    zero = mg.sample(denoiser, DIFFUSION, 3, classifier=spy, lambdas=[0.0, 0.0], **kw)
    assert torch.equal(zero, uncond) and spy.seen == []                # the classifier was never called
    assert zero.shape == (3, 3, 16, 16) and zero.dtype == torch.float32
    assert zero.min() >= -1 and zero.max() <= 1
    guided = mg.sample(denoiser, DIFFUSION, 3, classifier=spy, lambdas=[30.0, 30.0], **kw)
    assert len(spy.seen) == 5 * 2 and not torch.equal(guided, uncond)  # 5 steps x 2 batches
    assert torch.equal(guided, mg.sample(denoiser, DIFFUSION, 3, classifier=clf, lambdas=[30.0, 30.0], **kw))
    assert not torch.equal(uncond, mg.sample(denoiser, DIFFUSION, 3, **dict(kw, seed=12)))


def test_sample_refuses_bad_arguments(denoiser, clf):
    with pytest.raises(ValueError, match="positive"):
        mg.sample(denoiser, DIFFUSION, 0, progress=False)
    with pytest.raises(ValueError, match="need a classifier"):
        mg.sample(denoiser, DIFFUSION, 1, lambdas=[0.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="3 guidance weight"):
        mg.sample(denoiser, DIFFUSION, 1, classifier=clf, lambdas=[1.0, 1.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        mg.sample(denoiser, DIFFUSION, 1, precision="fp8", progress=False)
    for precision in ("bf16", "fp16"):  # autocast on the CPU (the CLIs keep fp16 for CUDA); g stays float32
        x = mg.sample(denoiser, DIFFUSION, 2, classifier=clf, lambdas=[30.0, 30.0], respacing="3",
                      precision=precision, progress=False)
        assert x.dtype == torch.float32 and torch.isfinite(x).all()


# --- checkpoints and the CLI -----------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, denoiser, clf):
    folder = tmp_path_factory.mktemp("ckpts")
    raw = perturbed(unet.build_unet("tiny"), seed=5)
    paths = dict(ddpm=str(folder / "ddpm.pt"), clf=str(folder / "clf.pt"), clf32=str(folder / "clf32.pt"),
                 cut=str(folder / "cut.pt"))
    plumbing.save_checkpoint(paths["ddpm"], dict(kind="ddpm", model_config=denoiser.config, diffusion=DIFFUSION,
                                             model=raw.state_dict(), ema=denoiser.state_dict()))
    plumbing.save_checkpoint(paths["clf"], dict(kind="classifier", model_config=clf.config, diffusion=DIFFUSION,
                                            model=clf.state_dict(), ema=None))
    c32 = C.build_classifier("tiny", image_size=32)
    plumbing.save_checkpoint(paths["clf32"], dict(kind="classifier", model_config=c32.config, diffusion=DIFFUSION,
                                              model=c32.state_dict(), ema=None))
    data = open(paths["ddpm"], "rb").read()
    open(paths["cut"], "wb").write(data[: len(data) // 2])
    return paths


def test_load_models_uses_ema_and_refuses_mismatches(ckpts, denoiser, clf):
    model, d, c = mg.load_models(ckpts["ddpm"], ckpts["clf"])
    assert d == DIFFUSION and not model.training and not c.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), denoiser.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), clf.state_dict().values()))
    raw, _, none = mg.load_models(ckpts["ddpm"], use_ema=False)
    assert none is None and not torch.equal(raw.encoder.blocks[0][0].weight, model.encoder.blocks[0][0].weight)
    with pytest.raises(plumbing.CheckpointError) as err:
        mg.load_models(ckpts["ddpm"], ckpts["clf32"])
    message = str(err.value)
    assert "clf32.pt" in message and "ddpm.pt" in message and "image_size 32" in message and "image_size 16" in message
    with pytest.raises(plumbing.CheckpointError, match="'ddpm' model, expected a 'classifier'"):
        mg.load_models(ckpts["ddpm"], ckpts["ddpm"])


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "multiguide.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)


def test_cli_smoke(ckpts, tmp_path, denoiser, clf):
    out = tmp_path / "mg"
    r = run_cli("--ddpm", ckpts["ddpm"], "--classifier", ckpts["clf"], "--lambdas", "30,30", "--n-samples", "4",
                "--sample-steps", "5", "--batch", "3", "--seed", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with np.load(out / "samples.npz") as f:
        images, lambdas = f["images"], f["lambdas"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and lambdas.tolist() == [30.0, 30.0]
    assert (out / "samples.png").read_bytes()[:4] == b"\x89PNG" and (out / "samples.json").exists()
    # the CLI draws the same samples as the function (same checkpoints, seed and batch)
    x = mg.sample(denoiser, DIFFUSION, 4, classifier=clf, lambdas=[30.0, 30.0], respacing="5", batch=3, seed=2,
                  progress=False)
    assert np.abs(images.astype(int) - ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()).max() <= 1


def test_cli_several_classifiers_sum_their_guidance(ckpts, tmp_path, capsys):
    # Eq. 2 over k: the same classifier twice at 15 per class guides like it once at 30 (g is linear in lambda)
    common = ["--ddpm", ckpts["ddpm"], "--n-samples", "3", "--sample-steps", "4", "--seed", "5", "--threads", "1"]
    runs = {"once": ["--classifier", ckpts["clf"], "--lambdas", "30,30"],
            "per_class": ["--classifier", ckpts["clf"], ckpts["clf"], "--lambdas", "15,15,15,15"],
            "per_classifier": ["--classifier", ckpts["clf"], ckpts["clf"], "--lambdas", "15,15"],
            "default": ["--classifier", ckpts["clf"], ckpts["clf"]]}
    out = {}
    for name, args in runs.items():
        mg.main([*common, *args, "--out", str(tmp_path / name)])
        with np.load(tmp_path / name / "samples.npz") as f:
            out[name] = (f["images"].astype(int), f["lambdas"].tolist())
    assert out["per_class"][1] == out["per_classifier"][1] == [15.0] * 4 and out["default"][1] == [30.0] * 4
    assert np.array_equal(out["per_class"][0], out["per_classifier"][0])       # the same weights, read two ways
    assert np.abs(out["per_class"][0] - out["once"][0]).max() <= 1              # float rounding of 15 g + 15 g
    assert np.abs(out["default"][0] - out["once"][0]).max() > 1                 # 30 + 30 guides harder
    capsys.readouterr()
    for args, message in [(["--classifier", ckpts["clf"], ckpts["clf32"]], "clf32.pt has image_size 32"),
                          (["--classifier", ckpts["clf"], ckpts["clf"], "--lambdas", "1,2,3"],
                           "give one per class (4) or one per classifier (2)")]:
        with pytest.raises(SystemExit) as exc:
            mg.main([*common, *args, "--out", str(tmp_path / "bad")])
        text = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else "")
        assert exc.value.code != 0 and message in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "bad").exists()


def test_cli_bad_inputs(ckpts, tmp_path, capsys):
    out = str(tmp_path / "never")
    base = ["--ddpm", ckpts["ddpm"], "--classifier", ckpts["clf"], "--sample-steps", "5", "--out", out]
    # in a real process: exit status != 0, one line on stderr, no traceback
    for args, message in [
        (base + ["--n-samples", "0"], "--n-samples: expected an integer >= 1"),
        (base + ["--lambdas", "1,2,3"], "gives 3 weights"),
        (["--ddpm", ckpts["cut"], "--out", out], "truncated"),
        (["--ddpm", ckpts["ddpm"], "--classifier", ckpts["clf32"], "--out", out], "image_size 32"),
    ]:
        r = run_cli(*args)
        assert r.returncode != 0, args
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # more cases in this process (faster): each ends in SystemExit with a one-line message
    for args, message in [
        (base + ["--n-samples", "-3"], "--n-samples: expected an integer >= 1"),
        (base + ["--n", "3"], "--n was renamed --n-samples"),
        (base + ["--steps", "3"], "--steps was renamed --sample-steps"),
        (base + ["--batch", "0"], "--batch: expected an integer >= 1"),
        (base + ["--lambdas", "30,abc"], "comma-separated numbers"),
        (base + ["--lambdas", "30,nan"], "finite numbers"),
        (["--ddpm", ckpts["ddpm"], "--lambdas", "0,30", "--out", out], "need --classifier"),
        (["--ddpm", str(tmp_path / "missing.pt"), "--out", out], "does not exist"),
        (["--ddpm", ckpts["clf"], "--out", out], "expected a 'ddpm'"),
        (base + ["--sample-steps", "500"], "--sample-steps"),
        (base + ["--precision", "fp16"], "fp16 needs a CUDA device"),
    ]:
        with pytest.raises(SystemExit) as exc:
            mg.main(args)
        text = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else "")
        assert exc.value.code != 0 and message in text, (args, text)
        assert len(text.strip().splitlines()) == 1, text
    assert not os.path.exists(out)                                     # nothing written
