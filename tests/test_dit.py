"""Tests for dit.py: the diffusion transformer of App. J (Peebles & Xie 2023), checked against hand computations."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ddpm
import multiguide
import plumbing
import toy_circles
import unet
from conftest import ENV, perturbed
from dit import (PRESETS, DiT, DiTBlock, build_dit, count_params, patchify, sincos_pos_embed_2d, unpatchify)

REPO = Path(__file__).resolve().parents[1]


# ---- parameter counts by formula -------------------------------------------------------------------

def dit_params(C, p, D, depth, learn_sigma=True, num_classes=0, freq=256):
    """Per block: adaLN 6D^2 + 6D, qkv 3D^2 + 3D, proj D^2 + D, MLP (ratio 4) 8D^2 + 5D = 18D^2 + 15D."""
    out = 2 * C if learn_sigma else C
    block = 18 * D * D + 15 * D
    time_mlp = (freq * D + D) + (D * D + D)
    patch_embed = C * p * p * D + D
    final = (2 * D * D + 2 * D) + (D * p * p * out + p * p * out)  # adaLN (shift, scale) + linear
    labels = (num_classes + 1) * D if num_classes else 0  # the null label is one more row
    return depth * block + time_mlp + patch_embed + final + labels


def test_param_counts_by_formula_and_pinned():
    assert count_params(build_dit("tiny")) == dit_params(3, 2, 32, 4) == 88_248
    assert count_params(build_dit("cpu")) == dit_params(3, 2, 128, 4) == 1_274_520  # unet "cpu": 1,201,048
    assert count_params(build_dit("dit-s")) == dit_params(3, 4, 384, 12) == 32_517_600  # DiT-S/4
    assert count_params(build_dit("tiny", learn_sigma=False, num_classes=2)) == dit_params(3, 2, 32, 4, False, 2)
    assert count_params(build_dit("cpu", image_size=64)) == 1_274_520  # fixed positions: size-independent weights


# ---- patchify and positions -------------------------------------------------------------------------

def test_patchify_round_trip_is_exact_and_matches_unfold_and_the_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, 12)
    tokens = patchify(x, 3)  # (2, 16, 45)
    assert tokens.shape == (2, 16, 45)
    assert torch.equal(unpatchify(tokens, 3, 4), x)  # exact inverse
    # independent reference: F.unfold lists each 3x3 patch as (channel, row, column), patches row-major
    assert torch.equal(tokens, F.unfold(x, 3, stride=3).transpose(1, 2))
    # Sec. 3.2: a conv with kernel = stride = p is the linear map W (D, C p p) of each flattened patch
    conv = torch.nn.Conv2d(5, 7, 3, stride=3)
    linear = tokens @ conv.weight.reshape(7, 45).T + conv.bias  # (2, 16, 7)
    torch.testing.assert_close(conv(x).flatten(2).transpose(1, 2), linear, rtol=1e-5, atol=1e-5)


def test_sincos_pos_embed_matches_float64_numpy_loop():
    dim, grid = 16, 5
    quarter = dim // 4
    ref = np.zeros((grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            for k in range(quarter):
                w = 10000.0 ** (-k / quarter)
                token = row * grid + col
                ref[token, k], ref[token, quarter + k] = math.sin(col * w), math.cos(col * w)
                ref[token, 2 * quarter + k], ref[token, 3 * quarter + k] = math.sin(row * w), math.cos(row * w)
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (25, 16) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), ref, atol=1e-7)
    assert len(torch.unique(emb, dim=0)) == 25  # every position distinct
    # the model adds exactly this (fixed, not learned, not saved) table to its tokens
    model = build_dit("tiny")
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 8))
    assert "pos_embed" not in model.state_dict() and not any("pos" in n for n, _ in model.named_parameters())


# ---- the block, against a hand-written float64 computation -----------------------------------------

def layer_norm(x, eps=1e-6):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_dit_block_matches_hand_written_adaln_zero():
    """Sec. 3.2: x + g1 * Attn(LN(x)(1 + s1) + b1), then + g2 * MLP(LN(x)(1 + s2) + b2), with naive attention."""
    torch.manual_seed(0)
    D, nh, d, T = 16, 2, 8, 6
    block = perturbed(DiTBlock(D, nh).double(), std=0.2)  # the adaLN regressor starts at zero
    x, c = torch.randn(3, T, D, dtype=torch.float64), torch.randn(3, D, dtype=torch.float64)
    mod = (c * torch.sigmoid(c)) @ block.adaLN.weight.T + block.adaLN.bias  # SiLU(c) -> (3, 6D)
    b1, s1, g1, b2, s2, g2 = (mod[:, None, i * D:(i + 1) * D] for i in range(6))
    h = layer_norm(x) * (1 + s1) + b1
    qkv = h @ block.qkv.weight.T + block.qkv.bias  # (3, T, 3D): [q | k | v], heads contiguous
    heads = []
    for i in range(nh):
        q, k, v = (qkv[..., j * D + i * d: j * D + (i + 1) * d] for j in range(3))  # (3, T, d)
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
    x1 = x + g1 * (torch.cat(heads, -1) @ block.proj.weight.T + block.proj.bias)
    h = layer_norm(x1) * (1 + s2) + b2
    mlp = gelu_tanh(h @ block.mlp[0].weight.T + block.mlp[0].bias) @ block.mlp[2].weight.T + block.mlp[2].bias
    with torch.no_grad():
        torch.testing.assert_close(block(x, c), x1 + g2 * mlp, rtol=1e-10, atol=1e-10)


# ---- the model's interface ------------------------------------------------------------------------

@pytest.mark.parametrize("learn_sigma, channels", [(True, 6), (False, 3)])
def test_output_shape(learn_sigma, channels):
    torch.manual_seed(0)
    model = build_dit("tiny", learn_sigma=learn_sigma)
    with torch.no_grad():
        assert model(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 500, 3999])).shape == (4, channels, 16, 16)
        assert model(torch.randn(2, 3, 16, 16), 7).shape == (2, channels, 16, 16)  # scalar t
    gray = build_dit("tiny", in_channels=1, patch_size=4, learn_sigma=learn_sigma)
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 16, 16), torch.tensor([3, 4])).shape == (2, channels // 3, 16, 16)


def test_fresh_model_outputs_zero_and_every_block_is_identity():
    """adaLN-Zero (Sec. 3.2): the regressors of all gates start at zero, so each block is the identity."""
    torch.manual_seed(0)
    model = build_dit("tiny", num_classes=3)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 100, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros(4, 6, 16, 16))
        assert torch.equal(model(x, t, torch.tensor([0, 1, 2, 3])), torch.zeros(4, 6, 16, 16))
        c = model.conditioning(t, None, 4, x.device)
        h = torch.randn(4, 64, 32)
        for block in model.blocks:
            gates = block.adaLN(F.silu(c)).chunk(6, dim=1)
            assert all(torch.equal(v, torch.zeros(4, 32)) for v in gates)  # shift, scale, gate (x2)
            assert torch.equal(block(h, c), h)
    # everything else is initialised non-trivially (ViT init): only adaLN and the output layer are zero
    zero = {n for n, p in model.named_parameters() if not p.any()}
    expected = {f"blocks.{i}.adaLN.{w}" for i in range(4) for w in ("weight", "bias")}
    expected |= {"final.adaLN.weight", "final.adaLN.bias", "final.linear.weight", "final.linear.bias"}
    biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}  # ViT: zero biases
    assert expected <= zero <= expected | biases


def test_output_depends_on_timestep():
    torch.manual_seed(0)
    model = perturbed(build_dit("tiny")).eval()
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)  # one image, three timesteps
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 3999]))
        assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
        torch.testing.assert_close(model(x, torch.tensor(500)), out[1:2].expand(3, -1, -1, -1))  # scalar t


def test_config_rebuilds_identical_outputs():
    torch.manual_seed(0)
    model = perturbed(build_dit("tiny", num_classes=2, mlp_ratio=2.0))
    clone = DiT(**model.config)
    clone.load_state_dict(model.state_dict())
    x, t, y = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 1000]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), clone(x, t, y))
    assert clone.config == model.config == dict(image_size=16, in_channels=3, patch_size=2, hidden_size=32,
                                                depth=4, num_heads=4, mlp_ratio=2.0, learn_sigma=True,
                                                num_classes=2)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = perturbed(build_dit("tiny", num_classes=2))
    model(torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 2])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_class_labels_and_null_label():
    """num_classes > 0: y changes the output; y None is the null label num_classes (classifier-free guidance)."""
    torch.manual_seed(0)
    model = perturbed(build_dit("tiny", num_classes=2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 100])
    with torch.no_grad():
        null, real = model(x, t), model(x, t, torch.tensor([1, 1]))
        assert (null - real).abs().max() > 1e-3
        assert torch.equal(null, model(x, t, torch.tensor([2, 2])))
        assert (real - model(x, t, torch.tensor([0, 0]))).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unconditional"):
        build_dit("tiny")(x, t, torch.tensor([0, 1]))


def test_samplers_run_unchanged():
    """The DiT is a drop-in for the U-Net: multiguide.sample (respaced ancestral sampling) takes it as is."""
    torch.manual_seed(0)
    model = perturbed(build_dit("tiny"))
    d = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")
    x = multiguide.sample(model, d, 3, respacing="4", progress=False)
    assert x.shape == (3, 3, 16, 16) and x.abs().max() <= 1.0 and torch.isfinite(x).all()


def test_overfits_eight_images_with_eps_prediction():
    """150 AdamW steps of L_simple (App. A.3) on 8 discs: the loss on a fixed set of (t, eps) draws falls > 3x."""
    torch.manual_seed(0)
    data = toy_circles.make_circles(16, region="all", radius=2.5)
    x0 = plumbing.to_tensor(data["images"][:: len(data["images"]) // 8][:8])  # (8, 3, 16, 16)
    diffusion = ddpm.Diffusion(ddpm.get_betas("cosine", 1000), learn_sigma=False, loss="simple")
    model = build_dit("tiny", learn_sigma=False)
    g = torch.Generator().manual_seed(1)
    t_eval, eps_eval = torch.randint(0, 1000, (4, 8), generator=g), torch.randn(4, *x0.shape, generator=g)

    def eval_loss():
        with torch.no_grad():
            return torch.stack([diffusion.training_losses(model, x0, t_eval[i], eps_eval[i])["loss"].mean()
                                for i in range(4)]).mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    for _ in range(150):
        t, eps = torch.randint(0, 1000, (8,), generator=g), torch.randn(x0.shape, generator=g)
        loss = diffusion.training_losses(model, x0, t, eps)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    print(f"\nL_simple on held (t, eps): {before:.4f} -> {after:.4f} (ratio {after / before:.3f})")
    assert abs(before - 1.0) < 0.05  # a fresh model predicts eps = 0: E||eps||^2 / D = 1
    assert after / before < 0.3  # measured 0.13


# ---- refusals and the command line ----------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=15), "image_size 15 is not divisible by patch_size 2"),
    (dict(hidden_size=36, num_heads=8), "hidden_size 36 does not split into 8 heads"),
    (dict(hidden_size=18, num_heads=3), "hidden_size 18 must be divisible by 4"),
    (dict(depth=0), "must be >= 1"),
    (dict(num_classes=-1), "num_classes >= 0"),
])
def test_bad_config_raises_one_line_value_error(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        build_dit("tiny", **overrides)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match=r"choices: \['cpu', 'dit-s', 'tiny'\]"):
        build_dit("nope")
    assert PRESETS["dit-s"] == dict(image_size=64, patch_size=4, hidden_size=384, depth=12, num_heads=6,
                                    learn_sigma=True)  # DiT-S/4, Table 1


def test_cli():
    run = subprocess.run([sys.executable, "dit.py", "--preset", "tiny", "--unet", "tiny", "--batch", "2",
                          "--reps", "1"], cwd=REPO, capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr
    assert "parameters: 88,248" in run.stdout and "(2, 3, 16, 16) -> output (2, 6, 16, 16)" in run.stdout
    unet_params = count_params(unet.build_unet("tiny", image_size=16))
    assert "DiT 'tiny'" in run.stdout and f"U-Net 'tiny' ({unet_params:,} parameters)" in run.stdout
    bad = subprocess.run([sys.executable, "dit.py", "--preset", "huge"], cwd=REPO, capture_output=True,
                         text=True, env=ENV)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
