"""assignments/build.py -- a student copy of the repository, with the marked solutions cut out.

What this file is
    The concept files mark the lines a student writes, nbgrader-style, with two comment lines: a
    line `### BEGIN SOLUTION a1: <what to implement>` above them (the assignment tag, then one line
    that says what to write, e.g. "Eq. 4, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps") and a line
    `### END SOLUTION` below them, both at the indentation of the code they enclose.
    The markers are comments, so the reference repository runs and passes its tests unchanged.
    This script copies the repository (git's tracked files plus its untracked files that git does
    not ignore; every file when --root is not a git checkout) to --out, and in every .py file
      * replaces each region of a SELECTED assignment by two lines at the indentation of its BEGIN
        line, the comment `# YOUR CODE HERE` and `raise NotImplementedError("a1: <what to implement>")`
        (the nbgrader student version, with the tag kept in the message so that a failing grading
        test names the assignment);
      * deletes the two marker lines of every other region, keeping its code.
    Every other byte is copied unchanged. It also writes ASSIGNMENT.md at the top of the copy: the
    selected assignments, their guides (assignments/aK.md), where the student writes, and how to
    grade (python assignments/grade.py). Building a student copy again from that copy gives the
    same copy (it has no markers left).

    Refused with one line and a non-zero exit, before anything is written: an unknown assignment in
    --only, an --out inside the source repository or an existing non-empty folder, and markers that
    do not pair up (a BEGIN without its END, an END without a BEGIN, a BEGIN inside a region, an
    unknown tag).

Run
    python assignments/build.py --out ../zsi-student                # every assignment
    python assignments/build.py --out ../zsi-a1a3 --only a1,a3       # two of them
    cd ../zsi-a1a3 && python assignments/grade.py                   # what the student runs
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys

# The assignments: id -> (title, kind). "tests" are graded by assignments/grade.py, "report" by the
# checklist of its guide. Each has a guide assignments/<id>.md.
ASSIGNMENTS = {
    "a1": ("schedules and the forward process", "tests"),
    "a2": ("the posterior and the variational bound", "tests"),
    "a3": ("respacing and DDIM", "tests"),
    "a4": ("the U-Net's timestep embedding and scale-shift ResBlock", "tests"),
    "a5": ("the multi-guidance gradient and the mean shift", "tests"),
    "a6": ("evaluation: the circle detector and histograms against uniform", "tests"),
    "a7": ("ensemble filtering and the Chernoff bound", "tests"),
    "a8": ("an open-ended experiment: a lambda sweep or likely interpolants", "report"),
}

MARK = "###"  # a marker line starts (after its indentation) with MARK + " BEGIN SOLUTION" or " END SOLUTION"
BEGIN_RE = re.compile(r"^(?P<indent>[ \t]*)### BEGIN SOLUTION (?P<id>a\d+): (?P<what>\S.*?)\s*$")
END_RE = re.compile(r"^[ \t]*### END SOLUTION\s*$")
STUB = "# YOUR CODE HERE"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BuildError(Exception):
    """A problem with the input: reported as one line by main()."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors cost one line (the pattern of ddpm.OneLineParser; no torch import here)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------

def find_regions(lines, path):
    """The solution regions of one file: a list of dict(begin, end, id, what, indent), 0-based line
    indices of the two marker lines. Raises BuildError on markers that do not pair up."""
    regions, open_region = [], None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if stripped.startswith(MARK + " BEGIN SOLUTION"):
            m = BEGIN_RE.match(line.rstrip("\r\n"))
            if m is None:
                raise BuildError(f"{path}:{i + 1}: malformed marker {stripped.strip()!r}; expected "
                                 f"'{MARK} BEGIN SOLUTION aK: what to implement'")
            if open_region is not None:
                raise BuildError(f"{path}:{i + 1}: BEGIN SOLUTION inside the region opened at line "
                                 f"{open_region['begin'] + 1}; close it with '{MARK} END SOLUTION' first")
            if m["id"] not in ASSIGNMENTS:
                raise BuildError(f"{path}:{i + 1}: unknown assignment {m['id']!r} in a marker; known: "
                                 f"{', '.join(ASSIGNMENTS)}")
            open_region = dict(begin=i, id=m["id"], what=m["what"], indent=m["indent"])
        elif stripped.startswith(MARK + " END SOLUTION"):
            if not END_RE.match(line.rstrip("\r\n")):
                raise BuildError(f"{path}:{i + 1}: malformed marker {stripped.strip()!r}; "
                                 f"expected '{MARK} END SOLUTION'")
            if open_region is None:
                raise BuildError(f"{path}:{i + 1}: END SOLUTION without a BEGIN SOLUTION before it")
            regions.append(dict(open_region, end=i))
            open_region = None
    if open_region is not None:
        raise BuildError(f"{path}:{open_region['begin'] + 1}: BEGIN SOLUTION {open_region['id']} has no "
                         f"'{MARK} END SOLUTION' after it")
    return regions


def student_version(text, selected, path):
    """The student text of one .py file: selected regions -> stub, other regions -> markers removed."""
    lines = text.splitlines(keepends=True)
    regions = find_regions(lines, path)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    out, i = [], 0
    for r in regions:
        out += lines[i:r["begin"]]
        if r["id"] in selected:
            message = json.dumps(f"{r['id']}: {r['what']}")   # a valid Python string literal
            out += [f"{r['indent']}{STUB}{newline}", f"{r['indent']}raise NotImplementedError({message}){newline}"]
        else:
            out += lines[r["begin"] + 1:r["end"]]
        i = r["end"] + 1
    out += lines[i:]
    return "".join(out), regions


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def source_files(root):
    """Relative paths of the files to copy: git's tracked + untracked-not-ignored files when root is
    the top of a git checkout, else every file (without .git, __pycache__, .pytest_cache, *.pyc)."""
    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        top = None
    if top and os.path.realpath(top) == os.path.realpath(root):
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
        return sorted(p for p in set(listed) if p and os.path.isfile(os.path.join(root, p)))
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache"))
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if not f.endswith(".pyc")]
    return sorted(found)


def check_out(out, root):
    """Refuse an --out inside the source repository, an existing file, or a non-empty folder."""
    real_out, real_root = os.path.realpath(out), os.path.realpath(root)
    if real_out == real_root or real_out.startswith(real_root + os.sep):
        raise BuildError(f"--out {out} is inside the repository {root}; choose a folder outside it")
    if os.path.isfile(out):
        raise BuildError(f"--out {out} is a file; expected a new or empty folder")
    if os.path.isdir(out) and os.listdir(out):
        raise BuildError(f"--out {out} exists and is not empty; choose a new folder")


def stub_locations(out, files):
    """(path, line, tag message) of every stub in the copy, for ASSIGNMENT.md."""
    found = []
    for rel in files:
        if not rel.endswith(".py"):
            continue
        with open(os.path.join(out, rel), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        for i, line in enumerate(lines[:-1]):
            nxt = lines[i + 1].strip()
            if line.strip() == STUB and nxt.startswith('raise NotImplementedError("a'):
                found.append((rel, i + 1, json.loads(nxt[len("raise NotImplementedError("):-1])))
    return found


def assignment_md(selected, stubs):
    """ASSIGNMENT.md of a student copy: what to do, where, and how it is graded."""
    lines = ["# Your assignments", "",
             "Each `# YOUR CODE HERE` below is followed by `raise NotImplementedError(...)`: replace both",
             "with your code. Read the guide first; it names the equations and the grading tests.", "",
             "| assignment | guide | graded by |", "|---|---|---|"]
    for a in selected:
        title, kind = ASSIGNMENTS[a]
        graded_by = f"tests in assignments/tests/test_{a}.py" if kind == "tests" else "the report checklist of its guide"
        lines.append(f"| {a}: {title} | [assignments/{a}.md](assignments/{a}.md) | {graded_by} |")
    lines += ["", "Where you write:", ""]
    lines += [f"- `{rel}`, line {line}: {msg}" for rel, line, msg in stubs] or ["- (nothing: report assignments only)"]
    lines += ["", "Grade yourself (prints points per assignment and the failing tests):", "",
              "```bash", "python assignments/grade.py", "```", ""]
    return "\n".join(lines)


def build(root, out, selected):
    """Write the student copy of `root` to `out`; returns (files copied, regions blanked per assignment)."""
    check_out(out, root)
    files = source_files(root)
    texts, blanked = {}, {a: 0 for a in selected}
    for rel in files:  # every file is parsed before anything is written
        if rel.endswith(".py"):
            with open(os.path.join(root, rel), encoding="utf-8", newline="") as fh:
                texts[rel], regions = student_version(fh.read(), selected, rel)
            for r in regions:
                if r["id"] in blanked:
                    blanked[r["id"]] += 1
    os.makedirs(out, exist_ok=True)
    for rel in files:
        src, dst = os.path.join(root, rel), os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel in texts:
            with open(dst, "w", encoding="utf-8", newline="") as fh:
                fh.write(texts[rel])
            shutil.copymode(src, dst)
        else:
            shutil.copy2(src, dst)
    with open(os.path.join(out, "ASSIGNMENT.md"), "w", encoding="utf-8") as fh:
        fh.write(assignment_md(selected, stub_locations(out, files)))
    return files, blanked


def parse_only(text, parser):
    """--only 'a1,a3' -> ['a1', 'a3'] in the order of ASSIGNMENTS; unknown ids are refused."""
    if text is None:
        return list(ASSIGNMENTS)
    ids = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in ids if a not in ASSIGNMENTS]
    if unknown or not ids:
        parser.error(f"--only: unknown assignment {', '.join(unknown) or repr(text)}; known: {', '.join(ASSIGNMENTS)}")
    return [a for a in ASSIGNMENTS if a in ids]


def main(argv=None):
    parser = OneLineParser(prog="build.py", description="Write a student copy of the repository: the marked "
                           "solution regions of the selected assignments become '# YOUR CODE HERE' stubs.")
    parser.add_argument("--out", required=True, help="new (or empty) folder outside the repository")
    parser.add_argument("--only", default=None, help="comma-separated assignments to blank, e.g. a1,a3 "
                        f"(default: all of {','.join(ASSIGNMENTS)})")
    parser.add_argument("--root", default=ROOT, help="the source repository (default: the one holding this script)")
    args = parser.parse_args(argv)
    selected = parse_only(args.only, parser)
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root} is not a folder")
    try:
        files, blanked = build(args.root, args.out, selected)
    except BuildError as e:
        parser.error(str(e))
    for a, n in blanked.items():
        if n == 0 and ASSIGNMENTS[a][1] == "tests":
            print(f"build.py: warning: no solution region of {a} in {args.root}", file=sys.stderr)
    regions = [f"{a} ({n} region{'s' if n != 1 else ''})" for a, n in blanked.items() if ASSIGNMENTS[a][1] == "tests"]
    print(f"wrote {len(files)} files to {os.path.abspath(args.out)}; blanked {', '.join(regions) or 'no code'}"
          f"; see ASSIGNMENT.md there")


if __name__ == "__main__":
    main()
