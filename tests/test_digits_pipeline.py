"""`python train.py --data digits`: scikit-learn's digits through the real-image pipeline (filter_data.py,
real_images.py, report.py), and the measures the digits experiment rests on.

What is checked: the digits reach the filter without files (content-hashed like decoded images); the
slant-to-[0, 1] mapping by the real data's CDF; the middle-band and background measures; that no
network ever trains on a mirrored digit (a flip negates the slant); step 3's ranking option; that the
default filter keeps few mild images on faces whose attribute (mouth curvature) is known; the lambda
rule; and a tiny end-to-end run (tiny networks, a few steps: its numbers mean nothing).
"""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from benchmarks import filter_mild
import digits
import filter_data as fd
import fit
import real_images
import train


@pytest.fixture(scope="module")
def real():
    return digits.load_digits(16)


# ---------------------------------------------------------------- the data reach the filter

def test_digits_reach_the_filter_without_files(tmp_path, real):
    args = fd.parse_args(["--data", "digits", "--size", "16", "--out", str(tmp_path / "f")])
    assert args.flip is False and args.steps == 100 and args.rank == "ensemble"   # the digits preset
    data = fd.read_dataset(args)
    assert np.array_equal(data["labels"], real["labels"]) and data["class_names"] == ["leans left", "leans right"]
    assert data["paths"][42] == "digits/0042" and np.bincount(data["splits"]).tolist() == [1438, 180, 179]
    images, cache, hashes = fd.dataset_images(data, args)
    assert np.array_equal(images, real["images"]) and hashes[7] == hashlib.sha1(real["images"][7].tobytes()).hexdigest()
    assert np.array_equal(np.load(cache), real["images"])                     # load_kept reads this file back
    stamp = os.path.getmtime(cache)
    assert fd.dataset_images(data, args)[1] == cache and os.path.getmtime(cache) == stamp   # reused, not rewritten
    for bad in (["--size", "20"], ["--keep-fraction", "0"]):
        with pytest.raises(SystemExit):
            fd.parse_args(["--data", "digits", "--out", str(tmp_path / "g"), *bad])


# ---------------------------------------------------------------- the measures

def test_slant_to_unit_is_the_real_datas_percentile(real):
    s = real["slant"]
    u = digits.to_unit(s, s)
    order = np.argsort(s, kind="stable")
    assert np.array_equal(np.sort(u), np.arange(1, len(s) + 1) / len(s))      # distinct slants: k / N, each once
    assert (np.diff(u[order]) >= 0).all()                                      # monotone
    assert digits.to_unit([s.min() - 1, s.max() + 1, np.nan], s)[:2].tolist() == [0.0, 1.0]
    assert np.isnan(digits.to_unit([np.nan], s)[0])
    lo, hi = real["band"]                                                      # the band is u in (0.3, 0.7]
    assert abs(np.mean((u > 0.3) & (u <= 0.7)) - np.mean(digits.in_band(s, (lo, hi)))) < 2 / len(s)
    import evaluate
    m = evaluate.histogram_metrics(u)["unit"]                                  # the real data: uniform
    assert m["kld"] < 0.01 and m["mse"] < 0.01


def test_band_and_background_measures(real):
    m = real_images.slant_metrics(real["images"], real)
    assert m["band_fraction"] == pytest.approx(0.40, abs=0.002) and m["background"] == 0.0 and m["no_slant"] == 0
    assert m["band_fraction_dehazed"] == m["band_fraction"] and m["unit"]["kld"] < 0.01
    hazy = np.clip(real["images"].astype(int) + 12, 0, 255).astype(np.uint8)  # a grey haze of 12 / 255
    h = real_images.slant_metrics(hazy, real)
    assert h["background"] == 12.0 and h["band_fraction"] > m["band_fraction"] + 0.02   # haze pulls slant to 0
    assert h["band_fraction_dehazed"] == pytest.approx(m["band_fraction"], abs=0.002)  # removed again
    blank = real_images.slant_metrics(np.zeros((4, 16, 16, 3), np.uint8), real)
    assert blank["no_slant"] == 4 and blank["band_fraction"] == 0.0 and blank["unit"] is None
    left = real["images"][np.argsort(real["slant"])[:50]]                       # the 50 most left-leaning
    assert real_images.slant_metrics(left, real)["band_fraction"] == 0.0


def test_digit_likeness_and_the_lambda_rule():
    p = np.full((200, 10), 0.01)
    p[np.arange(150), np.arange(150) % 10] = 0.91                              # 150 confident, 15 per class
    p[150:, 3] = 0.5                                                           # 50 unsure
    d = real_images.digit_likeness(p)
    assert d["confident_fraction"] == 0.75 and d["artefacts"] == 0.25 and d["classes"] == 10
    assert d["per_class"] == [15] * 10 and d["class_min_count"] == 2           # 1% of 200
    rows = [dict(lam=10, band_fraction=0.30, artefacts=0.1, n=256), dict(lam=30, band_fraction=0.45, artefacts=0.2, n=256),
            dict(lam=60, band_fraction=0.55, artefacts=0.4, n=256)]
    assert real_images.pick_lambda(rows, 0.2)["lam"] == 30                     # 10 does not fill (0.30 - 0.20 < 0.15)
    assert real_images.pick_lambda(rows, 0.1)["lam"] == 10                     # all fill: the fewest artefacts
    none = real_images.pick_lambda(rows, 0.5)
    assert none["lam"] == 60 and none["fills"] is False                        # none fills: the largest band
    # 10% against 8% of 256 samples: 0.02 < 2 standard errors (0.051): tied, so the smaller lambda
    close = [dict(lam=3, band_fraction=0.8, artefacts=0.10, n=256), dict(lam=30, band_fraction=0.8, artefacts=0.08, n=256)]
    tie = real_images.pick_lambda(close, 0.1)
    assert tie["lam"] == 3 and tie["least_artefacts"] == 30 and tie["fills"]
    close[0]["n"] = close[1]["n"] = 100000                                     # the same rates, measured exactly
    assert real_images.pick_lambda(close, 0.1)["lam"] == 30


# ---------------------------------------------------------------- no mirrored digit is ever trained on

def test_no_network_trains_on_a_mirrored_digit(real, monkeypatch):
    images = real["images"][:40]
    asymmetric = ~np.all(images == images[:, :, ::-1], axis=(1, 2, 3))
    assert asymmetric.all()                                                    # a flip would change every one
    labels = torch.as_tensor(real["labels"][:40])
    g = torch.Generator().manual_seed(0)
    seen = []                                                                  # the filter's CNNs
    monkeypatch.setattr(fd, "_to_input", lambda x: (seen.append(x.clone()), x.permute(0, 3, 1, 2).float())[1])
    net = lambda x: x.mean(dim=(1, 2, 3))[:, None].repeat(1, 2)  # noqa: E731
    fd.cnn_loss(torch.from_numpy(images), labels, flip=False)(net, 64, g)
    x0 = plumbing_tensor(images)
    for batch in (seen[0].permute(0, 3, 1, 2).float() / 127.5 - 1,             # the DDPM's and classifier's batches
                  fit.draw_batch(x0, labels, 64, g, hflip=train.DATA["digits"]["hflip"])[0]):
        originals = (batch[:, None] == x0[None]).flatten(2).all(2)             # (64, 40): equals training image j
        mirrored = (batch[:, None] == x0.flip(-1)[None]).flatten(2).all(2)
        assert originals.any(1).all() and not mirrored.any()
    assert train.DATA["digits"] == dict(region=None, classes=2, flip_swaps_label=False, hflip=False)
    assert train.DATA["celeba"]["hflip"] and train.DATA["circles"]["hflip"]


def plumbing_tensor(images):
    import plumbing
    return plumbing.to_tensor(images)


def test_train_passes_the_no_flip_rule_to_both_networks(monkeypatch):
    calls = []
    monkeypatch.setattr(fit, "classifier_loss", lambda d, x0, y, swap=True, hflip=True: calls.append(("clf", hflip)))
    monkeypatch.setattr(fit, "ddpm_loss", lambda d, x0, hflip=True, **k: calls.append(("ddpm", hflip)))
    monkeypatch.setattr(fit, "fit", lambda model, *a, **k: (model, model, []))
    rt = fit.Runtime(0, 1, torch.device("cpu"))
    data = dict(images=np.zeros((2, 16, 16, 3), np.uint8), labels=[0, 1])
    for name in ("digits", "celeba"):
        cfg = train.Config(data=name, clf="tiny", unet="tiny", image_size=16, T=10, out="/nonexistent")
        train.train_classifier(cfg, rt, data, 0)
        train.train_ddpm(cfg, rt, data["images"])
    assert calls == [("clf", False), ("ddpm", False), ("clf", True), ("ddpm", True)]


# ---------------------------------------------------------------- step 3's ranking

def test_rank_option_and_keep_fraction():
    class Cfg:
        rank, subset, per_side, keep_fraction = "ensemble", "auto", None, 0.35
    margins = np.array([[1.0, 3.0], [-2.0, -6.0], [np.nan, np.nan]])
    columns = {"p_eval": np.array([0.9, 0.2, 0.5])}
    assert np.allclose(fd.rank_scores(Cfg, columns, margins)[:2], [2.0, -4.0]) and np.isnan(fd.rank_scores(Cfg, columns, margins)[2])
    Cfg.rank = "evaluation"
    assert fd.rank_scores(Cfg, columns, margins) is columns["p_eval"]
    labels = np.array([0] * 60 + [1] * 40)
    assert fd.per_side_counts(Cfg, labels, np.arange(100)) == (21, 14)        # 35% of each class's training images
    Cfg.subset, Cfg.per_side = "500", (250, 250)
    assert fd.per_side_counts(Cfg, labels, np.arange(100)) == (250, 250)
    Cfg.subset, Cfg.per_side = "all", None
    assert fd.per_side_counts(Cfg, labels, np.arange(100)) is None            # every survivor


# ---------------------------------------------------------------- the known attribute: few mild images kept

MILD_TINY = ["--size", "16", "--steps", "100", "--width", "8", "--threads", "1", "--workers", "1"]


def test_default_filter_keeps_few_mild_faces(tmp_path):
    """Faces with a known mouth curvature c (labels noisy near c = 0): the default filter (steps 1-2, then
    the most extreme 35% per side by the ensemble's margin) keeps at most 5% mild faces (|c| < 0.2), with
    labels that agree with the sign of c on at least 97%, and enough faces per side to train on."""
    csv, c = filter_mild.write_faces(str(tmp_path / "faces"), n=500, seed=1)
    fd.run_filter(fd.parse_args(["--data", "csv", "--csv", csv, "--out", str(tmp_path / "out"), *MILD_TINY]))
    index = fd.read_index(str(tmp_path / "out" / "index.csv"))
    default = filter_mild.measure(index, c)
    train = index["split"] == "train"
    ct, label = c[index["row"][train]], index["label"][train]
    # meaningful: a label-only split keeps every mild face, and the labels disagree with c near 0
    assert np.mean(np.abs(ct) < 0.2) > 0.15 and np.mean(label == (ct > 0)) < 0.96
    assert default["mild_fraction"] <= 0.05 and default["agreement"] >= 0.97
    assert min(default["kept_per_side"]) >= 60 and default["kept_fraction"] == pytest.approx(0.35, abs=0.01)


# ---------------------------------------------------------------- end to end, tiny

TINY = ["--data", "digits", "--unet", "tiny", "--clf", "tiny", "--T", "100", "--steps", "4", "--batch", "4",
        "--clf-steps", "4", "--clf-batch", "4", "--n-samples", "8", "--sample-batch", "8", "--sample-respacing", "4",
        "--log-every", "2", "--ckpt-every", "2", "--grid-every", "0", "--threads", "1", "--lambda-sweep", "10",
        "--filter-args", "--steps 60 --width 8 --tau1 0.6 --tau2 0.6"]


def test_train_digits_end_to_end(tmp_path, monkeypatch, real):
    monkeypatch.setitem(real_images.DIGIT_CLF, "steps", 60)                  # a short digit classifier
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    r = train.main([*TINY, "--out", str(out)])
    torch.set_num_threads(threads)
    res = json.loads((out / "results.json").read_text())
    g = res["digits"]
    index = fd.read_index(str(out / "filter" / "index.csv"))
    assert res["kept_indices"] == sorted(index["row"][index["kept"] == 1].tolist()) and len(res["kept_indices"]) == 500
    assert np.array_equal(real["labels"][res["kept_indices"]], index["label"][index["kept"] == 1][np.argsort(index["row"][index["kept"] == 1])])
    for name in ("guided_run0", "unconditional", "sweep_lambda10"):
        with np.load(out / "samples" / f"{name}.npz") as z:
            images = z["images"]
        assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3)
        m = g["sets"][name]
        assert m["band_fraction"] == digits.band_fraction(images, real["band"])  # recomputed from the file
        assert (out / "figures" / f"{name}_by_slant.png").exists()
    assert g["sets"]["real"]["band_fraction"] == pytest.approx(0.40, abs=0.002) and g["band"] == list(real["band"])
    assert g["filter"]["kept_fraction"] == pytest.approx(500 / 1438) and 0 <= g["filter"]["band_survival"] <= 0.1
    assert [s["lam"] for s in g["lambda_sweep"]] == [0.0, 1.0, 10.0] and g["lambda_pick"]["lam"] in (1.0, 10.0)
    assert g["classifier"]["test_accuracy"] > 0.5 and res["rows"][0]["digits"]["n"] == 8
    text = (out / "report.md").read_text()
    assert "## Digits: the slant, measured exactly" in text and "lie in the middle band" in text
    assert "slant_histogram.png" in text and (out / "figures" / "slant_histogram.png").exists()
    assert real_images.headline(r).startswith("HEADLINE digits slant in the middle band")
