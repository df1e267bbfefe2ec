"""real_images.py -- the real-image pipeline: labelled photographs in, an interpolation measured out.

The circles of Sec. 5.5 are drawn knowing where every centre is; real images (CelebA faces of
Sec. 5.1-5.3, or your own two classes of images) come with binary labels only, and their attribute
is measured by a classifier. `train.py --data celeba|folder|csv` runs them through the same stages
as the circles, with these steps around them:

    1. Filtering (Sec. 4.3, App. C/D.1): filter_data.py keeps the clearly extreme images of each
       class in OUT/filter and trains the evaluation classifier (the "judge", on ALL training images,
       calibrated by temperature scaling). A finished filter with the same settings is reused.
    2. The DDPM and 3. the noisy guidance classifier train on the kept images (train.py, fit.py); a
       mirrored face keeps its label.
    4. Multi-guided (Eq. 2, lambda = 30,30 on both classes at once) and unconditional samples.
    5. The judge's calibrated p(attribute) of the guided samples, of the training images and of the
       unconditional samples: 100-bin histograms against uniform, MSE and KLD (App. B), in both range
       conventions (evaluate.histogram_metrics), beside the paper's numbers for CelebA Smiling.

This file holds the steps that are particular to real images: the presets, the filter's command
line, the scores and their rows, the time estimate of the paper's configuration on this machine.
Run it through train.py:

    python train.py --data celeba --attr Smiling --root R [--subset 10k] [--paper]
    python train.py --data folder --root R        (R/<class 0>/*.jpg, R/<class 1>/*.jpg)
    python train.py --data csv --csv FILE.csv     (rows path,label[,split])
"""
import json
import os
import shlex
import time

import numpy as np
import torch

import classifier
import ddpm
import evaluate
import filter_data
import plumbing

DATA_NAMES = ("celeba", "folder", "csv")

# CPU: a SMOKE-SCALE run (end to end on a laptop; not a reproduction): the "cpu" U-Net and classifier
# at 64x64 (pixel-unshuffle stem: they run at 32, 16, 8), 500 DDPM steps.
CPU_PRESET = dict(image_size=64, lambdas="30,30", steps=500, batch=16, log_every=25, ckpt_every=100, grid_every=0,
                  clf_steps=200, clf_batch=32, n_samples=256, regressor_steps=0)
# GPU: App. C (250k DDPM steps, lr 1e-4, no weight decay, EMA 0.9999, T = 4000 cosine, L_hybrid, learned
# variance, 3 res blocks, attention at 32, 16, 8; classifier 150k steps at lr 3e-4), 10k samples with 250
# respaced steps (Sec. 5.1, App. C), the 60k subset (Sec. 5.1). Batch 64 and fp16 are the circles'
# released config (App. C gives no batch size); filter_data.py gets its own --paper.
PAPER_PRESET = dict(image_size=64, lambdas="30,30", unet="paper", T=4000, steps=250000, batch=64, lr=1e-4, warmup=0, grad_clip=0.0,
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
                                      csv=["--csv", cfg.csv])[cfg.data]]


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
    filter_data.read_dataset(filter_data.parse_args(filter_argv(cfg)))  # one-line errors (exit 1 or 2)


def filter_finished(args):
    """Whether args.out holds a finished filter_data.py run (index.csv) made with the same settings."""
    wanted = json.loads(json.dumps(dict(vars(args), device=str(args.device))))  # tuples -> lists, as stored
    try:
        with open(os.path.join(args.out, "config.json")) as fh:
            old = json.load(fh)
    except (OSError, ValueError):
        return False
    same = all(old.get(k) == v for k, v in wanted.items() if k not in filter_data.RUN_CONTROL)
    return same and os.path.isfile(os.path.join(args.out, "index.csv"))


def run_filter(cfg, rt):
    """Step 1: the extreme images (filter_data.run_filter), unless a finished run can be reused. Returns its folder."""
    threads = torch.get_num_threads()
    args = filter_data.parse_args(filter_argv(cfg))  # may set torch's threads (--filter-args --threads)
    if filter_finished(args):
        if rt.main:
            print(f"[filter] finished earlier with the same settings: reusing {args.out}")
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
    paper = PAPER_FACES.get(paper_key, {}).get("60k" if cfg.subset == "all" else cfg.subset)
    return dict(name=name, label=label, n=len(scores), unit={k: m["unit"][k] for k in ("mse", "kld")},
                data={k: m["data"][k] for k in ("mse", "kld")},
                middle_fraction=float(np.mean((scores >= 0.2) & (scores <= 0.8))),
                paper=list(paper) if paper and cfg.data == "celeba" and cfg.attr == "Smiling" else None,
                scores=[round(float(s), 6) for s in scores])


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
    runs = r["config"]["runs"]
    g, tr, un = r["rows"][0], r["rows"][runs], r["rows"][runs + 1]
    paper = r["config"]["data"] == "celeba" and r["attr"] == "Smiling"
    cell = lambda row, p: f"{row['data']['mse']:.3f} / {row['data']['kld']:.3f}" + (f" (paper {p})" if paper else "")  # noqa: E731
    return (f"HEADLINE {r['attr']} histogram vs uniform, MSE / KLD (data range): guided {cell(g, '0.13 / 0.61')}, "
            f"training {cell(tr, '0.56 / 3.17')}, unconditional {cell(un, '0.64 / 3.5')}; in [0.2, 0.8]: guided "
            f"{100 * g['middle_fraction']:.1f}%, unguided {100 * un['middle_fraction']:.1f}%, "
            f"{r['timings_s']['total_s'] / 60:.1f} min")


# ----------------------------------------------------------------------------------------------
# Without a GPU: say what the CPU preset is, and what the paper's configuration would cost here
# ----------------------------------------------------------------------------------------------

def duration(seconds):
    return (f"{seconds / 86400:.1f} days" if seconds > 2 * 86400 else f"{seconds / 3600:.1f} h" if seconds > 7200
            else f"{seconds / 60:.0f} min")


def paper_cost_estimate(cfg, denoiser):
    """(seconds, {stage: seconds}) the run would take on this machine's CPU: ONE timed step at batch 1 of each
    network (training = forward + backward; sampling = a forward, plus the classifier's gradient when guided)
    times the run's steps, batch sizes, images and samples. One step at batch 1: an order of magnitude."""
    plumbing.set_threads(cfg.threads)
    f = filter_data.parse_args(filter_argv(cfg))
    n_images = len(filter_data.read_dataset(f)["labels"])
    clf = classifier.build_classifier(cfg.clf, image_size=cfg.image_size, num_classes=2)
    cnn = filter_data.SmallCNN(image_size=cfg.image_size, width=f.width)
    x, t = torch.randn(1, 3, cfg.image_size, cfg.image_size), torch.zeros(1, dtype=torch.long)

    def seconds(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    unet_train = seconds(lambda: denoiser(x, t).float().mean().backward())
    clf_grad = seconds(lambda: clf(x, t).float().mean().backward())  # a training step ~ one guidance gradient
    cnn_train = seconds(lambda: cnn(x).float().mean().backward())
    with torch.no_grad():
        unet_fwd = seconds(lambda: denoiser(x, t))
    chain = len(ddpm.space_timesteps(cfg.T, cfg.sample_respacing))
    guided = cfg.runs + len(plumbing.float_list(cfg.lambda_sweep))
    parts = {"filter": (f.members + 2) * (f.steps * f.batch + n_images / 3) * cnn_train,  # step 1, ensemble, judge
             "DDPM": cfg.steps * cfg.batch * unet_train,
             "classifier": cfg.runs * cfg.clf_steps * cfg.clf_batch * clf_grad,
             "sampling": cfg.n_samples * chain * ((1 + guided) * unet_fwd + guided * clf_grad)}
    return sum(parts.values()), parts


def check_hardware(cfg, denoiser):
    """Without CUDA: the CPU preset says it is smoke scale; the paper's networks get a time estimate and a
    refusal (unless --force, which also drops fp16 to fp32)."""
    gpu = torch.cuda.is_available() and cfg.device != "cpu"
    if not gpu and "paper" not in (cfg.unet, cfg.clf):
        print("no GPU: this is the reduced CPU preset (smoke scale; it runs end to end but does not reproduce the "
              "paper's numbers). The paper's configuration took about 20 h for the DDPM on 2 GPUs and 8 h for the "
              "classifier (App. C); add --paper to get this machine's estimate for it (the run then stops).")
    if "paper" not in (cfg.unet, cfg.clf) or gpu:
        return
    total, parts = paper_cost_estimate(cfg, denoiser)
    msg = (f"train.py: the paper's configuration without a GPU would take about {duration(total)} on this "
           f"machine ({', '.join(f'{k} {duration(v)}' for k, v in parts.items())}; estimated from one timed "
           f"step at batch 1 of each network here, not from a run; the paper, App. C: about 20 h for the DDPM on "
           f"2 GPUs and 8 h for the classifier on one). Use a GPU, or drop --paper for the CPU "
           f"preset (smoke scale, not a reproduction): python train.py {shlex.join(source_flags(cfg))}"
           f". --force runs it anyway.")
    if not cfg.force:
        raise SystemExit(msg)
    print(msg)
