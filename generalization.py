"""generalization.py -- memorisation to generalisation: two DDPMs on disjoint subsets, and the
harmonic bases of their denoisers (Kadkhodaie et al., ICLR 2024, replayed on the zsi discs).

The question (Kadkhodaie et al., "Generalization in diffusion models arises from geometry-adaptive
harmonic representations", ICLR 2024)
    Train two denoisers on disjoint training sets S1 and S2 of N images each. For small N each
    memorises its own set: samples are copies of training images, different for the two models.
    For large N both learn (nearly) the same score, so from the same starting noise they produce
    (nearly) the same image, which is in neither training set: the models generalise. Where does
    the transition lie for one white disc on black, whose images form a 2-D manifold (cx, cy)?

The protocol (per N in --ns), what is kept fixed, and what is not
    1. One seeded pool of --pool continuous discs (toy_circles.make_discs: sub-pixel centres,
       16 x 16 supersampled anti-aliasing, radius --radius, grey 1-channel 32 x 32). S1 = the first N
       of the first half of a seeded permutation, S2 = the first N of the second half: disjoint, and
       nested in N (the paper: S1 = first N, S2 = last N).
    2. DDPM A on S1, DDPM B on S2, with train.py's code path (build_ddpm + ddpm_loss + fit): the same
       U-Net, schedule, optimiser, batch, number of updates and training seed (data order, t and eps
       of every step) for every N and both models; the paper likewise keeps the number of updates
       fixed. Horizontal flips are off (a flip would add the mirror images to a set). The initial
       weights are the control: a first probe on these discs found that undertrained models agree
       whatever their data when they share initial weights and x_T, so by default (--init different)
       A and B start from different weights; --init same / both trains B from A's weights instead /
       as well (B0), and reports the A-B0 pair next to A-B.
    3. M samples from each model from the SAME x_T with deterministic DDIM (eta = 0).
    4. Measures (medians over the M samples; "centre" = evaluate.detect_circles for the count, then
       the intensity centroid of the pixels within r + 1.5 px of it, sub-pixel):
       (1) centre distance |c(A_j) - c(B_j)| in pixels;
       (2) cosine of A_j and B_j on images mapped to [0, 1] (black background = 0): two discs that do
           not overlap score 0. The cosine of the raw [-1, 1] images is near 1 for ANY two samples
           (the -1 background dominates); it is reported only to show that;
       (3) memorisation: for each sample, the nearest training image (max cosine) and the nearest
           training centre in its own set and in the other set, against the same statistics for
           fresh discs drawn from the data generator (what chance alone gives against N centres);
       (4) without sampling: denoising MSE of x0_hat on training and held-out images against t, and
           the disagreement E||eps_A - eps_B||^2 / E||eps||^2 on held-out images.
    5. The denoiser's Jacobian ("geometry-adaptive harmonic bases", GAHB), see below.
    6. The zsi twist: the same pair protocol on extremes-only data (centres in the outer bands,
       toy_circles region "train"), each DDPM with its own noisy classifier trained on its own half
       (fit.classifier_loss + fit), multi-guided (multiguide, lambda = --lambdas) from shared noise:
       do the two models put their guided middle circles at the same place?

The denoiser as a function of y, and its Jacobian
    Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Divide by sqrt(abar_t):
        y = x_t / sqrt(abar_t) = x_0 + sigma_t eps,   sigma_t^2 = (1 - abar_t) / abar_t,
    the "image plus Gaussian noise of std sigma" of the paper. The eps-prediction gives
        x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)
               = y - sigma_t eps_theta(sqrt(abar_t) y, t)  =: f(y),
    so  grad f(y) = I - sigma_t sqrt(abar_t) d eps_theta / d x_t = I - sqrt(1 - abar_t) d eps_theta / d x_t.
    By Miyasawa / Tweedie f(y) = y + sigma^2 grad log p_sigma(y), so the exact Jacobian is symmetric
    (a Hessian) and equals Cov[x_0 | y] / sigma^2. We compute the full (D x D) Jacobian,
    D = 32 * 32 = 1024, with torch.func (vmap over images of jacrev), and report: its asymmetry
    ||(J - J^T)/2||_F / ||J||_F; the eigen-decomposition of (J + J^T)/2; the effective dimension
    tr grad f (the paper's; at small sigma it is about the dimension of the space the denoiser keeps:
    ~2 for a denoiser that projects onto the tangent plane of the (cx, cy) disc manifold, ~0 for
    one that snaps to the nearest training image); the top eigenvectors as images; and the fraction
    of the true tangent plane (finite differences of the renderer, toy_circles.disc_tangents) that
    the top-k eigenvectors capture. Because the trace also sums ~1000 background directions, on each
    of which an imperfect net keeps a few percent of the noise (+-10 in total, even a negative trace
    at some t), we also count the eigenvalues above 1/2 (the directions the denoiser keeps). Our
    U-Net has biases, so f(y) != grad f(y) y (the paper's nets are bias-free, on images whose black
    is 0); the relative residual ||f(y) - J y|| / ||f(y)|| is reported too: here the black
    background is -1, a constant the biases produce, so expect it near 1 at large sigma.

Why grey 1-channel images: unet.UNet takes in_channels, evaluate.detect_circles accepts grey
    images, and the Jacobian is 1024 x 1024 instead of 3072 x 3072 (a third of the backward passes).

Run (export OMP_WAIT_POLICY=PASSIVE first when other jobs share the CPU)
    python generalization.py --quick    # N in {8, 2048}, 16-channel net, 800 steps: 7.0 min measured
                                        # alone on 2 cores (815 CPU-s)
    python generalization.py            # N in {4, 16, 64, 256, 1024, 4096}, 32-channel net, 1500 steps:
                                        # 2 h 06 min measured on 2 cores shared with 1-3 other jobs
                                        # (8150 CPU-s = 68 min of two cores); the transition: N = 64 .. 256
    python generalization.py --quick --ns 8,64 --steps 300 --out runs/gen_try   # any field as a flag
Finished models (and the checkpoints of unfinished ones) in --out are picked up again by a rerun
with the same settings; --overwrite retrains. Outputs: report.md, results.json, config.json,
figures/*.png, samples/*.npz (uint8).
"""
import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from torch.func import jacrev, vmap

import classifier
import ddpm
import evaluate
import fit
import multiguide
import plumbing
import toy_circles
import train
import unet


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class GenConfig:
    """Every number of a study. The defaults are the "default" preset; PRESETS["quick"] changes some."""
    preset: str = field(default="default", metadata={"help": "named preset", "choices": ["quick", "default"]})
    out: str = field(default="", metadata={"help": "output folder (default runs/generalization_<preset>)"})
    seed: int = field(default=0, metadata={"help": "fixes the pool, the subsets, training, x_T"})
    ns: str = field(default="4,16,64,256,1024,4096", metadata={"help": "training-set sizes N, comma-separated"})
    pool: int = field(default=8192, metadata={"help": "pool of discs; S1 and S2 come from its two halves"})
    size: int = field(default=32, metadata={"help": "image side in pixels"})
    radius: float = field(default=2.5, metadata={"help": "disc radius in pixels"})
    # --- DDPM: train.py's recipe, identical for every N and both models ---
    unet: str = field(default="cpu", metadata={"help": "base U-Net preset (unet.PRESETS)", "choices": sorted(unet.PRESETS)})
    channels: int = field(default=32, metadata={"help": "U-Net model_channels"})
    attention: str = field(default="none", metadata={"help": "attention resolutions, e.g. 8, or 'none' (jacrev "
                                                             "through attention is 3x slower on the CPU)"})
    T: int = field(default=1000, metadata={"help": "diffusion steps (cosine schedule, eps-prediction, L_simple)"})
    steps: int = field(default=1500, metadata={"help": "training steps of every DDPM"})
    batch: int = field(default=64, metadata={"help": "batch size"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear warm-up steps"})
    ema: float = field(default=0.999, metadata={"help": "EMA decay (fit.fit's warm-up applies)"})
    init: str = field(default="different", metadata={"help": "initial weights of B: different from A's, the same, or both",
                                                     "choices": ["different", "same", "both"]})
    # --- sampling and measures ---
    n_samples: int = field(default=256, metadata={"help": "samples M per model (shared x_T)"})
    sample_steps: str = field(default="50", metadata={"help": "DDIM steps (respacing)"})
    eval_t: str = field(default="10,50,100,200,400,600", metadata={"help": "chain steps t of the MSE curves"})
    n_eval: int = field(default=256, metadata={"help": "training / held-out images per MSE point"})
    jac_t: str = field(default="10,50,100,200,400", metadata={"help": "chain steps t of the Jacobian analysis"})
    jac_images: int = field(default=1, metadata={"help": "held-out images per Jacobian point"})
    # --- the zsi twist: extremes-only data, multi-guided ---
    twist_n: int = field(default=2048, metadata={"help": "images per model in the twist (0 = skip it)"})
    twist_n_samples: int = field(default=256, metadata={"help": "guided samples per twist model"})
    clf_channels: int = field(default=32, metadata={"help": "classifier model_channels (classifier 'cpu' preset)"})
    clf_steps: int = field(default=500, metadata={"help": "classifier training steps"})
    lambdas: str = field(default="30,30", metadata={"help": "multi-guidance weights (left,right)"})
    twist_sampler: str = field(default="ddpm", metadata={"help": "guided sampler (shared noise either way)",
                                                         "choices": ["ddpm", "ddim"]})
    # --- run control ---
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all cores, at most 8)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    overwrite: bool = field(default=False, metadata={"help": "retrain models and replace the outputs that --out "
                                                     "already holds"})


PRESETS = {
    # N in {8, 2048}: a 288k-parameter U-Net (16 channels, no attention), 800 steps per model.
    "quick": dict(ns="8,2048", pool=4096, channels=16, steps=800, n_samples=64, n_eval=128,
                  eval_t="10,50,100,200,400", jac_t="10,50,200,400", twist_n=1024, twist_n_samples=64,
                  clf_channels=16, clf_steps=200),
    # N in {4, ..., 4096}: a 1.14M-parameter U-Net (32 channels, no attention), 1500 steps per model.
    "default": {},
}
SEEDS = dict(pool=0, heldout=1000, fresh=2000, twist=3000, sample=4000, noise=5000)  # offsets to --seed


def parse_ints(text, name):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--{name} wants comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"--{name} is empty")
    return values


def parse_config(argv=None):
    """Command line -> GenConfig: --quick (or --preset) picks the preset, any field's flag overrides it."""
    parser = plumbing.OneLineParser(description=__doc__.split("\n\n")[0],
                                    renamed={"--m": "--n-samples", "--twist-m": "--twist-n-samples"})
    parser.add_argument("--quick", action="store_true", help="the quick preset (same as --preset quick)")
    plumbing.add_dataclass_flags(parser, GenConfig, {"quick": PRESETS["quick"]})
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else (args.preset or "default")
    values = {**PRESETS[preset], "preset": preset}
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "preset")})
    cfg = GenConfig(**values)
    cfg.out = cfg.out or os.path.join("runs", f"generalization_{preset}")
    try:
        check_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check_config(cfg):
    """Refuse numbers that cannot work (ValueError naming the flag)."""
    for name in ("pool", "size", "steps", "batch", "T", "channels", "n_eval", "jac_images", "twist_n_samples",
                 "clf_channels", "clf_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.T < 2:
        raise ValueError(f"--T must be >= 2 (a chain needs two steps), got {cfg.T}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.n_samples < 1:
        raise ValueError(f"--n-samples (samples per model) must be at least 1, got {cfg.n_samples}")
    ns = parse_ints(cfg.ns, "ns")
    if min(ns) < 1:
        raise ValueError(f"--ns must be positive, got {ns}")
    if max(ns) > cfg.pool // 2:
        raise ValueError(f"--ns: N = {max(ns)} is larger than half the pool (--pool {cfg.pool} gives at most "
                         f"{cfg.pool // 2} per set)")
    for name, ok, wanted in (("lr", cfg.lr > 0, "> 0"), ("radius", cfg.radius > 0, "> 0"),
                             ("ema", 0 <= cfg.ema < 1, "in [0, 1)"), ("warmup", cfg.warmup >= 0, ">= 0"),
                             ("threads", cfg.threads >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"--{name} must be {wanted}, got {getattr(cfg, name)}")
    if cfg.twist_n < 0:
        raise ValueError(f"--twist-n must be >= 0, got {cfg.twist_n}")
    for name in ("eval_t", "jac_t"):
        ts = parse_ints(getattr(cfg, name), name.replace("_", "-"))
        if min(ts) < 0 or max(ts) >= cfg.T:
            raise ValueError(f"--{name.replace('_', '-')} must lie in [0, {cfg.T - 1}], got {ts}")
    try:
        ddpm.check_chain(cfg.T, cfg.sample_steps)
    except ValueError as e:
        raise ValueError(f"--sample-steps: {e}") from None
    try:
        lambdas = plumbing.float_list(cfg.lambdas)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--lambdas: {e}") from None
    if len(lambdas) != 2:
        raise ValueError(f"--lambdas wants one weight per class (left,right), got {len(lambdas)}")
    if cfg.jac_images > cfg.n_eval:
        raise ValueError(f"--jac-images ({cfg.jac_images}) cannot exceed --n-eval ({cfg.n_eval}), the held-out discs")
    toy_circles.continuous_x_range(cfg.size, "all", cfg.radius)
    if cfg.twist_n:
        toy_circles.continuous_x_range(cfg.size, "left", cfg.radius)
    check_networks(cfg)
    plumbing.check_out_folder(cfg.out)
    plumbing.check_device(cfg.device)


def check_networks(cfg):
    """Refuse (ValueError naming the flags) a U-Net or twist classifier that cannot be built for --size,
    --channels, --attention, --clf-channels: each is built once on the meta device (no memory, no time)."""
    if cfg.unet not in unet.PRESETS:
        raise ValueError(f"--unet must be one of {', '.join(sorted(unet.PRESETS))}, got {cfg.unet!r}")
    try:
        unet.parse_attention(cfg.attention, cfg.unet, cfg.size)
    except ValueError as e:
        raise ValueError(f"--attention: {e}") from None
    nets = [(f"--unet {cfg.unet}", unet.PRESETS[cfg.unet], f"--channels {cfg.channels}",
             lambda: unet.build_unet(cfg.unet, image_size=cfg.size, learn_sigma=False, **unet_overrides(cfg)))]
    if cfg.twist_n:
        nets.append(("the twist's classifier (--twist-n > 0)", classifier.PRESETS["cpu"], f"--clf-channels {cfg.clf_channels}",
                     lambda: classifier.build_classifier("cpu", image_size=cfg.size, in_channels=1,
                                                         model_channels=cfg.clf_channels)))
    for name, preset, width, build in nets:
        multiple = preset["stem"] * 2 ** (len(preset["channel_mult"]) - 1)   # each level halves the feature map
        if cfg.size % multiple:
            raise ValueError(f"--size must be a multiple of {multiple} for {name}, got {cfg.size}")
        try:
            with torch.device("meta"):
                build()
        except ValueError as e:  # e.g. channels that do not split into attention heads
            raise ValueError(f"{width} does not fit {name}: {e}") from None


def ddpm_config(cfg, out):
    """The train.Config of every DDPM of the study: eps-prediction with L_simple (DDIM needs no variance)."""
    return train.Config(out=out, seed=cfg.seed, device=cfg.device, threads=cfg.threads, image_size=cfg.size,
                        unet=cfg.unet, T=cfg.T, schedule="cosine", learn_sigma=False, loss="simple", prediction="eps",
                        steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, ema=cfg.ema,
                        log_every=max(1, cfg.steps // 10), ckpt_every=max(100, cfg.steps // 5), grid_every=0,
                        clf_steps=cfg.clf_steps, clf_lr=3e-4, clf_batch=cfg.batch)


def unet_overrides(cfg):
    attention = () if cfg.attention == "none" else tuple(parse_ints(cfg.attention, "attention"))
    return dict(in_channels=1, model_channels=cfg.channels, attention_resolutions=attention)


# ----------------------------------------------------------------------------------------------
# Data: one pool, two disjoint nested subsets
# ----------------------------------------------------------------------------------------------

def split_pool(pool_size, n, seed):
    """Indices (S1, S2) of two disjoint sets of n images from a pool: the first n of each half of a
    seeded permutation. Nested: S1(n) is a prefix of S1(n') for n < n'. Refuses n > pool_size // 2."""
    if not 1 <= n <= pool_size // 2:
        raise ValueError(f"N = {n} must lie in [1, {pool_size // 2}] (half the pool of {pool_size})")
    perm = np.random.default_rng(seed).permutation(pool_size)
    half = pool_size // 2
    return perm[:n], perm[half:half + n]


def images_digest(images):
    """A short fingerprint of a training set: a resumed model must have seen exactly these images."""
    return hashlib.sha1(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Training (train.py's code path) and sampling
# ----------------------------------------------------------------------------------------------

def train_model(cfg, rt, images, path, init_seed, desc):
    """One DDPM on `images` with train.build_ddpm + fit.ddpm_loss(hflip=False) + fit.fit.

    torch.manual_seed(init_seed) fixes the initial weights; the training stream (data order, t, eps)
    is fit.fit's, seeded with --seed: the same for every model of the study. A finished checkpoint
    at `path` with the same identity is loaded instead of retrained. Returns (EMA model, diffusion dict).
    """
    tcfg = ddpm_config(cfg, os.path.dirname(path))
    torch.manual_seed(init_seed)
    model, diffusion, d = train.build_ddpm(tcfg, **unet_overrides(cfg))
    x0 = plumbing.to_tensor(images).to(rt.device)                  # (N, 1, S, S) in [-1, 1]
    identity = dict(study_identity(cfg), init_seed=init_seed, images=images_digest(images), n=len(images))
    meta = dict(kind="ddpm", model_config=model.config, diffusion=d)
    _, ema, _ = fit.fit(model, fit.ddpm_loss(diffusion, x0, hflip=False), train.fit_settings(tcfg), path, rt,
                          meta, identity, resume=not cfg.overwrite, desc=desc)
    return ema.eval(), d


def train_guidance_classifier(cfg, rt, images, labels, d, path, init_seed, desc):
    """A noisy classifier on one model's own half, with fit.classifier_loss + fit.fit (flips swap labels)."""
    tcfg = ddpm_config(cfg, os.path.dirname(path))
    torch.manual_seed(init_seed)
    model = classifier.build_classifier("cpu", image_size=cfg.size, in_channels=1, model_channels=cfg.clf_channels)
    x0 = plumbing.to_tensor(images).to(rt.device)
    identity = dict(study_identity(cfg), init_seed=init_seed, images=images_digest(images), kind="classifier")
    meta = dict(kind="classifier", model_config=model.config, diffusion=d)
    s = train.fit_settings(tcfg, steps=cfg.clf_steps, lr=3e-4, warmup=0, ema=0.0, stream=1,
                           ckpt_every=cfg.clf_steps, log_every=max(1, cfg.clf_steps // 5))
    loss_fn = fit.classifier_loss(ddpm.diffusion_from_config(d), x0, torch.as_tensor(labels).to(rt.device))
    model, _, _ = fit.fit(model, loss_fn, s, path, rt, meta, identity, resume=not cfg.overwrite, desc=desc)
    return model.eval()


def study_identity(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k in ("seed", "pool", "size", "radius", "unet", "channels", "attention", "T", "steps", "batch",
                     "lr", "warmup", "ema", "clf_channels", "clf_steps")}


def sample_images(model, d, m, cfg, rt, seed, clf=None, lambdas=None, sampler="ddim"):
    """M samples as uint8 (M, S, S, 1); the generator seeded with `seed` draws x_T, so every model
    sampled with the same seed starts from the same x_T (and, for "ddpm", the same step noise)."""
    x = multiguide.sample(model, d, m, classifier=clf, lambdas=lambdas, respacing=cfg.sample_steps,
                          sampler=sampler, eta=0.0, batch=256, seed=seed, device=rt.device, progress=False)
    return plumbing.to_uint8(x)


# ----------------------------------------------------------------------------------------------
# Measures on images
# ----------------------------------------------------------------------------------------------

def disc_centres(images, radius):
    """(M, 2) sub-pixel centres (x, y); NaN unless evaluate.detect_circles finds exactly one circle.

    The detector counts the blobs and gives a coarse centre; the centre is then the intensity
    centroid sum(p I_p) / sum(I_p) over the pixels p within radius + 1.5 px of it (all of an
    anti-aliased disc's pixels, which reach r + 0.71 px), exact to ~0.02 px on rendered discs.
    """
    images = np.asarray(images)
    S = images.shape[1]
    rows, cols = np.indices((S, S))
    out = np.full((len(images), 2), np.nan)
    for i, image in enumerate(images):
        found = evaluate.detect_circles(image)
        if len(found) != 1:
            continue
        grey = image.astype(np.float64).mean(axis=-1)              # (S, S)
        near = (cols - found[0][0]) ** 2 + (rows - found[0][1]) ** 2 <= (radius + 1.5) ** 2
        w = grey * near
        out[i] = (w * cols).sum() / w.sum(), (w * rows).sum() / w.sum()
    return out


def _flat(images, raw=False):
    """uint8 images -> float64 (M, D): v / 255 in [0, 1] (black = 0), or raw v / 127.5 - 1 in [-1, 1]."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    return x / 127.5 - 1.0 if raw else x / 255.0


def pair_cosine(a, b, raw=False):
    """Cosine of A_j and B_j for every j, (M,). On [0, 1] images a black image scores 0 with anything."""
    x, y = _flat(a, raw), _flat(b, raw)
    return (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)


def nearest_training(images, centres, train_images, train_centres):
    """For each image: dict(cos = max cosine to a training image, index = that image, centre_dist =
    distance from its centre to the nearest training centre, NaN without a centre). [0, 1] images."""
    x, t = _flat(images), _flat(train_images)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    cos = x @ t.T                                                   # (M, N)
    dist = np.sqrt(((centres[:, None, :] - train_centres[None, :, :]) ** 2).sum(-1))  # (M, N), NaN rows stay NaN
    return dict(cos=cos.max(1), index=cos.argmax(1), centre_dist=dist.min(1))


def summary(values):
    """Median and quartiles of the finite values, and how many there were."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return dict(median=float("nan"), q25=float("nan"), q75=float("nan"), n=0)
    q = np.percentile(v, [25, 50, 75])
    return dict(median=float(q[1]), q25=float(q[0]), q75=float(q[2]), n=int(len(v)))


COPY_PX = 0.25   # a sample "copies" a training image when a training centre lies within 0.25 px of its centre
JAC_T_TABLE, MSE_T_TABLE = 200, 50   # the chain steps (nearest in --jac-t / --eval-t) of report.md's summary table


def memorisation(samples, centres, own, other, fresh):
    """Measure (3) for one model: nearest image and centre in its own set and in the other set, and
    the same statistics for fresh generator draws against the own set (chance level)."""
    o = nearest_training(samples, centres, own["images"], own["centres"])
    x = nearest_training(samples, centres, other["images"], other["centres"])
    f = nearest_training(fresh["images"], fresh["centres"], own["images"], own["centres"])
    frac = lambda d: float(np.mean(d[np.isfinite(d)] < COPY_PX)) if np.isfinite(d).any() else float("nan")
    return dict(d_own=summary(o["centre_dist"]), d_other=summary(x["centre_dist"]), d_fresh=summary(f["centre_dist"]),
                cos_own=summary(o["cos"]), cos_other=summary(x["cos"]), cos_fresh=summary(f["cos"]),
                copy_own=frac(o["centre_dist"]), copy_other=frac(x["centre_dist"]), copy_fresh=frac(f["centre_dist"]),
                nearest_own_index=o["index"])


# ----------------------------------------------------------------------------------------------
# Measures without sampling: denoising error and disagreement against t
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def eps_predictions(model, diffusion, x0, ts, seed):
    """eps_theta(x_t, t) for each t in ts with the noise seeded by (seed, t): dict t -> (eps, noise, x_t)."""
    out = {}
    for t in ts:
        g = torch.Generator().manual_seed(seed * 100_003 + t)
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        xt = diffusion.q_sample(x0, tt, noise)                      # Eq. 4
        t_model = diffusion.model_timesteps(tt)
        eps = model(xt.to(_device(model)), t_model.to(_device(model))).float().cpu()[:, :x0.shape[1]]
        out[t] = (eps, noise, xt)
    return out


def _device(model):
    return next(iter([*model.parameters(), *model.buffers()])).device


def denoising_mse(preds, x0, diffusion):
    """t -> mean over images and pixels of (x0_hat - x0)^2, x0_hat = pred_x0_from_eps (unclipped, [-1, 1] units)."""
    res = {}
    for t, (eps, _, xt) in preds.items():
        tt = torch.full((len(x0),), t, dtype=torch.long)
        res[t] = float(((diffusion.pred_x0_from_eps(xt, tt, eps) - x0) ** 2).mean())
    return res


def disagreement(preds_a, preds_b):
    """t -> E||eps_A - eps_B||^2 / E||eps||^2 on the same x_t (0: the same denoiser)."""
    return {t: float(((preds_a[t][0] - preds_b[t][0]) ** 2).sum() / (preds_a[t][1] ** 2).sum()) for t in preds_a}


# ----------------------------------------------------------------------------------------------
# The denoiser's Jacobian (geometry-adaptive harmonic bases)
# ----------------------------------------------------------------------------------------------

def denoiser(model, diffusion, t):
    """f(y) = x0_hat = y - sigma_t eps_theta(sqrt(abar_t) y, t) on ONE image y (C, S, S), and sigma_t.

    y = x_t / sqrt(abar_t) = x_0 + sigma_t eps with sigma_t^2 = (1 - abar_t) / abar_t (module
    docstring); no clipping, so f is the network's smooth function.
    """
    abar = float(diffusion.float64["alphas_cumprod"][t])
    sigma = math.sqrt((1.0 - abar) / abar)
    t_model = diffusion.model_timesteps(torch.tensor([t]))

    def f(y):
        C = y.shape[0]
        return y - sigma * model(math.sqrt(abar) * y[None], t_model)[0, :C].float()
    return f, sigma


def jacobian(f, ys, chunk_size=256):
    """(B, D, D) Jacobians d f(y) / d y of f: (C, S, S) -> (C, S, S) at each of the B inputs ys.

    torch.func: jacrev builds the D rows by vector-Jacobian products (chunk_size at a time), vmap maps
    it over the inputs. Row i is the gradient of output pixel i, so (J v) = directional derivative.
    """
    with warnings.catch_warnings():  # attention has no vmap batching rule on the CPU: a (correct) slow fallback
        warnings.simplefilter("ignore", UserWarning)
        J = vmap(jacrev(f, chunk_size=chunk_size))(ys)             # (B, C, S, S, C, S, S)
    D = ys[0].numel()
    return J.reshape(len(ys), D, D)


def jacobian_analysis(J, tangents=None, f_y=None, y=None, ks=(1, 2, 4, 8, 16)):
    """Numbers of one Jacobian J (D, D), in float64.

    asymmetry        ||(J - J^T) / 2||_F / ||J||_F (0 for the exact denoiser, a Hessian)
    effective_dim    tr J (= sum of the eigenvalues of the symmetric part), the paper's measure
    kept_dims        the number of eigenvalues above 1/2: directions the denoiser keeps more than half
                     of. Unlike the trace it ignores the +-0.01 per pixel that an imperfect net leaves on
                     each of the ~1000 background directions (which add up to +-10 in the trace)
    eigenvalues      of (J + J^T) / 2, descending; eigenvectors (D, D) columns in the same order
    tangent_energy   k -> ||V_k^T Q||_F^2 / q: the share of the tangent plane (Q: orthonormal basis of
                     the columns of `tangents` (D, q)) that the top-k eigenvectors V_k capture
    homogeneity      ||f(y) - J y|| / ||f(y)|| (0 for a bias-free net) when f_y and y are given
    """
    J = np.asarray(J, dtype=np.float64)
    sym = (J + J.T) / 2
    evals, evecs = np.linalg.eigh(sym)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    res = dict(asymmetry=float(np.linalg.norm((J - J.T) / 2) / max(np.linalg.norm(J), 1e-300)),
               effective_dim=float(np.trace(J)), kept_dims=int((evals > 0.5).sum()), eigenvalues=evals,
               eigenvectors=evecs)
    if tangents is not None:
        Q, _ = np.linalg.qr(np.asarray(tangents, dtype=np.float64))  # (D, q) orthonormal
        res["tangent_energy"] = {int(k): float(((evecs[:, :k].T @ Q) ** 2).sum() / Q.shape[1]) for k in ks}
    if f_y is not None:
        f_y, y = np.asarray(f_y, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        res["homogeneity"] = float(np.linalg.norm(f_y - J @ y) / max(np.linalg.norm(f_y), 1e-300))
    return res


def analyse_model(model, d, cfg, heldout, seed):
    """The Jacobian analysis of one model at every t of --jac-t on --jac-images held-out discs.

    Returns (rows for results.json: means over the images, {t: top-8 eigenvectors of the first image
    as (8, S, S)}) ; the tangent plane is that of each held-out disc (toy_circles.disc_tangents).
    """
    diffusion = ddpm.diffusion_from_config(d, "")
    x0 = plumbing.to_tensor(heldout["images"][:cfg.jac_images]).to(_device(model))   # (B, 1, S, S)
    tangents = [toy_circles.disc_tangents(cfg.size, c, cfg.radius).reshape(2, -1).T * 2.0  # [-1, 1] units
                for c in heldout["centres"][:cfg.jac_images]]
    rows, vectors = [], {}
    for t in parse_ints(cfg.jac_t, "jac-t"):
        f, sigma = denoiser(model, diffusion, t)
        g = torch.Generator().manual_seed(seed * 100_003 + t)
        ys = x0 + sigma * torch.randn(x0.shape, generator=g).to(x0.device)   # y = x_0 + sigma eps
        J = jacobian(f, ys).detach().cpu().numpy()                # (B, D, D)
        with torch.no_grad():
            f_ys = torch.stack([f(y) for y in ys]).cpu().numpy()
        per_image = [jacobian_analysis(J[i], tangents[i], f_ys[i], ys[i].cpu().numpy()) for i in range(len(ys))]
        vectors[t] = per_image[0]["eigenvectors"][:, :8].T.reshape(8, cfg.size, cfg.size)
        mean = lambda key: float(np.mean([a[key] for a in per_image]))
        rows.append(dict(t=t, sigma=sigma, effective_dim=mean("effective_dim"), kept_dims=mean("kept_dims"),
                         asymmetry=mean("asymmetry"),
                         homogeneity=mean("homogeneity"),
                         top_eigenvalues=np.mean([a["eigenvalues"][:16] for a in per_image], 0).tolist(),
                         tangent_energy={k: float(np.mean([a["tangent_energy"][k] for a in per_image]))
                                         for k in per_image[0]["tangent_energy"]}))
    return rows, vectors


# ----------------------------------------------------------------------------------------------
# The study: one pair of models per N, then the twist
# ----------------------------------------------------------------------------------------------

def subset(data, idx):
    return {k: v[idx] for k, v in data.items()}


def compare_pair(images_a, images_b, radius):
    """Measures (1) and (2) for samples from the same x_T: per-sample arrays and their summaries."""
    ca, cb = disc_centres(images_a, radius), disc_centres(images_b, radius)
    dist = np.sqrt(((ca - cb) ** 2).sum(1))                        # NaN unless both hold one circle
    cos01, raw = pair_cosine(images_a, images_b), pair_cosine(images_a, images_b, raw=True)
    with np.errstate(invalid="ignore"):
        within = float(np.mean(dist < 1.0))                         # over all M pairs (NaN counts as apart)
    return dict(centres_a=ca, centres_b=cb, centre_dist=dist, cos01=cos01, cos_raw=raw,
                summary=dict(centre_dist=summary(dist), within_1px=within, cos01=summary(cos01), cos_raw=summary(raw),
                             one_circle_a=float(np.isfinite(ca[:, 0]).mean()),
                             one_circle_b=float(np.isfinite(cb[:, 0]).mean())))


def model_plan(cfg):
    """(name, training set, init seed) of each model of a pair: B's initial weights are the control."""
    plan = [("A", "S1", cfg.seed), ("B", "S2", cfg.seed + 1 if cfg.init != "same" else cfg.seed)]
    return plan + ([("B0", "S2", cfg.seed)] if cfg.init == "both" else [])


def run_pair(cfg, rt, n, pool, heldout, fresh, clock):
    """Train (or load) the models of one N, sample from a shared x_T, measure (1)-(4) and the Jacobians."""
    i1, i2 = split_pool(cfg.pool, n, cfg.seed + SEEDS["pool"])
    sets = dict(S1=subset(pool, i1), S2=subset(pool, i2))
    models, samples, centres = {}, {}, {}
    for name, set_name, init_seed in model_plan(cfg):
        path = os.path.join(cfg.out, "models", f"N{n}_{name}.pt")
        clock(f"N = {n}: model {name} on {set_name} (init seed {init_seed})")
        models[name] = train_model(cfg, rt, sets[set_name]["images"], path, init_seed, f"N={n} {name}")
        samples[name] = sample_images(*models[name], cfg.n_samples, cfg, rt, seed=cfg.seed + SEEDS["sample"])
        centres[name] = disc_centres(samples[name], cfg.radius)
        buf = io.BytesIO()
        np.savez_compressed(buf, images=samples[name], centres=centres[name], n=n, model=name)
        plumbing.write_bytes_atomically(os.path.join(cfg.out, "samples", f"N{n}_{name}.npz"), buf.getvalue())
    clock(f"N = {n}: measures")
    pairs = {f"A-{b}": compare_pair(samples["A"], samples[b], cfg.radius) for b in samples if b != "A"}
    own_of = {name: set_name for name, set_name, _ in model_plan(cfg)}
    memo = {name: memorisation(samples[name], centres[name], sets[own_of[name]],
                               sets["S2" if own_of[name] == "S1" else "S1"], fresh) for name in samples}
    # (4) denoising MSE (own training images vs held-out) and disagreement, the same noise for all models
    diffusion = ddpm.diffusion_from_config(models["A"][1], "")
    ts = parse_ints(cfg.eval_t, "eval-t")
    x_held = plumbing.to_tensor(heldout["images"])
    held = {name: eps_predictions(m, diffusion, x_held, ts, cfg.seed + SEEDS["noise"]) for name, (m, _) in models.items()}
    mse = {}
    for name, (m, _) in models.items():
        x_train = plumbing.to_tensor(sets[own_of[name]]["images"][:cfg.n_eval])
        mse[name] = dict(train=denoising_mse(eps_predictions(m, diffusion, x_train, ts, cfg.seed + SEEDS["noise"] + 1),
                                             x_train, diffusion),
                         heldout=denoising_mse(held[name], x_held, diffusion))
    disagree = {f"A-{b}": disagreement(held["A"], held[b]) for b in held if b != "A"}
    clock(f"N = {n}: Jacobians of model A at t = {cfg.jac_t}")
    jac_rows, eigvecs = analyse_model(models["A"][0], models["A"][1], cfg, heldout, cfg.seed + SEEDS["noise"] + 2)
    result = dict(n=n, pairs={k: v["summary"] for k, v in pairs.items()},
                  memorisation={k: {kk: vv for kk, vv in v.items() if kk != "nearest_own_index"} for k, v in memo.items()},
                  mse=mse, disagreement=disagree, jacobian=jac_rows)
    figure_data = dict(n=n, samples=samples, sets=sets, nearest={k: v["nearest_own_index"] for k, v in memo.items()},
                       eigvecs=eigvecs, y_image=heldout["images"][0, ..., 0], y_centre=heldout["centres"][0])
    return result, figure_data


def run_twist(cfg, rt, clock):
    """The zsi twist: two DDPMs (and their own noisy classifiers) on disjoint halves of extremes-only
    data, multi-guided and unguided from shared noise. Where do the guided middle circles land?"""
    n = cfg.twist_n
    pool = toy_circles.make_discs(2 * n, cfg.size, cfg.radius, "train", seed=cfg.seed + SEEDS["twist"])
    halves = split_pool(2 * n, n, cfg.seed + SEEDS["twist"])
    lambdas = plumbing.float_list(cfg.lambdas)
    guided, unguided = {}, {}
    for (name, init_seed), idx in zip((("A", cfg.seed), ("B", cfg.seed + 1)), halves):
        data = subset(pool, idx)
        clock(f"twist: DDPM {name} on {n} extremes-only discs")
        model, d = train_model(cfg, rt, data["images"], os.path.join(cfg.out, "models", f"twist_{name}.pt"),
                               init_seed, f"twist {name}")
        clock(f"twist: classifier {name}")
        clf = train_guidance_classifier(cfg, rt, data["images"], data["labels"], d,
                                        os.path.join(cfg.out, "models", f"twist_classifier_{name}.pt"), init_seed,
                                        f"twist clf {name}")
        seed = cfg.seed + SEEDS["sample"]
        guided[name] = sample_images(model, d, cfg.twist_n_samples, cfg, rt, seed, clf, lambdas, cfg.twist_sampler)
        unguided[name] = sample_images(model, d, cfg.twist_n_samples, cfg, rt, seed, sampler=cfg.twist_sampler)
        buf = io.BytesIO()
        np.savez_compressed(buf, guided=guided[name], unguided=unguided[name], lambdas=np.array(lambdas))
        plumbing.write_bytes_atomically(os.path.join(cfg.out, "samples", f"twist_{name}.npz"), buf.getvalue())
    res = dict(n=n, lambdas=lambdas, sampler=cfg.twist_sampler)
    for kind, imgs in (("guided", guided), ("unguided", unguided)):
        pair = compare_pair(imgs["A"], imgs["B"], cfg.radius)
        z = {k: toy_circles.normalized_x(pair[f"centres_{k.lower()}"][:, 0], cfg.size) for k in ("A", "B")}
        middle = {k: (z[k] >= toy_circles.MIDDLE_BAND[0]) & (z[k] <= toy_circles.MIDDLE_BAND[1]) for k in z}
        both = middle["A"] & middle["B"]
        res[kind] = dict(pair=pair["summary"], middle_a=float(middle["A"].mean()), middle_b=float(middle["B"].mean()),
                         both_middle=int(both.sum()), centre_dist_both_middle=summary(pair["centre_dist"][both]),
                         dz_both_middle=summary(np.abs(z["A"] - z["B"])[both]))
        res[kind + "_arrays"] = dict(za=z["A"], zb=z["B"])
    return res, dict(guided=guided, unguided=unguided)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _tile(ax, image, title=None, signed=False):
    if signed:                                                     # eigenvectors: grey = 0
        lim = np.abs(image).max() or 1.0
        ax.imshow(image, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def plot_fig1(figs, path, per_row=3):
    """Like the paper's Fig. 1: one row per N, for samples j = 0..per_row-1:
    A's sample | its nearest image in S1 | B's sample (same x_T) | its nearest image in S2."""
    fig = Figure(figsize=(4 * per_row * 0.9, 1.0 * len(figs) + 0.4))
    axes = fig.subplots(len(figs), 4 * per_row, squeeze=False)
    for r, fd in enumerate(figs):
        for j in range(per_row):
            tiles = [(fd["samples"]["A"][j], "A"), (fd["sets"]["S1"]["images"][fd["nearest"]["A"][j]], "near S1"),
                     (fd["samples"]["B"][j], "B"), (fd["sets"]["S2"]["images"][fd["nearest"]["B"][j]], "near S2")]
            for c, (image, title) in enumerate(tiles):
                _tile(axes[r, 4 * j + c], image[..., 0], title if r == 0 else None)
        axes[r, 0].set_ylabel(f"N = {fd['n']}", fontsize=8)
    fig.suptitle("samples of A and B from the same x_T, with each one's nearest training image (cosine)", fontsize=9)
    plumbing.save_figure(fig, path)


def plot_vs_n(results, path):
    """Four panels against N: centre distances, cosines, denoising MSE, disagreement."""
    ns = [r["n"] for r in results]
    med = lambda get: [get(r)["median"] for r in results]
    fig = Figure(figsize=(11, 7.5))
    (a, b), (c, d) = fig.subplots(2, 2)
    a.plot(ns, med(lambda r: r["pairs"]["A-B"]["centre_dist"]), "o-k", label="|c(A_j) - c(B_j)|")
    if any("A-B0" in r["pairs"] for r in results):
        a.plot(ns, med(lambda r: r["pairs"]["A-B0"]["centre_dist"]), "o--", color="0.5", label="A - B0 (same init)")
    a.plot(ns, med(lambda r: r["memorisation"]["A"]["d_own"]), "s-", label="A to nearest centre in S1 (own)")
    a.plot(ns, med(lambda r: r["memorisation"]["A"]["d_other"]), "^-", label="A to nearest centre in S2 (other)")
    a.plot(ns, med(lambda r: r["memorisation"]["A"]["d_fresh"]), "x:", label="fresh discs to nearest in S1 (chance)")
    a.set(xscale="log", yscale="log", xlabel="N (training images per model)", ylabel="median distance (px)",
          title="(1), (3) centre distances")
    b.plot(ns, med(lambda r: r["pairs"]["A-B"]["cos01"]), "o-k", label="cos(A_j, B_j), [0, 1] images")
    b.plot(ns, med(lambda r: r["pairs"]["A-B"]["cos_raw"]), "o:", color="0.6", label="same, raw [-1, 1] images")
    b.plot(ns, med(lambda r: r["memorisation"]["A"]["cos_own"]), "s-", label="A: max cos to S1 (own)")
    b.plot(ns, med(lambda r: r["memorisation"]["A"]["cos_other"]), "^-", label="A: max cos to S2 (other)")
    b.plot(ns, med(lambda r: r["memorisation"]["A"]["cos_fresh"]), "x:", label="fresh discs: max cos to S1")
    b.set(xscale="log", xlabel="N", ylabel="median cosine", title="(2), (3) cosine similarities")
    ts = sorted(results[0]["mse"]["A"]["train"])
    for i, t in enumerate(ts):
        color = f"C{i}"
        c.plot(ns, [r["mse"]["A"]["train"][t] for r in results], "o-", color=color, label=f"t = {t} train")
        c.plot(ns, [r["mse"]["A"]["heldout"][t] for r in results], "o--", color=color, label=f"t = {t} held-out")
        d.plot(ns, [r["disagreement"]["A-B"][t] for r in results], "o-", color=color, label=f"t = {t}")
    c.set(xscale="log", yscale="log", xlabel="N", ylabel="MSE of x0_hat per pixel ([-1, 1] units)",
          title="(4) denoising error of A: own training set vs held-out")
    d.set(xscale="log", yscale="log", xlabel="N", ylabel="E|eps_A - eps_B|^2 / E|eps|^2",
          title="(4) disagreement of A and B on held-out x_t")
    for ax in (a, b, c, d):
        ax.legend(fontsize=6)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def plot_effective_dim(results, path):
    """tr grad f against sigma_t, one line per N, with the manifold dimension 2 for reference."""
    fig = Figure(figsize=(11, 3.8))
    a, b, c = fig.subplots(1, 3)
    for i, r in enumerate(results):
        sig = [row["sigma"] for row in r["jacobian"]]
        a.plot(sig, [row["effective_dim"] for row in r["jacobian"]], "o-", color=f"C{i}", label=f"N = {r['n']}: tr")
        a.plot(sig, [row["kept_dims"] for row in r["jacobian"]], "s--", color=f"C{i}", label=f"N = {r['n']}: # > 1/2")
        b.plot(sig, [row["tangent_energy"][2] for row in r["jacobian"]], "o-", color=f"C{i}", label=f"N = {r['n']}")
        row = min(r["jacobian"], key=lambda row: abs(row["t"] - JAC_T_TABLE))
        c.plot(np.arange(1, 17), row["top_eigenvalues"], "o-", color=f"C{i}", label=f"N = {r['n']}, t = {row['t']}")
    a.axhline(2, color="0.5", linestyle=":", label="manifold dimension 2")
    a.set(xscale="log", yscale="symlog", xlabel="noise std sigma_t of y = x_t / sqrt(abar_t)",
          ylabel="tr grad f(y) (solid); # eigenvalues > 1/2 (dashed)", title="effective dimension, model A")
    b.set(xscale="log", xlabel="sigma_t", ylabel="share of the tangent plane", ylim=(0, 1.05),
          title="d x / d c in the top-2 eigenvectors")
    c.set(xlabel="k", ylabel="eigenvalue k of (J + J^T) / 2", title="top of the spectrum")
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    for ax in (a, b):
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def plot_eigenvectors(figs, results, path):
    """One row per N: the clean held-out disc, then the top 8 eigenvectors of A's symmetrised Jacobian at the
    --jac-t nearest JAC_T_TABLE, cropped to 16 x 16 pixels around the disc (elsewhere they are ~0)."""
    fig = Figure(figsize=(9 * 1.0, 1.1 * len(figs) + 0.4))
    axes = fig.subplots(len(figs), 9, squeeze=False)
    for r, (fd, res) in enumerate(zip(figs, results)):
        t = min(fd["eigvecs"], key=lambda t: abs(t - JAC_T_TABLE))
        evals = next(row["top_eigenvalues"] for row in res["jacobian"] if row["t"] == t)
        S, w = fd["y_image"].shape[0], min(16, fd["y_image"].shape[0])  # a w x w crop around the disc
        c0, r0 = (np.clip(np.round(fd["y_centre"]).astype(int) - w // 2, 0, S - w))
        crop = lambda im: im[r0:r0 + w, c0:c0 + w]
        _tile(axes[r, 0], crop(fd["y_image"]), "clean x_0 (crop)" if r == 0 else None)
        for k in range(8):
            _tile(axes[r, k + 1], crop(fd["eigvecs"][t][k]), f"k={k + 1}: {evals[k]:.2f}", signed=True)
        axes[r, 0].set_ylabel(f"N = {fd['n']}\nt = {t}", fontsize=8)
    fig.suptitle("top eigenvectors of the denoiser Jacobian (model A; red +, blue -; title: eigenvalue)", fontsize=9)
    plumbing.save_figure(fig, path)


def plot_twist(twist, images, path, pairs=8):
    """Guided pairs from shared noise (A above B) and the centre z of A against B's."""
    fig = Figure(figsize=(12, 4.2))
    axes = fig.subplots(2, pairs + 2, gridspec_kw=dict(width_ratios=[1] * pairs + [0.2, 3.5]))
    for j in range(pairs):
        _tile(axes[0, j], images["guided"]["A"][j][..., 0], f"A_{j}")
        _tile(axes[1, j], images["guided"]["B"][j][..., 0], f"B_{j}")
    for ax in axes[:, pairs]:
        ax.axis("off")
    gs = axes[0, pairs + 1].get_gridspec()
    axes[0, pairs + 1].remove(), axes[1, pairs + 1].remove()
    ax = fig.add_subplot(gs[:, pairs + 1])
    for kind, marker in (("unguided", "x"), ("guided", "o")):
        ax.scatter(twist[kind + "_arrays"]["za"], twist[kind + "_arrays"]["zb"], s=10, marker=marker, label=kind)
    ax.axvspan(*toy_circles.MIDDLE_BAND, color="0.9", zorder=0)
    ax.axhspan(*toy_circles.MIDDLE_BAND, color="0.9", zorder=0)
    ax.plot([0, 1], [0, 1], ":", color="0.5")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="z of A's sample", ylabel="z of B's sample (same noise)",
           title=f"lambda = {','.join(f'{v:g}' for v in twist['lambdas'])}; grey: middle band")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _fmt(s, digits=2):
    return f"{s['median']:.{digits}f} [{s['q25']:.{digits}f}, {s['q75']:.{digits}f}]" if s["n"] else "n/a"


def regime(r):
    """A label from model A's distances: "copies" when its samples sit 3x closer to their own training
    centres than chance (fresh discs) does, "new images" when they are no closer than 3/4 of chance,
    "in between" otherwise."""
    own, fresh = r["memorisation"]["A"]["d_own"]["median"], r["memorisation"]["A"]["d_fresh"]["median"]
    if not (math.isfinite(own) and math.isfinite(fresh)):
        return "n/a"
    return "copies" if own < fresh / 3 else "new images" if own >= 0.75 * fresh else "in between"


def twist_section(cfg, twist):
    """report.md lines of the zsi twist (extremes-only data, multi-guided from shared noise); none without it."""
    if twist is None:
        return []
    g, u = twist["guided"], twist["unguided"]
    return [
        "## The zsi twist: extremes-only data, multi-guided from shared noise", "",
        f"Two DDPMs on disjoint halves of {twist['n']} + {twist['n']} discs with centres only in the outer bands "
        f"(z <= {toy_circles.TRAIN_BAND_Z[0]:.3f} or z >= {toy_circles.TRAIN_BAND_Z[1]:.3f}), each with its own "
        f"noisy classifier ({cfg.clf_steps} steps), sampled with lambda = {twist['lambdas']} ({twist['sampler']}, "
        f"shared noise) and unguided from the same noise.", "",
        "| | in the middle band A / B | pairs both in the middle | centre dist A-B, both in middle (px) | "
        "centre dist A-B, all pairs with one circle | pairs within 1 px | \\|z_A - z_B\\| both in middle |",
        "|---|---|---|---|---|---|---|",
        f"| guided | {g['middle_a']:.2f} / {g['middle_b']:.2f} | {g['both_middle']} | "
        f"{_fmt(g['centre_dist_both_middle'])} | {_fmt(g['pair']['centre_dist'])} | {g['pair']['within_1px']:.2f} | "
        f"{_fmt(g['dz_both_middle'], 3)} |",
        f"| unguided | {u['middle_a']:.2f} / {u['middle_b']:.2f} | {u['both_middle']} | "
        f"{_fmt(u['centre_dist_both_middle'])} | {_fmt(u['pair']['centre_dist'])} | {u['pair']['within_1px']:.2f} | "
        f"{_fmt(u['dz_both_middle'], 3)} |",
        "", "![twist](figures/twist.png)", ""]


def denoiser_tables(results, jt, jm, t_mse):
    """report.md rows of the denoisers without sampling: one table at (t_mse, Jacobian row jm), one against t."""
    den = [f"| N | cos nearest own (A) | cos nearest fresh | MSE train / held-out (t = {t_mse}) | disagreement A-B "
           f"(t = {t_mse}) | tr grad f (t = {jt[jm]['t']}, sigma {jt[jm]['sigma']:.2f}) | eigenvalues > 1/2 | "
           f"tangent share in top 2 | asymmetry | f - Jy residual |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        j, mA = r["jacobian"][jm], r["memorisation"]["A"]
        den.append(f"| {r['n']} | {mA['cos_own']['median']:.3f} | {mA['cos_fresh']['median']:.3f} | "
                   f"{r['mse']['A']['train'][t_mse]:.2e} / {r['mse']['A']['heldout'][t_mse]:.2e} | "
                   f"{r['disagreement']['A-B'][t_mse]:.3f} | {j['effective_dim']:.1f} | {j['kept_dims']:.0f} | "
                   f"{j['tangent_energy'][2]:.2f} | {j['asymmetry']:.3f} | {j['homogeneity']:.3f} |")
    eff = ["| N | " + " | ".join(f"t = {row['t']} (sigma {row['sigma']:.2f})" for row in jt) + " |",
           "|---|" + "---|" * len(jt)]
    eff += [f"| {r['n']} | " + " | ".join(f"{row['effective_dim']:.1f} / {row['kept_dims']:.0f} / "
                                         f"{row['tangent_energy'][2]:.2f}" for row in r["jacobian"]) + " |"
            for r in results]
    return den, eff


def report_markdown(cfg, results, twist, timings):
    """report.md: the tables against N, the twist, the figures."""
    jt = results[0]["jacobian"]
    jm = min(range(len(jt)), key=lambda i: abs(jt[i]["t"] - JAC_T_TABLE))   # the Jacobian row of the table
    mse_ts = sorted(results[0]["mse"]["A"]["train"])
    t_mse = min(mse_ts, key=lambda t: abs(t - MSE_T_TABLE))
    rows = ["| N | regime | centre dist A-B (px) | pairs within 1 px | cos A-B [0,1] | raw cos [-1,1] | "
            "one circle A / B | dist to own S (A, B) | dist to other S (A, B) | fresh discs to S1 | "
            "copies own / other / fresh |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p, mA, mB = r["pairs"]["A-B"], r["memorisation"]["A"], r["memorisation"]["B"]
        rows.append(f"| {r['n']} | {regime(r)} | {_fmt(p['centre_dist'])} | {p['within_1px']:.2f} | {_fmt(p['cos01'])} | "
                    f"{p['cos_raw']['median']:.3f} | "
                    f"{p['one_circle_a']:.2f} / {p['one_circle_b']:.2f} | {mA['d_own']['median']:.2f}, "
                    f"{mB['d_own']['median']:.2f} | {mA['d_other']['median']:.2f}, {mB['d_other']['median']:.2f} | "
                    f"{mA['d_fresh']['median']:.2f} | {mA['copy_own']:.2f} / {mA['copy_other']:.2f} / "
                    f"{mA['copy_fresh']:.2f} |")
    same = [r for r in results if "A-B0" in r["pairs"]]
    if same:
        rows += ["", "Same-initialisation control (B0: S2, A's initial weights):", "",
                 "| N | centre dist A-B (different init) | centre dist A-B0 (same init) | within 1 px A-B / A-B0 | "
                 "cos A-B0 |", "|---|---|---|---|---|"]
        rows += [f"| {r['n']} | {_fmt(r['pairs']['A-B']['centre_dist'])} | {_fmt(r['pairs']['A-B0']['centre_dist'])} | "
                 f"{r['pairs']['A-B']['within_1px']:.2f} / {r['pairs']['A-B0']['within_1px']:.2f} | "
                 f"{_fmt(r['pairs']['A-B0']['cos01'])} |" for r in same]
    den, eff = denoiser_tables(results, jt, jm, t_mse)
    lines = [
        "# Memorisation to generalisation: two DDPMs on disjoint subsets (Kadkhodaie et al., ICLR 2024)", "",
        f"Command: `python {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}` "
        f"(configuration in `config.json`, every number in `results.json`).", "",
        f"Data: grey {cfg.size}x{cfg.size} discs of radius {cfg.radius} px, sub-pixel centres uniform over the image, "
        f"anti-aliased with {toy_circles.SUPERSAMPLE}x{toy_circles.SUPERSAMPLE} supersampling; S1, S2 disjoint halves of a "
        f"pool of {cfg.pool}. Each DDPM: U-Net '{cfg.unet}' with {cfg.channels} channels, attention {cfg.attention}, "
        f"{cfg.steps} steps of batch {cfg.batch} (the same for every N), AdamW {cfg.lr:g}, EMA {cfg.ema}, T = {cfg.T} "
        f"cosine, eps-prediction, L_simple, no flips; B's initial weights: {cfg.init} (see the control below). "
        f"M = {cfg.n_samples} samples per model from one shared x_T, DDIM eta = 0, {cfg.sample_steps} steps.", "",
        "## Samples from the same x_T (medians over samples [quartiles])", "",
        "Distances in pixels between sub-pixel centres. 'fresh discs to S1': new discs from the data generator "
        "against S1, what chance gives. 'copies': share of samples within "
        f"{COPY_PX} px of a training centre. The raw [-1, 1] cosine is near 1 for any two samples (the black "
        "background dominates), so the [0, 1] cosine (background 0) is the one to read. 'regime' (of model A): "
        "'copies' when the samples sit 3x closer to their own training centres than fresh discs do, 'new images' "
        "when they are no closer than 3/4 of that chance level.", "",
        *rows, "",
        "## The denoisers (no sampling)", "",
        *den, "",
        "Model A's Jacobian at held-out discs against t: tr grad f (the paper's effective dimension) / the number "
        "of eigenvalues of the symmetric part above 1/2 / the share of the true tangent plane (d x / d c_x, "
        "d x / d c_y, finite differences of the renderer) in the top-2 eigenvectors. A denoiser that keeps the "
        "2-D disc manifold and removes the rest has 2 eigenvalues near 1 and share 1; at small sigma the nets stay "
        "close to the identity on many background directions, which inflates the trace.", "",
        *eff, "",
    ]
    lines += twist_section(cfg, twist)
    lines += [
        "## Figures", "",
        "Fig. 1 of the paper, replayed (A's sample, its nearest image in S1, B's sample from the same x_T, its "
        "nearest image in S2): ![fig1](figures/fig1_pairs.png)", "",
        "Measures against N: ![vs N](figures/vs_n.png)", "",
        "Effective dimension, tangent share and spectrum: ![eff dim](figures/effective_dim.png)", "",
        "Top eigenvectors of the Jacobian: ![eigenvectors](figures/eigenvectors.png)", "",
        "Training discs (first 64 of the pool): ![data](figures/training_data.png)", "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
    ]
    return "\n".join(lines)


def to_json(obj):
    """numpy and dict keys -> plain JSON values."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def run_study(cfg):
    """Pool -> per N: two models, shared-x_T samples, measures, Jacobians -> twist -> figures, report."""
    t_start = time.time()
    rt = fit.setup_runtime(cfg.device, cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    plumbing.write_bytes_atomically(os.path.join(cfg.out, "config.json"),
                                       (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())
    clock = lambda msg: print(f"[{time.time() - t_start:6.0f} s] {msg}", flush=True)
    print(f"generalization | preset {cfg.preset} | out {os.path.abspath(cfg.out)} | device {rt.device} | "
          f"{torch.get_num_threads()} threads")
    print(json.dumps(dataclasses.asdict(cfg)))
    disc = lambda n, seed: toy_circles.make_discs(n, cfg.size, cfg.radius, "all", seed=cfg.seed + seed)
    pool, heldout, fresh = disc(cfg.pool, SEEDS["pool"]), disc(cfg.n_eval, SEEDS["heldout"]), disc(cfg.n_samples, SEEDS["fresh"])
    plumbing.save_grid(pool["images"][:64, ..., 0], os.path.join(cfg.out, "figures", "training_data.png"),
                          nrow=8, scale=2)
    results, figs, timings = [], [], {}
    for n in parse_ints(cfg.ns, "ns"):
        t0 = time.time()
        result, fd = run_pair(cfg, rt, n, pool, heldout, fresh, clock)
        results.append(result)
        figs.append(fd)
        timings[f"N={n}"] = time.time() - t0
        p, mA = result["pairs"]["A-B"], result["memorisation"]["A"]
        clock(f"N = {n}: centre dist A-B {p['centre_dist']['median']:.2f} px; A to own / other / fresh to S1 "
              f"{mA['d_own']['median']:.2f} / {mA['d_other']['median']:.2f} / {mA['d_fresh']['median']:.2f} px; "
              f"cos A-B {p['cos01']['median']:.3f}; tr grad f / eigenvalues > 1/2 by t: " +
              ", ".join(f"{j['t']}: {j['effective_dim']:.1f} / {j['kept_dims']:.0f}" for j in result["jacobian"]))
    twist = twist_images = None
    if cfg.twist_n:
        t0 = time.time()
        twist, twist_images = run_twist(cfg, rt, clock)
        timings["twist"] = time.time() - t0
        g = twist["guided"]
        clock(f"twist: guided in the middle A {g['middle_a']:.2f}, B {g['middle_b']:.2f}; both {g['both_middle']}, "
              f"centre dist there {g['centre_dist_both_middle']['median']:.2f} px")
    clock("figures and report")
    fig_dir = os.path.join(cfg.out, "figures")
    plot_fig1(figs, os.path.join(fig_dir, "fig1_pairs.png"), per_row=min(3, cfg.n_samples))
    plot_vs_n(results, os.path.join(fig_dir, "vs_n.png"))
    plot_effective_dim(results, os.path.join(fig_dir, "effective_dim.png"))
    plot_eigenvectors(figs, results, os.path.join(fig_dir, "eigenvectors.png"))
    if twist is not None:
        plot_twist(twist, twist_images, os.path.join(fig_dir, "twist.png"), pairs=min(8, cfg.twist_n_samples))
    timings["total"] = time.time() - t_start
    out = dict(config=dataclasses.asdict(cfg), per_n=results, timings_s=timings,
               twist={k: v for k, v in twist.items() if not k.endswith("_arrays")} if twist else None,
               supersample=toy_circles.SUPERSAMPLE, copy_px=COPY_PX)
    plumbing.write_bytes_atomically(os.path.join(cfg.out, "results.json"),
                                       (json.dumps(to_json(out), indent=2) + "\n").encode())
    plumbing.write_bytes_atomically(os.path.join(cfg.out, "report.md"),
                                       report_markdown(cfg, results, twist, timings).encode())
    clock(f"report: {os.path.join(cfg.out, 'report.md')}")
    return out


def main(argv=None):
    cfg = parse_config(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would train, sample and write the same files
        raise SystemExit("generalization.py runs in one process; start it with python, not torchrun")
    run_study(cfg)


if __name__ == "__main__":
    plumbing.guard(main)
