"""Does the filter remove the middle? filter_data.py (Sec. 4.3, App. D.1) on data whose attribute is KNOWN.

The paper filters CelebA to clear extremes so that the DDPM never sees a mild smile (Sec. 4.3); CelebA
has binary labels only, so whether the filter succeeds cannot be checked there. Here the attribute is a
known number c in [-1, 1], so every kept image can be checked:

    faces   drawn faces (draw_face) whose mouth curvature is c (c > 0 smiles, c < 0 frowns), c uniform on
            [-1, 1]; label 1 with probability sigmoid(c / 0.1): noisy near 0 (p = 0.88 at c = 0.2, 0.98 at
            c = 0.4), as CelebA's mild smiles get arbitrary binary labels.
    digits  scikit-learn's handwritten digits (digits.py); c = 2 F(slant) - 1 with F the empirical CDF of
            the real slant (so c is uniform on [-1, 1]); label = slant above the median, exact: the
            agreement is 1 by construction. Also the middle band of issue 23 (30th-70th percentile, |c| < 0.4).

Measured per filter configuration, on the training split (the only images the filter may keep):
    kept fraction       kept / training images
    mild fraction       kept images with |c| < 0.2, over all kept (the target: at most 5%)
    agreement           kept images whose label is 1{c > 0} (the target: at least 97%)
    kept per side       images of class 0 and 1 (enough to train on)
    mild survival       kept mild images / mild training images

Configurations (CPU training scale for every one: the thresholds and step 3 differ, not the networks):
    default      filter_data.py's defaults: tau1 0.9, tau2 0.99, then the most extreme 35% of each class's
                 training images by the mean logit margin of the six filter classifiers (--rank ensemble)
    paper        the paper's thresholds (--tau1 0.99 --tau2 0.9999: all five members agree at p > 0.9999,
                 the released scripts) and every survivor kept (--subset all), ranked by p_eval
    paper_2000   the same with 2000 training steps per classifier (5x the CPU default; digits: 20x)
    rank_evaluation  the default with step 3 ranked by the evaluation classifier's p (Sec. 5.2's ranking)
    thresholds   the previous default: tau1 0.9, tau2 0.99, every survivor kept (--subset all)

Run:  python benchmarks/filter_mild.py --out /tmp/mild [--data faces,digits] [--seeds 0,1,2] [--n-images 1500]
Writes OUT/filter_mild.json and OUT/filter_mild.md (the table), and prints the table; an OUT that holds
them (or the faces and filter runs) needs --overwrite.
"""
import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable
    sys.path.insert(0, str(REPO))

import filter_data  # noqa: E402
import plumbing  # noqa: E402

MILD = 0.2          # |c| < 0.2 on the [-1, 1] scale: the middle fifth
LABEL_NOISE = 0.1   # faces: P(label 1 | c) = sigmoid(c / LABEL_NOISE)
PAPER = ["--tau1", "0.99", "--tau2", "0.9999", "--subset", "all", "--rank", "evaluation"]
CONFIGS = {"default": [], "rank_evaluation": ["--rank", "evaluation"], "paper": PAPER,
           "paper_2000": PAPER + ["--steps", "2000"], "thresholds": ["--subset", "all"]}


def draw_face(c, size=48, rng=None):
    """A grey face on a dark background: a disc head, two eyes, a mouth arc of curvature c in [-1, 1]
    (c = 1 a broad smile, -1 a frown, 0 a straight line), with a little pixel noise. uint8 (S, S, 3)."""
    rng = rng or np.random.default_rng(0)
    img = np.full((size, size, 3), 30, np.uint8)
    s = size / 48
    cv2.circle(img, (size // 2, size // 2), int(20 * s), (200, 190, 170), -1)
    for ex in (-7, 7):
        cv2.circle(img, (size // 2 + int(ex * s), size // 2 - int(6 * s)), max(1, int(2 * s)), (40, 40, 40), -1)
    xs = np.linspace(-9, 9, 30) * s
    ys = size // 2 + 7 * s + c * 5 * s * (1 - (xs / (9 * s)) ** 2)     # rows grow down: c > 0 sags in the middle
    pts = np.stack([size // 2 + xs, ys], axis=1).round().astype(np.int32)
    cv2.polylines(img, [pts], False, (60, 20, 20), max(1, int(2 * s)))
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def write_faces(folder, n=1500, size=48, seed=0, noise=LABEL_NOISE):
    """n faces as PNGs and folder/faces.csv (`file,frown|smile`, a seeded 80/10/10 split by filter_data);
    c uniform on [-1, 1], label 1 ("smile") with probability sigmoid(c / noise). Returns (csv path, c)."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, n)
    label = (rng.uniform(size=n) < 1 / (1 + np.exp(-c / noise))).astype(int)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        cv2.imwrite(os.path.join(folder, f"{i:05d}.png"), draw_face(c[i], size, rng)[:, :, ::-1])
        rows.append(f"{i:05d}.png,{('frown', 'smile')[label[i]]}")
    path = os.path.join(folder, "faces.csv")
    with open(path, "w") as fh:
        fh.write("\n".join(rows) + "\n")
    return path, c


def digits_truth(size=16):
    """c = 2 F(slant) - 1 of the digits in load_digits order, F the empirical CDF of all their slants."""
    import digits
    s = digits.load_digits(size)["slant"]
    return 2 * np.searchsorted(np.sort(s), s, side="right") / len(s) - 1


def measure(index, c):
    """The figures of one filter run from its index.csv columns and the known c of each image (by row)."""
    train, kept = index["split"] == "train", index["kept"] == 1
    ck, label = c[index["row"]], index["label"]
    mild = np.abs(ck) < MILD
    n_kept = int(kept.sum())
    return dict(n_train=int(train.sum()), n_kept=n_kept, kept_fraction=n_kept / max(int(train.sum()), 1),
                kept_per_side=np.bincount(label[kept], minlength=2).tolist(),
                mild_fraction=float(mild[kept].mean()) if n_kept else float("nan"),
                agreement=float((label[kept] == (ck[kept] > 0)).mean()) if n_kept else float("nan"),
                mild_survival=float(kept[train & mild].mean()) if (train & mild).any() else float("nan"),
                band_fraction=float((np.abs(ck[kept]) < 0.4).mean()) if n_kept else float("nan"),
                band_survival=float(kept[train & (np.abs(ck) < 0.4)].mean()))


def run_one(data, config, seed, out, source, c, extra):
    """filter_data.py on `source` with configuration `config` and --seed; returns measure(...)."""
    folder = os.path.join(out, f"{data}_seed{seed}")  # shared by the configurations: equal classifiers are reused
    argv = [*source, "--out", folder, "--seed", str(seed), "--overwrite", *CONFIGS[config], *extra]
    try:
        filter_data.run_filter(filter_data.parse_args(argv))
    except filter_data.DataError as e:  # e.g. a class emptied by the thresholds: nothing to train on
        print(e)
        return dict(data=data, config=config, seed=seed, error=str(e), n_kept=0, kept_fraction=0.0, kept_per_side=[0, 0],
                    **dict.fromkeys(("mild_fraction", "agreement", "mild_survival", "band_fraction", "band_survival"),
                                    float("nan")))
    return dict(data=data, config=config, seed=seed, **measure(filter_data.read_index(os.path.join(folder, "index.csv")), c))


def table(rows):
    """Markdown: mean (min-max over seeds) of each figure per data set and configuration."""
    lines = ["| data | filter | seeds | kept fraction | kept per side (mean) | mild fraction (abs(c) < 0.2) | "
             "label agreement | mild survival | band fraction (abs(c) < 0.4) |", "|---" * 9 + "|"]
    for key in dict.fromkeys((r["data"], r["config"]) for r in rows):
        group = [r for r in rows if (r["data"], r["config"]) == key]
        cell = lambda k: (f"{np.mean([r[k] for r in group]):.3f} ({np.min([r[k] for r in group]):.3f}-"  # noqa: E731
                          f"{np.max([r[k] for r in group]):.3f})")
        side = np.mean([r["kept_per_side"] for r in group], axis=0)
        lines.append(f"| {key[0]} | {key[1]} | {len(group)} | {cell('kept_fraction')} | {side[0]:.0f} / {side[1]:.0f} | "
                     f"{cell('mild_fraction')} | {cell('agreement')} | {cell('mild_survival')} | {cell('band_fraction')} |")
    return "\n".join(lines)


def seed_list(text):
    """'0,1,2' -> [0, 1, 2]: filter seeds, integers >= 0, each once."""
    try:
        seeds = [plumbing.nonnegative_int(p.strip()) for p in text.split(",")]
    except argparse.ArgumentTypeError:  # one bad element: the message below names the whole value
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected comma-separated distinct integers >= 0, got {text!r}")
    return seeds


def main(argv=None):
    parser = plumbing.OneLineParser(description="Measure how many mild images filter_data.py keeps, on data "
                                                "with a known attribute.")
    plumbing.add_flags(parser, "out", "overwrite", threads=1)
    parser.add_argument("--data", default="faces,digits", help="faces, digits or both (comma-separated)")
    parser.add_argument("--configs", default="default,paper,thresholds",
                        help=f"filter configurations ({', '.join(CONFIGS)})")
    parser.add_argument("--seeds", type=seed_list, default="0,1,2", help="filter seeds (comma-separated)")
    parser.add_argument("--n-images", type=plumbing.positive_int, default=1500, help="faces drawn")
    parser.add_argument("--size", type=plumbing.positive_int, default=32, help="faces: the filter's --size")
    args = parser.parse_args(argv)
    datas, configs = args.data.split(","), args.configs.split(",")
    if not set(datas) <= {"faces", "digits"} or not set(configs) <= set(CONFIGS):
        parser.error(f"--data takes faces,digits and --configs {','.join(CONFIGS)}")
    seeds = args.seeds  # argparse runs seed_list on the default string too
    plumbing.check_out_folder(args.out)
    plumbing.refuse_overwrite(args.out, ["filter_mild.json", "filter_mild.md", "faces"]
                              + [f"{d}_seed{s}" for d in datas for s in seeds], args.overwrite)
    extra = ["--threads", str(args.threads), "--workers", "1"]
    rows = []
    for data in datas:
        if data == "faces":
            csv, c = write_faces(os.path.join(args.out, "faces"), args.n_images)
            source = ["--data", "csv", "--csv", csv, "--size", str(args.size), "--cache", os.path.join(args.out, "cache")]
        else:
            c, source = digits_truth(16), ["--data", "digits", "--size", "16"]
        rows += [run_one(data, config, seed, args.out, source, c, extra) for config in configs for seed in seeds]
    text = table(rows)
    plumbing.write_json(dict(rows=rows, mild=MILD, label_noise=LABEL_NOISE, configs=CONFIGS),
                        os.path.join(args.out, "filter_mild.json"))
    plumbing.write_bytes_atomically(os.path.join(args.out, "filter_mild.md"), (text + "\n").encode())
    print(text)
    return rows


if __name__ == "__main__":
    plumbing.guard(main)
