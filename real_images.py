"""real_images.py -- the real-image pipeline: labelled photographs in, an interpolation measured out.

The circles of Sec. 5.5 are drawn knowing where every centre is; real images (CelebA faces of
Sec. 5.1-5.3, your own two classes of images, or scikit-learn's handwritten digits) come with binary
labels only, and their attribute is measured by a classifier. `train.py --data celeba|folder|csv|digits`
runs them through the same stages as the circles, with these steps around them:

    1. Filtering (Sec. 4.3, App. C/D.1): filter_data.py keeps the clearly extreme images of each
       class in OUT/filter and trains the evaluation classifier (the "judge", on ALL training images,
       calibrated by temperature scaling). A finished filter with the same settings is reused.
    2. The DDPM and 3. the noisy guidance classifier train on the kept images (train.py, fit.py); a
       mirrored face keeps its label, a digit is never mirrored (its slant would be negated).
    4. Multi-guided (Eq. 2, lambda = 30,30 on both classes at once; digits: 1,1) and unconditional samples.
    5. The judge's calibrated p(attribute) of the guided samples, of the training images and of the
       unconditional samples: 100-bin histograms against uniform, MSE and KLD (App. B), in both range
       conventions (evaluate.histogram_metrics), beside the paper's numbers for CelebA Smiling.
    6. Digits only: the attribute is MEASURED, not judged: the exact moment slant of every sample
       (digits.slant), its histogram against the real digits' and, mapped to [0, 1] by the real data's
       CDF, against uniform (App. B); the middle-band fraction guided vs unguided; digit-likeness (a
       ten-class digit classifier: how many samples it labels confidently, over how many classes);
       nearest real digits; the lambda picked by the paper's rule (Sec. 5.3). See digits_results.

This file holds the steps that are particular to real images: the presets, the filter's command
line, the scores and their rows, the digits' measures, the time estimate of the paper's
configuration on this machine. Run it through train.py:

    python train.py --data digits                 (scikit-learn's digits, slant: about 13 min on 2 cores)
    python train.py --data celeba --attr Smiling --root R [--subset 10k] [--paper]
    python train.py --data folder --root R        (R/<class 0>/*.jpg, R/<class 1>/*.jpg)
    python train.py --data csv --csv FILE.csv     (rows path,label[,split])
"""
import collections
import json
import math
import os
import shlex

import numpy as np
import torch

import digits
import evaluate
import filter_data
import fit
import plumbing

DATA_NAMES = ("celeba", "folder", "csv", "digits")
# train.DATA's entries: two classes; a mirrored face keeps its label (flip_swaps_label False), a mirrored
# digit's slant is negated, so digits are never flipped (hflip False: DDPM, classifier, filter).
DATA = {name: dict(region=None, classes=2, flip_swaps_label=False, hflip=name != "digits") for name in DATA_NAMES}

# CPU: a SMOKE-SCALE run (end to end on a laptop; not a reproduction): the "cpu" U-Net and classifier
# at 64x64 (pixel-unshuffle stem: they run at 32, 16, 8), 500 DDPM steps.
# The filter keeps the most extreme 35% of each class by the ensemble's margin (filter_data.py, --subset auto).
CPU_PRESET = dict(image_size=64, lambdas="30,30", steps=500, batch=16, log_every=25, ckpt_every=100, grid_every=0,
                  clf_steps=200, clf_batch=32, n_samples=256, sample_batch=128, regressor_steps=0, subset="auto",
                  t_tilt=0.0, prediction="eps")  # the paper's uniform t and eps: the circles preset's were measured on circles only
# GPU: App. C (250k DDPM steps, lr 1e-4, no weight decay, EMA 0.9999, T = 4000 cosine, L_hybrid, learned
# variance, 3 res blocks, attention at 32, 16, 8; classifier 150k steps at lr 3e-4), 10k samples with 250
# respaced steps (Sec. 5.1, App. C), the 60k subset (Sec. 5.1). Batch 64 and fp16 are the circles'
# released config (App. C gives no batch size); filter_data.py gets its own --paper.
PAPER_PRESET = dict(image_size=64, lambdas="30,30", unet="paper", T=4000, t_tilt=0.0, prediction="eps", steps=250000, batch=64, lr=1e-4, warmup=0, grad_clip=0.0,
                    ema=0.9999, ema_warmup=False, precision="fp16", sample_respacing="250", ckpt_every=5000,
                    grid_every=25000, log_every=500, n_samples=10000, sample_batch=250, clf="paper",
                    clf_steps=150000, clf_lr=3e-4, runs=1, regressor_steps=0, subset="60k",
                    filter_args="--paper")
PRESETS = {name: CPU_PRESET for name in DATA_NAMES}
# Your own images (folder, csv) train at 32 x 32 on a CPU: 4x cheaper than 64, and the "cpu" U-Net's size.
PRESETS["folder"] = PRESETS["csv"] = dict(CPU_PRESET, image_size=32)
# --quick: a first complete result (filter, DDPM, classifier, samples, report) in minutes for a few hundred
# images: smaller filter CNNs trained for fewer steps, 600 DDPM steps, 128 samples.
QUICK_PRESETS = {name: dict(PRESETS[name], image_size=32, steps=600, clf_steps=150, n_samples=128,
                            filter_args="--steps 150 --width 8") for name in DATA_NAMES}
PAPER_PRESETS = {name: PAPER_PRESET for name in DATA_NAMES}
# Digits (digits.py): 16 x 16 (their 8 x 8 information; the "cpu" U-Net's first feature map is then 8 x 8),
# the "cpu" U-Net and classifier, the filter's digits preset (filter_data.DIGITS_PRESET: no flips, 100
# steps, ranked by the ensemble's margin), 250 digits per side (--subset 500), a lambda sweep. The numbers
# and the time (about 13 min on 2 cores) are in docs/RESULTS.md.
PRESETS["digits"] = dict(CPU_PRESET, image_size=16, steps=3000, batch=64, log_every=50, ckpt_every=500,
                         grid_every=1000, clf_steps=500, clf_batch=64, n_samples=256, lambdas="1,1",
                         lambda_sweep="3,10,30,60", subset="500")
QUICK_PRESETS["digits"] = dict(PRESETS["digits"], steps=1000, clf_steps=200, n_samples=128, lambda_sweep="")
PAPER_PRESETS["digits"] = dict(PAPER_PRESET, image_size=32, subset="all")
# --subset choices of train.py: filter_data.py's step-3 presets (its --subset young needs --oversample).
SUBSETS = [name for name in filter_data.SUBSETS if name != "young"]

# (MSE, KLD) to uniform, CelebA Smiling, 10k samples, lambda = 30,30, keyed by --subset. The released
# code histograms over [min, max] of the scores ("data" range, evaluate.py): compare with those columns.
PAPER_FACES = dict(guided={"60k": (0.130, 0.607), "30k": (0.184, 0.835), "10k": (0.186, 0.802),  # Table 1
                           "5k": (0.279, 1.185)},
                   training={"60k": (0.558, 3.161)},     # Sec. 5.2 (Sec. 5.1 rounds it: 0.56, 3.17)
                   unconditional={"60k": (0.64, 3.5)})   # Sec. 5.1


# ----------------------------------------------------------------------------------------------
# 1. The filter's command line
# ----------------------------------------------------------------------------------------------

def source_flags(cfg):
    """The flags that name the labelled images, shared by train.py and filter_data.py."""
    folder = ["--root", cfg.root] + (["--classes", cfg.classes] if cfg.classes else [])
    return ["--data", cfg.data, *dict(celeba=["--attr", cfg.attr, "--root", cfg.root], folder=folder,
                                      csv=["--csv", cfg.csv], digits=[])[cfg.data]]


FILTER_PROG = "filter_data.py (from train.py and its --filter-args)"  # who an error line names


def filter_argv(cfg):
    """The filter_data.py command line of a run: output OUT/filter, images of --image-size.
    --filter-args come last, so they may override any of these (e.g. --out to share one filter)."""
    argv = [*source_flags(cfg), "--out", os.path.join(cfg.out, "filter"),
            "--size", str(cfg.image_size), "--subset", cfg.subset, "--seed", str(cfg.seed)]
    argv += ["--device", cfg.device] if cfg.device != "auto" else []
    argv += ["--overwrite"] if cfg.overwrite else []
    return argv + shlex.split(cfg.filter_args)


def check(cfg, parser):
    """The input exists and reads (a CelebA root that holds the attribute, two class folders, a
    well-formed CSV); filter_data.py's reader errors name the missing file or flag."""
    if cfg.data == "celeba" and not cfg.root:
        parser.error("--data celeba needs --root, the CelebA folder (img_align_celeba/, list_attr_celeba.txt, "
                     "list_eval_partition.txt)")
    if cfg.data == "folder" and not cfg.root:
        parser.error("--data folder needs --root, a folder holding exactly two class folders of images")
    if cfg.data == "csv" and not cfg.csv:
        parser.error("--data csv needs --csv, a file of path,label[,split] rows")
    if cfg.guidance != "classifier":
        parser.error(f"--data {cfg.data}: only --guidance classifier is wired for real images (a class-"
                     "conditional DDPM's flips would swap their labels)")
    try:
        shlex.split(cfg.filter_args)
    except ValueError as e:
        parser.error(f"--filter-args: {e}")
    fargs = filter_data.parse_args(filter_argv(cfg), prog=FILTER_PROG)  # one-line errors (exit 1 or 2)
    if fargs.size != cfg.image_size:  # else the filter would run for hours before training_set refuses it
        parser.error(f"--filter-args sets --size {fargs.size}, but --image-size is {cfg.image_size}; drop --size "
                     f"from --filter-args")
    data = filter_data.read_dataset(fargs)
    if cfg.resume and os.path.isfile(os.path.join(cfg.out, "ddpm.pt")):  # its DDPM has seen the filter's images
        added, removed = images_changed(fargs, data)
        if added or removed:
            raise SystemExit(f"train.py: cannot --resume {cfg.out}: its DDPM trained on the images its filter kept, "
                             f"and {added} image(s) were added, {removed} removed since; put them back, or start a "
                             f"new run (another --out, or --overwrite)")


def images_changed(args, data=None):
    """(added, removed): how many labelled images the source names now (filter_data.read_dataset of args) that
    the finished filter in args.out did not score, and the other way round; (0, 0) without a finished filter."""
    if not os.path.isfile(os.path.join(args.out, "index.csv")):
        return 0, 0
    data = filter_data.read_dataset(args) if data is None else data
    now = collections.Counter(map(str, data["paths"][data["labels"] >= 0]))
    before = collections.Counter(filter_data.read_index(os.path.join(args.out, "index.csv"))["path"].tolist())
    return sum((now - before).values()), sum((before - now).values())


def filter_finished(args):
    """Whether args.out holds a finished filter_data.py run (index.csv) made with the same settings and the
    same list of images (an image added to or removed from a class folder or the CSV runs the filter again)."""
    wanted = json.loads(json.dumps(dict(vars(args), device=str(args.device))))  # tuples -> lists, as stored
    try:
        with open(os.path.join(args.out, "config.json")) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return False
    same = all(old.get(k) == v for k, v in wanted.items() if k not in filter_data.RUN_CONTROL)
    return same and os.path.isfile(os.path.join(args.out, "index.csv")) and images_changed(args) == (0, 0)


def run_filter(cfg, rt):
    """Step 1: the extreme images (filter_data.run_filter), unless a finished run can be reused. Returns its folder."""
    threads = torch.get_num_threads()
    args = filter_data.parse_args(filter_argv(cfg))  # may set torch's threads (--filter-args --threads)
    if filter_finished(args):
        if rt.main:
            print(f"[filter] finished earlier with the same settings: reusing {args.out}")
        plumbing.credit(plumbing.read_json(os.path.join(args.out, "counts.json"), "the filter's counts", obj=True).get("seconds", 0.0))
    elif rt.world > 1:  # one process filters; the others cannot wait hours in a barrier
        raise SystemExit(f"train.py: run the filter first, in one process: python filter_data.py "
                         f"{shlex.join(filter_argv(cfg))}")
    else:
        filter_data.run_filter(args)
    torch.set_num_threads(threads)
    return args.out


def training_set(cfg, fout):
    """The DDPM's training set from a finished filter: dict(images, labels, paths, class_names), each
    kept image as often as --subset oversamples it, and `distinct` (each kept image once)."""
    kept = filter_data.load_kept(fout)
    if kept["images"].shape[1] != cfg.image_size:
        raise SystemExit(f"train.py: {fout} holds {kept['images'].shape[1]}-pixel images, --image-size is "
                         f"{cfg.image_size}; drop --size from --filter-args")
    return dict(kept, distinct=filter_data.load_kept(fout, oversample=False))


# ----------------------------------------------------------------------------------------------
# 5. Scores: the judge's p(attribute) against uniform (App. B)
# ----------------------------------------------------------------------------------------------

def attribute_name(cfg, class_names):
    """What the judge's score is the probability of: the CelebA attribute, else the name of class 1."""
    return cfg.attr if cfg.data == "celeba" else class_names[1]


def judge_path(fout):
    return os.path.join(fout, "classifiers", "evaluation.pt")


def score_row(cfg, name, label, scores, paper_key):
    """One row of the comparison: the 100-bin histogram of `scores` = p(attribute) against uniform (App. B),
    both range conventions, the fraction of mild scores in [0.2, 0.8], the paper's (MSE, KLD) for CelebA
    Smiling; the scores themselves are kept for the report's histograms."""
    m = evaluate.histogram_metrics(scores)
    paper = PAPER_FACES.get(paper_key, {}).get("60k" if cfg.subset in ("all", "auto") else cfg.subset)
    return dict(name=name, label=label, n=len(scores), unit={k: m["unit"][k] for k in ("mse", "kld")},
                data={k: m["data"][k] for k in ("mse", "kld")},
                middle_fraction=float(np.mean((scores >= 0.2) & (scores <= 0.8))),
                paper=list(paper) if paper and cfg.data == "celeba" and cfg.attr == "Smiling" else None,
                scores=[round(float(s), 6) for s in scores])


def sample_rows(cfg, rt, draw, clfs, data, fout):
    """Step 4-5: the judge's scores of each sample set (guided per classifier, training, unconditional, the
    lambda sweep of Sec. 5.3 with classifier 0) as report rows, App. H's memorization summary of guided
    run 0, and the sets themselves {name: uint8 images}. draw(name, clf=None, lambdas=(0, 0)) returns the
    samples of train.draw_samples (written to samples/<name>.npz)."""
    def scores(images):
        return evaluate.classifier_scores(images, judge_path(fout), rt.device)

    rows, sets, lambdas = [], {}, plumbing.float_list(cfg.lambdas)
    for r, clf in enumerate(clfs):
        images = sets[f"guided_run{r}"] = draw(f"guided_run{r}", clf, lambdas)
        rows.append(score_row(cfg, f"guided_run{r}", f"multi-guided samples, lambda = {cfg.lambdas}"
                              + (f", classifier {r}" if cfg.runs > 1 else ""), scores(images), "guided"))
        if r == 0:  # App. H: nearest training images of the guided samples (each kept image once)
            memo = evaluate.memorization_check(images, data["distinct"], clf, None,
                                               os.path.join(cfg.out, "figures", "memorization_pairs.png"))
    sets["training"] = data["distinct"]["images"]
    rows.append(score_row(cfg, "training", f"training images (--subset {cfg.subset})", scores(sets["training"]),
                          "training"))
    sets["unconditional"] = draw("unconditional")
    rows.append(score_row(cfg, "unconditional", "unconditional samples", scores(sets["unconditional"]),
                          "unconditional"))
    for lam in plumbing.float_list(cfg.lambda_sweep):
        images = sets[f"sweep_lambda{lam:g}"] = draw(f"sweep_lambda{lam:g}", clfs[0], (lam, lam))
        rows.append(score_row(cfg, f"sweep_lambda{lam:g}", f"multi-guided samples, lambda = {lam:g}",
                              scores(images), None))
    return rows, memo, sets


def filter_summary(fout):
    """What the filter kept, measured by the judge's calibrated p(class 1) on the training split: the kept
    fraction, and how much of the MIDDLE band (p in [0.2, 0.8], the mild images the DDPM must not see)
    survived. Also the judge's scores of every training image and of the kept ones, for the report's
    histogram of the real data."""
    ix = filter_data.read_index(os.path.join(fout, "index.csv"))
    train, kept, p = ix["split"] == "train", ix["kept"] == 1, ix["p_eval"]
    mild = train & (p >= 0.2) & (p <= 0.8)
    return dict(n_train=int(train.sum()), n_kept=int(kept.sum()), kept_fraction=float(kept.sum() / max(train.sum(), 1)),
                n_mild=int(mild.sum()), n_mild_kept=int((mild & kept).sum()),
                mild_survival=float((mild & kept).sum() / mild.sum()) if mild.any() else None,
                mild_fraction_of_kept=float((mild & kept).sum() / max(kept.sum(), 1)),
                data_scores=[round(float(s), 6) for s in p[train]], kept_scores=[round(float(s), 6) for s in p[kept]])


def judge_summary(fout):
    """The judge's path, test accuracy and temperature (filter_data.py's evaluation.json)."""
    cal = plumbing.read_json(os.path.join(fout, "evaluation.json"), "the filter's calibration")
    return dict(path=judge_path(fout), test_accuracy=cal.get("test_accuracy"), temperature=cal.get("temperature"),
                kept_t1=cal.get("kept_t1"))


def headline(r):
    """The one line a run ends with: guided, training and unconditional MSE / KLD to uniform (App. B), beside
    the paper's numbers for CelebA Smiling only."""
    if r.get("digits"):
        return digits_headline(r)
    runs = r["config"]["runs"]
    g, tr, un = r["rows"][0], r["rows"][runs], r["rows"][runs + 1]
    paper = r["config"]["data"] == "celeba" and r["attr"] == "Smiling"
    cell = lambda row, p: f"{row['data']['mse']:.3f} / {row['data']['kld']:.3f}" + (f" (paper {p})" if paper else "")  # noqa: E731
    return (f"HEADLINE {r['attr']} histogram vs uniform, MSE / KLD (data range): guided {cell(g, '0.13 / 0.61')}, "
            f"training {cell(tr, '0.56 / 3.17')}, unconditional {cell(un, '0.64 / 3.5')}; in [0.2, 0.8]: guided "
            f"{100 * g['middle_fraction']:.1f}%, unguided {100 * un['middle_fraction']:.1f}%, "
            f"{r['timings_s']['total_s'] / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# 6. Digits (--data digits): the slant is measured on every sample, not judged (digits.py)
# ----------------------------------------------------------------------------------------------

CONFIDENT = 0.9      # digit-likeness: a sample is "confidently a digit" when the top class has p > 0.9
CLASS_SHARE = 0.01   # a digit class "appears" when at least 1% of the samples are confidently that class
FILL_MARGIN = 0.15   # a lambda "fills the middle" when its band fraction beats the unguided one by 0.15
DIGIT_CLF = dict(width=16, steps=600, batch=64, lr=2e-3)   # the ten-class digit classifier (a SmallCNN)


def digit_classifier(cfg, rt, real):
    """The ten-class digit classifier behind digit-likeness: filter_data.SmallCNN trained with fit.fit on a
    seeded 90% of the real digits (never flipped: a mirrored 2 is no digit), tested on the other 10%.
    Writes OUT/digit_classifier.pt (kind attribute_classifier; --resume reuses it). Returns (model, summary)."""
    split = filter_data._random_splits(len(real["digits"]), cfg.seed, (0.9, 0.0, 0.1))
    train, test = np.flatnonzero(split == 0), np.flatnonzero(split == 2)
    torch.manual_seed(cfg.seed)
    model = filter_data.SmallCNN(image_size=cfg.image_size, width=DIGIT_CLF["width"], num_classes=10)
    x = torch.from_numpy(real["images"][train]).to(rt.device)
    y = torch.from_numpy(real["digits"][train]).to(rt.device)
    s = fit.FitSettings(steps=DIGIT_CLF["steps"], batch=DIGIT_CLF["batch"], lr=DIGIT_CLF["lr"], warmup=50,
                        schedule="cosine", grad_clip=0.0, seed=cfg.seed, stream=40, log_every=100,
                        ckpt_every=DIGIT_CLF["steps"])
    meta = dict(kind=filter_data.KIND, model_config=model.config, class_names=[str(d) for d in range(10)])
    identity = dict(DIGIT_CLF, image_size=cfg.image_size, seed=cfg.seed, n_train=len(train))
    model, _, _ = fit.fit(model, filter_data.cnn_loss(x, y, flip=False), s, os.path.join(cfg.out, "digit_classifier.pt"),
                          fit.Runtime(0, 1, rt.device), meta, identity, resume=cfg.resume, desc="digit classifier")
    p = digit_probabilities(model, real["images"][test], rt.device)
    summary = dict(DIGIT_CLF, n_train=len(train), n_test=len(test), confident=CONFIDENT,
                   test_accuracy=float((p.argmax(1) == real["digits"][test]).mean()))
    print(f"digit classifier: test accuracy {summary['test_accuracy']:.3f} on {len(test)} held-out real digits")
    return model.eval(), summary


def digit_probabilities(model, images, device="cpu"):
    """softmax over the ten digit classes, float64 (N, 10), for uint8 images (N, S, S, 3)."""
    logits = torch.from_numpy(filter_data.predict_logits(model, images, device=device)).double()
    return torch.softmax(logits, dim=1).numpy()


def digit_likeness(p):
    """From ten-class probabilities (N, 10): the fraction of samples whose top class has p > CONFIDENT
    ("confidently a digit"), artefacts = 1 - that fraction, and the classes that appear (at least
    CLASS_SHARE of the samples confidently of that class) with the confident count of every class."""
    confident = p.max(axis=1) > CONFIDENT
    counts = np.bincount(p.argmax(axis=1)[confident], minlength=10)
    need = max(1, math.ceil(CLASS_SHARE * len(p)))
    return dict(confident_fraction=float(confident.mean()), artefacts=float(1.0 - confident.mean()),
                classes=int((counts >= need).sum()), per_class=counts.tolist(), class_min_count=need)


def slant_metrics(images, real):
    """The slant of uint8 images against the real digits': the middle-band fraction (blank images count,
    outside), the same after removing each image's background level (digits.dehaze: a diagnostic, since
    a grey haze pulls the slant towards 0, into the band), the mean background level, and the 100-bin
    histogram of the slant mapped to [0, 1] by the real data's CDF (digits.to_unit) against uniform
    (App. B, evaluate.histogram_metrics; images without a slant are left out of it). Keeps the slants."""
    s = digits.slant(images)
    u = digits.to_unit(s, real["slant"])
    ok = np.isfinite(u)
    m = evaluate.histogram_metrics(u[ok]) if ok.any() else None
    hist = {k: (dict(mse=m[k]["mse"], kld=m[k]["kld"]) if m else None) for k in ("unit", "data")}
    return dict(n=len(s), no_slant=int((~ok).sum()), band_fraction=float(digits.in_band(s, real["band"]).mean()),
                band_fraction_dehazed=float(digits.in_band(digits.slant(digits.dehaze(images)), real["band"]).mean()),
                background=float(digits.background_level(images).mean()), **hist,
                slants=[round(float(v), 6) if np.isfinite(v) else None for v in s])


def nearest_real(images, real, kept):
    """Median pixel distance ([0, 1] pixels, Euclidean) of each image to its nearest real digit (all 1,797)
    and to its nearest kept training digit (rows `kept` in load_digits order), and the fraction whose
    nearest training digit has pixel cosine > evaluate.COPY_COSINE (App. H's near-copies)."""
    q = evaluate.image_vectors(images)
    to_real = evaluate.nearest_neighbours(q, evaluate.image_vectors(real["images"]), scale=1 / 255)
    to_kept = evaluate.nearest_neighbours(q, evaluate.image_vectors(real["images"][kept]), scale=1 / 255)
    return dict(nearest_real_median=float(np.median(to_real["distance"])),
                nearest_training_median=float(np.median(to_kept["distance"])),
                near_copy_fraction=float(np.mean(to_kept["cosine"] > evaluate.COPY_COSINE)))


def digits_filter(fout, real):
    """What the filter kept, measured by the exact slant: kept fraction of the training split, survival of
    the real middle band (30th-70th percentile), the band's and the mild images' (|c| < 0.2 on c = 2u - 1)
    share of the kept set, kept and training digits per class (the entanglement), and the kept rows in
    load_digits order (kept_indices)."""
    ix = filter_data.read_index(os.path.join(fout, "index.csv"))
    rows, train, kept = ix["row"], ix["split"] == "train", ix["kept"] == 1
    s = real["slant"][rows]
    band, mild = digits.in_band(s, real["band"]), np.abs(2 * digits.to_unit(s, real["slant"]) - 1) < 0.2
    held_out = rows[ix["split"] == "test"]
    return dict(n_train=int(train.sum()), n_kept=int(kept.sum()), kept_fraction=float(kept.sum() / train.sum()),
                band_survival=float(kept[train & band].mean()), band_fraction_of_kept=float(band[kept].mean()),
                mild_fraction_of_kept=float(mild[kept].mean()), kept_per_side=np.bincount(ix["label"][kept], minlength=2).tolist(),
                kept_per_digit=np.bincount(real["digits"][rows[kept]], minlength=10).tolist(),
                train_per_digit=np.bincount(real["digits"][rows[train]], minlength=10).tolist(),
                kept_indices=sorted(int(i) for i in rows[kept]), held_out_indices=sorted(int(i) for i in held_out))


def slant_grid(images, real, path, n=64):
    """The first n images sorted by slant (most left-leaning first, no slant last), 8 per row, those in the
    middle band framed in red. Returns the band's first and last tile (1-based, reading order) or None."""
    images = images[:n]
    s = digits.slant(images)
    order = np.argsort(np.where(np.isfinite(s), s, np.inf), kind="stable")
    inside = digits.in_band(s[order], real["band"])
    plumbing.save_grid(images[order], path, nrow=8, scale=max(1, 64 // images.shape[1]), frames=inside)
    where = np.flatnonzero(inside)
    return dict(first=int(where[0]) + 1, last=int(where[-1]) + 1, n=len(images)) if len(where) else None


def pick_lambda(candidates, unguided_band):
    """Sec. 5.3's rule, "the least artefacts that still fills the middle", measurably. Fills the middle: a
    band fraction at least FILL_MARGIN above the unguided samples'. Artefacts: 1 - confident digit-likeness,
    a proportion of n samples, so two lambdas whose artefacts differ by less than two standard errors of
    the difference (binomial) are tied, and a tie goes to the smaller lambda (the paper, Sec. 5.3 and App.
    I: artefacts grow with lambda). When none fills the middle: the largest band fraction, fills = False.
    candidates: dicts with lam, band_fraction, artefacts, n."""
    fill = [c for c in candidates if c["band_fraction"] - unguided_band >= FILL_MARGIN]
    if not fill:
        best = max(candidates, key=lambda c: (c["band_fraction"], -c["lam"]))
        return dict(lam=best["lam"], fills=False, least_artefacts=None, margin=FILL_MARGIN,
                    unguided_band_fraction=unguided_band, rule=PICK_RULE)
    least = min(fill, key=lambda c: (c["artefacts"], c["lam"]))

    def tied(c):
        se = math.sqrt(c["artefacts"] * (1 - c["artefacts"]) / c["n"] + least["artefacts"] * (1 - least["artefacts"]) / least["n"])
        return c["artefacts"] - least["artefacts"] <= 2 * se

    best = min((c for c in fill if tied(c)), key=lambda c: c["lam"])
    return dict(lam=best["lam"], fills=True, least_artefacts=least["lam"], margin=FILL_MARGIN,
                unguided_band_fraction=unguided_band, rule=PICK_RULE)


PICK_RULE = (f"among the lambdas whose band fraction is at least {FILL_MARGIN} above the unguided samples', the "
             "fewest artefacts (1 - confident digits), differences within two standard errors tied, ties to the "
             "smaller lambda")


def lambda_table(cfg, sets):
    """The sweep of Sec. 5.3 with the run's own lambda and the unguided samples (lambda 0), one row per
    lambda (band fraction, artefacts, classes, slant MSE / KLD), and pick_lambda's choice."""
    lams = plumbing.float_list(cfg.lambdas)
    named = {0.0: "unconditional", **({lams[0]: "guided_run0"} if len(set(lams)) == 1 else {}),
             **{lam: f"sweep_lambda{lam:g}" for lam in plumbing.float_list(cfg.lambda_sweep)}}
    rows = [dict(lam=lam, name=name, n=sets[name]["n"], band_fraction=sets[name]["band_fraction"], artefacts=sets[name]["artefacts"],
                 classes=sets[name]["classes"], unit=sets[name]["unit"], background=sets[name]["background"])
            for lam, name in sorted(named.items())]
    return rows, pick_lambda([r for r in rows if r["lam"] > 0] or rows, sets["unconditional"]["band_fraction"])


def digits_results(cfg, rt, sets, fout, rows):
    """Step 6 for --data digits: every sample set measured by its exact slant and by the digit classifier,
    the real digits as the reference row, the filter by the slant, the lambda picked by the paper's rule.
    Adds each set's scalars to its report row (row["digits"]); returns dict(digits=..., kept_indices=...)."""
    real = digits.load_digits(cfg.image_size)
    model, summary = digit_classifier(cfg, rt, real)
    filt = digits_filter(fout, real)
    measured = {"real": dict(slant_metrics(real["images"], real),
                             **digit_likeness(digit_probabilities(model, real["images"], rt.device)))}
    for name, images in sets.items():
        m = measured[name] = dict(slant_metrics(images, real), **digit_likeness(digit_probabilities(model, images, rt.device)))
        if name != "training":
            m.update(nearest_real(images, real, filt["kept_indices"]),
                     grid=slant_grid(images, real, os.path.join(cfg.out, "figures", f"{name}_by_slant.png")))
    for row in rows:
        row["digits"] = {k: v for k, v in measured[row["name"]].items() if k != "slants"}
    held_out = [i for i in filt["held_out_indices"] if i not in set(filt["kept_indices"])]
    reference = nearest_real(real["images"][held_out], real, filt["kept_indices"])  # real digits never trained on
    sweep, pick = lambda_table(cfg, measured)
    g, u = measured["guided_run0"], measured["unconditional"]
    print(f"digits: middle band [{real['band'][0]:.4f}, {real['band'][1]:.4f}]: guided {g['band_fraction']:.3f}, "
          f"unguided {u['band_fraction']:.3f} (real {measured['real']['band_fraction']:.3f}); confident digits "
          f"{g['confident_fraction']:.3f} over {g['classes']} classes; lambda picked {pick['lam']:g}")
    return dict(digits=dict(band=list(real["band"]), median=real["median"], classifier=summary,
                            filter={k: v for k, v in filt.items() if not k.endswith("_indices")}, sets=measured,
                            held_out_nearest_training_median=reference["nearest_training_median"],
                            held_out_near_copy_fraction=reference["near_copy_fraction"], n_held_out=len(held_out),
                            lambda_sweep=sweep, lambda_pick=pick),
                kept_indices=filt["kept_indices"])


def extra_results(cfg, rt, sets, fout, rows, timings):
    """What a data set measures beyond the judge's rows: digits_results for --data digits, else nothing."""
    if cfg.data != "digits":
        return {}
    with plumbing.timed(timings, "digits_evaluation_s"):
        return digits_results(cfg, rt, sets, fout, rows)


def digits_headline(r):
    """The line a digits run ends with: the exact slant in the middle band, guided vs unguided vs the real
    digits; the slant histogram (CDF-mapped) against uniform; digit-likeness; the time."""
    s = r["digits"]["sets"]
    g, u, real = s["guided_run0"], s["unconditional"], s["real"]
    return (f"HEADLINE digits slant in the middle band: guided {100 * g['band_fraction']:.1f}%, unguided "
            f"{100 * u['band_fraction']:.1f}% (real digits {100 * real['band_fraction']:.1f}%); slant vs uniform "
            f"MSE / KLD guided {g['unit']['mse']:.3f} / {g['unit']['kld']:.3f}, unguided {u['unit']['mse']:.3f} / "
            f"{u['unit']['kld']:.3f}; confident digits {100 * g['confident_fraction']:.1f}% over {g['classes']} "
            f"classes; {r['timings_s']['total_s'] / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# Without a GPU: say what the CPU preset is, and what the paper's configuration would cost here
# ----------------------------------------------------------------------------------------------

def duration(seconds):
    return (f"{seconds / 86400:.1f} days" if seconds > 2 * 86400 else f"{seconds / 3600:.1f} h" if seconds > 7200
            else f"{seconds / 60:.0f} min")


def filter_images(f, n_images):
    """Image passes (forward + backward) of a fresh filter run: step 1, the ensemble and the judge train
    f.steps batches each and score the images (a forward: about a third of a training pass)."""
    return (f.members + 2) * (f.steps * f.batch + n_images / 3)


def filter_seconds(cfg, at_batch_1=False):
    """Expected seconds of a fresh filter run on this CPU: filter_images times one timed training step of its
    SmallCNN (after a warm-up step) per image, at its batch size or at batch 1 (train.cost_estimate)."""
    f = filter_data.parse_args(filter_argv(cfg))
    n_images, batch = len(filter_data.read_dataset(f)["labels"]), 1 if at_batch_1 else f.batch
    cnn = filter_data.SmallCNN(image_size=f.size, width=f.width)
    x = torch.randn(batch, 3, f.size, f.size)
    return filter_images(f, n_images) * plumbing.step_seconds(lambda: cnn(x).float().mean().backward()) / batch


def check_hardware(cfg, estimate):
    """Without CUDA: the CPU preset says it is smoke scale; the paper's networks get a time estimate, from
    estimate() -> (seconds, {stage: seconds}) (train.cost_estimate at batch 1), and a refusal (unless
    --force, which also drops fp16 to fp32)."""
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if not gpu and "paper" not in (cfg.unet, cfg.clf) and cfg.data == "digits":
        print("no GPU: the digits' CPU preset is this experiment's own configuration (16 x 16 digits); the paper's "
              "CelebA configuration needs a GPU (--data celeba --paper).")
    elif not gpu and "paper" not in (cfg.unet, cfg.clf):
        print("no GPU: this is the reduced CPU preset (smoke scale; it runs end to end but does not reproduce the "
              "paper's numbers). The paper's configuration took about 20 h for the DDPM on 2 GPUs and 8 h for the "
              "classifier (App. C); add --paper to get this machine's estimate for it (the run then stops).")
    if "paper" not in (cfg.unet, cfg.clf) or gpu:
        return
    total, parts = estimate()
    msg = (f"train.py: the paper's configuration without a GPU would take about {duration(total)} on this "
           f"machine ({', '.join(f'{k} {duration(v)}' for k, v in parts.items())}; estimated from one timed "
           f"step at batch 1 of each network here, not from a run; the paper, App. C: about 20 h for the DDPM on "
           f"2 GPUs and 8 h for the classifier on one). Use a GPU, or drop --paper for the CPU "
           f"preset (smoke scale, not a reproduction): python train.py {shlex.join(source_flags(cfg))}"
           f". --force runs it anyway.")
    if not cfg.force:
        raise SystemExit(msg)
    print(msg)
