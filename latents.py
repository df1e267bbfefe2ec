"""latents.py -- the DDIM latents of real images: invert them, interpolate between two, edit one.

What this file is
    DDIM with eta = 0 (Song et al. 2021, Eq. 12) is a deterministic map between a clean image x_0
    and a noisy "latent" x_L at chain level L: ddpm.Diffusion.ddim_invert runs it up, and
    sample_loop(sampler="ddim", eta=0, start_t=L) runs it down. The paper uses these latents twice:

    App. M  interpolation: invert two real images, interpolate between their latents (slerp), and
            decode every point with DDIM eta = 0. On circles the question is the paper's own: does a
            curve from a left-circle latent to a right-circle latent decode to circles that cross the
            middle band the model never saw? We compare lerp, slerp and ProbGEORCE's likely
            interpolants (interpolants.py): S = -log chi^2_d(||z||^2), exact at x_T where the prior is
            N(0, I), with lam in {0.1, 0.5, 1, 10} and N = 10 as its authors use for images, and the
            score variant (S from eps_theta) at t ~ T/2, the level where its authors interpolate for
            Stable Diffusion (their released code). Both inversion levels are run.
    App. N  attribute editing, as the paper does it: DDIM-invert a left-circle image with half the
            training steps (T_inv = T/2 steps of the full chain: 2000 of 4000 there), then denoise by
            DDIM with noise injection eta_t = t / T_inv, decaying linearly from 1 at t = T_inv, under
            regular (single-class) classifier guidance of strength 30 toward the target class
            ("--guide single": lambda = 30 on the right-circle class, 0 on the other, Sec. 2.2).
            "--guide multi" is our variant: multi-guidance (lambda = 30 on both classes, Eq. 2).
            Where do the circles end up?

Conventions
    Levels are chain indices of the decoding chain (interp: --sample-steps, default 50 of T = 1000;
    "half" is the kept step nearest T/2: index 25, original step 510; edit: all T steps by default,
    "half" is index T/2). invert(x, L) runs L inversion steps
    (0 .. L-1; step 0 treats the clean image as level 0, the usual approximation) and decode(z, L)
    runs L + 1 DDIM steps (L .. 0, the last returning x_0-hat), so decode(invert(x)) ~ x is not exact
    even for a perfect ODE solver; the reconstruction error is reported. The CLI inverts on a finer
    chain (--invert-steps, default 250; edit: all T) that also keeps the decoder's level, so the latent
    lands on the same noise level (inversion_chain: a 50-step inversion lost half of the circles at t ~ T/2).
    Decoded frames are scored as the 8-bit images they are saved as. A curve with N intervals
    ("--frames N") has N + 1 points; its two ends are the same for every method (the two inverted
    images), so they are decoded once.

Metrics of a curve (interp; each averaged over pairs, per-frame ones over the N - 1 interior frames)
    chi^2 log-lik  mean log chi^2_d(||z||^2) of the interior latents (the prior S assumes; exact at x_T only)
    NLL            the variational bound of Eq. 9, bits/dim, of each decoded frame of the first
                   --nll-pairs pairs (default 10) over a 100-step respaced chain (ddpm.Diffusion.calc_bpd_loop;
                   tests/test_latents.py checks it on a respaced chain against float64)
    one circle / middle band   evaluate.circle_stats of each interior frame (middle: z in [0.2, 0.8])
    monotone       every frame (ends included) has one circle and centre x never steps back > 0.5 px
    largest jump   the largest distance in pixels between the centres of consecutive one-circle frames
    energy         sum_i ||x_{i+1} - x_i||^2 of the decoded frames in [-1, 1] (ProbGEORCE's smoothness)

Run it (2 CPU cores, the circles checkpoint of `python train.py --data circles`)
    python latents.py interp --ddpm runs/circles/ddpm.pt --out runs/latents_interp
        # 18 min measured with other jobs on the cores (load ~8): decoding 6.5 min, NLL 8 min, score
        # curves 1.7 min; --pairs 10, --nll-pairs 5 or --no-score shrink it
    python latents.py edit --ddpm runs/circles/ddpm.pt --classifier runs/circles/classifier0.pt \
        --out runs/latents_edit     # App. N: T = 1000, 500 inversion steps, 3 decodings of 501 steps:
        # ~2.5 min for 32 images (measured 61 ms per DDIM step of 32 images, 102 ms guided, 2 cores);
        # --sample-steps 50 --invert-steps 250 (respaced, not the paper's) takes ~30 s
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from matplotlib.figure import Figure

import ddpm
import evaluate
import interpolants
import multiguide
import plumbing
import toy_circles

LAMBDAS = (0.1, 0.5, 1.0, 10.0)   # ProbGEORCE's lam for images (its authors' Stable Diffusion runs)
SCORE_LAMBDA = 1.0                # lam of the score variant (one value: it is the slow one)
BACK_TOL = 0.5                    # px a centre may step back and the path still counts as monotone


# ----------------------------------------------------------------------------------------------
# Levels, inversion, decoding
# ----------------------------------------------------------------------------------------------

def chain_level(diffusion, where):
    """The chain index of an inversion level: "T" (the last index, x_T) or a fraction f in (0, 1] of
    the original T ("half" = 0.5): the kept step nearest f T (the first one on a tie)."""
    if where == "T":
        return diffusion.num_timesteps - 1
    frac = 0.5 if where == "half" else float(where)
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"an inversion level is 'T', 'half' or a fraction in (0, 1], got {where!r}")
    kept = np.asarray(diffusion.timestep_map, dtype=np.float64)
    return int(np.argmin(np.abs(kept - frac * diffusion.original_num_steps)))


def inversion_chain(d, spec, t_model):
    """(diffusion, level) for inverting to ORIGINAL step t_model on a finer chain than the decoder's.

    The chain keeps the steps of respacing `spec` of the checkpoint's diffusion dict d, plus t_model
    itself, so the latent lands exactly on the decoder's level (both chains have the same abar
    there). Why finer: step 0 of an inversion treats the clean image as level 0 and jumps by the
    stride. Measured on 15 left circles (cpu preset, 3000 steps, inverted to t = 510 and decoded
    with 50 steps): a 50-step inversion lost the circle in 8 of them, 100 steps in 3, 250 in none
    (and q_sample(x, 510) decoded by the same 50 steps kept all 15).
    """
    kept = sorted(set(ddpm.space_timesteps(d["T"], spec)) | {int(t_model)})
    chain = ddpm.Diffusion(ddpm.get_betas(d["schedule"], d["T"]), learn_sigma=d["learn_sigma"], loss=d["loss"],
                           timesteps=kept, prediction=d.get("prediction", "eps"))
    return chain, kept.index(int(t_model))


def _batched(fn, x, batch):
    """fn applied to x in chunks of `batch` along dim 0, concatenated (the chunks run in order)."""
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def invert(model, diffusion, x0, level, batch=128):
    """DDIM inversion (eta = 0, no clipping) of clean images x0 (B, C, H, W) to chain level `level`."""
    return _batched(lambda x: diffusion.ddim_invert(model, x, start_t=0, stop_t=level), x0, batch)


def decode(model, diffusion, z, level, batch=128, stop_level=-1):
    """DDIM decoding (eta = 0, x_0-hat clipped) of latents z at chain level `level` down to
    stop_level (-1: the clean image). eta = 0 uses no randomness."""
    return _batched(lambda x: diffusion.sample_loop(model, x.shape, sampler="ddim", eta=0.0, noise=x, start_t=level,
                                                    stop_t=stop_level, progress=False), z, batch)


def app_n_eta(level):
    """App. N's noise schedule eta_t = t / T_inv, decaying linearly, for a decode from chain level L.

    An image inverted by L steps (invert: the clean image counts as level 0) is decoded by steps
    i = L .. 1, each from level i to level i - 1, then step 0 returns x_0-hat. Step i is the paper's
    t = i and T_inv = L: eta_i = i / L, 1 at the first step, 1 / L at step 1, the paper's values
    {t / T_inv : t = 1 .. T_inv} exactly; step 0 adds no noise whatever eta (ddim_step: abar_{-1} = 1).
    """
    return lambda i: i / level


def ddim_loop(model, diffusion, z, level, eta, cond_fn=None, generator=None):
    """DDIM from latents z at chain level `level` to clean images with a per-step eta(i).

    Each step draws its noise like ddpm's sample_loop (one randn of z's shape per step, from
    `generator`), so with a constant eta this IS sample_loop(sampler="ddim", eta, start_t=level).
    cond_fn: guidance on the score (ddim_step: eps <- eps - sqrt(1 - abar_t) g).
    """
    x = z
    for i in range(level, -1, -1):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        with torch.no_grad():  # a cond_fn turns gradients back on for its own backward pass
            x = diffusion.ddim_step(model, x, t, eta=eta(i), noise=noise, cond_fn=cond_fn)["sample"]
    return x


# ----------------------------------------------------------------------------------------------
# Curves between two latents, and the batch the decoder sees
# ----------------------------------------------------------------------------------------------

def score_grad(model, diffusion, level, device):
    """grad S = eps_theta(x, t) / sqrt(1 - abar_t) at chain index `level` (interpolants.score_regulariser),
    taking CPU batches (the curves live on the CPU) and handing back CPU tensors."""
    reg = interpolants.score_regulariser(model, diffusion, level)
    return lambda x: reg.grad_S(x.to(device)).cpu()


def latent_curves(a, b, n, lams=LAMBDAS, score=None):
    """Every curve from latent a to latent b with n intervals, on the CPU in a's dtype.

    Returns (curves, info): curves maps a method name to its (n + 1, *a.shape) points with
    curve[0] = a and curve[n] = b exactly; info maps each ProbGEORCE method to dict(iterations, stop).
    score: a grad S callable for the score variant (lam = SCORE_LAMBDA), or None to leave it out.
    """
    reg = interpolants.chi2_norm(a.numel())                 # S = -log chi^2_d(||z||^2), d = C H W
    curves = {"lerp": interpolants.lerp(a, b, n), "slerp": interpolants.slerp(a, b, n)}
    info = {}
    for lam in lams:
        name = f"probgeorce-chi2 lam={lam:g}"
        curves[name], out = interpolants.probgeorce(a, b, reg.grad_S, S=reg.S, n=n, lam=lam)
        info[name] = dict(iterations=out["iterations"], stop=out["stop"])
    if score is not None:
        name = f"probgeorce-score lam={SCORE_LAMBDA:g}"
        curves[name], out = interpolants.probgeorce_score(a, b, score, n=n, lam=SCORE_LAMBDA)
        info[name] = dict(iterations=out["iterations"], stop=out["stop"])
    return curves, info


def frame_batch(curves):
    """What the decoder sees for one pair: [a, b, interior of curve 1, interior of curve 2, ...],
    each shared end once: (2 + K (n - 1), ...) for K curves of n intervals."""
    first = next(iter(curves.values()))
    return torch.cat([first[:1], first[-1:], *[c[1:-1] for c in curves.values()]])


def frame_index(names, n):
    """For each curve name (in frame_batch's order) the positions of its n + 1 points in the batch."""
    return {name: np.array([0, *range(2 + k * (n - 1), 2 + (k + 1) * (n - 1)), 1])
            for k, name in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

def chi2_loglik(z):
    """log chi^2_d(||z_k||^2) per point of z (K, *shape), float64 (K,): -S of interpolants.chi2_norm."""
    return -interpolants.chi2_norm(z[0].numel()).S(z)


def centre_path(cx, cy, tol=BACK_TOL):
    """How a circle moves along the frames of one curve. cx, cy: per-frame centres, NaN where a frame
    does not hold exactly one circle. Returns dict(
        monotone        : every frame has one circle and cx never steps back by more than tol px
                          (non-decreasing, or non-increasing, up to tol),
        largest_jump_px : the largest distance between consecutive one-circle frames' centres
                          (frames without one circle are skipped; NaN with fewer than two),
        one_circle_frames).
    """
    cx, cy = np.asarray(cx, dtype=np.float64), np.asarray(cy, dtype=np.float64)
    ok = np.isfinite(cx)
    steps = np.diff(cx[ok])
    monotone = bool(ok.all() and (np.all(steps >= -tol) or np.all(steps <= tol)))
    jumps = np.hypot(steps, np.diff(cy[ok]))
    return dict(monotone=monotone, largest_jump_px=float(jumps.max()) if len(jumps) else float("nan"),
                one_circle_frames=int(ok.sum()))


def image_energy(frames):
    """sum_i ||x_{i+1} - x_i||^2 of frames (K, ...) in float64: the Euclidean energy of a decoded curve."""
    x = frames.double()
    return float(((x[1:] - x[:-1]) ** 2).sum())


def nll_bpd(model, diffusion_dict, images, steps="100", seed=0, batch=128, device="cpu"):
    """The variational bound of Eq. 9 for 8-bit images (N, S, S, 3), bits/dim, float64 (N,).

    The chain is the checkpoint's diffusion respaced to `steps` steps: its posteriors are those of
    the respaced process (betas recomputed from abar on the kept steps, ddpm.Diffusion), so the sum
    bounds -log p of that `steps`-step model. One noise draw per step and image, from one generator
    seeded with `seed`.
    """
    diffusion = ddpm.diffusion_from_config(diffusion_dict, steps)
    g = torch.Generator(device=device).manual_seed(seed)
    x = plumbing.to_tensor(images).to(device)
    return _batched(lambda xb: diffusion.calc_bpd_loop(model, xb, generator=g), x, batch).double().cpu().numpy()


# ----------------------------------------------------------------------------------------------
# App. M: interpolation between inverted images
# ----------------------------------------------------------------------------------------------

def choose_pairs(size, pairs, seed):
    """`pairs` (left, right) training images drawn with a seed: dict(left, right uint8 (M, S, S, 3),
    left_centres, right_centres (M, 2) as (x, y)). Drawn without replacement while there are enough."""
    data = toy_circles.make_circles(size, "train")
    rng = np.random.default_rng(seed)
    out = {}
    for side, label in (("left", 0), ("right", 1)):
        pool = np.flatnonzero(data["labels"] == label)
        pick = rng.choice(pool, pairs, replace=pairs > len(pool))
        out[side], out[f"{side}_centres"] = data["images"][pick], data["centres"][pick]
    return out


def _nan_to_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite_stat(fn, values):
    """fn over the finite values, or None when there are none (JSON has no NaN)."""
    v = np.asarray(values, dtype=np.float64)
    return float(fn(v[np.isfinite(v)])) if np.isfinite(v).any() else None


def interp_setting(model, d, pairs, where, args, device):
    """One inversion level: invert both images of every pair, build every curve, decode, score.

    Returns (summary dict for results.json, dict name -> uint8 frames of pair 0 for the strips,
    per-pair centre-x paths for the figure).
    """
    diffusion = ddpm.diffusion_from_config(d, args.sample_steps)
    level, n, M = chain_level(diffusion, where), args.frames, len(pairs["left"])
    sec = {}
    x = plumbing.to_tensor(np.concatenate([pairs["left"], pairs["right"]])).to(device)  # (2M, C, H, W)
    t0 = time.time()
    inv, inv_level = inversion_chain(d, args.invert_steps, diffusion.timestep_map[level])
    z = invert(model, inv, x, inv_level, args.batch).cpu()            # left latents, then right ones
    sec["invert"] = time.time() - t0
    # 1. curves (CPU, float64 inside interpolants), one frame batch per pair
    t0 = time.time()
    score = score_grad(model, diffusion, level, device) if args.score and where != "T" else None
    batches, infos = [], {}
    for p in plumbing.progress(range(M), f"curves at {where}", unit="curve"):
        curves, info = latent_curves(z[p], z[M + p], n, score=score)
        batches.append(frame_batch(curves))
        for name, i in info.items():
            infos.setdefault(name, []).append(i)
    names, points = list(curves), torch.cat(batches)                  # (M F, C, H, W)
    F = len(batches[0])                                                # frames per pair
    sec["curves"] = time.time() - t0
    # 2. decode every point from the inversion level (DDIM, eta = 0)
    t0 = time.time()
    decoded = decode(model, diffusion, points.to(device), level, args.batch).cpu()
    sec["decode"] = time.time() - t0
    images = plumbing.to_uint8(decoded)                             # (M F, S, S, 3)
    stats = evaluate.circle_stats(images)
    # 3. NLL of every decoded frame (the ends too), and of the real images
    t0 = time.time()
    nll, scored = np.full(len(images), np.nan), min(M, args.nll_pairs) * F   # the first --nll-pairs pairs
    if args.nll_steps != "0" and scored:
        nll[:scored] = nll_bpd(model, d, images[:scored], args.nll_steps, args.seed, args.batch, device)
    sec["nll"] = time.time() - t0
    index = frame_index(names, n)
    ends = np.concatenate([np.arange(M) * F, np.arange(M) * F + 1])    # left recon., then right recon.
    summary = dict(level=level, t_model=int(diffusion.timestep_map[level]),
                   abar=float(diffusion.float64["alphas_cumprod"][level]), seconds=sec,
                   reconstruction=reconstruction_stats(decoded[ends], images[ends], x.cpu(), pairs, nll[ends]),
                   methods={})
    paths = {}
    for name in names:
        rows = [pair_row(p * F + index[name], stats, decoded, points) for p in range(M)]
        inner = np.concatenate([p * F + index[name][1:-1] for p in range(M)])
        summary["methods"][name] = method_summary(rows, stats, nll[inner], inner, infos.get(name))
        paths[name] = [r["cx"] for r in rows]
    strips = {name: images[index[name]] for name in names}            # pair 0
    return summary, strips, paths


def pair_row(idx, stats, decoded, points):
    """The numbers of one curve: idx are the positions of its n + 1 frames in the decoded batch."""
    inner = points[idx[1:-1]]                                          # (n - 1, C, H, W) interior latents
    return dict(centre_path(stats["cx"][idx], stats["cy"][idx]), energy=image_energy(decoded[idx].clamp(-1, 1)),
                chi2_loglik=float(chi2_loglik(inner).mean()),
                norm2_over_d=float(inner.double().pow(2).flatten(1).sum(1).mean()) / inner[0].numel(),
                cx=[_nan_to_none(float(c)) for c in stats["cx"][idx]])


def method_summary(rows, stats, nll, inner, infos):
    """One method's table row: curve numbers averaged over pairs, frame numbers over interior frames."""
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    jumps = [r["largest_jump_px"] for r in rows]
    return dict(chi2_loglik=mean("chi2_loglik"), norm2_over_d=mean("norm2_over_d"), nll_bpd=_finite_stat(np.mean, nll),
                one_circle=float(np.mean(stats["n_circles"][inner] == 1)),
                middle_band=float(np.mean(stats["in_middle"][inner])), monotone=mean("monotone"),
                largest_jump_px_mean=_finite_stat(np.mean, jumps), largest_jump_px_max=_finite_stat(np.max, jumps),
                energy=mean("energy"),
                iterations=float(np.mean([i["iterations"] for i in infos])) if infos else None,
                stops=sorted(set(i["stop"] for i in infos)) if infos else None,
                per_pair=[{k: _nan_to_none(v) for k, v in r.items()} for r in rows])


def reconstruction_stats(decoded, images, x, pairs, nll):
    """decode(invert(x)) against x for the 2M real images (left ones, then right ones).

    mean / max |x-hat - x| in [-1, 1] units; flipped pixels: grey level on the other side of 127.5
    (black <-> white); centre kept: one circle detected within 1 px of the drawn centre.
    """
    err = (decoded.clamp(-1, 1) - x).abs()
    grey_hat, grey = images.astype(np.float64).mean(3), plumbing.to_uint8(x).astype(np.float64).mean(3)
    stats = evaluate.circle_stats(images)
    true = np.concatenate([pairs["left_centres"], pairs["right_centres"]]).astype(np.float64)
    dist = np.hypot(stats["cx"] - true[:, 0], stats["cy"] - true[:, 1])  # NaN without one circle
    return dict(mean_abs_error=float(err.mean()), max_abs_error=float(err.max()),
                flipped_pixels=float(np.mean((grey_hat > 127.5) != (grey > 127.5))),
                one_circle=float(np.mean(stats["n_circles"] == 1)),
                centre_kept=float(np.mean(np.nan_to_num(dist, nan=np.inf) <= 1.0)),
                centre_error_px=_finite_stat(np.mean, dist),
                nll_bpd=_finite_stat(np.mean, nll))


def run_interp(model, d, args, device):
    """The App. M comparison at each inversion level of --invert-to; writes figures, results.json, report.md."""
    start = time.time()
    size = model.config["image_size"]
    pairs = choose_pairs(size, args.pairs, args.seed)
    real = np.concatenate([pairs["left"], pairs["right"]])
    t0 = time.time()
    data_nll = (nll_bpd(model, d, real, args.nll_steps, args.seed, args.batch, device) if args.nll_steps != "0"
                else np.full(len(real), np.nan))
    results = dict(config=_config(args), image_size=size, data_nll_bpd=_nan_to_none(float(np.mean(data_nll))),
                   data_nll_seconds=time.time() - t0, settings={})
    levels = ["T", "half"] if args.invert_to == "both" else [args.invert_to]
    for where in levels:
        summary, strips, paths = interp_setting(model, d, pairs, where, args, device)
        results["settings"][where] = summary
        plot_strips(strips, os.path.join(args.out, f"strips_{where}.png"),
                    f"pair 0, inverted to level {summary['level']} (t = {summary['t_model']}), N = {args.frames}")
        for name, frames in strips.items():
            plumbing.save_grid(frames, os.path.join(args.out, "strips", f"{where}_{_slug(name)}.png"),
                                  nrow=len(frames), scale=max(1, 64 // size))
        plot_centre_paths(paths, size, os.path.join(args.out, f"centres_{where}.png"),
                          f"centre x along each curve ({len(pairs['left'])} pairs), level {summary['level']}")
        print_setting(where, summary)
    results["seconds"] = time.time() - start
    plumbing.write_json(results, os.path.join(args.out, "results.json"))
    plumbing.write_bytes_atomically(os.path.join(args.out, "report.md"), interp_report(results).encode())
    return results


def print_setting(where, s):
    r = s["reconstruction"]
    print(f"[{where}] level {s['level']} (t = {s['t_model']}): reconstruction |err| {r['mean_abs_error']:.4f}, "
          f"flipped pixels {r['flipped_pixels']:.4f}, centre kept {r['centre_kept']:.2f}; "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in s['seconds'].items())}")
    for name, m in s["methods"].items():
        print(f"  {name:24s} chi2 ll {m['chi2_loglik']:9.2f}  NLL {_fmt(m['nll_bpd'], '.3f')} bpd  "
              f"one {m['one_circle']:.2f}  middle {m['middle_band']:.2f}  monotone {m['monotone']:.2f}  "
              f"jump {_fmt(m['largest_jump_px_mean'], '.1f')} px  energy {m['energy']:.1f}")


# ----------------------------------------------------------------------------------------------
# App. N: editing by partial inversion and guided DDIM with eta_t = t / T_inv
# ----------------------------------------------------------------------------------------------

def edit_stats(before, images, size):
    """Where the circles went: before (M, 2) drawn centres (x, y), images uint8 (M, S, S, 3) after.

    one_circle, middle_band (one circle with z in MIDDLE_BAND: all start on the left, so this is the
    fraction moved into the band), moved_right (one circle, centre x up by more than 2 px), mean
    centre x before / after (one-circle images), mean dx, mean |dy|, and the histogram of z after.
    """
    s = evaluate.circle_stats(images)
    dx, dy = s["cx"] - before[:, 0], s["cy"] - before[:, 1]
    one = s["n_circles"] == 1
    mean = lambda v: _nan_to_none(float(np.mean(v[one]))) if one.any() else None  # noqa: E731
    return dict(one_circle=float(one.mean()), middle_band=s["accuracy"],
                moved_right=float(np.mean(one & (np.nan_to_num(dx) > 2.0))),
                cx_before=float(np.mean(before[:, 0])), cx_after=mean(s["cx"]), mean_dx=mean(dx),
                mean_abs_dy=mean(np.abs(dy)),
                z_hist=np.histogram(s["z"][one], bins=size, range=(0.0, 1.0))[0].tolist(),
                z=[_nan_to_none(float(v)) for v in s["z"]])


def edit_lambdas(args, num_classes):
    """The guidance weights of the edit: --lambdas when given; else --guide single (App. N: regular
    classifier guidance, --strength on the --target class, 0 on the others) or multi (ours: --strength
    on every class, Eq. 2)."""
    if args.lambdas is not None:
        return list(args.lambdas)
    if args.guide == "multi":
        return [float(args.strength)] * num_classes
    return [float(args.strength) if m == args.target else 0.0 for m in range(num_classes)]


def edit_name(args, lambdas):
    """The edit's row name in the tables: which guidance, which weights."""
    if args.lambdas is None and args.guide == "single":
        return f"eta_t + single-class guidance to class {args.target}, strength {args.strength:g}"
    return f"eta_t + multi-guidance lambda = {','.join(f'{v:g}' for v in lambdas)}"


def run_edit(model, d, clf, args, device):
    """App. N on left-circle training images; writes edit_grid.png, centre_hist.png, results.json, report.md."""
    start = time.time()
    size = model.config["image_size"]
    diffusion = ddpm.diffusion_from_config(d, args.sample_steps)
    level = chain_level(diffusion, args.invert_frac)
    data = toy_circles.make_circles(size, "left")
    pick = np.random.default_rng(args.seed).choice(len(data["images"]), args.n_samples, replace=args.n_samples > len(data["images"]))
    before, centres = data["images"][pick], data["centres"][pick].astype(np.float64)
    x = plumbing.to_tensor(before).to(device)
    inv, inv_level = inversion_chain(d, args.invert_steps, diffusion.timestep_map[level])
    z = invert(model, inv, x, inv_level, args.batch)                   # eta = 0, no guidance
    eta, lambdas_edit = app_n_eta(level), edit_lambdas(args, clf.num_classes)
    runs = {}
    for name, lambdas in (("reconstruction (eta = 0, no guidance)", None),
                          ("eta_t, no guidance (control)", [0.0] * clf.num_classes),
                          (edit_name(args, lambdas_edit), lambdas_edit)):
        t0 = time.time()
        if lambdas is None:
            out = decode(model, diffusion, z, level, args.batch)
        else:
            cond_fn = multiguide.make_cond_fn(clf, lambdas)            # None for all-zero lambdas
            g = torch.Generator(device=device).manual_seed(args.seed)  # same noise for control and edit
            out = _batched(lambda zb: ddim_loop(model, diffusion, zb, level, eta, cond_fn, g), z, args.batch)
        images = plumbing.to_uint8(out)
        runs[name] = dict(edit_stats(centres, images, size), seconds=time.time() - t0)
        runs[name]["images"] = images
        r = runs[name]
        print(f"{name:48s} one circle {r['one_circle']:.2f}  middle band {r['middle_band']:.2f}  "
              f"moved right {r['moved_right']:.2f}  cx {r['cx_before']:.1f} -> {_fmt(r['cx_after'], '.1f')}  "
              f"({r['seconds']:.0f} s)")
    cols = min(args.n_samples, 16)
    grid = np.concatenate([before[:cols], *[r["images"][:cols] for r in runs.values()]])
    plumbing.save_grid(grid, os.path.join(args.out, "edit_grid.png"), nrow=cols, scale=max(1, 64 // size))
    plot_edit_hist(toy_circles.normalized_x(centres[:, 0], size), runs, size, os.path.join(args.out, "centre_hist.png"))
    results = dict(config=_config(args), image_size=size, level=level, t_model=int(diffusion.timestep_map[level]),
                   invert_steps=inv_level, decode_steps=level + 1, guide=args.guide, lambdas=lambdas_edit,
                   eta=f"eta_i = i / {level} at chain step i = {level} .. 0 (App. N: eta_t = t / T_inv, T_inv = {level})",
                   before=dict(cx=centres[:, 0].tolist(), cy=centres[:, 1].tolist(),
                               z_hist=np.histogram(toy_circles.normalized_x(centres[:, 0], size), bins=size,
                                                   range=(0.0, 1.0))[0].tolist()),
                   runs={k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in runs.items()},
                   seconds=time.time() - start)
    plumbing.write_json(results, os.path.join(args.out, "results.json"))
    plumbing.write_bytes_atomically(os.path.join(args.out, "report.md"), edit_report(results).encode())
    return results


# ----------------------------------------------------------------------------------------------
# Figures and reports
# ----------------------------------------------------------------------------------------------

def _slug(name):
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def _fmt(v, spec):
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)




def _config(args):
    return {k: v for k, v in vars(args).items() if k != "run"}


def plot_strips(strips, path, title):
    """One row per method: the decoded frames of one curve side by side, grey 1-px separators."""
    names = list(strips)
    width = 2.2 + 0.8 * len(strips[names[0]])                         # 2.2 in of labels, 0.8 in per frame
    fig = Figure(figsize=(width, 0.9 * len(names) + 0.9))
    for r, name in enumerate(names):
        frames = strips[name]                                          # (n + 1, S, S, 3)
        S = frames.shape[1]
        row = np.full((S, len(frames) * (S + 1) - 1, 3), 128, dtype=np.uint8)
        for i, f in enumerate(frames):
            row[:, i * (S + 1): i * (S + 1) + S] = f
        ax = fig.add_subplot(len(names), 1, r + 1)
        ax.imshow(row, interpolation="nearest")
        ax.set_yticks([])
        ax.set_xticks([i * (S + 1) + S / 2 for i in range(len(frames))])
        ax.set_xticklabels([str(i) for i in range(len(frames))] if r == len(names) - 1 else [])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.axes[-1].set_xlabel("frame i (0: left image's reconstruction, N: right image's)")
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=2.2 / width, right=0.99, top=1 - 0.35 / fig.get_figheight(),
                        bottom=0.55 / fig.get_figheight(), hspace=0.15)
    plumbing.save_figure(fig, path)


def plot_centre_paths(paths, size, path, title):
    """One panel per method: detected centre x against frame index, one line per pair."""
    names = list(paths)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    band = [b * size - 0.5 for b in toy_circles.MIDDLE_BAND]            # z = (cx + 0.5) / S
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.axhspan(band[0], band[1], color="green", alpha=0.12, label="middle band")
        for cx in paths[name]:
            ax.plot([np.nan if c is None else c for c in cx], marker=".", lw=0.8)
        ax.set(ylim=(-0.5, size - 0.5), title=name, xlabel="frame", ylabel="centre x (px)")
        ax.title.set_fontsize(8)
    fig.suptitle(title + " (gaps: frames without exactly one circle)", fontsize=9)
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def plot_edit_hist(z_before, runs, size, path):
    """Histograms of the normalised centre x before and after each decoding, middle band marked."""
    fig = Figure(figsize=(7, 3.5))
    ax = fig.add_subplot()
    ax.hist(z_before, bins=size, range=(0, 1), color="0.6", label=f"before (n = {len(z_before)})")
    for (name, r), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:red")):
        z = np.array([np.nan if v is None else v for v in r["z"]])
        ax.hist(z[np.isfinite(z)], bins=size, range=(0, 1), histtype="step", lw=1.8, color=colour,
                label=f"{name}: one circle {r['one_circle']:.0%}")
    for edge in toy_circles.MIDDLE_BAND:
        ax.axvline(edge, color="green", ls="--")
    ax.set(xlim=(0, 1), xlabel="normalised centre x, z = (cx + 0.5) / S (green: middle band)",
           ylabel="number of images", title="App. N edit of left-circle images: centre x before / after")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    plumbing.save_figure(fig, path)


def interp_report(res):
    c = res["config"]
    lines = ["# Interpolation between DDIM latents (App. M) on circles", "",
             f"Command: `python latents.py interp {' '.join(sys.argv[2:])}`. {c['pairs']} pairs (a left-circle and a "
             f"right-circle training image, seed {c['seed']}), DDIM (eta = 0) inversion with {c['invert_steps']} and "
             f"decoding with {c['sample_steps']} respaced steps, N = {c['frames']} intervals per curve, NLL over a "
             f"{c['nll_steps']}-step chain for the frames of the first {min(c['nll_pairs'], c['pairs'])} pairs. "
             f"Wall time {res['seconds'] / 60:.1f} min. NLL of the real images: "
             f"{_fmt(res['data_nll_bpd'], '.3f')} bits/dim.", "",
             "Per-frame numbers are over the interior frames (the two ends are shared by every method and are "
             "reported as the reconstruction). chi^2 log-lik and ||z||^2 / d are of the interior latents "
             "(||z||^2 / d ~ 1 on the Gaussian shell); monotone = fraction of pairs whose centre x moves one way "
             f"(steps back <= {BACK_TOL} px, every frame one circle); jump = largest centre step (px), mean / max "
             "over pairs; energy = sum ||x_{i+1} - x_i||^2 of decoded frames in [-1, 1].", ""]
    for where, s in res["settings"].items():
        r = s["reconstruction"]
        lines += [f"## Inverted to level {s['level']} of {c['sample_steps']} (t = {s['t_model']}, abar = {s['abar']:.3g})", "",
                  f"Reconstruction decode(invert(x)) of the {2 * c['pairs']} real images: mean |err| "
                  f"{r['mean_abs_error']:.4f}, max {r['max_abs_error']:.3f} (pixel values in [-1, 1]); flipped pixels "
                  f"{r['flipped_pixels']:.4%}; one circle {r['one_circle']:.0%}; centre within 1 px "
                  f"{r['centre_kept']:.0%} (mean error {_fmt(r['centre_error_px'], '.2f')} px); NLL "
                  f"{_fmt(r['nll_bpd'], '.3f')} bits/dim. Seconds: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".", "",
                  "| method | chi^2 log-lik | ‖z‖²/d | NLL bits/dim | one circle | middle band | monotone | "
                  "jump px (mean / max) | energy | iterations (stop) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in s["methods"].items():
            it = "" if m["iterations"] is None else f"{m['iterations']:.0f} ({', '.join(m['stops'])})"
            lines.append(f"| {name} | {m['chi2_loglik']:.1f} | {m['norm2_over_d']:.3f} | {_fmt(m['nll_bpd'], '.3f')} | "
                         f"{m['one_circle']:.0%} | {m['middle_band']:.0%} | {m['monotone']:.0%} | "
                         f"{_fmt(m['largest_jump_px_mean'], '.1f')} / {_fmt(m['largest_jump_px_max'], '.1f')} | "
                         f"{m['energy']:.1f} | {it} |")
        lines += ["", f"Pair 0, one row per method: ![strips](strips_{where}.png)", "",
                  f"Centre x along every curve: ![centres](centres_{where}.png)", ""]
    return "\n".join(lines)


def edit_report(res):
    c = res["config"]
    lines = ["# Attribute editing without mild examples (App. N) on circles", "",
             f"Command: `python latents.py edit {' '.join(sys.argv[2:])}`. {c['n_samples']} left-circle training images "
             f"(seed {c['seed']}), DDIM-inverted (eta = 0, {res['invert_steps']} steps on a {c['invert_steps']}-step chain) "
             f"to t = {res['t_model']} (level {res['level']} of the {c['sample_steps']}-step decoding chain), then decoded "
             f"three ways ({res['decode_steps']} steps each). {res['eta']}. Guidance of the edit: {res['guide']}, lambda = "
             f"{','.join(f'{v:g}' for v in res['lambdas'])}. The control and the edit share every "
             f"noise draw. Wall time {res['seconds']:.0f} s.", "",
             "| decoding | one circle | in middle band | moved right > 2 px | mean centre x before -> after (px) | "
             "mean dx | mean abs dy |", "|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        lines.append(f"| {name} | {r['one_circle']:.0%} | {r['middle_band']:.0%} | {r['moved_right']:.0%} | "
                     f"{r['cx_before']:.1f} -> {_fmt(r['cx_after'], '.1f')} | {_fmt(r['mean_dx'], '.1f')} | "
                     f"{_fmt(r['mean_abs_dy'], '.1f')} |")
    lines += ["", "Rows: originals, then each decoding in the table's order: ![grid](edit_grid.png)", "",
              "Centre x before and after: ![histogram](centre_hist.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    renamed = {"--n": "--n-samples", "--steps": "--sample-steps"}
    parser = plumbing.OneLineParser(description="DDIM latents of real circles: interpolation (App. M), editing (App. N).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("interp", renamed=renamed, help="App. M: curves between the DDIM latents of a left and a right circle")
    p.add_argument("--pairs", type=int, default=20, help="(left, right) image pairs")
    p.add_argument("--frames", type=int, default=10, help="N, intervals per curve (N + 1 decoded frames, ends included)")
    p.add_argument("--invert-to", choices=["T", "half", "both"], default="both",
                   help="inversion level: x_T, the kept step nearest T/2, or both")
    p.add_argument("--nll-steps", default="100", help="respaced steps of the NLL bound (0: skip the NLL)")
    p.add_argument("--nll-pairs", type=int, default=10,
                   help="pairs whose frames get an NLL (the bound costs ~2.5x the decoding; 10 pairs = 90 frames per method)")
    p.add_argument("--score", action=argparse.BooleanOptionalAction, default=True,
                   help="also the score variant of ProbGEORCE at the T/2 level (lam = 1)")
    q = sub.add_parser("edit", renamed=renamed, help="App. N: invert left circles with T/2 steps, decode with "
                                                      "eta_t = t/T_inv and single-class guidance")
    q.add_argument("--classifier", required=True, help="noisy classifier checkpoint (kind 'classifier')")
    plumbing.add_flags(q, n_samples=32)  # left-circle images to edit
    q.add_argument("--guide", choices=["single", "multi"], default="single",
                   help="single: regular classifier guidance toward --target (App. N); multi: our variant, "
                        "multi-guidance with --strength on every class (Eq. 2)")
    q.add_argument("--strength", type=plumbing.finite_float, default=30.0, help="guidance strength lambda (App. N: 30)")
    q.add_argument("--target", type=plumbing.nonnegative_int, default=1,
                   help="--guide single: the class guided toward (1: right circles; the edited images are left ones)")
    q.add_argument("--lambdas", type=plumbing.float_list, default=None,
                   help="explicit weights, one per class (instead of --guide/--strength/--target)")
    q.add_argument("--invert-frac", type=float, default=0.5, help="inversion level as a fraction of T (App. N: 1/2)")
    for s, steps, inv in ((p, "50", "250"), (q, "all", "all")):
        s.add_argument("--ddpm", required=True, help="DDPM checkpoint (kind 'ddpm')")
        plumbing.add_flags(s, "out", "overwrite", "seed")
        s.add_argument("--sample-steps", default=steps,
                       help="DDIM decoding chain: N (evenly spaced), n1,n2,... (per section), ddimN, or all (the T "
                            "steps; App. N: the decode from T/2 takes T/2 steps, then returns x_0-hat)")
        s.add_argument("--invert-steps", default=inv,
                       help="respaced DDIM steps for inversion, finer than decoding (see inversion_chain); "
                            "all, or a number above T, means all T steps (App. N: T/2 inversion steps)")
        plumbing.add_flags(s, "batch", "device", "threads")
        s.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    args = parser.parse_args(argv)
    sub_parser = p if args.command == "interp" else q
    bad = []
    if args.command == "interp":
        bad += [f"--pairs must be >= 1, got {args.pairs}"] if args.pairs < 1 else []
        bad += [f"--frames must be >= 2 (ProbGEORCE needs an interior point), got {args.frames}"] if args.frames < 2 else []
        bad += [f"--nll-steps must be a whole number >= 0, got {args.nll_steps!r}"] if not args.nll_steps.isdigit() else []
        bad += [f"--nll-pairs must be >= 0, got {args.nll_pairs}"] if args.nll_pairs < 0 else []
    else:
        bad += [f"--invert-frac must lie in (0, 1], got {args.invert_frac}"] if not 0 < args.invert_frac <= 1 else []
    if bad:
        sub_parser.error(bad[0])
    plumbing.check_out_folder(args.out)
    args.device = str(plumbing.check_device(args.device))
    plumbing.refuse_overwrite(args.out, ["results.json", "report.md"], args.overwrite)
    return sub_parser, args


def check_models(parser, args, model, d, clf):
    """Refuse (one line) what the checkpoints cannot do: non-RGB models, bad respacings, weights per class."""
    if model.config.get("in_channels", 3) != 3:
        parser.error(f"--ddpm {args.ddpm} models {model.config['in_channels']}-channel images; "
                     f"latents.py works on the RGB circles")
    if args.invert_steps == "all" or (args.invert_steps.isdigit() and int(args.invert_steps) > d["T"]):
        args.invert_steps = str(d["T"])
    if args.sample_steps == "all":
        args.sample_steps = str(d["T"])
    try:
        toy_circles.check_size(model.config["image_size"])
    except ValueError as e:
        parser.error(f"--ddpm {args.ddpm}: {e}")
    specs = [("--sample-steps", args.sample_steps), ("--invert-steps", args.invert_steps)]
    specs += [("--nll-steps", args.nll_steps)] if args.command == "interp" and args.nll_steps != "0" else []
    for flag, spec in specs:
        try:
            ddpm.check_chain(d["T"], spec)
        except ValueError as e:
            parser.error(f"{flag}: {e}")
    if clf is not None and args.lambdas is not None and len(args.lambdas) != clf.num_classes:
        parser.error(f"--lambdas gives {len(args.lambdas)} weights, but classifier {args.classifier} has "
                     f"{clf.num_classes} classes")
    if clf is not None and args.target >= clf.num_classes:
        parser.error(f"--target {args.target}: classifier {args.classifier} has classes 0 .. {clf.num_classes - 1}")


def main(argv=None):
    parser, args = parse_args(argv)
    plumbing.set_threads(args.threads)
    device = torch.device(args.device)
    model, d, clf = multiguide.load_models(args.ddpm, getattr(args, "classifier", None), device=device,
                                           use_ema=not args.no_ema)
    check_models(parser, args, model, d, clf)
    print(f"latents {args.command} | config {json.dumps(_config(args))}")
    results = (run_interp(model, d, args, device) if args.command == "interp" else run_edit(model, d, clf, args, device))
    print(f"wrote {os.path.join(args.out, 'results.json')}, report.md and figures in {results['seconds']:.0f} s")


if __name__ == "__main__":
    plumbing.guard(main)
