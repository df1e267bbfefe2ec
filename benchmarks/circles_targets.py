"""Measure the targets of the default circles command, `python train.py --data circles`.

Targets (the circles experiment of Sec. 5.5 on a 2-core CPU):
    wall time of the whole command      <= 5 min
    peak memory (resident) of train.py  <= 1 GiB
    accuracy (one circle, centre x in the unseen middle), mean over --runs classifiers  >= 85%
    bad fraction (0 or >= 2 circles)    <= 4%
    unconditional accuracy (leakage)    <= 5%

How: train.py runs as a child process, `python train.py --data circles --out DIR [extra args]`, with
its output shown as it comes. Wall time is the child's, start to exit (Python start-up and imports
included). Peak memory is the child's ru_maxrss, taken from os.wait4 on that child, which is
getrusage(RUSAGE_CHILDREN).ru_maxrss restricted to this one child (RUSAGE_CHILDREN itself would be a
maximum over every child so far, so with --seeds each seed would inherit the earlier peaks). The
quality figures are read from DIR/results.json (train.py's `accuracy` and `bad_fraction`, each
[mean, std] over its --runs classifiers, and `unconditional.accuracy`).

--seeds 0,1,2 runs the whole command once per DDPM seed (`--seed S`, output DIR/seedS) and adds the
mean +- std across seeds (population std, as train.py's mean_std). The verdict of a quality target
reads the mean across seeds; that of wall time and memory reads the worst seed (each run must fit).

Pass-through: every option this script does not know goes to train.py unchanged, and so does
everything after a lone `--` (use `--` for options whose names this script also has, or just to be
clear). --out and --resume cannot be passed through (the first is this script's, the second would
skip the training whose time is measured); pass --overwrite to rerun into an --out that holds a run.

Run (from anywhere; the default command is meant to take at most 5 min per seed on 2 cores):
    python benchmarks/circles_targets.py --out runs/targets --json runs/targets/targets.json
    python benchmarks/circles_targets.py --out runs/targets --seeds 0,1,2 --runs 3
    python benchmarks/circles_targets.py --out /tmp/ct -- --unet tiny --clf tiny --image-size 16 \
        --T 100 --steps 10 --clf-steps 5 --batch 8 --n-samples 8 --sample-respacing 5 --grid-every 0
The exit status is train.py's when it fails, else 0 (PASS/FAIL is a reading, in the table and JSON).
"""
import json
import os
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "train.py"
if __name__ == "__main__":  # as a script: make zsi importable
    sys.path.insert(0, str(REPO))

import plumbing  # noqa: E402

# What is checked: the figure's key, its label, the comparison and threshold, how the seeds are
# combined for the verdict ("worst" seed or their "mean"), and how a value is printed.
Target = namedtuple("Target", "key label op threshold judged_on fmt")
TARGETS = [
    Target("wall_min", "wall time (min)", "<=", 5.0, "worst", "{:.2f}"),
    Target("peak_mib", "peak memory (MiB)", "<=", 1024.0, "worst", "{:.0f}"),
    Target("accuracy", "accuracy (mean over runs)", ">=", 0.85, "mean", "{:.1%}"),
    Target("bad_fraction", "bad fraction", "<=", 0.04, "mean", "{:.1%}"),
    Target("unconditional_accuracy", "unconditional accuracy", "<=", 0.05, "mean", "{:.1%}"),
]
COMPARE = {"<=": lambda v, th: v <= th, "<": lambda v, th: v < th, ">=": lambda v, th: v >= th}


def parse_args(argv):
    """-> (args, train_args): this script's options, and the list passed on to train.py."""
    parser = plumbing.OneLineParser(description="Run `python train.py --data circles` and check its targets: wall "
                                 "time, peak memory, accuracy, bad fraction, unconditional accuracy.",
                     epilog="Any other option goes to train.py unchanged, as does everything after a lone "
                            "'--' (e.g. circles_targets.py --out /tmp/ct -- --unet tiny --steps 10). "
                            "--out and --resume are refused there; pass --overwrite to reuse an --out.",
                     allow_abbrev=False)
    parser.add_argument("--out", default="runs/circles_targets",
                        help="output folder of train.py, with --seeds DIR/seedS per seed")
    parser.add_argument("--runs", type=int, default=None,
                        help="passed to train.py: classifiers per DDPM (default: train.py's, 1)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated DDPM seeds, e.g. 0,1,2: one full run each, with --seed S")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file (default: none, the "
                                                     "table is printed only; an existing file needs --overwrite)")
    argv = list(sys.argv[1:] if argv is None else argv)
    after = argv[argv.index("--") + 1:] if "--" in argv else []
    before = argv[:argv.index("--")] if "--" in argv else argv
    args, unknown = parser.parse_known_args(before)
    train_args = unknown + after
    if args.runs is not None:
        if args.runs < 1:
            parser.error(f"--runs must be positive, got {args.runs}")
        train_args += ["--runs", str(args.runs)]
    for flag in ("--out", "--resume") + (("--seed",) if args.seeds is not None else ()):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            parser.error(f"{flag} cannot be passed to train.py here" + (
                " (use this script's --out)" if flag == "--out" else
                " (it would skip the training whose time is measured)" if flag == "--resume" else
                " together with --seeds"))
    if args.seeds is not None:
        try:
            args.seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds wants comma-separated integers, got {args.seeds!r}")
        if len(set(args.seeds)) != len(args.seeds):
            parser.error(f"--seeds has a repeated seed: {args.seeds}")
    if os.path.isfile(args.out):
        parser.error(f"--out {args.out} is a file; expected a folder")
    # before minutes of training: a --json that cannot be written, or an earlier one (--overwrite goes to
    # train.py and, as there, allows replacing the outputs of an earlier run)
    plumbing.check_json_path(parser, args.json, "--overwrite" in train_args)
    return args, train_args


def run_train(out, train_args):
    """Run train.py once; -> (exit code, wall seconds, peak MiB of that child)."""
    cmd = [sys.executable, str(TRAIN), "--data", "circles", "--out", str(out), *train_args]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, wall, usage.ru_maxrss * scale / 2**20


def read_measurement(out, wall_s, peak_mib):
    """One run's figures: wall and memory as measured, quality from out/results.json."""
    with open(os.path.join(out, "results.json")) as fh:
        r = json.load(fh)
    return dict(out=str(out), wall_min=wall_s / 60.0, peak_mib=peak_mib,
                accuracy=r["accuracy"][0], accuracy_std_over_runs=r["accuracy"][1], runs=r["runs"],
                bad_fraction=r["bad_fraction"][0], unconditional_accuracy=r["unconditional"]["accuracy"])


def evaluate_targets(measurements):
    """Rows: every target with its value per seed, the mean +- std across seeds, and the verdict."""
    rows = []
    for tg in TARGETS:
        values = [m[tg.key] for m in measurements]
        if tg.judged_on == "mean":
            judged = statistics.fmean(values)
        else:  # the worst seed
            judged = min(values) if tg.op == ">=" else max(values)
        shown = f"{100 * tg.threshold:g}%" if "%" in tg.fmt else f"{tg.threshold:g}"
        rows.append(dict(key=tg.key, label=tg.label, target=f"{tg.op} {shown}", op=tg.op, threshold=tg.threshold,
                         values=values, mean=statistics.fmean(values), std=statistics.pstdev(values),
                         judged_on=tg.judged_on, judged_value=judged,
                         verdict="PASS" if COMPARE[tg.op](judged, tg.threshold) else "FAIL"))
    return rows


def print_table(rows, measurements, names):
    fmt = {tg.key: tg.fmt for tg in TARGETS}
    many = len(measurements) > 1
    heads = names + (["across seeds"] if many else [])
    print(f"\n{'quantity':<27} {'target':>8} " + " ".join(f"{h:>18}" for h in heads) + f" {'verdict':>8}")
    for row in rows:
        f = fmt[row["key"]]
        cells = [f.format(v) for v in row["values"]]
        if row["key"] == "accuracy":  # mean +- std over that seed's --runs classifiers
            cells = [f"{c} +- {f.format(m['accuracy_std_over_runs'])}" for c, m in zip(cells, measurements)]
        if many:
            cells.append(f"{f.format(row['mean'])} +- {f.format(row['std'])}")
        print(f"{row['label']:<27} {row['target']:>8} " + " ".join(f"{c:>18}" for c in cells) + f" {row['verdict']:>8}")
    runs = sorted({m["runs"] for m in measurements})
    print(f"(accuracy: mean +- std over {'/'.join(map(str, runs))} classifier run(s) per seed"
          + ("; verdicts: quality on the mean across seeds, time and memory on the worst seed)" if many else ")"))


def main(argv=None):
    args, train_args = parse_args(argv)
    seeds = args.seeds if args.seeds is not None else [None]
    measurements, names = [], []
    for seed in seeds:
        out = Path(args.out) if seed is None else Path(args.out) / f"seed{seed}"
        out = out.resolve()
        extra = train_args if seed is None else [*train_args, "--seed", str(seed)]
        started = time.time()
        code, wall, peak = run_train(out, extra)
        if code != 0:
            print(f"circles_targets.py: train.py failed with exit status {code} (output folder {out})",
                  file=sys.stderr)
            return code if code > 0 else 1  # killed by a signal: code is minus its number
        results = out / "results.json"
        if not results.exists() or results.stat().st_mtime < started:
            print(f"circles_targets.py: train.py wrote no fresh {results}", file=sys.stderr)
            return 1
        measurements.append(read_measurement(out, wall, peak))
        names.append("this run" if seed is None else f"seed {seed}")
        print(f"[{names[-1]}] {wall / 60:.2f} min, peak {peak:.0f} MiB", flush=True)
    rows = evaluate_targets(measurements)
    print_table(rows, measurements, names)
    if args.json:
        record = dict(command=["train.py", "--data", "circles", *train_args], seeds=args.seeds,
                      measurements=measurements, targets=rows,
                      all_pass=all(r["verdict"] == "PASS" for r in rows))
        plumbing.write_json(record, args.json)  # atomic: a reader never sees half a file
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
