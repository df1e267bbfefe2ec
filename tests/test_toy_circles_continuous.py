"""Tests for toy_circles' continuous discs (generalization.py's data): area, centroid, seeds, bands, tangents."""
import math

import numpy as np
import pytest

import toy_circles as tc


def _moments(images):
    """Area (in pixels, 255 = 1) and intensity centroid (x, y) of each grey image, float64."""
    grey = images[..., 0].astype(np.float64) / 255.0               # (N, S, S)
    rows, cols = np.indices(grey.shape[1:])
    area = grey.sum(axis=(1, 2))
    return area, (grey * cols).sum(axis=(1, 2)) / area, (grey * rows).sum(axis=(1, 2)) / area


@pytest.mark.parametrize("radius", [2.0, 2.5, 3.0, 4.0])
def test_area_is_pi_r_squared_and_centroid_is_the_centre(radius):
    # 16 x 16 supersampling: the rendered area is pi r^2 within 1% and the intensity centroid is the
    # sub-pixel centre within 0.05 px, for every one of 300 random discs (uint8 rounding included).
    data = tc.make_discs(300, 32, radius, "all", seed=3)
    area, cx, cy = _moments(data["images"])
    assert np.abs(area / (math.pi * radius ** 2) - 1).max() < 0.01
    assert np.abs(cx - data["centres"][:, 0]).max() < 0.05
    assert np.abs(cy - data["centres"][:, 1]).max() < 0.05
    assert (np.modf(data["centres"])[0] != 0).all()               # sub-pixel, not on the grid


def test_a_seed_fixes_the_set():
    a, b = tc.make_discs(50, seed=7), tc.make_discs(50, seed=7)
    for key in a:
        assert np.array_equal(a[key], b[key])
    c = tc.make_discs(50, seed=8)
    assert not np.array_equal(a["centres"], c["centres"])


def test_coverage_equals_a_brute_force_full_grid():
    # the windowed renderer against the definition: K x K sub-samples over the whole image, at
    # random centres including discs cut by the border
    rng = np.random.default_rng(0)
    centres = np.concatenate([rng.uniform(-1, 17, size=(20, 2)), [[0.0, 0.0], [15.0, 7.3]]])
    K, S, r = 4, 16, 2.7
    fast = tc.disc_coverage(S, centres, r, supersample=K)
    sub = (np.arange(S)[:, None] + (np.arange(K) + 0.5) / K - 0.5).reshape(-1)
    for i, (cx, cy) in enumerate(centres):
        inside = (sub[:, None] - cy) ** 2 + (sub[None, :] - cx) ** 2 <= r * r
        assert np.array_equal(fast[i], inside.reshape(S, K, S, K).mean(axis=(1, 3)))


def test_an_integer_centre_gives_the_grid_disc_when_coverage_is_thresholded():
    # at an integer centre the pixels more than half covered are (nearly) those of draw_disc
    cover = tc.disc_coverage(32, [[12.0, 9.0]], 2.0)[0]
    grid = tc.draw_disc(32, 12, 9, 2.0)[..., 0] > 0
    assert cover.max() == 1.0 and (cover[grid] > 0.3).all() and (cover[~grid] < 0.5).all()


def test_regions_labels_and_flip_symmetry():
    S, r = 32, 2.5
    full = tc.make_discs(400, S, r, "all", seed=1)
    # the whole disc lies in the image [-1/2, S - 1/2]^2 (so no area is cut off: the test above)
    assert (full["centres"] >= r - 0.5).all() and (full["centres"] <= S - 0.5 - r).all()
    assert full["centres"][:, 0].min() < r and full["centres"][:, 0].max() > S - 1 - r  # ... and reaches the edges
    ext = tc.make_discs(400, S, r, "train", seed=2)
    z = tc.normalized_x(ext["centres"][:, 0], S)
    assert ((z <= tc.TRAIN_BAND_Z[0]) | (z >= tc.TRAIN_BAND_Z[1])).all()
    assert 150 < ext["labels"].sum() < 250                         # both sides, about half each
    assert np.array_equal(ext["labels"], (z > 0.5).astype(np.int64))  # Sec. 5.5: label 1{z > 1/2}
    lo, hi = tc.continuous_x_range(S, "left", r)
    rlo, rhi = tc.continuous_x_range(S, "right", r)
    assert np.isclose(rlo, S - 1 - hi) and np.isclose(rhi, S - 1 - lo)  # flip x -> S - 1 - x swaps the bands
    mid = tc.normalized_x(tc.make_discs(100, S, r, "middle", seed=3)["centres"][:, 0], S)
    assert ((mid >= tc.MIDDLE_BAND[0]) & (mid <= tc.MIDDLE_BAND[1])).all()


def test_channels_radii_and_levels():
    grey = tc.make_discs(5, 32, seed=4)
    rgb = tc.make_discs(5, 32, seed=4, channels=3)
    assert grey["images"].shape == (5, 32, 32, 1) and rgb["images"].shape == (5, 32, 32, 3)
    assert grey["images"].dtype == np.uint8 and np.array_equal(rgb["images"][..., 2], grey["images"][..., 0])
    varied = tc.make_discs(200, 32, seed=5, radius_range=(2.0, 4.0), level_range=(0.5, 1.0))
    assert 2.0 <= varied["radii"].min() and varied["radii"].max() <= 4.0 and varied["radii"].std() > 0.3
    area, _, _ = _moments(varied["images"])                        # area = level * pi r^2
    assert np.abs(area / (varied["levels"] * math.pi * varied["radii"] ** 2) - 1).max() < 0.015


def test_tangents_move_the_centroid_by_one_pixel_per_pixel():
    # d/dcx sum_p I_p = 0 (the area does not change) and d/dcx sum_p x_p I_p = area (the centroid
    # moves with the centre): closed forms for the renderer's finite differences. The first holds
    # exactly (h = 0.25 is a whole number of 1/32 sub-sample steps); the second up to the ~1-2% by
    # which the pixel-grid centroid of a supersampled disc wobbles with its sub-pixel position.
    r = 2.5
    rows, cols = np.indices((32, 32))
    for centre in [(10.3, 17.6), (15.0, 15.0), (7.77, 21.2)]:
        tx, ty = tc.disc_tangents(32, centre, r)
        assert abs(tx.sum()) < 1e-9 and abs(ty.sum()) < 1e-9
        assert abs((tx * cols).sum() / (math.pi * r * r) - 1) < 0.03
        assert abs((ty * rows).sum() / (math.pi * r * r) - 1) < 0.03
        assert abs((tx * rows).sum()) < 1e-9 and abs((ty * cols).sum()) < 1e-9   # no cross-talk (symmetry)


def test_bad_input():
    with pytest.raises(ValueError, match="does not fit"):
        tc.make_discs(4, 32, radius=6.0, region="train")          # the left band ends at x = 5.26
    with pytest.raises(ValueError, match="region"):
        tc.make_discs(4, 32, region="centre")
    with pytest.raises(ValueError, match="at least one"):
        tc.make_discs(0)
    with pytest.raises(ValueError, match="channels"):
        tc.make_discs(2, channels=2)
