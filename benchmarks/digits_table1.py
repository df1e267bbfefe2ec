"""Table 1's analogue on the digits: how little data can we use? (Sec. 5.2)

The paper trains its DDPM on 60k, 30k, 10k and 5k extreme faces (ranked, the k most extreme per side)
and reports the MSE and KLD of the evaluation classifier's histogram against uniform (Table 1). Here
the same question on scikit-learn's digits: `python train.py --data digits --subset S` for three
kept-set sizes S = 700, 500, 300 (350, 250, 150 digits per side, ranked by the filter's ensemble), each
a full run (its own filter, DDPM, classifier and samples) in OUT/subset<S>. The table reads each run's
results.json: the exact slant of the guided samples (middle-band fraction against the unguided ones;
MSE / KLD of the CDF-mapped slant against uniform, App. B), the judge's MSE / KLD as in Table 1 (data
range, the released code's), digit-likeness, the memorization check (App. H: near-copies), and the time.

Run:  python benchmarks/digits_table1.py --out /tmp/table1 [--subsets 700,500,300] [-- more train.py flags]
      e.g. `-- --quick` for a rougher table in a third of the time. Writes OUT/table1.json and OUT/table1.md.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable
    sys.path.insert(0, str(REPO))

import plumbing  # noqa: E402


def row(subset, r, wall_s):
    """The Table 1 figures of one run's results.json."""
    s = r["digits"]["sets"]
    g, u = s["guided_run0"], s["unconditional"]
    judge = r["rows"][0]["data"]
    return dict(subset=subset, n_kept=r["digits"]["filter"]["n_kept"],
                band_survival=r["digits"]["filter"]["band_survival"], guided_band=g["band_fraction"],
                unguided_band=u["band_fraction"], slant_mse=g["unit"]["mse"], slant_kld=g["unit"]["kld"],
                unguided_slant_mse=u["unit"]["mse"], unguided_slant_kld=u["unit"]["kld"], judge_mse=judge["mse"],
                judge_kld=judge["kld"], confident=g["confident_fraction"], classes=g["classes"],
                near_copies=r["memorization"]["near_copy_fraction"], lambda_pick=r["digits"]["lambda_pick"]["lam"],
                wall_min=wall_s / 60)


def table(rows):
    lines = ["| kept digits | band survival | in the middle band: guided / unguided | slant MSE / KLD to uniform: "
             "guided (unguided) | judge MSE / KLD (data range) | confidently digits | classes | near-copies | "
             "lambda picked | wall |", "|---" * 10 + "|"]
    for x in rows:
        lines.append(f"| {x['n_kept']} | {100 * x['band_survival']:.1f}% | {100 * x['guided_band']:.1f}% / "
                     f"{100 * x['unguided_band']:.1f}% | {x['slant_mse']:.3f} / {x['slant_kld']:.3f} "
                     f"({x['unguided_slant_mse']:.3f} / {x['unguided_slant_kld']:.3f}) | {x['judge_mse']:.3f} / "
                     f"{x['judge_kld']:.3f} | {100 * x['confident']:.1f}% | {x['classes']} | "
                     f"{100 * x['near_copies']:.1f}% | {x['lambda_pick']:g} | {x['wall_min']:.1f} min |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = plumbing.OneLineParser(description="Table 1's analogue: train.py --data digits at three kept-set sizes.")
    plumbing.add_flags(parser, "out", "overwrite", threads=1)
    parser.add_argument("--subsets", default="700,500,300", help="train.py --subset values (digits: 700, 500, 300)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    subsets = args.subsets.split(",")
    if not set(subsets) <= {"700", "500", "300"}:
        parser.error(f"--subsets takes 700, 500, 300, got {args.subsets}")
    plumbing.check_out_folder(args.out)
    rows = []
    for subset in subsets:
        out = os.path.join(args.out, f"subset{subset}")
        cmd = [sys.executable, str(REPO / "train.py"), "--data", "digits", "--subset", subset, "--out", out,
               "--threads", str(args.threads), *(["--overwrite"] if args.overwrite else []), *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        if proc.returncode:
            raise SystemExit(f"digits_table1.py: --subset {subset} failed:\n{proc.stderr[-2000:]}")
        print(proc.stdout.strip().splitlines()[-1])
        rows.append(row(subset, json.load(open(os.path.join(out, "results.json"))), time.time() - t0))
    text = table(rows)
    plumbing.write_json(dict(rows=rows, extra_flags=extra), os.path.join(args.out, "table1.json"))
    plumbing.write_bytes_atomically(os.path.join(args.out, "table1.md"), (text + "\n").encode())
    print(text)
    return rows


if __name__ == "__main__":
    plumbing.guard(main)
