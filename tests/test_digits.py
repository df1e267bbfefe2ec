"""Tests for digits.py: the moment slant against closed forms, the loader, the middle band, the CLI."""
import json

import numpy as np
import pytest

import digits

# The 10/30/50/70/90th percentiles of -mu11/mu02 over all 1,797 digits on the 8x8 originals.
ISSUE_PERCENTILES = (-0.201, -0.105, -0.038, 0.025, 0.112)


def shear_rows(img, t, c=0.0):
    """Shift row y of a float image right by -t (y - c) pixels with linear interpolation (mass and
    the exact centroid shift kept): a shear that adds exactly t to the slant, for any c."""
    out = np.zeros_like(img)
    cols = np.arange(img.shape[1])
    for y, row in enumerate(img):
        d = -t * (y - c)
        n = int(np.floor(d))
        f = d - n
        for k, w in ((n, 1 - f), (n + 1, f)):
            src = cols - k
            ok = (src >= 0) & (src < len(cols))
            out[y, cols[ok]] += w * row[src[ok]]
    assert abs(out.sum() - img.sum()) < 1e-9 * img.sum()           # nothing shifted off the image
    return out


def stroke(t, size=32, length=20, profile=(1.0,), y0=5):
    """Float (size, size): a vertical bar on rows y0 .. y0 + length - 1 (its grey level varies along
    its length), one symmetric `profile` per row centred on column 15, then sheared by shear_rows: row
    y moves right by -t (y - yc), yc its middle row. Every row's intensity centroid then lies on the
    line x = 15 - t (y - yc), so the slant is exactly t (the module docstring's closed form)."""
    bar = np.zeros((size, size))
    half = len(profile) // 2
    for y in range(y0, y0 + length):
        bar[y, 15 - half: 15 - half + len(profile)] = np.asarray(profile) * (1.0 + 0.5 * np.sin(y))
    img = shear_rows(bar, t, c=y0 + (length - 1) / 2)
    assert img[:, 0].sum() == 0 and img[:, -1].sum() == 0          # nothing cut off at the edges
    return img


# ----------------------------------------------------------------------------------------------
# The slant measure
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.1, -0.1, 0.25, -0.35, 0.6])
@pytest.mark.parametrize("profile", [(1.0,), (0.3, 1.0, 1.0, 1.0, 0.3)])
def test_slant_of_a_sheared_stroke_is_its_shear(t, profile):
    assert digits.slant(stroke(t, profile=profile)[None])[0] == pytest.approx(t, abs=1e-12)


def test_sign_convention_right_lean_is_positive():
    slash = np.zeros((1, 5, 5), np.uint8)                          # "/" : top right, bottom left (rows grow down)
    slash[0, [0, 1, 2, 3, 4], [4, 3, 2, 1, 0]] = 255
    backslash = slash[:, :, ::-1]                                  # "\" : leans left
    assert digits.slant(slash)[0] == pytest.approx(1.0, abs=1e-12)
    assert digits.slant(backslash)[0] == pytest.approx(-1.0, abs=1e-12)
    assert digits.slant(np.rot90(slash, 2, axes=(1, 2)))[0] == pytest.approx(1.0, abs=1e-12)  # 180 deg: same slant


@pytest.mark.parametrize("t, c", [(0.2, 0.0), (-0.15, 7.0), (0.37, 20.5)])
def test_shearing_a_real_digit_adds_exactly_t(t, c):
    data = digits.load_digits(16)
    img = np.zeros((4, 40, 40))
    img[:, 12:28, 12:28] = data["images"][[0, 7, 100, 1000], :, :, 0]  # margin for the shear
    sheared = np.stack([shear_rows(i, t, c) for i in img])
    np.testing.assert_allclose(digits.slant(sheared), digits.slant(img) + t, atol=1e-12)


def test_slant_invariant_to_translation_scale_and_channels():
    rng = np.random.default_rng(0)
    blobs = np.zeros((5, 24, 24))
    blobs[:, 6:14, 5:13] = rng.random((5, 8, 8)) ** 3              # random ink, margin to move it around
    base = digits.slant(blobs)
    moved = np.roll(blobs, (7, 9), axis=(1, 2))
    np.testing.assert_allclose(digits.slant(moved), base, atol=1e-12)
    for k in (1e-3, 0.5, 37.0):
        np.testing.assert_allclose(digits.slant(blobs * k), base, atol=1e-12)
    rgb = np.repeat(blobs[..., None], 3, axis=3)                   # (N, S, S, 3): the mean of equal channels
    np.testing.assert_allclose(digits.slant(rgb), base, atol=1e-12)
    as_uint8 = np.round(blobs * 255).astype(np.uint8)
    np.testing.assert_allclose(digits.slant(as_uint8), digits.slant(as_uint8.astype(np.float32)), atol=1e-12)


def test_slant_undefined_and_bad_input():
    imgs = np.zeros((3, 8, 8))
    imgs[1, 4, 2:6] = 1.0                                          # ink on one row: mu02 = 0
    imgs[2, 1:7, 3] = 1.0                                          # a vertical bar: slant 0
    s = digits.slant(imgs)
    assert np.isnan(s[0]) and np.isnan(s[1]) and s[2] == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        digits.slant(np.full((1, 8, 8, 3), -1.0))                  # a [-1, 1] model output, unconverted
    with pytest.raises(ValueError, match="shape"):
        digits.slant(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shape"):
        digits.slant(np.zeros((2, 8, 8, 4)))
    with pytest.raises(ValueError):
        digits.slant(np.full((1, 8, 8), np.nan))


# ----------------------------------------------------------------------------------------------
# The loader and the percentiles
# ----------------------------------------------------------------------------------------------

def test_issue_percentiles_on_the_8x8_originals():
    from sklearn.datasets import load_digits
    s = digits.slant(load_digits().images)                         # float64 0..16, no upsampling
    got = digits.percentiles(s)
    assert list(got) == [10, 30, 50, 70, 90]
    np.testing.assert_allclose(list(got.values()), ISSUE_PERCENTILES, atol=5e-4)
    np.testing.assert_allclose(list(got.values()), [-0.201457, -0.104537, -0.038450, 0.025010, 0.112322], atol=1e-6)


@pytest.mark.parametrize("size, expected, band", [
    (16, [-0.197841, -0.102530, -0.038158, 0.024450, 0.108889], (-0.102530, 0.024450)),
    (32, [-0.197673, -0.102462, -0.037978, 0.024380, 0.109145], (-0.102462, 0.024380)),
])
def test_loader_shapes_labels_and_percentiles(size, expected, band):
    data = digits.load_digits(size)
    n = 1797
    assert data["images"].shape == (n, size, size, 3) and data["images"].dtype == np.uint8
    assert data["images"].min() == 0 and data["images"].max() == 255
    assert (data["images"][..., 0] == data["images"][..., 1]).all() and (data["images"][..., 0] == data["images"][..., 2]).all()
    assert data["labels"].dtype == np.int64 and set(np.unique(data["labels"])) == {0, 1}
    assert np.bincount(data["labels"]).tolist() == [899, 898]      # balanced at the median (odd N: one at it)
    assert (data["labels"] == (data["slant"] > data["median"])).all()
    assert data["median"] == np.median(data["slant"])
    assert np.bincount(data["digits"]).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (data["indices"] == np.arange(n)).all() and data["indices"].dtype == np.int64
    np.testing.assert_allclose(data["slant"], digits.slant(data["images"]), atol=0)
    np.testing.assert_allclose(list(digits.percentiles(data["slant"]).values()), expected, atol=2e-6)
    np.testing.assert_allclose(data["band"], band, atol=2e-6)
    # nearly invariant to the upsampling: against the 8x8 originals
    assert np.corrcoef(data["slant_native"], data["slant"])[0, 1] > 0.9999
    assert np.abs(data["slant"] - data["slant_native"]).max() < 0.015
    # the entanglement: 6s lean left, 7s right
    med = lambda d: np.median(data["slant"][data["digits"] == d])
    assert med(6) < -0.15 and med(7) > 0.1


def test_loader_images_are_the_upsampled_originals_in_order():
    from sklearn.datasets import load_digits
    raw = load_digits()
    data = digits.load_digits(16)
    idx = [0, 5, 1796]
    assert (data["images"][idx, :, :, 0] == digits.upsample(raw.images[idx], 16)).all()
    assert (data["digits"] == raw.target).all()
    # 2x bilinear of one white pixel: the 4 x 4 block of weights (1/4, 3/4) x (1/4, 3/4), 255 at its centre
    one = np.zeros((1, 8, 8))
    one[0, 3, 3] = 16
    up = digits.upsample(one, 16)[0].astype(float)
    w = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(up[5:9, 5:9], np.round(255 * np.outer(w, w)))
    assert up.sum() == np.round(255 * np.outer(w, w)).sum()
    assert (digits.upsample(raw.images[:3], 8) == np.round(raw.images[:3] * 255 / 16)).all()
    for bad in (12, 0, 7.5, "16"):
        with pytest.raises(ValueError):
            digits.load_digits(bad)


# ----------------------------------------------------------------------------------------------
# The middle band
# ----------------------------------------------------------------------------------------------

def test_band_fraction_hand_built():
    imgs = np.stack([stroke(t) for t in (-0.3, -0.1, 0.0, 0.05, 0.2)] + [np.zeros((32, 32))])  # last: blank
    band = (-0.1, 0.05)                                            # both ends included
    np.testing.assert_allclose(digits.slant(imgs)[:5], [-0.3, -0.1, 0.0, 0.05, 0.2], atol=1e-12)
    assert digits.in_band([-0.3, -0.1, 0.0, 0.05, 0.2, np.nan], band).tolist() == [False, True, True, True, False, False]
    assert digits.band_fraction(imgs[:5], (-0.1 - 1e-9, 0.05 + 1e-9)) == pytest.approx(3 / 5)
    assert digits.band_fraction(imgs, (-0.1 - 1e-9, 0.05 + 1e-9)) == pytest.approx(3 / 6)  # blank counts, outside
    assert digits.band_fraction(imgs, (0.5, 0.9)) == 0.0
    rgb = np.repeat(np.round(imgs * 255).astype(np.uint8)[..., None], 3, axis=3)
    assert digits.band_fraction(rgb, (-0.25, 0.1)) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        digits.in_band([0.0], (0.1, -0.1))


def test_middle_band_of_the_real_data():
    data = digits.load_digits(16)
    lo, hi = digits.middle_band(data["slant"])
    assert (lo, hi) == data["band"]
    assert lo == np.percentile(data["slant"], 30) and hi == np.percentile(data["slant"], 70)
    assert digits.band_fraction(data["images"], data["band"]) == pytest.approx(0.40, abs=0.002)
    # percentiles ignore NaN (blank images); none at all is an error
    assert digits.percentiles([np.nan, 1.0, 3.0], (50,)) == {50: 2.0}
    with pytest.raises(ValueError):
        digits.percentiles([np.nan])


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def test_cli_writes_grid_histogram_and_json(tmp_path, capsys):
    info = digits.main(["--out", str(tmp_path), "--image-size", "16", "--seed", "3"])
    for name in ("digits_grid_16.png", "digits_slant_hist_16.png", "digits_slant_16.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "digits_slant_16.json").read_text())
    assert saved["labels"] == [899, 898] and saved["image_size"] == 16
    assert saved["middle_band"] == pytest.approx(list(digits.load_digits(16)["band"]))
    assert [round(v, 3) for v in saved["percentiles_native_8x8"].values()] == list(ISSUE_PERCENTILES)
    assert saved == json.loads(json.dumps(info))
    import cv2
    grid = cv2.imread(str(tmp_path / "digits_grid_16.png"))
    assert grid.shape == (10 * 64 + 9, 12 * 64 + 11, 3)             # 10 decile rows of 12 tiles, shown at 64 px
    out = capsys.readouterr().out
    assert "899/898" in out and "wrote" in out


def test_cli_help_and_bad_size(capsys):
    with pytest.raises(SystemExit) as e:
        digits.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "None" not in text and "(default: 16)" in text and "(default: 0)" in text
    with pytest.raises(SystemExit) as e:
        digits.main(["--out", "x", "--image-size", "20"])
    assert e.value.code == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_decile_grid_rows_are_sorted_deciles():
    data = digits.load_digits(16)
    grid = digits.decile_grid(data, per_row=5, seed=1)
    assert grid.shape == (50, 16, 16, 3)
    s = digits.slant(grid).reshape(10, 5)
    assert (np.diff(s, axis=1) >= 0).all()                         # sorted within a row
    assert (s[:-1].max(axis=1) <= s[1:].min(axis=1)).all()         # deciles ascend row by row
