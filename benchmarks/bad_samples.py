"""Why circles samples go bad: each sample's kind along the sampling chain, and across training.

A bad sample (Sec. 5.5: no circle, or two or more) is decided somewhere in the reverse chain. At
every sampling step the model holds a guess of the clean image, x0_hat = pred_x0(x_t, t) (Eq. 4
inverted, clipped to [-1, 1]); this script sorts that guess with evaluate.bad_kind at every step.
For each run folder given (a `train.py --data circles` run: ddpm.pt, classifier0.pt, config.json)
it draws --n-samples samples unguided and multi-guided with the run's lambdas, and reports:

    final      the kinds of the finished samples (report.md's "Why samples go wrong");
    per step   the share of x0_hat with no circle, one, and two or more;
    went bad   for each finished bad sample, the chain step t (original index, T = the run's) after
               which its x0_hat never again held exactly one circle, grouped as early (t >= 2T/3),
               middle, late (t < T/3), or "never one" (no step of its chain showed one circle).

Run folders given in order of training (e.g. 600, 950 and 3000 DDPM steps of one seed) show the
training axis. Writes OUT/bad_samples.json and OUT/bad_samples.png (share of x0_hat with 0 / 1 / 2+
circles against t, one panel per run and guidance), and prints a table.

Run:  python benchmarks/bad_samples.py runs/circles --out runs/bad_samples
      python benchmarks/bad_samples.py runs/c600 runs/circles runs/c3000 --out runs/bad_samples --overwrite
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ddpm  # noqa: E402
import evaluate  # noqa: E402
import multiguide  # noqa: E402
import plumbing  # noqa: E402

COUNTS = ("no circle", "one circle", "two or more")  # what x0_hat holds at a step
PHASES = ("early", "middle", "late", "never one")


def circle_count(kind):
    """0, 1 or 2 (two or more) circles of at least the minimum area, from a bad_kind label."""
    return {evaluate.BAD_KINDS[0]: 0, evaluate.BAD_KINDS[1]: 2}.get(kind, 1)


def phase(t, T):
    """early (t >= 2T/3), middle, late (t < T/3) part of a chain of T original steps."""
    return "early" if t >= 2 * T / 3 else ("late" if t < T / 3 else "middle")


@torch.no_grad()
def chain_kinds(model, d, n, lambdas, classifier, respacing, seed, device):
    """Sample n images as multiguide.sample does (one generator draws x_T, then each step's noise) and
    sort x0_hat at every step. Returns (kinds (steps, n) of str, original t of each step, final uint8)."""
    net, cond_fn = multiguide.guided_model(model, classifier, lambdas)
    diffusion = ddpm.diffusion_from_config(d, respacing)
    g = torch.Generator(device=device).manual_seed(seed)
    C, S = model.config["in_channels"], model.config["image_size"]
    x = torch.randn((n, C, S, S), generator=g, device=device)
    kinds, ts = [], []
    for i in range(diffusion.num_timesteps - 1, -1, -1):
        t = torch.full((n,), i, dtype=torch.long, device=device)
        z = torch.randn(x.shape, generator=g, device=device)
        out = diffusion.p_sample(net, x, t, cond_fn=cond_fn, noise=z)
        x = out["sample"]
        guess = plumbing.to_uint8(out["pred_x0"])
        kinds.append([evaluate.bad_kind(image) for image in guess])
        ts.append(int(diffusion.model_timesteps(t[:1]).item()))
    return np.array(kinds), ts, plumbing.to_uint8(x)


def summarize(kinds, ts, final, T):
    """The numbers of one chain: final kinds, the share of each COUNTS per step, when bad samples went bad."""
    counts = np.vectorize(circle_count)(kinds)                       # (steps, n) in {0, 1, 2}
    per_step = {name: [float((row == c).mean()) for row in counts] for c, name in enumerate(COUNTS)}
    final_kinds = evaluate.bad_kinds(final)
    went_bad = dict.fromkeys(PHASES, 0)
    for j in np.flatnonzero(counts[-1] != 1):                       # finished samples with 0 or 2+ circles
        ones = np.flatnonzero(counts[:, j] == 1)
        went_bad["never one" if not len(ones) else phase(ts[ones[-1]], T)] += 1
    return dict(final=final_kinds, t=ts, per_step=per_step, went_bad=went_bad, n=int(counts.shape[1]))


def plot(results, path):
    """One row per run, one column per guidance: share of x0_hat with 0 / 1 / 2+ circles against t."""
    fig = plumbing.new_figure(9.0, 2.8 * len(results))
    for row, (run, r) in enumerate(results.items()):
        for col, g in enumerate(("unguided", "guided")):
            s = r[g]
            ax = fig.add_subplot(len(results), 2, 2 * row + col + 1)
            for name in COUNTS:
                ax.plot(s["t"], s["per_step"][name], label=name)
            ax.set_xlim(max(s["t"]), 0)                               # the chain runs from t = T to 0
            ax.set_ylim(0, 1)
            ax.set_title(f"{os.path.basename(os.path.normpath(run))} ({r['ddpm_steps']} DDPM steps): {g}", fontsize=9)
            if row == len(results) - 1:
                ax.set_xlabel("chain step t (x0_hat at t)")
            if col == 0:
                ax.set_ylabel("share of samples")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def run_folder(folder, args, device):
    """Both chains (unguided, guided) of one run folder."""
    cfg = plumbing.read_json(os.path.join(folder, "config.json"), "run config")
    lambdas = plumbing.float_list(args.lambdas or cfg["lambdas"])
    model, d, clf = multiguide.load_models(os.path.join(folder, "ddpm.pt"), os.path.join(folder, "classifier0.pt"),
                                           device=device)
    respacing = args.sample_steps or cfg["sample_respacing"]
    out = {}
    for name, lam in (("unguided", [0.0] * len(lambdas)), ("guided", lambdas)):
        kinds, ts, final = chain_kinds(model, d, args.n_samples, lam, clf, respacing, args.seed, device)
        out[name] = dict(summarize(kinds, ts, final, d["T"]), lambdas=lam)
    return dict(out, ddpm_steps=cfg["steps"], sample_steps=respacing)


def table(results):
    """Printed lines: per run and guidance, the final kinds and when the bad samples went bad."""
    lines = [f"{'run':28s} {'guidance':9s} {'no circle':>9s} {'two+':>5s} {'speck':>5s} {'good':>5s}   went bad: "
             + " / ".join(PHASES)]
    for run, r in results.items():
        for g in ("unguided", "guided"):
            f, w = r[g]["final"], r[g]["went_bad"]
            lines.append(f"{os.path.basename(os.path.normpath(run)) + ' (' + str(r['ddpm_steps']) + ' steps)':28s} "
                         f"{g:9s} {f[evaluate.BAD_KINDS[0]]:9d} {f[evaluate.BAD_KINDS[1]]:5d} "
                         f"{f[evaluate.BAD_KINDS[3]]:5d} {f['good']:5d}   " + " / ".join(str(w[p]) for p in PHASES))
    return lines


def check_run_flags(p, args, run, cfg):
    """--lambdas and --sample-steps against one run, before any work: one weight per class of its
    classifier (as many as the run's own lambdas), and a chain of at least 2 of its T steps."""
    if args.lambdas:
        lambdas = plumbing.vet(p, "--lambdas", plumbing.float_list, args.lambdas)
        classes = len(plumbing.float_list(cfg.get("lambdas", "")))
        if len(lambdas) != classes:
            p.error(f"--lambdas wants one weight per class ({classes} for RUN {run}), got {args.lambdas!r}")
    if args.sample_steps:
        plumbing.vet(p, f"--sample-steps for RUN {run}", ddpm.check_chain, cfg.get("T", 1000), args.sample_steps)


def parse_args(argv=None):
    p = plumbing.OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="train.py circles run folders (ddpm.pt, classifier0.pt)")
    # "" stands for the run's own value; the help says so in words (the formatter shows no empty default)
    p.add_argument("--lambdas", default="", help="guidance weights, one per class (default: each run's --lambdas)")
    p.add_argument("--sample-steps", default="", help="respaced sampling steps: N, n1,n2,... or ddimN (default: each "
                                                      "run's --sample-respacing)")
    plumbing.add_flags(p, "n_samples", "seed", "device", "threads", "out", "overwrite")
    args = p.parse_args(argv)
    for run in args.runs:
        for name in ("config.json", "ddpm.pt", "classifier0.pt"):
            if not os.path.isfile(os.path.join(run, name)):
                p.error(f"RUN {run}: no {name}; expected a train.py --data circles run folder")
        cfg = plumbing.read_json(os.path.join(run, "config.json"), "run config")
        data = cfg.get("data") if isinstance(cfg, dict) else None
        if data not in ("circles", "corners"):
            p.error(f"RUN {run}: a --data {data} run; the circle detector sorts circles and corners runs only")
        check_run_flags(p, args, run, cfg)
    plumbing.check_out_folder(args.out)
    plumbing.refuse_overwrite(args.out, ["bad_samples.json", "bad_samples.png"], args.overwrite)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = plumbing.check_device(args.device)
    plumbing.set_threads(args.threads)
    results = {run: run_folder(run, args, device) for run in args.runs}
    os.makedirs(args.out, exist_ok=True)
    plumbing.write_json(dict(runs=results, n_samples=args.n_samples, seed=args.seed),
                        os.path.join(args.out, "bad_samples.json"))
    plot(results, os.path.join(args.out, "bad_samples.png"))
    print("\n".join(table(results)))
    print(f"wrote {os.path.join(args.out, 'bad_samples.json')} and bad_samples.png")


if __name__ == "__main__":
    plumbing.guard(main)
