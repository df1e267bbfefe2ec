"""Benchmark unet.py on this CPU: training and sampling speed, peak memory, fp32 vs bf16, channels_last.

What is measured, for the `cpu` preset at 32x32 (batch 64) and the same net at 64x64 (batch 32):
- train img/s: forward + backward + AdamW step on random images, timesteps and targets; a few
  warm-up steps, then the median of the timed steps;
- eval ms/img: one network evaluation without gradients (as in sampling), batch 64, per image;
- peak MiB: the process's peak resident memory (`ru_maxrss`): every configuration runs in a fresh
  subprocess, so this is the peak of that configuration alone (torch itself takes ~300 MiB);
- fp32 against bf16 autocast (`torch.autocast("cpu", dtype=torch.bfloat16)`), channels_last on/off;
- achieved training GFLOP/s (3 x the forward FLOPs counted by torch's FlopCounterMode x img/s) as a
  fraction of this CPU's measured peak, the GFLOP/s of a 2048 x 2048 matrix product in the same dtype;
- if `diffusers` is importable: a diffusers `UNet2DModel` of about the same size (widths 32, 64, 64,
  one ResBlock per level, attention in the last level and the middle), at full resolution (it has no
  pixel-unshuffle stem), same batch, fp32; and the ratio ours/diffusers of train img/s.

This CPU is shared and its figures vary by tens of percent between runs, so the configurations run
interleaved (trial 1 of every configuration, then trial 2, ...) and the table reports medians over
trials, with the min-max range of train img/s.

Run:  OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_unet.py [--quick] [--json results.json]
(OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads from spinning; without it a run sharing the CPU
with another process was once 12x slower. The subprocesses get it unless you set it otherwise.)
A full run takes about 6.5 minutes on 2 cores; --quick (one trial, fewer steps) about 1.5.

One full run here (AMD EPYC, 2 threads, shared), train img/s: cpu preset 32x32 fp32 264, diffusers
UNet2DModel (1.19M parameters, 32x32) 101, so 2.6x; without our pixel-unshuffle stem, 1.0x. bf16
autocast: 0.94x at 32x32, 1.27x at 64x64. channels_last: 1.08x (32x32) and 1.14x (64x64) in fp32,
but about 0.8x under bf16. The stem is the lever; the others are within the noise or small.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable (plumbing is imported where needed, not by
    sys.path.insert(0, str(REPO))  # the workers: a diffusers worker's peak memory stays diffusers' own)

# (label, backbone, resolution, batch, bf16, channels_last); "cpu/stem1": the cpu preset without the
# pixel-unshuffle stem, to show how much of the speed is the stem and how much the implementation
CONFIGS = [
    ("cpu", "ours", 32, 64, False, False),
    ("cpu/stem1", "ours", 32, 64, False, False),
    ("cpu", "ours", 32, 64, True, False),
    ("cpu", "ours", 32, 64, False, True),
    ("cpu", "ours", 32, 64, True, True),
    ("diffusers", "diffusers", 32, 64, False, False),
    ("cpu@64", "ours", 64, 32, False, False),
    ("cpu@64", "ours", 64, 32, True, False),
    ("cpu@64", "ours", 64, 32, False, True),
    ("cpu@64", "ours", 64, 32, True, True),
    ("diffusers", "diffusers", 64, 32, False, False),
]


def build_model(label, backbone, resolution):
    """Our `cpu` preset at `resolution`, or a diffusers UNet2DModel of about the same size."""
    if backbone == "ours":
        from unet import build_unet
        model = build_unet("cpu", image_size=resolution, stem=1 if label == "cpu/stem1" else 2)
        return model, lambda x, t: model(x, t)
    from diffusers import UNet2DModel
    model = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=6, layers_per_block=1,
                        block_out_channels=(32, 64, 64), attention_head_dim=16,  # 4 heads of 16, as ours
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                        resnet_time_scale_shift="scale_shift")
    return model, lambda x, t: model(x, t).sample


def measure(label, backbone, resolution, batch, bf16, channels_last, warmup, steps):
    """One configuration, run inside a fresh worker process: returns a dict of figures."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, net = build_model(label, backbone, resolution)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, resolution, resolution).contiguous(memory_format=fmt)
    target = torch.randn(batch, 6, resolution, resolution)
    t = torch.randint(0, 1000, (batch,))

    def train_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x, t)  # (B, 6, H, W)
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    train_img_s = batch / statistics.median(times[warmup:])

    x_eval = torch.randn(64, 3, resolution, resolution).contiguous(memory_format=fmt)
    t_eval = torch.randint(0, 1000, (64,))
    eval_times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(1 + max(2, steps // 2)):  # first call is warm-up
            t0 = time.perf_counter()
            net(x_eval, t_eval)
            eval_times.append(time.perf_counter() - t0)
    eval_ms = 1000 * statistics.median(eval_times[1:]) / 64
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    params = sum(p.numel() for p in model.parameters())
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x[:1].contiguous(), t[:1])
    flops = counter.get_total_flops()           # one forward of one image; training ~ 3x (forward + backward)
    return dict(train_img_s=train_img_s, eval_ms=eval_ms, peak_mib=peak_mib, params=params,
                train_gflop_s=3 * flops * train_img_s / 1e9, peak_gflop_s=matmul_peak(bf16))


def matmul_peak(bf16, n=2048, reps=5):
    """This CPU's measured peak: GFLOP/s of a 2048 x 2048 matrix product (2 n^3 FLOPs), best of reps, in the
    same dtype and on the same 2 threads as the measured network."""
    import torch
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def run_worker(config, warmup, steps):
    """Measure one configuration in a fresh Python process; its last stdout line is the JSON result."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    spec = json.dumps(dict(config=config, warmup=warmup, steps=steps))
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(config, trials):
    label, backbone, res, batch, bf16, cl = config
    speeds = [r["train_img_s"] for r in trials]
    return dict(model=label, backbone=backbone, resolution=res, batch=batch, dtype="bf16" if bf16 else "fp32",
                channels_last=cl, params=trials[0]["params"], train_img_s=statistics.median(speeds),
                train_img_s_min=min(speeds), train_img_s_max=max(speeds),
                eval_ms_per_img=statistics.median(r["eval_ms"] for r in trials),
                peak_mib=statistics.median(r["peak_mib"] for r in trials), trials=len(trials),
                train_gflop_s=statistics.median(r["train_gflop_s"] for r in trials),
                peak_gflop_s=max(r["peak_gflop_s"] for r in trials))


def print_table(rows):
    print(f"{'model':<10} {'res':>5} {'batch':>5} {'dtype':<5} {'ch_last':<7} {'params':>10} "
          f"{'train img/s (min-max)':>22} {'eval ms/img':>11} {'peak MiB':>8} {'GFLOP/s':>8} {'of peak':>7}")
    for r in rows:
        spread = f"{r['train_img_s']:.1f} ({r['train_img_s_min']:.0f}-{r['train_img_s_max']:.0f})"
        print(f"{r['model']:<10} {r['resolution']:>5} {r['batch']:>5} {r['dtype']:<5} "
              f"{str(r['channels_last']):<7} {r['params']:>10,} {spread:>22} "
              f"{r['eval_ms_per_img']:>11.2f} {r['peak_mib']:>8.0f} {r['train_gflop_s']:>8.1f} "
              f"{r['train_gflop_s'] / r['peak_gflop_s']:>7.0%}")


def ratios(rows):
    """Speed-ups read off the table: ours/diffusers, bf16/fp32, channels_last/contiguous (train img/s)."""
    find = {(r["backbone"], r["resolution"], r["dtype"], r["channels_last"]): r["train_img_s"]
            for r in rows if r["model"] != "cpu/stem1"}
    out = {}
    for res in sorted({r["resolution"] for r in rows}):
        base = find.get(("ours", res, "fp32", False))
        if base is None:
            continue
        theirs = find.get(("diffusers", res, "fp32", False))
        if theirs:
            out[f"ours/diffusers fp32 {res}x{res}"] = base / theirs
            best = max(v for k, v in find.items() if k[0] == "ours" and k[1] == res)
            out[f"best ours (any dtype/format)/diffusers fp32 {res}x{res}"] = best / theirs
            stem1 = [r["train_img_s"] for r in rows if r["model"] == "cpu/stem1" and r["resolution"] == res]
            if stem1:
                out[f"ours without stem/diffusers fp32 {res}x{res}"] = stem1[0] / theirs
        out[f"bf16/fp32 {res}x{res}"] = find[("ours", res, "bf16", False)] / base
        out[f"channels_last/contiguous fp32 {res}x{res}"] = find[("ours", res, "fp32", True)] / base
        out[f"channels_last/contiguous bf16 {res}x{res}"] = (find[("ours", res, "bf16", True)]
                                                             / find[("ours", res, "bf16", False)])
    return out


def parse_args(argv):
    """The command line, every value checked before the first worker starts."""
    import plumbing
    parser = plumbing.OneLineParser(description="Time unet.py's cpu preset (and diffusers, if installed).")
    parser.add_argument("--quick", action="store_true", help="one trial, fewer steps (~1.5 min); overrides --trials")
    parser.add_argument("--trials", type=plumbing.positive_int, default=3,
                        help="interleaved repeats of every configuration")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none, the "
                                                     "table is printed only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    plumbing.check_json_path(parser, args.json, args.overwrite)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"] and len(argv) == 2:  # a child of run_worker: measure one configuration, print JSON
        spec = json.loads(argv[1])
        print(json.dumps(measure(*spec["config"], spec["warmup"], spec["steps"])))
        return
    args = parse_args(argv)
    trials, warmup, steps = (1, 2, 4) if args.quick else (args.trials, 3, 6)
    try:
        import diffusers  # noqa: F401  optional: only for the comparison
        configs = CONFIGS
    except ImportError:
        print("diffusers not installed: skipping the comparison (pip install --no-deps diffusers ...)")
        configs = [c for c in CONFIGS if c[1] != "diffusers"]
    print(f"{len(configs)} configurations x {trials} interleaved trials, {warmup} warm-up + {steps} timed steps; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE (set for the workers)')}, 2 threads")
    results = {i: [] for i in range(len(configs))}
    t_start = time.time()
    for trial in range(trials):
        for i, config in enumerate(configs):
            results[i].append(run_worker(config, warmup, steps))
        print(f"trial {trial + 1}/{trials} done ({time.time() - t_start:.0f} s)", flush=True)
    rows = [summarize(config, results[i]) for i, config in enumerate(configs)]
    print()
    print_table(rows)
    speedups = ratios(rows)
    for name, value in speedups.items():
        print(f"{name:<56} {value:.2f}")
    if args.json:
        import plumbing
        plumbing.write_json(dict(rows=rows, ratios=speedups), args.json)  # atomic: never half a file
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
