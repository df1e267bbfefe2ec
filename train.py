"""train.py -- the experiment: data -> DDPM -> noisy classifier -> guided samples -> evaluation -> report.

The paper's claim (Sec. 4-5): a DDPM trained on extreme examples only (circles in the left and right
fifth of the image; clearly smiling and clearly non-smiling faces), sampled with multi-guidance over
both classes at once (Eq. 2), generates the unseen middle. This file runs that claim end to end:

    1. arguments  one Config; `--data` picks a preset, `--paper` the paper's numbers (for GPUs)
    2. data       circles / corners (toy_circles.py), or real images filtered to their extremes
                  (real_images.py: CelebA, your own folders or CSV)
    3. DDPM       fit.py trains the U-Net (or the DiT) of unet.py on the training images (App. A)
    4. classifier fit.py trains the noisy classifier(s) of classifier.py (Sec. 4.2)
    5. samples    multiguide.py: unguided, multi-guided at --lambdas, and a lambda sweep
    6. evaluate   evaluate.py: circle detector (Sec. 5.5) or the judge's histograms (App. B), memorization
    7. report     results.json, then report.py renders report.md and its figures

Run it (every option: python train.py --help; several processes or GPUs: torchrun --nproc_per_node N train.py)
    python train.py --data circles                      # CPU preset, writes runs/circles/
    python train.py --data circles --paper              # the paper's configuration (GPU)
    python train.py --data circles --cfg --out runs/cfg # classifier-free vs classifier guidance (App. J)
    python train.py --data corners                      # two variables (App. F)
    python train.py --data digits                       # real handwritten digits: slant (real_images.py)
    python train.py --data folder --root DIR            # your own two classes of images (real_images.py)

Threads: min(8, cores) per process (cores / processes under torchrun); on a CPU shared with another
busy process, `export OMP_WAIT_POLICY=PASSIVE` first. Every random draw of training step k comes from
a generator seeded with (seed, stream, rank, k) (fit.step_generator): resumed on the CPU, a run continues bit for bit.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import classifier
import ddpm
import dit
import evaluate
import fit
import multiguide
import plumbing
import real_images
import report
import toy_circles
import unet


# ----------------------------------------------------------------------------------------------
# 1. Arguments
# ----------------------------------------------------------------------------------------------

DATA_CHOICES = ["circles", "corners", *real_images.DATA_NAMES]


@dataclass
class Config:
    """Every number of a run. Defaults are the CPU circles preset; PAPER_PRESETS holds the paper's."""
    data: str = field(default="circles", metadata={"help": "data set: circles (Sec. 5.5), corners (two variables, "
                                                   "App. F), celeba (faces, Sec. 5.1-5.3), digits (slant), or your "
                                                   "own labelled images: folder (--root, class folders) or csv (--csv)",
                                                   "choices": DATA_CHOICES})
    out: str = field(default="", metadata={"help": "output folder (default runs/<data>, runs/<data>_paper with --paper)"})
    seed: int = field(default=0, metadata={"help": "fixes data order, noise, initialisation, sampling"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present) | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all cores, at most 8)"})
    # --- data ---
    image_size: int = field(default=32, metadata={"help": "image side in pixels (circles are drawn at 64 and scaled)"})
    # --- DDPM (App. A, C) ---
    backbone: str = field(default="unet", metadata={"help": "denoiser: the U-Net (unet.py) or a transformer "
                                                     "(dit.py, App. J)", "choices": ["unet", "dit"]})
    unet: str = field(default="cpu", metadata={"help": "U-Net preset in unet.py", "choices": sorted(unet.PRESETS)})
    dit: str = field(default="cpu", metadata={"help": "DiT preset in dit.py (with --backbone dit)",
                                              "choices": sorted(dit.PRESETS)})
    attention: str = field(default="", metadata={"help": "override attention resolutions (feature-map sizes), e.g. 16,8, "
                                                 "or none ('' = preset's)"})
    T: int = field(default=1000, metadata={"help": "diffusion steps"})
    schedule: str = field(default="cosine", metadata={"help": "noise schedule", "choices": ["cosine", "linear"]})
    learn_sigma: bool = field(default=True, metadata={"help": "learned variance (Eq. 8)"})
    loss: str = field(default="hybrid", metadata={"help": "training loss", "choices": ["hybrid", "simple", "kl"]})
    train_respacing: str = field(default="", metadata={"help": "train on a respaced chain ('' = all T steps)"})
    t_tilt: float = field(default=4.0, metadata={"help": "training's t drawn with p(t) ~ 1 + tilt t/T (0: uniform, the paper)"})
    prediction: str = field(default="velocity", metadata={"help": "network output: eps (the paper) or velocity", "choices": ddpm.PREDICTIONS})
    steps: int = field(default=950, metadata={"help": "DDPM training steps"})
    batch: int = field(default=64, metadata={"help": "global batch size"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    lr_schedule: str = field(default="constant", metadata={"help": "after the warm-up: constant (improved DDPM) or a "
                                                           "cosine decay to 0 at --steps", "choices": ["constant", "cosine"]})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema: float = field(default=0.999, metadata={"help": "EMA decay"})
    ema_warmup: bool = field(default=True, metadata={"help": "EMA decay min(ema, (1+k)/(10+k)) at step k; off: the "
                                                      "plain decay from step 0 (the released configuration)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    precision: str = field(default="fp32", metadata={"help": "fp16 needs CUDA", "choices": ["fp32", "fp16", "bf16"]})
    log_every: int = field(default=50, metadata={"help": "steps between rows of train_log.csv"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    grid_every: int = field(default=1000, metadata={"help": "steps between EMA sample grids (0 = only at the end)"})
    # --- sampling ---
    sample_respacing: str = field(default="50", metadata={"help": "sampling steps, e.g. 50, 250, ddim50"})
    sampler: str = field(default="ddpm", metadata={"help": "reverse process", "choices": ["ddpm", "ddim"]})
    n_samples: int = field(default=256, metadata={"help": "samples per evaluation (the paper: 1000)"})
    sample_batch: int = field(default=256, metadata={"help": "images per sampling batch"})
    lambdas: str = field(default="120,120", metadata={"help": "multi-guidance weights, one per class (left,right; "
                                                 "corners: quadrants 0-3, row-major)"})
    lambda_sweep: str = field(default="", metadata={"help": "also evaluate these equal weights, e.g. 0,10,30,60 "
                                                     "(with --guidance free: 0,1,3,10,30 when not given)"})
    # --- classifier-free multi-guidance (App. J) ---
    guidance: str = field(default="classifier", metadata={
        "help": "classifier: unconditional DDPM + noisy classifier (Eq. 2); free (alias --cfg): a "
                "class-conditional DDPM, also sampled with classifier-free multi-guidance (App. J)",
        "choices": ["classifier", "free"]})
    label_dropout: float = field(default=0.1, metadata={"help": "with --guidance free: probability that a "
                                                        "training label becomes the null label (App. J)"})
    cfg_w: float = field(default=0.1, metadata={"help": "with --guidance free: also sample at the authors' "
                                                "classifier-free weight w, eps = -w eps(null) + (1 + w) mean_m eps(y_m)"})
    # --- noisy guidance classifier (Sec. 4.2, 5.5) ---
    clf: str = field(default="cpu", metadata={"help": "classifier preset in classifier.py",
                                              "choices": sorted(classifier.PRESETS)})
    clf_steps: int = field(default=300, metadata={"help": "classifier training steps"})
    clf_lr: float = field(default=3e-4, metadata={"help": "classifier AdamW learning rate"})
    clf_batch: int = field(default=64, metadata={"help": "classifier batch size"})
    spectral_norm: bool = field(default=False, metadata={"help": "spectral normalisation in the classifier (Sec. 5.5)"})
    runs: int = field(default=1, metadata={"help": "classifiers with different seeds, one DDPM (the paper: 10)"})
    heatmap_t: int = field(default=0, metadata={"help": "chain step of the classifier heatmap (Fig. 7b)"})
    regressor_steps: int = field(default=150, metadata={"help": "App. K evaluator: training steps of the centre "
                                                        "regressor on circles at every position (0 = none)"})
    # --- run control (not part of a run's identity) ---
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoints"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds another run"})
    stop_at: int = field(default=0, metadata={"help": "pause with a checkpoint after this DDPM step (0 = never); "
                                              "--resume continues to --steps"})
    force: bool = field(default=False, metadata={"help": "--paper on real images without a GPU: run anyway "
                                                 "(otherwise: print the time it would take, exit)"})
    # --- real images (--data celeba|folder|csv: real_images.py, Sec. 5.1-5.3) ---
    root: str = field(default="", metadata={"help": "--data celeba: the CelebA folder (img_align_celeba/, "
                                            "list_attr_celeba.txt, list_eval_partition.txt); --data folder: the "
                                            "folder of two class folders (sorted names: class 0, class 1)"})
    classes: str = field(default="", metadata={"help": "--data folder: the two class folders to use when --root "
                                               "holds more, e.g. cats,dogs ('' = the only two)"})
    csv: str = field(default="", metadata={"help": "--data csv: file of path,label[,split] rows (filter_data.py)"})
    attr: str = field(default="Smiling", metadata={"help": "--data celeba: the CelebA attribute (class 1 = present)"})
    subset: str = field(default="all", metadata={"help": "real images: extreme images kept by filter_data.py (auto: "
                                                 "35%% per side; Table 1: 60k ... 5k; digits: 700, 500, 300; all = "
                                                 "every survivor)", "choices": real_images.SUBSETS})
    filter_args: str = field(default="", metadata={"help": "real images: more filter_data.py flags, e.g. "
                                                   "'--steps 100 --width 8' (--paper passes its --paper)"})


# Options that may change when a run is resumed. --steps may grow: the learning rate does not
# depend on the total, so 2000 steps then 1000 more equal 3000 steps in one go. --runs and
# --lambda-sweep may grow too: more classifier seeds or guidance weights reuse the finished DDPM.
RUN_CONTROL = ("resume", "overwrite", "stop_at", "device", "threads", "out", "steps", "runs", "lambda_sweep",
               "force")

# Each data set: the toy_circles region of its training images, its classes, whether training flips images
# left-right (hflip; not digits: it negates their slant) and whether a flip swaps the label (a circle on the
# left becomes one on the right; a mirrored face keeps its smile: real_images.DATA).
DATA = {"circles": dict(region="train", classes=2, flip_swaps_label=True, hflip=True),  # Sec. 5.5: left / right
        "corners": dict(region="corners", classes=4, flip_swaps_label=True, hflip=True), **real_images.DATA}
CFG_SWEEP = "0,1,3,10,30"  # the lambda sweep of a --guidance free run when --lambda-sweep is not given

# The dataclass defaults are the circles CPU preset (950 DDPM steps, velocity, lambda = 120,120; why: docs/RESULTS.md).
PRESETS = {"circles": {},
           "corners": dict(lambdas="30,30,30,30", prediction="eps"),  # App. F's lambda; eps: velocity measured on circles only
           **real_images.PRESETS}
PAPER_PRESETS = {
    # Section 5.5 with the authors' released circles config: 64x64, 128 channels, mult 1,2,3,4, 3 res
    # blocks, attention at 16 and 8, T = 4000 cosine trained on the full chain, L_hybrid, AdamW 1e-4,
    # batch 64, fp16 with loss scaling, 30k steps, a plain EMA of 0.9999, no gradient clipping; sampling
    # respaced to 64 steps.
    "circles": dict(image_size=64, unet="paper", attention="16,8", T=4000, train_respacing="", t_tilt=0.0, prediction="eps", grad_clip=0.0,
                    ema_warmup=False, steps=30000, batch=64, lr=1e-4, warmup=0, ema=0.9999, precision="fp16",
                    sample_respacing="64", lambdas="30,30", ckpt_every=2000, grid_every=5000, log_every=200,
                    n_samples=1000, sample_batch=250, clf="paper", clf_steps=3000, clf_lr=3e-4, runs=10),
    **real_images.PAPER_PRESETS}
PAPER_PRESETS["corners"] = dict(PAPER_PRESETS["circles"], lambdas="30,30,30,30")  # same numbers, 4 classes
# --quick: a first complete result in minutes on a laptop CPU (fewer steps and samples, no App. K regressor).
QUICK_PRESETS = {"circles": dict(steps=600, clf_steps=200, regressor_steps=0, n_samples=128),
                 **real_images.QUICK_PRESETS}
QUICK_PRESETS["corners"] = dict(QUICK_PRESETS["circles"], lambdas="30,30,30,30")


def parse_config(argv=None):
    """Command line -> Config: --data picks a preset, --paper its GPU numbers, flags override both."""
    parser = plumbing.OneLineParser(description=__doc__.split("\n\n")[0])
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # defaults are written into each help
    parser.add_argument("--paper", action="store_true", help="the paper's configuration (for GPUs)")
    parser.add_argument("--quick", action="store_true", help="a first complete result in minutes on a CPU (rougher)")
    parser.add_argument("--print-config", action="store_true", help="print the fully resolved configuration as JSON "
                        "(networks and optimisers included) and exit")
    presets = {**PRESETS, **{f"--paper {d}": p for d, p in PAPER_PRESETS.items()},
               **{f"--quick {d}": p for d, p in QUICK_PRESETS.items()}}
    plumbing.add_dataclass_flags(parser, Config, presets, groups={"--paper": [f"--paper {d}" for d in PAPER_PRESETS],
                                                                  "--quick": [f"--quick {d}" for d in QUICK_PRESETS]})
    parser.add_argument("--cfg", action="store_const", const="free", dest="guidance", help="same as --guidance free")
    parser.add_argument("--variance", choices=["learned", "fixed"], default="learned", help="fixed: App. J's ablation, "
                        "the variance fixed at the posterior's beta~_t and L_simple (same as --no-learn-sigma --loss simple; "
                        "default: learned)")
    args = parser.parse_args(argv)
    if args.variance == "fixed":
        args.learn_sigma, args.loss = False, args.loss or "simple"
    if args.paper and args.quick:
        parser.error("--paper is the paper's configuration and --quick a rough CPU one: pass one of them")
    data = args.data or "circles"
    values = {**PRESETS[data], **(PAPER_PRESETS[data] if args.paper else QUICK_PRESETS[data] if args.quick else {})}
    values.update({k: v for k, v in vars(args).items() if v is not None and k not in ("paper", "quick", "print_config", "variance")})
    cfg = Config(**values)
    cfg.out = cfg.out or os.path.join("runs", data + ("_paper" if args.paper else "_quick" if args.quick else ""))
    check_config(cfg, parser, numbers_only=args.print_config)
    if args.print_config:
        print(json.dumps(resolved_config(cfg), indent=2))
        raise SystemExit(0)
    return cfg


def resolved_config(cfg):
    """Every number of a run, resolved: the Config, the denoiser's and the classifier's constructor
    arguments, and the optimisation settings of each network (fit.FitSettings)."""
    model_cfg = (dit.PRESETS[cfg.dit] if cfg.backbone == "dit" else
                 {**unet.PRESETS[cfg.unet], "image_size": cfg.image_size, "learn_sigma": cfg.learn_sigma,
                  **({"attention_resolutions": unet.parse_attention(cfg.attention, cfg.unet, cfg.image_size)}
                     if cfg.attention else {})})
    clf_cfg = {**classifier.PRESETS[cfg.clf], "image_size": cfg.image_size, "num_classes": DATA[cfg.data]["classes"]}
    clf_fit = fit_settings(cfg, steps=cfg.clf_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0, stream=1,
                           schedule="constant")
    return dict(config=dataclasses.asdict(cfg), denoiser=json.loads(json.dumps(model_cfg)),
                classifier=json.loads(json.dumps(clf_cfg)), ddpm_fit=dataclasses.asdict(fit_settings(cfg)),
                classifier_fit=dataclasses.asdict(clf_fit))


def identity(cfg):
    """The run's identity: every option that changes a result (not the run-control ones)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}


def identity_diff(old, new):
    """The keys of a run's identity `new` whose values differ in `old`; a key that an older run's record
    lacks counts as what the run did before the option existed: its Config default, or the paper's uniform t and eps."""
    defaults = {**{f.name: f.default for f in dataclasses.fields(Config)}, "t_tilt": 0.0, "prediction": "eps"}
    return sorted(k for k in new if old.get(k, defaults.get(k)) != new[k])


def check_config(cfg, parser, numbers_only=False):
    """Refuse numbers that cannot work, naming the flag; then (unless numbers_only, for --print-config) the
    output folder, the device and the input data."""
    ranges = {"T": (">= 2 (a chain needs two steps)", lambda v: v >= 2), "seed": (">= 0", lambda v: v >= 0),
              **dict.fromkeys(("steps", "batch", "image_size", "log_every", "ckpt_every", "n_samples",
                               "sample_batch", "clf_steps", "clf_batch", "runs", "lr", "clf_lr"), ("> 0", lambda v: v > 0)),
              **dict.fromkeys(("regressor_steps", "grid_every", "stop_at", "warmup", "weight_decay", "grad_clip",
                               "threads", "heatmap_t", "t_tilt"), (">= 0", lambda v: v >= 0)),
              **dict.fromkeys(("ema", "label_dropout"), ("in [0, 1)", lambda v: 0 <= v < 1))}
    for name, (wanted, ok) in ranges.items():
        if not ok(getattr(cfg, name)):
            parser.error(f"--{name.replace('_', '-')} must be {wanted}, got {getattr(cfg, name)}")
    if cfg.heatmap_t >= cfg.T:
        parser.error(f"--heatmap-t must be a chain step below --T {cfg.T}, got {cfg.heatmap_t}")
    for name in ("train_respacing", "sample_respacing"):  # '' = every step
        plumbing.vet(parser, f"--{name.replace('_', '-')}", ddpm.check_chain, cfg.T, getattr(cfg, name) or None)
    plumbing.vet(parser, "--T", ddpm.check_schedule, cfg.schedule, cfg.T)
    for name in ("lambdas", "lambda_sweep"):
        values = plumbing.vet(parser, f"--{name.replace('_', '-')}", plumbing.float_list, getattr(cfg, name))
        classes = DATA[cfg.data]["classes"]
        if name == "lambdas" and len(values) != classes:
            parser.error(f"--lambdas wants one weight per class ({classes} for {cfg.data}: "
                         f"{'left,right' if classes == 2 else 'the 4 quadrants'}), got {len(values)}")
    if cfg.backbone == "dit" and cfg.attention:
        parser.error("--attention sets U-Net attention resolutions; it does not apply to --backbone dit")
    if cfg.attention and cfg.backbone == "unet":
        plumbing.vet(parser, "--attention", unet.parse_attention, cfg.attention, cfg.unet, cfg.image_size)
    if cfg.classes and cfg.data != "folder":
        parser.error(f"--classes names two class folders of --data folder; --data {cfg.data} does not use it")
    if cfg.data in ("circles", "corners"):
        plumbing.vet(parser, "--image-size", toy_circles.check_size, cfg.image_size)
    elif cfg.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (the U-Net halves it three times), got {cfg.image_size}")
    if cfg.loss == "simple" and cfg.learn_sigma:
        parser.error("--loss simple trains no variance: add --no-learn-sigma, or use --loss hybrid")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if numbers_only:
        return
    plumbing.check_out_folder(cfg.out)
    estimated = cfg.data in real_images.DATA_NAMES and "paper" in (cfg.unet, cfg.clf)  # estimate, then refuse or fp32
    if cfg.precision == "fp16" and plumbing.check_device(cfg.device).type != "cuda" and not estimated:
        parser.error("--precision fp16 needs a CUDA device; use --precision bf16 or fp32 on the CPU")
    check_out(cfg)
    if cfg.data in real_images.DATA_NAMES:
        real_images.check(cfg, parser)


# ----------------------------------------------------------------------------------------------
# 3. The DDPM and 4. the classifiers (every network trains with fit.fit)
# ----------------------------------------------------------------------------------------------

def build_ddpm(cfg, **unet_overrides):
    """The denoiser and the training-time diffusion of a config, plus the dict that rebuilds the diffusion.

    unet_overrides: more U-Net keywords, e.g. in_channels=1 for grey images (generalization.py).
    With cfg.guidance "free" the denoiser is class-conditional (num_classes of cfg.data, App. J)."""
    num_classes = DATA[cfg.data]["classes"] if cfg.guidance == "free" else 0
    overrides = dict(image_size=cfg.image_size, learn_sigma=cfg.learn_sigma, num_classes=num_classes)
    if cfg.attention:
        overrides["attention_resolutions"] = unet.parse_attention(cfg.attention, cfg.unet, cfg.image_size)
    overrides.update(unet_overrides)
    if cfg.backbone == "dit":  # App. J: the same diffusion with a transformer denoiser
        model = dit.build_dit(cfg.dit, image_size=cfg.image_size, learn_sigma=cfg.learn_sigma, num_classes=num_classes)
    else:
        model = unet.build_unet(cfg.unet, **overrides)
    d = dict(schedule=cfg.schedule, T=cfg.T, learn_sigma=cfg.learn_sigma, loss=cfg.loss, respacing=cfg.train_respacing, prediction=cfg.prediction)
    return model, ddpm.diffusion_from_config(d), d


def fit_settings(cfg, **changes):
    """The DDPM's optimisation numbers of a config; keywords change them (for the other networks)."""
    s = fit.FitSettings(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, schedule=cfg.lr_schedule,
                        weight_decay=cfg.weight_decay, ema=cfg.ema, ema_warmup=cfg.ema_warmup, grad_clip=cfg.grad_clip,
                        precision=cfg.precision, seed=cfg.seed, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, stop_at=cfg.stop_at)
    return dataclasses.replace(s, **changes)


def train_ddpm(cfg, rt, images, labels=None):
    """The DDPM on the training images; writes ddpm.pt, logs/ddpm/ and EMA sample grids. Unconditional,
    or with cfg.guidance "free" class-conditional on `labels` with label dropout (App. J)."""
    torch.manual_seed(cfg.seed)
    model, diffusion, d = build_ddpm(cfg)
    if model.num_classes and labels is None:
        raise ValueError("a class-conditional DDPM (--guidance free) needs the training labels")
    if rt.main:
        name = f"DiT '{cfg.dit}'" if cfg.backbone == "dit" else f"U-Net '{cfg.unet}'"
        kind = (f"class-conditional ({model.num_classes} classes, label dropout {cfg.label_dropout:g}), "
                if model.num_classes else "")
        print(f"DDPM: {name} {unet.count_params(model):,} parameters, {kind}T = {cfg.T} {cfg.schedule}, "
              f"loss {cfg.loss}, {len(images)} training images of {cfg.image_size}x{cfg.image_size}")
    x0 = plumbing.to_tensor(images).to(rt.device)
    y = torch.as_tensor(labels).to(rt.device) if model.num_classes else None

    def on_step(step, ema_model):
        if (cfg.grid_every and step % cfg.grid_every == 0) or step == cfg.steps:
            x = multiguide.sample(ema_model, d, 16, respacing=cfg.sample_respacing, sampler=cfg.sampler,
                                  seed=cfg.seed, device=rt.device, progress=False)
            plumbing.save_grid(plumbing.to_uint8(x), os.path.join(cfg.out, "grids", f"ddpm_step{step:06d}.png"),
                               nrow=4, scale=max(1, 128 // cfg.image_size))
            ema_model.train(False)

    meta = dict(kind="ddpm", backbone=cfg.backbone, model_config=model.config, diffusion=d)
    loss_fn = fit.ddpm_loss(diffusion, x0, hflip=DATA[cfg.data]["hflip"], labels=y, label_dropout=cfg.label_dropout,
                            swap_labels=DATA[cfg.data]["flip_swaps_label"], t_tilt=cfg.t_tilt)
    model, ema, log = fit.fit(model, loss_fn, fit_settings(cfg), os.path.join(cfg.out, "ddpm.pt"), rt, meta,
                              identity(cfg), resume=cfg.resume, on_step=on_step, desc="DDPM")
    return ema, d, log


def train_classifier(cfg, rt, data, run_index):
    """Noisy classifier number `run_index` (seed = --seed + run_index): writes classifier{run}.pt."""
    seed = cfg.seed + run_index
    torch.manual_seed(seed)
    model = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, spectral_norm=cfg.spectral_norm,
                                        num_classes=DATA[cfg.data]["classes"])
    _, diffusion, d = build_ddpm(cfg)
    x0 = plumbing.to_tensor(data["images"]).to(rt.device)
    labels = torch.as_tensor(data["labels"]).to(rt.device)
    s = fit_settings(cfg, steps=cfg.clf_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0,
                     schedule="constant", seed=seed, stream=1, ckpt_every=max(cfg.clf_steps, 1), stop_at=0)
    loss_fn = fit.classifier_loss(diffusion, x0, labels, DATA[cfg.data]["flip_swaps_label"], DATA[cfg.data]["hflip"])
    model, _, log = fit.fit(model, loss_fn, s, os.path.join(cfg.out, f"classifier{run_index}.pt"), rt,
                            dict(kind="classifier", model_config=model.config, diffusion=d), identity(cfg),
                            resume=cfg.resume, desc=f"classifier {run_index}")
    if rt.main and log:
        print(f"classifier {run_index}: final loss {log[-1]['loss']:.4f}, noisy accuracy {log[-1]['acc']:.3f}")
    return model.eval(), log


def train_regressor(cfg, rt, data):
    """The App. K evaluator: the classifier network (preset cfg.clf) with 2 outputs regressing the
    centre (z_x, z_y) = (c + 0.5) / S of clean circles; `data` is a make_circles dict, normally region
    "all" (every position: an evaluator may see data the DDPM never saw, like the paper's evaluation
    classifier). cfg.regressor_steps steps at cfg.clf_batch and cfg.clf_lr; writes regressor.pt."""
    torch.manual_seed(cfg.seed)
    model = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, num_classes=2)
    x0 = plumbing.to_tensor(data["images"]).to(rt.device)
    targets = torch.as_tensor(toy_circles.normalized_x(data["centres"], cfg.image_size), dtype=torch.float32)
    meta = dict(kind="regressor", model_config=model.config, targets=["z_x", "z_y"])
    s = fit_settings(cfg, steps=cfg.regressor_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0, schedule="constant",
                     seed=cfg.seed, stream=2, ckpt_every=max(cfg.regressor_steps, 1), stop_at=0)
    model, _, log = fit.fit(model, fit.regressor_loss(x0, targets.to(rt.device)), s,
                            os.path.join(cfg.out, "regressor.pt"), rt, meta, identity(cfg), resume=cfg.resume,
                            desc="regressor")
    return model.eval(), log


def train_networks(cfg, rt, data, timings):
    """Steps 3 and 4: the DDPM and cfg.runs classifiers (and the App. K regressor on circles).
    Returns (EMA denoiser, diffusion dict, DDPM step, classifiers, regressor or None); None on the
    ranks other than 0 under DDP, and at --stop-at (a paused run has no samples yet)."""
    with plumbing.timed(timings, "ddpm_training_s"):
        ema, d, log = train_ddpm(cfg, rt, data["images"], data["labels"] if cfg.guidance == "free" else None)
    step = log[-1]["step"] if log else 0
    if rt.main and log:
        print(f"DDPM: final loss {log[-1]['loss']:.4f} ({log[-1]['img_per_s']:.0f} img/s)")
    if cfg.stop_at and step < cfg.steps:
        return None
    with plumbing.timed(timings, "classifier_training_s"):
        clfs = [train_classifier(cfg, rt, data, r)[0] for r in range(cfg.runs)]
    regressor = None
    if cfg.regressor_steps and cfg.data in ("circles", "corners"):  # App. K: the evaluator sees every position
        with plumbing.timed(timings, "regressor_training_s"):
            regressor, _ = train_regressor(cfg, rt, toy_circles.make_circles(cfg.image_size, "all"))
    if rt.world > 1:  # sampling and evaluation are cheap: rank 0 does them alone
        dist.barrier()
        if not rt.main:
            return None
    return ema.eval(), d, step, clfs, regressor


# ----------------------------------------------------------------------------------------------
# 5. Samples
# ----------------------------------------------------------------------------------------------

def draw_samples(cfg, rt, model, d, name, ddpm_step, clf=None, lambdas=(0.0, 0.0), guidance="classifier"):
    """cfg.n_samples images, uint8 (N, S, S, 3), multi-guided when lambdas != 0; writes samples/<name>.npz
    (atomically) and a grid of the first 64 as samples/<name>.png.

    guidance "classifier" guides with clf (Eq. 2); "free" with the class-conditional model itself (App. J).
    Under --resume, samples already drawn from the same DDPM step with the same weights are reused."""
    path = os.path.join(cfg.out, "samples", f"{name}.npz")
    old = np.load(path) if cfg.resume and os.path.exists(path) else None
    if old is not None and int(old["ddpm_step"]) == ddpm_step and list(old["lambdas"]) == list(lambdas):
        images = old["images"]
        plumbing.credit(float(old.get("seconds", 0.0)))  # the stage's time includes what drawing them took
    else:
        t0 = time.time()
        x = multiguide.sample(model, d, cfg.n_samples, classifier=clf if any(lambdas) and guidance == "classifier" else None,
                              lambdas=list(lambdas), respacing=cfg.sample_respacing, sampler=cfg.sampler,
                              batch=cfg.sample_batch, seed=cfg.seed + 1, device=rt.device, progress=True, guidance=guidance)
        images = plumbing.to_uint8(x)  # (N, S, S, 3)
        plumbing.write_npz(path, images=images, lambdas=np.array(lambdas), ddpm_step=ddpm_step, seconds=time.time() - t0)
    plumbing.save_grid(images[:64], os.path.join(cfg.out, "samples", f"{name}.png"), nrow=8,
                       scale=max(1, 64 // cfg.image_size))
    return images


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def sample_summary(stats):
    """The numbers of one sample set kept in results.json: accuracy, bad and centre-square fractions."""
    return dict(accuracy=stats["accuracy"], bad_fraction=stats["bad_fraction"], centre_fraction=stats["centre_fraction"])


def circle_samples(cfg, rt, model, d, name, ddpm_step, clf=None, lambdas=(0.0, 0.0), guidance="classifier"):
    """draw_samples, then the circle detector: evaluate.circle_stats of the samples."""
    return evaluate.circle_stats(draw_samples(cfg, rt, model, d, name, ddpm_step, clf, lambdas, guidance))


def guidance_sweep(cfg, rt, model, d, ddpm_step, clf):
    """One row per lambda of --lambda-sweep, the same lambda on every class: classifier multi-guidance
    (Eq. 2, classifier `clf`) and, in a --guidance free run, classifier-free multi-guidance (App. J) of
    the same DDPM under "free" (a free run without --lambda-sweep sweeps CFG_SWEEP). In a free run the
    classifier guides the null-label model, the DDPM's unconditional half: both columns share one network."""
    rows, classes = [], DATA[cfg.data]["classes"]
    for lam in plumbing.float_list(cfg.lambda_sweep or (CFG_SWEEP if cfg.guidance == "free" else "")):
        stats = circle_samples(cfg, rt, model, d, f"sweep_lambda{lam:g}", ddpm_step, clf, (lam,) * classes)
        rows.append(dict(lam=lam, **sample_summary(stats)))
        line = f"lambda {lam:g}: accuracy {stats['accuracy']:.3f}, bad {stats['bad_fraction']:.3f}"
        if cfg.guidance == "free":
            free = circle_samples(cfg, rt, model, d, f"cfg_lambda{lam:g}", ddpm_step, None, (lam,) * classes,
                                  guidance="free")
            rows[-1]["free"] = sample_summary(free)
            line += f" | classifier-free: accuracy {free['accuracy']:.3f}, bad {free['bad_fraction']:.3f}"
        print(line)
    return rows


def released_cfg(cfg, rt, model, d, ddpm_step):
    """A --guidance free run sampled at the authors' classifier-free weight w = cfg.cfg_w (App. J; the
    released sampler, multiguide.cfg_output), drawn through the lambda form it equals exactly:
    lambda_m = (1 + w) / M on each of the M classes (multiguide.cfg_w_lambdas)."""
    lam = multiguide.cfg_w_lambdas(cfg.cfg_w, DATA[cfg.data]["classes"])
    stats = circle_samples(cfg, rt, model, d, f"cfg_w{cfg.cfg_w:g}", ddpm_step, None, tuple(lam), guidance="free")
    print(f"classifier-free at w = {cfg.cfg_w:g} (lambda {lam[0]:g} per class): accuracy {stats['accuracy']:.3f}, "
          f"bad {stats['bad_fraction']:.3f}")
    return dict(w=cfg.cfg_w, lambdas=lam, **sample_summary(stats))


# ----------------------------------------------------------------------------------------------
# The circles and corners experiments (Sec. 5.5, App. F)
# ----------------------------------------------------------------------------------------------

def run_circles(cfg, rt):
    """Steps 2-7 for circles and corners; returns the results dict (None on other DDP ranks or when paused)."""
    timings, t_start = {}, time.time()
    with plumbing.timed(timings, "data_s"):
        data = toy_circles.make_circles(cfg.image_size, DATA[cfg.data]["region"])
        if rt.main:
            plumbing.save_grid(data["images"][::max(1, len(data["images"]) // 64)][:64],
                               os.path.join(cfg.out, "figures", "training_data.png"), nrow=8,
                               scale=max(1, 64 // cfg.image_size))
    trained = train_networks(cfg, rt, data, timings)
    if trained is None:
        return None
    ema, d, ddpm_step, clfs, regressor = trained
    with plumbing.timed(timings, "unguided_sampling_s"):
        uncond = circle_samples(cfg, rt, ema, d, "unconditional", ddpm_step)
    runs = []
    with plumbing.timed(timings, "guided_sampling_s"):
        for r, clf in enumerate(clfs):
            runs.append(circle_samples(cfg, rt, ema, d, f"guided_run{r}", ddpm_step, clf, plumbing.float_list(cfg.lambdas)))
            centre = f", centre square {runs[-1]['centre_fraction']:.3f}" if cfg.data == "corners" else ""
            print(f"run {r}: accuracy {runs[-1]['accuracy']:.3f}, bad {runs[-1]['bad_fraction']:.3f}{centre}")
    with plumbing.timed(timings, "sweep_sampling_s"):
        sweep = guidance_sweep(cfg, rt, ema, d, ddpm_step, clfs[0])
        free_w = released_cfg(cfg, rt, ema, d, ddpm_step) if cfg.guidance == "free" else None
    with plumbing.timed(timings, "evaluation_s"):
        results = circles_results(cfg, data, ema, d, clfs, regressor, uncond, runs, sweep)
    timings["total_s"] = time.time() - t_start + timings.get("credited_s", 0.0)  # + earlier processes' share
    return dict(results, timings_s=timings, **({"cfg_w": free_w} if free_w else {}))


def circles_results(cfg, data, ema, d, clfs, regressor, uncond, runs, sweep):
    """Step 6: the numbers and the arrays behind the figures of a circles/corners run."""
    xs, ys, p = classifier.heatmap(clfs[0], ddpm.diffusion_from_config(d), cfg.image_size, t=cfg.heatmap_t,
                                   seed=cfg.seed)
    heat = classifier.heatmap_summary(xs, p, cfg.image_size)
    one = [np.asarray(s["n_circles"]) == 1 for s in runs]
    evaluate.write_circles_csv(runs[0], os.path.join(cfg.out, "samples", "guided_run0.csv"))
    images = np.load(os.path.join(cfg.out, "samples", "guided_run0.npz"))["images"]
    regression = None
    if regressor is not None:  # App. K: the regressor's z_x of guided run 0 against the detector's
        regression = evaluate.regressor_vs_detector(evaluate.regressor_scores(regressor, images), runs[0])
    memo = evaluate.memorization_check(images, data, clfs[0], runs[0],
                                       os.path.join(cfg.out, "figures", "memorization_pairs.png"))
    print(f"memorization (App. H), guided run 0: near-copies {memo['near_copy_fraction']:.1%}, centre on a "
          f"training centre {memo['on_training_centre_fraction']:.1%} (middle band: "
          f"{memo['middle_on_training_centre']} of {memo['n_middle']})")
    kinds = {name: evaluate.bad_kinds(np.load(os.path.join(cfg.out, "samples", f"{name}.npz"))["images"])
             for name in ("guided_run0", "unconditional")}
    figures = dict(centre_z=[float(z) for s, o in zip(runs, one) for z in np.asarray(s["z"])[o]],
                   centre_cx=[float(v) for s in runs for v in s["cx"]], centre_cy=[float(v) for s in runs for v in s["cy"]],
                   heatmap=dict(xs=xs.tolist(), ys=ys.tolist(), p=p.tolist()))
    return dict(data=cfg.data, guidance=cfg.guidance, memorization=memo,
                accuracy=mean_std([s["accuracy"] for s in runs]), bad_fraction=mean_std([s["bad_fraction"] for s in runs]),
                centre_fraction=mean_std([s["centre_fraction"] for s in runs]),
                per_run=[sample_summary(s) for s in runs], unconditional=sample_summary(uncond), regressor=regression,
                lambdas=plumbing.float_list(cfg.lambdas), lambda_sweep=sweep,
                heatmap=dict(middle_mean_p=heat["middle_mean_p"], transition_width=heat["transition_width"]),
                figures=figures, paper=report.PAPER_CIRCLES, bad_kinds=kinds, flops_per_image=network_flops(cfg, ema, clfs[0]))


def network_flops(cfg, denoiser, clf):
    """Forward FLOPs per image of the denoiser and the guidance classifier (for the run's profile)."""
    channels = denoiser.config.get("in_channels", 3)
    return dict(denoiser=plumbing.forward_flops(denoiser, cfg.image_size, channels),
                classifier=plumbing.forward_flops(clf, cfg.image_size, channels))


# ----------------------------------------------------------------------------------------------
# Real images (Sec. 5.1-5.3): the same stages around real_images.py's filter and judge
# ----------------------------------------------------------------------------------------------

def run_real_images(cfg, rt):
    """Filter -> DDPM -> classifier(s) -> guided + unconditional samples -> the judge's histograms."""
    timings, t_start = {}, time.time()
    with plumbing.timed(timings, "filter_s"):
        fout = real_images.run_filter(cfg, rt)
        data = real_images.training_set(cfg, fout)
    per_class = np.bincount(data["labels"], minlength=2).tolist()
    if rt.main:
        pick = np.concatenate([np.flatnonzero(data["labels"] == c)[:32] for c in (0, 1)])
        plumbing.save_grid(data["images"][pick], os.path.join(cfg.out, "figures", "training_data.png"), nrow=8,
                           scale=max(1, 64 // cfg.image_size))
        print(f"{cfg.data}: {len(data['labels'])} training images, {per_class} per class {data['class_names']}")
    trained = train_networks(cfg, rt, data, timings)
    if trained is None:
        return None
    ema, d, ddpm_step, clfs, _ = trained
    draw = lambda name, clf=None, lambdas=(0.0, 0.0): draw_samples(cfg, rt, ema, d, name, ddpm_step, clf, lambdas)  # noqa: E731
    with plumbing.timed(timings, "sampling_and_scoring_s"):
        rows, memo, sets = real_images.sample_rows(cfg, rt, draw, clfs, data, fout)
    extra = real_images.extra_results(cfg, rt, sets, fout, rows, timings)  # digits: the exact slant
    timings["total_s"] = time.time() - t_start + timings.get("credited_s", 0.0)  # + earlier processes' share
    return dict(data=cfg.data, attr=real_images.attribute_name(cfg, data["class_names"]), subset=cfg.subset,
                class_names=data["class_names"], memorization=memo, training_per_class=per_class, rows=rows,
                lambdas=plumbing.float_list(cfg.lambdas), filter_out=fout, evaluation_classifier=real_images.judge_summary(fout),
                filter=real_images.filter_summary(fout), **extra,
                timings_s=timings, paper={k: {s: list(v) for s, v in t.items()} for k, t in real_images.PAPER_FACES.items()},
                flops_per_image=network_flops(cfg, ema, clfs[0]))


# ----------------------------------------------------------------------------------------------
# The run: one folder, one lock, results.json, report.md
# ----------------------------------------------------------------------------------------------

def check_out(cfg):
    """Never mix two runs in one folder (checked before anything is written). A run there (config.json) needs
    --resume (same configuration) or --overwrite (start afresh), unless it stopped before its DDPM with these
    very settings (bad input data, say): then the same command starts again. --resume needs a run."""
    config_path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(config_path):
        if cfg.resume:
            raise SystemExit(f"train.py: --resume: {cfg.out} holds no run to continue (no config.json); "
                             f"drop --resume to start one")
        return
    old = plumbing.read_json(config_path, "run record", obj=True)
    unstarted = not os.path.exists(os.path.join(cfg.out, "ddpm.pt")) and not identity_diff(old, identity(cfg))
    if not (cfg.resume or cfg.overwrite or unstarted):
        raise SystemExit(f"train.py: --out {cfg.out} already holds a run (config.json); pass --resume to "
                         f"continue it, --overwrite to start afresh, or choose another --out")
    if cfg.resume:
        if cfg.lr_schedule == "cosine" and old.get("steps") != cfg.steps:
            raise SystemExit(f"train.py: cannot --resume {cfg.out} with --steps {cfg.steps}: its cosine learning-rate "
                             f"schedule ends at step {old.get('steps')}")
        diff = identity_diff(old, identity(cfg))
        if diff:
            raise SystemExit(f"train.py: cannot --resume {cfg.out}: its run used other values for "
                             f"{', '.join('--' + k.replace('_', '-') for k in diff)}")


def prepare_out(cfg):
    """Create --out and write the run's config.json (check_out has vetted the folder)."""
    os.makedirs(cfg.out, exist_ok=True)
    plumbing.write_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))


def run(cfg, experiment):
    """Set up the process(es), lock and prepare --out, run experiment(cfg, rt), write results.json and
    report.md on rank 0, tear DDP down. Returns the results (None on other ranks or when paused)."""
    rt = fit.setup_runtime(cfg.device, cfg.threads)
    with plumbing.RunLock(cfg.out) if rt.main else contextlib.nullcontext():
        if rt.main:
            prepare_out(cfg)
            print(f"zsi | data {cfg.data} | out {os.path.abspath(cfg.out)} | device {rt.device} x{rt.world} | "
                  f"precision {cfg.precision}")
        if rt.world > 1:
            dist.barrier()
        results = experiment(cfg, rt)
        if results is not None:
            command = shlex.join(["python", os.path.basename(sys.argv[0]), *sys.argv[1:]])
            results = dict(results, config=dataclasses.asdict(cfg), command=command, out=cfg.out, device=str(rt.device),
                           runs=cfg.runs, n_samples=cfg.n_samples, sample_respacing=cfg.sample_respacing,
                           sampler=cfg.sampler, chain_steps=len(ddpm.space_timesteps(cfg.T, cfg.sample_respacing)))
            results["profile"] = report.profile(results)
            plumbing.write_json(results, os.path.join(cfg.out, "results.json"))
            report.render(cfg.out)
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return results


def cost_estimate(cfg, denoiser, at_batch_1=False):
    """(seconds, {stage: seconds}) of a fresh run on this CPU: fit.seconds_per_image of each network (after a
    warm-up step) at the run's batch sizes, or at batch 1 for the paper's networks (an order of magnitude),
    times its steps and samples; for real images also the filter (real_images.filter_seconds)."""
    plumbing.set_threads(cfg.threads)
    s, b = cfg.image_size, (lambda n: 1) if at_batch_1 else (lambda n: n)
    clf = classifier.build_classifier(cfg.clf, image_size=s, num_classes=DATA[cfg.data]["classes"])
    guided, chain = cfg.runs + len(plumbing.float_list(cfg.lambda_sweep)), len(ddpm.space_timesteps(cfg.T, cfg.sample_respacing))
    clf_steps, n = cfg.runs * cfg.clf_steps + cfg.regressor_steps * (cfg.data in ("circles", "corners")), b(min(cfg.sample_batch, cfg.n_samples))
    parts = {"DDPM": cfg.steps * cfg.batch * fit.seconds_per_image(denoiser, s, b(cfg.batch)),
             "classifier": clf_steps * cfg.clf_batch * fit.seconds_per_image(clf, s, b(cfg.clf_batch)),  # ~ a guidance gradient
             "sampling": cfg.n_samples * chain * ((1 + guided) * fit.seconds_per_image(denoiser, s, n, train=False)
                                                  + guided * fit.seconds_per_image(clf, s, n))}
    if cfg.data in real_images.DATA_NAMES:
        parts["filter"] = real_images.filter_seconds(cfg, at_batch_1)
    return sum(parts.values()), parts


def main(argv=None):
    cfg = parse_config(argv)
    real = cfg.data in real_images.DATA_NAMES
    if real:  # without a GPU: say what the CPU preset is; the paper's networks get an estimate first
        real_images.check_hardware(cfg, lambda: cost_estimate(cfg, build_ddpm(cfg)[0], at_batch_1=True))
        if cfg.precision == "fp16" and cfg.force and plumbing.check_device(cfg.device).type != "cuda":
            print("--force on the CPU: --precision fp16 needs CUDA; using fp32")
            cfg.precision = "fp32"
    if plumbing.check_device(cfg.device).type == "cpu" and not (cfg.resume or cfg.stop_at or "paper" in (cfg.unet, cfg.clf)
                                                             or int(os.environ.get("RANK", 0))):  # a fresh CPU run
        print(f"expected time on this CPU: about {real_images.duration(cost_estimate(cfg, build_ddpm(cfg)[0])[0])}")
    r = run(cfg, run_real_images if real else run_circles)
    if r is None and cfg.stop_at:
        argv = sys.argv[1:] if argv is None else list(argv)
        keep = [a for i, a in enumerate(argv) if a != "--stop-at" and (i == 0 or argv[i - 1] != "--stop-at")
                and not a.startswith("--stop-at=")]
        print(f"paused at step {cfg.stop_at} (--stop-at): continue with: "
              f"{shlex.join(['python', 'train.py', *keep, *([] if '--resume' in keep else ['--resume'])])}")
    elif r is not None:
        print(f"report: {os.path.join(cfg.out, 'report.md')}")
        print(real_images.headline(r) if real else report.circles_headline(r))
    return r


if __name__ == "__main__":
    plumbing.guard(main, resume_flag="--resume")
