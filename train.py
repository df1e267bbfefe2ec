"""train.py -- the one trainer and the experiment it runs.

What this file is
    1. A configuration (one dataclass; `--data circles` picks a named preset, `--paper` switches
       every number to the paper's configuration for GPUs; both share every line of code).
    2. The one training loop, `fit`, used for the DDPM and for the noisy classifier alike: fixed
       number of steps, AdamW with linear warm-up, EMA, gradient clipping, mixed precision,
       DistributedDataParallel under torchrun, atomic self-describing checkpoints and exact resume.
    3. The circles experiment of the paper's Section 5.5: data -> DDPM -> noisy classifier(s) ->
       multi-guided and unconditional sampling -> evaluation -> report.md. Variants by flag, on the
       same code: `--guidance free` (alias `--cfg`) trains a class-conditional DDPM with label
       dropout and adds classifier-free multi-guidance (App. J) to the lambda sweep; `--data corners`
       is the two-variable experiment (App. F: four corner squares, 4 classes, the unseen centre
       square); a centre regressor (App. K) scores the guided samples beside the circle detector.

Run it
    python train.py --data circles                      # CPU preset, writes runs/circles/
    python train.py --data circles --paper              # the paper's configuration (GPU)
    python train.py --data circles --cfg --out runs/cfg # classifier-free vs classifier, lambda 0..30
    python train.py --data corners                      # two variables, writes runs/corners/
    python train.py --data celeba --attr Smiling --root R   # faces, Sec. 5.1-5.3 (section "Faces" below)
    torchrun --nproc_per_node 2 train.py --data circles # several processes / GPUs
    python train.py --help                              # every option, with its default

Threads
    One process uses min(8, cores) threads (cores / processes under torchrun). If another busy
    process shares the CPU, `export OMP_WAIT_POLICY=PASSIVE` first: spinning OpenMP threads were
    12x slower in an earlier probe. Alone, PASSIVE measured 1.47x slower here (200 training steps
    of the CPU preset: 49.3 s against 33.5 s), so it is not forced.

Reproducibility
    Every random draw of training step k on rank r comes from generators seeded with
    (seed, stream, r, k). A resumed run therefore continues bit for bit without storing generator
    states, on one process or many. Model initialisation is seeded with --seed.
"""
import argparse
import copy
import dataclasses
import functools
import io
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field


import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import classifier
import ddpm
import dit
import evaluate
import filter_data
import multiguide
import toy_circles
import unet


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    """Every number of a run. Defaults are the CPU circles preset; PAPER_PRESETS holds the paper's."""
    data: str = field(default="circles", metadata={"help": "data set preset: circles (Sec. 5.5), corners "
                                                   "(two variables, App. F), celeba (faces, Sec. 5.1-5.3), or "
                                                   "your own labelled images: folder (--root with two class "
                                                   "folders) or csv (--csv of path,label[,split])",
                                                   "choices": ["circles", "corners", "celeba", "folder", "csv"]})
    out: str = field(default="", metadata={"help": "output folder (default runs/<data>)"})
    seed: int = field(default=0, metadata={"help": "fixes data order, noise, initialisation, sampling"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0: all cores, at most 8)"})
    # --- data ---
    image_size: int = field(default=32, metadata={"help": "circles are drawn at 64 and scaled (toy_circles.py)"})
    # --- DDPM (App. A, C) ---
    backbone: str = field(default="unet", metadata={"help": "denoiser: the U-Net (unet.py) or a transformer "
                                                     "(dit.py, App. J)", "choices": ["unet", "dit"]})
    unet: str = field(default="cpu", metadata={"help": "U-Net preset in unet.py", "choices": sorted(unet.PRESETS)})
    dit: str = field(default="cpu", metadata={"help": "DiT preset in dit.py (with --backbone dit)",
                                              "choices": sorted(dit.PRESETS)})
    attention: str = field(default="", metadata={"help": "override attention resolutions, e.g. 16,8"})
    T: int = field(default=1000, metadata={"help": "diffusion steps"})
    schedule: str = field(default="cosine", metadata={"help": "noise schedule", "choices": ["cosine", "linear"]})
    learn_sigma: bool = field(default=True, metadata={"help": "learned variance (Eq. 8)"})
    loss: str = field(default="hybrid", metadata={"help": "training loss", "choices": ["hybrid", "simple", "kl"]})
    train_respacing: str = field(default="", metadata={"help": "train on a respaced chain ('' = all T steps)"})
    steps: int = field(default=3000, metadata={"help": "DDPM training steps"})
    batch: int = field(default=64, metadata={"help": "global batch size"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    warmup: int = field(default=100, metadata={"help": "linear learning-rate warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    ema: float = field(default=0.999, metadata={"help": "EMA decay (with warm-up: min(ema, (1+k)/(10+k)))"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    precision: str = field(default="fp32", metadata={"help": "fp16 needs CUDA", "choices": ["fp32", "fp16", "bf16"]})
    log_every: int = field(default=50, metadata={"help": "steps between log lines"})
    ckpt_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    grid_every: int = field(default=1000, metadata={"help": "steps between EMA sample grids (0 = only at the end)"})
    # --- sampling ---
    sample_respacing: str = field(default="50", metadata={"help": "sampling steps, e.g. 50, 250, ddim50"})
    sampler: str = field(default="ddpm", metadata={"help": "reverse process", "choices": ["ddpm", "ddim"]})
    n_samples: int = field(default=256, metadata={"help": "samples per evaluation (the paper: 1000)"})
    sample_batch: int = field(default=128, metadata={"help": "images per sampling batch"})
    lambdas: str = field(default="30,30", metadata={"help": "multi-guidance weights, one per class (left,right; "
                                                 "corners: quadrants 0-3, row-major)"})
    lambda_sweep: str = field(default="", metadata={"help": "also evaluate these equal weights, e.g. 0,10,30,60 "
                                                     "(with --guidance free: default 0,1,3,10,30, both guidances)"})
    # --- classifier-free multi-guidance (App. J) ---
    guidance: str = field(default="classifier", metadata={
        "help": "classifier: unconditional DDPM + noisy classifier (Eq. 2); free (alias --cfg): a "
                "class-conditional DDPM, also sampled with classifier-free multi-guidance (App. J)",
        "choices": ["classifier", "free"]})
    label_dropout: float = field(default=0.1, metadata={"help": "with --guidance free: probability that a "
                                                        "training label becomes the null label (App. J)"})
    # --- noisy guidance classifier (Sec. 4.2, 5.5) ---
    clf: str = field(default="cpu", metadata={"help": "classifier preset in classifier.py", "choices": sorted(classifier.PRESETS)})
    clf_steps: int = field(default=500, metadata={"help": "classifier training steps"})
    clf_lr: float = field(default=3e-4, metadata={"help": "classifier AdamW learning rate"})
    clf_batch: int = field(default=64, metadata={"help": "classifier batch size"})
    spectral_norm: bool = field(default=False, metadata={"help": "spectral normalisation in the classifier (Sec. 5.5)"})
    runs: int = field(default=1, metadata={"help": "classifiers with different seeds, one DDPM (the paper: 10)"})
    heatmap_t: int = field(default=0, metadata={"help": "chain step of the classifier heatmap (Fig. 7b)"})
    regressor_steps: int = field(default=500, metadata={"help": "App. K evaluator: training steps of the centre "
                                                        "regressor on circles at every position (0 = none)"})
    # --- run control (not part of a run's identity) ---
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoints"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds another run"})
    stop_at: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this step; 0 = never"})
    force: bool = field(default=False, metadata={"help": "--data celeba|folder|csv: run the paper's configuration "
                                                 "even without a GPU (otherwise: print the time it would take, exit)"})
    # --- faces (--data celeba|folder|csv, Sec. 5.1-5.3; see the section "Faces" at the end of this file) ---
    root: str = field(default="", metadata={"help": "--data celeba: CelebA folder (img_align_celeba/, "
                                            "list_attr_celeba.txt, list_eval_partition.txt); --data folder: the "
                                            "folder of two class folders (sorted names: class 0, class 1)"})
    csv: str = field(default="", metadata={"help": "--data csv: file of path,label[,split] rows (filter_data.py)"})
    attr: str = field(default="Smiling", metadata={"help": "--data celeba: the CelebA attribute (class 1 = present)"})
    subset: str = field(default="all", metadata={"help": "--data celeba|folder|csv: extreme images kept by filter_data.py "
                                                 "(Table 1: 60k, 30k, 10k, 5k; all = every survivor)",
                                                 "choices": ["all", "60k", "30k", "10k", "5k"]})
    filter_args: str = field(default="", metadata={"help": "--data celeba|folder|csv: more filter_data.py flags, e.g. "
                                                   "'--steps 100 --width 8' (--paper passes its --paper)"})


# Options that may change when a run is resumed. --steps may grow: the learning rate does not
# depend on the total, so 2000 steps then 1000 more equal 3000 steps in one go. --runs and
# --lambda-sweep may grow too: more classifier seeds or guidance weights reuse the finished DDPM.
RUN_CONTROL = ("resume", "overwrite", "stop_at", "device", "threads", "out", "steps", "runs", "lambda_sweep",
               "force")

# Each data set: the toy_circles region of its training images and its number of classes.
DATA = {"circles": dict(region="train", classes=2),     # Sec. 5.5: left / right bands
        "corners": dict(region="corners", classes=4),   # App. F: four corner squares, label = quadrant
        "celeba": dict(region=None, classes=2, flip_swaps_label=False),  # Sec. 5.1: a mirrored smile is a smile
        "folder": dict(region=None, classes=2, flip_swaps_label=False),  # your images: a flip keeps the class
        "csv": dict(region=None, classes=2, flip_swaps_label=False)}
FACE_DATA = ("celeba", "folder", "csv")  # labelled images through filter_data.py (the "Faces" section)
# flip_swaps_label (default True): a left-right flip turns a circle on the left into one on the right,
# so the classifier's flips toggle the label; a flipped face keeps its label (and so, we assume, does
# an image of your own classes: pass --data folder images whose class survives a mirror).
CFG_SWEEP = "0,1,3,10,30"  # the lambda sweep of a --guidance free run when --lambda-sweep is not given

PRESETS = {"circles": {},  # the dataclass defaults are the circles CPU preset
           "corners": dict(lambdas="30,30,30,30")}  # App. F: "lambda = 30 across all classes"
PAPER_PRESETS = {
    # Section 5.5 with the authors' released circles config (PAPER_FACTS.md): 64x64, 128 channels,
    # mult 1,2,3,4, 3 res blocks, attention at 16 and 8, T = 4000 cosine respaced to 250 steps for
    # training, L_hybrid, AdamW 1e-4, batch 64, fp16, 30k steps, EMA 0.9999; 64 sampling steps.
    "circles": dict(image_size=64, unet="paper", attention="16,8", T=4000, train_respacing="250",
                    steps=30000, batch=64, lr=1e-4, warmup=0, ema=0.9999, precision="fp16",
                    sample_respacing="64", ckpt_every=2000, grid_every=5000, log_every=200,
                    n_samples=1000, sample_batch=250, clf="paper", clf_steps=3000, clf_lr=3e-4, runs=10),
}
PAPER_PRESETS["corners"] = dict(PAPER_PRESETS["circles"], lambdas="30,30,30,30")  # same numbers, 4 classes
# Faces (Sec. 5.1). CPU: a SMOKE-SCALE run (runs end to end on a laptop; not a reproduction): the
# "cpu" U-Net and classifier at 64x64 (pixel-unshuffle stem: they run at 32, 16, 8), 500 DDPM steps.
PRESETS["celeba"] = dict(image_size=64, steps=500, batch=16, log_every=25, ckpt_every=100, grid_every=0,
                         clf_steps=200, clf_batch=32, n_samples=256, regressor_steps=0)
# GPU: App. C (250k DDPM steps, lr 1e-4, no weight decay, EMA 0.9999, T = 4000 cosine, L_hybrid, learned
# variance, 3 res blocks, attention at 32, 16, 8; classifier 150k steps at lr 3e-4), 10k samples with 250
# respaced steps (Sec. 5.1, App. C), the 60k subset (Sec. 5.1). Batch 64 and fp16 are the circles'
# released config (App. C gives no batch size); filter_data.py gets its own --paper.
PAPER_PRESETS["celeba"] = dict(image_size=64, unet="paper", T=4000, steps=250000, batch=64, lr=1e-4, warmup=0,
                               ema=0.9999, precision="fp16", sample_respacing="250", ckpt_every=5000,
                               grid_every=25000, log_every=500, n_samples=10000, sample_batch=250, clf="paper",
                               clf_steps=150000, clf_lr=3e-4, runs=1, regressor_steps=0, subset="60k",
                               filter_args="--paper")
for _name in ("folder", "csv"):  # your own labelled images: the faces' numbers
    PRESETS[_name], PAPER_PRESETS[_name] = PRESETS["celeba"], PAPER_PRESETS["celeba"]


def parse_config(argv=None):
    """Command line -> Config: --data picks a preset, --paper its GPU numbers, flags override both."""
    parser = ddpm.OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--paper", action="store_true", help="the paper's configuration (for GPUs)")
    for f in dataclasses.fields(Config):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=None, **meta)
    parser.add_argument("--cfg", action="store_const", const="free", dest="guidance", help="same as --guidance free")
    args = parser.parse_args(argv)
    values = {**PRESETS[args.data or "circles"], **(PAPER_PRESETS[args.data or "circles"] if args.paper else {})}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "paper"})
    cfg = Config(**values)
    cfg.out = cfg.out or os.path.join("runs", cfg.data + ("_paper" if args.paper else ""))
    check_config(cfg, parser)
    return cfg


def identity_diff(old, new):
    """The keys of a run's identity `new` whose values differ in `old`; a key that an older run's record
    lacks counts as its Config default (an option added later changes nothing at its default)."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    return sorted(k for k in new if old.get(k, defaults.get(k)) != new[k])


def parse_floats(text):
    """'30,30' -> [30.0, 30.0]; '' -> []."""
    return [float(v) for v in text.split(",")] if text.strip() else []


def check_config(cfg, parser):
    """Refuse numbers that cannot work, naming the flag."""
    positive = ["steps", "batch", "T", "image_size", "log_every", "ckpt_every", "n_samples", "sample_batch",
                "clf_steps", "clf_batch", "runs"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.regressor_steps < 0:
        parser.error(f"--regressor-steps must be >= 0 (0 = no regressor), got {cfg.regressor_steps}")
    if not 0.0 <= cfg.label_dropout < 1.0:
        parser.error(f"--label-dropout must be in [0, 1), got {cfg.label_dropout}")
    if not 0.0 <= cfg.ema < 1.0:
        parser.error(f"--ema must be in [0, 1), got {cfg.ema}")
    if cfg.lr <= 0:
        parser.error(f"--lr must be positive, got {cfg.lr}")
    for name in ("train_respacing", "sample_respacing"):
        spec = getattr(cfg, name)
        if spec:
            try:
                ddpm.space_timesteps(cfg.T, spec)
            except ValueError as e:
                parser.error(f"--{name.replace('_', '-')}: {e}")
    for name in ("lambdas", "lambda_sweep"):
        try:
            values = parse_floats(getattr(cfg, name))
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} wants comma-separated numbers, got {getattr(cfg, name)!r}")
        classes = DATA[cfg.data]["classes"]
        if name == "lambdas" and len(values) != classes:
            parser.error(f"--lambdas wants one weight per class ({classes} for {cfg.data}: "
                         f"{'left,right' if classes == 2 else 'the 4 quadrants'}), got {len(values)}")
    if cfg.backbone == "dit" and cfg.attention:
        parser.error("--attention sets U-Net attention resolutions; it does not apply to --backbone dit")
    if os.path.isfile(cfg.out):
        parser.error(f"--out {cfg.out} is a file; expected a folder")
    if cfg.data in FACE_DATA:
        check_faces(cfg, parser)


# ----------------------------------------------------------------------------------------------
# Processes, devices, checkpoints
# ----------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    """Where this process runs: rank and world size under torchrun, and the device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_runtime(cfg):
    """Pick the device; join the process group when started by torchrun (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.threads or not torch.cuda.is_available():
        # Never more threads than cores across the processes of this machine: oversubscribed
        # OpenMP threads spin against each other (an earlier probe was 12x slower that way).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cfg.threads or max(1, min(8, (os.cpu_count() or 1) // local)))
    rank = int(os.environ.get("RANK", "0"))
    wanted = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("train.py: --device cuda asked for, but no CUDA device is available; use --device cpu")
    device = torch.device(wanted)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.precision == "fp16" and device.type != "cuda":
        raise SystemExit("train.py: --precision fp16 needs a CUDA device; use --precision bf16 or fp32 on the CPU")
    return Runtime(rank, world, device)


def step_generator(seed, stream, rank, step, device):
    """The generator for one training step: every draw of step k on rank r is a function of (seed, stream, r, k)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + stream) * 1_009 + rank) * 10_000_019 + step)
    return g


# ----------------------------------------------------------------------------------------------
# The one training loop
# ----------------------------------------------------------------------------------------------

@dataclass
class FitSettings:
    """The optimisation numbers `fit` needs (a DDPM and a classifier each get their own)."""
    steps: int
    batch: int
    lr: float
    warmup: int = 0
    weight_decay: float = 0.0
    ema: float = 0.0            # 0 = no EMA copy
    grad_clip: float = 1.0
    precision: str = "fp32"
    seed: int = 0
    stream: int = 0             # separates the random streams of models trained with the same seed
    log_every: int = 50
    ckpt_every: int = 500
    stop_at: int = 0


def lr_at(step, s):
    """Linear warm-up over s.warmup steps, then constant (the improved-DDPM recipe keeps lr fixed)."""
    return s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup > 0 else s.lr


def fit(model, loss_fn, s, ckpt_path, rt, meta, identity, resume=False, on_step=None, desc="train"):
    """Train `model` for s.steps steps of `loss_fn`; return (model, ema_model, log rows).

    loss_fn(model, batch_size, generator) -> dict of per-example terms with a "loss" entry (B,).
    meta     : what rebuilds the model (kind, model config, ...), stored in the checkpoint.
    identity : the run's configuration; resuming from a checkpoint with another identity is refused.
    on_step(step, ema_model): called on rank 0 after each step (sample grids, ...).
    A checkpoint is written every s.ckpt_every steps, at s.stop_at and at the end; a checkpoint
    whose step equals s.steps means the stage is done and is returned without training.
    """
    device = rt.device
    model.to(device)
    ema = _copy_for_ema(model) if s.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=(s.precision == "fp16"))
    start, log = 0, []
    if os.path.exists(ckpt_path) and resume:
        ckpt = ddpm.load_checkpoint(ckpt_path, meta["kind"])
        diff = identity_diff(ckpt["identity"], identity) + sorted(set(ckpt["identity"]) - set(identity)
                                                                  - set(RUN_CONTROL))
        if diff:
            raise SystemExit(f"cannot resume from {ckpt_path}: it was trained with a different config "
                             f"({', '.join(diff)}); use another --out or --overwrite")
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start, log = ckpt["step"], ckpt["log"]
        if rt.main:
            print(f"[{desc}] resumed from {ckpt_path} at step {start}/{s.steps}")
    if start >= s.steps:
        return model, ema, log
    net = torch.nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model
    per_rank = max(1, s.batch // rt.world)
    skipped = log[-1]["skipped"] if log else 0
    sums, count = {}, 0  # running means of the logged terms since the last log line

    def checkpoint(step):
        if rt.main:
            ddpm.save_checkpoint(ckpt_path, dict(meta, identity=identity, step=step, log=log,
                                            model=model.state_dict(), ema=ema.state_dict() if ema else None,
                                            optimizer=opt.state_dict(), scaler=scaler.state_dict()))

    bar = tqdm(range(start, s.steps), initial=start, total=s.steps, desc=desc, disable=not rt.main,
               dynamic_ncols=True, mininterval=2.0)
    t0, seen = time.time(), 0
    for step in bar:
        g = step_generator(s.seed, s.stream, rt.rank, step, device)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g, device=device)))  # dropout etc.
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        with multiguide.autocast(s.precision, device):  # fp32: none; bf16: CPU/CUDA; fp16: CUDA
            terms = loss_fn(net, per_rank, g)
        loss = terms["loss"].float().mean()
        # A non-finite loss skips the step on every rank (they must agree, or DDP would hang).
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
        if rt.world > 1:
            dist.all_reduce(bad)
        opt.zero_grad(set_to_none=True)
        if bad.item() == 0:
            scaler.scale(loss).backward()
            if s.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                _update_ema(ema, model, min(s.ema, (1 + step) / (10 + step)))
        else:
            skipped += 1
        seen += per_rank * rt.world
        if bad.item() == 0:
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float().mean())
            count += 1
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            row = {k: v / max(count, 1) for k, v in sums.items()}  # means over the interval
            sums, count = {}, 0
            row.update(step=step + 1, lr=lr_at(step, s), skipped=skipped, img_per_s=seen / (time.time() - t0))
            log.append(row)
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", skipped=skipped, refresh=False)
        if on_step is not None and rt.main:
            on_step(step + 1, ema if ema is not None else model)
        if (step + 1) % s.ckpt_every == 0 or step + 1 in (s.steps, s.stop_at):
            checkpoint(step + 1)
        if step + 1 == s.stop_at:
            break
    bar.close()
    if rt.world > 1:
        check_replicas(model, rt)
    return model, ema, log


def _copy_for_ema(model):
    """A frozen copy of the model that _update_ema keeps as the exponential moving average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def _update_ema(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def check_replicas(model, rt):
    """Under DDP every rank must hold the same weights; compare a float64 checksum across ranks."""
    total = torch.stack([p.detach().double().sum() + (p.detach().double() ** 2).sum() for p in model.parameters()]).sum()
    sums = [torch.zeros_like(total) for _ in range(rt.world)]
    dist.all_gather(sums, total)
    if any(x.item() != sums[0].item() for x in sums):
        raise RuntimeError(f"DDP replicas diverged: checksums {[x.item() for x in sums]}")
    if rt.main:
        print(f"DDP: {rt.world} replicas identical (checksum {sums[0].item():.10e})")


# ----------------------------------------------------------------------------------------------
# The DDPM stage
# ----------------------------------------------------------------------------------------------

def build_ddpm(cfg, **unet_overrides):
    """The U-Net and the training-time diffusion of a config, plus the dict that rebuilds both.

    unet_overrides: more U-Net keywords, e.g. in_channels=1 for grey images (generalization.py).
    With cfg.guidance "free" the denoiser is class-conditional (num_classes of cfg.data, App. J)."""
    num_classes = DATA[cfg.data]["classes"] if cfg.guidance == "free" else 0
    overrides = dict(image_size=cfg.image_size, learn_sigma=cfg.learn_sigma, num_classes=num_classes)
    if cfg.attention:
        overrides["attention_resolutions"] = tuple(int(r) for r in cfg.attention.split(","))
    overrides.update(unet_overrides)
    if cfg.backbone == "dit":  # App. J: the same diffusion with a transformer denoiser
        model = dit.build_dit(cfg.dit, image_size=cfg.image_size, learn_sigma=cfg.learn_sigma, num_classes=num_classes)
    else:
        model = unet.build_unet(cfg.unet, **overrides)
    d = dict(schedule=cfg.schedule, T=cfg.T, learn_sigma=cfg.learn_sigma, loss=cfg.loss,
             respacing=cfg.train_respacing)
    return model, ddpm.diffusion_from_config(d), d


def ddpm_loss(diffusion, x0, hflip=True, labels=None, label_dropout=0.0, swap_labels=True):
    """loss_fn for fit: a random batch of training images (flipped at random unless hflip=False), t ~ U{0..T-1},
    eps ~ N(0, I). hflip=False trains on exactly the given images (generalization.py's disjoint sets).

    labels (N,) trains a class-conditional denoiser for classifier-free guidance (App. J; Ho &
    Salimans 2022, Algorithm 1): net(x_t, t, y) with the batch's labels (a flip toggles a circle's
    label, not a face's: swap_labels as in classifier_loss), each replaced by the null label
    net.num_classes with probability label_dropout (0.1 in the released config), drawn after t and
    eps, so the unconditional path's draws are unchanged. The fraction of null labels is logged as
    "null_label"."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        y0 = labels[idx] if labels is not None else torch.zeros(batch, dtype=torch.long, device=x0.device)
        x, y = toy_circles.random_hflip(x0[idx], y0, g)
        x, y = (x, y if swap_labels else y0) if hflip else (x0[idx], y0)  # flips drawn either way: same t, eps
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        if labels is None:
            return diffusion.training_losses(net, x, t, noise)
        null = torch.rand(batch, generator=g, device=g.device).to(x0.device) < label_dropout
        y = torch.where(null, getattr(net, "module", net).num_classes, y)  # DDP wraps the model in .module
        terms = diffusion.training_losses(functools.partial(net, y=y), x, t, noise)
        return dict(terms, null_label=null.float())
    return loss_fn


def fit_settings(cfg, **changes):
    s = FitSettings(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                    ema=cfg.ema, grad_clip=cfg.grad_clip, precision=cfg.precision, seed=cfg.seed,
                    log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, stop_at=cfg.stop_at)
    return dataclasses.replace(s, **changes)


def train_ddpm(cfg, rt, images, labels=None):
    """Stage 1: the DDPM on the training images; writes ddpm.pt and EMA sample grids. Unconditional,
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
    x0 = toy_circles.to_tensor(images).to(rt.device)
    y = torch.as_tensor(labels).to(rt.device) if model.num_classes else None
    grid_dir = os.path.join(cfg.out, "grids")

    def on_step(step, ema_model):
        if (cfg.grid_every and step % cfg.grid_every == 0) or step == cfg.steps:
            x = multiguide.sample(ema_model, d, 16, respacing=cfg.sample_respacing, sampler=cfg.sampler,
                                  seed=cfg.seed, device=rt.device, progress=False)
            toy_circles.save_grid(toy_circles.to_uint8(x), os.path.join(grid_dir, f"ddpm_step{step:06d}.png"),
                                  nrow=4, scale=max(1, 128 // cfg.image_size))
            ema_model.train(False)

    meta = dict(kind="ddpm", backbone=cfg.backbone, model_config=model.config, diffusion=d)
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}
    loss_fn = ddpm_loss(diffusion, x0, labels=y, label_dropout=cfg.label_dropout,
                        swap_labels=DATA[cfg.data].get("flip_swaps_label", True))
    model, ema, log = fit(model, loss_fn, fit_settings(cfg), os.path.join(cfg.out, "ddpm.pt"),
                          rt, meta, identity, resume=cfg.resume, on_step=on_step, desc="DDPM")
    return ema, d, log


# ----------------------------------------------------------------------------------------------
# The classifier stage
# ----------------------------------------------------------------------------------------------

def classifier_loss(diffusion, x0, labels, swap_labels=True):
    """loss_fn for fit: noisy images x_t at t ~ U{0..T-1} with their labels (flips swap the label of a
    circle; with swap_labels=False, for faces, a flipped image keeps its label)."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        x, y = toy_circles.random_hflip(x0[idx], labels[idx], g)
        y = y if swap_labels else labels[idx]  # the same draws either way: only the label differs
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        return classifier.classifier_losses(net, diffusion, x, y, t, noise)
    return loss_fn


def train_classifier(cfg, rt, data, run_index):
    """Stage 2: noisy classifier number `run_index` (seed = --seed + run_index), writes classifier{run}.pt."""
    seed = cfg.seed + run_index
    torch.manual_seed(seed)
    model = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, spectral_norm=cfg.spectral_norm,
                                        num_classes=DATA[cfg.data]["classes"])
    _, diffusion, d = build_ddpm(cfg)
    x0 = toy_circles.to_tensor(data["images"]).to(rt.device)
    labels = torch.as_tensor(data["labels"]).to(rt.device)
    meta = dict(kind="classifier", model_config=model.config, diffusion=d)
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}
    s = fit_settings(cfg, steps=cfg.clf_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0,
                     seed=seed, stream=1, ckpt_every=max(cfg.clf_steps, 1), stop_at=0)
    swap = DATA[cfg.data].get("flip_swaps_label", True)
    model, _, log = fit(model, classifier_loss(diffusion, x0, labels, swap), s,
                        os.path.join(cfg.out, f"classifier{run_index}.pt"), rt, meta, identity,
                        resume=cfg.resume, desc=f"classifier {run_index}")
    return model.eval(), log


def regressor_loss(x0, targets):
    """loss_fn for fit: clean images and their known attributes (App. K), no noise, no flips."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        return classifier.regression_losses(net, x0[idx], targets[idx])
    return loss_fn


def train_regressor(cfg, rt, data):
    """The App. K evaluator: the classifier network (preset cfg.clf) with 2 outputs regressing the
    centre (z_x, z_y) = (c + 0.5) / S of clean circles; `data` is a make_circles dict, normally region
    "all" (every position: an evaluator may see data the DDPM never saw, like the paper's evaluation
    classifier). cfg.regressor_steps steps at cfg.clf_batch and cfg.clf_lr; writes regressor.pt."""
    torch.manual_seed(cfg.seed)
    model = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, num_classes=2)
    x0 = toy_circles.to_tensor(data["images"]).to(rt.device)
    targets = torch.as_tensor(toy_circles.normalized_x(data["centres"], cfg.image_size), dtype=torch.float32)
    meta = dict(kind="regressor", model_config=model.config, targets=["z_x", "z_y"])
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}
    s = fit_settings(cfg, steps=cfg.regressor_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0,
                     seed=cfg.seed, stream=2, ckpt_every=max(cfg.regressor_steps, 1), stop_at=0)
    model, _, log = fit(model, regressor_loss(x0, targets.to(rt.device)), s, os.path.join(cfg.out, "regressor.pt"),
                        rt, meta, identity, resume=cfg.resume, desc="regressor")
    return model.eval(), log


# ----------------------------------------------------------------------------------------------
# The experiment: Section 5.5 end to end
# ----------------------------------------------------------------------------------------------

def prepare_out(cfg):
    """Create --out and write config.json; never mix two runs in one folder.

    An --out that already holds a run (config.json) needs --resume (same configuration: checked
    here, before anything is written) or --overwrite (start afresh; files are replaced as the new
    run writes them).
    """
    config_path = os.path.join(cfg.out, "config.json")
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}
    if os.path.exists(config_path):
        if not (cfg.resume or cfg.overwrite):
            raise SystemExit(f"train.py: --out {cfg.out} already holds a run (config.json); pass --resume to "
                             f"continue it, --overwrite to start afresh, or choose another --out")
        if cfg.resume:
            try:
                with open(config_path) as fh:
                    old = json.load(fh)
            except (OSError, ValueError):
                raise SystemExit(f"train.py: {config_path} is unreadable; cannot --resume from it") from None
            diff = identity_diff(old, identity)
            if diff:
                raise SystemExit(f"train.py: cannot --resume {cfg.out}: its run used other values for "
                                 f"{', '.join('--' + k.replace('_', '-') for k in diff)}")
    os.makedirs(cfg.out, exist_ok=True)
    toy_circles.write_bytes_atomically(config_path, (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())


PAPER_CIRCLES = dict(accuracy=(0.78, 0.087), bad=(0.0425, 0.0245), spectral_best=0.90)  # Sec. 5.5


def draw_samples(cfg, rt, model, d, name, ddpm_step, clf=None, lambdas=(0.0, 0.0), guidance="classifier"):
    """cfg.n_samples images, uint8 (N, S, S, 3), multi-guided when lambdas != 0; writes samples/<name>.npz
    (atomically) and a grid of the first 64 as samples/<name>.png.

    guidance "classifier" guides with clf (Eq. 2); "free" with the class-conditional model itself (App. J).
    Under --resume, samples already drawn from the same DDPM step with the same weights are reused.
    """
    path = os.path.join(cfg.out, "samples", f"{name}.npz")
    old = np.load(path) if cfg.resume and os.path.exists(path) else None
    if old is not None and int(old["ddpm_step"]) == ddpm_step and list(old["lambdas"]) == list(lambdas):
        images = old["images"]
    else:
        x = multiguide.sample(model, d, cfg.n_samples,
                              classifier=clf if any(lambdas) and guidance == "classifier" else None,
                              lambdas=list(lambdas), respacing=cfg.sample_respacing, sampler=cfg.sampler,
                              batch=cfg.sample_batch, seed=cfg.seed + 1, device=rt.device, progress=True,
                              guidance=guidance)
        images = toy_circles.to_uint8(x)  # (N, S, S, 3)
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images, lambdas=np.array(lambdas), ddpm_step=ddpm_step)
        toy_circles.write_bytes_atomically(path, buf.getvalue())
    toy_circles.save_grid(images[:64], os.path.join(cfg.out, "samples", f"{name}.png"), nrow=8,
                          scale=max(1, 64 // cfg.image_size))
    return images


def sample_and_evaluate(cfg, rt, model, d, name, ddpm_step, clf=None, lambdas=(0.0, 0.0), guidance="classifier"):
    """draw_samples, then the circle detector: returns evaluate.circle_stats of the samples."""
    return evaluate.circle_stats(draw_samples(cfg, rt, model, d, name, ddpm_step, clf, lambdas, guidance))


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def sample_summary(stats):
    """The numbers of one sample set kept in results.json: accuracy, bad and centre-square fractions."""
    return dict(accuracy=stats["accuracy"], bad_fraction=stats["bad_fraction"], centre_fraction=stats["centre_fraction"])


def guidance_sweep(cfg, rt, model, d, ddpm_step, clf):
    """One row per lambda of --lambda-sweep, the same lambda on every class: classifier multi-guidance
    (Eq. 2, classifier `clf`) and, in a --guidance free run, classifier-free multi-guidance (App. J) of
    the same DDPM under "free" (a free run without --lambda-sweep sweeps CFG_SWEEP). In a free run the
    classifier guides the null-label model, the DDPM's unconditional half: both columns share one network."""
    rows, classes = [], DATA[cfg.data]["classes"]
    for lam in parse_floats(cfg.lambda_sweep or (CFG_SWEEP if cfg.guidance == "free" else "")):
        stats = sample_and_evaluate(cfg, rt, model, d, f"sweep_lambda{lam:g}", ddpm_step, clf, (lam,) * classes)
        rows.append(dict(lam=lam, **sample_summary(stats)))
        line = f"lambda {lam:g}: accuracy {stats['accuracy']:.3f}, bad {stats['bad_fraction']:.3f}"
        if cfg.guidance == "free":
            free = sample_and_evaluate(cfg, rt, model, d, f"cfg_lambda{lam:g}", ddpm_step, None, (lam,) * classes,
                                       guidance="free")
            rows[-1]["free"] = sample_summary(free)
            line += f" | classifier-free: accuracy {free['accuracy']:.3f}, bad {free['bad_fraction']:.3f}"
        print(line)
    return rows


MEMO_SAMPLES = 1024  # App. H: samples checked against every training image (the faces' cost grows with N x M)


def memorization_check(cfg, samples, train, clf, stats=None):
    """App. H: the nearest training image of each guided sample, in pixel space and in the guidance
    classifier's features (CLIP is not available offline), the near-copy fraction and, for circles
    (train["centres"] and circle_stats `stats` given), the samples whose centre lies on a training
    centre. Writes figures/memorization_pairs.png (middle-band samples first); returns the summary."""
    samples = samples[:MEMO_SAMPLES]
    stats = {k: (v[:MEMO_SAMPLES] if isinstance(v, np.ndarray) else v) for k, v in stats.items()} if stats else None
    features = (evaluate.classifier_features(clf, samples), evaluate.classifier_features(clf, train["images"]))
    m = evaluate.memorization(samples, train["images"], train.get("centres") if stats else None, stats, features)
    evaluate.save_memorization_grid(samples, train["images"], m, os.path.join(cfg.out, "figures",
                                                                            "memorization_pairs.png"))
    return evaluate.memorization_summary(m)


def run_experiment(cfg, rt):
    """Data -> DDPM -> classifiers -> guided + unconditional samples -> evaluation -> report.md."""
    t_start = time.time()
    data = toy_circles.make_circles(cfg.image_size, DATA[cfg.data]["region"])
    if rt.main:
        toy_circles.save_grid(data["images"][::max(1, len(data["images"]) // 64)][:64],
                              os.path.join(cfg.out, "figures", "training_data.png"), nrow=8,
                              scale=max(1, 64 // cfg.image_size))
    timings = {}
    t0 = time.time()
    ema, d, log = train_ddpm(cfg, rt, data["images"], data["labels"])
    ddpm_step = log[-1]["step"] if log else 0
    timings["ddpm_training_s"] = time.time() - t0
    if rt.main and log:
        print(f"DDPM: final loss {log[-1]['loss']:.4f} ({log[-1]['img_per_s']:.0f} img/s this session)")
    clfs = []
    t0 = time.time()
    for r in range(cfg.runs):
        clf, clf_log = train_classifier(cfg, rt, data, r)
        clfs.append(clf)
        if rt.main and clf_log:
            print(f"classifier {r}: final loss {clf_log[-1]['loss']:.4f}, noisy accuracy {clf_log[-1]['acc']:.3f}")
    timings["classifier_training_s"] = time.time() - t0
    regressor, t0 = None, time.time()
    if cfg.regressor_steps:  # App. K: the evaluator sees circles at every position
        regressor, _ = train_regressor(cfg, rt, toy_circles.make_circles(cfg.image_size, "all"))
    timings["regressor_training_s"] = time.time() - t0
    if rt.world > 1:  # sampling and evaluation are cheap: rank 0 does them alone
        dist.barrier()
        if not rt.main:
            return None
    ema.eval()
    diffusion = ddpm.diffusion_from_config(d)
    xs, ys, p = classifier.heatmap(clfs[0], diffusion, cfg.image_size, t=cfg.heatmap_t, seed=cfg.seed)
    heat = classifier.plot_heatmap(xs, ys, p, cfg.image_size, os.path.join(cfg.out, "figures", "classifier_heatmap.png"),
                                   f"p({'right' if cfg.data == 'circles' else 'class 1, top right'} | circle at "
                                   f"x, y), classifier 0, t = {cfg.heatmap_t}")
    t0 = time.time()
    uncond = sample_and_evaluate(cfg, rt, ema, d, "unconditional", ddpm_step)
    timings["unguided_sampling_s"] = time.time() - t0
    lambdas = parse_floats(cfg.lambdas)
    runs, t0 = [], time.time()
    for r, clf in enumerate(clfs):
        stats = sample_and_evaluate(cfg, rt, ema, d, f"guided_run{r}", ddpm_step, clf, lambdas)
        runs.append(stats)
        centre = f", centre square {stats['centre_fraction']:.3f}" if cfg.data == "corners" else ""
        print(f"run {r}: accuracy {stats['accuracy']:.3f}, bad {stats['bad_fraction']:.3f}{centre}")
    timings["guided_sampling_s"] = time.time() - t0
    t0 = time.time()
    sweep = guidance_sweep(cfg, rt, ema, d, ddpm_step, clfs[0])
    timings["sweep_sampling_s"] = time.time() - t0
    z_all = np.concatenate([np.asarray(s["z"])[np.asarray(s["n_circles"]) == 1] for s in runs])
    evaluate.plot_centre_histogram(z_all, os.path.join(cfg.out, "figures", "centre_x_histogram.png"), cfg.image_size,
                                   f"circle centre x of guided samples, lambda = {cfg.lambdas} ({len(runs)} runs)")
    evaluate.write_circles_csv(runs[0], os.path.join(cfg.out, "samples", "guided_run0.csv"))
    if cfg.data == "corners":  # App. F: where the guided samples land in 2-D
        evaluate.plot_centre_heatmap(np.concatenate([s["cx"] for s in runs]), np.concatenate([s["cy"] for s in runs]),
                                     cfg.image_size, os.path.join(cfg.out, "figures", "centre_heatmap.png"),
                                     f"centres of guided samples, lambda = {cfg.lambdas} "
                                     f"({len(runs)} run{'s' if len(runs) > 1 else ''})")
    images, regression = np.load(os.path.join(cfg.out, "samples", "guided_run0.npz"))["images"], None
    if regressor is not None:  # App. K: the regressor's z_x of guided run 0 against the detector's
        regression = evaluate.regressor_vs_detector(evaluate.regressor_scores(regressor, images), runs[0])
    memo = memorization_check(cfg, images, data, clfs[0], runs[0])
    print(f"memorization (App. H), guided run 0: near-copies {memo['near_copy_fraction']:.1%}, centre on a "
          f"training centre {memo['on_training_centre_fraction']:.1%} (middle band: "
          f"{memo['middle_on_training_centre']} of {memo['n_middle']})")
    timings["total_s"] = time.time() - t_start
    results = dict(
        data=cfg.data, guidance=cfg.guidance, memorization=memo,
        accuracy=mean_std([s["accuracy"] for s in runs]), bad_fraction=mean_std([s["bad_fraction"] for s in runs]),
        centre_fraction=mean_std([s["centre_fraction"] for s in runs]),
        per_run=[sample_summary(s) for s in runs], unconditional=sample_summary(uncond), regressor=regression,
        lambdas=lambdas, lambda_sweep=sweep, heatmap=dict(middle_mean_p=heat["middle_mean_p"],
                                                           transition_width=heat["transition_width"]),
        n_samples=cfg.n_samples, sample_respacing=cfg.sample_respacing, sampler=cfg.sampler, runs=cfg.runs,
        ddpm_final_loss=log[-1]["loss"] if log else None, timings_s=timings, config=dataclasses.asdict(cfg),
        paper=PAPER_CIRCLES)
    toy_circles.write_bytes_atomically(os.path.join(cfg.out, "results.json"),
                                       (json.dumps(results, indent=2) + "\n").encode())
    toy_circles.write_bytes_atomically(os.path.join(cfg.out, "report.md"), report_markdown(cfg, results).encode())
    return results


def report_markdown(cfg, r):
    """report.md: the table next to the paper's figures, then the pictures."""
    acc, bad = r["accuracy"], r["bad_fraction"]
    pa, pb = PAPER_CIRCLES["accuracy"], PAPER_CIRCLES["bad"]
    rows = [
        "| quantity | this run | paper (Sec. 5.5) |",
        "|---|---|---|",
        f"| accuracy: samples with one circle in the unseen middle z in [0.2, 0.8] | "
        f"{100 * acc[0]:.1f}% +- {100 * acc[1]:.1f}% ({cfg.runs} run{'s' if cfg.runs > 1 else ''}) | "
        f"{100 * pa[0]:.0f}% +- {100 * pa[1]:.1f}% (10 runs) |",
        f"| bad fraction: 0 or >= 2 circles | {100 * bad[0]:.1f}% +- {100 * bad[1]:.1f}% | "
        f"{100 * pb[0]:.2f}% +- {100 * pb[1]:.2f}% |",
        f"| unconditional accuracy (leakage) | {100 * r['unconditional']['accuracy']:.1f}% | (not reported) |",
        *([f"| centre fraction (App. F): one circle with z_x AND z_y in [0.2, 0.8] | "
           f"{100 * r['centre_fraction'][0]:.1f}% +- {100 * r['centre_fraction'][1]:.1f}% "
           f"(unconditional {100 * r['unconditional']['centre_fraction']:.1f}%) | (Fig. 9: a heatmap, no number) |"]
          if cfg.data == "corners" else []),
        f"| lambda ({'left, right' if cfg.data == 'circles' else 'quadrants 0-3'}) | {r['lambdas']} | "
        f"{[30] * len(r['lambdas'])} |",
        f"| sampling | {cfg.sampler}, {cfg.sample_respacing} steps, {cfg.n_samples} samples | ancestral, "
        f"64 steps (released config), 1000 samples |",
        f"| runtime | {r['timings_s']['total_s'] / 60:.1f} min on {cfg.device if cfg.device != 'auto' else 'this machine'} | "
        f"(GPU) |",
    ]
    runs = ", ".join(f"{100 * x['accuracy']:.1f}%" for x in r["per_run"])
    t = r["timings_s"]
    title = ("# Circles: zero-shot interpolation (paper Section 5.5)" if cfg.data == "circles" else
             "# Corners: interpolation on two variables (paper App. F, on the circles of Section 5.5)")
    lines = [
        title + (" with a class-conditional DDPM (App. J)" if cfg.guidance == "free" else ""), "",
        f"Command: `python {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}` "
        f"(full configuration in `config.json`, numbers in `results.json`).", "",
        *rows, "",
        f"Per run: {runs}. Classifier heatmap: mean p(right) over the middle band "
        f"{r['heatmap']['middle_mean_p']:.2f}, transition width {r['heatmap']['transition_width']} columns.",
        f"Timings: DDPM {t['ddpm_training_s']:.0f} s, classifiers {t['classifier_training_s']:.0f} s, "
        f"unguided sampling {t['unguided_sampling_s']:.0f} s, guided sampling {t['guided_sampling_s']:.0f} s, "
        f"regressor {t.get('regressor_training_s', 0):.0f} s, lambda sweep {t.get('sweep_sampling_s', 0):.0f} s.",
        *sweep_table(cfg, r), *regressor_table(r), *memorization_table(r.get("memorization"), circles=True), "",
        "## Figures", "",
        f"Training data (centres only in the outer {'bands' if cfg.data == 'circles' else 'corner squares'}): "
        "![training data](figures/training_data.png)", "",
        *(["Centres of the guided samples in 2-D (App. F): ![centres](figures/centre_heatmap.png)", ""]
          if cfg.data == "corners" else []),
        "Multi-guided samples, lambda = " + cfg.lambdas + ": ![guided](samples/guided_run0.png)", "",
        "Unconditional samples: ![unconditional](samples/unconditional.png)", "",
        "Centre x of the guided samples: ![histogram](figures/centre_x_histogram.png)", "",
        "Classifier p(right | circle at x, y) (Fig. 7b): ![heatmap](figures/classifier_heatmap.png)", "",
    ]
    return "\n".join(lines)


def sweep_table(cfg, r):
    """report.md lines: accuracy (and, for corners, the centre fraction) against lambda, per guidance."""
    if not r["lambda_sweep"]:
        return []
    free = cfg.guidance == "free"
    keys = ["accuracy", "bad_fraction"] + (["centre_fraction"] if cfg.data == "corners" else [])
    names = {"accuracy": "accuracy", "bad_fraction": "bad fraction", "centre_fraction": "centre fraction"}
    head = [f"classifier: {names[k]}" for k in keys] + ([f"classifier-free: {names[k]}" for k in keys] if free else [])
    lines = ["", "## Guidance strength", "",
             "Every class gets the same lambda. Classifier: Eq. 2 with the noisy classifier" +
             (" on the DDPM's null-label (unconditional) half; classifier-free: App. J, eps(null) + "
              "sum_m lambda (eps(y_m) - eps(null)) of the same network (lambda = 0: both unguided)." if free else "."),
             "", "| lambda | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for s in r["lambda_sweep"]:
        cells = [s[k] for k in keys] + ([s["free"][k] for k in keys] if free else [])
        lines.append(f"| {s['lam']:g} | " + " | ".join(f"{100 * c:.1f}%" for c in cells) + " |")
    return lines


def memorization_table(m, circles):
    """report.md lines: App. H, guided run 0 against the training set (train.memorization_check)."""
    if not m:
        return []
    lines = ["", "## Memorization (App. H)", "",
             f"Guided run 0: the first {m['n']} samples against all {m['n_train']} training images. The paper looks "
             "at CLIP neighbours; CLIP is not available offline, so the neighbours are taken in pixel space "
             "([0, 1], Euclidean) and in the guidance classifier's features (t = 0).", "",
             "| measure | value |", "|---|---|",
             f"| near-copies: nearest training image with pixel cosine > {m['copy_cosine']} | "
             f"{100 * m['near_copy_fraction']:.1f}% |",
             f"| median cosine to the nearest training image | {m['median_pixel_cosine']:.3f} |",
             f"| feature-space neighbour = pixel-space neighbour | {100 * m['feature_agrees_with_pixel']:.1f}% |"]
    if circles:
        lines += [f"| circle centre on a training centre (same pixel), all samples | "
                  f"{100 * m['on_training_centre_fraction']:.1f}% |",
                  f"| ... among samples with one circle | {100 * m['on_training_centre_of_one_circle']:.1f}% |",
                  f"| middle-band samples on a training centre / near-copies | {m['middle_on_training_centre']} / "
                  f"{m['middle_near_copy']} of {m['n_middle']} |",
                  f"| median cosine to the nearest training image, middle-band samples | "
                  f"{m['median_pixel_cosine_middle']:.3f} |"]
    return lines + ["", "Samples (top row) above their nearest training image in pixel space (middle) and in the "
                        "classifier's features (bottom): ![pairs](figures/memorization_pairs.png)"]


def regressor_table(r):
    """report.md lines: App. K, the regressor's z_x of guided run 0 against the detector's, vs uniform."""
    g = r.get("regressor")
    if not g:
        return []
    rows = [("regressor z_x, every sample", g["regressor"]), ("detector z, samples with one circle", g["detector"])]
    lines = ["", "## A regressor as the evaluator (App. K)", "",
             f"Guided run 0 ({g['n']} samples, {g['n_one_circle']} with one circle). Histogram (100 bins) against "
             "uniform; unit = bins over [0, 1], data = bins over [min, max] (the released code's range).", "",
             "| score | MSE (unit) | KLD (unit) | MSE (data) | KLD (data) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['unit']['mse']:.3f} | {m['unit']['kld']:.3f} | {m['data']['mse']:.3f} | "
              f"{m['data']['kld']:.3f} |" for name, m in rows if m is not None]
    lines += ["", f"Mean |regressor z_x - detector z| on one-circle samples: {g['mean_abs_difference']:.3f} image widths; "
                  f"regressor z_x in [0.2, 0.8]: {100 * g['regressor_middle_fraction']:.1f}% of all samples."]
    return lines


def run_in_processes(cfg, experiment, label):
    """Set up the process(es), prepare and announce --out, run experiment(cfg, rt), tear DDP down."""
    rt = setup_runtime(cfg)
    if rt.main:
        prepare_out(cfg)
        print(f"zsi | data {label} | out {os.path.abspath(cfg.out)} | device {rt.device} x{rt.world} | "
              f"precision {cfg.precision}")
        print(json.dumps(dataclasses.asdict(cfg)))
    if rt.world > 1:
        dist.barrier()
    results = experiment(cfg, rt)
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return results


def run(cfg):
    results = run_in_processes(cfg, run_experiment, cfg.data)
    if results is not None:
        acc, bad = results["accuracy"], results["bad_fraction"]
        print(f"report: {os.path.join(cfg.out, 'report.md')}")
        centre = f"centre square {100 * results['centre_fraction'][0]:.1f}%, " if cfg.data == "corners" else ""
        print(f"HEADLINE accuracy {100 * acc[0]:.1f}% +- {100 * acc[1]:.1f}% of samples in the unseen middle "
              f"(paper: 78% +- 8.7%), bad {100 * bad[0]:.1f}%, {centre}unconditional "
              f"{100 * results['unconditional']['accuracy']:.1f}%, {results['timings_s']['total_s'] / 60:.1f} min")


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.data in FACE_DATA:  # faces (or your own images), Sec. 5.1-5.3: the section "Faces" below
        return run_faces_cli(cfg)
    run(cfg)


# ----------------------------------------------------------------------------------------------
# Faces: CelebA, Sections 5.1-5.3 (filter -> DDPM -> classifier -> samples -> histograms)
# ----------------------------------------------------------------------------------------------
# python train.py --data celeba --attr Smiling --root R [--subset 10k] [--paper]
# python train.py --data folder --root R        (R/<class 0>/*.jpg, R/<class 1>/*.jpg: your own two classes)
# python train.py --data csv --csv FILE.csv     (rows path,label[,split])
#   1. filter_data.py keeps the extreme faces in OUT/filter (Sec. 4.3, App. D.1; --subset is step 3 of
#      Sec. 5.2) and trains the evaluation classifier (all training faces, calibrated): the judge.
#   2. The DDPM and 3. the noisy guidance classifier train on the kept faces with the same `fit` as the
#      circles; a flipped face keeps its label (DATA["celeba"]["flip_swaps_label"]).
#   4. Multi-guided (Eq. 2, lambda = 30,30: smile and non-smile) and unconditional samples.
#   5. The evaluation classifier's p(attribute) of the guided samples, the training faces and the
#      unconditional samples: 100-bin histograms against uniform, MSE and KLD (App. B) in both range
#      conventions (evaluate.histogram_metrics), beside the paper's numbers -> report.md, results.json.
# Every stage resumes: the filter is skipped when OUT/filter holds a finished run (index.csv) with the same
# settings (inside, filter_data.py reuses each finished classifier), a checkpoint at step --steps is not
# trained again, and under --resume samples drawn from the same DDPM step and weights are reused.

# (MSE, KLD) to uniform, CelebA Smiling, 10k samples, lambda = 30,30, keyed by --subset. The released
# code histograms over [min, max] of the scores ("data" range, evaluate.py): compare with those columns.
PAPER_FACES = dict(guided={"60k": (0.130, 0.607), "30k": (0.184, 0.835), "10k": (0.186, 0.802),  # Table 1
                           "5k": (0.279, 1.185)},
                   training={"60k": (0.558, 3.161)},     # Sec. 5.2 (Sec. 5.1 rounds it: 0.56, 3.17)
                   unconditional={"60k": (0.64, 3.5)})   # Sec. 5.1
FILTER_RUN_CONTROL = ("device", "workers", "threads", "cache")  # filter_data.py flags that change no result


def source_flags(cfg):
    """The flags that name the labelled images, shared by train.py and filter_data.py."""
    return ["--data", cfg.data, *dict(celeba=["--attr", cfg.attr, "--root", cfg.root], folder=["--root", cfg.root],
                                      csv=["--csv", cfg.csv])[cfg.data]]


def filter_argv(cfg):
    """The filter_data.py command line of a faces run: output OUT/filter, images of --image-size.
    --filter-args come last, so they may override any of these (e.g. --out to share one filter)."""
    argv = [*source_flags(cfg), "--out", os.path.join(cfg.out, "filter"),
            "--size", str(cfg.image_size), "--subset", cfg.subset, "--seed", str(cfg.seed)]
    argv += ["--device", cfg.device] if cfg.device != "auto" else []
    return argv + shlex.split(cfg.filter_args)


def check_faces(cfg, parser):
    """--data celeba|folder|csv: the input exists and reads (a CelebA root that holds the attribute, two
    class folders, a well-formed CSV); filter_data.py's reader errors name the missing file or flag."""
    if cfg.data == "celeba" and not cfg.root:
        parser.error("--data celeba needs --root, the CelebA folder (img_align_celeba/, list_attr_celeba.txt, "
                     "list_eval_partition.txt)")
    if cfg.data == "folder" and not cfg.root:
        parser.error("--data folder needs --root, a folder holding exactly two class folders of images")
    if cfg.data == "csv" and not cfg.csv:
        parser.error("--data csv needs --csv, a file of path,label[,split] rows")
    if cfg.guidance != "classifier":
        parser.error(f"--data {cfg.data}: only --guidance classifier is wired for faces (ddpm_loss's "
                     "class-conditional flips would swap face labels)")
    try:
        shlex.split(cfg.filter_args)
    except ValueError as e:
        parser.error(f"--filter-args: {e}")
    filter_data.read_dataset(filter_data.parse_args(filter_argv(cfg)))  # one-line errors (exit 1 or 2)


def attribute_name(cfg, class_names):
    """What the evaluation classifier's score is the probability of: the CelebA attribute, else class 1."""
    return cfg.attr if cfg.data == "celeba" else class_names[1]


def filter_finished(args):
    """Whether args.out holds a finished filter_data.py run (index.csv) made with the same settings."""
    wanted = json.loads(json.dumps(dict(vars(args), device=str(args.device))))  # tuples -> lists, as stored
    try:
        with open(os.path.join(args.out, "config.json")) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return False
    same = all(old.get(k) == v for k, v in wanted.items() if k not in FILTER_RUN_CONTROL)
    return same and os.path.isfile(os.path.join(args.out, "index.csv"))


def faces_filter(cfg, rt):
    """Stage 1: the extreme faces (filter_data.run_filter), unless a finished run can be reused. Returns its folder."""
    threads = torch.get_num_threads()
    args = filter_data.parse_args(filter_argv(cfg))  # may set torch's threads (--filter-args --threads)
    if filter_finished(args):
        if rt.main:
            print(f"[filter] finished earlier with the same settings: reusing {args.out}")
    elif rt.world > 1:  # one process filters; the others cannot wait hours in a barrier
        raise SystemExit(f"train.py: run the filter first, in one process: python filter_data.py "
                         f"{shlex.join(filter_argv(cfg))}")
    else:
        filter_data.run_filter(args)
    torch.set_num_threads(threads)
    return args.out


def score_row(cfg, name, label, scores, paper_key, attribute):
    """One row of the comparison: the 100-bin histogram of `scores` = p(attribute) against uniform (App. B),
    both range conventions, the fraction of mild scores in [0.2, 0.8], the paper's (MSE, KLD) for CelebA
    Smiling; figures/hist_<name>.png."""
    m = evaluate.histogram_metrics(scores)
    evaluate.plot_histogram_vs_uniform(scores, os.path.join(cfg.out, "figures", f"hist_{name}.png"),
                                       f"p({attribute}) of the {label} (evaluation classifier)")
    paper = PAPER_FACES.get(paper_key, {}).get("60k" if cfg.subset == "all" else cfg.subset)
    return dict(name=name, label=label, n=len(scores), unit={k: m["unit"][k] for k in ("mse", "kld")},
                data={k: m["data"][k] for k in ("mse", "kld")},
                middle_fraction=float(np.mean((scores >= 0.2) & (scores <= 0.8))),
                paper=list(paper) if paper and cfg.data == "celeba" and cfg.attr == "Smiling" else None)


def run_faces(cfg, rt):
    """Filter -> DDPM -> classifier(s) -> guided + unconditional samples -> histograms -> report.md."""
    t_start, timings = time.time(), {}
    fout = faces_filter(cfg, rt)
    timings["filter_s"] = time.time() - t_start
    kept = filter_data.load_kept(fout)  # the DDPM's training set: images, labels, paths, class_names
    if kept["images"].shape[1] != cfg.image_size:
        raise SystemExit(f"train.py: {fout} holds {kept['images'].shape[1]}-pixel faces, --image-size is "
                         f"{cfg.image_size}; drop --size from --filter-args")
    per_class = np.bincount(kept["labels"], minlength=2).tolist()
    if rt.main:
        pick = np.concatenate([np.flatnonzero(kept["labels"] == c)[:32] for c in (0, 1)])
        toy_circles.save_grid(kept["images"][pick], os.path.join(cfg.out, "figures", "training_data.png"), nrow=8,
                              scale=max(1, 64 // cfg.image_size))
        print(f"faces: {len(kept['labels'])} training images, {per_class} per class {kept['class_names']}")
    t0 = time.time()
    ema, d, log = train_ddpm(cfg, rt, kept["images"])  # unconditional (classifier guidance)
    ddpm_step = log[-1]["step"] if log else 0
    timings["ddpm_training_s"] = time.time() - t0
    t0 = time.time()
    clfs = [train_classifier(cfg, rt, kept, r)[0] for r in range(cfg.runs)]
    timings["classifier_training_s"] = time.time() - t0
    if rt.world > 1:  # sampling and evaluation: rank 0 alone
        dist.barrier()
        if not rt.main:
            return None
    ema.eval()
    judge = os.path.join(fout, "classifiers", "evaluation.pt")

    def scores(images):
        return evaluate.classifier_scores(images, judge, rt.device)

    attribute = attribute_name(cfg, kept["class_names"])
    distinct = filter_data.load_kept(fout, oversample=False)  # each kept image once (no --subset young repeats)
    t0, rows = time.time(), []
    for r, clf in enumerate(clfs):
        images = draw_samples(cfg, rt, ema, d, f"guided_run{r}", ddpm_step, clf, parse_floats(cfg.lambdas))
        rows.append(score_row(cfg, f"guided_run{r}", f"multi-guided samples, lambda = {cfg.lambdas}"
                              + (f", classifier {r}" if cfg.runs > 1 else ""), scores(images), "guided", attribute))
        if r == 0:  # App. H: nearest training faces of the guided samples
            memo = memorization_check(cfg, images, distinct, clf)
    rows.append(score_row(cfg, "training", f"training images (--subset {cfg.subset})", scores(distinct["images"]),
                          "training", attribute))
    rows.append(score_row(cfg, "unconditional", "unconditional samples",
                          scores(draw_samples(cfg, rt, ema, d, "unconditional", ddpm_step)), "unconditional", attribute))
    for lam in parse_floats(cfg.lambda_sweep):  # Sec. 5.3: the same lambda on both classes, classifier 0
        images = draw_samples(cfg, rt, ema, d, f"sweep_lambda{lam:g}", ddpm_step, clfs[0], (lam, lam))
        rows.append(score_row(cfg, f"sweep_lambda{lam:g}", f"multi-guided samples, lambda = {lam:g}", scores(images),
                              None, attribute))
    timings["sampling_and_scoring_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    with open(os.path.join(fout, "evaluation.json")) as fh:
        judge_cal = json.load(fh)
    results = dict(data=cfg.data, attr=attribute, subset=cfg.subset, class_names=kept["class_names"], memorization=memo,
                   training_per_class=per_class, rows=rows, lambdas=parse_floats(cfg.lambdas), n_samples=cfg.n_samples,
                   sample_respacing=cfg.sample_respacing, sampler=cfg.sampler, filter_out=fout,
                   evaluation_classifier=dict(path=judge, test_accuracy=judge_cal.get("test_accuracy"),
                                              temperature=judge_cal.get("temperature")),
                   ddpm_final_loss=log[-1]["loss"] if log else None, timings_s=timings,
                   config=dataclasses.asdict(cfg), paper={k: {s: list(v) for s, v in t.items()}
                                                          for k, t in PAPER_FACES.items()})
    toy_circles.write_bytes_atomically(os.path.join(cfg.out, "results.json"),
                                       (json.dumps(results, indent=2) + "\n").encode())
    toy_circles.write_bytes_atomically(os.path.join(cfg.out, "report.md"), faces_report(cfg, results).encode())
    return results


def faces_report(cfg, r):
    """report.md of a faces run: the three-row comparison next to the paper, then the pictures."""
    smoke = not (cfg.unet == "paper" and cfg.steps >= 250000)
    subset = "60k, the paper's full extreme set" if cfg.subset == "all" else cfg.subset

    def cell(x):
        return "-" if x is None else f"{x[0]:.3f} / {x[1]:.3f}"

    attr = r["attr"]  # the CelebA attribute, or the name of class 1 for --data folder|csv
    source = "CelebA's" if cfg.data == "celeba" else f"{r['class_names'][0]} vs {r['class_names'][1]} (--data {cfg.data}):"
    lines = [f"# Faces: zero-shot interpolation of {source} {attr} (paper Sections 5.1-5.3)", ""]
    if smoke:
        lines += ["**Smoke scale.** This run used a reduced configuration (U-Net '" + cfg.unet + f"', {cfg.steps} DDPM "
                  f"steps, {cfg.n_samples} samples): it checks that the pipeline runs end to end; it is NOT a "
                  "reproduction. The paper's numbers need `--paper` on a GPU.", ""]
    lines += [f"Command: `python {shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}` "
              f"(configuration in `config.json`, numbers in `results.json`, the filter in `{r['filter_out']}`).", "",
              f"Training set: {sum(r['training_per_class'])} extreme faces, {r['training_per_class']} per class "
              f"{r['class_names']}. Judge: filter_data.py's evaluation classifier (test accuracy "
              f"{r['evaluation_classifier']['test_accuracy']:.3f}, temperature "
              f"{r['evaluation_classifier']['temperature']:.3f}). Score = its calibrated p({attr}).", "",
              "Histogram of the scores, 100 bins, against uniform (App. B); lower is better. `data`: bins over "
              "[min, max] of the scores, as the released code (and so, presumably, the paper's numbers); `unit`: "
              "bins over [0, 1], as the text describes.", "",
              f"| {attr} scores of | n | MSE (data) | KLD (data) | MSE (unit) | KLD (unit) | in [0.2, 0.8] | "
              f"paper MSE / KLD ({subset}) |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | {row['n']} | {row['data']['mse']:.3f} | {row['data']['kld']:.3f} | "
                     f"{row['unit']['mse']:.3f} | {row['unit']['kld']:.3f} | {100 * row['middle_fraction']:.1f}% | "
                     f"{cell(row['paper'])} |")
    t = r["timings_s"]
    lines += ["", f"Paper: Sec. 5.1 (guided 0.13 / 0.61, training 0.56 / 3.17, unconditional 0.64 / 3.5; lambda = "
                  f"30,30, 10k samples, 250 steps), Table 1 for the 30k, 10k and 5k subsets"
                  f"{'' if r['rows'][0]['paper'] else f' (CelebA Smiling only: none for {attr})'}. This run: "
                  f"{cfg.sampler}, {cfg.sample_respacing} steps, {cfg.n_samples} samples.",
              f"Timings: filter {t['filter_s']:.0f} s, DDPM {t['ddpm_training_s']:.0f} s, classifier "
              f"{t['classifier_training_s']:.0f} s, sampling and scoring {t['sampling_and_scoring_s']:.0f} s, total "
              f"{t['total_s'] / 60:.1f} min.", *memorization_table(r.get("memorization"), circles=False),
              "", "## Figures", ""]
    lines += [f"Scores of the {row['label']}: ![{row['name']}](figures/hist_{row['name']}.png)" + "\n"
              for row in r["rows"]]
    lines += ["Multi-guided samples: ![guided](samples/guided_run0.png)", "",
              "Unconditional samples: ![unconditional](samples/unconditional.png)", "",
              "Training faces (32 per class): ![training](figures/training_data.png)", ""]
    return "\n".join(lines)


def _duration(seconds):
    return (f"{seconds / 86400:.1f} days" if seconds > 2 * 86400 else f"{seconds / 3600:.1f} h" if seconds > 7200
            else f"{seconds / 60:.0f} min")


def paper_cost_estimate(cfg):
    """(seconds, {stage: seconds}) the run would take on this machine's CPU: ONE timed step at batch 1 of each
    network (training = forward + backward; sampling = a forward, plus the classifier's gradient when guided)
    times the run's steps, batch sizes, images and samples. One step at batch 1: an order of magnitude."""
    torch.set_num_threads(cfg.threads or max(1, min(8, os.cpu_count() or 1)))
    f = filter_data.parse_args(filter_argv(cfg))
    n_faces = len(filter_data.read_dataset(f)["labels"])
    torch.manual_seed(cfg.seed)
    model, _, _ = build_ddpm(cfg)
    clf = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, num_classes=2)
    cnn = filter_data.SmallCNN(image_size=cfg.image_size, width=f.width)
    x, t = torch.randn(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)

    def seconds(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    unet_train = seconds(lambda: model(x, t).float().mean().backward())
    clf_grad = seconds(lambda: clf(x, t).float().mean().backward())  # a training step ~ one guidance gradient
    cnn_train = seconds(lambda: cnn(x).float().mean().backward())
    with torch.no_grad():
        unet_fwd = seconds(lambda: model(x, t))
    chain = len(ddpm.space_timesteps(cfg.T, cfg.sample_respacing))
    guided = cfg.runs + len(parse_floats(cfg.lambda_sweep))
    parts = {"filter": (f.members + 2) * (f.steps * f.batch + n_faces / 3) * cnn_train,  # step 1, ensemble, judge
             "DDPM": cfg.steps * cfg.batch * unet_train,
             "classifier": cfg.runs * cfg.clf_steps * cfg.clf_batch * clf_grad,
             "sampling": cfg.n_samples * chain * ((1 + guided) * unet_fwd + guided * clf_grad)}
    return sum(parts.values()), parts


def run_faces_cli(cfg):
    """main() for --data celeba|folder|csv: without CUDA the paper's networks first get a time estimate and a
    refusal (unless --force), and the CPU preset says what it is; then run_faces in a prepared --out, then
    the headline."""
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if not gpu and "paper" not in (cfg.unet, cfg.clf):  # the default on a laptop: say what it is and is not
        print("no GPU: this is the reduced CPU preset (smoke scale; it runs end to end but does not reproduce the "
              "paper's numbers). The paper's configuration took about 20 h for the DDPM on 2 GPUs and 8 h for the "
              "classifier (App. C); add --paper to get this machine's estimate for it (the run then stops).")
    if "paper" in (cfg.unet, cfg.clf) and not gpu:
        total, parts = paper_cost_estimate(cfg)
        msg = (f"train.py: the paper's configuration without a GPU would take about {_duration(total)} on this "
               f"machine ({', '.join(f'{k} {_duration(v)}' for k, v in parts.items())}; estimated from one timed "
               f"step at batch 1 of each network here, not from a run; the paper, App. C: about 20 h for the DDPM on "
               f"2 GPUs and 8 h for the classifier on one). Use a GPU, or drop --paper for the CPU "
               f"preset (smoke scale, not a reproduction): python train.py {shlex.join(source_flags(cfg))}"
               f". --force runs it anyway.")
        if not cfg.force:
            raise SystemExit(msg)
        print(msg)
        if cfg.precision == "fp16":
            print("--force on the CPU: --precision fp16 needs CUDA; using fp32")
            cfg.precision = "fp32"
    r = run_in_processes(cfg, run_faces, f"{cfg.data} {cfg.attr if cfg.data == 'celeba' else ''}".strip())
    if r is not None:
        g, tr, un = r["rows"][0], r["rows"][cfg.runs], r["rows"][cfg.runs + 1]
        print(f"report: {os.path.join(cfg.out, 'report.md')}")
        print(f"HEADLINE {r['attr']} histogram vs uniform, MSE / KLD (data range): guided {g['data']['mse']:.3f} / "
              f"{g['data']['kld']:.3f} (paper 0.13 / 0.61), training {tr['data']['mse']:.3f} / {tr['data']['kld']:.3f} "
              f"(0.56 / 3.17), unconditional {un['data']['mse']:.3f} / {un['data']['kld']:.3f} (0.64 / 3.5), "
              f"{r['timings_s']['total_s'] / 60:.1f} min")
    return r


if __name__ == "__main__":
    main()
