"""classifier.py -- the noisy, time-conditioned guidance classifier p(y | x_t, t) and its heatmap.

What this file is
    Classifier guidance (Sec. 2.2) and multi-guidance (Sec. 4.2, Eq. 2) need grad_x log p(y | x_t, t)
    at EVERY noise level of the reverse chain, so the classifier is trained on noised images:
    x_t = q_sample(x_0, t, eps) with t drawn uniformly from the chain's steps, and it is told t.
    Its architecture is Dhariwal & Nichol's (2021) classifier: the encoder half of the U-Net (the same
    ResBlocks with timestep scale-shift norm and the same attention blocks as the denoiser, reused
    from unet.py), then GroupNorm, SiLU and an attention-pooling head that reads the final feature map
    and returns one logit per class. The paper (App. C, Sec. 5.5) uses this recipe unchanged; its
    released circles config has width 64 and depth 2 (~10M parameters, the "paper" preset).

    Sec. 5.5 finds that spectral normalization (Miyato et al. 2018) of the classifier makes its
    prediction smoother across the unseen middle band and helps interpolation: `spectral_norm=True`
    divides every Conv2d and Linear weight by an estimate of its largest singular value (PyTorch's
    own parametrization, 2 power iterations per training forward, as in the released config).

    App. K: where the attribute is known (the circle's centre), the EVALUATOR may regress it in
    [0, 1] instead of classifying it. The regressor is the same network with D outputs read through a
    sigmoid, trained on clean circles at ALL positions (the evaluator, unlike the guidance classifier,
    may see every position); predict_attributes and regression_losses here, training by fit.fit.

    Also here: temperature scaling (Guo et al. 2017) for calibrating evaluation classifiers, the
    per-example training loss on noised images, and the heatmap of Fig. 7b: p(right | a circle
    centred at (x, y)) for every centre, which shows how sharply the classifier switches sides in the
    middle band that neither the DDPM nor the classifier ever saw.

Run
    python classifier.py --ckpt runs/circles/classifier0.pt --out runs/circles/heatmaps --t 0
        -> heatmap_t0.png (Fig. 7b) and heatmap_t0.json (mean p over the middle band, transition width)
    python classifier.py --help
"""
import io
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import ddpm
import plumbing
import toy_circles
import unet


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class AttentionPool2d(nn.Module):
    """Attention pooling (the idea of guided-diffusion's AttentionPool2d, from CLIP's ResNet head).

    The (B, C, h, w) map becomes h*w tokens; their mean is prepended as a "query" token, a learned
    positional embedding is added to all h*w + 1 tokens, and one multi-head self-attention layer runs
    over them. Only the first token's output is kept (a learned, content-dependent weighted average of
    the map) and projected to `out_dim` logits. Since only that token is kept, only its query is
    computed: the result equals full self-attention followed by taking token 0.
    Heads follow unet.AttentionBlock: num_heads, or channels // num_head_channels when that is != -1.
    """

    def __init__(self, channels, tokens, out_dim, num_heads=4, num_head_channels=-1):
        super().__init__()
        self.num_heads = unet.head_count(channels, num_heads, num_head_channels)
        # one position per token plus the mean token, scaled like guided-diffusion's (std 1/sqrt(C))
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, channels) / channels ** 0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, x):
        return self.proj(self.pool(x))                            # (B, out_dim) logits

    def pool(self, x):
        """(B, C, H, W) -> (B, C): the attended average before the projection (the features that
        evaluate.memorization compares)."""
        B, C, H, W = x.shape
        nh = self.num_heads
        h = x.reshape(B, C, H * W).transpose(1, 2)                # (B, HW, C): one token per position
        h = torch.cat([h.mean(dim=1, keepdim=True), h], dim=1)    # (B, HW + 1, C): mean token first
        h = h + self.positional_embedding.to(h.dtype)             # (B, T, C), T = HW + 1
        T = h.shape[1]
        q, k, v = self.qkv(h).reshape(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # each (B, nh, T, d)
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, nh, 1, d): the mean token attends
        return out.reshape(B, C)                                  # (B, C): heads concatenated


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): time-embedding MLP + unet.UNetEncoder + GroupNorm, SiLU, attention pooling.

    forward(x, t): x (B, C, H, W) noised images in [-1, 1]-ish, t (B,) (or a scalar) ORIGINAL timestep
    indices (what ddpm.Diffusion.model_timesteps returns) -> logits (B, num_classes).
    `self.config` holds the constructor's arguments: NoisyClassifier(**config) rebuilds the model.
    """

    def __init__(self, *, image_size, in_channels=3, model_channels, channel_mult, num_res_blocks,
                 attention_resolutions, num_classes=2, num_heads=4, num_head_channels=-1, dropout=0.0,
                 stem=1, spectral_norm=False):
        super().__init__()
        self.config = dict(image_size=image_size, in_channels=in_channels, model_channels=model_channels,
                           channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=tuple(attention_resolutions), num_classes=num_classes,
                           num_heads=num_heads, num_head_channels=num_head_channels, dropout=dropout,
                           stem=stem, spectral_norm=spectral_norm)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.model_channels, self.num_classes = model_channels, num_classes
        emb_dim = 4 * model_channels
        # the same sinusoidal embedding + MLP as the denoiser (unet.UNet)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.encoder = unet.UNetEncoder(in_channels, model_channels, channel_mult, num_res_blocks,
                                        attention_resolutions, dropout, num_heads, num_head_channels,
                                        image_size, stem)
        ch, res = self.encoder.out_channels, self.encoder.out_resolution
        self.head = nn.Sequential(unet.group_norm(ch), nn.SiLU(),
                                  AttentionPool2d(ch, res * res, num_classes, num_heads, num_head_channels))
        if spectral_norm:
            apply_spectral_norm(self)

    def forward(self, x, t):
        return self.head[-1].proj(self.features(x, t))  # (B, num_classes) logits

    def features(self, x, t):
        """(B, C_mid) penultimate features: everything but the attention pool's final projection to
        logits. evaluate.memorization compares samples and training images in this space (App. H)."""
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,), a scalar t is broadcast
        emb = unet.timestep_embedding(t, self.model_channels).to(x.dtype)  # (B, mc)
        emb = self.time_embed(emb)                                        # (B, 4 mc)
        h, _ = self.encoder(x, emb)       # (B, C_mid, h, w); the skips are for a decoder, unused here
        norm, act, pool = self.head
        return pool.pool(act(norm(h)))    # (B, C_mid)


def apply_spectral_norm(model, n_power_iterations=2):
    """Sec. 5.5: spectral normalization of every Conv2d and Linear (the released config: 2 power iterations).

    PyTorch's parametrization replaces W by W / sigma, sigma = u^T W_mat v estimated by power
    iteration on W_mat = W reshaped to (out_channels, -1) (for a conv that bounds the reshaped kernel
    matrix, not the convolution operator: Miyato et al.'s choice). In train mode each forward runs
    n_power_iterations more steps; in eval mode u and v stay fixed, so the gradient used for
    guidance is that of a fixed function. Layers that unet.py zero-initialises (the last conv of each
    ResBlock, the attention output projection) would give sigma = 0 and 0/0: they are re-initialised
    with PyTorch's default init first. GroupNorm scales and the positional embedding are not
    constrained (nor were they in Miyato et al.).
    """
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if not module.weight.detach().any():
                module.reset_parameters()
            nn.utils.parametrizations.spectral_norm(module, n_power_iterations=n_power_iterations)
    return model


PRESETS = {
    # The authors' released circles config: guided-diffusion's classifier at width 64, depth 2 (res
    # blocks per level), channel mult 1,2,3,4 (its choice for 64x64), attention at 32, 16 and 8:
    # ~9.5M parameters here (the paper's "~10M"; guided-diffusion down-samples with ResBlocks, we
    # reuse unet.py's strided convs, so the counts differ slightly).
    "paper": dict(image_size=64, model_channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                  attention_resolutions=(32, 16, 8), num_classes=2, num_heads=4, stem=1),
    # 32x32 circles on 2 CPU cores: the same pixel-unshuffle stem as unet's "cpu" preset, so the
    # classifier runs at 16, 8 and 4 pixels; attention at the 8x8 level and in the middle block.
    "cpu": dict(image_size=32, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_classes=2, num_heads=4, stem=2),
    # for the tests
    "tiny": dict(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), num_classes=2, num_heads=4, stem=1),
}


def build_classifier(preset, **overrides):
    """NoisyClassifier from a named preset, with constructor keywords overridden:
    build_classifier("cpu", spectral_norm=True)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; choices: {sorted(PRESETS)}")
    return NoisyClassifier(**{**PRESETS[preset], **overrides})


def classifier_losses(model, diffusion, x0, labels, t, noise):
    """Per-example training terms on noised images (Sec. 4.2: "a guidance classifier on noisy samples").

    x_t = q_sample(x0, t, noise) at chain indices t (drawn uniformly by the caller); the classifier
    sees the ORIGINAL step index. Returns dict(loss = cross-entropy (B,), acc (B,) in {0, 1}).
    """
    xt = diffusion.q_sample(x0, t, noise)
    logits = model(xt, diffusion.model_timesteps(t)).float()  # (B, num_classes)
    return dict(loss=F.cross_entropy(logits, labels, reduction="none"),
                acc=(logits.argmax(dim=1) == labels).float())


def predict_attributes(model, x0):
    """App. K's evaluator: the known continuous attribute(s) in (0, 1) of clean images, (B, D) float32.

    The evaluator is a NoisyClassifier whose D = num_classes outputs are regression heads, always
    called at t = 0 on clean images (x0 in [-1, 1]); prediction = sigmoid(output). For the circles the
    attributes are the centre's normalised coordinates (z_x, z_y), z = (c + 0.5) / S.
    """
    t = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
    return torch.sigmoid(model(x0, t).float())                 # (B, D)


def regression_losses(model, x0, targets):
    """Per-example training terms of the App. K regressor (the paper's evaluator for a known
    attribute "regresses on the continuous attribute in the range [0, 1]" instead of classifying).

    targets (B, D) in [0, 1]. Returns dict(loss = squared error averaged over D (B,),
    mae = |error| of the first attribute (z_x for the circles), in image widths (B,)).
    """
    pred = predict_attributes(model, x0)
    return dict(loss=((pred - targets) ** 2).mean(dim=1), mae=(pred[:, 0] - targets[:, 0]).abs())


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

def fit_temperature(logits, labels, init=1.5, max_iter=100):
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T).

    One scalar, fitted on held-out (logits, labels) with L-BFGS (initial T = 1.5, as in the released
    code); we optimise log T so T stays positive. Returns T as a float; calibrated probabilities are
    softmax(logits / T). T > 1 softens an over-confident model.
    """
    logits = torch.as_tensor(logits).detach().to(torch.float64)  # (N, K)
    labels = torch.as_tensor(labels).detach().long()             # (N,)
    log_t = torch.tensor(math.log(init), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = F.cross_entropy(logits / log_t.exp(), labels)
        nll.backward()
        return nll

    opt.step(closure)
    return float(log_t.detach().exp())


# ----------------------------------------------------------------------------------------------
# The heatmap of Fig. 7b
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def heatmap(model, diffusion, size, t=0, noise_draws=4, seed=0, batch=256):
    """p(right | circle centred at (x, y), x_t) for every valid centre (toy_circles region "all").

    Each clean image x_0 is noised to chain step t of `diffusion`, x_t = q_sample(x_0, t, eps)
    (Eq. 4; at t = 0 the cosine schedule has sqrt(1 - abar) = 0.0064 for T = 1000, 0.0031 for
    T = 4000: nearly the clean image), and
    the classifier is called with diffusion.model_timesteps(t). p is averaged over `noise_draws`
    noise draws from one generator seeded with `seed`.
    Returns (xs, ys, p_right): three numpy arrays of length N (int64, int64, float64).
    """
    if not 0 <= t < diffusion.num_timesteps:
        raise ValueError(f"t must be a chain step in [0, {diffusion.num_timesteps - 1}], got {t}")
    if noise_draws < 1:
        raise ValueError(f"noise_draws must be positive, got {noise_draws}")
    tensors = list(model.parameters()) + list(model.buffers())
    device = tensors[0].device if tensors else torch.device("cpu")
    was_training = model.training
    model.eval()
    data = toy_circles.make_circles(size, "all")
    x0 = plumbing.to_tensor(data["images"])                     # (N, 3, S, S) in [-1, 1]
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(len(x0), dtype=torch.float64)
    for _ in range(noise_draws):
        for start in range(0, len(x0), batch):
            xb = x0[start:start + batch]
            tb = torch.full((len(xb),), t, dtype=torch.long)
            xt = diffusion.q_sample(xb, tb, torch.randn(xb.shape, generator=g))  # Eq. 4
            logits = model(xt.to(device), diffusion.model_timesteps(tb).to(device)).float()
            p[start:start + len(xb)] += logits.softmax(dim=1)[:, 1].double().cpu()
    model.train(was_training)
    xs, ys = data["centres"][:, 0], data["centres"][:, 1]
    return xs, ys, (p / noise_draws).numpy()


def heatmap_summary(xs, p, size):
    """Numbers of a heatmap: the mean p over the middle band and the transition width.

    The row-averaged p of each column x (mean over y) gives a profile p(x); the transition width is
    the number of columns whose profile lies in [0.1, 0.9] (1-2 for a step, more for a smooth ramp,
    Fig. 7b right). middle_mean_p averages p over every centre whose z lies in MIDDLE_BAND.
    """
    xs, p = np.asarray(xs), np.asarray(p, dtype=np.float64)
    columns = np.unique(xs)
    profile = np.array([p[xs == c].mean() for c in columns])
    z = toy_circles.normalized_x(xs, size)
    middle = (z >= toy_circles.MIDDLE_BAND[0]) & (z <= toy_circles.MIDDLE_BAND[1])
    return dict(middle_mean_p=float(p[middle].mean()),
                transition_width=int(((profile >= 0.1) & (profile <= 0.9)).sum()),
                columns=columns.tolist(), column_mean_p=profile.tolist())


def plot_heatmap(xs, ys, p, size, path, title):
    """Fig. 7b: p(right) over the circle centre (x, y) as a PNG; returns heatmap_summary's dict.

    Solid red lines mark the inner edges of the two training bands, dashed cyan lines the middle band
    used for the accuracy of Sec. 5.5 (at 32x32 the two coincide: the bands are adjacent); centres
    that are not valid stay blank.
    """
    xs, ys = np.asarray(xs), np.asarray(ys)
    grid = np.full((size, size), np.nan)                 # (row y, column x)
    grid[ys, xs] = p
    fig = Figure(figsize=(6.0, 5.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, origin="upper", cmap="viridis", vmin=0.0, vmax=1.0,
                   extent=(-0.5, size - 0.5, size - 0.5, -0.5), interpolation="nearest")
    fig.colorbar(im, ax=ax, label="p(right | x_t)")
    left, _ = toy_circles.grid_positions(size, "left")
    right, _ = toy_circles.grid_positions(size, "right")
    middle, _ = toy_circles.grid_positions(size, "middle")
    for edge in (left.max() + 0.5, right.min() - 0.5):
        ax.axvline(edge, color="tab:red", lw=1.5, label="training bands" if edge < size / 2 else None)
    for edge in (middle.min() - 0.5, middle.max() + 0.5):
        ax.axvline(edge, color="tab:cyan", lw=1.5, ls="--", label="middle band" if edge < size / 2 else None)
    ax.set_xlabel("circle centre x (pixel column)")
    ax.set_ylabel("circle centre y (pixel row)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plumbing.write_bytes_atomically(path, buf.getvalue())
    return heatmap_summary(xs, p, size)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def load_classifier(path, device="cpu", use_ema=True):
    """(classifier in eval mode, its checkpoint dict) from a self-describing "classifier" checkpoint.

    The EMA weights are used when present and use_ema is set. Refuses (plumbing.CheckpointError, one
    line) a checkpoint whose config or weights do not build a NoisyClassifier.
    """
    ckpt = plumbing.load_checkpoint(path, "classifier")
    try:
        model = NoisyClassifier(**ckpt["model_config"])
        weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise plumbing.CheckpointError(f"checkpoint {path} does not rebuild a NoisyClassifier: {reason}") from None
    return model.to(device).eval(), ckpt


def main(argv=None):
    parser = plumbing.OneLineParser(description="Heatmap of a guidance classifier over circle centres (paper Fig. 7b).")
    parser.add_argument("--ckpt", required=True, help="classifier checkpoint (kind 'classifier')")
    parser.add_argument("--t", type=plumbing.nonnegative_int, default=0,
                        help="chain step of the checkpoint's diffusion (0 = nearly clean)")
    parser.add_argument("--draws", type=plumbing.positive_int, default=4, help="noise draws averaged per centre")
    plumbing.add_flags(parser, "seed", "device", "threads", "out", "overwrite", batch=256)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    args = parser.parse_args(argv)
    plumbing.check_out_folder(args.out)
    device = plumbing.check_device(args.device)
    plumbing.set_threads(args.threads)
    plumbing.refuse_overwrite(args.out, [f"heatmap_t{args.t}.png", f"heatmap_t{args.t}.json"], args.overwrite)
    model, ckpt = load_classifier(args.ckpt, device=device, use_ema=not args.no_ema)
    try:
        diffusion = ddpm.diffusion_from_config(ckpt["diffusion"])
        size = toy_circles.check_size(model.config["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"classifier.py: checkpoint {args.ckpt}: {e}") from None
    if not 0 <= args.t < diffusion.num_timesteps:
        parser.error(f"--t must be in [0, {diffusion.num_timesteps - 1}] for this checkpoint, got {args.t}")
    xs, ys, p = heatmap(model, diffusion, size, t=args.t, noise_draws=args.draws, seed=args.seed, batch=args.batch)
    png = os.path.join(args.out, f"heatmap_t{args.t}.png")
    t_model = int(diffusion.model_timesteps(torch.tensor([args.t]))[0])
    summary = plot_heatmap(xs, ys, p, size, png, f"p(right), chain step t = {args.t} (model step {t_model})")
    record = dict(ckpt=os.path.abspath(args.ckpt), t=args.t, model_t=t_model, draws=args.draws, seed=args.seed,
                  size=size, **summary, xs=xs.tolist(), ys=ys.tolist(), p_right=p.tolist())
    plumbing.write_json(record, os.path.join(args.out, f"heatmap_t{args.t}.json"))
    print(f"mean p(right) over the middle band {summary['middle_mean_p']:.3f}, "
          f"transition width {summary['transition_width']} columns; wrote {png}")


if __name__ == "__main__":
    plumbing.guard(main)
