"""A diffusion transformer (DiT, Peebles & Xie 2023), written from scratch: eps_theta(x_t, t) and v.

App. J of the paper ("Alternative architecture", Fig. S19a) swaps the U-Net of App. A for a
diffusion transformer and finds that it interpolates too: the ability does not come from the
convolutional architecture. This file is that second backbone, a drop-in for unet.UNet.

The model (DiT paper, "Scalable Diffusion Models with Transformers"):
    Sec. 3.2 Patchify     cut the image into p x p patches, embed each linearly (a conv with
                          kernel = stride = p) into a token of width D, add a FIXED 2-D sine-cosine
                          positional embedding; T = (H / p)^2 tokens.
    Sec. 3.2 adaLN-Zero   N transformer blocks (self-attention, MLP of ratio 4), each LayerNorm without
                          its own affine; the conditioning c = emb(t) (+ emb(y)) regresses per image a
                          shift, scale and gate for both branches: x + gate * branch((1 + scale) LN(x) + shift).
                          The regressor starts at zero, so every block starts as the identity.
    Sec. 3.2 decoder      a last adaLN LayerNorm and a zero-initialised linear map each token back to
                          p * p * out_channels numbers, reshaped into the image ("unpatchify").
    Table 1               model sizes: DiT-S is 12 layers of width 384 with 6 heads; "/4" = patch 4.
    Sec. 4                ViT initialisation (xavier-uniform linears), final layer at zero.

Interface identical to unet.UNet, so every sampler, loss and checkpoint helper works unchanged:
`DiT(**config)`, `.config`, `forward(x, t)` with x (B, C, H, W) and t (B,) or a scalar ORIGINAL step
index -> (B, 2C, H, W) with learn_sigma (the first C channels eps, App. A Eq. 7; the last C the raw
variance interpolation v of App. A Eq. 8, as in unet.py) or (B, C, H, W). DiT is class-conditional
in its paper; here `num_classes=0` (the default) makes it unconditional like our U-Net, and
num_classes > 0 adds a label embedding with one extra "null" label (index num_classes, used when
y is None) for classifier-free guidance. Dropping labels to the null label during training is the
trainer's business, not the model's.

Deviations from the DiT paper: pixels instead of VAE latents (our images are 32x32), no class label
by default, and the timestep embedding is unet.timestep_embedding's [cos | sin] of 128 frequencies, 256
features (the DiT code's width too), followed by its two-layer SiLU MLP.

Run:  python dit.py --preset cpu      (config, parameter count, output shape, and the CPU time of a
                                       forward + backward per image at batch 64 against unet "cpu")
"""
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import plumbing
import unet
from unet import count_params, timestep_embedding, zero_init

FREQUENCY_DIM = 256  # width of the sinusoidal timestep features fed to the time MLP


def patchify(x, p):
    """(B, C, H, W) -> (B, T, C * p * p): token i * (W/p) + j holds patch (row i, column j), flattened
    in the order (channel, row in patch, column in patch) -- the layout of a Conv2d weight (D, C, p, p),
    so a conv with kernel = stride = p is exactly a linear map applied to these tokens."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p)  # (B, C, h, p, w, p): split rows and columns into (patch, offset)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
    return x.reshape(B, h * w, C * p * p)  # (B, T, C p p)


def unpatchify(tokens, p, grid):
    """Inverse of patchify for a grid x grid token image: (B, grid^2, C * p * p) -> (B, C, grid p, grid p)."""
    B, T, N = tokens.shape
    C = N // (p * p)
    x = tokens.reshape(B, grid, grid, C, p, p)  # (B, h, w, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h, p, w, p)
    return x.reshape(B, C, grid * p, grid * p)  # (B, C, H, W)


def sincos_pos_embed_2d(dim, grid, max_period=10000):
    """Fixed 2-D sine-cosine positional embedding (Sec. 3.2, "the sine-cosine version" of ViT): (grid^2, dim).

    For the token of patch (row i, column j): [sin(j w), cos(j w), sin(i w), cos(i w)], each of width
    dim / 4, with w_k = max_period^(-k / (dim / 4)), k = 0 .. dim/4 - 1 (the column coordinate first, as
    in the MAE / DiT code). Computed in float64, returned as float32.
    """
    quarter = dim // 4
    omega = max_period ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (grid, grid) each
    halves = []
    for pos in (cols, rows):
        angles = pos.reshape(-1, 1).double() * omega[None, :]  # (grid^2, dim/4)
        halves.append(torch.cat([torch.sin(angles), torch.cos(angles)], dim=1))  # (grid^2, dim/2)
    return torch.cat(halves, dim=1).float()  # (grid^2, dim)


def modulate(h, shift, scale):
    """adaLN (Sec. 3.2): LN(x) * (1 + scale) + shift, so a zero regressor leaves the plain LayerNorm."""
    return h * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (Sec. 3.2, Fig. 3):
    x <- x + gate1 * Attn(modulate(LN(x), shift1, scale1));  x <- x + gate2 * MLP(modulate(LN(x), shift2, scale2)),
    with the six (B, 1, D) vectors regressed from the conditioning c by a zero-initialised linear layer."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)  # scale/shift come from c
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        # adaLN-Zero: c -> (shift1, scale1, gate1, shift2, scale2, gate2); zero => gates 0 => identity block
        self.adaLN = zero_init(nn.Linear(hidden_size, 6 * hidden_size))

    def attention(self, h):
        B, T, D = h.shape
        nh = self.num_heads
        qkv = self.qkv(h).reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, d)
        h = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, nh, T, d): softmax(q k^T / sqrt(d)) v
        return self.proj(h.transpose(1, 2).reshape(B, T, D))  # (B, T, D): heads concatenated, projected

    def forward(self, x, c):
        # x: (B, T, D) tokens, c: (B, D) conditioning; each modulation vector is (B, 1, D), shared by all tokens
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(c))[:, None, :].chunk(6, dim=2)
        x = x + gate1 * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, T, D)


class FinalLayer(nn.Module):
    """Sec. 3.2 "Transformer decoder": adaLN LayerNorm (shift, scale from c), then a linear map of each
    token to its p * p * out_channels output numbers; both regressor and linear start at zero."""

    def __init__(self, hidden_size, out_features):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN = zero_init(nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = zero_init(nn.Linear(hidden_size, out_features))

    def forward(self, x, c):
        shift, scale = self.adaLN(F.silu(c))[:, None, :].chunk(2, dim=2)  # (B, 1, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, p p out)


def check_config(image_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes):
    """One-line ValueError for a DiT that cannot be built."""
    if min(image_size, in_channels, patch_size, hidden_size, depth, num_heads) < 1 or num_classes < 0:
        raise ValueError("image_size, in_channels, patch_size, hidden_size, depth, num_heads must be >= 1 "
                         "and num_classes >= 0")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} does not split into {num_heads} heads")
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sine-cosine positions)")


class DiT(nn.Module):
    """The full denoiser: patch embedding + positions, time (and label) embedding, adaLN-Zero blocks, decoder.

    forward(x, t, y=None): x (B, C, H, W), t (B,) (or a scalar) original timestep indices, y (B,) class
    labels in 0 .. num_classes (num_classes = the null label; y None = all null) only when num_classes > 0
    -> (B, 2C, H, W) with learn_sigma (eps, then raw v in [-1, 1]), else (B, C, H, W) (eps only).
    `self.config` holds the constructor's arguments: `DiT(**config)` rebuilds the model.
    """

    def __init__(self, *, image_size, in_channels=3, patch_size, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 learn_sigma=True, num_classes=0):
        super().__init__()
        check_config(image_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes)
        self.config = dict(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           learn_sigma=learn_sigma, num_classes=num_classes)
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.num_classes = num_classes
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        # Sec. 3.2 Patchify: a conv with kernel = stride = p is a linear map of each flattened patch
        self.x_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        pos = sincos_pos_embed_2d(hidden_size, self.grid)[None]  # (1, T, D), fixed: rebuilt, not saved
        self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, hidden_size))
        # labels 0 .. num_classes - 1 and the null label num_classes (classifier-free guidance)
        self.y_embed = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self._init_weights()

    def _init_weights(self):
        """Sec. 4: ViT's initialisation (xavier-uniform linears, zero biases), embeddings N(0, 0.02^2),
        and adaLN-Zero (Sec. 3.2): every modulation regressor and the output layer at exactly zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight  # (D, C, p, p): initialised as the (D, C p p) linear map it is
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        for layer in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for block in self.blocks:
            zero_init(block.adaLN)
        zero_init(self.final.adaLN)
        zero_init(self.final.linear)

    def conditioning(self, t, y, B, device):
        """c = MLP(sinusoid(t)) (+ label embedding): (B, D), the vector every adaLN regresses from."""
        t = torch.as_tensor(t, device=device).reshape(-1).expand(B)  # (B,), a scalar t is broadcast
        c = self.t_embed(timestep_embedding(t, FREQUENCY_DIM).to(self.x_embed.weight.dtype))  # (B, D)
        if self.y_embed is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0): call it without y")
            return c
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=device)  # the null label
        return c + self.y_embed(y)  # Sec. 3.2: adaLN regresses from the sum of the t and class embeddings

    def forward(self, x, t, y=None):
        B, C, H, W = x.shape
        c = self.conditioning(t, y, B, x.device)  # (B, D)
        h = self.x_embed(x)  # (B, D, H/p, W/p)
        h = h.flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D): token i * (W/p) + j = patch (i, j)
        for block in self.blocks:
            h = block(h, c)  # (B, T, D)
        h = self.final(h, c)  # (B, T, p p out)
        return unpatchify(h, self.patch_size, self.grid)  # (B, 2C, H, W): eps and v (learn_sigma), else (B, C, H, W)


PRESETS = {
    # DiT-S/4 (Table 1: 12 layers, width 384, 6 heads; patch 4) on 64x64 pixels, the paper's image size:
    # 256 tokens, ~33M parameters.
    "dit-s": dict(image_size=64, patch_size=4, hidden_size=384, depth=12, num_heads=6, learn_sigma=True),
    # 32x32 circles on 2 CPU cores: patch 2 (256 tokens), ~1.2M parameters like unet's "cpu" preset.
    "cpu": dict(image_size=32, patch_size=2, hidden_size=128, depth=4, num_heads=4, learn_sigma=True),
    # for the tests: 16x16, 64 tokens, ~90k parameters
    "tiny": dict(image_size=16, patch_size=2, hidden_size=32, depth=4, num_heads=4, learn_sigma=True),
}


def build_dit(preset, **overrides):
    """DiT from a named preset, with any constructor keyword overridden: build_dit("cpu", learn_sigma=False)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choices: {sorted(PRESETS)}")
    return DiT(**{**PRESETS[preset], **overrides})


def fwd_bwd_seconds(model, x, t):
    """Wall time of one forward + backward pass (loss: mean square of the output)."""
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(x, t).square().mean().backward()
    return time.perf_counter() - start


def compare_speed(dit, other, batch, reps, seed=0):
    """Median seconds per IMAGE of forward + backward for both models, timed interleaved (dit, other,
    dit, other, ...) after one warm-up each, so a busy shared CPU slows both alike."""
    cfg = dit.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    times = {"dit": [], "other": []}
    for rep in range(reps + 1):
        for name, model in (("dit", dit), ("other", other)):
            seconds = fwd_bwd_seconds(model, x, t)
            if rep > 0:  # rep 0 is the warm-up
                times[name].append(seconds)
    return statistics.median(times["dit"]) / batch, statistics.median(times["other"]) / batch


def main(argv=None):
    parser = plumbing.OneLineParser(description="Build a preset DiT; print its config, size, output shape "
                                                 "and its CPU forward+backward time against a U-Net.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="named DiT config")
    parser.add_argument("--unet", choices=sorted(unet.PRESETS), default="cpu",
                        help="U-Net preset to time against (built at the DiT's image size)")
    parser.add_argument("--batch", type=plumbing.positive_int, default=64, help="batch size of the timing")
    parser.add_argument("--reps", type=plumbing.positive_int, default=5, help="timed repetitions per model (median reported)")
    parser.add_argument("--threads", type=plumbing.positive_int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_dit(args.preset)
    cfg = model.config
    print(json.dumps(cfg, indent=2))
    print(f"parameters: {count_params(model):,}")
    x = torch.randn(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    print(f"input {tuple(x.shape)} -> output {tuple(out.shape)}")
    other = unet.build_unet(args.unet, image_size=cfg["image_size"], in_channels=cfg["in_channels"],
                            learn_sigma=cfg["learn_sigma"])
    dit_s, unet_s = compare_speed(model, other, args.batch, args.reps)
    print(f"forward+backward per image (CPU, batch {args.batch}, {args.threads} thread(s), median of "
          f"{args.reps}, interleaved): DiT '{args.preset}' {1e3 * dit_s:.2f} ms, U-Net '{args.unet}' "
          f"({count_params(other):,} parameters) {1e3 * unet_s:.2f} ms, ratio {dit_s / unet_s:.2f}")


if __name__ == "__main__":
    main()
