"""Tests for toy_circles.py: the Section 5.5 / Fig. 7a data set, pinned to hand-counted numbers."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import fit
import plumbing
import toy_circles as tc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("size, n, radius, disc_pixels", [(64, 1200, 2.0, 13), (32, 300, 1.0, 5)])
def test_counts_and_disc_pixels(size, n, radius, disc_pixels):
    # Section 5.5: every grid position, 20 x 60 = 1200 at 64; 10 x 30 = 300 at 32 (docstring).
    data = tc.make_circles(size, "train")
    assert data["images"].shape == (n, size, size, 3) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (n,) and data["labels"].dtype == np.int64
    assert data["centres"].shape == (n, 2) and data["centres"].dtype == np.int64
    assert tc.default_radius(size) == radius
    # 13 pixels in a 5x5 box at r = 2, a 5-pixel plus at r = 1; white 255 on black 0, all channels equal.
    white = data["images"][..., 0] > 0
    assert (white.sum(axis=(1, 2)) == disc_pixels).all()
    assert set(np.unique(data["images"]).tolist()) == {0, 255}
    assert (data["images"][..., 0] == data["images"][..., 2]).all()
    # the disc sits on its centre: exactly the pixels within r of (cx, cy)
    i = 17
    cx, cy = data["centres"][i]
    rows, cols = np.nonzero(white[i])
    assert ((cols - cx) ** 2 + (rows - cy) ** 2 <= radius ** 2).all()
    assert cols.min() == cx - int(radius) and cols.max() == cx + int(radius)


def test_draw_disc_plus_and_5x5():
    plus = tc.draw_disc(8, 3, 4, 1.0)[..., 0] // 255
    expected = np.zeros((8, 8), np.uint8)
    expected[4, 2:5] = 1
    expected[3:6, 3] = 1
    assert (plus == expected).all()
    box = tc.draw_disc(16, 7, 7, 2.0)[5:10, 5:10, 0] // 255        # 5x5 box minus its 4 corner triples
    assert box.tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]


def test_grid_positions_paper_and_cpu_preset():
    xs, ys = tc.grid_positions(64, "train")
    assert sorted(set(xs.tolist())) == list(range(2, 12)) + list(range(52, 62))
    assert sorted(set(ys.tolist())) == list(range(2, 62))
    xs, ys = tc.grid_positions(32, "train")
    assert sorted(set(xs.tolist())) == list(range(1, 6)) + list(range(26, 31))
    assert sorted(set(ys.tolist())) == list(range(1, 31))
    # middle band z in [0.2, 0.8]: columns 13..50 at 64, 6..25 at 32
    assert sorted(set(tc.grid_positions(64, "middle")[0].tolist())) == list(range(13, 51))
    assert sorted(set(tc.grid_positions(32, "middle")[0].tolist())) == list(range(6, 26))
    assert len(tc.grid_positions(64, "all")[0]) == 60 * 60
    with pytest.raises(ValueError):
        tc.grid_positions(48, "train")
    with pytest.raises(ValueError):
        tc.grid_positions(64, "centre")


@pytest.mark.parametrize("size", [64, 32])
def test_label_rule_and_bands(size):
    data = tc.make_circles(size, "train")
    xs = data["centres"][:, 0]
    assert (data["labels"] == (xs >= size // 2)).all()               # label = 1{x >= 32} at 64
    assert (data["labels"] == 0).sum() == (data["labels"] == 1).sum()
    z = tc.normalized_x(xs, size)
    assert ((z <= 0.18) | (z >= 0.82)).all()                         # z bands of the docstring
    assert not ((z >= tc.MIDDLE_BAND[0]) & (z <= tc.MIDDLE_BAND[1])).any()
    zm = tc.normalized_x(tc.grid_positions(size, "middle")[0], size)
    assert ((zm >= 0.2) & (zm <= 0.8)).all()


def test_normalized_x_values():
    assert tc.normalized_x(11, 64) == 11.5 / 64 and tc.normalized_x(52, 64) == 52.5 / 64
    assert tc.normalized_x(0, 64) + tc.normalized_x(63, 64) == 1.0   # flip: z -> 1 - z


@pytest.mark.parametrize("size", [64, 32, 16])
def test_flip_maps_left_band_onto_right_band(size):
    left, right = tc.make_circles(size, "left"), tc.make_circles(size, "right")
    flipped = left["images"][:, :, ::-1]                             # column c -> S - 1 - c
    as_set = lambda imgs: {im.tobytes() for im in imgs}
    assert as_set(flipped) == as_set(right["images"])
    assert set(map(tuple, right["centres"].tolist())) == {(size - 1 - x, y) for x, y in left["centres"].tolist()}

    # random_hflip on a batch: flipped samples are mirrored and relabelled, others untouched
    data = tc.make_circles(size, "train")
    x, y = plumbing.to_tensor(data["images"]), torch.from_numpy(data["labels"])
    x2, y2 = fit.random_hflip(x, y, torch.Generator().manual_seed(0))
    flip = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < flip.sum() < len(y)
    assert torch.equal(x2[flip], x[flip].flip(-1)) and torch.equal(x2[~flip], x[~flip])
    assert torch.equal(y2[flip], 1 - y[flip]) and torch.equal(y2[~flip], y[~flip])
    # the label rule still holds after the flip: label = 1{x >= S/2} of the flipped image
    cx_after = torch.where(flip, size - 1 - torch.from_numpy(data["centres"][:, 0]), torch.from_numpy(data["centres"][:, 0]))
    assert torch.equal(y2, (cx_after >= size // 2).long())


def test_tensor_round_trip_exact():
    everything = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    for images in (everything, tc.make_circles(32, "train")["images"]):
        x = plumbing.to_tensor(images)
        assert x.dtype == torch.float32 and x.shape == (len(images), 3, images.shape[1], images.shape[2])
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert np.array_equal(plumbing.to_uint8(x), images)
    assert plumbing.to_tensor(everything)[0, 0, 0, 0] == -1.0 and plumbing.to_tensor(everything)[0, 0, 15, 15] == 1.0
    assert plumbing.to_uint8(torch.full((1, 3, 2, 2), 5.0)).max() == 255      # clamped
    assert plumbing.to_uint8(torch.full((1, 3, 2, 2), -5.0)).max() == 0


def test_save_grid_size_and_tiles(tmp_path):
    images = tc.make_circles(32, "train")["images"][:7]             # 7 tiles, nrow 3 -> 3 rows
    path = tmp_path / "sub" / "grid.png"
    plumbing.save_grid(images, str(path), nrow=3, scale=2)
    grid = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert grid.shape == (3 * 64 + 2, 3 * 64 + 2, 3)                  # rows*H*scale + rows-1
    for i in range(7):
        r, c = divmod(i, 3)
        tile = grid[r * 65: r * 65 + 64, c * 65: c * 65 + 64]
        assert np.array_equal(tile, images[i].repeat(2, axis=0).repeat(2, axis=1))
    assert (grid[64, :] == 128).all() and (grid[:, 64] == 128).all()  # 1-pixel grey separators
    assert (grid[2 * 65:, 65:] == 128).all()                          # empty cells are grey
    # default nrow = ceil(sqrt(N)) = 3, scale 1
    plumbing.save_grid(images, str(path))
    assert cv2.imread(str(path)).shape == (3 * 32 + 2, 3 * 32 + 2, 3)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]   # no temporary files left


def test_cli_writes_png(tmp_path):
    out = tmp_path / "circles"
    res = subprocess.run([sys.executable, "toy_circles.py", "--out", str(out), "--size", "32"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "300 images" in res.stdout and "150 left (0), 150 right (1)" in res.stdout
    png = cv2.imread(str(out / "circles_train_32.png"))
    assert png.shape == (17 * 64 + 16, 18 * 64 + 17, 3)               # 300 tiles: nrow 18, 17 rows, x2
    res = subprocess.run([sys.executable, "toy_circles.py", "--out", str(out), "--size", "48"],
                         cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "--size" in res.stderr and "Traceback" not in res.stderr
