"""classifier.py: shapes, pinned sizes, attention pooling against a hand-written softmax, spectral norm
(Sec. 5.5), temperature scaling (Guo et al. 2017), the Fig. 7b heatmap, and the heatmap CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import classifier as C
import ddpm
import plumbing
import toy_circles
import unet

from conftest import ENV, ROOT, perturbed  # noqa: E402

DIFFUSION = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")


def linear_and_conv_norms(model):
    """Largest singular value of every Conv2d / Linear weight, reshaped to (out, -1)."""
    norms = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            W = m.weight.detach()
            norms.append(torch.linalg.matrix_norm(W.reshape(W.shape[0], -1), ord=2).item())
    return np.array(norms)


# --- the model -------------------------------------------------------------------------------

def test_output_shape_and_config_rebuilds_the_model():
    torch.manual_seed(0)
    m = perturbed(C.build_classifier("tiny", num_classes=3))
    x, t = torch.randn(5, 3, 16, 16), torch.tensor([0, 1, 50, 99, 999])
    out = m(x, t)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    clone = C.NoisyClassifier(**m.config)
    clone.load_state_dict(m.state_dict())
    assert torch.equal(clone(x, t), out)
    assert m.config["num_classes"] == 3 and m.num_classes == 3


def test_pinned_parameter_counts_and_head_formula():
    # The authors' released circles configuration (Sec. 5.5): width 64, depth 2 -> ~10M parameters.
    counts = {p: unet.count_params(C.build_classifier(p)) for p in C.PRESETS}
    assert counts == {"paper": 9_501_762, "cpu": 490_754, "tiny": 93_010}
    # Independent count: time MLP + the encoder alone + norm + pooling head (pos. emb., qkv, projection).
    cfg = C.PRESETS["paper"]
    mc, K = cfg["model_channels"], cfg["num_classes"]
    enc = unet.UNetEncoder(3, mc, cfg["channel_mult"], cfg["num_res_blocks"], cfg["attention_resolutions"],
                           0.0, 4, -1, 64, 1)
    Cm, hw = enc.out_channels, enc.out_resolution ** 2
    time_mlp = (mc * 4 * mc + 4 * mc) + (4 * mc * 4 * mc + 4 * mc)
    head = 2 * Cm + (hw + 1) * Cm + (Cm * 3 * Cm + 3 * Cm) + (Cm * K + K)
    assert counts["paper"] == time_mlp + unet.count_params(enc) + head
    assert 9e6 < counts["paper"] < 11e6


def test_prediction_depends_on_timestep_and_scalar_t_broadcasts():
    torch.manual_seed(1)
    m = perturbed(C.build_classifier("tiny")).eval()
    x = torch.randn(2, 3, 16, 16)
    a, b = m(x, torch.tensor([10, 10])), m(x, torch.tensor([900, 900]))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(m(x, torch.tensor(10)), a)
    # batch elements are independent: row 0 with t = 10 is the same whatever t row 1 gets
    torch.testing.assert_close(m(x, torch.tensor([10, 900]))[0], a[0])


def test_attention_pool_equals_full_self_attention_then_first_token():
    torch.manual_seed(2)
    pool = C.AttentionPool2d(8, tokens=9, out_dim=3, num_heads=2).double()
    x = torch.randn(4, 8, 3, 3, dtype=torch.float64)
    # hand-written: tokens = [mean, positions], + pos. emb., per-head softmax(q k^T / sqrt(d)) v, token 0
    tok = x.reshape(4, 8, 9).transpose(1, 2)
    tok = torch.cat([tok.mean(1, keepdim=True), tok], 1) + pool.positional_embedding
    q, k, v = pool.qkv(tok).chunk(3, dim=-1)                          # (B, 10, 8) each
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        att = torch.softmax(q[:, :, s] @ k[:, :, s].transpose(1, 2) / 2.0, dim=-1)  # sqrt(d) = 2
        heads.append(att @ v[:, :, s])                                # (B, 10, 4)
    expected = pool.proj(torch.cat(heads, -1)[:, 0])
    torch.testing.assert_close(pool(x), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="heads"):
        C.AttentionPool2d(6, 4, 2, num_heads=4)


def test_spectral_norm_bounds_every_layer_at_one():
    torch.manual_seed(3)
    plain = C.build_classifier("tiny")
    assert linear_and_conv_norms(plain).max() > 1.2                      # unconstrained layers exceed 1
    m = C.build_classifier("tiny", spectral_norm=True).train()
    n_layers = sum(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())
    assert sum(mod.__class__.__name__.startswith("Parametrized") for mod in m.modules()) == n_layers == 23
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 100, (4,))
    # sigma_hat = u^T W v <= sigma_max for unit u, v, so sigma_max(W / sigma_hat) >= 1 always, and the
    # power iterations (15 at registration, then 2 per training forward) bring it down to 1
    norms0 = linear_and_conv_norms(m)
    # (slowly where the two largest singular values are close: 1.03 after 10 forwards, 1.0005 after 100)
    for _ in range(100):
        m(x, t)
    norms = linear_and_conv_norms(m)
    assert norms0.min() > 1 - 1e-5 and norms0.max() < 1.1, norms0
    assert norms.min() > 1 - 1e-5 and norms.max() < 1.002, norms
    # eval mode freezes u, v: the weights (and so the guidance function) no longer change
    m.eval()
    w0 = m.time_embed[0].weight.clone()
    m(x, t)
    assert torch.equal(m.time_embed[0].weight, w0)
    # the zero-initialised layers were re-initialised (sigma = 0 would give NaN) and the output is finite
    assert torch.isfinite(m(x, t)).all()
    clone = C.NoisyClassifier(**m.config)
    clone.load_state_dict(m.state_dict())
    torch.testing.assert_close(clone.eval()(x, t), m(x, t))


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"choices: \['cpu', 'paper', 'tiny'\]"):
        C.build_classifier("huge")


def test_classifier_losses_are_cross_entropy_on_noised_images():
    torch.manual_seed(4)
    d = ddpm.diffusion_from_config(dict(DIFFUSION, respacing="10"))
    m = perturbed(C.build_classifier("tiny"))
    x0, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 1])
    t, noise = torch.tensor([0, 4, 9]), torch.randn(3, 3, 16, 16)
    terms = C.classifier_losses(m, d, x0, labels, t, noise)
    logits = m(d.q_sample(x0, t, noise), torch.tensor(d.timestep_map)[t])   # original indices
    torch.testing.assert_close(terms["loss"], -logits.log_softmax(1)[torch.arange(3), labels])
    assert terms["acc"].tolist() == (logits.argmax(1) == labels).float().tolist()


# --- temperature scaling ---------------------------------------------------------------------

def test_temperature_scaling_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(5)
    true_logits = torch.randn(20000, 3, generator=g) * 2.0
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g).squeeze(1)
    logits = 3.0 * true_logits                                          # over-confident by T = 3
    T = C.fit_temperature(logits, labels)
    assert T == pytest.approx(3.0, rel=0.1)
    before, after = F.cross_entropy(logits, labels).item(), F.cross_entropy(logits / T, labels).item()
    assert after < before - 0.05
    # the fitted T is a minimum of the NLL: a few percent either side is worse
    assert after <= min(F.cross_entropy(logits / (T * f), labels).item() for f in (0.95, 1.05))
    # an under-confident model gets T < 1
    assert C.fit_temperature(0.5 * true_logits, labels) == pytest.approx(0.5, rel=0.1)


# --- the heatmap (Fig. 7b) -------------------------------------------------------------------

class ColumnMean(nn.Module):
    """A hand-made 'classifier': logits +-(m - (S-1)/2), m = mean column of the bright (> 0) pixels."""
    num_classes = 2

    def forward(self, x, t):
        B, C_, H, W = x.shape
        w = (x.mean(1) > 0).float()                                     # (B, H, W): the disc
        m = (w.sum(1) * torch.arange(W, dtype=x.dtype)).sum(1) / w.sum((1, 2))
        d = m - (W - 1) / 2
        return torch.stack([-d, d], dim=1)


def test_heatmap_of_a_hand_made_classifier_switches_at_the_middle():
    size = 32
    d = ddpm.diffusion_from_config(dict(DIFFUSION, T=1000))
    xs, ys, p = C.heatmap(ColumnMean(), d, size, t=0, noise_draws=2)
    exs, eys = toy_circles.grid_positions(size, "all")
    assert np.array_equal(xs, exs) and np.array_equal(ys, eys)
    assert ((p > 0.5) == (xs >= size // 2)).all()                        # exactly the right half
    assert p.min() >= 0.0 and p.max() <= 1.0
    s = C.heatmap_summary(xs, p, size)
    # m - 15.5 = x - 15.5, so p = sigmoid(2 (x - 15.5)): in [0.1, 0.9] for x = 15, 16 only
    assert s["transition_width"] == 2
    assert s["middle_mean_p"] == pytest.approx(0.5, abs=1e-6)           # the middle band is symmetric
    assert s["columns"] == list(range(1, 31))


def test_heatmap_of_a_tiny_classifier(tmp_path):
    torch.manual_seed(6)
    m = perturbed(C.build_classifier("tiny"))
    d = ddpm.diffusion_from_config(DIFFUSION)
    xs, ys, p = C.heatmap(m, d, 16, t=50, noise_draws=2, batch=100)
    n_valid = len(toy_circles.grid_positions(16, "all")[0])
    assert xs.shape == ys.shape == p.shape == (n_valid,) and n_valid == 16 * 16
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert m.training                                                   # mode restored
    # seeded: the same call gives the same numbers, another seed other numbers. Another batch size draws
    # the same noise, but the BLAS kernels' rounding depends on the batch shape on some CPUs (measured:
    # 3e-8 on one machine, 0 on another), so that comparison is to float32 rounding only.
    assert np.array_equal(p, C.heatmap(m, d, 16, t=50, noise_draws=2, batch=100)[2])
    assert np.allclose(p, C.heatmap(m, d, 16, t=50, noise_draws=2, batch=64)[2], rtol=0, atol=1e-6)
    assert not np.array_equal(p, C.heatmap(m, d, 16, t=50, noise_draws=2, seed=1)[2])
    summary = C.plot_heatmap(xs, ys, p, 16, str(tmp_path / "h.png"), "tiny")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= summary["middle_mean_p"] <= 1.0 and 0 <= summary["transition_width"] <= 16
    with pytest.raises(ValueError, match="chain step"):
        C.heatmap(m, d, 16, t=100)


def test_summary_of_a_ramp():
    xs = np.repeat(np.arange(20), 3)
    p = np.clip((xs - 5) / 10.0, 0, 1)                                  # 0 up to x = 5, ramp, 1 from x = 15
    s = C.heatmap_summary(xs, p, 20)
    assert s["transition_width"] == 9                                   # x = 6..14 -> p = 0.1 .. 0.9
    z = (np.arange(20) + 0.5) / 20
    cols = np.arange(20)[(z >= 0.2) & (z <= 0.8)]
    assert s["middle_mean_p"] == pytest.approx(np.clip((cols - 5) / 10.0, 0, 1).mean())


# --- the CLI ---------------------------------------------------------------------------------

def test_cli_writes_png_and_json(tmp_path):
    torch.manual_seed(7)
    m = perturbed(C.build_classifier("tiny"))
    ema = perturbed(C.build_classifier("tiny"), seed=1)
    ckpt = str(tmp_path / "clf.pt")
    plumbing.save_checkpoint(ckpt, dict(kind="classifier", model_config=m.config, diffusion=DIFFUSION,
                                    model=m.state_dict(), ema=ema.state_dict()))
    model, _ = C.load_classifier(ckpt)
    assert torch.equal(model.time_embed[0].weight, ema.time_embed[0].weight)   # EMA weights by default
    out = tmp_path / "hm"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "classifier.py"), "--ckpt", ckpt, "--out", str(out),
                        "--t", "3", "--draws", "1"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (out / "heatmap_t3.png").read_bytes()[:4] == b"\x89PNG"
    rec = json.loads((out / "heatmap_t3.json").read_text())
    assert rec["t"] == 3 and len(rec["p_right"]) == 256 and 0 <= rec["transition_width"] <= 16
    expected = C.heatmap(model, ddpm.diffusion_from_config(DIFFUSION), 16, t=3, noise_draws=1)[2]
    np.testing.assert_allclose(rec["p_right"], expected, rtol=1e-5, atol=1e-6)
    # bad input: one line, non-zero exit, no traceback
    for args, message in [(["--ckpt", str(tmp_path / "nope.pt")], "does not exist"),
                          (["--ckpt", ckpt, "--t", "100"], "--t must be in [0, 99]")]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "classifier.py"), *args, "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
