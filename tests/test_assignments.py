"""The course assignments: student copies (assignments/build.py) and the autograder (assignments/grade.py).

Every grading run is a real `python assignments/grade.py --root COPY --json FILE` on a real student
copy built by `python assignments/build.py`. The copies and their grades are made once per module,
graded two at a time, and shared by the tests below.
"""
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT  # noqa: E402

BUILD = os.path.join(ROOT, "assignments", "build.py")
GRADE = os.path.join(ROOT, "assignments", "grade.py")
spec = importlib.util.spec_from_file_location("zsi_assignments_build", BUILD)
build_lib = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_lib)
GRADED = [a for a, (_, kind) in build_lib.ASSIGNMENTS.items() if kind == "tests"]   # a1 .. a7
CONCEPT_MODULES = ["toy_circles", "ddpm", "unet", "classifier", "multiguide", "evaluate", "filter_data", "train"]


def build(out, *args, root=ROOT):
    return subprocess.run([sys.executable, BUILD, "--out", str(out), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, env=ENV)


def grade(root, json_path):
    r = subprocess.run([sys.executable, GRADE, "--root", str(root), "--json", str(json_path)],
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    with open(json_path) as fh:
        return json.load(fh)["assignments"]


def fill(copy, stubs):
    """Write code into the stubs of a student copy, as a student would: {message prefix: code lines}."""
    found = set()
    for rel in ("ddpm.py", "multiguide.py"):
        path = os.path.join(copy, rel)
        lines = open(path).read().split("\n")
        out = []
        for line in lines:
            body = line.strip()
            for prefix, code in stubs.items():
                if body.startswith(f'raise NotImplementedError("{prefix}'):
                    indent = line[:len(line) - len(line.lstrip())]
                    out.pop()                                   # the "# YOUR CODE HERE" line above it
                    out += [indent + c for c in code]
                    found.add(prefix)
                    break
            else:
                out.append(line)
        open(path, "w").write("\n".join(out))
    assert found == set(stubs), f"no stub for {set(stubs) - found}: were the marker descriptions changed?"


# The two plausible mistakes of the brief, as a student would write them into the a1 and a5 stubs.
LINEAR_FOR_COSINE = ['if schedule in ("cosine", "linear"):  # the linear schedule where the cosine is asked',
                     '    scale = 1000.0 / T',
                     '    return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)']
Q_SAMPLE = ['return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0',
            '        + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)']
FLIPPED_CLASS = ['with torch.enable_grad():',
                 '    x_in = x.detach().requires_grad_(True)',
                 '    log_probs = F.log_softmax(classifier(x_in, t), dim=-1)',
                 '    sign = torch.ones(log_probs.shape[-1], dtype=log_probs.dtype)',
                 '    sign[0] = -1.0  # class 0 pushed the wrong way',
                 '    (grad,) = torch.autograd.grad((log_probs * lam.to(log_probs.dtype) * sign).sum(), x_in)',
                 'return grad']
SHIFT = ['mean = mean + out["variance"] * cond_fn(xt, self.model_timesteps(t)).float()']


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{name: (root, grades)}: the reference, one copy per assignment (--only aK), and a copy whose a1
    and a5 stubs hold plausible-but-wrong code; plus "imports", the import check of every copy."""
    base = tmp_path_factory.mktemp("students")
    roots = {"reference": ROOT}
    for a in GRADED + ["wrong"]:
        r = build(base / a, "--only", "a1,a5" if a == "wrong" else a)
        assert r.returncode == 0, r.stderr
        roots[a] = str(base / a)
    fill(roots["wrong"], {"a1: the cosine": LINEAR_FOR_COSINE, "a1: Eq. 4": Q_SAMPLE,
                          "a5: g = grad_x": FLIPPED_CLASS, "a5: step 4": SHIFT})
    check = ("import importlib, sys\n"
             f"for root in {[roots[a] for a in GRADED]!r}:\n"
             f"    for m in {CONCEPT_MODULES!r}: sys.modules.pop(m, None)\n"
             "    sys.path.insert(0, root)\n"
             f"    for m in {CONCEPT_MODULES!r}:\n"
             "        assert importlib.import_module(m).__file__.startswith(root), m\n"
             "    sys.path.pop(0)\n"
             "print('imports ok')\n")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        imports = pool.submit(subprocess.run, [sys.executable, "-c", check], capture_output=True, text=True,
                              timeout=300, env=ENV)
        jobs = {name: pool.submit(grade, root, base / f"{name}.json") for name, root in roots.items()}
        result = {name: (roots[name], job.result()) for name, job in jobs.items()}
    result["imports"] = imports.result()
    return result


def test_reference_scores_full_marks(graded):
    _, grades = graded["reference"]
    for a in GRADED:
        assert grades[a]["possible"] > 0 and grades[a]["earned"] == grades[a]["possible"], (a, grades[a]["failing"])
    assert grades["a8"]["kind"] == "report"          # a8 is graded by its report checklist, not by tests


def test_every_student_copy_imports_cleanly(graded):
    r = graded["imports"]
    assert r.returncode == 0 and "imports ok" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("assignment", GRADED)
def test_student_copy_loses_exactly_its_assignments_points(graded, assignment):
    # No leaks: blanking aK costs every point of aK and none of any other assignment.
    _, grades = graded[assignment]
    _, reference = graded["reference"]
    for a in GRADED:
        if a == assignment:
            assert grades[a]["earned"] == 0 and grades[a]["possible"] == reference[a]["possible"]
            assert len(grades[a]["failing"]) == len(grades[a]["tests"])
        else:
            assert grades[a]["earned"] == reference[a]["earned"], (a, grades[a]["failing"])


def test_plausible_but_wrong_implementations_lose_points(graded):
    _, grades = graded["wrong"]
    _, reference = graded["reference"]
    a1, a5 = grades["a1"], grades["a5"]
    # a linear schedule where the cosine is asked fails the Eq. 10 test only
    assert a1["failing"] == ["test_a1.py::test_cosine_schedule_is_eq10_in_float64"]
    assert 0 < a1["earned"] < a1["possible"]
    # one class's sign flipped in the guidance gradient fails the gradient test, not the mean shift
    assert a5["failing"] == ["test_a5.py::test_multi_guidance_grad_is_the_sum_of_the_class_scores"]
    assert 0 < a5["earned"] < a5["possible"]
    assert all(grades[a]["earned"] == reference[a]["earned"] for a in GRADED if a not in ("a1", "a5"))


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
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert set(ta) == {p for p in listed if os.path.isfile(os.path.join(ROOT, p))} | {"ASSIGNMENT.md"}
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


@pytest.mark.parametrize("case", ["unknown id", "out inside repo", "out not empty", "no end", "no begin",
                                  "nested", "unknown tag"])
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
    r = build(out, *args, root=root)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "error" in r.stderr and "Traceback" not in r.stderr
    if case in ("no end", "no begin", "nested", "unknown tag"):
        assert "concept.py:" in r.stderr and not out.exists()   # names the file and line; writes nothing
    if case == "out inside repo":
        assert not os.path.exists(out)
    if case == "out not empty":
        assert os.listdir(out) == ["keep.txt"]


def test_grade_refuses_a_folder_without_grading_tests(tmp_path):
    r = subprocess.run([sys.executable, GRADE, "--root", str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "assignments/tests" in r.stderr
