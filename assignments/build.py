"""assignments/build.py -- a student copy of the repository, with the marked solutions cut out.

What this file is
    The concept files mark the lines a student writes, nbgrader-style, with two comment lines: a
    line `### BEGIN SOLUTION a1: <what to implement>` above them (the assignment tag, then one line
    that says what to write, e.g. "Eq. 4, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps") and a line
    `### END SOLUTION` below them, both at the indentation of the code they enclose.
    The markers are comments, so the reference repository runs and passes its tests unchanged.
    This script copies the repository's git-tracked files (every file, less .git, caches and virtual
    environments, when --root is not a git checkout) to --out, except the instructor-only folder
    assignments/hidden/ (the hidden grading tests), and in every .py file
      * replaces each region of a SELECTED assignment by two lines at the indentation of its BEGIN
        line, the comment `# YOUR CODE HERE` and `raise NotImplementedError("a1: <what to implement>")`
        (the nbgrader student version, with the tag kept in the message so that a failing grading
        test names the assignment);
      * deletes the two marker lines of every other region, keeping its code.
    In TUTORIAL.md it adds a note above each step whose command runs a blanked function (the table
    TUTORIAL_NEEDS, measured by running the tutorial with a probe in every region), so the steps
    that need the student's code say so and the others run as they are. Every other byte is copied
    unchanged. It also writes ASSIGNMENT.md at the top of the copy: the selected assignments, their
    guides (assignments/aK.md), where the student writes, and how to check (python assignments/
    grade.py). Building a student copy again from that copy gives the same copy (no markers left).

The leak scan
    Before writing, the copy is scanned for the code it must not hold; `--check DIR` runs the same
    scan on a copy built earlier. The rule:
      * a SOLUTION LINE is a line inside a region of a blanked assignment, reduced to its code: the
        comment (from a `#` outside quotes) dropped, then every whitespace character removed;
      * it is trivial, and not looked for, when fewer than MIN_SIGNIFICANT (12) of its characters are
        letters, digits or underscores (`)`, `else:`, `return grad`, `half = dim // 2`), or when the
        code given to the student holds it anyway: the code tokens (no comments, no docstrings) of
        the blanked files' student versions (e.g. `pred_x0 = self.pred_x0_from_eps(xt, t, eps)` is
        both in the DDIM solution and in the p_sample the student is given);
      * it LEAKS when it occurs in any text file of the copy with all whitespace removed: in code,
        tests, strings, comments or docs, on one line or wrapped over several.
    A leak is one solution line found in one file; each is printed as `copy_file:line: holds
    ddpm.py:242 (a1): <code>`. A leaky copy is refused (nothing is written) with exit status 1;
    `--check` exits 1 when it finds one, 0 when the copy is clean. What the scan cannot see: the
    same idea written with other names (`abar` for `alpha_bar`), or split differently within a line.

    Refused with one line and exit status 2, before anything is written: an unknown assignment in
    --only, an --out inside the source repository or an existing non-empty folder, and markers that
    do not pair up (a BEGIN without its END, an END without a BEGIN, a BEGIN inside a region, an
    unknown tag).

Run
    python assignments/build.py --out ../zsi-student                # every assignment
    python assignments/build.py --out ../zsi-a1a3 --only a1,a3       # two of them
    python assignments/build.py --check ../zsi-a1a3                 # leak scan of a built copy
    cd ../zsi-a1a3 && python assignments/grade.py                   # what the student runs
"""
import argparse
import bisect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize

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
STUB_RE = re.compile(r'^\s*raise NotImplementedError\("(?P<id>a\d+): ')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCTOR_ONLY = ("assignments/hidden/",)   # never copied: the hidden grading tests
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ipynb_checkpoints", ".tox", ".venv",
             "venv", "env", ".env", "runs", "out", "node_modules"}   # when the source is not a git checkout
MIN_SIGNIFICANT = 12   # word characters a solution line needs before the leak scan looks for it

# What each tutorial command runs of the assignments' code (the --steps, --sampler... of the tutorial's
# own commands). Measured by running every runnable block of TUTORIAL.md in a copy with a probe call at
# the top of every solution region; a block also needs what the earlier blocks whose --out it reads need.
TUTORIAL_NEEDS = {
    "toy_circles.py": (),
    "ddpm.py": ("a1", "a3"),                     # get_betas, space_timesteps (--respace)
    "unet.py": ("a4",),                          # one forward pass
    "train.py": ("a1", "a2", "a3", "a4", "a5", "a6"),
    "classifier.py": ("a1", "a4"),               # q_sample for the noised heatmap, the U-Net blocks
    "multiguide.py": ("a1", "a2", "a3", "a4", "a5"),
    "evaluate.py": ("a6",),                      # the circle detector
}
RUNNABLE = "<!-- runnable -->"
NOTE_RE = re.compile(r"^> \*\*In your student copy\*\*.*?\n\n", flags=re.S | re.M)


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
# The leak scan (the rule is in the module docstring)
# ----------------------------------------------------------------------------------------------

def code_key(line):
    """One line reduced to its code: the comment (a '#' outside quotes) dropped, all whitespace removed."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == "\\":
                i += 1                      # skip the escaped character
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "#":
            line = line[:i]
            break
        i += 1
    return re.sub(r"\s+", "", line)


def given_code(texts):
    """The code tokens (no comments, no docstrings, no whitespace) of Python texts, concatenated."""
    parts = []
    for text in texts:
        previous = tokenize.NEWLINE
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
                docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT,
                                                                        tokenize.DEDENT)
                if tok.type not in skip and not docstring:
                    parts.append(re.sub(r"\s+", "", tok.string))
                if tok.type not in (tokenize.COMMENT, tokenize.NL):
                    previous = tok.type
        except (tokenize.TokenError, SyntaxError):
            parts.append(re.sub(r"\s+", "", text))   # not Python we can read: all of it counts as given
        parts.append("\n")                           # no match across two files
    return "".join(parts)


def is_test(rel):
    """A test file: under a tests/ or hidden/ folder, or named test_*.py, *_test.py or conftest.py."""
    parts = rel.split("/")
    name = parts[-1]
    return bool({"tests", "hidden"} & set(parts[:-1])) or name.startswith("test_") or name.endswith("_test.py") \
        or name == "conftest.py"


def solution_lines(root, files, selected):
    """The solution lines the scan looks for: [(rel, 1-based line, tag, key)] of the selected regions,
    less the trivial ones and those the code given to the student holds anyway (the code tokens of the
    reference's Python files that are not tests, with the selected regions cut out)."""
    given, wanted = [], []
    for rel in files:
        if not rel.endswith(".py"):
            continue
        with open(os.path.join(root, rel), encoding="utf-8", newline="") as fh:
            text = fh.read()
        student, regions = student_version(text, selected, rel)
        given += [] if is_test(rel) else [student]
        lines = text.splitlines()
        for r in regions:
            if r["id"] in selected:
                wanted += [(rel, i + 1, r["id"], code_key(lines[i])) for i in range(r["begin"] + 1, r["end"])]
    given = given_code(given)
    return [w for w in wanted if len(re.findall(r"\w", w[3])) >= MIN_SIGNIFICANT and w[3] not in given]


def find_leaks(copy_texts, wanted):
    """[(copy rel, line, source rel, source line, tag, key)]: each solution line found in each copy file."""
    leaks = []
    for rel in sorted(copy_texts):
        lines = copy_texts[rel].splitlines()
        keys = [re.sub(r"\s+", "", line) for line in lines]
        starts = [0]
        for k in keys:
            starts.append(starts[-1] + len(k))
        joined = "".join(keys)                      # whitespace gone, so a wrapped line still matches
        for src, src_line, tag, key in wanted:
            at = joined.find(key)
            if at >= 0:
                leaks.append((rel, bisect.bisect_right(starts, at), src, src_line, tag, key))
    return leaks


def format_leak(leak):
    rel, line, src, src_line, tag, key = leak
    return f"{rel}:{line}: holds {src}:{src_line} ({tag}): {key[:80]}"


def read_text(path):
    """The text of a file, or None for a binary one (NUL bytes or not UTF-8)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def walk_files(root):
    """Relative paths of every file under root, less SKIP_DIRS, *.egg-info folders and *.pyc."""
    paths = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        paths += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/")
                  for f in files if not f.endswith(".pyc")]
    return sorted(paths)


def tracked_files(root):
    """Relative paths of the files git tracks when root is the top of a git checkout, else None."""
    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if not top or os.path.realpath(top) != os.path.realpath(root):
            return None
        listed = subprocess.run(["git", "-C", root, "ls-files", "-z"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    # -z: names arrive raw, NUL-separated (spaces, newlines and non-ASCII stay intact)
    names = {p for p in listed.decode("utf-8", "surrogateescape").split("\0") if p}
    return sorted(p for p in names if os.path.isfile(os.path.join(root, p)))


def source_files(root, instructor=False):
    """Relative paths of the repository: git's tracked files (only those: an untracked .venv or data
    folder is never copied), or every file when root is not a git checkout. Without `instructor`, the
    INSTRUCTOR_ONLY folders are left out."""
    files = tracked_files(root)
    if not files:
        files = walk_files(root)
    return [p for p in files if instructor or not p.startswith(INSTRUCTOR_ONLY)]


def check_out(out, root):
    """Refuse an --out inside the source repository, an existing file, or a non-empty folder."""
    real_out, real_root = os.path.realpath(out), os.path.realpath(root)
    if real_out == real_root or real_out.startswith(real_root + os.sep):
        raise BuildError(f"--out {out} is inside the repository {root}; choose a folder outside it")
    if os.path.isfile(out):
        raise BuildError(f"--out {out} is a file; expected a new or empty folder")
    if os.path.isdir(out) and os.listdir(out):
        raise BuildError(f"--out {out} exists and is not empty; choose a new folder")


def stub_locations(texts):
    """(path, line, tag message) of every stub in {rel: text}, for ASSIGNMENT.md."""
    found = []
    for rel in sorted(texts):
        if not rel.endswith(".py"):
            continue
        lines = texts[rel].splitlines()
        for i, line in enumerate(lines[:-1]):
            nxt = lines[i + 1].strip()
            if line.strip() == STUB and STUB_RE.match(nxt):
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
    lines += ["", "Check yourself (prints points per assignment and the failing tests):", "",
              "```bash", "python assignments/grade.py", "```", "",
              "Only the files that hold a `# YOUR CODE HERE` are graded: your instructor lays them into",
              "their own copy of the repository and runs their tests, public and hidden, one assignment at",
              "a time. Code you put in any other file is not seen.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The tutorial in a student copy
# ----------------------------------------------------------------------------------------------

def block_needs(blocks):
    """Per runnable block (list of code strings): the assignments its commands run, its own (from
    TUTORIAL_NEEDS) plus those of every earlier block whose --out folder it reads."""
    needs, outs = [], []
    for code in blocks:
        mine = set()
        for script in re.findall(r"python\s+(?:\S+/)?([\w.-]+\.py)", code):
            mine |= set(TUTORIAL_NEEDS.get(script, ()))
        own_outs = re.findall(r"--out\s+(\S+)", code)
        for used in re.findall(r"runs/tutorial/\S+", code):
            for earlier, earlier_outs in enumerate(outs):
                if any(used.startswith(o) and used not in own_outs for o in earlier_outs):
                    mine |= needs[earlier]
        needs.append(mine)
        outs.append(own_outs)
    return needs


def tutorial_version(text, selected):
    """TUTORIAL.md for a copy in which `selected` are blanked: a note above every runnable block that
    runs a blanked function (nothing changes when none does)."""
    text = re.sub(NOTE_RE, "", text)                 # the notes of an earlier build (a copy of a copy)
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == RUNNABLE]
    blocks = []
    for i in starts:
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), len(lines))
        blocks.append("".join(lines[i + 2:end]))
    out, done = [], 0
    for i, needs in zip(starts, block_needs(blocks)):
        blanked = [a for a in ASSIGNMENTS if a in needs and a in selected]
        out += lines[done:i]
        if blanked:
            names = ", ".join(blanked)
            out += [f"> **In your student copy** this step runs code of {names} (or uses what an earlier step\n",
                    "> made with it). Until you have written it, the command stops with a NotImplementedError\n",
                    "> that names the assignment; `python assignments/grade.py` checks your code.\n", "\n"]
        done = i
    return "".join(out + lines[done:])


# ----------------------------------------------------------------------------------------------
# Build and check
# ----------------------------------------------------------------------------------------------

def student_texts(root, files, selected):
    """{rel: new text} of the files the build changes (.py with regions, TUTORIAL.md), and the
    number of regions blanked per selected assignment. Every .py file is parsed: bad markers stop here."""
    texts, blanked = {}, {a: 0 for a in selected}
    for rel in files:
        if rel.endswith(".py"):
            with open(os.path.join(root, rel), encoding="utf-8", newline="") as fh:
                text, regions = student_version(fh.read(), selected, rel)
            if regions:
                texts[rel] = text
            for r in regions:
                if r["id"] in blanked:
                    blanked[r["id"]] += 1
    if "TUTORIAL.md" in files:
        with open(os.path.join(root, "TUTORIAL.md"), encoding="utf-8", newline="") as fh:
            texts["TUTORIAL.md"] = tutorial_version(fh.read(), selected)
    return texts, blanked


def build(root, out, selected):
    """Write the student copy of `root` to `out`; returns (files copied, regions blanked per assignment).
    Raises BuildError, before writing anything, on bad markers or a copy that would leak."""
    check_out(out, root)
    files = source_files(root)
    texts, blanked = student_texts(root, files, selected)
    copy = {rel: texts[rel] if rel in texts else read_text(os.path.join(root, rel)) for rel in files}
    copy["ASSIGNMENT.md"] = assignment_md(selected, stub_locations({r: t for r, t in copy.items() if t is not None}))
    leaks = find_leaks({rel: t for rel, t in copy.items() if t is not None}, solution_lines(root, files, selected))
    if leaks:
        for leak in leaks:
            print(f"build.py: leak: {format_leak(leak)}", file=sys.stderr)
        raise LeakError(f"the copy would hold {len(leaks)} solution line(s) (listed above); rewrite those "
                        f"files to compare with numbers or properties instead of the solution's code")
    os.makedirs(out, exist_ok=True)
    for rel in files + ["ASSIGNMENT.md"]:
        src, dst = os.path.join(root, rel), os.path.join(out, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if rel in texts or rel == "ASSIGNMENT.md":
            with open(dst, "w", encoding="utf-8", newline="") as fh:
                fh.write(copy[rel])
            if rel in texts:
                shutil.copymode(src, dst)
        else:
            shutil.copy2(src, dst)
    return files, blanked


class LeakError(BuildError):
    """The copy would hold (or holds) solution lines: exit status 1, not 2 (the flags were fine)."""


def check(copy, root, only):
    """The leaks of a built copy: blanked assignments are `only`, or those with a stub in the copy."""
    files = walk_files(copy)
    texts = {rel: read_text(os.path.join(copy, rel)) for rel in files}
    texts = {rel: t for rel, t in texts.items() if t is not None}
    selected = only or sorted({m["id"] for t in texts.values() for m in map(STUB_RE.match, t.splitlines()) if m})
    if not selected:
        raise BuildError(f"--check {copy}: no '# YOUR CODE HERE' stub found; say which assignments were "
                         f"blanked with --only")
    return find_leaks(texts, solution_lines(root, source_files(root), selected)), selected


def parse_only(text, parser):
    """--only 'a1,a3' -> ['a1', 'a3'] in the order of ASSIGNMENTS; unknown ids are refused."""
    if text is None:
        return list(ASSIGNMENTS)
    ids = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in ids if a not in ASSIGNMENTS]
    if unknown or not ids:
        parser.error(f"--only: unknown assignment {', '.join(unknown) or repr(text)}; known: {', '.join(ASSIGNMENTS)}")
    return [a for a in ASSIGNMENTS if a in ids]


def run_check(args, parser):
    """--check DIR: print each leak, then one line; exit 1 when there is one."""
    if not os.path.isdir(args.check):
        parser.error(f"--check {args.check} is not a folder")
    try:
        leaks, selected = check(args.check, args.root, parse_only(args.only, parser) if args.only else None)
    except BuildError as e:
        parser.error(str(e))
    for leak in leaks:
        print(format_leak(leak))
    print(f"build.py --check: {len(leaks)} leaked solution line(s) of {','.join(selected)} in {args.check}",
          file=sys.stderr)
    sys.exit(1 if leaks else 0)


def main(argv=None):
    parser = OneLineParser(prog="build.py", description="Write a student copy of the repository: the marked "
                           "solution regions of the selected assignments become '# YOUR CODE HERE' stubs.")
    parser.add_argument("--out", default=None, help="new (or empty) folder outside the repository")
    parser.add_argument("--only", default=None, help="comma-separated assignments to blank, e.g. a1,a3 "
                        f"(default: all of {','.join(ASSIGNMENTS)})")
    parser.add_argument("--root", default=ROOT, help="the source repository (default: the one holding this script)")
    parser.add_argument("--check", default=None, metavar="COPY", help="scan a built copy for leaked solution lines "
                        "instead of building (blanked assignments: --only, or those with a stub in COPY)")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.check is None):
        parser.error("give exactly one of --out DIR (build) and --check COPY (leak scan)")
    if not os.path.isdir(args.root):
        parser.error(f"--root {args.root} is not a folder")
    if args.check is not None:
        run_check(args, parser)
    selected = parse_only(args.only, parser)
    try:
        files, blanked = build(args.root, args.out, selected)
    except LeakError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except BuildError as e:
        parser.error(str(e))
    for a, n in blanked.items():
        if n == 0 and ASSIGNMENTS[a][1] == "tests":
            print(f"build.py: warning: no solution region of {a} in {args.root}", file=sys.stderr)
    regions = [f"{a} ({n} region{'s' if n != 1 else ''})" for a, n in blanked.items() if ASSIGNMENTS[a][1] == "tests"]
    print(f"wrote {len(files) + 1} files to {os.path.abspath(args.out)}; blanked {', '.join(regions) or 'no code'}"
          f"; no solution line leaked; see ASSIGNMENT.md there")


if __name__ == "__main__":
    main()
