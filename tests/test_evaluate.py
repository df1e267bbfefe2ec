"""Tests for evaluate.py: the circle detector and "accuracy" (Section 5.5), histogram metrics (App. B)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import evaluate as ev
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
        p = counts / counts.sum()
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
