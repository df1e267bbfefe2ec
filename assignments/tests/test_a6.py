"""a6 -- evaluation: the circle detector (evaluate.detect_circles; Sec. 5.5's accuracy counts its
circles) and the histogram of scores against uniform (evaluate.histogram_vs_uniform and
histogram_metrics; Sec. 5.1, Table 1, App. B).

Discs are drawn here with numpy; the histogram numbers are hand-worked closed forms.
"""
import math

import numpy as np
import pytest


def disc_image(size, discs, r=2.0):
    """uint8 (S, S, 3): black, with a white disc (col - cx)^2 + (row - cy)^2 <= r^2 per (cx, cy)."""
    rows, cols = np.indices((size, size))
    img = np.zeros((size, size, 3), dtype=np.uint8)
    for cx, cy in discs:
        img[(cols - cx) ** 2 + (rows - cy) ** 2 <= r * r] = 255
    return img


@pytest.mark.assignment("a6", points=2)
def test_detect_circles_finds_drawn_discs_and_ignores_specks():
    import evaluate
    img = disc_image(64, [(40, 50), (10, 20)])                   # 13 pixels each at r = 2
    img[5, 60] = 255                                             # a one-pixel speck: below the default min area
    assert evaluate.detect_circles(img) == [(10.0, 20.0, 13), (40.0, 50.0, 13)]   # sorted by cx
    assert evaluate.detect_circles(img[:, :, 0]) == [(10.0, 20.0, 13), (40.0, 50.0, 13)]   # grey input
    assert evaluate.detect_circles(np.zeros((32, 32, 3), np.uint8)) == []
    small = disc_image(32, [(16, 9)], r=1.0)                      # the 5-pixel plus shape of the 32x32 preset
    assert evaluate.detect_circles(small) == [(16.0, 9.0, 5)]


@pytest.mark.assignment("a6", points=1)
def test_detect_circles_weighted_centre_threshold_and_8_connectivity():
    import evaluate
    img = np.zeros((32, 32), np.uint8)
    img[5, 5], img[6, 6] = 200, 250                              # diagonal neighbours: one 8-connected blob
    img[20, 20] = 127                                            # not above the threshold 127
    img[20, 25] = 128                                            # above it
    found = evaluate.detect_circles(img, min_area=1)
    assert len(found) == 2
    (cx, cy, area), (cx2, cy2, area2) = found
    assert cx == pytest.approx((5 * 200 + 6 * 250) / 450) and cy == pytest.approx(cx) and area == 2
    assert (cx2, cy2, area2) == (25.0, 20.0, 1)
    assert evaluate.detect_circles(img, min_area=2) == found[:1]


@pytest.mark.assignment("a6", points=2)
def test_histogram_vs_uniform_closed_forms():
    import evaluate
    centres = (np.arange(10) + 0.5) / 10                         # one score per bin: exactly uniform
    h = evaluate.histogram_vs_uniform(centres, bins=10)
    assert h["mse"] == pytest.approx(0.0, abs=1e-12) and h["kld"] == pytest.approx(0.0, abs=1e-12)
    assert list(h["counts"]) == [1] * 10
    h = evaluate.histogram_vs_uniform([0.33] * 7, bins=10)        # all in one bin
    assert h["mse"] == pytest.approx(math.sqrt(0.9)) and h["kld"] == pytest.approx(math.log(10))
    h = evaluate.histogram_vs_uniform([0.01, 0.02, 0.99, 1.0], bins=10)   # half in the first, half in the last bin
    assert h["mse"] == pytest.approx(math.sqrt(0.4)) and h["kld"] == pytest.approx(math.log(5))
    assert list(h["counts"]) == [2] + [0] * 8 + [2]               # 1.0 belongs to the last bin
    h = evaluate.histogram_vs_uniform([0.1, 0.3, 0.35, 0.7], bins=4)   # p = (1/4, 2/4, 1/4, 0) on 4 bins
    assert h["mse"] == pytest.approx(math.sqrt(0 + 1 / 16 + 0 + 1 / 16))
    assert h["kld"] == pytest.approx(0.5 * math.log(2))


@pytest.mark.assignment("a6", points=1)
def test_histogram_metrics_reports_the_unit_and_the_data_range():
    import evaluate
    scores = np.array([0.41, 0.45, 0.5, 0.55, 0.59])
    m = evaluate.histogram_metrics(scores, bins=5)
    # [0, 1] ("unit", the paper's text): all five scores in the bin [0.4, 0.6)
    assert tuple(m["unit"]["range"]) == (0.0, 1.0)
    assert m["unit"]["mse"] == pytest.approx(math.sqrt(0.8)) and m["unit"]["kld"] == pytest.approx(math.log(5))
    # [min, max] = [0.41, 0.59] ("data", matplotlib's default in the released code): one score per bin
    assert tuple(m["data"]["range"]) == (0.41, 0.59)
    assert m["data"]["mse"] == pytest.approx(0.0, abs=1e-12) and m["data"]["kld"] == pytest.approx(0.0, abs=1e-12)
