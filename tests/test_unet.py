"""Tests for unet.py: the improved-DDPM U-Net (App. A, App. C), checked against hand computations."""
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import perturbed  # noqa: E402
from unet import (PRESETS, AttentionBlock, Downsample, ResBlock, UNet, Upsample, build_unet, count_params,
                  group_norm, timestep_embedding)

REPO = Path(__file__).resolve().parents[1]


# ---- parameter counts by formula -------------------------------------------------------------------

def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out  # weights + biases


def linear_params(n_in, n_out):
    return n_in * n_out + n_out


def resblock_params(c_in, c_out, emb_dim):
    """2 GroupNorms (gamma, beta) + two 3x3 convs + emb projection to (scale, shift) + 1x1 skip if needed."""
    skip = conv_params(c_in, c_out, 1) if c_in != c_out else 0
    return (2 * c_in + conv_params(c_in, c_out, 3) + linear_params(emb_dim, 2 * c_out)
            + 2 * c_out + conv_params(c_out, c_out, 3) + skip)


def attention_params(c):
    return 2 * c + linear_params(c, 3 * c) + linear_params(c, c)  # norm + qkv + output projection


def test_resblock_param_count_by_formula():
    torch.manual_seed(0)
    # (16, 16): 32 + 2320 + 2080 + 32 + 2320 = 6784; (16, 32) adds the 1x1 skip conv (544)
    assert count_params(ResBlock(16, 16, 64)) == resblock_params(16, 16, 64) == 6784
    assert count_params(ResBlock(16, 32, 64)) == resblock_params(16, 32, 64) == 32 + 4640 + 4160 + 64 + 9248 + 544


def test_tiny_unet_param_count_by_formula():
    """The whole tiny preset counted by hand: time MLP, stem, encoder, middle, decoder with skips, head."""
    mc, emb = 16, 64
    time_mlp = linear_params(mc, emb) + linear_params(emb, emb)
    stem = conv_params(3, mc, 3)
    # encoder: level 0 (16x16): ResBlock 16->16, Downsample; level 1 (8x8): ResBlock 16->32 + attention
    encoder = (resblock_params(16, 16, emb) + conv_params(16, 16, 3)
               + resblock_params(16, 32, emb) + attention_params(32))
    middle = 2 * resblock_params(32, 32, emb) + attention_params(32)
    # skips pushed: stem 16, rb 16, down 16, rb 32; the decoder pops them last-in first-out
    decoder = (resblock_params(32 + 32, 32, emb) + attention_params(32)
               + resblock_params(32 + 16, 32, emb) + attention_params(32) + conv_params(32, 32, 3)  # + Upsample
               + resblock_params(32 + 16, 16, emb) + resblock_params(16 + 16, 16, emb))
    head = 2 * mc + conv_params(mc, 6, 3)  # GroupNorm + conv to 2C = 6 channels (eps, v)
    total = time_mlp + stem + encoder + middle + decoder + head
    assert count_params(build_unet("tiny")) == total == 191_382


def test_pinned_preset_param_counts():
    # pinned once from the implementation; the tiny one is re-derived by formula above
    assert count_params(build_unet("tiny")) == 191_382
    assert count_params(build_unet("cpu")) == 1_201_048 + (4 * 32 + 1) * 2 * 3  # + input skip Linear(emb, 2C)
    assert count_params(build_unet("cpu", image_size=64)) == 1_201_822  # size-independent weights
    assert count_params(build_unet("cpu", input_skip=False)) == 1_201_048
    paper = build_unet("paper")
    print(f"\npaper preset: {count_params(paper):,} parameters")
    assert count_params(paper) == 122_909_702  # App. C: attention at 32, 16, 8
    assert count_params(build_unet("paper", attention_resolutions=(16, 8))) == 121_063_942  # released config


# ---- timestep embedding -----------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [128, 7])
def test_timestep_embedding_matches_float64_numpy(dim):
    t = np.array([0, 1, 17, 999, 3999], dtype=np.float64)
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    ref = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
    if dim % 2:
        ref = np.concatenate([ref, np.zeros((len(t), 1))], axis=1)
    emb = timestep_embedding(torch.tensor(t, dtype=torch.long), dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    # float32 arguments t * freq up to 4000 rad carry ~3e-4 rad of rounding
    np.testing.assert_allclose(emb.numpy(), ref, atol=1e-3)
    np.testing.assert_allclose(emb[:3].numpy(), ref[:3], atol=2e-6)
    # t = 0: the cos half is exactly 1, the sin half exactly 0
    assert torch.equal(emb[0, :half], torch.ones(half)) and torch.equal(emb[0, half:], torch.zeros(dim - half))
    if dim % 2:
        assert torch.equal(emb[:, -1], torch.zeros(5))  # odd dim: zero padding


# ---- blocks -----------------------------------------------------------------------------------------

def test_group_norm_keeps_at_least_4_channels_per_group_and_at_most_32_groups():
    # 128 channels -> 32 groups: improved-diffusion's GroupNorm32 at the paper's width.
    assert [group_norm(c).num_groups for c in (16, 32, 40, 48, 96, 128, 512, 3)] == [4, 8, 10, 12, 24, 32, 32, 1]


def manual_group_norm(x, groups, weight, bias, eps=1e-5):
    B, C, H, W = x.shape
    g = x.reshape(B, groups, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
    return g.reshape(B, C, H, W) * weight[:, None, None] + bias[:, None, None]


def silu(x):
    return x * torch.sigmoid(x)


def test_resblock_matches_hand_written_scale_shift_norm():
    """h = GroupNorm(h) * (1 + scale) + shift (AdaGN), recomputed from the block's parameters in float64."""
    torch.manual_seed(0)
    block = ResBlock(48, 64, emb_dim=20).double().eval()
    torch.nn.init.normal_(block.out_conv.weight, std=0.05)  # zero-initialised: give it weights
    torch.nn.init.normal_(block.out_conv.bias, std=0.05)
    torch.nn.init.normal_(block.out_norm.bias)  # GroupNorm beta starts at 0
    x, emb = torch.randn(3, 48, 6, 6, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)

    h = manual_group_norm(x, 12, block.in_norm.weight, block.in_norm.bias)  # 48 channels -> 12 groups
    h = F.conv2d(silu(h), block.in_conv.weight, block.in_conv.bias, padding=1)
    proj = silu(emb) @ block.emb_proj.weight.T + block.emb_proj.bias  # (3, 128)
    scale, shift = proj[:, :64, None, None], proj[:, 64:, None, None]
    h = manual_group_norm(h, 16, block.out_norm.weight, block.out_norm.bias) * (1 + scale) + shift
    h = F.conv2d(silu(h), block.out_conv.weight, block.out_conv.bias, padding=1)
    skip = F.conv2d(x, block.skip.weight, block.skip.bias)  # 1x1 conv: 48 -> 64 channels
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(num_heads=4), dict(num_head_channels=8)])
def test_attention_matches_naive_softmax(kwargs):
    torch.manual_seed(0)
    C, nh, d = 32, 4, 8
    block = AttentionBlock(C, **kwargs).double()
    assert block.num_heads == nh
    torch.nn.init.normal_(block.proj.weight, std=0.1)  # zero-initialised output projection
    torch.nn.init.normal_(block.proj.bias, std=0.1)
    x = torch.randn(2, C, 4, 5, dtype=torch.float64)

    tokens = manual_group_norm(x, 8, block.norm.weight, block.norm.bias).reshape(2, C, 20).transpose(1, 2)
    qkv = tokens @ block.qkv.weight.T + block.qkv.bias  # (2, 20, 3C): [q | k | v], heads contiguous
    heads = []
    for i in range(nh):
        q, k, v = (qkv[..., j * C + i * d: j * C + (i + 1) * d] for j in range(3))  # (2, 20, d)
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v)
    out = torch.cat(heads, dim=-1) @ block.proj.weight.T + block.proj.bias  # (2, 20, C)
    expected = x + out.transpose(1, 2).reshape(2, C, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_fresh_blocks_are_identity_and_resampling_shapes():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.equal(AttentionBlock(32, 4)(x), x)  # zero-init projection: residual only
        assert torch.equal(ResBlock(32, 32, 16)(x, torch.randn(2, 16)), x)  # zero-init last conv
        assert Downsample(32)(x).shape == (2, 32, 4, 4)
        assert Upsample(32)(x).shape == (2, 32, 16, 16)


# ---- the whole U-Net --------------------------------------------------------------------------------

def randomize_zero_params(model):
    """Give every zero-initialised tensor (output convs, projections, GroupNorm betas) random values."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)


@pytest.mark.parametrize("preset,overrides,in_ch,size,out_ch", [
    ("tiny", {}, 3, 16, 6),
    ("tiny", dict(learn_sigma=False), 3, 16, 3),
    ("tiny", dict(stem=2), 3, 16, 6),
    ("tiny", dict(in_channels=1, stem=2, learn_sigma=False), 1, 16, 1),
    ("cpu", {}, 3, 32, 6),
    ("cpu", dict(learn_sigma=False), 3, 32, 3),
    ("cpu", dict(image_size=64), 3, 64, 6),
])
def test_output_shapes(preset, overrides, in_ch, size, out_ch):
    torch.manual_seed(0)
    model = build_unet(preset, **overrides)
    out = model(torch.randn(2, in_ch, size, size), torch.tensor([0, 999]))
    assert out.shape == (2, out_ch, size, size)


def test_paper_preset_forward():
    torch.manual_seed(0)
    model = build_unet("paper").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), torch.tensor([3999]))
    print(f"\npaper preset forward, batch 1, 64x64: {time.perf_counter() - t0:.2f} s")
    assert out.shape == (1, 6, 64, 64)


def test_pixel_unshuffle_stem_keeps_resolution():
    model = build_unet("cpu")  # stem 2 at 32x32
    assert model.encoder.blocks[0][0].in_channels == 12  # 3 channels x 2x2 pixels
    assert model.encoder.out_resolution == 4  # the U-Net itself runs at 16, 8, 4
    assert model.out[-1].out_channels == 24  # 6 output channels x 2x2 pixels, then pixel_shuffle
    randomize_zero_params(model)
    with torch.no_grad():
        assert model(torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 3])).shape == (3, 6, 32, 32)


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
def test_fresh_unet_outputs_exactly_zero(preset):
    torch.manual_seed(0)
    model = build_unet(preset)
    size = model.config["image_size"]
    out = model(torch.randn(4, 3, size, size), torch.randint(0, 1000, (4,)))
    assert torch.equal(out, torch.zeros_like(out))  # the output conv is zero-initialised


def test_input_skip_adds_time_dependent_affine_map_of_x_to_eps_only():
    # eps += a(t) * x_t + b(t) (per channel); zero-initialised, so a fresh net is the plain U-Net
    torch.manual_seed(0)
    plain = perturbed(build_unet("tiny", stem=2, image_size=16))
    skip = build_unet("tiny", stem=2, image_size=16, input_skip=True)
    missing = skip.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["input_skip.bias", "input_skip.weight"]
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 400, 999])
    with torch.no_grad():
        base = plain(x, t)
        assert torch.equal(skip(x, t), base)
        skip.input_skip.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 0.1, 0.2, 0.3]))  # a = (1, 2, 3), b = (.1, .2, .3)
        out = skip(x, t)
    a, b = torch.tensor([1.0, 2.0, 3.0])[:, None, None], torch.tensor([0.1, 0.2, 0.3])[:, None, None]
    torch.testing.assert_close(out[:, :3], base[:, :3] + a * x + b, atol=1e-6, rtol=0)
    assert torch.equal(out[:, 3:], base[:, 3:])  # the variance output v is untouched


def test_output_depends_on_timestep():
    torch.manual_seed(0)
    model = build_unet("tiny").eval()
    randomize_zero_params(model)
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)  # one image, three timesteps
    with torch.no_grad():
        out = model(x, torch.tensor([0, 500, 3999]))
        assert (out[0] - out[1]).abs().max() > 1e-3 and (out[1] - out[2]).abs().max() > 1e-3
        torch.testing.assert_close(model(x, torch.tensor(500)), out[1:2].expand(3, -1, -1, -1))  # scalar t


def test_config_rebuilds_model_and_checkpointing_matches():
    torch.manual_seed(0)
    model = build_unet("tiny", dropout=0.1)
    randomize_zero_params(model)
    clone = UNet(**{**model.config, "use_checkpoint": True})
    clone.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1, 10, 100, 1000])
    grads = []
    for m in (model, clone):
        torch.manual_seed(1)  # same dropout masks (checkpointing replays the RNG state)
        m(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_tiny_forward_backward_is_fast():
    torch.manual_seed(0)
    model = build_unet("tiny")
    x, t = torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))
    model(x, t).square().mean().backward()  # warm-up
    t0 = time.perf_counter()
    model(x, t).square().mean().backward()
    assert time.perf_counter() - t0 < 0.5


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="choices.*cpu.*paper.*tiny"):
        build_unet("nope")
    assert set(PRESETS) == {"paper", "cpu", "tiny"}


def test_cli():
    help_run = subprocess.run([sys.executable, "unet.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert help_run.returncode == 0 and "--preset" in help_run.stdout
    run = subprocess.run([sys.executable, "unet.py", "--preset", "tiny"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0 and "parameters: 191,382" in run.stdout and "(2, 6, 16, 16)" in run.stdout
    bad = subprocess.run([sys.executable, "unet.py", "--preset", "huge"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
