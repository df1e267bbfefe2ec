"""The toy data set of the paper: one white disc on black, seen only near the left and right edges.

Paper Section 5.5 and Fig. 7a. Each image is S x S RGB (S = 64 in the paper), black background, with
one white (255) filled disc and no anti-aliasing: a pixel (row, col) is white when
(col - cx)^2 + (row - cy)^2 <= r^2. With r = 2 that is 13 pixels inside a 5 x 5 box.

Training set (every grid position, no randomness): centres x in {2..11} U {52..61}, y in {2..61},
so 20 * 60 = 1200 images. Label = 1{x >= 32} (0 = left, 1 = right), the paper's 1{z > 1/2}.
Training uses random horizontal flips: a flip maps column c to S - 1 - c, which maps the left band
exactly onto the right band, so it also swaps the label.

Normalised centre coordinate (Fig. 7a's z): z = (cx + 0.5) / S, the centre of pixel column cx
measured in image widths. The training bands are then z <= 0.18 and z >= 0.82 (11.5/64 and
52.5/64), symmetric under the flip (z -> 1 - z), and the unseen middle band used for evaluation is
z in [0.2, 0.8] (MIDDLE_BAND), i.e. columns 13..50 at S = 64.

Smaller images for the CPU preset: S must be 64 / k for an integer k (64, 32, 16 or 8). With
f = S / 64, the radius is r = 2 f and every 64-pixel centre c maps to floor(c * f), duplicates
removed. At S = 32: r = 1 (a 5-pixel plus shape), x in {1..5} U {26..30}, y in {1..30}, so
10 * 30 = 300 images; the middle band is columns 6..25. At S = 16, r = 0.5 is a single pixel.
floor keeps the flip symmetry: S - 1 - floor(c f) = floor((63 - c) f) for integer 1 / f.

Continuous discs (for generalization.py, the two-DDPMs study of Kadkhodaie et al. 2024): make_discs
draws sub-pixel centres (optionally radii and grey levels) uniformly over a region and renders each
disc anti-aliased: a pixel's value is the fraction of its 16 x 16 sub-pixel samples inside the disc
(SUPERSAMPLE), times the grey level. The grid data set above is unchanged.

Two variables (App. F): region "corners" keeps the centres whose x AND y both lie in the training
bands, i.e. the four corner squares (10 x 10 = 100 centres per square at 64, 5 x 5 = 25 at 32), with
label = 1{x >= S/2} + 2 * 1{y >= S/2}: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right (rows
grow downwards). The unseen "centre square" for its evaluation is z_x and z_y both in MIDDLE_BAND.
A left-right flip toggles the x bit of the label (label ^ 1), which is 0 <-> 1 for the circles too.

Run:  python toy_circles.py --out out/circles --size 32 --region train
"""
import argparse
import math
import os

import numpy as np

import plumbing

PAPER_SIZE = 64                 # the paper's image side
PAPER_RADIUS = 2.0              # disc radius at 64 x 64 (Section 5.5: "a radius of two pixels")
LEFT_X_64 = range(2, 12)        # x in {2..11}
RIGHT_X_64 = range(52, 62)      # x in {52..61}
Y_64 = range(2, 62)             # y in {2..61}
MIDDLE_BAND = (0.2, 0.8)        # unseen band of z used for the "accuracy" of Section 5.5
REGIONS = ("train", "middle", "all", "left", "right", "corners")


MIN_SIZE = 8  # at S = 2 the training columns land inside the middle band; below 8 nothing is left to learn


def check_size(size):
    """Refuse sizes that are not 64 / k for an integer k (the grid mapping needs an integer k), or below 8."""
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE or PAPER_SIZE % size != 0:
        raise ValueError(f"image size must be 64 / k for an integer k (64, 32, 16 or 8), got {size!r}")
    return int(size)


def default_radius(size):
    """r = 2 * S / 64: the paper's radius scaled with the image (1.0 at S = 32)."""
    return PAPER_RADIUS * size / PAPER_SIZE


def normalized_x(cx, size):
    """z = (cx + 0.5) / S: the pixel-centre x coordinate in image widths (works on arrays)."""
    return (np.asarray(cx, dtype=np.float64) + 0.5) / size


def _disc_masks(size, cxs, cys, radius):
    """(N, S, S) bool masks, True where (col - cx)^2 + (row - cy)^2 <= r^2."""
    cxs = np.asarray(cxs, dtype=np.int64).reshape(-1, 1, 1)
    cys = np.asarray(cys, dtype=np.int64).reshape(-1, 1, 1)
    grid = np.arange(size)
    d2 = (grid[None, None, :] - cxs) ** 2 + (grid[None, :, None] - cys) ** 2  # (N, S rows, S cols)
    return d2 <= radius * radius


def draw_disc(size, cx, cy, radius):
    """One (S, S, 3) uint8 image: black, with a white (255) disc centred on pixel (row cy, col cx)."""
    mask = _disc_masks(size, [cx], [cy], radius)[0]
    return np.repeat(mask[:, :, None], 3, axis=2).astype(np.uint8) * 255


def grid_positions(size, region, radius=None):
    """Every centre of a region, as two paired int64 arrays (xs, ys) of equal length N.

    Order: x outer, y inner (x ascending, then y ascending). Regions:
      "left" / "right": one training band, mapped from 64 pixels with floor(c * S / 64);
      "train": left then right (1200 at 64, 300 at 32);
      "middle": every column whose z lies in MIDDLE_BAND (never seen in training);
      "all": every column with the disc inside the image, x in [floor r, S - 1 - floor r];
      "corners" (App. F): x in the left or right band AND y in the same two bands (y mapped like x).
    Except for "corners", y runs over the training rows (2..61 at 64, mapped like x). `radius` only
    matters for "all".
    """
    size = check_size(size)
    if region not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    f = size / PAPER_SIZE
    to_s = lambda cs: np.unique(np.floor(np.asarray(cs) * f).astype(np.int64))  # dedup, sorted
    left, right, ys = to_s(LEFT_X_64), to_s(RIGHT_X_64), to_s(Y_64)
    if region == "left":
        xs = left
    elif region == "right":
        xs = right
    elif region in ("train", "corners"):
        xs = np.concatenate([left, right])
        ys = xs if region == "corners" else ys  # App. F: y in the same two bands as x
    elif region == "middle":
        cols = np.arange(size)
        z = normalized_x(cols, size)
        xs = cols[(z >= MIDDLE_BAND[0]) & (z <= MIDDLE_BAND[1])]
    else:  # "all"
        margin = int(math.floor(default_radius(size) if radius is None else radius))
        xs = np.arange(margin, size - margin)
    gx, gy = np.meshgrid(xs, ys, indexing="ij")  # (len(xs), len(ys)): x outer, y inner
    return gx.reshape(-1).astype(np.int64), gy.reshape(-1).astype(np.int64)


def make_circles(size=64, region="train", radius=None):
    """The data set: dict(images uint8 (N,S,S,3), labels int64 (N,) = 1{cx >= S/2}, centres (N,2) = (x,y)).

    Region "corners" labels the quadrant instead: 1{cx >= S/2} + 2 * 1{cy >= S/2} in 0..3 (App. F)."""
    size = check_size(size)
    r = default_radius(size) if radius is None else float(radius)
    xs, ys = grid_positions(size, region, radius=r)
    masks = _disc_masks(size, xs, ys, r)                           # (N, S, S)
    images = np.repeat(masks[..., None], 3, axis=3).astype(np.uint8) * 255  # (N, S, S, 3)
    labels = (xs >= size // 2).astype(np.int64)                    # Section 5.5: 1{z > 0.5}
    if region == "corners":
        labels += 2 * (ys >= size // 2)                            # App. F: the quadrant, 0..3
    return dict(images=images, labels=labels, centres=np.stack([xs, ys], axis=1))


# ----------------------------------------------------------------------------------------------
# Continuous discs: sub-pixel centres, anti-aliased by supersampling (used by generalization.py)
# ----------------------------------------------------------------------------------------------

SUPERSAMPLE = 16                          # K x K sub-pixel samples per pixel: 16 x 16 (area within 1% for r >= 2)
TRAIN_BAND_Z = (11.5 / 64, 52.5 / 64)     # the grid's outer bands in z: left z <= 0.180, right z >= 0.820
CONTINUOUS_REGIONS = ("train", "middle", "all", "left", "right")


def disc_coverage(size, centres, radii, supersample=SUPERSAMPLE, chunk=1024):
    """(N, S, S) float64 in [0, 1]: the fraction of each pixel that its disc covers.

    Pixel (row, col) is the unit square centred on (col, row), as in draw_disc, so an integer centre
    sits on a pixel centre. The square holds K x K sub-samples at col - 1/2 + (k + 1/2) / K,
    k = 0..K-1 (same for rows); a sub-sample is inside when (u - cx)^2 + (v - cy)^2 <= r^2, and the
    coverage is the inside fraction (an estimate of the disc's area in the pixel; K = supersample).
    Only a W x W window of pixels around each disc is sampled, W = ceil(2 r) + 2 (every pixel the
    disc can touch); parts of a disc outside the image are cut off.
    centres: (N, 2) as (cx, cy) in pixels, any real numbers; radii: (N,) or one number.
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(centres),))
    K = int(supersample)
    if K < 1 or len(centres) == 0:
        raise ValueError(f"need K >= 1 and at least one centre, got supersample={supersample!r}, {len(centres)} centres")
    W = int(math.ceil(2 * radii.max())) + 2                        # window side in pixels
    offsets = (np.arange(K) + 0.5) / K - 0.5                       # (K,) sub-sample offsets in a pixel
    corner = np.floor(centres - radii[:, None] - 0.5).astype(np.int64) + 1  # (N, 2) first touched (col, row)
    out = np.zeros((len(centres), size + 2 * W, size + 2 * W))     # padded by W: windows never index out
    pix = np.arange(W)
    for s in range(0, len(centres), chunk):                        # chunks bound the memory: chunk (W K)^2
        c, r, c0 = centres[s:s + chunk], radii[s:s + chunk], corner[s:s + chunk]
        n = len(c)
        u = ((c0[:, 0:1] + pix)[:, :, None] + offsets).reshape(n, W * K)   # (n, W K) sub-sample columns
        v = ((c0[:, 1:2] + pix)[:, :, None] + offsets).reshape(n, W * K)   # (n, W K) sub-sample rows
        inside = (v - c[:, 1:2])[:, :, None] ** 2 + (u - c[:, 0:1])[:, None, :] ** 2 <= (r * r)[:, None, None]
        local = inside.reshape(n, W, K, W, K).mean(axis=(2, 4))    # (n, W rows, W cols)
        rows = (c0[:, 1:2] + pix + W).clip(0, size + W)             # padded coordinates; beyond the far
        cols = (c0[:, 0:1] + pix + W).clip(0, size + W)             # pad: clipped (only for a disc mostly off-image)
        out[np.arange(s, s + n)[:, None, None], rows[:, :, None], cols[:, None, :]] = local
    return out[:, W:W + size, W:W + size]


def render_discs(size, centres, radii, levels=1.0, channels=1, supersample=SUPERSAMPLE):
    """uint8 (N, S, S, channels): black background, disc value round(255 * level * coverage).

    levels: grey level of each disc in (0, 1] ((N,) or one number); channels 1 (grey) or 3 (copies).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    cover = disc_coverage(size, centres, radii, supersample)       # (N, S, S)
    levels = np.broadcast_to(np.asarray(levels, dtype=np.float64), (len(cover),))
    grey = np.round(255.0 * cover * levels[:, None, None]).astype(np.uint8)
    return np.repeat(grey[..., None], channels, axis=3)            # (N, S, S, C)


def continuous_x_range(size, region, radius):
    """The interval [lo, hi] of centre x for a region (the disc stays inside the image: x >= r - 1/2).

    "all": [r - 1/2, S - 1/2 - r]; "left": up to z = TRAIN_BAND_Z[0], i.e. x <= 0.180 S - 1/2;
    "right": the mirror image of "left" (x -> S - 1 - x); "middle": z in MIDDLE_BAND.
    ("train" is left or right, with probability 1/2 each.)
    """
    lo, hi = radius - 0.5, size - 0.5 - radius
    if region == "all":
        band = (lo, hi)
    elif region == "left":
        band = (lo, TRAIN_BAND_Z[0] * size - 0.5)
    elif region == "right":
        band = (size - 1 - (TRAIN_BAND_Z[0] * size - 0.5), hi)
    elif region == "middle":
        band = (max(lo, MIDDLE_BAND[0] * size - 0.5), min(hi, MIDDLE_BAND[1] * size - 0.5))
    else:
        raise ValueError(f"region of continuous discs must be one of {CONTINUOUS_REGIONS}, got {region!r}")
    if not band[0] < band[1]:
        raise ValueError(f"a disc of radius {radius:g} does not fit region {region!r} of a {size}-pixel image")
    return band


def make_discs(n, size=32, radius=2.5, region="all", seed=0, radius_range=None, level_range=None,
               channels=1, supersample=SUPERSAMPLE):
    """n random anti-aliased discs: dict(images uint8 (n,S,S,C), centres float64 (n,2) = (x,y),
    radii (n,), levels (n,), labels int64 (n,) = 1{z > 1/2}).

    Centres are uniform over the region (continuous_x_range for x; y in [r - 1/2, S - 1/2 - r]);
    radius_range = (lo, hi) draws radii uniformly instead of the fixed radius, level_range = (lo, hi)
    grey levels instead of white. One numpy Generator seeded with `seed` draws everything, so a seed
    fixes the set. With a fixed radius and level the images form a 2-D manifold (cx, cy).
    Any size works here (not only 64 / k).
    """
    if n < 1:
        raise ValueError(f"need at least one disc, got n = {n}")
    rng = np.random.default_rng(seed)
    r_max = radius if radius_range is None else max(radius_range)
    radii = np.full(n, float(radius)) if radius_range is None else rng.uniform(*radius_range, size=n)
    levels = np.ones(n) if level_range is None else rng.uniform(*level_range, size=n)
    if region == "train":                                          # left or right band, mirror images
        lo, hi = continuous_x_range(size, "left", r_max)
        xs = rng.uniform(lo, hi, size=n)
        right = rng.random(n) < 0.5
        xs = np.where(right, size - 1 - xs, xs)                    # flip: x -> S - 1 - x
    else:
        xs = rng.uniform(*continuous_x_range(size, region, r_max), size=n)
    ys = rng.uniform(r_max - 0.5, size - 0.5 - r_max, size=n)
    centres = np.stack([xs, ys], axis=1)
    images = render_discs(size, centres, radii, levels, channels, supersample)
    labels = (normalized_x(xs, size) > 0.5).astype(np.int64)       # Section 5.5's 1{z > 1/2}
    return dict(images=images, centres=centres, radii=radii, levels=levels, labels=labels)


def disc_tangents(size, centre, radius, level=1.0, h=0.25, supersample=32):
    """(2, S, S) float64: d image / d cx and d image / d cy of one disc, by central differences
    (image(c + h e) - image(c - h e)) / 2h of the coverage times the level, in [0, 1] units per pixel.

    These span the tangent plane of the 2-D disc manifold at that disc. A finer sub-pixel grid
    (32 x 32) than the data's keeps the difference from stepping over whole sub-samples.
    """
    c = np.asarray(centre, dtype=np.float64)
    shifts = np.array([c + [h, 0], c - [h, 0], c + [0, h], c - [0, h]])
    cover = disc_coverage(size, shifts, radius, supersample) * level   # (4, S, S)
    return np.stack([cover[0] - cover[1], cover[2] - cover[3]]) / (2 * h)


def _size_arg(text):
    """argparse type: an integer image size 64 / k."""
    try:
        return check_size(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv=None):
    parser = plumbing.OneLineParser(description="Write a grid PNG of the circles data set (paper Section 5.5).")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--size", type=_size_arg, default=64, help="image side, 64 / k (64 = paper, 32 = CPU preset)")
    parser.add_argument("--region", choices=REGIONS, default="train", help="which centres to draw")
    plumbing.add_flags(parser, "overwrite")
    args = parser.parse_args(argv)
    plumbing.check_out_folder(args.out)
    name = f"circles_{args.region}_{args.size}.png"
    plumbing.refuse_overwrite(args.out, [name], args.overwrite)
    data = make_circles(args.size, args.region)
    xs, ys = data["centres"][:, 0], data["centres"][:, 1]
    path = os.path.join(args.out, name)
    plumbing.save_grid(data["images"], path, scale=max(1, PAPER_SIZE // args.size))  # small images shown at 64 px
    print(f"{len(xs)} images of {args.size}x{args.size}, radius {default_radius(args.size):g}, region {args.region}")
    print(f"labels: {int((data['labels'] == 0).sum())} left (0), {int((data['labels'] == 1).sum())} right (1)")
    print(f"x in {sorted(set(xs.tolist()))}, y in {ys.min()}..{ys.max()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    plumbing.guard(main)
