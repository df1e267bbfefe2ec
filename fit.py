"""fit.py -- the one training loop, for every network zsi trains.

The DDPM (App. A), the noisy guidance classifier (Sec. 4.2), the filter ensemble's CNNs and the
evaluation classifier (App. C), the class-conditional DDPM of classifier-free guidance (App. J),
the transformer backbone, the generalization study's pairs and the App. K regressor all train here,
with `fit(model, loss_fn, settings, ckpt_path, rt, meta, identity)`:

    for step in range(start, steps):
        g = step_generator(seed, stream, rank, step)      # every draw of step k is a function of k
        lr = lr_at(step)                                  # warm-up, then constant (or cosine decay)
        loss = mean(loss_fn(model, batch, g)["loss"])     # under autocast: fp32 | bf16 | fp16
        skip the step if the loss is not finite (all ranks agree)
        scaled backward, unscale, clip the gradient norm, optimizer step, scaler update
        (fp16: the scaler skips the optimizer step when a gradient overflowed, and so do we the EMA)
        ema <- decay ema + (1 - decay) model              # decay min(ema, (1+k)/(10+k)) with warm-up
        every log_every steps: a row of train_log.csv (interval means of the loss terms, lr, gradient
                               norm, images/s, wall time)
        every ckpt_every steps, at --stop-at and at the end: an atomic, self-describing checkpoint

Exact resume. A checkpoint holds the weights, the EMA, the optimizer and scaler states, the log
rows and the running sums of the unfinished log interval. Random draws are keyed by the step, not
carried in generator states. So a run killed at any moment and resumed on the CPU continues bit for bit:
the weights, the EMA and train_log.csv equal an uninterrupted run's (the wall-time columns aside). On
CUDA it is equal in distribution only: cuDNN's backward kernels are not deterministic and its fp32
convolutions run in TF32 (torch's default), and a resume on another kind of device draws from that
device's random streams.

Interrupts. Ctrl-C (SIGINT) or SIGTERM during training finishes the current step, writes a
checkpoint and raises plumbing.Interrupted; the command lines (plumbing.guard) print how to resume and
exit with 130 / 143. Under DDP the signal reaches the processes at different steps; they agree through
each step's all-reduce and all pause after the same step. `settings.stop_at` pauses the same way at a
given step, without a signal.

Loss scaling (fp16). The loss is multiplied by a scale S before the backward pass so that small
float16 gradients do not flush to zero; the gradients are divided by S again before clipping and the
step (torch.amp.GradScaler). A step whose gradients hold an inf or a NaN (an fp16 overflow of S times
the gradient) is not taken: no optimizer step, no EMA update, S <- S * 0.5; after
`loss_scale_growth_interval` clean steps in a row S <- 2 S. Such a step counts in the log's `skipped`
column like a step with a non-finite loss (skipped = optimizer steps not taken, cumulative), its terms
stay out of the interval means, and fp16 rows carry the scale at the row's end (`loss_scale`). This runs
on the CPU too (float16 autocast and GradScaler("cpu")), which is how tests/test_fit.py checks it; the
command lines keep fp16 for CUDA, where it pays. (The released trainer, guided-diffusion's, keeps
log2 S instead: it starts at 20, adds 0.001 per clean step and subtracts 1 on an overflow.)

Batches. `ddpm_loss`, `classifier_loss` and `regressor_loss` turn a tensor of training images into
the loss_fn of a network: a random batch (with replacement), random left-right flips (the data
augmentation of the paper's circles and faces), noise levels and noise.
"""
import copy
import dataclasses
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import classifier
import ddpm
import plumbing


# ----------------------------------------------------------------------------------------------
# Processes and devices
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


def setup_runtime(device="auto", threads=0):
    """Pick the device and threads; join the process group when started by torchrun (nccl on CUDA,
    gloo on the CPU). Threads are shared among the processes of this machine (never oversubscribed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if threads or not torch.cuda.is_available():
        plumbing.set_threads(threads, processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    rank = int(os.environ.get("RANK", "0"))
    dev = plumbing.check_device(device)
    if dev.type == "cuda" and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SystemExit(f"error: torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on "
                             f"this machine, which has {torch.cuda.device_count()} CUDA device(s): one process per "
                             f"GPU (--nproc_per_node {torch.cuda.device_count()})")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(rank, world, dev)


def step_generator(seed, stream, rank, step, device):
    """The generator for one training step: every draw of step k on rank r is a function of (seed, stream, r, k)."""
    g = torch.Generator(device=device)
    g.manual_seed(((seed * 1_000_003 + stream) * 1_009 + rank) * 10_000_019 + step)
    return g


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
# The loop
# ----------------------------------------------------------------------------------------------

@dataclass
class FitSettings:
    """The optimisation numbers `fit` needs (each network gets its own)."""
    steps: int
    batch: int
    lr: float
    warmup: int = 0
    schedule: str = "constant"  # after warm-up: "constant" (improved DDPM) or "cosine" (decay to 0)
    weight_decay: float = 0.0
    ema: float = 0.0            # 0 = no EMA copy
    ema_warmup: bool = True     # decay min(ema, (1+k)/(10+k)); False: the plain decay from step 0
    grad_clip: float = 1.0      # max gradient norm; 0 = no clipping
    precision: str = "fp32"     # fp32 | bf16 | fp16 (fp16 with loss scaling)
    # fp16's GradScaler: the first loss scale and the clean steps before it doubles (torch's defaults;
    # tests shrink the interval to see the growth). Its back-off on an overflow is the default 0.5.
    loss_scale_init: float = 2.0 ** 16
    loss_scale_growth_interval: int = 2000
    seed: int = 0
    stream: int = 0             # separates the random streams of models trained with the same seed
    log_every: int = 50
    ckpt_every: int = 500
    stop_at: int = 0            # pause with a checkpoint after this step (0 = never)


def lr_at(step, s):
    """Linear warm-up over s.warmup steps, then constant (the improved-DDPM recipe keeps lr fixed) or a
    cosine decay to 0 at s.steps (the filter's CNNs)."""
    lr = s.lr * min(1.0, (step + 1) / s.warmup) if s.warmup > 0 else s.lr
    if s.schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / s.steps))
    return lr


def ema_decay(step, s):
    """The EMA decay at step k: min(ema, (1+k)/(10+k)) with warm-up (early averages forget the random
    initialisation quickly), else the plain s.ema."""
    return min(s.ema, (1 + step) / (10 + step)) if s.ema_warmup else s.ema


def make_optimizer(params, s, device):
    """AdamW (lr s.lr, weight decay s.weight_decay, betas 0.9 / 0.999) with torch's fused kernel on the CPU
    and CUDA: one pass over all parameters instead of a loop of small ops per parameter; the same
    update up to float rounding, and a shorter CPU circles DDPM step (docs/RESULTS.md)."""
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, fused=device.type in ("cpu", "cuda"))


def _copy_for_ema(model):
    """A frozen copy of the model that _update_ema keeps as the exponential moving average."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def _update_ema(ema, model, decay):
    """theta_ema <- decay theta_ema + (1 - decay) theta (one multi-tensor lerp over all parameters)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


@dataclass
class _State:
    """What a checkpoint carries besides the weights: where training stands and the unfinished interval."""
    step: int = 0
    log: list = dataclasses.field(default_factory=list)
    sums: dict = dataclasses.field(default_factory=dict)   # running sums of the logged terms since the last row
    count: int = 0                                          # finite steps in those sums
    skipped: int = 0                                        # optimizer steps not taken: a non-finite loss,
                                                            # or fp16 gradients that overflowed (the scaler)
    wall_s: float = 0.0                                     # training wall time before this process


def _restore(ckpt_path, identity, model, ema, opt, scaler, desc, main, kind=None):
    """The _State of a resumable checkpoint, weights loaded; a checkpoint of another kind or configuration,
    or one whose weights do not fit the network, is refused in one line."""
    ckpt = plumbing.load_checkpoint(ckpt_path, kind)
    old = ckpt.get("identity", {})
    diff = sorted(k for k in set(old) | set(identity) if k in old and old.get(k) != identity.get(k))
    if diff:
        raise SystemExit(f"error: cannot resume from {ckpt_path}: it was trained with a different configuration "
                         f"({', '.join(diff)}); use another --out or --overwrite")
    try:
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise plumbing.CheckpointError(f"error: cannot resume from {ckpt_path}: its weights do not fit this network "
                                       f"({type(e).__name__}); use another --out or --overwrite") from None
    scaler.load_state_dict(ckpt["scaler"])
    st = _State(step=ckpt["step"], log=list(ckpt["log"]), **ckpt.get("interval", {}))
    if main:
        print(f"[{desc}] resumed from {ckpt_path} at step {st.step}")
    return st


def fit(model, loss_fn, s, ckpt_path, rt, meta, identity, resume=False, on_step=None, desc="train", log_dir=None):
    """Train `model` for s.steps steps of `loss_fn`; return (model, ema_model, log rows).

    loss_fn(model, batch_size, generator) -> dict of per-example terms with a "loss" entry (B,).
    meta     : what rebuilds the model (kind, model config, ...), stored in the checkpoint.
    identity : the run's configuration (a plain dict); resuming a checkpoint of another one is refused.
    on_step(step, ema_model): called on rank 0 after each step (sample grids, ...).
    log_dir  : where train_log.csv and loss.png go (default: logs/<checkpoint name>/ beside it).
    A checkpoint whose step equals s.steps means the network is done: it is returned without training.
    """
    device = rt.device
    model.to(device)
    ema = _copy_for_ema(model) if s.ema > 0 else None
    opt = make_optimizer(model.parameters(), s, device)
    scaler = torch.amp.GradScaler(device.type, init_scale=s.loss_scale_init,
                                  growth_interval=s.loss_scale_growth_interval, enabled=(s.precision == "fp16"))
    log_dir = log_dir or os.path.join(os.path.dirname(ckpt_path), "logs", os.path.splitext(os.path.basename(ckpt_path))[0])
    st = (_restore(ckpt_path, identity, model, ema, opt, scaler, desc, rt.main, meta.get("kind"))
          if resume and os.path.exists(ckpt_path) else _State())
    plumbing.credit(st.wall_s)  # earlier processes' training time counts in the run's timed stage
    if rt.main:
        TrainLog(log_dir).rewrite(st.log)  # a resumed log continues exactly where its checkpoint stood
    if st.step >= s.steps or 0 < s.stop_at <= st.step:  # done, or already paused at --stop-at
        return model, ema, st.log
    net = torch.nn.parallel.DistributedDataParallel(model) if rt.world > 1 else model

    def checkpoint(step):
        if rt.main:
            interval = dict(sums=st.sums, count=st.count, skipped=st.skipped, wall_s=st.wall_s + time.time() - t0)
            plumbing.save_checkpoint(ckpt_path, dict(meta, identity=identity, step=step, log=st.log, interval=interval,
                                                     model=model.state_dict(), ema=ema.state_dict() if ema else None,
                                                     optimizer=opt.state_dict(), scaler=scaler.state_dict()))
            TrainLog(log_dir).plot(st.log, desc)

    with _signals_to_flag() as stop:
        bar = plumbing.Progress(s.steps, desc, initial=st.step, enabled=rt.main)
        t0, t_row, seen = time.time(), time.time(), 0
        for step in range(st.step, s.steps):
            terms, grad_norm, agreed = _one_step(net, model, ema, opt, scaler, loss_fn, s, rt, step, stop)
            signum = agreed if rt.world > 1 else stop.signum   # alone, a signal during the step counts now
            seen += max(1, s.batch // rt.world) * rt.world
            if terms is None:
                st.skipped += 1
            else:
                for k, v in dict(terms, grad_norm=grad_norm).items():
                    st.sums[k] = st.sums.get(k, 0.0) + v
                st.count += 1
            if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
                row = _log_row(st, step, s, seen / max(time.time() - t_row, 1e-9), st.wall_s + time.time() - t0,
                               scaler)
                seen, t_row = 0, time.time()
                if rt.main:
                    TrainLog(log_dir).append(row)
            bar.update(1, loss=f"{st.log[-1]['loss']:.4f}" if st.log and "loss" in st.log[-1] else "-")
            if on_step is not None and rt.main:
                on_step(step + 1, ema if ema is not None else model)
            if (step + 1) % s.ckpt_every == 0 or step + 1 in (s.steps, s.stop_at) or signum:
                checkpoint(step + 1)
            if signum:
                bar.close()
                raise plumbing.Interrupted(step + 1, signum, ckpt_path)
            if step + 1 == s.stop_at:
                break
        bar.close()
    if rt.world > 1:
        check_replicas(model, rt)
    return model, ema, st.log


def _one_step(net, model, ema, opt, scaler, loss_fn, s, rt, step, stop):
    """One optimisation step: (means of the loss terms, gradient norm before clipping, signal), with
    (None, None, signal) when the step was skipped: the loss was not finite (on every rank: they must agree under
    DDP), or fp16 gradients overflowed and the scaler skipped the optimizer step (DDP's all-reduced
    gradients make every rank see the same overflow). signal: the SIGINT/SIGTERM to pause on after this
    step, 0 for none. Under DDP the ranks agree on it too: a signal reaches the processes at different
    steps, and a rank that stopped alone would leave the others waiting in the next step's all-reduce."""
    g = step_generator(s.seed, s.stream, rt.rank, step, rt.device)
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=g, device=rt.device)))  # dropout etc.
    for group in opt.param_groups:
        group["lr"] = lr_at(step, s)
    with plumbing.autocast(s.precision, rt.device):  # fp32: none; bf16; fp16 (with the scaler)
        terms = loss_fn(net, max(1, s.batch // rt.world), g)
    loss = terms["loss"].float().mean()
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(stop.signum)], device=rt.device)
    if rt.world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)   # any rank's NaN or signal counts for all
    bad, signum = (int(v) for v in flags.tolist())
    opt.zero_grad(set_to_none=True)
    if bad != 0:
        return None, None, signum
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # true gradients: the norm and the clipping see them, not the scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip if s.grad_clip > 0 else float("inf"))
    scale = scaler.get_scale()
    scaler.step(opt)      # skipped by the scaler when fp16 gradients overflowed (inf/nan)
    scaler.update()       # ... which halves the scale; it doubles after loss_scale_growth_interval clean steps
    if scaler.is_enabled() and scaler.get_scale() < scale:
        return None, None, signum  # the back-off is the scaler's record of a skipped step (backoff_factor < 1)
    if ema is not None:
        _update_ema(ema, model, ema_decay(step, s))
    return {k: float(v.detach().float().mean()) for k, v in terms.items()}, float(norm), signum


def _log_row(st, step, s, img_per_s, wall_s, scaler=None):
    """Close the log interval ending at `step`: a row of interval means, appended to st.log (with the fp16
    loss scale at the row's end when the scaler is on)."""
    row = {k: v / max(st.count, 1) for k, v in st.sums.items()}  # means over the interval's steps taken
    row.update(step=step + 1, lr=lr_at(step, s), skipped=st.skipped, img_per_s=img_per_s, wall_s=wall_s)
    if scaler is not None and scaler.is_enabled():
        row["loss_scale"] = scaler.get_scale()
    st.log.append(row)
    st.sums, st.count = {}, 0
    return row


class _signals_to_flag:
    """Within the block, SIGINT and SIGTERM set `.signum` instead of killing the process (main thread only),
    so the loop can finish its step and checkpoint; the previous handlers come back at the end."""

    def __enter__(self):
        self.signum, self.old = 0, {}
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False


def _in_main_thread():
    import threading
    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# train_log.csv and loss.png
# ----------------------------------------------------------------------------------------------

class TrainLog:
    """One network's log on disk: train_log.csv (a row per log interval, appended as training goes)
    and loss.png (the loss on a log scale, raw interval means as points under a smoothed line)."""
    FIRST, LAST = ["step", "loss"], ["lr", "grad_norm", "skipped", "img_per_s", "wall_s"]

    def __init__(self, folder):
        self.folder = folder
        self.csv = os.path.join(folder, "train_log.csv")

    def columns(self, row):
        middle = sorted(k for k in row if k not in self.FIRST + self.LAST)
        return [k for k in self.FIRST + middle + self.LAST if k in row]

    def _line(self, values):
        return ",".join(values) + "\n"

    def _format(self, row, columns):
        return self._line(repr(int(row[k])) if k in ("step", "skipped") else f"{row.get(k, float('nan')):.9g}"
                          for k in columns)

    def rewrite(self, rows):
        """Write the whole CSV (atomically) from log rows: a fresh run (header only) or a resumed one."""
        if not rows:
            if os.path.exists(self.csv):
                os.remove(self.csv)
            return
        cols = self.columns(rows[0])
        text = self._line(cols) + "".join(self._format(r, cols) for r in rows)
        plumbing.write_bytes_atomically(self.csv, text.encode())

    def append(self, row):
        """Add one row (the header first, when the file is new)."""
        os.makedirs(self.folder, exist_ok=True)
        new = not os.path.exists(self.csv)
        cols = self.columns(row) if new else self._header()
        with open(self.csv, "a") as fh:
            fh.write((self._line(cols) if new else "") + self._format(row, cols))

    def _header(self):
        with open(self.csv) as fh:
            return fh.readline().strip().split(",")

    def plot(self, rows, title):
        """loss.png: the interval means of the loss (points) and their exponential smoothing (line), log y."""
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] > 0 and math.isfinite(r["loss"])]
        if not pts:
            return
        fig = plumbing.new_figure(6.0, 3.6)
        ax = fig.add_subplot(1, 1, 1)
        steps, losses = zip(*pts)
        smooth, m = [], None
        for v in losses:
            m = v if m is None else 0.8 * m + 0.2 * v
            smooth.append(m)
        ax.plot(steps, losses, ".", ms=3, alpha=0.4, label="mean over each log interval")
        ax.plot(steps, smooth, "-", lw=1.5, label="smoothed (EMA 0.8)")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        ax.set_title(f"{title}: training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        plumbing.save_figure(fig, os.path.join(self.folder, "loss.png"))


def read_train_log(path):
    """train_log.csv -> list of dicts of floats (step and skipped as ints)."""
    with open(path) as fh:
        lines = fh.read().splitlines()
    cols = lines[0].split(",")
    return [{c: (int(v) if c in ("step", "skipped") else float(v)) for c, v in zip(cols, line.split(","))}
            for line in lines[1:] if line]


# ----------------------------------------------------------------------------------------------
# Batches: what each network trains on
# ----------------------------------------------------------------------------------------------

def random_hflip(x, labels, generator):
    """Flip each sample left-right with probability 1/2; a flipped sample's label toggles its x bit.

    x: (B, C, H, W) tensor, labels: (B,) int tensor, {0, 1} (left/right: 0 <-> 1) or the quadrants
    0..3 of the corners data (0 <-> 1, 2 <-> 3); label ^ 1 does both. Draws B uniforms from `generator`.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # column c -> W - 1 - c
    labels = torch.where(flip, labels ^ 1, labels)
    return x, labels


def draw_batch(x0, labels, batch, g, hflip=True, swap_labels=True):
    """A random batch (with replacement) of images x0 (N, C, H, W) and labels (N,) (None: zeros),
    each flipped left-right with probability 1/2 unless hflip=False (the flips are drawn either way,
    so later draws do not depend on it). swap_labels: a flip toggles the label (circles: left <-> right);
    False keeps it (a mirrored face keeps its smile)."""
    idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
    y0 = labels[idx] if labels is not None else torch.zeros(batch, dtype=torch.long, device=x0.device)
    x, y = random_hflip(x0[idx], y0, g)
    if not hflip:
        return x0[idx], y0
    return x, (y if swap_labels else y0)


def seconds_per_image(model, image_size, n, train=True):
    """Wall seconds per image of one step of `model` on n random images at t = 0, timed after a warm-up step:
    forward and backward (train) or a forward alone. The cost model behind a run's expected time."""
    x, t = torch.randn(n, 3, image_size, image_size), torch.zeros(n, dtype=torch.long)
    if train:
        return plumbing.step_seconds(lambda: model(x, t).float().mean().backward()) / n
    with torch.no_grad():
        return plumbing.step_seconds(lambda: model(x, t)) / n


def ddpm_loss(diffusion, x0, hflip=True, labels=None, label_dropout=0.0, swap_labels=True, t_tilt=0.0):
    """loss_fn for the DDPM: a random batch of training images (draw_batch), t ~ U{0..T-1}, eps ~ N(0, I),
    the terms of diffusion.training_losses (L_hybrid: Eq. 7 of App. A). hflip=False trains on exactly the
    given images (the generalization study's disjoint sets). t_tilt > 0 draws t from ddpm.timestep_probs
    instead (more often at the noisy end, the loss not reweighted); 0 keeps the uniform draw bit for bit.

    labels (N,) trains a class-conditional denoiser for classifier-free guidance (App. J; Ho & Salimans
    2022, Algorithm 1): net(x_t, t, y) with the batch's labels, each replaced by the null label
    net.num_classes with probability label_dropout (0.1 in the released config), drawn after t and eps,
    so the unconditional path's draws are unchanged. The fraction of null labels is logged as "null_label"."""
    probs = torch.from_numpy(ddpm.timestep_probs(diffusion.num_timesteps, t_tilt)).float().to(x0.device) if t_tilt else None

    def loss_fn(net, batch, g):
        x, y = draw_batch(x0, labels, batch, g, hflip, swap_labels)
        if t_tilt == 0:
            t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        else:
            t = torch.multinomial(probs.to(g.device), batch, replacement=True, generator=g).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        if labels is None:
            return diffusion.training_losses(net, x, t, noise)
        null = torch.rand(batch, generator=g, device=g.device).to(x0.device) < label_dropout
        y = torch.where(null, getattr(net, "module", net).num_classes, y)  # DDP wraps the model in .module
        terms = diffusion.training_losses(lambda xt, tt: net(xt, tt, y=y), x, t, noise)
        return dict(terms, null_label=null.float())
    return loss_fn


def classifier_loss(diffusion, x0, labels, swap_labels=True, hflip=True):
    """loss_fn for the noisy guidance classifier (Sec. 4.2): x_t at t ~ U{0..T-1} with its label
    (classifier.classifier_losses: cross-entropy and accuracy). Batches as draw_batch draws them: flipped
    left-right unless hflip=False (digits: a flip negates the slant), labels swapped by a flip or not."""
    def loss_fn(net, batch, g):
        x, y = draw_batch(x0, labels, batch, g, hflip, swap_labels)
        t = torch.randint(diffusion.num_timesteps, (batch,), generator=g, device=g.device).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        return classifier.classifier_losses(net, diffusion, x, y, t, noise)
    return loss_fn


def regressor_loss(x0, targets):
    """loss_fn for the App. K regressor: clean images and their known attributes, no noise, no flips."""
    def loss_fn(net, batch, g):
        idx = torch.randint(len(x0), (batch,), generator=g, device=g.device).to(x0.device)
        return classifier.regression_losses(net, x0[idx], targets[idx])
    return loss_fn
