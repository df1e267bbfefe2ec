"""Real images on a CPU: scikit-learn's handwritten digits and their slant, a continuous attribute.

The paper's real-image result (Sec. 5.1: CelebA smiles) needs CelebA and a GPU. scikit-learn ships
1,797 real handwritten digits (sklearn.datasets.load_digits: 8 x 8, values 0..16, no download), and
their slant is a continuous attribute like a smile: some digits lean clearly left, some clearly right,
most a little. As with smiles, the attribute is entangled with the content: 6s lean left, 7s right.
This file is the DATA half of that experiment: the loader, the slant measure, and its middle band.
Filtering (App. D.1), training, guided sampling and the histograms (App. B) are the real-image
pipeline's, as for CelebA.

Slant (image moments)
    For an image I(row, col) >= 0 with axes x = column (pointing right) and y = row (pointing DOWN,
    the array's own order), m = sum I, centroid (xbar, ybar), and the central moments
    mu11 = sum I (x - xbar)(y - ybar), mu02 = sum I (y - ybar)^2:

        slant = -mu11 / mu02

    It is the least-squares shear of x against y about the centroid: the line x = xbar - slant (y - ybar)
    through the ink. Sign: leaning RIGHT is positive. A stroke "/" (top to the right, y down) has
    x falling as y grows, so mu11 < 0 and slant > 0; slant = 1 is 45 degrees (tan of the angle from
    vertical). Shifting row r of any image by -t (y_r - c) pixels (a shear, any c) adds exactly t.
    It is invariant to translation and to the intensity scale (a ratio of moments), and undefined
    (NaN here) for a blank image or ink on one row (mu02 = 0). A left-right flip negates it, so
    these images must not be flip-augmented (filter_data.cnn_loss flips, right for faces only).
    On the 8 x 8 originals its 10/30/50/70/90th percentiles are -0.201 / -0.105 / -0.038 / 0.025 /
    0.112 (tests/test_digits.py).
    Every pixel counts, the background too: a uniform grey haze adds mass far from the centroid to
    mu02 and pulls the slant towards 0, which lies inside the middle band. Measured at 16 x 16: a
    haze of 8 / 255 on the real digits raises their middle-band fraction from 0.400 to 0.440 (4 /
    255: 0.421). The real digits have an exact 0 background; check a sample set's background before
    trusting its middle-band fraction.

Size and upsampling: 16 x 16, bilinear (IMAGE_SIZE; --image-size 32 also works, any multiple of 8)
    * 16: the data hold 8 x 8 of information. The CPU U-Net preset (unet.py "cpu") packs 2 x 2 pixels
      into channels first, so at 16 its first feature map is 8 x 8: the digits' own resolution,
      nothing lost and nothing invented. Measured on 1 thread, batch 64, one training step: the U-Net
      138 ms at 16 against 353 ms at 32, the noisy classifier 50 against 101 ms, the filtering CNN
      10 against 23 ms: 16 is 2-2.6x cheaper everywhere, which a full run in 15 minutes on 2 cores needs.
    * Bilinear (align_corners=False; torch's and cv2's INTER_LINEAR give the same images): it never
      overshoots, so no clipping distorts the moments, and it keeps the slant: against the 8 x 8
      originals the correlation is 0.99996 (slope 0.977: interpolation widens every row a little,
      so mu02 grows by a few percent). Bicubic overshoots to -61 of 255 (clipped: correlation
      0.9994) and Lanczos to -94 (0.9986); nearest (0.99999) gives blocky 2 x 2 pixels.
    The slant, labels and middle band are all measured on the images at the chosen size, the
    resolution of the generated samples they are compared with.

Labels and the middle band
    label = 1{slant > median} (1 = leans right): 899 class 0 and 898 class 1 of the 1,797 digits.
    The middle band is the 30th to 70th percentile of the real data's slant (MIDDLE_PERCENTILES),
    the mild slants that filtering removes and interpolation should bring back; band_fraction
    measures it on any images.

Images follow the project's convention (as toy_circles.make_circles): uint8 (N, S, S, 3), the grey
value 255 * v / 16 repeated over the three channels: white ink on black.

Run:  python digits.py --out out/digits --image-size 16
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

import plumbing

NATIVE_SIZE = 8                 # load_digits: 8 x 8 images
NATIVE_MAX = 16                 # ... with integer values 0..16
IMAGE_SIZE = 16                 # the default side after upsampling (see the module docstring)
PERCENTILES = (10, 30, 50, 70, 90)
MIDDLE_PERCENTILES = (30, 70)   # the middle band: the 30th to 70th percentile of the real slant
CLASS_NAMES = ("leans left", "leans right")   # label 0: slant at or below the median; 1: above it


def check_image_size(size):
    """Refuse sizes that are not a positive multiple of 8 (an integer upsampling factor)."""
    if not isinstance(size, (int, np.integer)) or size < NATIVE_SIZE or size % NATIVE_SIZE:
        raise ValueError(f"image size must be a multiple of 8 (8, 16, 24, 32, ...), got {size!r}")
    return int(size)


def upsample(native, size=IMAGE_SIZE):
    """8 x 8 digits, values 0..16, (N, 8, 8) -> uint8 (N, S, S): 255 v / 16, bilinear, rounded.

    Bilinear with align_corners=False (the same images as cv2.INTER_LINEAR): values stay within the
    input's range, so nothing is clipped. size 8 only rescales the values.
    """
    size = check_image_size(size)
    x = torch.from_numpy(np.asarray(native, dtype=np.float64) * (255.0 / NATIVE_MAX))[:, None]  # (N, 1, 8, 8)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)     # (N, 1, S, S)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()                            # (N, S, S)


def grey(images):
    """Images as float64 (N, H, W): grey (N, H, W) as they are, RGB (N, H, W, 3) averaged over channels.

    uint8 or float; intensities must be >= 0 (ink positive, background 0): [-1, 1] model outputs
    are refused, convert them with plumbing.to_uint8 first.
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[3] == 3:
        x = x.astype(np.float64).mean(axis=3)                      # (N, H, W, 3) -> (N, H, W)
    if x.ndim != 3 or x.shape[0] == 0 or min(x.shape[1:]) < 2:
        raise ValueError(f"expected images (N, H, W) or (N, H, W, 3) with N >= 1, got shape {np.shape(images)}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all() or x.min() < 0:
        raise ValueError(f"slant needs finite intensities >= 0 (background 0), got min {x.min():g}; "
                         f"convert [-1, 1] images with plumbing.to_uint8")
    return x


def slant(images):
    """The moment slant -mu11 / mu02 of each image, float64 (N,); right lean > 0, y = row pointing down.

    images: (N, H, W) or (N, H, W, 3), uint8 or float, >= 0 (see grey). NaN where an image has no
    ink (m = 0) or all its ink on one row (mu02 = 0).
    """
    x = grey(images)                                               # (N, H, W) float64
    n, h, w = x.shape
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    row_mass, col_mass = x.sum(axis=2), x.sum(axis=1)              # (N, H), (N, W)
    m = row_mass.sum(axis=1)                                       # (N,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ybar = row_mass @ rows / m                                 # (N,) centroid row
        xbar = col_mass @ cols / m                                 # (N,) centroid column
        dy = rows[None, :] - ybar[:, None]                         # (N, H)
        dx = cols[None, :] - xbar[:, None]                         # (N, W)
        mu02 = np.einsum("nh,nh->n", row_mass, dy * dy)
        mu11 = np.einsum("nhw,nh,nw->n", x, dy, dx)
        s = -mu11 / mu02
    return np.where((m > 0) & (mu02 > 0), s, np.nan)


def percentiles(values, qs=PERCENTILES):
    """{q: the q-th percentile} of the finite values (numpy's linear interpolation), as floats."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        raise ValueError("no finite values to take percentiles of")
    return {int(q): float(p) for q, p in zip(qs, np.percentile(v, qs))}


def middle_band(slants):
    """(lo, hi): the 30th and 70th percentile of the real data's slants (MIDDLE_PERCENTILES)."""
    p = percentiles(slants, MIDDLE_PERCENTILES)
    return p[MIDDLE_PERCENTILES[0]], p[MIDDLE_PERCENTILES[1]]


def in_band(slants, band):
    """bool (N,): lo <= slant <= hi (both ends included); NaN (no slant) is outside."""
    lo, hi = band
    if not lo <= hi:
        raise ValueError(f"a band needs lo <= hi, got {band!r}")
    s = np.asarray(slants, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (s >= lo) & (s <= hi)


def band_fraction(images, band):
    """The fraction of the images whose slant lies in band = (lo, hi), in [0, 1].

    Every image counts in the denominator: a blank one (no slant) is outside the band.
    """
    return float(in_band(slant(images), band).mean())


def to_unit(slants, reference):
    """The slant on [0, 1] by the real data's empirical CDF: u = #{reference slants <= s} / len(reference).

    u is the fraction of real digits that lean at most as far right as s, so the real data themselves
    are uniform on [0, 1] (u = k / N) and "uniform" means every slant as often as in the real data's
    percentiles: the histogram-vs-uniform metrics of App. B (evaluate.histogram_metrics) then score how
    evenly samples cover the real range of slants, and the middle band (30th-70th percentile) is
    u in (0.3, 0.7]. Slants beyond the real extremes map to 0 or 1; NaN (no slant) stays NaN.
    """
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        raise ValueError("to_unit needs finite reference slants")
    s = np.asarray(slants, dtype=np.float64)
    u = np.searchsorted(ref, np.where(np.isfinite(s), s, 0.0), side="right") / len(ref)
    return np.where(np.isfinite(s), u, np.nan)


BACKGROUND_PERCENTILE = 10   # an image's background level: its 10th-percentile grey value (real digits: 0)


def background_level(images):
    """Per image, the 10th-percentile grey value (0..255 for uint8): the level of its background. Every
    real digit has at least 14% exactly black pixels at 16 x 16, so theirs is 0; a generated image with
    a grey haze has a positive one, and the haze pulls the slant towards 0 (module docstring)."""
    x = grey(images)
    return np.percentile(x.reshape(len(x), -1), BACKGROUND_PERCENTILE, axis=1)


def dehaze(images):
    """float64 (N, H, W): each image minus its background level, clipped at 0 (real digits: unchanged)."""
    x = grey(images)
    return np.clip(x - background_level(x)[:, None, None], 0.0, None)


def load_digits(size=IMAGE_SIZE):
    """All 1,797 digits of sklearn.datasets.load_digits, upsampled, in load_digits order.

    Returns dict(images uint8 (N, S, S, 3) in 0..255, labels int64 (N,) = 1{slant > median} (1 = leans
    right), digits int64 (N,) the class 0..9, slant float64 (N,) measured on these images, slant_native
    float64 (N,) measured on the 8 x 8 originals, indices int64 (N,) into load_digits order, band
    (lo, hi) the middle band of `slant`, median float).
    """
    from sklearn.datasets import load_digits as sklearn_digits  # only the digits experiment needs scikit-learn
    raw = sklearn_digits()
    native = raw.images                                            # (N, 8, 8) float64, 0..16
    small = upsample(native, size)                                 # (N, S, S) uint8
    s = slant(small)
    median = float(np.median(s))
    return dict(images=np.repeat(small[..., None], 3, axis=3), labels=(s > median).astype(np.int64),
                digits=raw.target.astype(np.int64), slant=s, slant_native=slant(native),
                indices=np.arange(len(native), dtype=np.int64), band=middle_band(s), median=median)


def summary(data):
    """The numbers behind the figures: percentiles (at S and 8 x 8), band, labels, per-class medians."""
    s, s8, digits = data["slant"], data["slant_native"], data["digits"]
    fit = np.polyfit(s8, s, 1)
    return dict(n=len(s), image_size=int(data["images"].shape[1]), convention="slant = -mu11 / mu02, x = column, "
                "y = row pointing down: leaning right is positive",
                percentiles=percentiles(s), percentiles_native_8x8=percentiles(s8),
                middle_band=list(data["band"]), middle_percentiles=list(MIDDLE_PERCENTILES), median=data["median"],
                labels=np.bincount(data["labels"], minlength=2).tolist(),
                band_fraction_real=float(in_band(s, data["band"]).mean()),
                median_slant_per_digit={int(d): float(np.median(s[digits == d])) for d in range(10)},
                native_vs_upsampled=dict(correlation=float(np.corrcoef(s8, s)[0, 1]), slope=float(fit[0]),
                                         max_abs_difference=float(np.abs(s - s8).max())))


def decile_grid(data, per_row=12, seed=0):
    """uint8 (10 * per_row, S, S, 3): row k holds per_row random digits of the k-th slant decile, sorted.

    Rows 4 to 7 (deciles 30-70%) are the middle band. `seed` picks the digits (numpy Generator).
    """
    s = data["slant"]
    order = np.argsort(s, kind="stable")
    rng = np.random.default_rng(seed)
    rows = []
    for decile in np.array_split(order, 10):                       # slant ascending: most left-leaning first
        pick = rng.choice(decile, size=min(per_row, len(decile)), replace=False)
        rows.append(pick[np.argsort(s[pick], kind="stable")])
    return data["images"][np.concatenate(rows)]


def plot_slant(data, path):
    """PNG: the slant histogram (100 bins, middle band shaded) and the slant per digit class."""
    from matplotlib.figure import Figure  # only the CLI pays for matplotlib
    s, digits, (lo, hi) = data["slant"], data["digits"], data["band"]
    fig = Figure(figsize=(10, 4))
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.hist(s, bins=100, color="tab:blue")
    ax.axvspan(lo, hi, color="tab:orange", alpha=0.3, label=f"middle band [{lo:.3f}, {hi:.3f}] (30-70%)")
    ax.axvline(data["median"], color="k", lw=1, label=f"median {data['median']:.3f} (label threshold)")
    ax.set_xlabel("slant = -mu11 / mu02 (right lean > 0)")
    ax.set_ylabel("digits")
    ax.set_title(f"{len(s)} digits at {data['images'].shape[1]}x{data['images'].shape[1]}")
    ax.legend(fontsize=8)
    bx.boxplot([s[digits == d] for d in range(10)], showfliers=False)
    bx.set_xticks(range(1, 11), [str(d) for d in range(10)])
    bx.axhspan(lo, hi, color="tab:orange", alpha=0.3)
    bx.set_xlabel("digit class")
    bx.set_ylabel("slant")
    bx.set_title("slant depends on the class (entangled)")
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def _image_size_arg(text):
    """argparse type: an image side, a multiple of 8."""
    try:
        return check_image_size(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv=None):
    parser = plumbing.OneLineParser(description="Write the digits data set's slant grid, histogram and percentiles.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--image-size", type=_image_size_arg, default=IMAGE_SIZE,
                        help="image side after bilinear upsampling, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--seed", type=plumbing.nonnegative_int, default=0,
                        help="picks the digits shown in the grid (default: %(default)s)")
    plumbing.add_flags(parser, "overwrite")
    args = parser.parse_args(argv)
    plumbing.check_out_folder(args.out)
    s = args.image_size
    names = [f"digits_{kind}_{s}.{ext}" for kind, ext in (("grid", "png"), ("slant_hist", "png"), ("slant", "json"))]
    plumbing.refuse_overwrite(args.out, names, args.overwrite)
    paths = [os.path.join(args.out, n) for n in names]
    data = load_digits(args.image_size)
    info = summary(data)
    plumbing.save_grid(decile_grid(data, seed=args.seed), paths[0], nrow=12, scale=max(1, 64 // s))
    plot_slant(data, paths[1])
    plumbing.write_json(info, paths[2])
    fmt = lambda p: " / ".join(f"{v:.4f}" for v in p.values())
    print(f"{info['n']} digits at {s}x{s}, labels 0/1 = {info['labels'][0]}/{info['labels'][1]} (slant > {info['median']:.4f})")
    print(f"slant percentiles {'/'.join(map(str, PERCENTILES))}: {fmt(info['percentiles'])} "
          f"(8x8 originals: {fmt(info['percentiles_native_8x8'])})")
    print(f"middle band [{info['middle_band'][0]:.4f}, {info['middle_band'][1]:.4f}]; 8x8 vs {s}x{s}: correlation "
          f"{info['native_vs_upsampled']['correlation']:.5f}, slope {info['native_vs_upsampled']['slope']:.4f}")
    print("grid rows: slant deciles, most left-leaning first (rows 4-7: the middle band)")
    for p in paths:
        print(f"wrote {p}")
    return info


if __name__ == "__main__":
    plumbing.guard(main)
