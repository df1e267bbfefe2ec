"""Benchmark the cost of multi-guidance: one guided ancestral step against one unguided step.

The claim (App. C; Sec. 4.2, Eq. 2): multi-guidance costs the same as ordinary classifier guidance.
The guidance gradient g = grad_x sum_m lambda_m log p(y_m | x_t, t) of ALL classes comes from ONE
classifier forward and ONE backward pass (autograd of the weighted sum of log-probabilities,
multiguide.multi_guidance_grad), so a guided step costs one U-Net forward plus one classifier
forward + backward, whatever the number of classes. Our target: guided / unguided <= 2.5x.

What is measured (randomly initialised models: speed does not depend on the weights), each call on
the same fixed x_t, noise and step (the middle of a 50-step respaced chain, T = 1000, cosine):
- unguided step   : ddpm.Diffusion.p_sample(model, x_t, t) under torch.no_grad(), as in sample_loop;
- guided step     : the same with cond_fn = multiguide.make_cond_fn(classifier, lambdas), lambdas
                    30,30 by default (Sec. 5.5): mu~ = mu + Sigma g (Sec. 2.2);
- one-class step  : the same with the weight of every class but the last set to 0 (0,30: ordinary
                    classifier guidance); by App. C it costs what the multi-guided step costs;
- classifier fwd  : the classifier alone, no gradients;
- classifier f+b  : multiguide.multi_guidance_grad (forward + backward to x), what guidance adds.
The configurations run interleaved (trial 1 of each, then trial 2, ...) after a warm-up, because
this CPU is shared; each trial's figure is the median of --reps calls, and the table gives the
median over trials with their min-max. The ratio guided / unguided uses the medians.

Run (from the repository root; ~17 s on 2 cores, --quick ~4 s):
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_guidance.py [--quick] [--json guidance.json]
    python benchmarks/bench_guidance.py --unet tiny --clf tiny --image-size 16 --batch 8 --quick
The exit status is 0 whether the target is met or not: PASS/FAIL is a reading, in the table and JSON.
An existing --json file is replaced only with --overwrite (checked before the timing starts).

One full run here (2 threads, CPU shared with a training run), ms per call at batch 128: unguided
step 171, guided (30,30) 280, one-class (0,30) 276, classifier forward 42, forward + backward 104:
guided / unguided = 1.63x, PASS; the guidance overhead (108 ms) is the classifier's forward +
backward, and one class costs what two cost.
"""
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable, and keep idle OpenMP threads from spinning
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import classifier as classifier_lib  # noqa: E402
import ddpm  # noqa: E402
import multiguide  # noqa: E402
import plumbing  # noqa: E402
import unet  # noqa: E402

TARGET_RATIO = 2.5  # our target: a guided step costs at most 2.5x an unguided one


def build_setup(unet_preset, clf_preset, image_size, batch, lambdas, seed=0):
    """Random models in eval mode, a 50-step respaced diffusion, and fixed inputs for one step."""
    torch.manual_seed(seed)
    model = unet.build_unet(unet_preset, image_size=image_size).eval()
    clf = classifier_lib.build_classifier(clf_preset, image_size=image_size).eval()
    d = dict(schedule="cosine", T=1000, learn_sigma=model.config["learn_sigma"], loss="hybrid", respacing="")
    diffusion = ddpm.diffusion_from_config(d, "50")
    C = model.config["in_channels"]
    x = torch.randn(batch, C, image_size, image_size)        # (B, C, H, W): x_t
    noise = torch.randn_like(x)                               # the step's z, fixed: no RNG in the timing
    t = torch.full((batch,), diffusion.num_timesteps // 2, dtype=torch.long)  # chain index (B,)
    return dict(model=model, clf=clf, diffusion=diffusion, x=x, noise=noise, t=t,
                t_model=diffusion.model_timesteps(t), lambdas=lambdas)


def make_calls(s):
    """(name, zero-argument callable) for every measured configuration; the first is the baseline."""
    model, clf, diffusion, x, noise, t = s["model"], s["clf"], s["diffusion"], s["x"], s["noise"], s["t"]
    lam = multiguide._lambda_tensor(s["lambdas"], clf.num_classes)
    one_class = torch.zeros_like(lam)
    one_class[-1] = lam[-1] if lam[-1] != 0 else 30.0                 # e.g. 0,30: single-class guidance
    multi_fn, one_fn = multiguide.make_cond_fn(clf, lam), multiguide.make_cond_fn(clf, one_class)
    lam_text, one_text = ",".join(f"{v:g}" for v in lam.tolist()), ",".join(f"{v:g}" for v in one_class.tolist())

    def step(cond_fn):
        def call():
            with torch.no_grad():  # as in sample_loop; cond_fn turns gradients on for its own backward
                diffusion.p_sample(model, x, t, cond_fn=cond_fn, noise=noise)
        return call

    def clf_forward():
        with torch.no_grad():
            clf(x, s["t_model"])

    return [("unguided step", step(None)),
            (f"guided step ({lam_text})", step(multi_fn)),
            (f"one-class step ({one_text})", step(one_fn)),
            ("classifier forward", clf_forward),
            ("classifier fwd+bwd", lambda: multiguide.multi_guidance_grad(clf, x, s["t_model"], lam))]


def median_seconds(fn, reps):
    """Median wall time of `reps` calls of fn, in seconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_trials(calls, trials, reps, warmup):
    """Interleaved trials: {name: [median seconds of trial 1, trial 2, ...]}."""
    for _, fn in calls:
        for _ in range(warmup):
            fn()
    out = {name: [] for name, _ in calls}
    for _ in range(trials):
        for name, fn in calls:
            out[name].append(median_seconds(fn, reps))
    return out


def summarize(per_trial, batch):
    """Rows (name, median/min/max ms per call, ms per image, ratio to the unguided step) and the verdict."""
    names = list(per_trial)
    base = statistics.median(per_trial[names[0]])
    rows = []
    for name in names:
        med = statistics.median(per_trial[name])
        rows.append(dict(name=name, median_ms=1000 * med, min_ms=1000 * min(per_trial[name]),
                         max_ms=1000 * max(per_trial[name]), ms_per_image=1000 * med / batch,
                         ratio_to_unguided=med / base, trials=len(per_trial[name])))
    ratio = rows[1]["ratio_to_unguided"]  # the multi-guided step
    return dict(rows=rows, ratio_guided_unguided=ratio, target_ratio=TARGET_RATIO,
                verdict="PASS" if ratio <= TARGET_RATIO else "FAIL",
                guidance_overhead_ms=rows[1]["median_ms"] - rows[0]["median_ms"],
                classifier_fwd_bwd_ms=rows[4]["median_ms"])


def print_table(summary):
    print(f"{'one call':<26} {'ms (median)':>11} {'min-max':>15} {'ms/img':>8} {'x unguided':>10}")
    for r in summary["rows"]:
        spread = f"{r['min_ms']:.1f}-{r['max_ms']:.1f}"
        print(f"{r['name']:<26} {r['median_ms']:>11.1f} {spread:>15} {r['ms_per_image']:>8.3f} "
              f"{r['ratio_to_unguided']:>10.2f}")
    print(f"guidance adds {summary['guidance_overhead_ms']:.1f} ms a step; the classifier's forward + backward "
          f"alone takes {summary['classifier_fwd_bwd_ms']:.1f} ms")
    print(f"guided / unguided = {summary['ratio_guided_unguided']:.2f}x (target <= {TARGET_RATIO}x): "
          f"{summary['verdict']}")


def parse_args(argv):
    parser = plumbing.OneLineParser(description="Time one multi-guided ancestral step against one unguided step "
                                            "(App. C: one classifier forward + backward for all classes).")
    parser.add_argument("--unet", choices=sorted(unet.PRESETS), default="cpu", help="U-Net preset in unet.py")
    parser.add_argument("--clf", choices=sorted(classifier_lib.PRESETS), default="cpu",
                        help="classifier preset in classifier.py")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=128, help="images per step (train.py's --sample-batch)")
    parser.add_argument("--lambdas", default="30,30", help="multi-guidance weights, one per class")
    parser.add_argument("--trials", type=int, default=5, help="interleaved repeats of every configuration")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per configuration and trial (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration first")
    parser.add_argument("--quick", action="store_true",
                        help="2 trials of 1 call, 1 warm-up (a few seconds); overrides the three above")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file (default: none, "
                                                     "the table is printed only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch", "trials", "reps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    try:
        args.lambdas = [float(v) for v in args.lambdas.split(",")]
    except ValueError:
        parser.error(f"--lambdas wants comma-separated numbers, got {args.lambdas!r}")
    if not all(math.isfinite(v) for v in args.lambdas):
        parser.error(f"--lambdas must be finite, got {args.lambdas}")
    num_classes = classifier_lib.PRESETS[args.clf]["num_classes"]
    if len(args.lambdas) != num_classes or not any(args.lambdas):
        parser.error(f"--lambdas wants {num_classes} weights, not all zero (one per class of "
                     f"classifier '{args.clf}'), got {args.lambdas}")
    plumbing.check_json_path(parser, args.json, args.overwrite)  # before the timing, not after it
    if args.quick:
        args.trials, args.reps, args.warmup = 2, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        setup = build_setup(args.unet, args.clf, args.image_size, args.batch, args.lambdas)
    except ValueError as e:  # e.g. an image size the presets' down-sampling cannot divide
        raise SystemExit(f"bench_guidance.py: error: --image-size {args.image_size}: {e}")
    print(f"bench_guidance | U-Net '{args.unet}' ({unet.count_params(setup['model']):,} parameters), classifier "
          f"'{args.clf}' ({unet.count_params(setup['clf']):,}), {args.image_size}x{args.image_size}, batch "
          f"{args.batch}, lambdas {args.lambdas} | {args.trials} interleaved trials x {args.reps} calls, "
          f"{args.warmup} warm-up | torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    per_trial = run_trials(make_calls(setup), args.trials, args.reps, args.warmup)
    summary = summarize(per_trial, args.batch)
    print_table(summary)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "overwrite")}
        record = dict(config=config, torch=torch.__version__, threads=torch.get_num_threads(), **summary)
        plumbing.write_json(record, args.json)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
