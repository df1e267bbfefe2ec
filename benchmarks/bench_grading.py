"""The course autograder, timed: `assignments/grade.py` on a batch of submissions, at several --jobs.

Builds N submissions in OUT/subs, cycling through the reference itself (full marks), a student copy from
`assignments/build.py` (all blanked: 0 points) and student copies with one assignment's stubs filled back
in with the reference's code (a1 ... a7: that assignment's points). Then times, wall clock, for each J of
--jobs: `python assignments/grade.py OUT/subs/* --jobs J --timeout T --csv OUT/grades_jJ.csv --json ...`.
Checks that every J writes the same gradebook and each submission scores what it should (the reference
full marks); runs the leak scan `build.py --check` on a fresh student copy. Prints a markdown table
(jobs, wall s, submissions/s); writes OUT/bench_grading.json (again: --overwrite replaces OUT's outputs).

Run:  python benchmarks/bench_grading.py --out /tmp/bench_grading [--n-submissions 10] [--jobs 1,2] [--timeout 60]
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "assignments")]   # zsi's plumbing, and build.py as a module
import build as build_lib  # noqa: E402
import plumbing  # noqa: E402

BUILD, GRADE = str(REPO / "assignments" / "build.py"), str(REPO / "assignments" / "grade.py")
GRADED = [a for a, (_, kind) in build_lib.ASSIGNMENTS.items() if kind == "tests"]   # a1 .. a7
KINDS = ["reference", "blank", *GRADED]          # the cycle of submissions; "a3": a blank copy with a3 filled in


def job_list(text):
    """'1,2' -> [1, 2]: integers >= 1."""
    jobs = [int(p) for p in text.split(",") if p.strip().isdigit()]
    if not jobs or min(jobs) < 1 or len(jobs) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return jobs


def run(cmd, what, ok=(0,)):
    """A subprocess and its wall time; an exit status not in `ok` ends the benchmark with its last stderr line."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in ok:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench_grading.py: {what} failed (exit {proc.returncode}): {last}")
    return proc, seconds


def fill(copy, assignment):
    """Replace each stub of `assignment` in a student copy (the `# YOUR CODE HERE` line and the raise
    under it) by the reference's region code: the k-th stub of a file is its k-th region. The code is
    read from the reference at run time, so this file, which student copies hold, spells out none."""
    for rel in [r for r in build_lib.source_files(str(REPO)) if r.endswith(".py")]:
        ref = (REPO / rel).read_text().splitlines(keepends=True)
        regions = [r for r in build_lib.find_regions(ref, rel) if r["id"] == assignment]
        if not regions:
            continue
        lines = Path(copy, rel).read_text().splitlines(keepends=True)
        stubs = [i for i, line in enumerate(lines) if (m := build_lib.STUB_RE.match(line)) and m["id"] == assignment]
        if len(stubs) != len(regions) or any(lines[i - 1].strip() != build_lib.STUB for i in stubs):
            raise SystemExit(f"bench_grading.py: {rel} of the student copy has {len(stubs)} stub(s) of "
                             f"{assignment}, the reference {len(regions)} region(s)")
        for i, r in reversed(list(zip(stubs, regions))):   # from the bottom up: earlier indices stay valid
            lines[i - 1:i + 1] = ref[r["begin"] + 1:r["end"]]
        Path(copy, rel).write_text("".join(lines))


def make_submissions(subs, n):
    """OUT/subs/NN-kind for the first n kinds of the cycle; returns [(folder, kind)]."""
    made = []
    for k in range(n):
        kind = KINDS[k % len(KINDS)]
        folder = os.path.join(subs, f"{k:02d}-{kind}")
        if kind == "reference":                          # the reference's tracked files, markers and all
            for rel in build_lib.source_files(str(REPO)):
                os.makedirs(os.path.dirname(os.path.join(folder, rel)), exist_ok=True)
                shutil.copy2(REPO / rel, os.path.join(folder, rel))
        else:                                            # a fresh student copy, every assignment blanked
            run([sys.executable, BUILD, "--out", folder], f"build.py --out {folder}")
            if kind != "blank":
                fill(folder, kind)
        made.append((folder, kind))
    return made


def grade(subs, jobs, timeout, out):
    """One timed grade.py run: (its row of the table, {submission: its gradebook row less the notes})."""
    book = os.path.join(out, f"grades_j{jobs}.csv")
    cmd = [sys.executable, GRADE, *[s for s, _ in subs], "--jobs", str(jobs), "--timeout", f"{timeout:g}",
           "--csv", book, "--json", os.path.join(out, f"grades_j{jobs}.json")]
    proc, wall = run(cmd, f"grade.py --jobs {jobs}")
    with open(book, newline="") as fh:
        rows = {r["submission"]: {k: v for k, v in r.items() if k != "notes"} for r in csv.DictReader(fh)}
    return dict(jobs=jobs, wall_s=round(wall, 2), submissions_per_s=round(len(subs) / wall, 4),
                summary=proc.stdout.strip()), rows


def problems_of(books, subs):
    """What is wrong: a --jobs with another gradebook; a total other than its kind's (reference: all; aK: aK's)."""
    (j0, first), *others = books.items()
    problems = [f"--jobs {j} wrote another gradebook than --jobs {j0}" for j, b in others if b != first]
    possible = {a: float(first["(possible)"][a]) for a in GRADED}
    for folder, kind in subs:
        total = float(first[os.path.basename(folder)]["total"])
        want = sum(possible.values()) if kind == "reference" else possible.get(kind, 0.0)
        problems += [f"{os.path.basename(folder)} scores {total:g}, expected {want:g}"] if total != want else []
    return problems


def main(argv=None):
    parser = plumbing.OneLineParser(description="Time assignments/grade.py on a batch of submissions, per --jobs.")
    plumbing.add_flags(parser, "out", "overwrite")
    parser.add_argument("--n-submissions", type=plumbing.positive_int, default=10, help="submissions to grade")
    parser.add_argument("--jobs", type=job_list, default="1,2", help="grade.py --jobs values to time, comma-separated")
    parser.add_argument("--timeout", type=plumbing.positive_float, default=60.0, help="grade.py --timeout (s per run)")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if out == str(REPO) or out.startswith(str(REPO) + os.sep):
        parser.error(f"--out {args.out} is inside the repository; build.py writes student copies outside it")
    plumbing.check_out_folder(args.out)
    plumbing.refuse_overwrite(out, ["subs", "leakcheck", "bench_grading.json"], args.overwrite)
    shutil.rmtree(os.path.join(out, "subs"), ignore_errors=True)       # --overwrite: build.py wants new folders
    shutil.rmtree(os.path.join(out, "leakcheck"), ignore_errors=True)
    t0 = time.perf_counter()
    subs = make_submissions(os.path.join(out, "subs"), args.n_submissions)
    build_s = time.perf_counter() - t0
    runs = [grade(subs, jobs, args.timeout, out) for jobs in args.jobs]   # the timed part, one batch per J
    rows, books = [r for r, _ in runs], {r["jobs"]: book for r, book in runs}
    problems = problems_of(books, subs)
    run([sys.executable, BUILD, "--out", os.path.join(out, "leakcheck")], "build.py --out leakcheck")
    proc, leak_s = run([sys.executable, BUILD, "--check", os.path.join(out, "leakcheck")], "build.py --check",
                       ok=(0, 1))                        # 1: it found a leak, printed one per line
    leaks = len(proc.stdout.strip().splitlines())
    plumbing.write_json(dict(kinds=[k for _, k in subs], timeout=args.timeout, build_s=round(build_s, 2), runs=rows,
                             totals={n: r["total"] for n, r in books[args.jobs[0]].items()}, problems=problems,
                             leaked_lines=leaks, leak_scan_s=round(leak_s, 2)), os.path.join(out, "bench_grading.json"))
    print(f"{len(subs)} submissions ({', '.join(k for _, k in subs)}) x {len(GRADED)} assignments, built in "
          f"{build_s:.1f} s\n\n| jobs | wall s | submissions/s |\n|---|---|---|")
    print("\n".join(f"| {r['jobs']} | {r['wall_s']:.1f} | {r['submissions_per_s']:.3f} |" for r in rows))
    print(f"\nleak scan: {leaks} leaked line(s) in {leak_s:.1f} s; gradebooks "
          f"{'differ' if any('gradebook' in p for p in problems) else 'agree'}; wrote {out}/bench_grading.json")
    if problems:
        raise SystemExit("bench_grading.py: " + "; ".join(problems))


if __name__ == "__main__":
    plumbing.guard(main)
