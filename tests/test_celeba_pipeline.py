"""`python train.py --data celeba`: the faces experiment of Sections 5.1-5.3 end to end, at tiny size.

The data are test_filter_data.py's synthetic CelebA-format fixture (faces = bright or dark ellipses,
plus mild ones with random labels): filter_data.py keeps the extremes, a tiny DDPM and classifier train
on them, guided and unconditional samples are scored by the evaluation classifier, and the three rows
of Sec. 5.1 (guided, training data, unconditional) land in results.json and report.md. The numbers of a
4-step DDPM mean nothing; the tests check the plumbing, the resume and the refusals.
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ENV, ROOT
from test_filter_data import TINY as FILTER_TINY, make_celeba
import fit
import train

# 16x16 faces, tiny U-Net and classifier, 4 training steps each, 8 samples of 4 steps; the filter's own
# tiny settings (test_filter_data.py, tuned there to keep every extreme and drop every mild face).
TINY = ["--data", "celeba", "--unet", "tiny", "--clf", "tiny", "--image-size", "16", "--T", "100", "--steps", "4",
        "--batch", "4", "--clf-steps", "4", "--clf-batch", "4", "--n-samples", "8", "--sample-batch", "8",
        "--sample-respacing", "4", "--log-every", "2", "--ckpt-every", "2", "--threads", "1",
        "--filter-args", " ".join(FILTER_TINY)]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def digests(folder):
    """sha256 and mtime of every checkpoint and sample file under folder."""
    found = {}
    for base, _, files in os.walk(folder):
        for f in files:
            if f.endswith((".pt", ".npz")):
                path = os.path.join(base, f)
                found[os.path.relpath(path, folder)] = (hashlib.sha256(open(path, "rb").read()).hexdigest(),
                                                        os.path.getmtime(path))
    return found


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    base = tmp_path_factory.mktemp("faces")
    make_celeba(str(base / "celeba"))
    return str(base / "celeba")


@pytest.fixture(scope="module")
def finished(celeba, tmp_path_factory):
    """One tiny end-to-end run: (its --out, the CompletedProcess)."""
    out = str(tmp_path_factory.mktemp("run") / "out")
    r = run_cli(*TINY, "--root", celeba, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_pipeline_writes_the_three_rows_of_section_5_1(finished):
    out, r = finished
    res = json.load(open(os.path.join(out, "results.json")))
    assert [row["name"] for row in res["rows"]] == ["guided_run0", "training", "unconditional"]
    for row in res["rows"]:
        for convention in ("unit", "data"):  # evaluate.histogram_metrics: [0, 1] and [min, max] bins
            assert math.isfinite(row[convention]["mse"]) and math.isfinite(row[convention]["kld"])
            # App. B bounds for 100 bins: 0 <= MSE <= sqrt(1 - 1/100), 0 <= KLD <= ln 100
            assert 0 <= row[convention]["mse"] <= math.sqrt(0.99) + 1e-12
            assert 0 <= row[convention]["kld"] <= math.log(100) + 1e-12
        assert os.path.isfile(os.path.join(out, "figures", f"hist_{row['name']}.png"))
    guided, training, uncond = res["rows"]
    assert guided["n"] == uncond["n"] == 8 and training["n"] == sum(res["training_per_class"])
    # the paper's numbers sit next to ours (Sec. 5.1, Sec. 5.2; --subset all compares with the full 60k set)
    assert guided["paper"] == [0.130, 0.607] and training["paper"] == [0.558, 3.161] and uncond["paper"] == [0.64, 3.5]
    # the training faces are the filter's extremes: the evaluation classifier puts none of them in [0.2, 0.8]
    assert training["middle_fraction"] == 0.0
    report = open(os.path.join(out, "report.md")).read()
    assert "Smoke scale" in report and "0.130 / 0.607" in report and "hist_training.png" in report
    for png in ("samples/guided_run0.png", "samples/unconditional.png", "figures/training_data.png"):
        assert os.path.isfile(os.path.join(out, png))
    assert os.path.isfile(os.path.join(out, "filter", "classifiers", "evaluation.pt"))
    assert r.stdout.strip().splitlines()[-1].startswith("HEADLINE Smiling")
    if not torch.cuda.is_available():  # the default on a laptop says it is the reduced preset
        assert "no GPU: this is the reduced CPU preset" in r.stdout and "--paper" in r.stdout
    # App. H: the guided samples' nearest training faces, recomputed from the saved files
    import evaluate
    import filter_data
    memo = res["memorization"]
    guided = np.load(os.path.join(out, "samples", "guided_run0.npz"))["images"]
    kept = filter_data.load_kept(os.path.join(out, "filter"), oversample=False)
    again = evaluate.memorization(guided, kept["images"])
    assert memo["n"] == 8 and memo["n_train"] == len(kept["images"]) == training["n"]
    assert memo["near_copy_fraction"] == again["near_copy_fraction"]
    assert memo["median_pixel_cosine"] == pytest.approx(again["median_pixel_cosine"], abs=1e-12)
    assert "## Memorization (App. H)" in report and os.path.isfile(os.path.join(out, "figures", "memorization_pairs.png"))


def test_resume_recomputes_no_finished_stage(finished, celeba):
    out, _ = finished
    before = digests(out)
    assert {"ddpm.pt", "classifier0.pt", "filter/classifiers/evaluation.pt", "samples/guided_run0.npz"} <= set(before)
    t0 = time.time()
    r = run_cli(*TINY, "--root", celeba, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[filter] finished earlier" in r.stdout and "training on" not in r.stdout  # no filter classifier trained
    assert digests(out) == before  # same bytes, same mtimes: nothing was trained or sampled again
    assert time.time() - t0 < 60
    assert json.load(open(os.path.join(out, "results.json")))["rows"][0]["n"] == 8


def test_face_flips_keep_their_labels():
    # circles: a flip moves the circle to the other side, so the label toggles; faces: a mirrored smile is a smile
    assert train.DATA["celeba"]["flip_swaps_label"] is False and train.DATA["circles"]["flip_swaps_label"] is True
    _, diffusion, _ = train.build_ddpm(train.Config(unet="tiny", image_size=16, T=10))
    x0 = torch.randn(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    seen = {}

    def capture(net, diffusion, x, y, t, noise):
        seen["x"], seen["y"] = x, y
        return {"loss": torch.zeros(len(y))}

    original = train.classifier.classifier_losses
    train.classifier.classifier_losses = capture
    try:
        out = {}
        for swap in (True, False):
            fit.classifier_loss(diffusion, x0, labels, swap_labels=swap)(None, 64, torch.Generator().manual_seed(0))
            out[swap] = dict(seen)
    finally:
        train.classifier.classifier_losses = original
    idx = torch.randint(6, (64,), generator=torch.Generator().manual_seed(0))  # the loss's first draw
    flipped = (out[False]["x"] == x0[idx].flip(-1)).flatten(1).all(1)
    assert torch.equal(out[True]["x"], out[False]["x"]) and 10 < int(flipped.sum()) < 54  # same draws, some flips
    assert torch.equal(out[False]["y"], labels[idx])                                       # faces: labels kept
    assert torch.equal(out[True]["y"], torch.where(flipped, labels[idx] ^ 1, labels[idx]))  # circles: toggled


def test_train_classifier_uses_the_data_sets_flip_rule(monkeypatch):
    calls = []
    monkeypatch.setattr(fit, "classifier_loss", lambda d, x0, y, swap=True, hflip=True: calls.append(swap))
    monkeypatch.setattr(fit, "fit", lambda model, *a, **k: (model, None, []))
    rt = fit.Runtime(0, 1, torch.device("cpu"))
    data = dict(images=torch.zeros(2, 16, 16, 3, dtype=torch.uint8).numpy(), labels=[0, 1])
    for name in ("celeba", "circles"):
        train.train_classifier(train.Config(data=name, clf="tiny", image_size=16, T=10), rt, data, 0)
    assert calls == [False, True]


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    return r.returncode != 0 and len(lines) == 1, r.stderr


def test_bad_inputs_stop_with_one_line(tmp_path, celeba):
    r = run_cli("--data", "celeba", "--out", str(tmp_path / "a"))
    assert one_line_error(r)[0] and "--root" in r.stderr, r.stderr
    r = run_cli("--data", "celeba", "--root", str(tmp_path), "--out", str(tmp_path / "b"))
    assert one_line_error(r)[0] and "list_attr_celeba.txt" in r.stderr, r.stderr
    r = run_cli("--data", "celeba", "--root", celeba, "--attr", "Smilling", "--out", str(tmp_path / "c"))
    assert one_line_error(r)[0] and "--attr" in r.stderr and "Smilling" in r.stderr, r.stderr
    r = run_cli("--data", "celeba", "--root", celeba, "--subset", "7k", "--out", str(tmp_path / "d"))
    assert one_line_error(r)[0] and "--subset" in r.stderr, r.stderr
    assert not any((tmp_path / x).exists() for x in "abcd")  # refused before anything is written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_paper_without_gpu_prints_an_estimate_and_refuses(tmp_path, celeba):
    r = run_cli("--data", "celeba", "--root", celeba, "--paper", "--out", str(tmp_path / "p"))
    assert r.returncode != 0
    assert "would take about" in r.stderr and "one timed step" in r.stderr and "--force" in r.stderr, r.stderr
    assert "python train.py --data celeba --attr Smiling --root" in r.stderr  # the CPU preset is suggested
    assert not (tmp_path / "p").exists()


def test_folder_layout_runs_the_same_pipeline(tmp_path, celeba):
    """--data folder: the user's own two classes (here the fixture's faces sorted into class folders by
    their noisy labels, mild faces included) go through the same filter -> DDPM -> guidance -> scores."""
    import cv2
    with open(os.path.join(celeba, "list_attr_celeba.txt")) as fh:
        lines = fh.read().splitlines()
    smiling = lines[1].split().index("Smiling") + 1
    for row in lines[2:]:
        f, label = row.split()[0], row.split()[smiling]
        folder = tmp_path / "mine" / ("b_smile" if label == "1" else "a_neutral")
        folder.mkdir(parents=True, exist_ok=True)
        image = cv2.imread(os.path.join(celeba, "img_align_celeba", f))
        cv2.imwrite(str(folder / f.replace(".jpg", ".png")), image)
    flags = [x for x in TINY if x not in ("--data", "celeba")]
    out = tmp_path / "out"
    r = run_cli("--data", "folder", *flags, "--root", str(tmp_path / "mine"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.load(open(out / "results.json"))
    assert res["data"] == "folder" and res["class_names"] == ["a_neutral", "b_smile"] and res["attr"] == "b_smile"
    assert [row["name"] for row in res["rows"]] == ["guided_run0", "training", "unconditional"]
    assert all(row["paper"] is None for row in res["rows"])          # the paper's numbers are CelebA Smiling's
    config = json.load(open(out / "filter" / "config.json"))
    assert config["data"] == "folder" and config["root"] == str(tmp_path / "mine")
    text = (out / "report.md").read_text()
    assert "b_smile" in text and "a_neutral" in text
    assert "CelebA" not in text and "paper MSE" not in text and "Smoke scale" not in text   # about your data only
    assert "Filter (Sec. 4.3" in text and (out / "figures" / "scores_vs_data.png").exists()
    f = res["filter"]
    assert 0 < f["n_kept"] <= f["n_train"] and f["kept_fraction"] == pytest.approx(f["n_kept"] / f["n_train"])
    assert len(f["data_scores"]) == f["n_train"] and len(f["kept_scores"]) == f["n_kept"]
    assert r.stdout.strip().splitlines()[-1].startswith("HEADLINE b_smile") and "paper" not in r.stdout.splitlines()[-1]
    assert "images: " in r.stdout and "resized to 16x16" in r.stdout      # one line says what preprocessing did
    # --resume after an image was added: its DDPM trained on the old filter's images, so it is refused
    # before any work (the filter would retrain on the new set and the DDPM go on from the old one).
    before, extra = digests(out), tmp_path / "mine" / "b_smile" / "zz_added.png"
    shutil.copy(next((tmp_path / "mine" / "b_smile").iterdir()), extra)
    r = run_cli("--data", "folder", *flags, "--root", str(tmp_path / "mine"), "--out", str(out), "--resume")
    assert one_line_error(r)[0] and "1 image(s) were added, 0 removed" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert digests(out) == before
    extra.unlink()  # put back as it was: the run resumes, reuses everything and counts what it cost before
    r = run_cli("--data", "folder", *flags, "--root", str(tmp_path / "mine"), "--out", str(out), "--resume")
    assert r.returncode == 0 and "[filter] finished earlier" in r.stdout and digests(out) == before, r.stderr[-2000:]
    t = json.load(open(out / "results.json"))["timings_s"]
    assert t["filter_s"] >= json.load(open(out / "filter" / "counts.json"))["seconds"] > 0
    assert t["ddpm_training_s"] >= fit.read_train_log(str(out / "logs" / "ddpm" / "train_log.csv"))[-1]["wall_s"]
    # the same one-line refusals as for CelebA
    r = run_cli("--data", "folder", "--out", str(tmp_path / "x"))
    assert one_line_error(r)[0] and "--root" in r.stderr, r.stderr
    r = run_cli("--data", "csv", "--out", str(tmp_path / "y"))
    assert one_line_error(r)[0] and "--csv" in r.stderr, r.stderr
    r = run_cli("--data", "folder", "--root", celeba, "--out", str(tmp_path / "z"))   # one folder, not two
    assert one_line_error(r)[0] and "two class folders" in r.stderr, r.stderr
    assert not any((tmp_path / x).exists() for x in "xyz")
