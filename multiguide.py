"""multiguide.py -- multi-guidance: sampling an unconditional DDPM with the scores of ALL classes.

What this file is
    Sec. 4.2, Eq. 2 defines a product of experts,
        p_Pi(x) = (1/Z) p(x) prod_m p(y_m | x)^lambda_m,
    whose score is a sum of scores (Liu et al. 2021):
        grad log p_Pi(x_t) = grad log p(x_t) + sum_m lambda_m grad log p(y_m | x_t, t).
    The DDPM supplies the first term; the noisy classifier (classifier.py) the others, so the
    guidance gradient is
        g = grad_x sum_m lambda_m log p(y_m | x_t, t),
    and it is computed for ALL classes with ONE classifier forward and ONE backward pass (autograd of
    the weighted sum of log-probabilities). That is why App. C says multi-guidance costs the same as
    ordinary classifier guidance. The samplers of ddpm.py then use g unchanged:
        ancestral (Sec. 2.2):  mu~ = mu + Sigma g           (ddpm.Diffusion.p_sample, cond_fn)
        DDIM:                  eps~ = eps - sqrt(1 - abar_t) g  (ddpm.Diffusion.ddim_step, cond_fn)
    Measured on 2 CPU cores (the "cpu" presets of unet.py and classifier.py, 32x32, batch 128, one
    ancestral step): unguided ~190 ms, guided ~310 ms (1.6x): the classifier's forward + backward
    (~110 ms) comes on top of the U-Net forward, whatever the number of classes.
    Special cases: lambda = [30, 30] is the paper's multi-guidance (Sec. 5.5), lambda = [0, 30] is
    ordinary single-class guidance towards class 1, and lambda = [0, 0] is unconditional sampling;
    then the classifier is not called at all, so lambda = 0 reproduces the unguided sampler exactly.
    (Sec. 2.2 writes g at mu; like guided-diffusion, ddpm.py evaluates it at x_t.)

    Several classifiers (Eq. 2's sum over k): p_Pi(x) = (1/Z) p(x) prod_k prod_m p_k(y_m | x)^lambda_km,
    so g = sum_k grad_x sum_m lambda_km log p_k(y_m | x_t, t): one forward and one backward pass per
    classifier (multi_classifier_grad), one weight per class of each classifier, or one per classifier
    for all of its classes (classifier_lambdas). The released sampling config lists classifier paths
    with a list of class weights each. A classifier with ONE output is read as binary,
    p(y | x_t) = sigmoid(logit) (BinaryLogit), since the log_softmax of a single logit is 0.

    Classifier-free multi-guidance (App. J, Eq. 12; Ho & Salimans 2022): a class-conditional DDPM
    trained with label dropout (unet.UNet / dit.DiT with num_classes > 0; the null label is the extra
    class num_classes) is its own classifier, since
    grad log p(y | x_t) = grad log p(x_t | y) - grad log p(x_t) = -(eps(x, y) - eps(x, null)) / sqrt(1 - abar_t).
    Two parametrisations of the same kind of mix, both computed with ONE batched forward of the null
    label and the classes (cost: up to M + 1 times an unguided step), both giving the samplers eps_hat
    as the model's eps (v comes from the null-label pass):
      * w, the authors' released sampler and the default (cfg_output, --cfg-w; w = 0.1 there, with
        250 respaced steps and label dropout 0.1):
            eps_hat = -w eps(x, null) + (1 + w) mean_m eps(x, y_m)            (m over all M classes)
        It is App. J's Eq. 12 with its (1 - lambda) read as (1 + lambda) (see classifier_free_output)
        and lambda = w. w = 0 is the mean of the conditional eps, w = -1 the unconditional model.
      * lambda, ours: the product of experts of Eq. 2 with the implicit classifiers (classifier_free_output,
        --lambdas with --guidance free):
            eps_hat = eps(x, null) + sum_m lambda_m (eps(x, y_m) - eps(x, null)),
        lambda = 0 is the unconditional model and one lambda_m = 1 class m's conditional model.
      The mapping, exact: the w mix is the lambda mix with lambda_m = (1 + w) / M for every class
      (cfg_w_lambdas); equal weights lambda_m = lambda are the w mix with w = M lambda - 1
      (lambdas_cfg_w). So the released w = 0.1 is lambda = 0.55 on each of the two circles classes;
      unequal lambdas have no w.

Run
    python multiguide.py --ddpm runs/circles/ddpm.pt --classifier runs/circles/classifier0.pt \
        --lambdas 30,30 --n-samples 256 --sample-steps 50 --out runs/circles/mg      # -> samples.npz, samples.png
    python multiguide.py --ddpm runs/circles/ddpm.pt --lambdas 0,0 --out runs/circles/uncond
    python multiguide.py --ddpm runs/faces/ddpm.pt --classifier runs/hair.pt runs/age.pt \
        --lambdas 10,10,10,10 --out runs/faces/two                    # Eq. 2 over two classifiers
    python multiguide.py --ddpm runs/cfg/ddpm.pt --guidance free --out runs/cfg/w0.1   # the released w = 0.1
    python multiguide.py --ddpm runs/cfg/ddpm.pt --guidance free --lambdas 3,3 --out runs/cfg/cfg3
    python multiguide.py --help
"""
import numbers
import os

import numpy as np
import torch
import torch.nn.functional as F

import classifier as classifier_lib
import ddpm
import dit
import plumbing
import unet


# ----------------------------------------------------------------------------------------------
# The guidance gradient
# ----------------------------------------------------------------------------------------------

def _lambda_tensor(lambdas, num_classes, device=None, dtype=torch.float32):
    """lambdas as a tensor whose last dimension is num_classes (None: not checked); else ValueError."""
    lam = torch.as_tensor(lambdas, dtype=dtype, device=device)
    if lam.dim() == 0 or (num_classes is not None and lam.shape[-1] != num_classes):
        got = 1 if lam.dim() == 0 else lam.shape[-1]
        raise ValueError(f"{got} guidance weight(s) lambda given for a classifier with {num_classes} classes")
    return lam


def multi_guidance_grad(classifier, x, t, lambdas):
    """g = grad_x sum_m lambda_m log p(y_m | x, t) (Eq. 2: product of experts -> sum of scores).

    classifier(x, t) -> logits (B, K); t: ORIGINAL timestep indices (B,); lambdas: K weights (a list
    or a tensor (K,), or (B, K) for per-sample weights). One forward and one backward pass for all
    classes. The logits are taken in float32 (float64 if the classifier runs in float64), outside any
    autocast. Returns a tensor shaped like x.
    """
    num_classes = getattr(classifier, "num_classes", None)
    lam = _lambda_tensor(lambdas, num_classes, device=x.device)
    ### BEGIN SOLUTION a5: g = grad_x sum_b sum_m lambda_m log p(y_m | x_b, t_b), one forward and one backward pass
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, t)                                            # (B, K)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # never bf16 / fp16
        if logits.shape[-1] != lam.shape[-1]:
            raise ValueError(f"{lam.shape[-1]} guidance weight(s) lambda given for a classifier "
                             f"with {logits.shape[-1]} classes")
        log_probs = F.log_softmax(logits, dim=-1)                               # (B, K): log p(y_m | x_t, t)
        objective = (log_probs * lam.to(log_probs.dtype)).sum()                 # sum_b sum_m lambda_m log p
        (grad,) = torch.autograd.grad(objective, x_in)                          # (B, C, H, W)
    return grad
    ### END SOLUTION


class BinaryLogit(torch.nn.Module):
    """A classifier with ONE output l read as binary, p(y | x_t) = sigmoid(l): it hands Eq. 2 the two
    logits [0, l], whose log_softmax is [log(1 - sigmoid(l)), log sigmoid(l)], so the weights [0, lambda]
    give lambda log sigmoid(l). (The log_softmax of the single logit itself is 0: no gradient.)"""
    num_classes = 2

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, t):
        logit = self.inner(x, t)                                    # (B, 1)
        return torch.cat([torch.zeros_like(logit), logit], dim=-1)  # (B, 2)


def _is_number(v):
    return isinstance(v, numbers.Real) or (torch.is_tensor(v) and v.dim() == 0)


def classifier_lambdas(classifiers, lambdas):
    """Eq. 2's weights lambda_km for the classifiers k = 1..K: a list of K tensors, (M_k,) or (B, M_k).

    lambdas is one of
      * one entry per classifier: a number (the weight of every class of that classifier) or its
        M_k weights (a list, (M_k,) or per-sample (B, M_k) tensor);
      * a flat list of numbers: sum_k M_k of them (one per class, the classifiers in order) or K of them
        (one per classifier). When both counts agree (one-class classifiers), both readings agree.
    ValueError, naming the counts, for anything else.
    """
    sizes = [getattr(c, "num_classes", None) for c in classifiers]
    if not classifiers or None in sizes:
        raise ValueError("every guidance classifier needs num_classes (and there must be one)")
    total, K = sum(sizes), len(classifiers)
    lambdas = [lambdas] if _is_number(lambdas) else lambdas
    flat = torch.is_tensor(lambdas) and lambdas.dim() == 1 or all(_is_number(v) for v in lambdas)
    if flat:
        values = [float(v) for v in lambdas]
        if len(values) == total:
            bounds = np.cumsum([0, *sizes])
            return [torch.tensor(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if len(values) == K:
            return [torch.full((m,), v) for v, m in zip(values, sizes)]
        raise ValueError(f"{len(values)} guidance weight(s) lambda given for {K} classifiers with "
                         f"{'+'.join(map(str, sizes))} = {total} classes: give one per class ({total}) or one "
                         f"per classifier ({K})")
    if len(lambdas) != K:
        raise ValueError(f"{len(lambdas)} entries of guidance weights lambda given for {K} classifiers")
    return [torch.full((m,), float(v)) if _is_number(v) else _lambda_tensor(v, m) for v, m in zip(lambdas, sizes)]


def multi_classifier_grad(classifiers, x, t, lambdas):
    """g = sum_k grad_x sum_m lambda_km log p_k(y_m | x, t) (Eq. 2 over K classifiers), shaped like x.

    lambdas: any form classifier_lambdas takes. One forward and one backward pass per classifier with a
    nonzero weight (multi_guidance_grad); a one-output classifier is read as binary (BinaryLogit). With
    one classifier this is multi_guidance_grad bit for bit.
    """
    g = None
    for clf, lam in zip(classifiers, classifier_lambdas(classifiers, lambdas)):
        lam = lam.to(x.device)
        if not bool(lam.any()):
            continue
        if clf.num_classes == 1:
            clf, lam = BinaryLogit(clf), torch.cat([torch.zeros_like(lam), lam], dim=-1)
        gk = multi_guidance_grad(clf, x, t, lam)
        g = gk if g is None else g + gk
    return torch.zeros_like(x) if g is None else g


def _weights(classifier, lambdas):
    """(classifiers, their weight tensors) of one classifier (lambdas: one weight per class, as ever) or
    of a list of them (any form classifier_lambdas takes)."""
    if isinstance(classifier, (list, tuple)):
        return list(classifier), classifier_lambdas(classifier, lambdas)
    return [classifier], [_lambda_tensor(lambdas, getattr(classifier, "num_classes", None))]


def make_cond_fn(classifier, lambdas):
    """cond_fn(x, t_model) -> g for ddpm's samplers, or None when every lambda is 0 (no classifier call).

    classifier: one noisy classifier (lambdas: one weight per class) or a list of them (Eq. 2's sum over
    classifiers; lambdas as classifier_lambdas takes them)."""
    classifiers, lams = _weights(classifier, lambdas)
    if not any(bool(lam.any()) for lam in lams):
        return None
    return lambda x, t_model: multi_classifier_grad(classifiers, x, t_model, lams)


# ----------------------------------------------------------------------------------------------
# Classifier-free multi-guidance (App. J, Eq. 12)
# ----------------------------------------------------------------------------------------------

def conditional_outputs(model, x, t, classes):
    """The denoiser's output for the null label and for each class in `classes`, in ONE forward pass.

    model(x, t, y) with null label model.num_classes; x (B, C, H, W); t (B,) ORIGINAL step indices.
    Returns (1 + K, B, C', H, W) in float32 (float64 for a float64 model; never bf16 / fp16): [0] is
    the null label (unconditional), [1 + k] class classes[k].
    """
    B, K = x.shape[0], len(classes)
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
    y = torch.tensor([model.num_classes, *classes], dtype=torch.long, device=x.device).repeat_interleave(B)
    out = model(x.repeat(1 + K, 1, 1, 1), t.repeat(1 + K), y)   # ((1 + K) B, C', H, W): condition-major
    return out.to(torch.promote_types(out.dtype, torch.float32)).reshape(1 + K, B, *out.shape[1:])


def classifier_free_output(model, x, t, lambdas):
    """eps_hat = eps(x, null) + sum_m lambda_m (eps(x, y_m) - eps(x, null)), with v of the null pass.

    lambdas: one weight per class (model.num_classes). Returns (B, C', H, W) like model(x, t): the
    mixed eps, then (learn_sigma) the null label's raw v. The mix is written as the weighted sum
    (1 - sum_m lambda_m) eps(null) + sum_m lambda_m eps(y_m), so lambda = 0 returns eps(x, null) and
    a single lambda_m = 1 returns eps(x, y_m) bit for bit; classes with lambda_m = 0 are not evaluated.

    Why not the printed Eq. 12, s = -lambda s(null) + (1 - lambda) sbar with sbar = (s(0) + s(1)) / 2:
    its weights sum to 1 - 2 lambda, not 1. Ho & Salimans' rule s = (1 + w) s(c) - w s(null) =
    s(c) + w (s(c) - s(null)), with sbar for s(c), reads -lambda s(null) + (1 + lambda) sbar. Both give
    sbar at lambda = 0, but their first-order terms differ: Ho & Salimans add lambda (sbar - s(null)),
    the implicit classifiers' gradient (below); the printed form adds -lambda (sbar + s(null)) ~
    -2 lambda s, a step DOWN the density, and at lambda = 1 it is -s(null), which drives samples away
    from the data. No lambda gives the unconditional model either (that needs weights (1, 0)). So we
    read (1 - lambda) as a typo for (1 + lambda). Consistent form: the product of experts of Eq. 2,
    p(x) prod_m p(y_m | x)^lambda_m, with the implicit classifier grad log p(y_m | x_t) =
    -(eps_m - eps_null) / sqrt(1 - abar_t); since s = -eps / sqrt(1 - abar_t), its score is the
    formula above with eps for s. Eq. 12 read with (1 + lambda) is lambda_m = (1 + lambda) / M for
    each of the M = 2 classes; here lambda = 0 is the unconditional model, one lambda_m = 1 class m's.
    The authors' released sampler computes exactly Eq. 12 read with (1 + lambda), in eps, with
    lambda = w (cfg_output; w = 0.1): the reading above is theirs, and w = M lambda_m - 1.
    """
    lam = _lambda_tensor(lambdas, model.num_classes, device=x.device, dtype=torch.float64)  # cast to out's below
    active = [m for m in range(model.num_classes) if float(lam[m]) != 0.0]
    out = conditional_outputs(model, x, t, active)                  # (1 + K, B, C', H, W)
    C, lam = x.shape[1], lam.to(out.dtype)
    w = torch.cat([1.0 - lam[active].sum().reshape(1), lam[active]])   # (1 + K,): weights summing to 1
    eps = (w[:, None, None, None, None] * out[:, :, :C]).sum(dim=0)    # (B, C, H, W): eps_hat
    return torch.cat([eps, out[0, :, C:]], dim=1)                   # (B, C', H, W): v from the null pass


CFG_W = 0.1  # w of the authors' released classifier-free sampler (with 250 respaced steps, label dropout 0.1)


def cfg_output(model, x, t, w=CFG_W):
    """The released sampler's classifier-free mix: eps_hat = -w eps(x, null) + (1 + w) mean_m eps(x, y_m).

    The mean runs over all M = model.num_classes classes; the null label is class M. Returns
    (B, C', H, W) like model(x, t): eps_hat, then (learn_sigma) the null label's raw v, as
    classifier_free_output does. The same numbers as classifier_free_output with lambda_m = (1 + w) / M
    (cfg_w_lambdas), up to float rounding; written here as the release writes it.
    """
    M = model.num_classes
    out = conditional_outputs(model, x, t, list(range(M)))          # (1 + M, B, C', H, W)
    C = x.shape[1]
    eps = -w * out[0, :, :C] + (1.0 + w) * out[1:, :, :C].mean(dim=0)
    return torch.cat([eps, out[0, :, C:]], dim=1)


def cfg_w_lambdas(w, num_classes):
    """The lambda form of the w mix: lambda_m = (1 + w) / M for each of the M classes. Proof:
    eps(null) + sum_m lambda_m (eps_m - eps(null)) = (1 - (1 + w)) eps(null) + (1 + w) mean_m eps_m."""
    return [(1.0 + float(w)) / num_classes] * num_classes


def lambdas_cfg_w(lambdas):
    """The w of equal weights lambda_m = lambda over M classes: w = M lambda - 1 (cfg_w_lambdas inverted);
    ValueError for unequal weights, which no w reproduces."""
    lam = [float(v) for v in lambdas]
    if not lam or any(v != lam[0] for v in lam):
        raise ValueError(f"only equal weights lambda have a w (w = M lambda - 1); got {lam}")
    return len(lam) * lam[0] - 1.0


def implicit_classifier_grad(model, diffusion, x, t, lambdas):
    """g = sum_m lambda_m grad log p(y_m | x_t) of the implicit classifier (App. J), shaped like x.

    grad log p(y | x_t) = grad log p(x_t | y) - grad log p(x_t) and the score is -eps / sqrt(1 - abar_t),
    so g = -sum_m lambda_m (eps(x, y_m) - eps(x, null)) / sqrt(1 - abar_t); t are CHAIN indices of
    `diffusion` (the model gets diffusion.model_timesteps(t)). DDIM guided by g (eps - sqrt(1 - abar) g)
    is exactly DDIM on classifier_free_output's eps_hat.
    """
    lam = _lambda_tensor(lambdas, model.num_classes, device=x.device, dtype=torch.float64)  # cast to out's below
    out = conditional_outputs(model, x, diffusion.model_timesteps(t), list(range(model.num_classes)))
    C, lam = x.shape[1], lam.to(out.dtype)
    diff = out[1:, :, :C] - out[:1, :, :C]                          # (M, B, C, H, W): eps_m - eps_null
    sigma = diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x)  # sqrt(1 - abar_t), (B, 1, 1, 1)
    return -(lam[:, None, None, None, None] * diff).sum(dim=0) / sigma


# ----------------------------------------------------------------------------------------------
# Models and sampling
# ----------------------------------------------------------------------------------------------

BACKBONES = {"unet": unet.UNet, "dit": dit.DiT}  # the denoiser class a checkpoint's `backbone` names


def load_models(ddpm_ckpt, classifier_ckpt=None, device="cpu", use_ema=True):
    """(model, diffusion_dict, classifier(s) or None), rebuilt from self-describing checkpoints, in eval mode.

    classifier_ckpt: one path (-> one classifier) or a list of paths (-> a list, Eq. 2's classifiers).
    The EMA weights are used when present and use_ema is set. Refuses, with one line naming both
    files (plumbing.CheckpointError, a SystemExit), a classifier whose image size or channels differ
    from the DDPM's, or whose diffusion (schedule, T) differs: the classifier is called with the
    DDPM's original step indices, which must mean the same noise level to both.
    """
    ck = plumbing.load_checkpoint(ddpm_ckpt, "ddpm")
    try:
        model = BACKBONES[ck.get("backbone", "unet")](**ck["model_config"])
        model.load_state_dict(ck["ema"] if use_ema and ck.get("ema") is not None else ck["model"])
        d = ck["diffusion"]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise plumbing.CheckpointError(f"checkpoint {ddpm_ckpt} does not rebuild its denoiser and diffusion: "
                                   f"{reason}") from None
    model = model.to(device).eval()
    if classifier_ckpt is None:
        return model, d, None
    paths = [classifier_ckpt] if isinstance(classifier_ckpt, str) else list(classifier_ckpt)
    clfs = [matching_classifier(model, d, ddpm_ckpt, path, device, use_ema) for path in paths]
    return model, d, clfs[0] if isinstance(classifier_ckpt, str) else clfs


def matching_classifier(model, d, ddpm_ckpt, path, device="cpu", use_ema=True):
    """The classifier of checkpoint `path`, refused in one line naming both files unless its image size,
    channels and diffusion (schedule, T) are those of the DDPM `model` (diffusion dict d)."""
    clf, cc = classifier_lib.load_classifier(path, device=device, use_ema=use_ema)
    for key in ("image_size", "in_channels"):
        a, b = model.config[key], clf.config[key]
        if a != b:
            raise plumbing.CheckpointError(f"classifier {path} has {key} {b} but DDPM {ddpm_ckpt} has "
                                           f"{key} {a}; they must match")
    dc = cc.get("diffusion")
    if dc is not None and (d["schedule"], d["T"]) != (dc["schedule"], dc["T"]):
        raise plumbing.CheckpointError(f"classifier {path} was trained on a {dc['schedule']} schedule with "
                                       f"T = {dc['T']}, DDPM {ddpm_ckpt} on {d['schedule']} with T = {d['T']}")
    return clf


def _any_nonzero(lambdas):
    try:
        return bool(np.any(np.asarray(lambdas, dtype=np.float64)))
    except (TypeError, ValueError):  # ragged: weights per classifier
        return True


def guided_model(model, classifier=None, lambdas=None, guidance="classifier", cfg_w=None):
    """(net, cond_fn) for ddpm's samplers: the denoiser as the sampler calls it, and the gradient g.

    guidance "classifier": net = model, cond_fn = Eq. 2's g of the classifier(s) (None when every weight
    is 0 or no lambdas are given). "free": cond_fn None and net the classifier-free mix of the
    class-conditional model: the lambda form when lambdas are given (lambda = 0: the null label alone,
    no mix), else the released sampler's w form (cfg_w, default CFG_W). ValueError for what cannot be.
    """
    if guidance == "free":
        if classifier is not None:
            raise ValueError("guidance 'free' guides with the DDPM's own labels: pass no classifier")
        if not getattr(model, "num_classes", 0):
            raise ValueError("guidance 'free' needs a class-conditional DDPM (num_classes > 0; train.py --guidance free)")
        if lambdas is not None and cfg_w is not None:
            raise ValueError("give lambdas or cfg_w, not both: they parametrise the same mix "
                             "(lambda_m = (1 + w) / M)")
        if lambdas is None:
            w = CFG_W if cfg_w is None else float(cfg_w)
            return (lambda x, t: cfg_output(model, x, t, w)), None  # noqa: E731
        guide = bool(_lambda_tensor(lambdas, model.num_classes).any())
        return ((lambda x, t: classifier_free_output(model, x, t, lambdas)) if guide else model), None
    if guidance != "classifier":
        raise ValueError(f"unknown guidance {guidance!r}; expected 'classifier' or 'free'")
    if cfg_w is not None:
        raise ValueError("cfg_w weighs classifier-free guidance (guidance 'free')")
    if classifier is None:
        if lambdas is not None and _any_nonzero(lambdas):
            raise ValueError("nonzero guidance weights lambda need a classifier")
        return model, None
    return model, (make_cond_fn(classifier, lambdas) if lambdas is not None else None)


def sample(model, diffusion_dict, n, *, classifier=None, lambdas=None, respacing="50", sampler="ddpm", eta=0.0,
           batch=256, seed=0, device="cpu", precision="fp32", progress=True, guidance="classifier", cfg_w=None):
    """n samples (n, C, H, W) in [-1, 1], float32 on the CPU, multi-guided when lambdas are nonzero.

    guidance  : "classifier" (Eq. 2: the noisy classifier's gradient g) or "free" (App. J: the
                class-conditional DDPM's own eps(x, y_m) - eps(x, null); pass no classifier).
    classifier: one noisy classifier (lambdas: one weight per class) or a list of them (Eq. 2's sum
                over classifiers; lambdas as classifier_lambdas takes them).
    lambdas   : with "free", the lambda form (classifier_free_output, model.num_classes weights).
    cfg_w     : with "free" and no lambdas, the released sampler's w (cfg_output; default CFG_W = 0.1).

    respacing : sampling steps ("50", "250", "ddim50", ...) of the checkpoint's diffusion_dict.
    sampler   : "ddpm" (ancestral, guidance shifts the mean) or "ddim" (guidance shifts eps; eta).
    seed      : ONE torch.Generator on `device` draws every x_T and every step's noise, batch after
                batch, so (seed, batch) fix the samples.
    precision : autocast for the DDPM forward (bf16, or fp16 on CUDA); g is always float32.
    With "classifier", lambdas None or all zero -> unconditional (the classifier, if any, is never
    called); with "free", lambdas all zero -> the null label alone.
    """
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be positive, got n = {n}, batch = {batch}")
    net, cond_fn = guided_model(model, classifier, lambdas, guidance, cfg_w)
    device = torch.device(device)
    diffusion = ddpm.diffusion_from_config(diffusion_dict, respacing)
    C, S = model.config["in_channels"], model.config["image_size"]
    g = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    for clf in (classifier if isinstance(classifier, (list, tuple)) else [classifier] if classifier else []):
        clf.eval()
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        with plumbing.autocast(precision, device):  # multi_guidance_grad switches autocast off for g
            x = diffusion.sample_loop(net, (b, C, S, S), sampler=sampler, eta=eta, cond_fn=cond_fn,
                                      generator=g, device=device, progress=progress)
        out.append(x.float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = plumbing.OneLineParser(description="Sample a DDPM with multi-guidance (paper Sec. 4.2, Eq. 2).",
                                    renamed={"--n": "--n-samples", "--steps": "--sample-steps"})
    parser.add_argument("--ddpm", required=True, help="DDPM checkpoint (kind 'ddpm')")
    parser.add_argument("--classifier", nargs="+", default=None, metavar="CKPT",
                        help="noisy classifier checkpoint(s) (kind 'classifier'); several: Eq. 2's sum over "
                             "classifiers, each matching the DDPM (image size, channels, diffusion)")
    parser.add_argument("--guidance", choices=["classifier", "free"], default="classifier",
                        help="classifier: the noisy classifiers' gradient (Eq. 2); free: classifier-free "
                             "multi-guidance of a class-conditional DDPM (App. J), no --classifier")
    parser.add_argument("--lambdas", type=plumbing.float_list, default=None,
                        help="guidance weights: one per class of the classifier, e.g. 30,30 (Sec. 5.5; default: "
                             "30 per class; without --classifier 0,0 = unconditional; 0,30 = single-class "
                             "guidance); several classifiers: one per class of each, in order, or one per "
                             "classifier. With --guidance free: our lambda form, one per class, "
                             "eps(null) + sum_m lambda_m (eps(y_m) - eps(null)), instead of --cfg-w")
    parser.add_argument("--cfg-w", type=plumbing.finite_float, default=None,
                        help=f"with --guidance free: w of the authors' released sampler, eps = -w eps(null) + "
                             f"(1 + w) mean_m eps(y_m) (default: {CFG_W:g}, theirs); the same mix as --lambdas "
                             f"(1 + w) / M on each of the M classes")
    plumbing.add_flags(parser, "n_samples", "sample_steps")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="ancestral or DDIM")
    parser.add_argument("--eta", type=plumbing.nonnegative_float, default=0.0, help="DDIM noise (0 = deterministic)")
    plumbing.add_flags(parser, "batch", "seed", "device", "threads")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast of the DDPM forward (fp16 needs CUDA); the guidance is always fp32")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA ones")
    plumbing.add_flags(parser, "out", "overwrite")
    args = parser.parse_args(argv)
    if args.guidance == "free" and args.classifier is not None:
        parser.error("--guidance free uses the DDPM's own labels; drop --classifier")
    if args.cfg_w is not None and args.guidance != "free":
        parser.error("--cfg-w weighs classifier-free guidance; use it with --guidance free")
    if args.cfg_w is not None and args.lambdas is not None:
        parser.error("--cfg-w and --lambdas parametrise the same classifier-free mix (lambda_m = (1 + w) / M); "
                     "give one of them")
    plumbing.check_out_folder(args.out)
    args.device = str(plumbing.check_device(args.device))
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    plumbing.set_threads(args.threads)
    return parser, args


def main(argv=None):
    parser, args = parse_args(argv)
    plumbing.refuse_overwrite(args.out, ["samples.npz", "samples.png", "samples.json"], args.overwrite)
    with plumbing.RunLock(args.out):
        return run(parser, args)


def free_weights(parser, args, model):
    """--guidance free: the per-class lambdas of the mix (from --lambdas, or from --cfg-w, default CFG_W)."""
    if not getattr(model, "num_classes", 0):
        parser.error(f"--guidance free needs a class-conditional DDPM; {args.ddpm} is unconditional "
                     f"(train one with train.py --guidance free)")
    if args.lambdas is None:
        args.cfg_w = CFG_W if args.cfg_w is None else args.cfg_w
        return cfg_w_lambdas(args.cfg_w, model.num_classes)
    if len(args.lambdas) != model.num_classes:
        parser.error(f"--lambdas gives {len(args.lambdas)} weights, but DDPM {args.ddpm} has "
                     f"{model.num_classes} classes")
    return args.lambdas


def classifier_weights(parser, args, clfs):
    """--guidance classifier: (the classifier, or the list of them, or None; the per-class lambdas)."""
    if not clfs:
        args.lambdas = [0.0, 0.0] if args.lambdas is None else args.lambdas
        if any(args.lambdas):
            parser.error(f"--lambdas {args.lambdas} guide, so they need --classifier (0,0 samples unconditionally)")
        return None, args.lambdas
    sizes = [c.num_classes for c in clfs]
    args.lambdas = [30.0] * sum(sizes) if args.lambdas is None else args.lambdas
    if len(clfs) == 1:
        if len(args.lambdas) != sizes[0]:
            parser.error(f"--lambdas gives {len(args.lambdas)} weights, but classifier {args.classifier[0]} has "
                         f"{sizes[0]} classes")
        return clfs[0], args.lambdas
    if len(args.lambdas) not in (sum(sizes), len(clfs)):
        listed = ", ".join(f"{p} ({m})" for p, m in zip(args.classifier, sizes))
        parser.error(f"--lambdas gives {len(args.lambdas)} weights for {len(clfs)} classifiers with {sum(sizes)} "
                     f"classes in all ({listed}); give one per class ({sum(sizes)}) or one per classifier ({len(clfs)})")
    return clfs, torch.cat(classifier_lambdas(clfs, args.lambdas)).tolist()


def run(parser, args):
    """Check the checkpoints and the weights against each other, sample, write samples.npz/png/json."""
    model, d, clfs = load_models(args.ddpm, args.classifier, device=args.device, use_ema=not args.no_ema)
    if args.guidance == "free":
        clf, per_class = None, free_weights(parser, args, model)
    else:
        clf, per_class = classifier_weights(parser, args, clfs)
    try:
        ddpm.check_chain(d["T"], args.sample_steps)
    except ValueError as e:
        parser.error(f"--sample-steps: {e}")
    weights = f"w {args.cfg_w:g}" if args.cfg_w is not None else f"lambdas {args.lambdas}"
    print(f"multiguide | DDPM {args.ddpm} | {args.guidance} guidance | classifier(s) {args.classifier} | {weights} | "
          f"{args.n_samples} samples, {args.sample_steps} {args.sampler} steps, seed {args.seed} | out {os.path.abspath(args.out)}")
    x = sample(model, d, args.n_samples, classifier=clf, lambdas=None if args.cfg_w is not None else args.lambdas,
               respacing=args.sample_steps, sampler=args.sampler, eta=args.eta, batch=args.batch, seed=args.seed,
               device=args.device, precision=args.precision, guidance=args.guidance, cfg_w=args.cfg_w)
    images = plumbing.to_uint8(x)                                         # (N, S, S, 3) uint8
    extra = {} if args.cfg_w is None else dict(cfg_w=np.float64(args.cfg_w))
    plumbing.write_npz(os.path.join(args.out, "samples.npz"), images=images,   # lambdas: per class, every classifier
                       lambdas=np.asarray(per_class, dtype=np.float64), **extra)
    S = images.shape[1]
    plumbing.save_grid(images[:64], os.path.join(args.out, "samples.png"), scale=max(1, 64 // S))
    plumbing.write_json(vars(args), os.path.join(args.out, "samples.json"))
    print(f"wrote {len(images)} samples of {S}x{S} to {os.path.join(args.out, 'samples.npz')} and samples.png")


if __name__ == "__main__":
    plumbing.guard(main)
