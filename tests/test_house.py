"""The shape of the house: one concept per file, one training loop, short functions, safe loading.

These tests read the code (with Python's ast), they run none of it: they keep the layout that a
reader relies on from drifting.
"""
import ast
import glob
import os
import re

from conftest import ROOT

SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 + glob.glob(os.path.join(ROOT, "assignments", "*.py")))
ZSI = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}


def tree(path):
    with open(path) as fh:
        return ast.parse(fh.read(), path)


def zsi_imports(path):
    """The zsi modules a file imports (import x / from x import y), by name."""
    names = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & ZSI


def test_no_function_is_longer_than_70_lines():
    long = [f"{os.path.relpath(p, ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for p in SOURCES for n in ast.walk(tree(p))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 70]
    assert not long, long


def test_train_py_reads_as_the_experiment_in_at_most_700_lines():
    with open(os.path.join(ROOT, "train.py")) as fh:
        assert len(fh.read().splitlines()) <= 700


def test_imports_point_down_the_house():
    rel = lambda name: os.path.join(ROOT, name + ".py")  # noqa: E731
    assert zsi_imports(rel("plumbing")) == set()                      # the plumbing imports no science
    for foundation in ("toy_circles", "ddpm", "unet"):
        assert zsi_imports(rel(foundation)) <= {"plumbing"}, foundation
    assert not zsi_imports(rel("interpolants")) & {"ddpm", "toy_circles", "unet"}
    assert "unet" not in zsi_imports(rel("filter_data"))
    assert "toy_circles" not in zsi_imports(rel("fit"))                # augmentation lives in the loop
    for low in ("plumbing", "toy_circles", "ddpm", "unet", "dit", "classifier", "fit", "multiguide",
                "filter_data", "evaluate", "real_images", "report", "interpolants"):
        assert "train" not in zsi_imports(rel(low)), f"{low} imports train.py: an arrow pointing up"


def test_one_training_loop():
    """Only fit.py steps an optimizer (classifier.fit_temperature's one-parameter L-BFGS calibration aside)."""
    stepping = []
    for p in SOURCES:
        text = open(p).read()
        for m in re.finditer(r"\b(opt|optimizer|optim|scaler)\.step\(", text):
            line = text[:m.start()].count("\n") + 1
            stepping.append((os.path.basename(p), line))
    # benchmarks/ time training steps of our U-Net and a foreign one: they train nothing
    outside = [s for s in stepping if s[0] not in ("fit.py", "bench_unet.py")]
    assert [s[0] for s in outside] in ([], ["classifier.py"]), outside
    assert any(s[0] == "fit.py" for s in stepping)
    assert "torch.optim.LBFGS" in open(os.path.join(ROOT, "classifier.py")).read()


def test_every_load_goes_through_plumbing_with_weights_only():
    for p in SOURCES:
        text = open(p).read()
        assert "weights_only=False" not in text, p
        if os.path.basename(p) != "plumbing.py":
            assert "torch.load(" not in text, f"{p}: load checkpoints with plumbing.load_checkpoint"
    assert "torch.load(path, map_location=\"cpu\", weights_only=True)" in open(os.path.join(ROOT, "plumbing.py")).read()
