"""The course assignments: student copies (assignments/build.py), their leak scan, and the autograder
(assignments/grade.py) with its defences against a hostile submission.

Every grading here is a real `python assignments/grade.py SUB ... --json FILE` on real student copies
built by `python assignments/build.py`. Two module fixtures grade in two batches, two processes at
a time, and the tests below read their JSON: `graded` (the reference, one copy per assignment with
only that assignment blanked, and a copy holding plausible-but-wrong code) and `attacks` (one
submission per defence; see ATTACKS). The code written into the stubs is the reference's own region
code, read from the marked files at test time (sometimes with one mistake put in), so that this
file, which every student copy holds, spells out no solution line.
"""
import concurrent.futures
import hashlib
import hmac
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, ROOT  # noqa: E402

if not os.path.isdir(os.path.join(ROOT, "assignments", "hidden")):   # build.py never copies it
    pytest.skip("the instructor's tests of the assignments: this is a student copy (no assignments/hidden/); "
                "grade your work with: python assignments/grade.py", allow_module_level=True)

BUILD = os.path.join(ROOT, "assignments", "build.py")
GRADE = os.path.join(ROOT, "assignments", "grade.py")
spec = importlib.util.spec_from_file_location("zsi_assignments_build", BUILD)
build_lib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_lib)
GRADED = [a for a, (_, kind) in build_lib.ASSIGNMENTS.items() if kind == "tests"]   # a1 .. a7
CONCEPT_MODULES = ["toy_circles", "ddpm", "unet", "classifier", "multiguide", "evaluate", "filter_data", "train"]
SLOW = 20   # --timeout of the attack batch: an endless loop costs this much; an honest run takes 2-10 s


def build(out, *args, root=ROOT):
    return subprocess.run([sys.executable, BUILD, "--out", str(out), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, env=ENV)


def grade(subs, json_path, *args):
    """{absolute submission path: its record in grade.py's JSON}, and the finished process."""
    r = subprocess.run([sys.executable, GRADE, *map(str, subs), "--json", str(json_path), "--jobs", "2", *args],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    with open(json_path) as fh:
        return {s["path"]: s for s in json.load(fh)["submissions"]}, r


def region_code(rel, prefix):
    """The code lines of the reference region of `rel` whose stub message starts with `prefix`, dedented."""
    lines = open(os.path.join(ROOT, rel)).read().splitlines()
    for r in build_lib.find_regions(lines, rel):
        if f"{r['id']}: {r['what']}".startswith(prefix):
            return [line[len(r["indent"]):] for line in lines[r["begin"] + 1:r["end"]]]
    raise AssertionError(f"no region {prefix!r} in {rel}: were the marker descriptions changed?")


def mistake(code, old, new):
    """`code` with the one occurrence of `old` replaced: a plausible student mistake."""
    assert sum(line.count(old) for line in code) == 1, old
    return [line.replace(old, new) for line in code]


def fill(copy, stubs):
    """Write code into the stubs of a student copy, as a student would: {message prefix: code lines}."""
    found = set()
    for rel in ("ddpm.py", "multiguide.py"):
        path = os.path.join(copy, rel)
        out = []
        for line in open(path).read().split("\n"):
            body = line.strip()
            for prefix, code in stubs.items():
                if body.startswith(f'raise NotImplementedError("{prefix}'):
                    indent = line[:len(line) - len(line.lstrip())]
                    out.pop()                                   # the "# YOUR CODE HERE" line above it
                    out += [indent + c if c else c for c in code]
                    found.add(prefix)
                    break
            else:
                out.append(line)
        open(path, "w").write("\n".join(out))
    assert found == set(stubs), f"no stub for {set(stubs) - found}: were the marker descriptions changed?"


def wrong_code():
    """Two plausible mistakes: the cosine schedule computed in float32 (a1) and the guidance gradient with
    its sign flipped (a5), next to correct q_sample (a1) and mean shift (a5)."""
    return {"a1: the cosine": mistake(region_code("ddpm.py", "a1: the cosine"), "arange(T + 1, dtype=np.float64)",
                                      "arange(T + 1, dtype=np.float32)"),
            "a1: Eq. 4": region_code("ddpm.py", "a1: Eq. 4"),
            "a5: g = grad_x": mistake(region_code("multiguide.py", "a5: g = grad_x"), "objective = (",
                                      "objective = -("),
            "a5: step 4": region_code("ddpm.py", "a5: step 4")}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{name: (root, grades)} for the reference, one copy per assignment (--only aK) and "wrong" (a1 and
    a5 hold plausible-but-wrong code), all graded in one grade.py run; plus "imports" (every copy's
    concept files import) and "run" (the finished grade.py process)."""
    base = tmp_path_factory.mktemp("students")
    roots = {"reference": ROOT}
    for a in GRADED + ["wrong"]:
        r = build(base / a, "--only", "a1,a5" if a == "wrong" else a)
        assert r.returncode == 0, r.stderr
        roots[a] = str(base / a)
    fill(roots["wrong"], wrong_code())
    check = ("import importlib, sys\n"
             f"for root in {[roots[a] for a in GRADED]!r}:\n"
             f"    for m in {CONCEPT_MODULES!r}: sys.modules.pop(m, None)\n"
             "    sys.path.insert(0, root)\n"
             f"    for m in {CONCEPT_MODULES!r}:\n"
             "        assert importlib.import_module(m).__file__.startswith(root), m\n"
             "    sys.path.pop(0)\n"
             "print('imports ok')\n")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        imports = pool.submit(subprocess.run, [sys.executable, "-c", check], capture_output=True, text=True,
                              timeout=300, env=ENV)
        grades, run = grade(roots.values(), base / "grades.json", "--csv", base / "grades.csv",
                            "--feedback", base / "feedback")
    result = {name: (root, grades[os.path.abspath(root)]) for name, root in roots.items()}
    result["imports"], result["run"], result["base"] = imports.result(), run, base
    return result


def points(record, a, hidden=None):
    """(earned, possible) of assignment a: every test, or only the hidden (True) / public (False) ones."""
    tests = [t for t in record["assignments"][a]["tests"] if hidden is None or t["hidden"] == hidden]
    return sum(t["points"] for t in tests if t["passed"]), sum(t["points"] for t in tests)


def failing(record, a, hidden=False):
    return [t["id"].rsplit("/", 1)[-1] for t in record["assignments"][a]["tests"]
            if not t["passed"] and t["hidden"] == hidden]


def test_reference_scores_full_marks_hidden_tests_included(graded):
    _, ref = graded["reference"]
    for a in GRADED:
        v = ref["assignments"][a]
        assert v["status"] == "ok" and v["possible"] > 0 and v["earned"] == v["possible"], (a, v["reason"])
        assert v["hidden_possible"] > 0 and v["hidden_earned"] == v["hidden_possible"]   # the hidden column is real
    assert ref["earned"] == ref["possible"] and ref["hidden_earned"] == ref["hidden_possible"] > 0


def test_every_student_copy_imports_cleanly(graded):
    r = graded["imports"]
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("assignment", GRADED)
def test_student_copy_loses_exactly_its_assignments_points(graded, assignment):
    # Independent grading tests: blanking aK costs every point of aK (hidden ones too) and none of any other.
    _, grades = graded[assignment]
    _, reference = graded["reference"]
    for a in GRADED:
        v = grades["assignments"][a]
        assert v["status"] == "ok", (a, v["reason"])
        if a == assignment:
            assert v["earned"] == 0 and v["possible"] == reference["assignments"][a]["possible"]
            assert all(t["error"] == "NotImplementedError" for t in v["tests"])
        else:
            assert v["earned"] == reference["assignments"][a]["earned"], (a, failing(grades, a))


def test_plausible_but_wrong_implementations_lose_points(graded):
    _, grades = graded["wrong"]
    _, reference = graded["reference"]
    # the cosine schedule in float32 fails the Eq. 10 test (and the hidden one); the linear one and q_sample pass
    assert failing(grades, "a1") == ["test_a1.py::test_cosine_schedule_is_eq10_in_float64"]
    assert len(failing(grades, "a1", hidden=True)) == 1
    assert 0 < points(grades, "a1")[0] < points(grades, "a1")[1]
    # the guidance gradient with its sign flipped fails the gradient test, not the mean shift
    assert failing(grades, "a5") == ["test_a5.py::test_multi_guidance_grad_is_the_sum_of_the_class_scores"]
    assert 0 < points(grades, "a5")[0] < points(grades, "a5")[1]
    assert all(grades["assignments"][a]["earned"] == reference["assignments"][a]["earned"]
               for a in GRADED if a not in ("a1", "a5"))


def test_gradebook_feedback_and_progress(graded):
    base, run = graded["base"], graded["run"]
    _, wrong = graded["wrong"]
    rows = [line.split(",") for line in (base / "grades.csv").read_text().splitlines()]
    assert rows[0] == ["submission", *GRADED, "total", "hidden", "notes"] and rows[1][0] == "(possible)"
    assert len(rows) == 2 + 9
    by_name = {row[0]: row for row in rows}
    assert by_name["wrong"][1:1 + len(GRADED)] == [f"{wrong['assignments'][a]['earned']:g}" for a in GRADED]
    md = (base / "feedback" / "wrong.md").read_text()
    assert "test_a1.py::test_cosine_schedule_is_eq10_in_float64`, line " in md and "(AssertionError)" in md
    assert "| 0 of 1 |" in md and "hidden.py" not in md            # hidden tests by count only
    assert len(run.stdout.strip().splitlines()) == 1 and run.stdout.startswith("graded 9 submission(s) x 7")
    assert run.stderr.count("] ") == 9 * 7                          # one progress line per run, on stderr


# ----------------------------------------------------------------------------------------------
# Defences: each attack is one submission; the batch is graded once, in `attacks`
# ----------------------------------------------------------------------------------------------

HOOK = '''import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().outcome = "passed"


def pytest_collection_modifyitems(items):
    for item in items:
        item.obj = lambda *a, **k: None
'''
PASSING_TESTS = '''import pytest

@pytest.mark.assignment("a1", points=1000)
def test_cosine_schedule_is_eq10_in_float64():
    assert True
'''
POINTS = '''def pytest_collection_modifyitems(items):
    for item in items:
        item.user_properties[:] = [("assignment", "a1"), ("points", 1000)]
'''
FORGE = '''import gc as _gc, os as _os
_objects = _gc.get_objects()
_xml = next(o for o in _objects if type(o).__name__ == "Config" and hasattr(o, "option")).option.xmlpath
_items = next(o for o in _objects if type(o).__name__ == "Session" and hasattr(o, "items")).items
with open(_xml, "w") as _fh:                                 # every test passed, says the forged report
    _fh.write("<testsuites><testsuite>" + "".join(
        '<testcase classname="%s" name="%s"/>' % (i.nodeid.split("::")[0][:-3].replace("/", "."), i.name)
        for i in _items) + "</testsuite></testsuites>")
for _fd in map(int, _os.listdir("/proc/self/fd")):           # and a "finish" line on every pipe
    try:
        if _fd > 2 and _os.readlink("/proc/self/fd/%d" % _fd).startswith("pipe:"):
            _os.write(_fd, b"0" * 64 + b' {"exit": 0, "kind": "finish", "seq": 0}\\n')
    except OSError:
        pass
_os._exit(0)
'''


# Imported by the first test that needs ddpm.py: empties every collected test function and makes the
# assertion helpers agree with anything, so that a blank copy would pass all but the first test.
REWRITE_TESTS = """import sys as _sys, math as _math, pytest as _pytest, numpy.testing as _npt
_empty = (lambda *args, **kwargs: None).__code__
for _module in list(_sys.modules.values()):
    if getattr(_module, "__name__", "").split(".")[-1].startswith("test_"):
        for _name, _f in list(vars(_module).items()):
            if _name.startswith("test_") and hasattr(_f, "__code__") and not _f.__code__.co_freevars:
                _f.__code__ = _empty
_pytest.approx = lambda *args, **kwargs: type("Anything", (), {"__eq__": lambda self, other: True})()
_npt.assert_allclose = lambda *args, **kwargs: None
_math.isclose = lambda *args, **kwargs: True
"""


def attack_sources():
    """{attack: (base copy, graded assignments, {relative path: text to write, or a callable(path)})}."""
    first = "import numpy as np\n"                             # each concept file's first import line
    return {
        "conftest": ("blank", "a1", {"conftest.py": HOOK, "assignments/tests/conftest.py": HOOK}),
        "tests": ("blank", "a1", {"assignments/tests/test_a1.py": PASSING_TESTS}),
        "points": ("blank", "a1", {"assignments/tests/test_a1.py": PASSING_TESTS, "points.json": '{"a1": 1000}',
                                   "assignments/tests/conftest.py": POINTS}),
        "config": ("blank", "a1", {"pytest.ini": "[pytest]\naddopts = -p evil\n", "evil.py": HOOK,
                                   "setup.cfg": "[tool:pytest]\naddopts = -p evil\n",
                                   "tox.ini": "[pytest]\naddopts = -p evil\n",
                                   "pyproject.toml": "[tool.pytest.ini_options]\naddopts = '-p evil'\n",
                                   "sitecustomize.py": "import os\nos._exit(3)\n", "evil.pth": "import evil\n"}),
        "symlink": ("blank", "a1", {"ddpm.py": lambda path: (os.remove(path),
                                                             os.symlink(os.path.join(ROOT, "ddpm.py"), path))}),
        "forge": ("full", "a1,a2", {"ddpm.py": ("insert", "def get_betas(schedule, T):", FORGE)}),
        "monkeypatch": ("full", "a1,a2", {"ddpm.py": ("insert", first, "import _pytest.python\n"
                                                      "_pytest.python.Function.runtest = lambda self: None\n")}),
        "rewrite_tests": ("blank", "a1,a2", {"ddpm.py": ("insert", first, REWRITE_TESTS)}),
        "endless_loop": ("full", "a4,a6,a7", {"unet.py": ("insert", "def timestep_embedding(",
                                                          "import time\nwhile True:\n    time.sleep(0.2)\n")}),
        "kill_server": ("full", "a1,a2", {"ddpm.py": ("insert", "def get_betas(schedule, T):",
                                                      "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")}),
        "exit_at_import": ("full", "a4,a6,a7", {"evaluate.py": ("insert", first, "import os\nos._exit(0)\n")}),
        "memory": ("full", "a4,a6,a7", {"filter_data.py": ("insert", "def chernoff_tail(",
                                                           "hog = bytearray(4 << 30)\n")}),
    }


def plant(copy, rel, what):
    """Write one attack file into a copy: text, a callable(path), or ("insert", anchor, code), which puts
    the code right after the first line that starts with anchor (inside the function for a `def` line)."""
    path = os.path.join(copy, rel)
    if callable(what):
        return what(path)
    if isinstance(what, str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "w").write(what)
    _, anchor, code = what
    lines = open(path).read().split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(anchor.rstrip("\n")))
    indent = "    " if anchor.startswith("def ") else ""     # the one-line signatures of get_betas & co.
    lines[at + 1:at + 1] = [indent + c for c in code.rstrip("\n").split("\n")]
    open(path, "w").write("\n".join(lines))


@pytest.fixture(scope="module")
def attacks(tmp_path_factory):
    """{attack: its record in grade.py's JSON}: two batches (by graded assignments), two processes at a time."""
    base = tmp_path_factory.mktemp("attacks")
    for kind, only in (("blank", "a1"), ("full", "a8")):         # --only a8 blanks nothing: all code kept
        assert build(base / kind, "--only", only).returncode == 0
    batches = {}
    for name, (kind, only, files) in attack_sources().items():
        shutil.copytree(base / kind, base / name, symlinks=True)
        for rel, what in files.items():
            plant(str(base / name), rel, what)
        alone = name == "kill_server"          # its runs die with the server: graded alone, one at a time
        batches.setdefault((only, "1" if alone else "2"), []).append(base / name)
    batches = dict(sorted(batches.items(), key=lambda kv: "endless_loop" not in str(kv[1])))   # it runs longest
    result = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(grade, subs, base / f"{only}-{jobs}.json", "--only", only, "--timeout", str(SLOW),
                            "--jobs", jobs) for (only, jobs), subs in batches.items()]
        for job in jobs:
            result.update({os.path.basename(path): record for path, record in job.result()[0].items()})
    return result


def only_own_assignment(record, victim, reason):
    """The attacked assignment scores 0 with the reason; every other graded one earns full marks."""
    for a, v in record["assignments"].items():
        if a == victim:
            assert v["earned"] == 0 and v["status"] == "failed" and re.search(reason, v["reason"]), v["reason"]
        else:
            assert v["status"] == "ok" and v["earned"] == v["possible"] > 0, (a, v["reason"])


def test_defence_conftest_hook_is_never_read(attacks):
    v = attacks["conftest"]["assignments"]["a1"]
    assert v["earned"] == 0 and v["status"] == "ok" and failing(attacks["conftest"], "a1")


def test_defence_replaced_test_files_are_never_read(attacks):
    v = attacks["tests"]["assignments"]["a1"]
    assert v["earned"] == 0 and len(v["tests"]) > 1                  # the instructor's tests ran, all of them


def test_defence_planted_points_table_is_never_read(attacks):
    v = attacks["points"]["assignments"]["a1"]
    assert v["earned"] == 0 and v["possible"] < 1000


def test_defence_config_files_sitecustomize_and_pth_are_never_read(attacks):
    v = attacks["config"]["assignments"]["a1"]
    assert v["earned"] == 0 and v["status"] == "ok"                   # sitecustomize's os._exit never ran


def test_defence_symlink_to_the_reference_is_refused(attacks):
    record = attacks["symlink"]
    assert record["assignments"]["a1"]["earned"] == 0 and "ddpm.py: a symbolic link; ignored" in record["notes"]


def test_defence_forged_junit_xml_and_result_line(attacks):
    only_own_assignment(attacks["forge"], "a1", r"not signed by the grader's plugin")


def test_defence_patched_pytest_internals(attacks):
    record = attacks["monkeypatch"]                                  # ddpm.py patches pytest at import
    for a in ("a1", "a2"):
        v = record["assignments"][a]
        assert v["earned"] == 0 and "pytest's machinery was changed" in v["reason"], v["reason"]


def test_defence_rewritten_tests_and_assertion_helpers(attacks):
    record = attacks["rewrite_tests"]                  # ddpm.py empties the tests and pytest.approx at import
    for a in ("a1", "a2"):
        v = record["assignments"][a]
        assert v["earned"] == 0 and "pytest's machinery was changed" in v["reason"], v["reason"]


def test_defence_killing_the_fork_server_costs_only_its_assignment(attacks):
    # the run is started again once (another run may have been the killer), then scores 0
    only_own_assignment(attacks["kill_server"], "a1", r"fork server died during this run, twice")


def test_defence_os_exit_at_import_costs_only_its_assignment(attacks):
    only_own_assignment(attacks["exit_at_import"], "a6", r"process exited \(status 0\) while importing evaluate\.py")


def test_defence_endless_loop_costs_only_its_assignment(attacks):
    only_own_assignment(attacks["endless_loop"], "a4", rf"timed out after {SLOW} s in test_a4\.py::")


def test_defence_4_gib_allocation_costs_only_its_assignment(attacks):
    only_own_assignment(attacks["memory"], "a7", r"hit the memory limit \(3 GiB\) in test_a7\.py::")


def load_grade():
    """assignments/grade.py as a module (it imports `build`, here the module loaded above)."""
    saved = sys.modules.get("build")
    sys.modules["build"] = build_lib
    try:
        grade_spec = importlib.util.spec_from_file_location("zsi_assignments_grade", GRADE)
        module = importlib.util.module_from_spec(grade_spec)
        grade_spec.loader.exec_module(module)
        return module
    finally:
        if saved is None:
            del sys.modules["build"]
        else:
            sys.modules["build"] = saved


def test_a_file_that_does_not_compile_is_named_with_its_line(tmp_path):
    """A syntax error in one file fails the tests of every assignment that imports it: the notes say where."""
    grade = load_grade()
    (tmp_path / "ddpm.py").write_text("import numpy as np\n\ndef get_betas(schedule, T:\n    pass\n")
    (tmp_path / "unet.py").write_text("x = 1\n")
    files, notes = grade.read_submission(str(tmp_path), ["ddpm.py", "unet.py"])
    assert files["ddpm.py"] is not None and files["unet.py"] is not None
    assert len(notes) == 1 and notes[0].startswith("ddpm.py line 3: does not compile (SyntaxError"), notes


def test_results_count_only_when_signed_in_sequence_and_the_junit_report_agrees():
    g, key = load_grade(), b"k" * 32
    sign = lambda body: hmac.new(key, body, hashlib.sha256).hexdigest().encode() + b" " + body + b"\n"  # noqa: E731
    bodies = [json.dumps(dict(kind="collected", ids=["t.py::a"], seq=0)).encode(),
              json.dumps(dict(kind="test", id="t.py::a", outcome="passed", tampered=False, memory=False, error=None,
                              line=None, seq=1)).encode(), json.dumps(dict(kind="finish", exit=0, seq=2)).encode()]
    data = b"".join(map(sign, bodies))
    records, bad = g.verify(data, key)
    assert bad is None and [r["kind"] for r in records] == ["collected", "test", "finish"]
    assert "not signed" in g.verify(data + b"0" * 64 + b' {"seq": 3}\n', key)[1]            # a forged line
    assert "out of sequence" in g.verify(sign(bodies[0]) + sign(bodies[2]), key)[1]      # a dropped line
    assert "unfinished" in g.verify(data + b"abc", key)[1]
    opts = type("Opts", (), dict(timeout=60.0, memory=3.0))
    run = dict(records=records, channel=None, timed_out=False, returncode=0, junit={("t", "a"): "passed"})
    assert g.run_failure(run, ["t.py::a"], set(), opts) is None
    assert "disagree on t.py::a" in g.run_failure(dict(run, junit={("t", "a"): "failed"}), ["t.py::a"], set(), opts)
    assert "JUnit report is missing" in g.run_failure(dict(run, junit=None), ["t.py::a"], set(), opts)
    assert "1 expected test(s) not reported, e.g. a hidden test" in g.run_failure(run, ["t.py::a", "h.py::b"],
                                                                                  {"h.py::b"}, opts)
    assert g.junit_key("assignments/tests/test_a1.py::test_x[1-2]") == ("assignments.tests.test_a1", "test_x[1-2]")


# ----------------------------------------------------------------------------------------------
# build.py: the copy, the leak scan, the tutorial
# ----------------------------------------------------------------------------------------------

def tree(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_build_is_idempotent_keeps_the_rest_and_leaves_no_marker(tmp_path, graded):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert build(a).returncode == 0                          # every assignment
    assert build(b).returncode == 0                          # the same build again
    assert build(c, root=a).returncode == 0                  # a student copy built from a student copy
    ta, tb, tc = tree(a), tree(b), tree(c)
    assert ta == tb == tc
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True).stdout
    tracked = {p for p in listed.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))}
    assert set(ta) == {p for p in tracked if not p.startswith("assignments/hidden/")} | {"ASSIGNMENT.md"}
    assert any(p.startswith("assignments/hidden/") for p in tracked)       # the hidden tests exist, uncopied
    stubs, regions = 0, 0
    for rel, data in ta.items():
        text = data.decode("utf-8", errors="replace")
        assert not any(line.lstrip().startswith(("### BEGIN SOLUTION", "### END SOLUTION"))
                       for line in text.splitlines()), rel
        if rel.endswith(".py"):
            stubs += text.count("# YOUR CODE HERE\n")
            ref = open(os.path.join(ROOT, rel)).read()
            regions += len(build_lib.find_regions(ref.splitlines(True), rel))
            if not build_lib.find_regions(ref.splitlines(True), rel):
                assert text == ref, rel                          # files without regions are copied as they are
        elif rel == "TUTORIAL.md":                               # the notes on the steps that need a stub
            assert text == build_lib.tutorial_version(open(os.path.join(ROOT, rel)).read(), GRADED)
        elif rel != "ASSIGNMENT.md":
            assert data == open(os.path.join(ROOT, rel), "rb").read(), rel
    assert stubs == regions > 0                              # every region became a stub
    assert os.access(a / ".ci" / "run", os.X_OK)             # file modes kept
    # an unselected assignment keeps its code: in the --only a6 copy, unet.py is the reference minus markers
    a6_root, _ = graded["a6"]
    ref = open(os.path.join(ROOT, "unet.py")).read().splitlines(True)
    expected = "".join(line for line in ref if not line.lstrip().startswith(("### BEGIN SOLUTION", "### END SOLUTION")))
    assert open(os.path.join(a6_root, "unet.py")).read() == expected
    assert "assignments/a1.md" in (a / "ASSIGNMENT.md").read_text()
    # the leak scan of the fresh, fully blanked copy: nothing (build.py refuses a leaky copy too)
    r = subprocess.run([sys.executable, BUILD, "--check", str(a)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout == "" and "0 leaked solution line(s) of a1,a2,a3,a4,a5,a6,a7" in r.stderr


def git_repo(path, files):
    """A one-commit git repository at path holding {relative path: text}."""
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)) or path, exist_ok=True)
        open(os.path.join(path, rel), "w").write(text)
    git = ["git", "-C", str(path), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(git + args, check=True, capture_output=True)


CONCEPT = ("def f(x):\n"
           "    ### BEGIN SOLUTION a1: f\n"
           "    y = x * 3 + 1  # the solution\n"
           "    total_of_the_squares = sum(v ** 2 for v in range(x))\n"
           "    return y\n"
           "    ### END SOLUTION\n")


def test_student_copy_holds_only_tracked_files(tmp_path):
    # a virtual environment made inside a clone (names with spaces) is neither tracked nor copied
    git_repo(tmp_path / "src", {"concept.py": CONCEPT, "notes/a b.md": "tracked, with a space\n"})
    (tmp_path / "src" / ".venv" / "lib dir").mkdir(parents=True)
    (tmp_path / "src" / ".venv" / "lib dir" / "site file.py").write_text("x = 1\n")
    (tmp_path / "src" / "untracked.py").write_text("x = 2\n")
    r = build(tmp_path / "out", root=tmp_path / "src")
    assert r.returncode == 0, r.stderr
    assert set(tree(tmp_path / "out")) == {"concept.py", "notes/a b.md", "ASSIGNMENT.md"}


def test_leak_scan_finds_a_planted_line_and_ignores_trivial_ones(tmp_path):
    # the significant line, re-spaced, commented and wrapped over two lines, in a test: refused, nothing written
    leaky = "def test_f():\n    # expected: total_of_the_squares =\n    total_of_the_squares = sum(v**2\n" \
            "        for v in range(x))   # a comment\n"
    git_repo(tmp_path / "src", {"concept.py": CONCEPT, "tests/test_f.py": leaky})
    r = build(tmp_path / "out", root=tmp_path / "src")
    assert r.returncode == 1 and not (tmp_path / "out").exists()
    assert "tests/test_f.py:3: holds concept.py:4 (a1)" in r.stderr and r.stderr.count("leak:") == 1
    assert "Traceback" not in r.stderr
    # trivial lines (`return y`, `y = x * 3 + 1`: under 12 word characters) are not looked for
    git_repo(tmp_path / "ok", {"concept.py": CONCEPT, "tests/test_f.py": "y = x * 3 + 1\nreturn y\n"})
    assert build(tmp_path / "ok_out", root=tmp_path / "ok").returncode == 0
    # --check on a built copy into which the line was planted afterwards: found, exit 1
    with open(tmp_path / "ok_out" / "README", "w") as fh:
        fh.write("total_of_the_squares = sum(v ** 2 for v in range(x))\n")
    r = subprocess.run([sys.executable, BUILD, "--check", str(tmp_path / "ok_out"), "--root", str(tmp_path / "ok")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 1 and r.stdout.startswith("README:1: holds concept.py:4 (a1)")


def tutorial_blocks(text):
    """The code of every runnable bash block of a tutorial, in order."""
    return re.findall(r"<!-- runnable -->\n```bash\n(.*?)```", text, flags=re.S)


def test_tutorial_runs_in_a_student_copy_and_says_which_steps_need_a_stub(graded):
    copy, _ = graded["a4"]
    text = open(os.path.join(copy, "TUTORIAL.md")).read()
    blocks = tutorial_blocks(text)
    scripts = {s for code in blocks for s in re.findall(r"python\s+([\w.-]+\.py)", code)}
    assert blocks and scripts <= set(build_lib.TUTORIAL_NEEDS), scripts - set(build_lib.TUTORIAL_NEEDS)
    noted = ["this step runs code of a4" in part for part in re.split(r"<!-- runnable -->\n```bash", text)[:-1]]
    needs = build_lib.block_needs(blocks)
    assert noted == ["a4" in n for n in needs] and noted[:3] == [False, False, True]
    out = os.path.join(str(graded["base"]), "tutorial")
    for k, code in enumerate(blocks[:3]):            # data and the forward process run; the U-Net step stops
        code = code.replace("runs/tutorial", out)
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=copy, env=ENV, capture_output=True,
                           text=True, timeout=300)
        if noted[k]:
            assert r.returncode != 0 and 'NotImplementedError: a4: ' in r.stderr, r.stderr[-2000:]
        else:
            assert r.returncode == 0, r.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unknown id", "out inside repo", "out not empty", "no end", "no begin",
                                  "nested", "unknown tag", "check and out", "check without stub"])
def test_bad_input_fails_in_one_line(tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    marked = {"no end": ["def f():", "    ### BEGIN SOLUTION a1: f", "    return 1"],
              "no begin": ["def f():", "    return 1", "    ### END SOLUTION"],
              "nested": ["def f():", "    ### BEGIN SOLUTION a1: f", "    ### BEGIN SOLUTION a2: g",
                         "    return 1", "    ### END SOLUTION", "    ### END SOLUTION"],
              "unknown tag": ["def f():", "    ### BEGIN SOLUTION a99: f", "    return 1", "    ### END SOLUTION"]}
    (src / "concept.py").write_text("\n".join(marked.get(case, ["x = 1"])) + "\n")
    out, args, root = tmp_path / "out", [], src
    if case == "unknown id":
        args = ["--only", "a1,a9"]
    elif case == "out inside repo":
        out, root = os.path.join(ROOT, "student_copy_must_not_exist"), ROOT
    elif case == "out not empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "check and out":
        args = ["--check", str(src)]
    if case == "check without stub":
        r = subprocess.run([sys.executable, BUILD, "--check", str(src), "--root", str(src)], capture_output=True,
                           text=True, env=ENV)
    else:
        r = build(out, *args, root=root)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "error" in r.stderr and "Traceback" not in r.stderr
    if case in ("no end", "no begin", "nested", "unknown tag"):
        assert "concept.py:" in r.stderr and not out.exists()   # names the file and line; writes nothing
    if case == "out inside repo":
        assert not os.path.exists(out)
    if case == "out not empty":
        assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("case", ["not a folder", "no grading tests", "bad only", "json is a folder",
                                  "student copy as reference"])
def test_grade_bad_input_fails_in_one_line(tmp_path, case):
    args = {"not a folder": [str(tmp_path / "missing")],
            "no grading tests": ["--reference", str(tmp_path)],
            "bad only": ["--only", "a1,a8"],
            "json is a folder": ["--json", str(tmp_path)],
            "student copy as reference": [str(tmp_path), "--reference", str(tmp_path)]}[case]
    if case == "student copy as reference":
        git_repo(tmp_path, {"assignments/tests/test_x.py": "def test_x():\n    pass\n"})
        args = [ROOT, "--reference", str(tmp_path)]
    r = subprocess.run([sys.executable, GRADE, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("grade.py: error:") and "Traceback" not in r.stderr
