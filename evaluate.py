"""Measuring interpolation: a circle detector for the toy data, histograms against uniform for scores.

Circles (paper Section 5.5): the "accuracy" of a set of generated images is the fraction of
samples whose circle centre has normalised x coordinate z in [0.2, 0.8], the band never seen in
training; the paper also reports the fraction of samples with zero or two circles (4.25% +- 2.45%).
The paper counts circles "with an edge detection algorithm implemented with OpenCV"; we binarise
the image and take OpenCV's connected components instead, which on these black-and-white images
finds the same blobs and also gives a sub-pixel, intensity-weighted centre. z = (cx + 0.5) / S as
in toy_circles.

Scores (Section 5.1, Table 1, App. B): for faces, an evaluation classifier gives each sample a score
in [0, 1]; the empirical histogram (100 bins, p = counts / sum) is compared with the uniform
distribution by two numbers, both lower-is-better:
  "MSE" = sqrt(sum_i (1/bins - p_i)^2)   -- despite the name an L2 norm, as in the released code;
  KLD   = sum_{p_i > 0} p_i ln(bins p_i) -- KL(p_hist || uniform), the forward KL of App. B.
The released code histograms over matplotlib's default range [min score, max score] ("data"), while
[0, 1] ("unit") is what the text describes; histogram_metrics reports both.

Two variables (App. F, region "corners" of toy_circles): the "centre fraction" is the fraction of
samples with one circle whose z_x AND z_y both lie in [0.2, 0.8], the centre square that no training
image comes near; plot_centre_heatmap shows where the sampled centres fall in 2-D.

A regressor as the evaluator (App. K): when the attribute is known, a network that regresses it in
[0, 1] (classifier.predict_attributes, trained by train.py on circles at every position) scores each
sample; regressor_scores computes those scores and regressor_vs_detector compares their histogram
against uniform with that of the detector's centre x.

Memorization (App. H): the paper shows each generated face beside its nearest training face in CLIP
space. `memorization` finds every sample's nearest training image in pixel space ([0, 1], Euclidean)
and in the guidance classifier's features (CLIP weights cannot be downloaded offline), counts
near-copies (pixel cosine > COPY_COSINE) and, on circles, where a copy is exact and checkable, the
samples whose circle centre lies on a training centre; save_memorization_grid draws the pairs.

Where a DDPM is weak (a diagnostic, not a paper metric): `loss-by-t` splits a checkpoint's training
loss by noise level (ddpm.Diffusion.losses_by_timestep) on its training images, for one or several
checkpoints in one plot; the DiT of App. J beats the U-Net's average loss while it is still worse
at the middle noise levels that decide a sample's shape.

Faces (Sections 5.1-5.4): the score of a sample is the calibrated p(class 1) of the evaluation
classifier that filter_data.py trains; `classify` computes it for generated samples and then does
what `scores` does.

Run:  python evaluate.py circles --samples out/samples.npz --out out/eval
      python evaluate.py scores --scores out/scores.npy --out out/eval
      python evaluate.py classify --samples out/samples.npz --classifier runs/smiling/classifiers/evaluation.pt --out out/eval
      python evaluate.py memorization --samples runs/circles/samples/guided_run0.npz --train circles \
          --classifier runs/circles/classifier0.pt --out out/memo
      python evaluate.py loss-by-t --ddpm runs/circles/ddpm.pt runs/circles_dit/ddpm.pt --train circles --out out/loss
"""
import argparse
import functools
import io
import math
import os

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import classifier
import ddpm
import filter_data
import multiguide
import plumbing
from plumbing import save_figure, save_grid, to_tensor, write_bytes_atomically, write_json
from toy_circles import MIDDLE_BAND, check_size, default_radius, draw_disc, grid_positions, make_circles, normalized_x


# ----------------------------------------------------------------------------------------------
# Circles: detector and accuracy (Section 5.5)

@functools.lru_cache(maxsize=None)
def disc_area(size):
    """Pixels of one disc as the data set draws it at side `size` (radius default_radius(size)):
    13 at 64, 5 at 32, 1 at 16. Drawn once per size."""
    return int((draw_disc(size, size // 2, size // 2, default_radius(size))[:, :, 0] > 0).sum())


def default_min_area(size):
    """Smallest blob kept as a circle: max(2, round(0.3 pi r^2)) with r = 2 S / 64, never more than
    the pixel count of a drawn disc. 4 pixels at S = 64 (a disc has 13), 2 at 32 (a disc has 5),
    1 at 16 (a disc is one pixel, so there single-pixel noise counts as a circle). Isolated bright
    pixels are thus not counted as circles at 64 and 32."""
    r = default_radius(size)
    return min(disc_area(size), max(2, round(0.3 * math.pi * r * r)))


def detect_circles(image, threshold=127, min_area=None):
    """Find the white blobs of one uint8 image, (H, W) or (H, W, 3): a list of (cx, cy, area).

    1. grey = mean over channels; 2. binarise: grey > threshold; 3. 8-connected components
    (cv2.connectedComponentsWithStats); 4. drop components with area < min_area (default:
    default_min_area(W)); 5. centre = grey-weighted centroid of the component's pixels, so a drawn
    disc gives its exact integer centre. cx is the column, cy the row; sorted by cx.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"detect_circles expects (H, W) or (H, W, 3), got shape {image.shape}")
    ### BEGIN SOLUTION a6: steps 1-5 above: binarise, 8-connected blobs of >= min_area pixels, grey-weighted centres
    grey = image.astype(np.float64).mean(axis=2) if image.ndim == 3 else image.astype(np.float64)
    if min_area is None:
        min_area = default_min_area(grey.shape[1])
    mask = (grey > threshold).astype(np.uint8)                                  # (H, W) in {0, 1}
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)  # label 0 = background
    rows, cols = np.indices(grey.shape)
    weight = np.where(labels > 0, grey, 0.0).ravel()
    mass = np.bincount(labels.ravel(), weights=weight, minlength=n)             # (n,) sum of grey
    sum_x = np.bincount(labels.ravel(), weights=weight * cols.ravel(), minlength=n)
    sum_y = np.bincount(labels.ravel(), weights=weight * rows.ravel(), minlength=n)
    found = [(float(sum_x[k] / mass[k]), float(sum_y[k] / mass[k]), int(stats[k, cv2.CC_STAT_AREA]))
             for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= min_area]
    return sorted(found)
    ### END SOLUTION


def circle_stats(images, band=MIDDLE_BAND, threshold=127, min_area=None):
    """Detect circles in every image of a uint8 (N, S, S, 3) batch and score the batch.

    Per sample (arrays of length N): n_circles; cx, cy, z (NaN unless exactly one circle);
    in_middle (exactly one circle and z in band). Aggregates: accuracy = mean(in_middle), the
    paper's "accuracy"; bad_fraction = fraction with 0 or >= 2 circles; n; n_middle; size; band.
    A sample with two circles never counts as accurate, even when one of them is in the band.
    Also centre_square_stats's zy, in_centre and centre_fraction (App. F).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"circle_stats expects uint8 (N, S, S, 3), got {images.dtype} {images.shape}")
    n, size = images.shape[0], images.shape[2]
    n_circles = np.zeros(n, dtype=np.int64)
    cx, cy = np.full(n, np.nan), np.full(n, np.nan)
    for i, image in enumerate(images):
        found = detect_circles(image, threshold, min_area)
        n_circles[i] = len(found)
        if len(found) == 1:
            cx[i], cy[i] = found[0][:2]
    z = normalized_x(cx, size)                                  # NaN stays NaN
    with np.errstate(invalid="ignore"):
        in_middle = (n_circles == 1) & (z >= band[0]) & (z <= band[1])
    return dict(n=n, size=size, band=tuple(band), n_circles=n_circles, cx=cx, cy=cy, z=z,
                in_middle=in_middle, n_middle=int(in_middle.sum()),
                accuracy=float(in_middle.mean()) if n else float("nan"),
                bad_fraction=float((n_circles != 1).mean()) if n else float("nan"),
                **centre_square_stats(cx, cy, n_circles, size, band))


def centre_square_stats(cx, cy, n_circles, size, band=MIDDLE_BAND):
    """App. F: which samples fall in the unseen centre square, z_x and z_y both in `band`.

    cx, cy: detected centres in pixels (NaN unless one circle), n_circles: circles per sample.
    Returns dict(zy = (cy + 0.5) / S, in_centre (bool per sample: exactly one circle, both z in
    band), centre_fraction = mean(in_centre)).
    """
    zx, zy = normalized_x(cx, size), normalized_x(cy, size)
    with np.errstate(invalid="ignore"):
        inside = lambda z: (z >= band[0]) & (z <= band[1])  # noqa: E731
        in_centre = (np.asarray(n_circles) == 1) & inside(zx) & inside(zy)
    return dict(zy=zy, in_centre=in_centre, centre_fraction=float(in_centre.mean()) if len(in_centre) else float("nan"))


BAD_KINDS = ("no circle", "two or more circles", "blob (over 2x a disc's area)", "small (under half a disc)",
             "cut at the edge")


def bad_kind(image, threshold=127):
    """The kind of one uint8 (S, S, 3) sample: an entry of BAD_KINDS, or "good".

    A drawn disc of the data set has a known pixel area A = disc_area(S) (5 at 32 x 32, 13 at 64 x 64).
    The first two kinds are the paper's bad samples (0 or >= 2 blobs of at least default_min_area
    pixels); the other three are single blobs that the accuracy still counts but that are not clean
    discs: area > 2 A (a smear or two discs merged), area < A / 2 (a faint speck), or a centre within
    the disc's radius of the image border.
    """
    size, disc = image.shape[1], disc_area(image.shape[1])
    big = [f for f in detect_circles(image, threshold, min_area=1) if f[2] >= default_min_area(size)]
    if not big:
        return BAD_KINDS[0]
    if len(big) > 1:
        return BAD_KINDS[1]
    if big[0][2] > 2 * disc:
        return BAD_KINDS[2]
    if big[0][2] < disc / 2:
        return BAD_KINDS[3]
    if min(big[0][0], big[0][1], size - 1 - big[0][0], size - 1 - big[0][1]) < default_radius(size):
        return BAD_KINDS[4]
    return "good"


def bad_kinds(images, threshold=127):
    """Why samples go wrong: counts of each kind in BAD_KINDS (bad_kind) over a uint8 (N, S, S, 3)
    batch, plus "good"."""
    counts = dict.fromkeys(BAD_KINDS + ("good",), 0)
    for image in images:
        counts[bad_kind(image, threshold)] += 1
    return counts


def write_circles_csv(stats, path):
    """One row per sample: index, n_circles, cx, cy, z, in_middle (0/1); NaN written as 'nan'."""
    lines = ["index,n_circles,cx,cy,z,in_middle"]
    for i in range(stats["n"]):
        lines.append(f"{i},{stats['n_circles'][i]},{stats['cx'][i]:.4f},{stats['cy'][i]:.4f},"
                     f"{stats['z'][i]:.6f},{int(stats['in_middle'][i])}")
    write_bytes_atomically(path, ("\n".join(lines) + "\n").encode())



def plot_centre_histogram(z_values, path, size, title):
    """Histogram of circle-centre z in [0, 1], one bin per pixel column of an S-wide image.

    Grey shading: the training bands (left / right columns of toy_circles); green lines: MIDDLE_BAND.
    NaNs (samples without exactly one circle) are left out.
    """
    z = np.asarray(z_values, dtype=np.float64)
    z = z[np.isfinite(z)]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    for region in ("left", "right"):                            # column c covers z in [c/S, (c+1)/S]
        xs, _ = grid_positions(size, region)
        ax.axvspan(xs.min() / size, (xs.max() + 1) / size, color="0.85", zorder=0,
                   label="training bands" if region == "left" else None)
    for edge in MIDDLE_BAND:
        ax.axvline(edge, color="green", linestyle="--", label="middle band" if edge == MIDDLE_BAND[0] else None)
    ax.hist(z, bins=size, range=(0.0, 1.0), color="tab:blue")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("normalised centre x, z = (cx + 0.5) / S")
    ax.set_ylabel("number of samples")
    ax.set_title(title)
    ax.legend(loc="upper center")
    fig.tight_layout()
    save_figure(fig, path)


def plot_centre_heatmap(cx, cy, size, path, title):
    """App. F: 2-D histogram of sampled circle centres (one bin per pixel), as a PNG.

    Red boxes: the four training squares (region "corners" of toy_circles); green dashes: the unseen
    centre square, z_x and z_y in MIDDLE_BAND. NaNs (samples without exactly one circle) are left out.
    """
    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    ok = np.isfinite(cx) & np.isfinite(cy)
    counts, _, _ = np.histogram2d(cy[ok], cx[ok], bins=size, range=((-0.5, size - 0.5), (-0.5, size - 0.5)))
    fig = Figure(figsize=(6.4, 5.8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(counts, origin="upper", cmap="magma", extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="number of samples")
    left, _ = grid_positions(size, "left")
    right, _ = grid_positions(size, "right")
    for i, (x0, x1) in enumerate([(left.min(), left.max()), (right.min(), right.max())]):
        for j, (y0, y1) in enumerate([(left.min(), left.max()), (right.min(), right.max())]):
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, color="tab:red",
                                   lw=1.5, label="training squares" if i == j == 0 else None))
    lo, hi = MIDDLE_BAND[0] * size - 0.5, MIDDLE_BAND[1] * size - 0.5   # z = (c + 0.5) / S -> pixel c
    ax.add_patch(Rectangle((lo, lo), hi - lo, hi - lo, fill=False, color="tab:green", ls="--", lw=1.5,
                           label="unseen centre square"))
    ax.set_xlabel("circle centre x (pixel column)")
    ax.set_ylabel("circle centre y (pixel row)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Scores: histogram against uniform (Section 5.1, Table 1, App. B)

def histogram_vs_uniform(scores, bins=100, range=(0.0, 1.0)):
    """Compare the histogram of scores on `range` with the uniform distribution over the same bins.

    p = counts / sum (np.histogram: right edge in the last bin). Returns dict(mse, kld, counts,
    edges, bins, range) with
      mse = sqrt(sum_i (1/bins - p_i)^2)      the paper's "MSE", really an L2 norm (released code);
      kld = sum_{p_i > 0} p_i ln(bins p_i)   App. B: KL(p_hist || uniform), in nats.
    Scores outside `range` are refused (np.histogram would drop them silently).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    lo, hi = float(range[0]), float(range[1])
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError("histogram_vs_uniform needs a non-empty array of finite scores")
    if scores.min() < lo or scores.max() > hi:
        raise ValueError(f"scores span [{scores.min():g}, {scores.max():g}], outside the range [{lo:g}, {hi:g}]")
    ### BEGIN SOLUTION a6: the histogram p = counts / sum on [lo, hi], the paper's "MSE" and the KLD against uniform
    counts, edges = np.histogram(scores, bins=bins, range=(lo, hi))
    p = counts / counts.sum()
    mse = math.sqrt(np.sum((1.0 / bins - p) ** 2))
    nz = p > 0                                                  # 0 ln 0 = 0
    kld = float(np.sum(p[nz] * np.log(bins * p[nz])))
    return dict(mse=float(mse), kld=kld, counts=counts, edges=edges, bins=bins, range=(lo, hi))
    ### END SOLUTION


def histogram_metrics(scores, bins=100):
    """Both range conventions: dict(unit=..., data=...), each a histogram_vs_uniform result.

    unit: bins over [0, 1], what the paper's text describes.
    data: bins over [min score, max score], matplotlib's plt.hist default, which the released code
          (and so the paper's reported numbers) used.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    ### BEGIN SOLUTION a6: both range conventions, [0, 1] ("unit") and [min, max] ("data")
    unit = histogram_vs_uniform(scores, bins, (0.0, 1.0))
    data = histogram_vs_uniform(scores, bins, (scores.min(), scores.max()))
    return dict(unit=unit, data=data)
    ### END SOLUTION


def plot_histogram_vs_uniform(scores, path, title, bins=100):
    """PNG: fraction of scores per bin on [0, 1] against the uniform level 1/bins, metrics in the legend."""
    m = histogram_metrics(scores, bins)
    unit, data = m["unit"], m["data"]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    p = unit["counts"] / unit["counts"].sum()
    ax.stairs(p, unit["edges"], fill=True, color="tab:blue",
              label=f"samples (n={int(unit['counts'].sum())}): MSE {unit['mse']:.3f}, KLD {unit['kld']:.3f}"
                    f" [data range: {data['mse']:.3f}, {data['kld']:.3f}]")
    ax.axhline(1.0 / bins, color="red", linestyle="--", label=f"uniform (1/{bins})")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score")
    ax.set_ylabel("fraction of samples per bin")
    ax.set_title(title)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Scores from a regressor of the known attribute (App. K)

def map_images(model, fn, images, batch=256):
    """float64 numpy of fn(model, x) over uint8 images (N, S, S, C) in batches, x in [-1, 1] on the
    model's device, without gradients and in eval mode: the one loop every image scorer here shares."""
    tensors = list(model.parameters())
    device = tensors[0].device if tensors else torch.device("cpu")
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = to_tensor(images[start:start + batch]).to(device)          # (b, C, S, S) in [-1, 1]
            out.append(fn(model, x).double().cpu())
    return torch.cat(out).numpy()


def regressor_scores(model, images, batch=256):
    """(N, D) float64 in (0, 1): the App. K regressor's predicted attributes of uint8 images (N, S, S, 3)
    (for the circles D = 2: z_x, z_y). `model` is a trained regressor (classifier.predict_attributes)."""
    return map_images(model, classifier.predict_attributes, images, batch)


def regressor_vs_detector(pred, stats, bins=100):
    """Histogram-vs-uniform metrics (both range conventions) of two scores of the same samples:
    "regressor": the regressor's z_x (pred (N, D), column 0; or (N,)) of EVERY sample; "detector": the
    detector's z of the samples with exactly one circle (circle_stats). Also their mean |difference|
    where both exist (image widths), the regressor's fraction with z_x in MIDDLE_BAND (to set beside
    the detector's accuracy) and, when pred has a z_y column, with both in it (beside centre_fraction)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(len(stats["n_circles"]), -1)   # (N, D)
    pred_z, inside = pred[:, 0], (pred >= MIDDLE_BAND[0]) & (pred <= MIDDLE_BAND[1])
    one = np.asarray(stats["n_circles"]) == 1
    z_det = np.asarray(stats["z"], dtype=np.float64)[one].clip(0.0, 1.0)
    summary = lambda m: {k: dict(mse=m[k]["mse"], kld=m[k]["kld"], range=list(m[k]["range"])) for k in m}  # noqa: E731
    return dict(regressor=summary(histogram_metrics(pred_z, bins)),
                detector=summary(histogram_metrics(z_det, bins)) if one.any() else None,
                mean_abs_difference=float(np.abs(pred_z[one] - z_det).mean()) if one.any() else float("nan"),
                regressor_middle_fraction=float(inside[:, 0].mean()),
                regressor_centre_fraction=float(inside[:, :2].all(axis=1).mean()) if pred.shape[1] > 1 else None,
                n=int(pred_z.size), n_one_circle=int(one.sum()))


# ----------------------------------------------------------------------------------------------
# Memorization (App. H): the nearest training images of generated samples

COPY_COSINE = 0.95  # a sample whose nearest training image has pixel cosine above this is a near-copy


def image_vectors(images):
    """uint8 (N, S, S, C) -> (N, S*S*C) uint8 view, no copy. nearest_neighbours(..., scale=1/255) turns
    it into float64 in [0, 1] one block at a time, so 60k CelebA faces at 64x64 never exist as one
    5.9 GB float64 matrix. On [0, 1] the black background is 0, so two discs that do not overlap have
    cosine 0 (on [-1, 1] images the background alone makes it near 1)."""
    images = np.asarray(images)
    return images.reshape(len(images), -1)


def nearest_neighbours(queries, refs, chunk=1024, ref_chunk=4096, scale=1.0):
    """For each row q of queries (N, D), its nearest row r of refs (M, D) in Euclidean distance.

    Returns dict(index (N,) int64, distance (N,) = ||q - r||, cosine (N,) = q.r / (||q|| ||r||),
    0 when either is the zero vector), all computed on scale * rows in float64.
    ||q - r||^2 = ||q||^2 - 2 q.r + ||r||^2 on (chunk, ref_chunk) blocks: refs (any dtype, e.g. uint8
    pixels) are converted to float64 ref_chunk rows at a time and a running minimum is kept over the
    blocks (strict <, so ties keep the first index, as one argmin over all of refs would), so memory is
    O(N D + ref_chunk D) whatever M is."""
    q = np.asarray(queries)
    r = np.asarray(refs)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or len(r) == 0:
        raise ValueError(f"nearest_neighbours wants (N, D) queries and (M >= 1, D) refs, got {q.shape} and {r.shape}")
    q = q.astype(np.float64)                                              # (N, D): the samples, few
    q *= scale                                                            # in place: no second copy
    q2 = np.einsum("ij,ij->i", q, q)                                      # (N,)
    n = len(q)
    best = np.full(n, np.inf)                                             # running min of ||q - r||^2
    index, best_dot, best_r2 = np.zeros(n, dtype=np.int64), np.zeros(n), np.zeros(n)
    buffer = np.empty((min(ref_chunk, len(r)), r.shape[1]))             # one float64 block, reused
    for r_start in range(0, len(r), ref_chunk):
        block = r[r_start:r_start + ref_chunk]
        rb = buffer[:len(block)]                                          # (m, D)
        np.multiply(block, scale, out=rb)                                 # uint8 -> float64, scaled
        r2 = np.einsum("ij,ij->i", rb, rb)                                # (m,), no (m, D) temporary
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            dot = np.dot(q[sl], rb.T)                                     # (n, m); `@` would copy rb.T
            d2 = q2[sl, None] - 2.0 * dot + r2[None, :]
            j = np.argmin(d2, axis=1)
            rows = np.arange(len(j))
            dj = d2[rows, j]                                              # this block's minimum per query
            better = dj < best[sl]
            best[sl] = np.where(better, dj, best[sl])
            index[sl] = np.where(better, r_start + j, index[sl])
            best_dot[sl] = np.where(better, dot[rows, j], best_dot[sl])
            best_r2[sl] = np.where(better, r2[j], best_r2[sl])
    nearest = r[index].astype(np.float64) * scale                         # (N, D)
    distance = np.linalg.norm(q - nearest, axis=1)                        # exact, not from the expansion
    norms = np.sqrt(q2 * best_r2)
    cosine = np.where(norms > 0, best_dot / np.where(norms > 0, norms, 1.0), 0.0)
    return dict(index=index, distance=distance, cosine=cosine)


def classifier_features(model, images, batch=256):
    """(N, C) float64: the noisy classifier's penultimate features (classifier.NoisyClassifier.features)
    of clean uint8 images (N, S, S, C) at t = 0. App. H uses CLIP embeddings; CLIP weights cannot be
    downloaded here, so the guidance classifier's own features stand in for a learned image space."""
    return map_images(model, lambda m, x: m.features(x, 0), images, batch)


def memorization(samples, train_images, train_centres=None, stats=None, features=None, copy_cosine=COPY_COSINE):
    """App. H: is each generated sample a copy of a training image?

    samples (N, S, S, C), train_images (M, S, S, C): uint8. Per sample, the nearest training image in
    pixel space ([0, 1], Euclidean; its cosine too) and, when features = (sample_features (N, F),
    train_features (M, F)) is given, in that feature space (nearest by cosine of the feature vectors).
    A sample is a near-copy when its pixel-space nearest neighbour has cosine > copy_cosine.
    Circles (train_centres (M, 2) = (x, y) and stats = circle_stats(samples)): a copy is exact and
    checkable there, so also the fraction of one-circle samples whose detected centre lies on a training
    centre (the same pixel: |dx| <= 0.5 and |dy| <= 0.5), over all samples and over those in the middle
    band (no training centre is there, so any hit would be a detector or data bug).
    Returns the per-sample arrays (pixel_index, pixel_distance, pixel_cosine, near_copy, feature_index,
    feature_cosine, on_training_centre, in_middle) and the fractions, medians and counts that results.json
    keeps.
    """
    n = len(samples)
    pix = nearest_neighbours(image_vectors(samples), image_vectors(train_images), scale=1.0 / 255.0)
    near_copy = pix["cosine"] > copy_cosine
    out = dict(n=n, n_train=len(train_images), copy_cosine=copy_cosine, pixel_index=pix["index"],
               pixel_distance=pix["distance"], pixel_cosine=pix["cosine"], near_copy=near_copy,
               near_copy_fraction=float(near_copy.mean()) if n else float("nan"),
               median_pixel_cosine=float(np.median(pix["cosine"])) if n else float("nan"))
    if features is not None:
        fs, ft = (np.asarray(f, dtype=np.float64) for f in features)
        unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # noqa: E731
        cos = unit(fs) @ unit(ft).T                                       # (N, M)
        out.update(feature_index=cos.argmax(axis=1), feature_cosine=cos.max(axis=1),
                   feature_agrees_with_pixel=float((cos.argmax(axis=1) == pix["index"]).mean()) if n else float("nan"))
    if train_centres is not None and stats is not None:
        one = np.asarray(stats["n_circles"]) == 1
        c = np.stack([np.asarray(stats["cx"], dtype=np.float64), np.asarray(stats["cy"], dtype=np.float64)], axis=1)
        tc = np.asarray(train_centres, dtype=np.float64)                 # (M, 2)
        on = np.zeros(n, dtype=bool)
        if one.any():  # Chebyshev distance to the nearest training centre, samples with one circle only
            cheb = np.abs(c[one][:, None, :] - tc[None, :, :]).max(axis=2).min(axis=1)
            on[one] = cheb <= 0.5
        middle = np.asarray(stats["in_middle"], dtype=bool)
        out.update(on_training_centre=on, in_middle=middle,
                   on_training_centre_fraction=float(on.mean()) if n else float("nan"),
                   on_training_centre_of_one_circle=float(on[one].mean()) if one.any() else float("nan"),
                   n_middle=int(middle.sum()), middle_on_training_centre=int((on & middle).sum()),
                   middle_near_copy=int((near_copy & middle).sum()),
                   median_pixel_cosine_middle=float(np.median(pix["cosine"][middle])) if middle.any() else float("nan"))
    return out


def memorization_summary(m):
    """The scalars of memorization(...) (no per-sample arrays), for results.json."""
    return {k: v for k, v in m.items() if not isinstance(v, np.ndarray)}


MEMO_SAMPLES = 1024  # App. H: samples checked against every training image (the cost grows with N x M)


def memorization_check(samples, train, clf, stats, grid_path):
    """App. H for a run: the nearest training image of each of the first MEMO_SAMPLES guided samples, in
    pixel space and in the guidance classifier's features (CLIP is not available offline), the near-copy
    fraction and, for circles (train["centres"] and circle_stats `stats` given), the samples whose centre
    lies on a training centre. Writes the pairs grid to grid_path (middle-band samples first); returns
    the summary that results.json keeps."""
    samples = samples[:MEMO_SAMPLES]
    stats = {k: (v[:MEMO_SAMPLES] if isinstance(v, np.ndarray) else v) for k, v in stats.items()} if stats else None
    features = (classifier_features(clf, samples), classifier_features(clf, train["images"]))
    m = memorization(samples, train["images"], train.get("centres") if stats else None, stats, features)
    save_memorization_grid(samples, train["images"], m, grid_path)
    return memorization_summary(m)


def save_memorization_grid(samples, train_images, m, path, pairs=8):
    """PNG of sample / nearest training image pairs (Figs. S15-S18): row 1 samples, row 2 their nearest
    training image in pixel space, row 3 (when m has feature_index) their nearest in feature space.
    The first `pairs` samples; for circles (m has in_middle) up to 3/4 of them from the middle band first,
    the interesting ones, then the rest. Tiles are upscaled to at least 128 px."""
    order = np.arange(len(samples))
    if "in_middle" in m:
        middle = np.flatnonzero(m["in_middle"])[:max(1, 3 * pairs // 4)]
        order = np.concatenate([middle, np.setdiff1d(order, middle)])
    pick = order[:pairs]
    rows = [samples[pick], train_images[m["pixel_index"][pick]]]
    if "feature_index" in m:
        rows.append(train_images[m["feature_index"][pick]])
    save_grid(np.concatenate(rows), path, nrow=len(pick), scale=max(1, 128 // samples.shape[1]))


# ----------------------------------------------------------------------------------------------
# Scores from an attribute classifier (faces, Sections 5.1-5.4)

def classifier_scores(images, classifier_path, device="cpu", batch=512):
    """Scores in [0, 1] of uint8 images (N, S, S, 3): the calibrated p(class 1) of a filter_data.py
    evaluation classifier (its stored temperature applied). Feed them to histogram_metrics."""
    model, _ = filter_data.load_attribute_classifier(classifier_path, device)
    return filter_data.score_images(model, images, device=device, batch=batch)


def run_classify(args):
    images = _load_samples(args.samples)
    try:
        scores = classifier_scores(images, args.classifier, args.device)
    except plumbing.CheckpointError as err:
        _fail(f"--classifier: {err}")
    except ValueError as err:
        _fail(f"--samples {args.samples}: {err}")
    path = os.path.join(args.out, "scores.npy")
    buf = io.BytesIO()
    np.save(buf, scores)
    write_bytes_atomically(path, buf.getvalue())
    run_scores(argparse.Namespace(scores=path, out=args.out, bins=args.bins))


# ----------------------------------------------------------------------------------------------
# Command line

def _fail(message):
    """Stop with one line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"evaluate.py: {message}")



def _load_samples(path, flag="--samples"):
    """The uint8 (N, S, S, 3) array under key 'images' of an .npz file, or a one-line failure naming `flag`."""
    if not os.path.isfile(path):
        _fail(f"{flag} {path}: no such file (expected an .npz with key 'images')")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; np.load would call anything else "pickled"
        _fail(f"{flag} {path}: not an .npz (zip) archive (expected an .npz with key 'images')")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # a damaged zip
        _fail(f"{flag} {path}: cannot read as .npz ({type(err).__name__}: {err})".replace("\n", " "))
    with archive:
        if "images" not in archive.files:
            _fail(f"{flag} {path}: no key 'images' (keys: {', '.join(archive.files) or 'none'})")
        try:
            images = archive["images"]
        except Exception as err:  # a damaged member
            _fail(f"{flag} {path}: cannot read 'images' ({type(err).__name__}: {err})".replace("\n", " "))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2] \
            or images.shape[0] == 0:
        _fail(f"{flag} {path}: 'images' must be uint8 (N, S, S, 3) with N >= 1, got {images.dtype} {images.shape}")
    return images


def _load_scores(path):
    """A 1-D float array of scores in [0, 1] from .npy or a one-column .csv (optional header)."""
    if not os.path.isfile(path):
        _fail(f"--scores {path}: no such file (expected .npy or one-column .csv)")
    if path.endswith(".npy"):
        try:
            scores = np.load(path, allow_pickle=False)
        except Exception as err:
            _fail(f"--scores {path}: cannot read as .npy ({type(err).__name__}: {err})".replace("\n", " "))
        if scores.ndim == 2 and scores.shape[1] == 1:
            scores = scores[:, 0]
        if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
            _fail(f"--scores {path}: expected a 1-D numeric array, got {scores.dtype} {scores.shape}")
    elif path.endswith(".csv"):
        with open(path) as fh:
            rows = [(k, line.strip()) for k, line in enumerate(fh, 1) if line.strip()]
        values = []
        for i, (k, line) in enumerate(rows):
            fields = line.split(",")
            if len(fields) != 1:
                _fail(f"--scores {path}: line {k} has {len(fields)} columns, expected one")
            try:
                values.append(float(fields[0]))
            except ValueError:
                if i > 0:  # only the first line may be a header
                    _fail(f"--scores {path}: line {k}: {fields[0]!r} is not a number")
        scores = np.asarray(values, dtype=np.float64)
    else:
        _fail(f"--scores {path}: unknown extension (expected .npy or one-column .csv)")
    scores = scores.astype(np.float64)
    if scores.size == 0:
        _fail(f"--scores {path}: no scores")
    if not np.all(np.isfinite(scores)):
        _fail(f"--scores {path}: {int((~np.isfinite(scores)).sum())} scores are NaN or infinite, expected values in [0, 1]")
    if scores.min() < 0.0 or scores.max() > 1.0:
        _fail(f"--scores {path}: scores must lie in [0, 1], got [{scores.min():g}, {scores.max():g}]")
    return scores


def run_circles(args):
    images = _load_samples(args.samples)
    try:  # the detector's histogram maps pixels onto the data set's grid: sizes 64 / k only (before any file)
        check_size(images.shape[1])
    except ValueError as err:
        _fail(f"--samples {args.samples}: {err}")
    stats = circle_stats(images, threshold=args.threshold)
    counts = np.bincount(np.minimum(stats["n_circles"], 3), minlength=4)  # 0, 1, 2, 3+
    summary = dict(samples=args.samples, n=stats["n"], size=stats["size"], band=list(stats["band"]),
                   threshold=args.threshold, min_area=default_min_area(stats["size"]),
                   accuracy=stats["accuracy"], bad_fraction=stats["bad_fraction"], n_middle=stats["n_middle"],
                   n_circles_counts={"0": int(counts[0]), "1": int(counts[1]), "2": int(counts[2]), "3+": int(counts[3])})
    write_json(summary, os.path.join(args.out, "stats.json"))
    write_circles_csv(stats, os.path.join(args.out, "circles.csv"))
    plot_centre_histogram(stats["z"], os.path.join(args.out, "centre_hist.png"), stats["size"],
                          f"circle centres of {stats['n']} samples: accuracy {stats['accuracy']:.1%}")
    print(f"{stats['n']} samples of {stats['size']}x{stats['size']}: accuracy (one circle, z in "
          f"[{stats['band'][0]}, {stats['band'][1]}]) {stats['accuracy']:.2%}, "
          f"0 or >= 2 circles {stats['bad_fraction']:.2%}")
    print(f"wrote {args.out}/stats.json, circles.csv, centre_hist.png")


def run_scores(args):
    scores = _load_scores(args.scores)
    m = histogram_metrics(scores, args.bins)
    as_json = lambda h: dict(range=list(h["range"]), mse=h["mse"], kld=h["kld"], counts=h["counts"].tolist())
    write_json(dict(scores=args.scores, n=int(scores.size), bins=args.bins,
                     unit=as_json(m["unit"]), data=as_json(m["data"])), os.path.join(args.out, "metrics.json"))
    plot_histogram_vs_uniform(scores, os.path.join(args.out, "score_hist.png"),
                              f"{scores.size} scores against uniform", args.bins)
    for name in ("unit", "data"):
        h = m[name]
        print(f"{name:4s} range [{h['range'][0]:.4g}, {h['range'][1]:.4g}]: MSE {h['mse']:.4f}, KLD {h['kld']:.4f}")
    print(f"wrote {args.out}/metrics.json, score_hist.png")


def run_memorization(args):
    samples = _load_samples(args.samples)
    size = samples.shape[1]
    train_images, centres = _training_images(args.train, size)
    if centres is None and train_images.shape[1:] != samples.shape[1:]:
        _fail(f"--train {args.train}: images are {train_images.shape[1:]}, the samples {samples.shape[1:]}")
    features = None
    if args.classifier:
        try:
            model, _ = classifier.load_classifier(args.classifier)
        except plumbing.CheckpointError as err:
            _fail(f"--classifier: {err}")
        if model.config["image_size"] != size:
            _fail(f"--classifier {args.classifier}: trained on {model.config['image_size']}-pixel images, "
                  f"the samples are {size}")
        features = (classifier_features(model, samples), classifier_features(model, train_images))
    stats = circle_stats(samples) if centres is not None else None
    m = memorization(samples, train_images, centres, stats, features)
    write_json(dict(samples=args.samples, train=args.train, classifier=args.classifier, **memorization_summary(m)),
               os.path.join(args.out, "memorization.json"))
    save_memorization_grid(samples, train_images, m, os.path.join(args.out, "memorization_pairs.png"), args.pairs)
    print(f"{m['n']} samples against {m['n_train']} training images: near-copies (pixel cosine > "
          f"{m['copy_cosine']}) {m['near_copy_fraction']:.1%}, median nearest cosine {m['median_pixel_cosine']:.3f}")
    if stats is not None:
        print(f"circle centre on a training centre: {m['on_training_centre_fraction']:.1%} of all samples; "
              f"{m['middle_on_training_centre']} of the {m['n_middle']} middle-band samples")
    print(f"wrote {args.out}/memorization.json, memorization_pairs.png")


# fractions of T for loss-by-t's default noise levels: dense near t = 0, where the loss changes fastest
LOSS_T_FRACTIONS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 0.95)


def _training_images(name, size, flag="--train"):
    """uint8 (N, S, S, 3) training images: 'circles' / 'corners' rebuilt at `size`, or an .npz with key 'images'.
    Returns (images, centres or None)."""
    if name in ("circles", "corners"):  # the toy training set, rebuilt exactly (toy_circles.make_circles)
        try:
            data = make_circles(size, "train" if name == "circles" else "corners")
        except ValueError as err:
            _fail(f"{flag} {name}: {err}")
        return data["images"], data["centres"]
    return _load_samples(name, flag), None


def plot_loss_by_t(rows, path, title):
    """PNG: eps MSE against t + 1 (both log scales), one line per checkpoint."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for r in rows:
        ax.plot(np.asarray(r["t"]) + 1, r["mse"], marker="o", ms=3, label=r["label"])
    ax.set(xscale="log", yscale="log", xlabel="chain index t + 1 (log)", ylabel="mean ||eps - eps_theta||^2 / D",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def run_loss_by_t(args):
    # 1. load and check every checkpoint (and the images) before any loss is computed: a bad second file
    #    must not cost the first one's evaluation
    checked, x0 = [], None
    for path in args.ddpm:
        try:
            model, d, _ = multiguide.load_models(path, device=args.device)
            ck = plumbing.load_checkpoint(path, "ddpm")          # the step and backbone for the label
        except plumbing.CheckpointError as err:
            _fail(f"--ddpm: {err}")
        size, channels = model.config["image_size"], model.config.get("in_channels", 3)
        if channels != 3:
            _fail(f"--ddpm {path}: a {channels}-channel DDPM; loss-by-t scores RGB images (3 channels)")
        if x0 is None:
            images, _ = _training_images(args.train, size)
            if images.shape[1] != size:
                _fail(f"--train {args.train}: images are {images.shape[1]} pixels, the DDPM {path} is {size}")
            pick = np.random.default_rng(args.seed).permutation(len(images))[:args.n_images] if args.n_images else np.arange(len(images))
            x0 = to_tensor(images[np.sort(pick)]).to(args.device)
        elif x0.shape[-1] != size:
            _fail(f"--ddpm {path}: {size}-pixel images, the first checkpoint's are {x0.shape[-1]}")
        try:
            diffusion = ddpm.diffusion_from_config(d)
        except (KeyError, TypeError, ValueError) as err:
            _fail(f"--ddpm {path}: its diffusion settings do not rebuild ({type(err).__name__}: {err})")
        T = diffusion.num_timesteps
        ts = args.t if args.t else sorted({min(T - 1, round(f * T)) for f in LOSS_T_FRACTIONS})
        if max(ts) >= T:
            _fail(f"--t: timestep {max(ts)} is outside this diffusion's chain 0 .. {T - 1} ({path})")
        checked.append((path, model, diffusion, ts, ck.get("step"), ck.get("backbone", "unet")))
        del ck                                                    # its weights are in `model` already
    # 2. compute
    rows = []
    for path, model, diffusion, ts, step, backbone in checked:
        r = diffusion.losses_by_timestep(model, x0, ts, seed=args.seed)
        r.update(path=path, backbone=backbone, step=step, T=diffusion.num_timesteps,
                 label=f"{backbone} step {step} ({path})")
        rows.append(r)
        print(f"{r['label']}: " + ", ".join(f"t {t}: {m:.4f}" for t, m in zip(r["t"], r["mse"])))
    write_json(dict(train=args.train, n=int(len(x0)), seed=args.seed, checkpoints=rows),
               os.path.join(args.out, "loss_by_t.json"))
    plot_loss_by_t(rows, os.path.join(args.out, "loss_by_t.png"),
                   f"eps MSE by noise level, {len(x0)} training images ({args.train})")
    print(f"wrote {args.out}/loss_by_t.json, loss_by_t.png")


def _nonnegative_ints(text):
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated chain indices, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated chain indices >= 0, got {text!r}")
    return values


def _int_at_least(minimum):
    """An argparse type: an integer >= minimum, else a one-line error."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value
    parse.__name__ = f"integer >= {minimum}"  # argparse names it in "invalid ... value: 'x'"
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


# What each subcommand writes into --out: an earlier run's files are not replaced without --overwrite.
OUTPUTS = {"circles": ["stats.json", "circles.csv", "centre_hist.png"], "scores": ["metrics.json", "score_hist.png"],
           "classify": ["scores.npy", "metrics.json", "score_hist.png"],
           "memorization": ["memorization.json", "memorization_pairs.png"], "loss-by-t": ["loss_by_t.json", "loss_by_t.png"]}


def main(argv=None):
    parser = plumbing.OneLineParser(description="Measure interpolation: circle accuracy, histograms vs uniform, memorization.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("circles", help="detect circles in generated samples (Section 5.5)")
    p.add_argument("--samples", required=True, help=".npz with key 'images', uint8 (N, S, S, 3)")
    p.add_argument("--threshold", type=plumbing.number(int, lambda v: 0 <= v <= 254, "an integer in [0, 254]"),
                   default=127, help="grey level above which a pixel is white")
    p.set_defaults(run=run_circles)
    p = sub.add_parser("scores", help="histogram of scores in [0, 1] against uniform (Table 1, App. B)")
    p.add_argument("--scores", required=True, help=".npy (1-D) or one-column .csv of scores in [0, 1]")
    p.add_argument("--bins", type=_positive_int, default=100, help="histogram bins (the paper: 100)")
    p.set_defaults(run=run_scores)
    p = sub.add_parser("classify", help="score samples with a filter_data.py evaluation classifier, then as `scores`")
    p.add_argument("--samples", required=True, help=".npz with key 'images', uint8 (N, S, S, 3)")
    p.add_argument("--classifier", required=True, help="checkpoint, e.g. runs/smiling/classifiers/evaluation.pt")
    p.add_argument("--bins", type=_positive_int, default=100, help="histogram bins (the paper: 100)")
    plumbing.add_flags(p, "device", "threads")
    p.set_defaults(run=run_classify)
    p = sub.add_parser("memorization", help="nearest training images of the samples, near-copy fraction (App. H)")
    p.add_argument("--samples", required=True, help=".npz with key 'images', uint8 (N, S, S, 3)")
    p.add_argument("--train", required=True,
                   help="the training set: 'circles' or 'corners' (rebuilt at the samples' size) or an .npz with key 'images'")
    p.add_argument("--classifier", default="", help="noisy classifier checkpoint: also nearest neighbours in its features")
    p.add_argument("--pairs", type=_positive_int, default=8, help="sample / neighbour pairs in the PNG")
    plumbing.add_flags(p, "threads")
    p.set_defaults(run=run_memorization)
    p = sub.add_parser("loss-by-t", renamed={"--n": "--n-images"},
                       help="a DDPM's training loss split by noise level t (diagnostic)")
    p.add_argument("--ddpm", required=True, nargs="+", help="one or more ddpm.pt checkpoints (one line each)")
    p.add_argument("--train", required=True,
                   help="the images: 'circles' or 'corners' (rebuilt at the DDPM's size) or an .npz with key 'images'")
    p.add_argument("--t", type=_nonnegative_ints, default=None,
                   help="chain indices, e.g. 0,10,100,500 (default: 11 levels from 0 to 0.95 T)")
    p.add_argument("--n-images", type=_nonnegative_int, default=256, help="images drawn (seeded) from --train; 0 = all")
    plumbing.add_flags(p, "seed", "device", "threads")
    p.set_defaults(run=run_loss_by_t)
    for p in sub.choices.values():
        plumbing.add_flags(p, "out", "overwrite")
    args = parser.parse_args(argv)
    plumbing.check_out_folder(args.out)
    if hasattr(args, "device"):
        args.device = str(plumbing.check_device(args.device))
    if hasattr(args, "threads"):
        plumbing.set_threads(args.threads)
    plumbing.refuse_overwrite(args.out, OUTPUTS[args.command], args.overwrite)
    with plumbing.RunLock(args.out):
        args.run(args)


if __name__ == "__main__":
    plumbing.guard(main)
