"""report.py -- a run's results.json turned into report.md and its figures, and nothing else.

A run of train.py computes; it writes every number and every array its figures need into
OUT/results.json, then calls `render(OUT)`. `render` reads results.json alone and writes
OUT/report.md and the figures that are plots of numbers (histograms, heatmaps). So a report can be
rebuilt, restyled or regenerated after a change of this file without running anything again:

    python report.py runs/circles          # rewrites runs/circles/report.md and its figures

Pictures of images (sample grids, the training data, nearest-neighbour pairs) are written when the
images exist, by the stage that has them; the report links them.

Reports: the circles (Sec. 5.5) and corners (App. F) experiments, and real images (Sec. 5.1-5.3:
CelebA, your own folders). Each compares with the paper where the paper gives a number.
"""
import os

import numpy as np

import classifier
import evaluate
import plumbing

PAPER_CIRCLES = dict(accuracy=(0.78, 0.087), bad=(0.0425, 0.0245), spectral_best=0.90)  # Sec. 5.5


def render(out):
    """Read OUT/results.json; write OUT/report.md and the figures it shows. Returns the markdown."""
    path = os.path.join(out, "results.json")
    r = plumbing.read_json(path, "results file", obj=True)
    kind = r.get("data")
    if kind not in ("circles", "corners") and not isinstance(r.get("rows"), list):  # e.g. generalization.py's
        raise SystemExit(f"error: {path} is not the results of a train.py run (neither circles/corners data nor "
                         f"'rows' of real images); report.py renders train.py runs only")
    if kind in ("circles", "corners"):
        circles_figures(out, r)
        text = circles_report(r)
    else:
        for row in r["rows"]:
            evaluate.plot_histogram_vs_uniform(np.asarray(row["scores"]), os.path.join(out, "figures", f"hist_{row['name']}.png"),
                                               f"p({r['attr']}) of the {row['label']} (evaluation classifier)")
        plot_scores_vs_data(r, os.path.join(out, "figures", "scores_vs_data.png"))
        if r.get("digits"):
            digits_figures(out, r)
        text = real_images_report(r)
    plumbing.write_bytes_atomically(os.path.join(out, "report.md"), text.encode())
    return text


def _pct(x, digits=1):
    return f"{100 * x:.{digits}f}%"


def profile(r):
    """Each stage's wall time, the images it processed (a training image counts once per step it is in
    the batch; a sampled image once per sampling step) and an estimate of its floating-point work:
    forward FLOPs per image (r["flops_per_image"], counted once per run) x images, x 3 for training
    (forward + backward) and for a guidance gradient (the classifier's forward + backward to x_t)."""
    c, t, f = r["config"], r.get("timings_s", {}), r.get("flops_per_image") or {}
    fd, fc = f.get("denoiser", 0), f.get("classifier", 0)
    chain = r.get("chain_steps", 0)
    guided_sets = c["runs"] * (1 + len(r.get("lambda_sweep") or []))
    work = {"ddpm_training_s": (c["steps"] * c["batch"], 3 * fd),
            "classifier_training_s": (c["runs"] * c["clf_steps"] * c["clf_batch"], 3 * fc),
            "regressor_training_s": (c["regressor_steps"] * c["clf_batch"], 3 * fc),
            "unguided_sampling_s": (c["n_samples"] * chain, fd),
            "guided_sampling_s": (c["runs"] * c["n_samples"] * chain, fd + 3 * fc),
            "sweep_sampling_s": (len(r.get("lambda_sweep") or []) * c["n_samples"] * chain, fd + 3 * fc)}
    rows = {}
    for stage, seconds in t.items():
        if stage == "credited_s":  # not a stage: the part of the stages' time earlier processes spent
            continue
        images, per = work.get(stage, (0, 0))
        rows[stage] = dict(wall_s=seconds, images=images, img_per_s=images / seconds if images and seconds else None,
                           gflop=images * per / 1e9 if per and images else None,
                           gflop_per_s=images * per / 1e9 / seconds if per and images and seconds else None)
    g, u = t.get("guided_sampling_s"), t.get("unguided_sampling_s")
    ratio = g / c["runs"] / u if g and u else None   # the same samples and steps: a guided step's cost
    return dict(stages=rows, guided_step_over_unguided=ratio, guided_sets=guided_sets)


def profile_table(r):
    """report.md lines: where the run's wall time went, stage by stage, with images/s and GFLOP/s."""
    p = r.get("profile")
    if not p:
        return []
    total = r["timings_s"].get("total_s", 0.0)
    lines = ["", "## Where the time went", "", "| stage | wall time | share | images/s | GFLOP | GFLOP/s |",
             "|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for stage, s in p["stages"].items():
        if stage != "total_s":
            lines.append(f"| {stage.removesuffix('_s').replace('_', ' ')} | {s['wall_s']:.1f} s | "
                         f"{_pct(s['wall_s'] / max(total, 1e-9))} | {fmt(s['img_per_s'], '.0f')} | "
                         f"{fmt(s['gflop'], '.0f')} | {fmt(s['gflop_per_s'], '.1f')} |")
    lines.append(f"| total | {total:.1f} s ({total / 60:.1f} min) | | | | |")
    if r["timings_s"].get("credited_s"):
        lines += ["", f"This run was resumed: {r['timings_s']['credited_s']:.1f} s of these times were spent by the "
                      "processes before this one (the checkpoints carry their training time, the sample files the "
                      "time it took to draw them)."]
    if p.get("guided_step_over_unguided"):
        lines += ["", f"A guided sampling step costs {p['guided_step_over_unguided']:.2f}x an unguided one (the same "
                      "samples and steps; the guidance gradient adds a classifier forward and backward)."]
    return lines


# ----------------------------------------------------------------------------------------------
# Circles and corners (Sec. 5.5, App. F)
# ----------------------------------------------------------------------------------------------

def circles_headline(r):
    """The one line a circles/corners run ends with: accuracy, bad and unguided fractions, time."""
    acc, bad = r["accuracy"], r["bad_fraction"]
    centre = f"centre square {100 * r['centre_fraction'][0]:.1f}%, " if r["data"] == "corners" else ""
    return (f"HEADLINE accuracy {100 * acc[0]:.1f}% +- {100 * acc[1]:.1f}% of samples in the unseen middle "
            f"(paper: 78% +- 8.7%), bad {100 * bad[0]:.1f}%, {centre}unconditional "
            f"{100 * r['unconditional']['accuracy']:.1f}%, {r['timings_s']['total_s'] / 60:.1f} min")


def circles_figures(out, r):
    """The plots of a circles/corners run, from the arrays kept in results.json."""
    c, f = r["config"], r["figures"]
    size, fig_dir = c["image_size"], os.path.join(out, "figures")
    h = f["heatmap"]
    classifier.plot_heatmap(h["xs"], h["ys"], h["p"], size, os.path.join(fig_dir, "classifier_heatmap.png"),
                            f"p({'right' if r['data'] == 'circles' else 'class 1, top right'} | circle at x, y), "
                            f"classifier 0, t = {c['heatmap_t']}")
    z = np.asarray(f["centre_z"], dtype=np.float64)
    evaluate.plot_centre_histogram(z, os.path.join(fig_dir, "centre_x_histogram.png"), size,
                                   f"circle centre x of guided samples, lambda = {c['lambdas']} ({c['runs']} runs)")
    if r["data"] == "corners":  # App. F: where the guided samples land in 2-D
        evaluate.plot_centre_heatmap(np.asarray(f["centre_cx"], float), np.asarray(f["centre_cy"], float), size,
                                     os.path.join(fig_dir, "centre_heatmap.png"),
                                     f"centres of guided samples, lambda = {c['lambdas']} ({c['runs']} run"
                                     f"{'s' if c['runs'] > 1 else ''})")


def circles_table(r):
    """The headline table of a circles/corners run next to the paper's Sec. 5.5 numbers."""
    c, acc, bad = r["config"], r["accuracy"], r["bad_fraction"]
    pa, pb = PAPER_CIRCLES["accuracy"], PAPER_CIRCLES["bad"]
    runs = f"{c['runs']} run{'s' if c['runs'] > 1 else ''}"
    corners = [f"| centre fraction (App. F): one circle with z_x AND z_y in [0.2, 0.8] | "
               f"{_pct(r['centre_fraction'][0])} +- {_pct(r['centre_fraction'][1])} "
               f"(unconditional {_pct(r['unconditional']['centre_fraction'])}) | (Fig. 9: a heatmap, no number) |"]
    return [
        "| quantity | this run | paper (Sec. 5.5) |", "|---|---|---|",
        f"| accuracy: samples with one circle in the unseen middle z in [0.2, 0.8] | {_pct(acc[0])} +- "
        f"{_pct(acc[1])} ({runs}) | {100 * pa[0]:.0f}% +- {_pct(pa[1])} (10 runs) |",
        f"| bad fraction: 0 or >= 2 circles | {_pct(bad[0])} +- {_pct(bad[1])} | {_pct(pb[0], 2)} +- {_pct(pb[1], 2)} |",
        f"| unconditional accuracy (leakage) | {_pct(r['unconditional']['accuracy'])} | (not reported) |",
        *(corners if r["data"] == "corners" else []),
        f"| lambda ({'left, right' if r['data'] == 'circles' else 'quadrants 0-3'}) | {r['lambdas']} | "
        f"{[30] * len(r['lambdas'])} |",
        f"| sampling | {c['sampler']}, {c['sample_respacing']} steps, {c['n_samples']} samples | ancestral, "
        f"64 steps (released config), 1000 samples |",
        f"| runtime | {r['timings_s']['total_s'] / 60:.1f} min on {r.get('device', 'this machine')} | (GPU) |",
    ]


def circles_report(r):
    """report.md of a circles/corners run: the table next to the paper's figures, then the pictures."""
    c = r["config"]
    title = ("# Circles: zero-shot interpolation (paper Section 5.5)" if r["data"] == "circles" else
             "# Corners: interpolation on two variables (paper App. F, on the circles of Section 5.5)")
    per_run = ", ".join(_pct(x["accuracy"]) for x in r["per_run"])
    lines = [
        title + (" with a class-conditional DDPM (App. J)" if c["guidance"] == "free" else ""), "",
        f"Command: `{r.get('command', 'python train.py')}` (full configuration in `config.json`, numbers in "
        f"`results.json`; `python report.py {r.get('out', 'OUT')}` rebuilds this report).", "",
        *circles_table(r), "",
        f"Per run: {per_run}. Classifier heatmap: mean p(right) over the middle band "
        f"{r['heatmap']['middle_mean_p']:.2f}, transition width {r['heatmap']['transition_width']} columns.",
        *sweep_table(r), *bad_kinds_table(r), *regressor_table(r), *memorization_table(r.get("memorization"), circles=True),
        *profile_table(r), "", "## Figures", "",
        f"Training data (centres only in the outer {'bands' if r['data'] == 'circles' else 'corner squares'}): "
        "![training data](figures/training_data.png)", "",
        *(["Centres of the guided samples in 2-D (App. F): ![centres](figures/centre_heatmap.png)", ""]
          if r["data"] == "corners" else []),
        f"Multi-guided samples, lambda = {c['lambdas']}: ![guided](samples/guided_run0.png)", "",
        "Unconditional samples: ![unconditional](samples/unconditional.png)", "",
        "Centre x of the guided samples: ![histogram](figures/centre_x_histogram.png)", "",
        "Classifier p(right | circle at x, y) (Fig. 7b): ![heatmap](figures/classifier_heatmap.png)", "",
        "Training losses: ![DDPM](logs/ddpm/loss.png) ![classifier](logs/classifier0/loss.png)", "",
    ]
    return "\n".join(lines)


def bad_kinds_table(r):
    """report.md lines: why samples go wrong (evaluate.bad_kinds), guided run 0 against the unguided samples."""
    k = r.get("bad_kinds")
    if not k:
        return []
    names = list(k["guided_run0"])
    lines = ["", "## Why samples go wrong", "", "Two kinds are the paper's bad samples (0 or >= 2 circles); the "
             "other single-blob kinds still count for the accuracy but are not clean discs.", "",
             "| kind | multi-guided (run 0) | unguided |", "|---|---|---|"]
    return lines + [f"| {n} | {k['guided_run0'][n]} | {k['unconditional'][n]} |" for n in names]


def sweep_table(r):
    """report.md lines: accuracy (and, for corners, the centre fraction) against lambda, per guidance."""
    if not r["lambda_sweep"]:
        return []
    free = r["config"]["guidance"] == "free"
    keys = ["accuracy", "bad_fraction"] + (["centre_fraction"] if r["data"] == "corners" else [])
    names = {"accuracy": "accuracy", "bad_fraction": "bad fraction", "centre_fraction": "centre fraction"}
    head = [f"classifier: {names[k]}" for k in keys] + ([f"classifier-free: {names[k]}" for k in keys] if free else [])
    lines = ["", "## Guidance strength", "",
             "Every class gets the same lambda. Classifier: Eq. 2 with the noisy classifier" +
             (" on the DDPM's null-label (unconditional) half; classifier-free: App. J, eps(null) + "
              "sum_m lambda (eps(y_m) - eps(null)) of the same network (lambda = 0: both unguided)." if free else "."),
             "", "| lambda | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for s in r["lambda_sweep"]:
        cells = [s[k] for k in keys] + ([s["free"][k] for k in keys] if free else [])
        lines.append(f"| {s['lam']:g} | " + " | ".join(_pct(x) for x in cells) + " |")
    return lines


def memorization_table(m, circles):
    """report.md lines: App. H, guided run 0 against the training set (evaluate.memorization_check)."""
    if not m:
        return []
    lines = ["", "## Memorization (App. H)", "",
             f"Guided run 0: the first {m['n']} samples against all {m['n_train']} training images. The paper looks "
             "at CLIP neighbours; CLIP is not available offline, so the neighbours are taken in pixel space "
             "([0, 1], Euclidean) and in the guidance classifier's features (t = 0).", "",
             "| measure | value |", "|---|---|",
             f"| near-copies: nearest training image with pixel cosine > {m['copy_cosine']} | "
             f"{_pct(m['near_copy_fraction'])} |",
             f"| median cosine to the nearest training image | {m['median_pixel_cosine']:.3f} |",
             f"| feature-space neighbour = pixel-space neighbour | {_pct(m['feature_agrees_with_pixel'])} |"]
    if circles:
        lines += [f"| circle centre on a training centre (same pixel), all samples | "
                  f"{_pct(m['on_training_centre_fraction'])} |",
                  f"| ... among samples with one circle | {_pct(m['on_training_centre_of_one_circle'])} |",
                  f"| middle-band samples on a training centre / near-copies | {m['middle_on_training_centre']} / "
                  f"{m['middle_near_copy']} of {m['n_middle']} |",
                  f"| median cosine to the nearest training image, middle-band samples | "
                  f"{m['median_pixel_cosine_middle']:.3f} |"]
    return lines + ["", "Samples (top row) above their nearest training image in pixel space (middle) and in the "
                        "classifier's features (bottom): ![pairs](figures/memorization_pairs.png)"]


def regressor_table(r):
    """report.md lines: App. K, the regressor's z_x of guided run 0 against the detector's, vs uniform."""
    g = r.get("regressor")
    if not g:
        return []
    rows = [("regressor z_x, every sample", g["regressor"]), ("detector z, samples with one circle", g["detector"])]
    lines = ["", "## A regressor as the evaluator (App. K)", "",
             f"Guided run 0 ({g['n']} samples, {g['n_one_circle']} with one circle). Histogram (100 bins) against "
             "uniform; unit = bins over [0, 1], data = bins over [min, max] (the released code's range).", "",
             "| score | MSE (unit) | KLD (unit) | MSE (data) | KLD (data) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['unit']['mse']:.3f} | {m['unit']['kld']:.3f} | {m['data']['mse']:.3f} | "
              f"{m['data']['kld']:.3f} |" for name, m in rows if m is not None]
    lines += ["", f"Mean |regressor z_x - detector z| on one-circle samples: {g['mean_abs_difference']:.3f} image widths; "
                  f"regressor z_x in [0.2, 0.8]: {_pct(g['regressor_middle_fraction'])} of all samples."]
    return lines


# ----------------------------------------------------------------------------------------------
# Real images (Sec. 5.1-5.3)
# ----------------------------------------------------------------------------------------------

def real_images_intro(r):
    """The title, the smoke-scale warning and the training set of a real-image run."""
    c, attr = r["config"], r["attr"]
    smoke = not (c["unet"] == "paper" and c["steps"] >= 250000)
    source = ("CelebA's" if c["data"] == "celeba" else
              f"{r['class_names'][0]} vs {r['class_names'][1]} (--data {c['data']}):")
    lines = [f"# Zero-shot interpolation of {source} {attr} (paper Sections 5.1-5.3)", ""]
    if smoke and c["data"] == "celeba":
        lines += ["**Smoke scale.** This run used a reduced configuration (U-Net '" + c["unet"] + f"', {c['steps']} "
                  f"DDPM steps, {c['n_samples']} samples): it checks that the pipeline runs end to end; it is NOT a "
                  "reproduction. The paper's numbers need `--paper` on a GPU.", ""]
    elif smoke:
        lines += [f"CPU preset: U-Net '{c['unet']}' at {c['image_size']}x{c['image_size']}, {c['steps']} DDPM steps, "
                  f"{c['n_samples']} samples. More steps (`--steps`) or a GPU give sharper samples.", ""]
    judge = r["evaluation_classifier"]
    return lines + [
        f"Command: `{r.get('command', 'python train.py')}` (configuration in `config.json`, numbers in `results.json`, "
        f"the filter in `{r['filter_out']}`).", "",
        f"Training set: {sum(r['training_per_class'])} extreme images, {r['training_per_class']} per class "
        f"{r['class_names']}. Judge: filter_data.py's evaluation classifier (test accuracy "
        f"{judge['test_accuracy']:.3f}, temperature {judge['temperature']:.3f}"
        f"{'' if not judge.get('kept_t1') else '; temperature scaling not used: ' + judge['kept_t1']}). "
        f"Score = its calibrated p({attr}).", ""]


def plot_scores_vs_data(r, path):
    """The judge's p(class 1): the real training images (grey) and the kept extremes (outline) behind the
    guided and the unguided samples, as densities over [0, 1] (50 bins); dashed lines at 0.2 and 0.8."""
    f, rows = r.get("filter"), {row["name"]: row for row in r["rows"]}
    fig = plumbing.new_figure(7.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 51)
    if f:
        ax.hist(f["data_scores"], bins=bins, density=True, color="0.8", label=f"real training images ({f['n_train']})")
        ax.hist(f["kept_scores"], bins=bins, density=True, histtype="step", color="0.4", lw=1.2,
                label=f"kept by the filter ({f['n_kept']})")
    for name, colour in (("unconditional", "tab:orange"), ("guided_run0", "tab:blue")):
        if name in rows:
            ax.hist(rows[name]["scores"], bins=bins, density=True, histtype="step", lw=2, color=colour,
                    label=rows[name]["label"])
    for edge in (0.2, 0.8):
        ax.axvline(edge, color="green", ls="--", lw=1)
    ax.set_xlabel(f"p({r['attr']}) by the evaluation classifier")
    ax.set_ylabel("density")
    ax.set_title(f"{r['class_names'][0]} (0) to {r['class_names'][1]} (1): data, kept extremes, samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def filter_lines(r):
    """report.md lines: what the filter kept, and how much of the real middle band survived."""
    f = r.get("filter")
    if not f:
        return []
    survival = "no training image scored in the middle band" if f["mild_survival"] is None else (
        f"{f['n_mild_kept']} of the {f['n_mild']} training images the judge scores in [0.2, 0.8] survived "
        f"({_pct(f['mild_survival'])}); they are {_pct(f['mild_fraction_of_kept'])} of the kept set")
    return [f"Filter (Sec. 4.3, App. D.1): kept {f['n_kept']} of {f['n_train']} training images "
            f"({_pct(f['kept_fraction'])}); {survival}.", "",
            "The judge's scores of the real data, the kept extremes and the samples: "
            "![scores vs data](figures/scores_vs_data.png)", ""]


def real_images_report(r):
    """report.md of a real-image run: the comparison of histograms with the paper's, then the pictures."""
    c, attr = r["config"], r["attr"]
    subset = "60k, the paper's full extreme set" if c["subset"] in ("all", "auto") else c["subset"]
    celeba = c["data"] == "celeba"
    lines = real_images_intro(r) + filter_lines(r) + [
        "Histogram of the scores, 100 bins, against uniform (App. B); lower is better. `data`: bins over "
        "[min, max] of the scores, as the released code (and so, presumably, the paper's numbers); `unit`: "
        "bins over [0, 1], as the text describes.", "",
        f"| {attr} scores of | n | MSE (data) | KLD (data) | MSE (unit) | KLD (unit) | in [0.2, 0.8] |"
        + (f" paper MSE / KLD ({subset}) |" if celeba else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if celeba else "")]
    for row in r["rows"]:
        paper = "-" if row["paper"] is None else f"{row['paper'][0]:.3f} / {row['paper'][1]:.3f}"
        lines.append(f"| {row['label']} | {row['n']} | {row['data']['mse']:.3f} | {row['data']['kld']:.3f} | "
                     f"{row['unit']['mse']:.3f} | {row['unit']['kld']:.3f} | {_pct(row['middle_fraction'])} |"
                     + (f" {paper} |" if celeba else ""))
    if celeba:
        lines += ["", "Paper: Sec. 5.1 (guided 0.13 / 0.61, training 0.56 / 3.17, unconditional 0.64 / 3.5; lambda = "
                      "30,30, 10k samples, 250 steps), Table 1 for the 30k, 10k and 5k subsets"
                      f"{'' if r['rows'][0]['paper'] else f' (CelebA Smiling only: none for {attr})'}."]
    lines += digits_lines(r) if r.get("digits") else []
    lines += ["", f"This run: {c['sampler']}, {c['sample_respacing']} steps, {c['n_samples']} samples.",
              *memorization_table(r.get("memorization"), circles=False), *profile_table(r), "", "## Figures", ""]
    lines += [f"Scores of the {row['label']}: ![{row['name']}](figures/hist_{row['name']}.png)" + "\n"
              for row in r["rows"]]
    lines += ["Multi-guided samples: ![guided](samples/guided_run0.png)", "",
              "Unconditional samples: ![unconditional](samples/unconditional.png)", "",
              "Training images (up to 32 per class, class 0 first): ![training](figures/training_data.png)", "",
              "Training losses: ![DDPM](logs/ddpm/loss.png) ![classifier](logs/classifier0/loss.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Digits (--data digits): the exact slant of every sample (real_images.digits_results)
# ----------------------------------------------------------------------------------------------

DIGIT_SETS = (("guided_run0", "multi-guided", "tab:blue"), ("unconditional", "unguided", "tab:orange"),
              ("training", "training (kept)", "0.3"))


def _finite(values):
    return np.asarray([v for v in values if v is not None], dtype=np.float64)


def digits_figures(out, r):
    """The slant histogram of the samples against the real digits' (band shaded), and the CDF-mapped slant
    of each set against uniform (App. B)."""
    g, sets = r["digits"], r["digits"]["sets"]
    real = _finite(sets["real"]["slants"])
    fig = plumbing.new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(np.percentile(real, 0.5) - 0.1, np.percentile(real, 99.5) + 0.1, 51)
    ax.hist(np.clip(real, bins[0], bins[-1]), bins=bins, density=True, color="0.82", label=f"real digits ({len(real)})")
    ax.axvspan(*g["band"], color="tab:green", alpha=0.15, label="middle band (30th-70th percentile)")
    for name, label, colour in DIGIT_SETS:
        v = _finite(sets[name]["slants"])
        ax.hist(np.clip(v, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=2 if name != "training" else 1,
                color=colour, label=f"{label} ({len(v)}): {_pct(sets[name]['band_fraction'])} in the band")
    ax.set_xlabel("slant = -mu11 / mu02 (right lean > 0; clipped to the axis)")
    ax.set_ylabel("density")
    ax.set_title("slant of the samples against the real digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    plumbing.save_figure(fig, os.path.join(out, "figures", "slant_histogram.png"))
    real_sorted = np.sort(real)
    for name, label, _ in DIGIT_SETS:
        u = np.searchsorted(real_sorted, _finite(sets[name]["slants"]), side="right") / len(real_sorted)
        if len(u):
            evaluate.plot_histogram_vs_uniform(u, os.path.join(out, "figures", f"slant_uniform_{name}.png"),
                                               f"slant percentile among the real digits, {label} samples")


def digits_table(r):
    """report.md lines: each sample set measured by its slant and by the digit classifier."""
    g = r["digits"]
    lines = ["| set | n | in the middle band | ... background removed | background level | slant MSE / KLD to "
             "uniform | confidently digits | classes | nearest real / training digit | near-copies |", "|---" * 10 + "|"]
    for name in ["real", "training", "unconditional", *[row["name"] for row in r["rows"]
                                                       if row["name"].startswith(("guided", "sweep"))]]:
        m = g["sets"][name]
        near = (f"{m['nearest_real_median']:.2f} / {m['nearest_training_median']:.2f} | {_pct(m['near_copy_fraction'])}"
                if "nearest_real_median" in m else "- | -")
        hist = f"{m['unit']['mse']:.3f} / {m['unit']['kld']:.3f}" if m["unit"] else "-"
        label = {"real": "real digits (all)", "training": "training (kept)"}.get(name, name)
        lines.append(f"| {label} | {m['n']} | {_pct(m['band_fraction'])} | {_pct(m['band_fraction_dehazed'])} | "
                     f"{m['background']:.1f} | {hist} | {_pct(m['confident_fraction'])} | {m['classes']} | {near} |")
    return lines


def digits_lines(r):
    """report.md lines of a digits run: the filter by the exact slant, the table, the lambda sweep and its
    pick, the grids sorted by slant with the band's tiles, the histograms."""
    g, c = r["digits"], r["config"]
    f, clf, pick = g["filter"], g["classifier"], g["lambda_pick"]
    lo, hi = g["band"]
    lines = ["", "## Digits: the slant, measured exactly", "",
             f"Slant = -mu11 / mu02 of each image (digits.py; right lean > 0), samples as uint8. Middle band: the "
             f"30th-70th percentile of the real digits' slant, [{lo:.4f}, {hi:.4f}]; labels: slant above the median "
             f"{g['median']:.4f}. Histograms vs uniform map the slant to [0, 1] by the real digits' CDF (its "
             "percentile), so uniform = every slant as often as among the real digits (App. B, 100 bins). Background "
             "level: each image's 10th-percentile grey value, averaged (real digits: 0; a grey haze pulls the slant "
             "towards 0, into the band, so the band fraction with each image's background removed is shown too).", "",
             f"Filter (by the exact slant): kept {f['n_kept']} of {f['n_train']} training digits "
             f"({_pct(f['kept_fraction'])}), {f['kept_per_side']} per side; {_pct(f['band_survival'])} of the training "
             f"digits in the middle band survived; the band is {_pct(f['band_fraction_of_kept'])} of the kept set "
             f"(|c| < 0.2: {_pct(f['mild_fraction_of_kept'])}). Kept digits per class 0-9: {f['kept_per_digit']} "
             f"(training split: {f['train_per_digit']}): slant is entangled with the class.", "",
             f"Digit-likeness: a ten-class classifier (SmallCNN, {clf['steps']} steps on {clf['n_train']} real digits, "
             f"test accuracy {clf['test_accuracy']:.3f}); a sample is confidently a digit when its top class has "
             f"p > {clf['confident']}; a class appears when at least 1% of the samples are confidently it. Nearest "
             f"digit: median pixel distance ([0, 1] pixels) to the nearest real digit / kept training digit; near-"
             f"copies: nearest training digit at pixel cosine > 0.95 (App. H). For scale, the {g['n_held_out']} "
             f"held-out real digits (never trained on): {g['held_out_nearest_training_median']:.2f} to the kept set, "
             f"{_pct(g['held_out_near_copy_fraction'])} near-copies: at 16 x 16 two different real digits are often "
             "that close.", "", *digits_table(r), ""]
    lines += ["### Guidance strength (Sec. 5.3)", "", "| lambda | in the middle band | artefacts (1 - confident) | "
              "classes | slant MSE / KLD to uniform | background |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['lam']:g} | {_pct(s['band_fraction'])} | {_pct(s['artefacts'])} | {s['classes']} | "
              f"{s['unit']['mse']:.3f} / {s['unit']['kld']:.3f} | {s['background']:.1f} |" if s["unit"] else
              f"| {s['lam']:g} | {_pct(s['band_fraction'])} | {_pct(s['artefacts'])} | {s['classes']} | - | - |"
              for s in g["lambda_sweep"]]
    verdict = (f"fills the middle; the fewest artefacts measured: lambda = {pick['least_artefacts']:g}" if pick["fills"]
               else "NO lambda fills the middle; the largest band fraction")
    lines += ["", f"Picked by the paper's rule (the least artefacts that still fills the middle, Sec. 5.3; measured: "
                  f"{pick['rule']}): lambda = {pick['lam']:g} ({verdict}). The run's own lambda: {c['lambdas']}.", ""]
    lines += ["### Samples sorted by slant", "",
              "Most left-leaning first, 8 per row; red frames: in the middle band. Slant histograms: "
              "![slant](figures/slant_histogram.png)", ""]
    for name, m in g["sets"].items():
        if m.get("grid") is not None or name.startswith(("guided", "sweep", "unconditional")):
            where = (f"tiles {m['grid']['first']}-{m['grid']['last']} of {m['grid']['n']} lie in the middle band"
                     if m.get("grid") else "no tile lies in the middle band")
            lines.append(f"{name} ({where}): ![{name}](figures/{name}_by_slant.png)" + "\n")
    lines += [f"Slant percentile vs uniform, {label}: ![{name}](figures/slant_uniform_{name}.png)" + "\n"
              for name, label, _ in DIGIT_SETS]
    return lines


def main(argv=None):
    parser = plumbing.OneLineParser(description="Rebuild a run's report.md and figures from its results.json.")
    parser.add_argument("run", help="a run folder of train.py (holding results.json)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run, "results.json")):
        parser.error(f"{args.run} holds no results.json; give the --out folder of a finished train.py run")
    try:
        render(args.run)
    except KeyError as e:  # written by another version of train.py, or edited by hand
        parser.error(f"{os.path.join(args.run, 'results.json')} lacks the key {e}; rerun train.py to rebuild it")
    print(f"report: {os.path.join(args.run, 'report.md')}")


if __name__ == "__main__":
    plumbing.guard(main)
