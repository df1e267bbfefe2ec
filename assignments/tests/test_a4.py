"""a4 -- the U-Net's timestep embedding (unet.timestep_embedding) and its residual block with
timestep scale-shift norm (unet.ResBlock.forward; Dhariwal & Nichol 2021 Sec. 3, "AdaGN").

The embedding is compared with a hand-worked case (dim 8, 9) and with values stored from a 40-digit computation (dim 128). The block is compared, in float64, with the same
computation written out with torch.nn.functional primitives and the block's own layers (the
layers are built in __init__, which is not part of the assignment).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


# dim = 128 (half = 64) at three timesteps and eight columns (cos columns 0-63, then sin), computed once at
# 40 significant digits (mpmath) and stored here rather than recomputed.
EMB128_COLUMNS = [0, 1, 31, 63, 64, 65, 95, 127]
EMB128 = {1: [0.540302305868, 0.647905872267, 0.999933324669, 0.999999993332, 0.841470984808, 0.761720408472,
              0.0115475631942, 0.000115478198212],
          250: [0.240988305285, -0.961382999637, -0.967754622739, 0.999583303495, -0.970528019542, 0.275213967684,
                0.251894799803, 0.028865539559],
          999: [0.999649852981, -0.398991757717, 0.514734323666, 0.993353098017, -0.0264607527371, -0.916954512107,
                -0.857349739628, 0.115107005262]}


@pytest.mark.assignment("a4", points=2)
def test_timestep_embedding_is_cos_then_sin_of_geometric_frequencies():
    import unet
    t = torch.tensor([0, 1, 7, 250, 999])
    # dim 8 by hand: half = 4, so the frequencies are 10000^(-i/4) = 1, 0.1, 0.01, 0.001; dim 9 adds a zero column
    by_hand = np.outer(t.double().numpy(), [1.0, 0.1, 0.01, 0.001])
    for dim in (8, 9):
        emb = unet.timestep_embedding(t, dim)
        assert emb.shape == (5, dim) and emb.dtype == torch.float32
        np.testing.assert_allclose(emb.numpy()[:, :4], np.cos(by_hand), atol=2e-4)
        np.testing.assert_allclose(emb.numpy()[:, 4:8], np.sin(by_hand), atol=2e-4)
        assert dim == 8 or np.all(emb.numpy()[:, 8] == 0.0)
    emb = unet.timestep_embedding(t, 128)
    assert emb.shape == (5, 128) and emb.dtype == torch.float32
    for row, step in enumerate(t.tolist()):
        if step in EMB128:
            np.testing.assert_allclose(emb.numpy()[row, EMB128_COLUMNS], EMB128[step], atol=2e-4)
    np.testing.assert_allclose(emb.numpy()[0], [1.0] * 64 + [0.0] * 64, atol=1e-7)   # t = 0: cos 0 = 1, sin 0 = 0
    half_step = unet.timestep_embedding(torch.tensor([0.5]), 4)          # float timesteps work too
    np.testing.assert_allclose(half_step.numpy()[0], [math.cos(0.5), math.cos(0.005), math.sin(0.5), math.sin(0.005)],
                               atol=1e-6)


def expected_resblock(block, x, emb):
    """The block written out with F.* primitives (float64): norm-SiLU-conv, scale-shift norm, SiLU-conv, skip."""
    def gn(h, norm):
        return F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
    c_out = block.in_conv.out_channels
    h = F.conv2d(F.silu(gn(x, block.in_norm)), block.in_conv.weight, block.in_conv.bias, padding=1)
    proj = F.linear(F.silu(emb), block.emb_proj.weight, block.emb_proj.bias)         # (B, 2 C_out)
    scale, shift = proj[:, :c_out, None, None], proj[:, c_out:, None, None]           # scale first, then shift
    h = gn(h, block.out_norm) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), block.out_conv.weight, block.out_conv.bias, padding=1)
    skip = x if isinstance(block.skip, torch.nn.Identity) else F.conv2d(x, block.skip.weight, block.skip.bias)
    return skip + h


@pytest.mark.assignment("a4", points=3)
def test_resblock_forward_with_timestep_scale_shift_norm():
    import unet
    g = torch.Generator().manual_seed(6)
    for c_in, c_out in ((8, 16), (16, 16)):                              # a 1x1-conv skip and an identity skip
        torch.manual_seed(0)
        block = unet.ResBlock(c_in, c_out, emb_dim=12).double().eval()
        with torch.no_grad():                                            # random weights everywhere (the last
            for p in block.parameters():                                 # conv starts at zero in a fresh block)
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        x = torch.randn(2, c_in, 6, 6, generator=g, dtype=torch.float64)
        emb = torch.randn(2, 12, generator=g, dtype=torch.float64)
        with torch.no_grad():
            out = block(x, emb)
            expected = expected_resblock(block, x, emb)
        assert out.shape == (2, c_out, 6, 6)
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-9, atol=1e-10)
        # the embedding matters: another timestep embedding gives another output
        with torch.no_grad():
            assert not torch.allclose(block(x, emb.flip(0)), out)
