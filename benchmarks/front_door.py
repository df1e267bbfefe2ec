"""The researcher's first ten minutes, measured: your own two folders of images through `--quick`.

Writes a folder of two classes of 48 x 48 PNG faces, `smile/` and `frown/`, drawn with a mouth whose
curvature c is a known continuous attribute in [-1, 1] (c > 0 smiles; |c| < 0.2 is mild, labelled
at random, like CelebA's mild faces under a binary label), then times

    python train.py --data folder --root DIR --quick --out OUT

from the outside (wall time, peak resident memory of the process tree) and prints what the report
says: the filter's kept fraction and middle-band survival, and the share of guided and unguided
samples the judge scores in [0.2, 0.8].

Run:  python benchmarks/front_door.py --out /tmp/front_door [--n-images 200] [--seed 0] [--threads 0] [--overwrite]
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import plumbing  # noqa: E402
from benchmarks.filter_mild import draw_face  # noqa: E402  (the same faces: mouth curvature c)


def write_folder(root, n=200, size=48, seed=0):
    """n faces, c uniform in [-1, 1]; label = sign(c), random for |c| < 0.2. Returns the curvatures."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, n)
    label = np.where(np.abs(c) < 0.2, rng.integers(0, 2, n), (c > 0).astype(int))
    for name in ("frown", "smile"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(n):
        folder = ("frown", "smile")[label[i]]
        cv2.imwrite(os.path.join(root, folder, f"{i:04d}.png"), draw_face(c[i], size, rng)[:, :, ::-1])
    return dict(curvature=c.tolist(), label=label.tolist())


def main(argv=None):
    parser = plumbing.OneLineParser(description="Time `train.py --data folder --quick` on a folder of 48x48 faces.")
    plumbing.add_flags(parser, "out", "seed", "threads", "overwrite")
    parser.add_argument("--n-images", type=plumbing.positive_int, default=200, help="images in the two folders")
    parser.add_argument("--full", action="store_true", help="time the default preset instead of --quick")
    args = parser.parse_args(argv)
    plumbing.check_out_folder(args.out)
    plumbing.refuse_overwrite(args.out, ["faces", "run", "front_door.json"], args.overwrite)
    root, run = os.path.join(args.out, "faces"), os.path.join(args.out, "run")
    shutil.rmtree(root, ignore_errors=True)  # --overwrite: faces of an earlier, larger --n-images would be trained on
    truth = write_folder(root, args.n_images, seed=args.seed)
    cmd = [sys.executable, str(REPO / "train.py"), "--data", "folder", "--root", root, "--out", run, "--overwrite",
           "--seed", str(args.seed), "--threads", str(args.threads)] + ([] if args.full else ["--quick"])
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"front_door.py: the run failed:\n{proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    r = json.load(open(os.path.join(run, "results.json")))
    rows = {row["name"]: row for row in r["rows"]}
    summary = dict(command=" ".join(cmd[1:]), wall_min=wall / 60, peak_mib=peak, n_images=args.n_images,
                   kept_fraction=r["filter"]["kept_fraction"], mild_survival=r["filter"]["mild_survival"],
                   guided_middle=rows["guided_run0"]["middle_fraction"],
                   unguided_middle=rows["unconditional"]["middle_fraction"], stages=r["timings_s"])
    plumbing.write_json(dict(summary, truth=truth), os.path.join(args.out, "front_door.json"))
    print(proc.stdout.strip().splitlines()[-1])
    print(f"wall {wall / 60:.1f} min, peak {peak:.0f} MiB; kept {summary['kept_fraction']:.1%}, middle band survived "
          f"{summary['mild_survival'] if summary['mild_survival'] is None else format(summary['mild_survival'], '.1%')}; "
          f"judge in [0.2, 0.8]: guided {summary['guided_middle']:.1%}, unguided {summary['unguided_middle']:.1%}")
    return summary


if __name__ == "__main__":
    plumbing.guard(main)
