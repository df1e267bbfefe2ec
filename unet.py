"""The improved-DDPM U-Net (Nichol & Dhariwal, 2021), written from scratch: eps_theta(x_t, t) and v.

The denoiser of App. A is a U-Net: an encoder that halves the resolution level by level, a middle
block, and a decoder that doubles it back, concatenating the encoder's activations ("skips") on the
way up. Every residual block receives the timestep t through a sinusoidal embedding and an MLP, and
uses it to scale and shift its second GroupNorm (Dhariwal & Nichol 2021, Sec. 3, "AdaGN";
`use_scale_shift_norm` in the improved-diffusion code). Self-attention runs at a few low resolutions.

With `learn_sigma` the network returns 2C channels: the first C are eps_theta (App. A, Eq. 7), the
last C the variance interpolation v of App. A, Eq. 8 (log Sigma = v' log beta_t + (1 - v') log
beta-tilde_t with v' = (v + 1) / 2), as a raw output meant to lie in [-1, 1] (not clamped here). This
file only returns the raw numbers; the diffusion code (ddpm.py) maps them.

Paper: App. A (the model eps_theta, the learned variance v of Eq. 8) and App. C (hyperparameters:
time embedding 128, 3 residual blocks per resolution, attention at 32, 16 and 8). The `paper` preset
below is that network; `cpu` is a ~1.2M-parameter net for 32x32 circles on 2 CPU cores; `tiny` is
for the tests. A CPU speed lever that is not in the paper: `stem=2` packs each 2x2 pixel block into
channels (`F.pixel_unshuffle`) before the first conv and unpacks after the last one, so the whole
U-Net runs at half the resolution.

A second lever, also not in the paper: `input_skip` (on in the `cpu` preset, off in `paper`) adds
eps += a(t) * x_t + b(t), with a per-channel gain a and offset b computed from the time embedding
(zero-initialised, so training starts from the plain U-Net). Why: every path from x_t to the output
passes a GroupNorm, which removes the mean of its group, so the net struggles to copy the spatial
mean ("DC") of x_t into eps. At high t the right answer is eps ~ x_t, DC included; an error there is
amplified by 1 / sqrt(abar_t) in the predicted x_0 and the whole sample drifts to a grey or tinted
background. Measured on circles (32x32, cpu preset, 1000 steps): the plain net reproduced 35% of a
DC shift of the noise (6000 steps: still 35%), its samples had grey backgrounds (median -0.5 where
the data is -1) and 42% held exactly one circle; with the skip it reproduced 97%, backgrounds were
black (-0.99) and 83% held one circle. A large net trained for long (the paper) learns the DC
anyway; a small net trained for minutes does not. The circles preset now predicts the velocity u
instead of eps (ddpm.Diffusion's prediction): eps = sqrt(abar_t) u + sqrt(1 - abar_t) x_t then carries
x_t, DC included, by construction, and x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) u has no 1 / sqrt(abar_t)
to amplify an error. The skip stays on there (its use with the velocity was not measured).

Parameter names and the head order of the attention weights differ from improved-diffusion's, so
its checkpoints do not load here; models are trained from scratch in this project.

Run:  python unet.py --preset cpu            (config, parameter count, output shape)
      python unet.py --preset paper --attention 16,8   (the authors' released-config variant)
"""
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import plumbing


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (float) timesteps, improved-diffusion convention: [cos | sin].

    freqs_i = exp(-log(max_period) * i / half), i = 0..half-1, half = dim // 2;
    emb = [cos(t * freqs), sin(t * freqs)], zero-padded by one column when dim is odd.
    t: (B,) tensor of integer or float timesteps (the original index, also after respacing)
    -> (B, dim) float32.
    """
    ### BEGIN SOLUTION a4: the sinusoidal embedding [cos(t freqs) | sin(t freqs)], zero-padded to an odd dim
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb
    ### END SOLUTION


def group_norm(channels):
    """GroupNorm with 32 groups of at least 4 channels (fewer groups for narrow layers).

    improved-diffusion uses 32 groups on 128+ channels, i.e. >= 4 channels per group; we keep that
    ratio for narrow CPU nets. A group of ONE channel (32 groups on 32 channels) would remove each
    channel's spatial mean before the output conv, so the net could not follow the mean ("DC") of
    x_t: measured on circles, samples then kept a per-channel colour cast and a 2x2 checkerboard
    (per sub-pixel offsets of the pixel-unshuffle stem) even after 2000 steps.
    """
    groups = max(g for g in range(1, 33) if channels % g == 0 and channels // g >= min(4, channels))
    return nn.GroupNorm(groups, channels)


def head_count(channels, num_heads, num_head_channels=-1):
    """Attention heads: `num_heads`, or channels // num_head_channels when that is not -1 (improved-diffusion)."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        num_heads = channels // num_head_channels
    if channels % num_heads:
        raise ValueError(f"{channels} channels do not split into {num_heads} heads")
    return num_heads


def zero_init(module):
    """Zero a layer's weights and bias, so the residual branch it ends starts as 0 (block = identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep scale-shift, GroupNorm-SiLU-dropout-conv(zero init), plus skip."""

    def __init__(self, in_channels, out_channels, emb_dim, dropout=0.0):
        super().__init__()
        self.in_norm = group_norm(in_channels)
        self.in_conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)  # -> (scale, shift) for out_norm
        self.out_norm = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv matches the channels of the skip path when they change, else identity
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, emb):
        # x: (B, C_in, H, W), emb: (B, emb_dim)
        ### BEGIN SOLUTION a4: the residual branch with scale-shift norm out_norm(h) (1 + scale) + shift, plus the skip
        h = self.in_conv(F.silu(self.in_norm(x)))  # (B, C_out, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each (B, C_out, 1, 1)
        # scale-shift norm (AdaGN, Dhariwal & Nichol 2021 Sec. 3: y_s GroupNorm(h) + y_b), written with
        # y_s = 1 + scale as in improved-diffusion, so a zero projection leaves a plain GroupNorm
        h = self.out_norm(h) * (1 + scale) + shift
        h = self.out_conv(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        return self.skip(x) + h
        ### END SOLUTION


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection.

    Heads: `num_heads` heads, or, when num_head_channels != -1, channels // num_head_channels heads of
    num_head_channels channels each (the improved-diffusion convention).
    """

    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        self.num_heads = head_count(channels, num_heads, num_head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_init(nn.Linear(channels, channels))

    def forward(self, x):
        B, C, H, W = x.shape
        T, nh = H * W, self.num_heads
        h = self.norm(x).reshape(B, C, T).transpose(1, 2)  # (B, T, C): one token per position
        qkv = self.qkv(h).reshape(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, d)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, T, d): softmax(q k^T / sqrt(d)) v
        h = self.proj(h.transpose(1, 2).reshape(B, T, C))  # (B, T, C): heads concatenated, projected
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """nn.Sequential that hands the timestep embedding to the ResBlocks among its layers.

    With `use_checkpoint` set (by the model) and gradients on, the activations inside the block are
    not stored but recomputed in the backward pass: less memory for about one more forward pass.
    """

    use_checkpoint = False

    def forward(self, x, emb):
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, use_reentrant=False)
        return self._run(x, emb)

    def _run(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNetEncoder(nn.Module):
    """Stem + down path + middle block of the U-Net; also the trunk of the noisy classifier.

    `attention_resolutions` are FEATURE-MAP resolutions: (16, 8) puts attention after every ResBlock
    whose feature map is 16x16 or 8x8 (with stem=2 the first level is already image_size / 2). This
    is what improved-diffusion's `--attention_resolutions 16,8` flag means too (it converts them to
    downsampling factors image_size // r internally). The middle block always has attention.

    forward(x, emb) -> (h, skips): h (B, out_channels, out_resolution, out_resolution) after the
    middle block; skips the activation after the stem and after every encoder block, in order, with
    channels `skip_channels`, for the decoder to concatenate (last in, first out).
    emb: (B, emb_dim) timestep embedding, emb_dim = 4 * model_channels (the caller computes it).
    """

    def __init__(self, in_channels, model_channels, channel_mult, num_res_blocks, attention_resolutions,
                 dropout, num_heads, num_head_channels, image_size, stem, use_checkpoint=False):
        super().__init__()
        if stem not in (1, 2):
            raise ValueError(f"stem must be 1 or 2, got {stem}")
        if image_size % (stem * 2 ** (len(channel_mult) - 1)):
            raise ValueError(f"image_size {image_size} is not divisible by stem * 2^(levels - 1)")
        self.stem, self.emb_dim = stem, 4 * model_channels
        res, ch = image_size // stem, model_channels  # feature-map resolution and channels so far
        # stem: (B, C, H, W) -> [pixel_unshuffle: (B, 4C, H/2, W/2)] -> conv -> (B, mc, H/s, W/s)
        self.blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels * stem**2, ch, 3, padding=1))])
        self.skip_channels = [ch]
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, mult * model_channels, self.emb_dim, dropout)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads, num_head_channels))
                self.blocks.append(EmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level < len(channel_mult) - 1:
                self.blocks.append(EmbedSequential(Downsample(ch)))
                self.skip_channels.append(ch)
                res //= 2
        self.middle = EmbedSequential(ResBlock(ch, ch, self.emb_dim, dropout),
                                      AttentionBlock(ch, num_heads, num_head_channels),
                                      ResBlock(ch, ch, self.emb_dim, dropout))
        self.out_channels, self.out_resolution = ch, res
        for m in self.modules():
            if isinstance(m, EmbedSequential):
                m.use_checkpoint = use_checkpoint

    def forward(self, x, emb):
        B, C, H, W = x.shape
        h = F.pixel_unshuffle(x, 2) if self.stem == 2 else x  # (B, C * stem^2, H / stem, W / stem)
        skips = []
        for block in self.blocks:
            h = block(h, emb)  # resolution halves at each Downsample
            skips.append(h)
        h = self.middle(h, emb)  # (B, out_channels, out_resolution, out_resolution)
        return h, skips


class UNet(nn.Module):
    """The full denoiser: time embedding MLP + UNetEncoder + decoder + output head.

    forward(x, t, y=None): x (B, C, H, W), t (B,) (or a scalar) original timestep indices, y (B,) class
    labels in 0 .. num_classes (num_classes = the null label; y None = all null) only when num_classes > 0
    -> (B, 2C, H, W) with learn_sigma (eps, then raw v in [-1, 1]), else (B, C, H, W) (eps only).
    `self.config` holds the constructor's arguments: `UNet(**config)` rebuilds the model.

    num_classes > 0 makes the denoiser class-conditional for classifier-free guidance (App. J, Ho &
    Salimans 2022): an embedding of num_classes + 1 labels (the last is the "null" label, i.e. no
    class) is added to the time embedding, so every ResBlock's scale-shift sees (t, y), as in
    improved-diffusion's class-conditional model and dit.DiT. num_classes = 0 (default) adds nothing.
    """

    def __init__(self, *, image_size, in_channels=3, model_channels, channel_mult, num_res_blocks,
                 attention_resolutions, dropout=0.0, num_heads=4, num_head_channels=-1, learn_sigma=True,
                 stem=1, use_checkpoint=False, input_skip=False, num_classes=0):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), dropout=dropout,
                           num_heads=num_heads, num_head_channels=num_head_channels,
                           learn_sigma=learn_sigma, stem=stem, use_checkpoint=use_checkpoint,
                           input_skip=input_skip, num_classes=num_classes)
        self.model_channels, self.stem, self.num_classes = model_channels, stem, num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        emb_dim = 4 * model_channels
        # App. C: sinusoidal time embedding of dimension model_channels (128 in the paper), then an MLP
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # App. J (classifier-free guidance): labels 0 .. num_classes - 1 and the null label num_classes
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.encoder = UNetEncoder(in_channels, model_channels, channel_mult, num_res_blocks,
                                   attention_resolutions, dropout, num_heads, num_head_channels,
                                   image_size, stem, use_checkpoint)
        self.decoder = self._build_decoder(model_channels, channel_mult, num_res_blocks, attention_resolutions,
                                           dropout, num_heads, num_head_channels, use_checkpoint)
        # head: with stem 2 the conv emits 4x the channels that pixel_shuffle turns back into 2x2 pixels
        self.out = nn.Sequential(group_norm(model_channels), nn.SiLU(),
                                 zero_init(nn.Conv2d(model_channels, self.out_channels * stem**2, 3, padding=1)))
        # Not in the paper (see the module docstring): eps += a(t) * x_t + b(t), a, b per channel, from
        # the time embedding; zero-initialised, so a fresh model is the plain U-Net.
        self.input_skip = zero_init(nn.Linear(emb_dim, 2 * in_channels)) if input_skip else None

    def _build_decoder(self, model_channels, channel_mult, num_res_blocks, attention_resolutions,
                       dropout, num_heads, num_head_channels, use_checkpoint):
        """Up path: per level num_res_blocks + 1 ResBlocks, each eating one skip; Upsample ends a level."""
        enc = self.encoder
        skip_channels = list(enc.skip_channels)
        ch, res = enc.out_channels, enc.out_resolution
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), mult * model_channels, enc.emb_dim, dropout)]
                ch = mult * model_channels
                if res in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads, num_head_channels))
                if level > 0 and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    res *= 2
                blocks.append(EmbedSequential(*layers))
                blocks[-1].use_checkpoint = use_checkpoint
        assert not skip_channels, "every encoder activation is consumed exactly once"
        return blocks

    def forward(self, x, t, y=None):
        B, C, H, W = x.shape
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,), a scalar t is broadcast
        emb = timestep_embedding(t, self.model_channels).to(self.time_embed[0].weight.dtype)  # (B, mc)
        emb = self.time_embed(emb)  # (B, 4 mc)
        if self.label_embed is None:
            if y is not None:
                raise ValueError("this UNet is unconditional (num_classes=0): call it without y")
        else:
            if y is None:
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)  # the null label
            emb = emb + self.label_embed(y)  # (B, 4 mc): time + class embedding
        h, skips = self.encoder(x, emb)  # h: (B, C_mid, H / (stem 2^(L-1)), ...)
        for block in self.decoder:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # (B, ch + skip_ch, h, w) -> (B, ch', h', w')
        h = self.out(h)  # (B, out * stem^2, H / stem, W / stem)
        if self.stem == 2:
            h = F.pixel_shuffle(h, 2)  # (B, out, H, W)
        if self.input_skip is not None:
            a, b = self.input_skip(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
            h = torch.cat([h[:, :C] + a * x + b, h[:, C:]], dim=1)  # only eps (or the velocity) gets the skip, not v
        return h  # (B, 2C, H, W): eps and variance interpolation v (learn_sigma), else (B, C, H, W)


PRESETS = {
    # App. C: 128 channels (time embedding 128), 3 residual blocks per resolution, attention at 32,
    # 16 and 8 for 64x64 images, learned variance. The authors' released configs use attention at
    # 16 and 8 instead (`--attention 16,8` on the CLI: 121.1M instead of 122.9M parameters). Channel
    # mult (1,2,3,4) is in the released config and is improved-diffusion's choice for 64x64; num_heads 4
    # is its default.
    "paper": dict(image_size=64, model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                  attention_resolutions=(32, 16, 8), num_heads=4, dropout=0.0, learn_sigma=True, stem=1),
    # 32x32 circles on 2 CPU cores: pixel-unshuffle stem (the U-Net runs at 16, 8, 4), one ResBlock per
    # level, attention at the 8x8 level and in the middle block (4x4). ~1.2M parameters.
    "cpu": dict(image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_heads=4, dropout=0.0, learn_sigma=True, stem=2, input_skip=True),
    # for the tests: a forward + backward on 4 images of 16x16 takes a few milliseconds
    "tiny": dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), num_heads=4, dropout=0.0, learn_sigma=True, stem=1),
}


def build_unet(preset, **overrides):
    """UNet from a named preset, with any constructor keyword overridden: build_unet("cpu", stem=1)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; choices: {sorted(PRESETS)}")
    return UNet(**{**PRESETS[preset], **overrides})


def feature_map_sizes(image_size, channel_mult, stem=1, **_):
    """The resolutions of the U-Net's levels, image_size / stem halved at each level after the first:
    the sizes that attention_resolutions may name (cpu preset at 32: [16, 8, 4])."""
    return [image_size // stem // 2 ** level for level in range(len(channel_mult))]


def parse_attention(text, preset, image_size):
    """--attention for a preset at image_size: '16,8' -> (16, 8); 'none' -> () (no attention in the levels;
    the middle block keeps its own). ValueError unless every size is one of the U-Net's feature-map sizes
    (a size that no level has would silently drop the attention there)."""
    sizes = feature_map_sizes(**{**PRESETS[preset], "image_size": image_size})
    if text.strip() == "none":
        return ()
    try:
        wanted = tuple(int(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"wants feature-map sizes, e.g. 16,8, or none; got {text!r}") from None
    if not wanted or any(r not in sizes for r in wanted):
        raise ValueError(f"{text!r} names a size that is not one of this U-Net's feature maps "
                         f"{', '.join(map(str, sizes))} (or none)")
    return wanted


def count_params(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None):
    parser = plumbing.OneLineParser(description="Build a preset U-Net; print its config, size and output shape.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named UNet config")
    parser.add_argument("--attention", type=str, default="",
                        help="override attention resolutions (feature-map sizes), e.g. 16,8, or none ('' = preset's)")
    parser.add_argument("--batch", type=plumbing.positive_int, default=2, help="batch size of the random test input")
    args = parser.parse_args(argv)
    overrides = {}
    if args.attention:
        try:
            overrides["attention_resolutions"] = parse_attention(args.attention, args.preset,
                                                                 PRESETS[args.preset]["image_size"])
        except ValueError as e:
            parser.error(f"--attention {e}")
    model = build_unet(args.preset, **overrides)
    print(json.dumps(model.config, indent=2))
    print(f"parameters: {count_params(model):,}")
    cfg = model.config
    x = torch.randn(args.batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    t = torch.randint(0, 1000, (args.batch,))
    with torch.no_grad():
        out = model(x, t)
    print(f"input {tuple(x.shape)} -> output {tuple(out.shape)}")


if __name__ == "__main__":
    main()
