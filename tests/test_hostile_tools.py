"""Hostile input for the tools around a run: evaluate.py, report.py, generalization.py, assignments/grade.py.

As in test_hostile.py, each case runs a main() in this process with one thing wrong and asserts a
non-zero exit, one line naming the flag or file, no traceback, nothing written and no work done
(sentinels raise ReachedWork when training, a loss computation or grading starts).
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, refused_in_one_line
import classifier
import ddpm
import evaluate
import fit
import generalization
import plumbing
import report
import unet


class ReachedWork(Exception):
    """Raised by the sentinels: bad input got past the checks into the work."""


def reached(*args, **kwargs):
    raise ReachedWork("bad input reached the work")


def tree(path):
    """Every file under path (relative names) with its size and mtime: what a case must leave alone."""
    return sorted((os.path.relpath(os.path.join(r, n), path), os.path.getsize(os.path.join(r, n)),
                   os.path.getmtime(os.path.join(r, n))) for r, _, names in os.walk(path) for n in names)


def refused(main, argv, capsys, *words):
    """main(argv) must exit non-zero with one line holding every word, and no traceback."""
    return refused_in_one_line(main, argv, capsys, *words)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 16-pixel DDPM, another at 32 pixels, a classifier, a truncated checkpoint, 33 x 33 samples."""
    d = tmp_path_factory.mktemp("tools")
    diffusion = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")
    f = {k: str(d / v) for k, v in dict(ddpm="ddpm.pt", ddpm32="ddpm32.pt", clf="clf.pt", cut="cut.pt",
                                         s33="s33.npz").items()}
    for key, size in (("ddpm", 16), ("ddpm32", 32)):
        net = unet.build_unet("tiny", image_size=size)
        plumbing.save_checkpoint(f[key], dict(kind="ddpm", model_config=net.config, diffusion=diffusion, step=1,
                                              model=net.state_dict(), ema=net.state_dict()))
    clf = classifier.build_classifier("tiny", image_size=16)
    plumbing.save_checkpoint(f["clf"], dict(kind="classifier", model_config=clf.config, diffusion=diffusion,
                                            model=clf.state_dict(), ema=None))
    data = open(f["ddpm"], "rb").read()
    open(f["cut"], "wb").write(data[: len(data) // 3])
    np.savez(f["s33"], images=np.zeros((4, 33, 33, 3), np.uint8))
    return f


@pytest.fixture(autouse=True)
def sentinels(monkeypatch):
    monkeypatch.setattr(fit, "fit", reached)
    monkeypatch.setattr(ddpm.Diffusion, "losses_by_timestep", reached)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- evaluate.py

def test_circles_refuses_samples_of_a_size_the_data_set_has_not(files, tmp_path, capsys):
    out = str(tmp_path / "out")
    refused(evaluate.main, ["circles", "--samples", files["s33"], "--out", out], capsys, "--samples", "s33.npz", "64 / k")
    assert not os.path.exists(out)


@pytest.mark.parametrize("second, words", [("clf", ["--ddpm", "clf.pt", "classifier"]),
                                           ("cut", ["--ddpm", "cut.pt"]),
                                           ("ddpm32", ["--ddpm", "ddpm32.pt", "32-pixel"])])
def test_loss_by_t_checks_every_checkpoint_before_computing(second, words, files, tmp_path, capsys):
    """The first checkpoint is fine; a bad later one is refused before any loss is computed (the sentinel)."""
    out = str(tmp_path / "out")
    refused(evaluate.main, ["loss-by-t", "--ddpm", files["ddpm"], files[second], "--train", "circles", "--t", "0,5",
                            "--n-images", "4", "--threads", "1", "--out", out], capsys, *words)
    assert not os.path.exists(out)


def test_loss_by_t_checks_t_against_every_checkpoint_before_computing(files, tmp_path, capsys):
    out = str(tmp_path / "out")
    refused(evaluate.main, ["loss-by-t", "--ddpm", files["ddpm"], files["ddpm"], "--train", "circles", "--t", "0,100",
                            "--n-images", "4", "--threads", "1", "--out", out], capsys, "--t", "0 .. 99")
    assert not os.path.exists(out)


# ---------------------------------------------------------------- report.py

@pytest.mark.parametrize("results", [dict(config={}, per_n=[], timings_s={}),          # generalization.py's
                                     dict(config={}, settings={}, image_size=16),      # latents.py interp's
                                     [], "text"])
def test_report_refuses_results_that_are_not_a_train_run(results, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results) + "\n")
    before = tree(str(run))
    refused(report.main, [str(run)], capsys, "results.json")
    assert tree(str(run)) == before


# ---------------------------------------------------------------- generalization.py

BASE = ["--threads", "1", "--ns", "4", "--pool", "16", "--steps", "2", "--n-samples", "2", "--n-eval", "2",
        "--twist-n", "0", "--eval-t", "10", "--jac-t", "10", "--T", "20", "--sample-steps", "3", "--channels", "8"]


@pytest.mark.parametrize("extra, word", [(["--unet", "huge"], "--unet"),
                                         (["--attention", "x"], "--attention"),
                                         (["--attention", "7"], "--attention"),
                                         (["--size", "20"], "--size"),
                                         (["--size", "20", "--unet", "tiny", "--twist-n", "4"], "--size"),
                                         (["--channels", "5"], "--channels"),
                                         (["--clf-channels", "0", "--twist-n", "4"], "--clf-channels"),
                                         (["--clf-channels", "5", "--twist-n", "4"], "--clf-channels")],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_generalization_checks_the_networks_before_anything_is_written(extra, word, tmp_path, capsys):
    out = str(tmp_path / "out")
    refused(generalization.main, [*BASE, *extra, "--out", out], capsys, word)
    assert not os.path.exists(out)


def test_generalization_still_accepts_the_sizes_and_widths_that_build(tmp_path):
    for extra in (["--size", "24"], ["--unet", "tiny", "--size", "12", "--radius", "1"], ["--attention", "8"],
                  ["--twist-n", "4", "--clf-channels", "8"]):
        generalization.parse_config([*BASE, *extra, "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- assignments/grade.py

@pytest.fixture
def grade(monkeypatch):
    """assignments/grade.py as a module (it imports assignments/build.py as `build`); the fork server, where
    grading starts, is a sentinel."""
    folder = os.path.join(ROOT, "assignments")
    modules = {}
    for name in ("build", "grade"):
        spec = importlib.util.spec_from_file_location(name if name == "build" else "zsi_tools_grade",
                                                      os.path.join(folder, f"{name}.py"))
        modules[name] = importlib.util.module_from_spec(spec)
        if name == "build":
            monkeypatch.setitem(sys.modules, "build", modules[name])
        spec.loader.exec_module(modules[name])
    monkeypatch.setattr(modules["grade"], "ForkServer", reached)
    return modules["grade"]


def test_grade_refuses_a_folder_without_any_submission_file(grade, tmp_path, capsys):
    empty = tmp_path / "alice"
    empty.mkdir()
    (empty / "notes.txt").write_text("my answers are elsewhere\n")
    before = tree(str(tmp_path))
    refused(grade.main, [str(empty), "--only", "a1"], capsys, "alice", "ddpm.py")
    assert tree(str(tmp_path)) == before


def test_grade_takes_a_folder_with_one_submission_file(grade, tmp_path):
    sub = tmp_path / "bob"
    sub.mkdir()
    (sub / "ddpm.py").write_text("# an attempt\n")
    with pytest.raises(ReachedWork):                                    # got past the checks, to grading
        grade.main([str(sub), "--only", "a1"])
