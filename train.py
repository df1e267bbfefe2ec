"""train.py -- the one trainer and the experiment it runs.

What this file is
    1. A configuration (one dataclass; `--data circles` picks a named preset, `--paper` switches
       every number to the paper's configuration for GPUs; both share every line of code).
    2. The one training loop, `fit`, used for the DDPM and for the noisy classifier alike: fixed
       number of steps, AdamW with linear warm-up, EMA, gradient clipping, mixed precision,
       DistributedDataParallel under torchrun, atomic self-describing checkpoints and exact resume.
    3. The circles experiment of the paper's Section 5.5: data -> DDPM -> noisy classifier(s) ->
       multi-guided and unconditional sampling -> evaluation -> report.md.

Run it
    python train.py --data circles                      # CPU preset, writes runs/circles/
    python train.py --data circles --paper              # the paper's configuration (GPU)
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
import json
import math
import os
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
import multiguide
import toy_circles
import unet


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    """Every number of a run. Defaults are the CPU circles preset; PAPER_PRESETS holds the paper's."""
    data: str = field(default="circles", metadata={"help": "data set preset", "choices": ["circles"]})
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
    lambdas: str = field(default="30,30", metadata={"help": "multi-guidance weights, one per class (left,right)"})
    lambda_sweep: str = field(default="", metadata={"help": "also evaluate these equal weights, e.g. 0,10,30,60"})
    # --- noisy guidance classifier (Sec. 4.2, 5.5) ---
    clf: str = field(default="cpu", metadata={"help": "classifier preset in classifier.py", "choices": sorted(classifier.PRESETS)})
    clf_steps: int = field(default=500, metadata={"help": "classifier training steps"})
    clf_lr: float = field(default=3e-4, metadata={"help": "classifier AdamW learning rate"})
    clf_batch: int = field(default=64, metadata={"help": "classifier batch size"})
    spectral_norm: bool = field(default=False, metadata={"help": "spectral normalisation in the classifier (Sec. 5.5)"})
    runs: int = field(default=1, metadata={"help": "classifiers with different seeds, one DDPM (the paper: 10)"})
    heatmap_t: int = field(default=0, metadata={"help": "chain step of the classifier heatmap (Fig. 7b)"})
    # --- run control (not part of a run's identity) ---
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoints"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds another run"})
    stop_at: int = field(default=0, metadata={"help": "stop (with a checkpoint) after this step; 0 = never"})


# Options that may change when a run is resumed. --steps may grow: the learning rate does not
# depend on the total, so 2000 steps then 1000 more equal 3000 steps in one go.
RUN_CONTROL = ("resume", "overwrite", "stop_at", "device", "threads", "out", "steps")

PRESETS = {"circles": {}}  # the dataclass defaults are the circles CPU preset
PAPER_PRESETS = {
    # Section 5.5 with the authors' released circles config (PAPER_FACTS.md): 64x64, 128 channels,
    # mult 1,2,3,4, 3 res blocks, attention at 16 and 8, T = 4000 cosine respaced to 250 steps for
    # training, L_hybrid, AdamW 1e-4, batch 64, fp16, 30k steps, EMA 0.9999; 64 sampling steps.
    "circles": dict(image_size=64, unet="paper", attention="16,8", T=4000, train_respacing="250",
                    steps=30000, batch=64, lr=1e-4, warmup=0, ema=0.9999, precision="fp16",
                    sample_respacing="64", ckpt_every=2000, grid_every=5000, log_every=200,
                    n_samples=1000, sample_batch=250, clf="paper", clf_steps=3000, clf_lr=3e-4, runs=10),
}


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
    args = parser.parse_args(argv)
    values = {**PRESETS[args.data or "circles"], **(PAPER_PRESETS[args.data or "circles"] if args.paper else {})}
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "paper"})
    cfg = Config(**values)
    cfg.out = cfg.out or os.path.join("runs", cfg.data + ("_paper" if args.paper else ""))
    check_config(cfg, parser)
    return cfg


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
        if name == "lambdas" and len(values) != 2:
            parser.error(f"--lambdas wants one weight per class (2 for circles: left,right), got {len(values)}")
    if cfg.backbone == "dit" and cfg.attention:
        parser.error("--attention sets U-Net attention resolutions; it does not apply to --backbone dit")
    if os.path.isfile(cfg.out):
        parser.error(f"--out {cfg.out} is a file; expected a folder")


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
        if ckpt["identity"] != identity:
            diff = sorted(k for k in identity if ckpt["identity"].get(k) != identity.get(k))
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

    unet_overrides: more U-Net keywords, e.g. in_channels=1 for grey images (generalization.py)."""
    overrides = dict(image_size=cfg.image_size, learn_sigma=cfg.learn_sigma)
    if cfg.attention:
        overrides["attention_resolutions"] = tuple(int(r) for r in cfg.attention.split(","))
    overrides.update(unet_overrides)
    if cfg.backbone == "dit":  # App. J: the same diffusion with a transformer denoiser
        model = dit.build_dit(cfg.dit, image_size=cfg.image_size, learn_sigma=cfg.learn_sigma)
    else:
        model = unet.build_unet(cfg.unet, **overrides)
    d = dict(schedule=cfg.schedule, T=cfg.T, learn_sigma=cfg.learn_sigma, loss=cfg.loss,
             respacing=cfg.train_respacing)
    return model, ddpm.diffusion_from_config(d), d


def ddpm_loss(diffusion, x0, hflip=True):
    """loss_fn for fit: a random batch of training images (flipped at random unless hflip=False), t ~ U{0..T-1},
    eps ~ N(0, I). hflip=False trains on exactly the given images (generalization.py's disjoint sets)."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        x, _ = toy_circles.random_hflip(x0[idx], torch.zeros(batch, dtype=torch.long, device=x0.device), g)
        x = x if hflip else x0[idx]  # the flip's uniforms are drawn either way: same t and eps for both
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        return diffusion.training_losses(net, x, t, noise)
    return loss_fn


def fit_settings(cfg, **changes):
    s = FitSettings(steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                    ema=cfg.ema, grad_clip=cfg.grad_clip, precision=cfg.precision, seed=cfg.seed,
                    log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, stop_at=cfg.stop_at)
    return dataclasses.replace(s, **changes)


def train_ddpm(cfg, rt, images):
    """Stage 1: the unconditional DDPM on the training images; writes ddpm.pt and EMA sample grids."""
    torch.manual_seed(cfg.seed)
    model, diffusion, d = build_ddpm(cfg)
    if rt.main:
        name = f"DiT '{cfg.dit}'" if cfg.backbone == "dit" else f"U-Net '{cfg.unet}'"
        print(f"DDPM: {name} {unet.count_params(model):,} parameters, T = {cfg.T} {cfg.schedule}, "
              f"loss {cfg.loss}, {len(images)} training images of {cfg.image_size}x{cfg.image_size}")
    x0 = toy_circles.to_tensor(images).to(rt.device)
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
    model, ema, log = fit(model, ddpm_loss(diffusion, x0), fit_settings(cfg), os.path.join(cfg.out, "ddpm.pt"),
                          rt, meta, identity, resume=cfg.resume, on_step=on_step, desc="DDPM")
    return ema, d, log


# ----------------------------------------------------------------------------------------------
# The classifier stage
# ----------------------------------------------------------------------------------------------

def classifier_loss(diffusion, x0, labels):
    """loss_fn for fit: noisy images x_t at t ~ U{0..T-1} with their labels (flips swap the label)."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        x, y = toy_circles.random_hflip(x0[idx], labels[idx], g)
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        return classifier.classifier_losses(net, diffusion, x, y, t, noise)
    return loss_fn


def train_classifier(cfg, rt, data, run_index):
    """Stage 2: noisy classifier number `run_index` (seed = --seed + run_index), writes classifier{run}.pt."""
    seed = cfg.seed + run_index
    torch.manual_seed(seed)
    model = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, spectral_norm=cfg.spectral_norm)
    _, diffusion, d = build_ddpm(cfg)
    x0 = toy_circles.to_tensor(data["images"]).to(rt.device)
    labels = torch.as_tensor(data["labels"]).to(rt.device)
    meta = dict(kind="classifier", model_config=model.config, diffusion=d)
    identity = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL}
    s = fit_settings(cfg, steps=cfg.clf_steps, batch=cfg.clf_batch, lr=cfg.clf_lr, warmup=0, ema=0.0,
                     seed=seed, stream=1, ckpt_every=max(cfg.clf_steps, 1), stop_at=0)
    model, _, log = fit(model, classifier_loss(diffusion, x0, labels), s,
                        os.path.join(cfg.out, f"classifier{run_index}.pt"), rt, meta, identity,
                        resume=cfg.resume, desc=f"classifier {run_index}")
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
            diff = sorted(k for k in identity if old.get(k) != identity[k])
            if diff:
                raise SystemExit(f"train.py: cannot --resume {cfg.out}: its run used other values for "
                                 f"{', '.join('--' + k.replace('_', '-') for k in diff)}")
    os.makedirs(cfg.out, exist_ok=True)
    toy_circles.write_bytes_atomically(config_path, (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())


PAPER_CIRCLES = dict(accuracy=(0.78, 0.087), bad=(0.0425, 0.0245), spectral_best=0.90)  # Sec. 5.5


def sample_and_evaluate(cfg, rt, model, d, name, ddpm_step, clf=None, lambdas=(0.0, 0.0)):
    """Sample cfg.n_samples images (guided when lambdas != 0), save NPZ + grid, return circle_stats.

    Under --resume, samples already drawn from the same DDPM step with the same weights are reused.
    """
    path = os.path.join(cfg.out, "samples", f"{name}.npz")
    if cfg.resume and os.path.exists(path):
        old = np.load(path)
        if int(old["ddpm_step"]) == ddpm_step and list(old["lambdas"]) == list(lambdas):
            images = old["images"]
            return _save_sample_grid(cfg, images, name)
    x = multiguide.sample(model, d, cfg.n_samples, classifier=clf if any(lambdas) else None,
                          lambdas=list(lambdas), respacing=cfg.sample_respacing, sampler=cfg.sampler,
                          batch=cfg.sample_batch, seed=cfg.seed + 1, device=rt.device, progress=True)
    images = toy_circles.to_uint8(x)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, images=images, lambdas=np.array(lambdas), ddpm_step=ddpm_step)
    os.replace(tmp, path)
    return _save_sample_grid(cfg, images, name)


def _save_sample_grid(cfg, images, name):
    toy_circles.save_grid(images[:64], os.path.join(cfg.out, "samples", f"{name}.png"), nrow=8,
                          scale=max(1, 64 // cfg.image_size))
    return evaluate.circle_stats(images)


def mean_std(values):
    return float(np.mean(values)), float(np.std(values))


def run_experiment(cfg, rt):
    """Data -> DDPM -> classifiers -> guided + unconditional samples -> evaluation -> report.md."""
    t_start = time.time()
    data = toy_circles.make_circles(cfg.image_size, "train")
    if rt.main:
        toy_circles.save_grid(data["images"][::max(1, len(data["images"]) // 64)][:64],
                              os.path.join(cfg.out, "figures", "training_data.png"), nrow=8,
                              scale=max(1, 64 // cfg.image_size))
    timings = {}
    t0 = time.time()
    ema, d, log = train_ddpm(cfg, rt, data["images"])
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
    if rt.world > 1:  # sampling and evaluation are cheap: rank 0 does them alone
        dist.barrier()
        if not rt.main:
            return None
    ema.eval()
    diffusion = ddpm.diffusion_from_config(d)
    xs, ys, p = classifier.heatmap(clfs[0], diffusion, cfg.image_size, t=cfg.heatmap_t, seed=cfg.seed)
    heat = classifier.plot_heatmap(xs, ys, p, cfg.image_size, os.path.join(cfg.out, "figures", "classifier_heatmap.png"),
                                   f"p(right | circle at x, y), classifier 0, t = {cfg.heatmap_t}")
    t0 = time.time()
    uncond = sample_and_evaluate(cfg, rt, ema, d, "unconditional", ddpm_step)
    timings["unguided_sampling_s"] = time.time() - t0
    lambdas = parse_floats(cfg.lambdas)
    runs, t0 = [], time.time()
    for r, clf in enumerate(clfs):
        stats = sample_and_evaluate(cfg, rt, ema, d, f"guided_run{r}", ddpm_step, clf, lambdas)
        runs.append(stats)
        print(f"run {r}: accuracy {stats['accuracy']:.3f}, bad {stats['bad_fraction']:.3f}")
    timings["guided_sampling_s"] = time.time() - t0
    sweep = []
    for lam in parse_floats(cfg.lambda_sweep):
        stats = sample_and_evaluate(cfg, rt, ema, d, f"sweep_lambda{lam:g}", ddpm_step, clfs[0], (lam, lam))
        sweep.append(dict(lam=lam, accuracy=stats["accuracy"], bad_fraction=stats["bad_fraction"]))
        print(f"lambda {lam:g}: accuracy {stats['accuracy']:.3f}, bad {stats['bad_fraction']:.3f}")
    z_all = np.concatenate([np.asarray(s["z"])[np.asarray(s["n_circles"]) == 1] for s in runs])
    evaluate.plot_centre_histogram(z_all, os.path.join(cfg.out, "figures", "centre_x_histogram.png"), cfg.image_size,
                                   f"circle centre x of guided samples, lambda = {cfg.lambdas} ({len(runs)} runs)")
    evaluate.write_circles_csv(runs[0], os.path.join(cfg.out, "samples", "guided_run0.csv"))
    timings["total_s"] = time.time() - t_start
    results = dict(
        accuracy=mean_std([s["accuracy"] for s in runs]), bad_fraction=mean_std([s["bad_fraction"] for s in runs]),
        per_run=[dict(accuracy=s["accuracy"], bad_fraction=s["bad_fraction"]) for s in runs],
        unconditional=dict(accuracy=uncond["accuracy"], bad_fraction=uncond["bad_fraction"]),
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
        f"| lambda (left, right) | {r['lambdas']} | [30, 30] |",
        f"| sampling | {cfg.sampler}, {cfg.sample_respacing} steps, {cfg.n_samples} samples | ancestral, "
        f"64 steps (released config), 1000 samples |",
        f"| runtime | {r['timings_s']['total_s'] / 60:.1f} min on {cfg.device if cfg.device != 'auto' else 'this machine'} | "
        f"(GPU) |",
    ]
    sweep = ["", "## Guidance strength", "", "| lambda (both classes) | accuracy | bad fraction |", "|---|---|---|"]
    sweep += [f"| {s['lam']:g} | {100 * s['accuracy']:.1f}% | {100 * s['bad_fraction']:.1f}% |" for s in r["lambda_sweep"]]
    runs = ", ".join(f"{100 * x['accuracy']:.1f}%" for x in r["per_run"])
    t = r["timings_s"]
    lines = [
        f"# Circles: zero-shot interpolation (paper Section 5.5)", "",
        f"Command: `python {' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}` "
        f"(full configuration in `config.json`, numbers in `results.json`).", "",
        *rows, "",
        f"Per run: {runs}. Classifier heatmap: mean p(right) over the middle band "
        f"{r['heatmap']['middle_mean_p']:.2f}, transition width {r['heatmap']['transition_width']} columns.",
        f"Timings: DDPM {t['ddpm_training_s']:.0f} s, classifiers {t['classifier_training_s']:.0f} s, "
        f"unguided sampling {t['unguided_sampling_s']:.0f} s, guided sampling {t['guided_sampling_s']:.0f} s.",
        *(sweep if r["lambda_sweep"] else []), "",
        "## Figures", "",
        "Training data (centres only in the outer bands): ![training data](figures/training_data.png)", "",
        "Multi-guided samples, lambda = " + cfg.lambdas + ": ![guided](samples/guided_run0.png)", "",
        "Unconditional samples: ![unconditional](samples/unconditional.png)", "",
        "Centre x of the guided samples: ![histogram](figures/centre_x_histogram.png)", "",
        "Classifier p(right | circle at x, y) (Fig. 7b): ![heatmap](figures/classifier_heatmap.png)", "",
    ]
    return "\n".join(lines)


def run(cfg):
    rt = setup_runtime(cfg)
    if rt.main:
        prepare_out(cfg)
        print(f"zsi | data {cfg.data} | out {os.path.abspath(cfg.out)} | device {rt.device} x{rt.world} | "
              f"precision {cfg.precision}")
        print(json.dumps(dataclasses.asdict(cfg)))
    if rt.world > 1:
        dist.barrier()
    results = run_experiment(cfg, rt)
    if rt.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    if results is not None:
        acc, bad = results["accuracy"], results["bad_fraction"]
        print(f"report: {os.path.join(cfg.out, 'report.md')}")
        print(f"HEADLINE accuracy {100 * acc[0]:.1f}% +- {100 * acc[1]:.1f}% of samples in the unseen middle "
              f"(paper: 78% +- 8.7%), bad {100 * bad[0]:.1f}%, unconditional {100 * results['unconditional']['accuracy']:.1f}%, "
              f"{results['timings_s']['total_s'] / 60:.1f} min")


def main(argv=None):
    cfg = parse_config(argv)
    run(cfg)


if __name__ == "__main__":
    main()
