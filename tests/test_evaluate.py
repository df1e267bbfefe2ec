"""Tests for evaluate.py: the circle detector and "accuracy" (Section 5.5), histogram metrics (App. B)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import evaluate as ev
import plumbing
import toy_circles as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- detector

def test_default_min_area():
    # max(2, round(0.3 pi r^2)), capped by the disc's pixel count
    assert ev.default_min_area(64) == 4 and ev.default_min_area(32) == 2 and ev.default_min_area(16) == 1


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("region", ["train", "middle"])
def test_detector_exact_on_every_image(size, region):
    data = tc.make_circles(size, region)
    for image, (cx, cy) in zip(data["images"], data["centres"]):
        found = ev.detect_circles(image)
        assert len(found) == 1
        assert found[0][:2] == (float(cx), float(cy))                # exact integer centre
        assert found[0][2] == (13 if size == 64 else 5)


def test_detector_blank_grey_and_two_discs():
    assert ev.detect_circles(np.zeros((64, 64, 3), np.uint8)) == []
    two = np.maximum(tc.draw_disc(64, 10, 20, 2.0), tc.draw_disc(64, 40, 50, 2.0))
    assert ev.detect_circles(two) == [(10.0, 20.0, 13), (40.0, 50.0, 13)]
    assert ev.detect_circles(two[..., 0]) == [(10.0, 20.0, 13), (40.0, 50.0, 13)]  # (H, W) input
    # two discs touching diagonally (8-connectivity) are one blob
    touching = np.maximum(tc.draw_disc(32, 10, 10, 1.0), tc.draw_disc(32, 12, 12, 1.0))
    assert len(ev.detect_circles(touching)) == 1


@pytest.mark.parametrize("size", [64, 32])
def test_detector_noise(size):
    rng = np.random.default_rng(0)
    r = tc.default_radius(size)
    corners = [(0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1)]
    for k in range(20):
        cx, cy = rng.integers(4, size // 2 - 4), rng.integers(4, size - 4)   # >= 4 px from every corner
        for n_discs in (1, 2):
            image = tc.draw_disc(size, cx, cy, r)
            if n_discs == 2:                                           # a second disc in the right half
                image = np.maximum(image, tc.draw_disc(size, cx + size // 2, cy, r))
            image = image.astype(np.int64) + rng.integers(-100, 101, size=image.shape)  # |noise| < 127
            for px, py in corners:                                     # isolated single bright pixels
                image[py, px] = 255
            image = np.clip(image, 0, 255).astype(np.uint8)
            found = ev.detect_circles(image)
            assert len(found) == n_discs
            assert abs(found[0][0] - cx) < 0.3 and abs(found[0][1] - cy) < 0.3   # grey-weighted centroid


def test_circle_stats_hand_mix():
    # 32 x 32: middle band = columns 6..25. 3 in the middle (incl. both edge columns), 2 in the
    # training bands, 1 blank, 1 with two discs (one of them in the middle): n = 7.
    d = lambda x, y: tc.draw_disc(32, x, y, 1.0)
    images = np.stack([d(6, 10), d(16, 3), d(25, 28), d(3, 3), d(28, 15), np.zeros((32, 32, 3), np.uint8),
                       np.maximum(d(10, 10), d(28, 28))])
    stats = ev.circle_stats(images)
    assert stats["n"] == 7 and stats["size"] == 32
    assert stats["n_circles"].tolist() == [1, 1, 1, 1, 1, 0, 2]
    assert stats["in_middle"].tolist() == [True, True, True, False, False, False, False]
    assert stats["accuracy"] == 3 / 7 and stats["bad_fraction"] == 2 / 7 and stats["n_middle"] == 3
    assert stats["z"][0] == 6.5 / 32 and math.isnan(stats["z"][5]) and math.isnan(stats["cx"][6])
    assert stats["cx"][1] == 16.0 and stats["cy"][1] == 3.0


def test_write_circles_csv(tmp_path):
    images = np.stack([tc.draw_disc(32, 16, 3, 1.0), np.zeros((32, 32, 3), np.uint8)])
    path = tmp_path / "c.csv"
    ev.write_circles_csv(ev.circle_stats(images), str(path))
    assert path.read_text().splitlines() == ["index,n_circles,cx,cy,z,in_middle",
                                             "0,1,16.0000,3.0000,0.515625,1", "1,0,nan,nan,nan,0"]


# ---------------------------------------------------------------- histogram metrics (App. B)

def test_uniform_scores_give_zero():
    m = ev.histogram_vs_uniform((np.arange(100) + 0.5) / 100)        # one score per bin centre
    assert m["mse"] == pytest.approx(0.0, abs=1e-12) and m["kld"] == pytest.approx(0.0, abs=1e-12)
    assert (m["counts"] == 1).all()


def test_all_mass_in_one_bin_closed_form():
    m = ev.histogram_vs_uniform(np.full(50, 0.123))
    assert m["mse"] == pytest.approx(math.sqrt((1 - 1 / 100) ** 2 + 99 * (1 / 100) ** 2), rel=1e-12)
    assert m["kld"] == pytest.approx(math.log(100), rel=1e-12)


def test_two_bins_by_hand():
    m = ev.histogram_vs_uniform([0.1, 0.2, 0.3, 0.9], bins=2)        # p = (3/4, 1/4)
    assert m["counts"].tolist() == [3, 1]
    assert m["mse"] == pytest.approx(math.sqrt(0.25 ** 2 + 0.25 ** 2), rel=1e-12)
    assert m["kld"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def test_unit_and_data_range_conventions():
    # by hand, 2 bins: unit puts all 4 in [0.5, 1] -> p = (0, 1); data range [0.55, 1] splits 3 | 1
    m = ev.histogram_metrics([0.55, 0.6, 0.7, 1.0], bins=2)
    assert m["unit"]["counts"].tolist() == [0, 4] and m["data"]["counts"].tolist() == [3, 1]
    assert m["unit"]["kld"] == pytest.approx(math.log(2)) and m["unit"]["mse"] == pytest.approx(math.sqrt(0.5))
    assert m["data"]["kld"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # 100 bins against an independent numpy recomputation (np.histogram default range = min..max)
    scores = np.random.default_rng(0).beta(2.0, 5.0, size=5000) * 0.8 + 0.1
    m = ev.histogram_metrics(scores)
    for name, kwargs in (("unit", dict(range=(0.0, 1.0))), ("data", {})):
        counts, _ = np.histogram(scores, bins=100, **kwargs)
        p = counts / len(scores)                                     # every score falls in a bin
        assert np.array_equal(m[name]["counts"], counts)
        assert m[name]["mse"] == pytest.approx(np.sqrt(np.sum((0.01 - p) ** 2)), rel=1e-12)
        assert m[name]["kld"] == pytest.approx(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * 100), 0)), rel=1e-12)
    assert abs(m["unit"]["kld"] - m["data"]["kld"]) > 0.1
    with pytest.raises(ValueError):
        ev.histogram_vs_uniform([0.5, 1.2])                          # outside [0, 1]: refused, not dropped


def test_plots_write_png(tmp_path):
    ev.plot_histogram_vs_uniform(np.linspace(0, 1, 500), str(tmp_path / "h.png"), "uniform")
    ev.plot_centre_histogram(np.array([0.1, 0.5, np.nan]), str(tmp_path / "c.png"), 64, "centres")
    for name in ("h.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- command line

def _run(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_circles_end_to_end(tmp_path):
    mid = tc.make_circles(32, "middle")["images"][:6]
    train = tc.make_circles(32, "train")["images"][:3]
    images = np.concatenate([mid, train, np.zeros((1, 32, 32, 3), np.uint8)])  # 6 / 10 in the middle, 1 bad
    np.savez(tmp_path / "s.npz", images=images)
    res = _run("circles", "--samples", str(tmp_path / "s.npz"), "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "ev" / "stats.json").read_text())
    assert stats["n"] == 10 and stats["accuracy"] == 0.6 and stats["bad_fraction"] == 0.1
    assert stats["n_circles_counts"] == {"0": 1, "1": 9, "2": 0, "3+": 0} and stats["min_area"] == 2
    assert len((tmp_path / "ev" / "circles.csv").read_text().splitlines()) == 11
    assert (tmp_path / "ev" / "centre_hist.png").stat().st_size > 0
    assert "accuracy" in res.stdout and "60.00%" in res.stdout


def _expect_one_line_error(args, *words):
    """In-process: the CLI stops with SystemExit carrying one line naming the flag/file."""
    with pytest.raises(SystemExit) as exc:
        ev.main(args)
    message = str(exc.value.code)
    assert message.startswith("evaluate.py: ") and "\n" not in message
    for word in words:
        assert word in message


def test_cli_bad_inputs(tmp_path):
    out = str(tmp_path / "ev")
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "missing.npz"), "--out", out], "--samples", "no such file")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "junk.npz"), "--out", out], "junk.npz", ".npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "cut.npz"), "--out", out], "cut.npz")
    np.savez(tmp_path / "key.npz", pictures=np.zeros((1, 32, 32, 3), np.uint8))
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "key.npz"), "--out", out], "'images'", "pictures")
    np.savez(tmp_path / "dtype.npz", images=np.zeros((1, 32, 32, 3), np.float32))
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "dtype.npz"), "--out", out], "uint8", "float32")
    np.savez(tmp_path / "shape.npz", images=np.zeros((1, 32, 32), np.uint8))
    _expect_one_line_error(["circles", "--samples", str(tmp_path / "shape.npz"), "--out", out], "(N, S, S, 3)")
    np.save(tmp_path / "big.npy", np.array([0.2, 1.5]))
    _expect_one_line_error(["scores", "--scores", str(tmp_path / "big.npy"), "--out", out], "--scores", "[0, 1]")
    (tmp_path / "two.csv").write_text("score\n0.1,0.2\n")
    _expect_one_line_error(["scores", "--scores", str(tmp_path / "two.csv"), "--out", out], "one")
    (tmp_path / "nan.csv").write_text("score\n0.1\nabc\n")
    _expect_one_line_error(["scores", "--scores", str(tmp_path / "nan.csv"), "--out", out], "line 3")
    assert not (tmp_path / "ev").exists()                             # nothing written on failure
    # and for real, in a subprocess: exit status 1, one line on stderr, no traceback
    res = _run("scores", "--scores", str(tmp_path / "big.npy"), "--out", out)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    res = _run("circles", "--samples", str(tmp_path / "junk.npz"), "--out", out, "--bogus")
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr


def test_cli_scores(tmp_path):
    (tmp_path / "s.csv").write_text("score\n" + "\n".join(f"{(i + 0.5) / 100}" for i in range(100)) + "\n")
    res = _run("scores", "--scores", str(tmp_path / "s.csv"), "--out", str(tmp_path / "ev"))
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 100 and m["bins"] == 100 and m["unit"]["range"] == [0.0, 1.0]
    assert m["unit"]["mse"] == pytest.approx(0.0, abs=1e-12) and m["unit"]["kld"] == pytest.approx(0.0, abs=1e-12)
    assert m["data"]["range"] == [0.005, 0.995] and sum(m["data"]["counts"]) == 100
    assert (tmp_path / "ev" / "score_hist.png").stat().st_size > 0


# ---------------------------------------------------------------- memorization (App. H)

def test_nearest_neighbours_against_a_direct_distance_matrix():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 11)), rng.normal(size=(23, 11))
    r[5] = 0.0                                                        # a zero reference: cosine defined as 0
    nn = ev.nearest_neighbours(q, r, chunk=8)                         # several chunks
    d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2))   # (37, 23), independent
    j = d.argmin(axis=1)
    assert np.array_equal(nn["index"], j)
    assert np.allclose(nn["distance"], d[np.arange(37), j], rtol=0, atol=1e-12)
    norms = np.linalg.norm(q, axis=1) * np.linalg.norm(r[j], axis=1)
    cos = np.where(j == 5, 0.0, (q * r[j]).sum(axis=1) / np.where(j == 5, 1.0, norms))
    assert (j == 5).any() and (j != 5).any()                          # both cases occur
    assert np.allclose(nn["cosine"], cos, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="refs"):
        ev.nearest_neighbours(q, r[:, :3])


def test_nearest_neighbours_blocks_over_uint8_refs_like_one_float64_pass():
    """The reference blocks (ref_chunk) and the per-block uint8 -> float64 conversion give the
    same answer as a direct float64 distance matrix; a reference repeated in a later block loses the
    tie to its first copy, as one argmin over all refs would."""
    rng = np.random.default_rng(1)
    q8, r8 = rng.integers(0, 256, size=(19, 12), dtype=np.uint8), rng.integers(0, 256, size=(41, 12), dtype=np.uint8)
    r8[30] = r8[3]                                                    # same image in blocks 0 and 3
    q8[0] = r8[3]                                                     # a query that is exactly that image
    nn = ev.nearest_neighbours(q8, r8, chunk=4, ref_chunk=10, scale=1.0 / 255.0)
    q, r = q8.astype(np.float64) / 255.0, r8.astype(np.float64) / 255.0
    d = np.sqrt(((q[:, None, :] - r[None, :, :]) ** 2).sum(axis=2))
    j = d.argmin(axis=1)
    assert nn["index"][0] == 3 and j[0] == 3
    assert np.array_equal(nn["index"], j)
    assert np.allclose(nn["distance"], d[np.arange(19), j], rtol=0, atol=1e-12)
    cos = (q * r[j]).sum(axis=1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(r[j], axis=1))
    assert np.allclose(nn["cosine"], cos, rtol=0, atol=1e-12) and nn["cosine"][0] == pytest.approx(1.0, abs=1e-12)
    vec = ev.image_vectors(np.zeros((3, 4, 4, 3), dtype=np.uint8))
    assert vec.shape == (3, 48) and vec.dtype == np.uint8              # a view: no float64 copy of the training set


def test_memorization_copies_middle_circles_and_a_one_pixel_shift_by_hand(tmp_path):
    """32 x 32, radius 1: a disc is a 5-pixel plus. Training copies have cosine 1 and sit on a training
    centre; a disc deep in the middle band overlaps no training disc (cosine 0); a disc at x = 6, the
    first middle column, one right of the band edge x = 5, shares 2 of its 5 pixels with its nearest
    training disc: cosine 2 / 5."""
    train = tc.make_circles(32, "train")
    xs = np.unique(train["centres"][:, 0])
    assert xs.tolist() == [1, 2, 3, 4, 5, 26, 27, 28, 29, 30]          # the left band ends at x = 5
    copies = train["images"][[0, 100, 250]]
    middle = np.stack([tc.draw_disc(32, 12, 8, 1.0), tc.draw_disc(32, 20, 25, 1.0)])
    shifted = tc.draw_disc(32, 6, 10, 1.0)[None]                      # z = 6.5 / 32: also in the middle band
    samples = np.concatenate([copies, middle, shifted, np.zeros((1, 32, 32, 3), np.uint8)])
    stats = ev.circle_stats(samples)
    m = ev.memorization(samples, train["images"], train["centres"], stats)
    assert np.allclose(m["pixel_cosine"], [1, 1, 1, 0, 0, 0.4, 0], atol=1e-12)
    assert m["near_copy"].tolist() == [True, True, True, False, False, False, False]
    assert np.array_equal(m["pixel_index"][:3], [0, 100, 250])
    assert m["pixel_distance"][:3].tolist() == [0.0, 0.0, 0.0]
    # 3 of 5 pixels of the shifted plus are unmatched, and 3 of its neighbour's: sqrt(6) in [0, 1] units
    assert m["pixel_distance"][5] == pytest.approx(math.sqrt(6 * 3), abs=1e-12)   # x 3 channels
    assert m["on_training_centre"].tolist() == [True, True, True, False, False, False, False]
    assert m["near_copy_fraction"] == pytest.approx(3 / 7) and m["on_training_centre_fraction"] == pytest.approx(3 / 7)
    assert m["on_training_centre_of_one_circle"] == pytest.approx(3 / 6)
    assert m["n_middle"] == 3 and m["middle_on_training_centre"] == 0 and m["middle_near_copy"] == 0
    assert m["median_pixel_cosine_middle"] == 0.0
    assert m["in_middle"].tolist() == [False, False, False, True, True, True, False]
    ev.save_memorization_grid(samples, train["images"], m, str(tmp_path / "pairs.png"), pairs=4)
    import cv2
    grid = cv2.imread(str(tmp_path / "pairs.png"))                    # the 3 middle samples first, then copy 0
    assert grid.shape == (2 * 128 + 1, 4 * 128 + 3, 3)
    assert np.array_equal(grid[:128, :128], np.repeat(np.repeat(samples[3], 4, 0), 4, 1)[..., ::-1])
    summary = ev.memorization_summary(m)
    assert "pixel_index" not in summary and json.dumps(summary)       # scalars only, JSON-ready


def test_memorization_in_classifier_features(tmp_path):
    import torch

    import classifier
    torch.manual_seed(0)
    clf = classifier.build_classifier("tiny", image_size=32)
    import unet
    x, t = torch.randn(4, 3, 32, 32), torch.full((4,), 3)
    with torch.no_grad():  # the logits through the head as one nn.Sequential = features, then projection
        h, _ = clf.encoder(x, clf.time_embed(unet.timestep_embedding(t, clf.model_channels)))
        assert torch.allclose(clf.head(h), clf.head[-1].proj(clf.features(x, 3)), atol=1e-6)
        assert torch.allclose(clf(x, 3), clf.head(h), atol=1e-6)
    train = tc.make_circles(32, "train")
    samples = train["images"][[7, 299]]
    feats = (ev.classifier_features(clf, samples), ev.classifier_features(clf, train["images"]))
    assert feats[0].shape == (2, clf.encoder.out_channels) and feats[0].dtype == np.float64
    m = ev.memorization(samples, train["images"], features=feats)
    assert np.allclose(m["feature_cosine"], 1.0, atol=1e-9)           # a copy's own features
    assert np.array_equal(m["feature_index"], [7, 299]) and m["feature_agrees_with_pixel"] == 1.0
    ev.save_memorization_grid(samples, train["images"], m, str(tmp_path / "pairs.png"))
    import cv2
    grid = cv2.imread(str(tmp_path / "pairs.png"))
    assert grid.shape == (3 * 128 + 2, 2 * 128 + 1, 3)                 # 3 rows (sample, pixel nn, feature nn), x4


def test_cli_memorization(tmp_path):
    train = tc.make_circles(32, "train")
    samples = np.concatenate([train["images"][:3], tc.make_circles(32, "middle")["images"][:1]])
    np.savez(tmp_path / "s.npz", images=samples)
    res = _run("memorization", "--samples", str(tmp_path / "s.npz"), "--train", "circles", "--out", str(tmp_path / "m"))
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "m" / "memorization.json").read_text())
    assert m["n"] == 4 and m["n_train"] == len(train["images"]) and m["near_copy_fraction"] == 0.75
    assert m["on_training_centre_fraction"] == 0.75 and m["middle_on_training_centre"] == 0 and m["n_middle"] == 1
    assert (tmp_path / "m" / "memorization_pairs.png").stat().st_size > 0
    np.savez(tmp_path / "t.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    _expect_one_line_error(["memorization", "--samples", str(tmp_path / "s.npz"), "--train", str(tmp_path / "t.npz"),
                            "--out", str(tmp_path / "m2")], "--train", "t.npz")
    _expect_one_line_error(["memorization", "--samples", str(tmp_path / "s.npz"), "--train", str(tmp_path / "no.npz"),
                            "--out", str(tmp_path / "m2")], "--train", "no such file")
    _expect_one_line_error(["memorization", "--samples", str(tmp_path / "s.npz"), "--train", "circles",
                            "--classifier", str(tmp_path / "no.pt"), "--out", str(tmp_path / "m2")], "--classifier")
    assert not (tmp_path / "m2").exists()


# ---------------------------------------------------------------- loss-by-t (a diagnostic)

def test_cli_loss_by_t_recomputes_and_refuses_bad_input(tmp_path):
    import torch
    import ddpm
    import unet
    torch.manual_seed(0)
    net = unet.build_unet("tiny")
    diffusion = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")
    ckpt = str(tmp_path / "ddpm.pt")
    plumbing.save_checkpoint(ckpt, dict(kind="ddpm", backbone="unet", model_config=net.config, diffusion=diffusion,
                                    step=7, model=net.state_dict(), ema=net.state_dict()))
    out = str(tmp_path / "loss")
    ev.main(["loss-by-t", "--ddpm", ckpt, ckpt, "--train", "circles", "--n-images", "20", "--seed", "1", "--out", out])
    rec = json.loads(open(os.path.join(out, "loss_by_t.json")).read())
    assert rec["n"] == 20 and len(rec["checkpoints"]) == 2 and rec["checkpoints"][0]["step"] == 7
    row = rec["checkpoints"][0]
    assert row["t"] == [0, 1, 2, 5, 10, 20, 40, 70, 95]                  # LOSS_T_FRACTIONS of T = 100, deduplicated
    assert rec["checkpoints"][1]["mse"] == row["mse"]                     # same images, same noise
    images = tc.make_circles(16, "train")["images"]                       # the tiny U-Net is 16 x 16
    pick = np.sort(np.random.default_rng(1).permutation(len(images))[:20])
    net.eval()
    direct = ddpm.diffusion_from_config(diffusion).losses_by_timestep(net, plumbing.to_tensor(images[pick]), row["t"], seed=1)
    assert np.allclose(row["mse"], direct["mse"], rtol=1e-6) and np.allclose(row["vb"], direct["vb"], rtol=1e-6)
    assert open(os.path.join(out, "loss_by_t.png"), "rb").read(4) == b"\x89PNG"
    bad = str(tmp_path / "bad")
    _expect_one_line_error(["loss-by-t", "--ddpm", ckpt, "--train", "circles", "--t", "5,100", "--out", bad],
                           "--t", "outside this diffusion's chain 0 .. 99")
    _expect_one_line_error(["loss-by-t", "--ddpm", str(tmp_path / "none.pt"), "--train", "circles", "--out", bad],
                           "--ddpm", "none.pt")
    np.savez(tmp_path / "big.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    _expect_one_line_error(["loss-by-t", "--ddpm", ckpt, "--train", str(tmp_path / "big.npz"), "--out", bad],
                           "--train", "32 pixels", "16")
    assert not os.path.exists(bad)
    res = _run("loss-by-t", "--ddpm", ckpt, "--train", "circles", "--t", "-3", "--out", bad)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--t" in res.stderr


def test_bad_kinds_sorts_hand_made_samples():
    """evaluate.bad_kinds: at 32 x 32 a drawn disc has 5 pixels; each kind from one hand-made image."""
    size, white = 32, 255
    imgs = np.zeros((7, size, size, 3), np.uint8)
    imgs[1] = tc.draw_disc(size, 16, 16, tc.default_radius(size))          # one clean disc: good
    imgs[2] = imgs[1] | tc.draw_disc(size, 5, 16, tc.default_radius(size))  # two discs
    imgs[3, 10:14, 10:14] = white                                           # a 16-pixel blob (> 2 x 5)
    imgs[4, 20, 20:22] = white                                              # a 2-pixel speck (< 5 / 2)
    imgs[5] = tc.draw_disc(size, 0, 16, tc.default_radius(size))            # centred on the border
    imgs[6, 3, 3] = white                                                   # one pixel: below the detector
    counts = ev.bad_kinds(imgs)
    assert int((tc.draw_disc(size, 16, 16, tc.default_radius(size))[:, :, 0] > 0).sum()) == 5
    assert counts == {"no circle": 2, "two or more circles": 1, "blob (over 2x a disc's area)": 1,
                      "small (under half a disc)": 1, "cut at the edge": 1, "good": 1}
