"""ddpm.py -- the diffusion process of the improved-DDPM recipe, written out equation by equation.

What this file is
    The forward (noising) process, its Gaussian posterior, the learned reverse process, the
    training losses L_simple / L_vlb / L_hybrid, and the two samplers (ancestral DDPM with an
    optional guidance gradient, deterministic-or-not DDIM). Everything the paper uses from
    Nichol & Dhariwal (2021) lives here; the network is any callable ``model(x, t)``.

Where it is in the paper (Deschenaux et al., ICML 2024)
    App. A.1 Eq. 4      q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps      -> q_sample
    App. A.2 Eq. 5, 6   posterior q(x_{t-1} | x_t, x_0) = N(mu~, beta~)                   -> q_posterior
    App. A.2 Eq. 7      mean from the predicted noise eps_theta                            -> p_mean_variance
    App. A.2 Eq. 8      learned variance exp(v log beta + (1 - v) log beta~)               -> p_mean_variance
    App. A.3 Eq. 9      L_vlb = L_0 + ... + L_T, KL terms between Gaussians                -> training_losses
    App. A.3 Eq. 10     cosine schedule                                                    -> get_betas
    App. A.3            L_hybrid = L_simple + 0.001 L_vlb, stop-gradient on the mean       -> training_losses
    Sec. 2.2            guided mean mu + sigma^2 g                                          -> p_sample(cond_fn)
    App. C              sampling with 250 of the 4000 steps ("respacing")                  -> space_timesteps
    (Training's t: uniform in the paper; tilted toward noise by the CPU preset.)             -> timestep_probs
    (What the network predicts: eps in the paper; the velocity in the circles CPU preset.)   -> Diffusion(prediction)
    (DDIM: Song et al. 2021, Eq. 12; used by the paper's App. M and N.)                    -> ddim_step

Conventions
    * Timesteps are 0-based as in the reference code: index t = 0 .. T-1 stands for the paper's
      step t+1. ``betas[0]`` is beta_1 and ``alphas_cumprod[t]`` is abar_{t+1}.
    * Schedules are computed in float64 numpy and stored as float32 torch tensors named after
      their symbols. A respaced process keeps a subset S of the original steps; its betas are
      recomputed from abar on S, and the network always receives the ORIGINAL step index
      (``timestep_map[t]``), so one trained network serves every respacing.
    * Images live in [-1, 1]; bits per dimension use the 256-level discretisation.

Run it
    python ddpm.py --schedule cosine --T 4000 --sample-steps 250   # prints the schedule's key numbers
"""
import math
import os

import numpy as np
import torch

import plumbing


# ----------------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------------

def get_betas(schedule, T):
    """Noise schedule beta_1..beta_T as a float64 numpy array of length T.

    "cosine" (App. A.3, Eq. 10): abar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) pi/2),
        s = 0.008, and beta_t = 1 - abar(t) / abar(t-1), clipped at 0.999 so the last steps stay
        finite (abar(T) = 0 exactly).
    "linear" (Ho et al. 2020): beta from 1e-4 to 0.02 over 1000 steps; for other T both ends are
        scaled by 1000 / T so the total noise stays comparable (the improved-DDPM convention).
    """
    if T < 1:
        raise ValueError(f"T must be a positive number of diffusion steps, got {T}")
    ### BEGIN SOLUTION a1: the cosine schedule (Eq. 10) and the linear one, float64 arrays of length T
    if schedule == "cosine":
        s = 0.008
        f = lambda t: np.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731  Eq. 10
        t = np.arange(T + 1, dtype=np.float64)
        alpha_bar = f(t) / f(0.0)
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    if schedule == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    ### END SOLUTION
    raise ValueError(f"unknown schedule {schedule!r}; expected 'cosine' or 'linear'")


def space_timesteps(T, spec):
    """Which of the T original steps a respaced sampler keeps, as a sorted list.

    spec "250": 250 steps spread evenly over [0, T-1] (first and last included, positions rounded
        with Python's round, i.e. half to even, as the reference code does).
    spec "10,15,20": the T steps are cut into 3 equal sections (the first T % 3 get one extra step)
        and each section keeps that many evenly spread steps -- more steps where they matter.
    spec "ddimN": a fixed stride k, the smallest with len(range(0, T, k)) == N (DDIM's choice).
    """
    ### BEGIN SOLUTION a3: the kept steps of 'N', 'n1,n2,...' and 'ddimN'; ValueError when impossible
    spec = str(spec)
    if spec.startswith("ddim"):
        desired = int(spec[len("ddim"):])
        for stride in range(1, T):
            if len(range(0, T, stride)) == desired:
                return list(range(0, T, stride))
        if desired == T:
            return list(range(T))
        raise ValueError(f"cannot keep exactly {desired} of {T} steps with a fixed stride ({spec!r})")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"bad respacing {spec!r}; expected e.g. '250', '10,15,20' or 'ddim50'") from None
    size_per, extra = divmod(T, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"respacing {spec!r}: section {i} has {size} steps, cannot keep {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))
    ### END SOLUTION


def check_schedule(schedule, T):
    """get_betas(schedule, T), refusing a schedule whose betas leave (0, 1): the linear one scales its betas
    by 1000 / T, so they pass 1 below T = 21."""
    betas = get_betas(schedule, T)
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError(f"the {schedule} schedule at T = {T} has betas {betas.min():.3g} .. {betas.max():.3g}; "
                         f"each must lie in (0, 1) (linear: T >= 21)")
    return betas


def check_chain(T, spec=None):
    """The steps a chain of T steps respaced by `spec` keeps (None keeps all T), refusing fewer than 2.

    A one-step chain has no reverse step to take: the variances need beta~ at chain index 1 (Eq. 6
    is 0 at index 0, and its log is clipped to index 1's value). The CLIs call this to turn
    "--sample-steps 1" into a one-line error before any work starts; Diffusion refuses it too.
    """
    kept = list(range(T)) if spec is None else space_timesteps(T, spec)
    if len(kept) < 2:
        what = f"T = {T} gives {len(kept)}" if spec is None else f"respacing {spec!r} keeps {len(kept)} of {T} steps"
        raise ValueError(f"a chain needs at least 2 steps; {what}")
    return kept


def timestep_probs(T, tilt=0.0):
    """The distribution training draws the chain index t = 0 .. T-1 from: p(t) proportional to
    1 + tilt * t / T, as a float64 numpy array that sums to 1.

    tilt = 0 is the uniform t of every DDPM paper (Ho et al.'s L_simple, improved DDPM, this paper).
    tilt > 0 draws the noisy end more often (tilt = 4: the noisiest step 5x as often as the cleanest),
    and the loss is NOT reweighted, so this changes the objective: E_{t ~ p}[L_t] instead of the mean
    over t. Why a short run wants it: whether a sample holds a circle at all, and where, is decided at
    high noise (docs/RESULTS.md, "When a sample goes bad"); an under-trained model that has not learnt
    those levels yet leaves samples empty. The circles CPU preset uses tilt = 4; --paper keeps 0.
    """
    if not tilt >= 0:
        raise ValueError(f"the tilt of p(t) must be >= 0 (0 = uniform), got {tilt}")
    w = 1.0 + tilt * np.arange(T, dtype=np.float64) / T
    return w / w.sum()


# ----------------------------------------------------------------------------------------------
# Closed forms shared by the losses
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL( N(mean1, e^logvar1) || N(mean2, e^logvar2) ) per element, in nats (the L_{t-1} of Eq. 9).

    KL = 1/2 [ -1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2) ].
    Arguments broadcast; any may be a Python float.
    """
    ### BEGIN SOLUTION a2: KL between two diagonal Gaussians, per element, in nats
    as_t = lambda v: v if torch.is_tensor(v) else torch.tensor(v)  # noqa: E731
    mean1, logvar1, mean2, logvar2 = map(as_t, (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
    ### END SOLUTION


def standard_normal_cdf(x):
    """Phi(x), the exact standard normal CDF via erf (the reference code uses a tanh approximation)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of 8-bit data x in [-1, 1] under N(means, e^(2 log_scales)) integrated over each bin.

    The L_0 decoder of Eq. 9 (Ho et al. 2020, Eq. 13): pixel value x covers [x - 1/255, x + 1/255];
    the two extreme bins extend to -inf and +inf. Returns log-probabilities in nats, shape of x.
    """
    ### BEGIN SOLUTION a2: log Gaussian mass of each 8-bit bin [x - 1/255, x + 1/255], open at -1 and 1
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))   # upper edge of the bin
    cdf_minus = standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))  # lower edge of the bin
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))                        # bin (-inf, x+]
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))    # bin [x-, +inf)
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))             # bin [x-, x+]
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_minus, log_delta))
    ### END SOLUTION


def mean_flat(x):
    """Mean over every dimension but the batch one: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


# ----------------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------------

PREDICTIONS = ("eps", "velocity")  # what the network's first C channels predict (Diffusion's prediction)


class Diffusion:
    """A Gaussian diffusion process over T steps (or a respaced subset of them) and its reverse.

    Diffusion(betas, learn_sigma=True, loss="hybrid", timesteps=None, prediction="eps")
        betas       : float64 array from get_betas, the ORIGINAL schedule (length T).
        learn_sigma : the network outputs 2C channels, eps and v (Eq. 8); False = fixed variance
                      beta~_t (the "fixed small" posterior variance of Ho et al.). Improved DDPM's
                      code, with its default flags, fixes beta_t instead ("fixed large"); Ho et al.
                      report that the two give similar samples.
        loss        : "hybrid" (L_simple + 0.001 L_vlb, the paper's choice), "simple" (L_simple;
                      needs learn_sigma=False since nothing would train the variance), or "kl"
                      (the full L_vlb estimate, which App. J reports as hard to train).
        timesteps   : the kept steps of a respaced process (from space_timesteps); None keeps all.
        prediction  : what the first C output channels predict. "eps" (the paper, Eq. 7) or "velocity",
                      u = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, their "v"; called
                      the velocity here because v is Eq. 8's variance output). Since x_t = sqrt(abar_t)
                      x_0 + sqrt(1 - abar_t) eps, a velocity u gives x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t)
                      u and eps = sqrt(abar_t) u + sqrt(1 - abar_t) x_t; everything downstream (Eq. 7, 8,
                      guidance, DDIM) sees eps and x_0 as before. Its L_simple, ||u - u_theta||^2, is the
                      eps loss divided by abar_t: it weights the noisy steps, where x_0 is hard to read
                      from an eps, far more. The circles CPU preset uses it (docs/RESULTS.md).

    After construction ``num_timesteps`` is the length of this (possibly respaced) chain and
    ``timestep_map[t]`` the original index the network is called with.
    """

    def __init__(self, betas, *, learn_sigma=True, loss="hybrid", timesteps=None, prediction="eps"):
        if loss not in ("hybrid", "simple", "kl"):
            raise ValueError(f"unknown loss {loss!r}; expected 'hybrid', 'simple' or 'kl'")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        self.prediction = prediction
        if loss == "simple" and learn_sigma:
            raise ValueError("loss='simple' trains no variance: use learn_sigma=False or loss='hybrid'")
        betas = np.asarray(betas, dtype=np.float64)
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"every beta must lie in (0, 1), got {betas.min():.3g} .. {betas.max():.3g} (check_schedule)")
        self.learn_sigma, self.loss_type = learn_sigma, loss
        self.original_num_steps = len(betas)
        self.timestep_map = list(range(len(betas)))
        if timesteps is not None:
            # Respacing: keep the steps in S and recompute beta from abar on S, so that the new
            # chain has exactly the marginals q(x_s | x_0) of the original one at every kept s.
            kept = sorted(set(int(s) for s in timesteps))
            if not kept or kept[0] < 0 or kept[-1] >= len(betas):
                raise ValueError(f"respaced timesteps must lie in [0, {len(betas) - 1}]")
            alpha_bar_full = np.cumprod(1.0 - betas)
            prev, new_betas = 1.0, []
            for s in kept:
                new_betas.append(1.0 - alpha_bar_full[s] / prev)
                prev = alpha_bar_full[s]
            betas, self.timestep_map = np.array(new_betas), kept
        if len(betas) < 2:
            raise ValueError(f"a chain needs at least 2 steps, got {len(betas)} (see check_chain)")
        self.num_timesteps = len(betas)
        self._compute_coefficients(betas)

    def _compute_coefficients(self, betas):
        """Every per-step coefficient, in float64, then stored as float32 tensors named by symbol."""
        alphas = 1.0 - betas                                              # alpha_t
        alphas_cumprod = np.cumprod(alphas)                               # abar_t
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])         # abar_{t-1}
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)          # abar_{t+1}
        # Eq. 6: posterior variance beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        coefficients = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            alphas_cumprod_next=alphas_cumprod_next,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),                       # Eq. 4
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),       # Eq. 4
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),           # x0 from eps
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),   # x0 from eps
            posterior_variance=posterior_variance,
            # beta~_0 = 0, so log beta~ at t = 0 is clipped to its value at t = 1.
            posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            log_betas=np.log(betas),
            # Eq. 5 (Ho et al. 2020, Eq. 7): mu~ = coef1 x_0 + coef2 x_t.
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        )
        self.float64 = coefficients  # kept for tests and for readers who want exact values
        for name, value in coefficients.items():
            setattr(self, name, torch.tensor(value, dtype=torch.float32))
        self._timestep_map = torch.tensor(self.timestep_map, dtype=torch.long)

    def _extract(self, coefficient, t, x):
        """coefficient[t] reshaped to (B, 1, 1, ...) so it broadcasts against x of shape (B, ...)."""
        values = coefficient.to(t.device)[t].to(x.dtype)
        return values.reshape(-1, *([1] * (x.dim() - 1)))

    def model_timesteps(self, t):
        """The ORIGINAL step indices that the network sees for this chain's indices t."""
        return self._timestep_map.to(t.device)[t]

    # --- forward process -----------------------------------------------------------------------

    def q_sample(self, x0, t, noise):
        """Eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        ### BEGIN SOLUTION a1: Eq. 4, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at the chain steps t
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)
        ### END SOLUTION

    def q_posterior(self, x0, xt, t):
        """Eq. 5-6: q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t) -> (mean, variance, log var)."""
        ### BEGIN SOLUTION a2: Eq. 5-6, the posterior mean, variance beta~_t and clipped log variance
        mean = (self._extract(self.posterior_mean_coef1, t, xt) * x0
                + self._extract(self.posterior_mean_coef2, t, xt) * xt)
        variance = self._extract(self.posterior_variance, t, xt)
        log_variance_clipped = self._extract(self.posterior_log_variance_clipped, t, xt)
        return mean, variance, log_variance_clipped
        ### END SOLUTION

    # --- reverse process -----------------------------------------------------------------------

    def p_mean_variance(self, model, xt, t, clip=True):
        """The learned reverse step p_theta(x_{t-1} | x_t) = N(mean, variance).

        Returns dict(mean, variance, log_variance, pred_x0, eps), each shaped like x_t.
        """
        C = xt.shape[1]
        out = model(xt, self.model_timesteps(t)).float()   # autocast may hand back bf16/fp16
        if self.learn_sigma:
            pred, v = out[:, :C], out[:, C:]                 # (B, 2C, H, W) -> eps (or velocity) and v
            # Eq. 8: log sigma^2 = v log beta_t + (1 - v) log beta~_t, with the raw output in
            # [-1, 1] mapped to v in [0, 1].
            frac = (v + 1.0) / 2.0
            log_variance = (frac * self._extract(self.log_betas, t, xt)
                            + (1.0 - frac) * self._extract(self.posterior_log_variance_clipped, t, xt))
            variance = torch.exp(log_variance)
        else:
            pred = out
            variance = self._extract(self.posterior_variance, t, xt).expand_as(xt)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        if self.prediction == "velocity":                    # x_0 and eps from u (class docstring)
            a, b = self._extract(self.sqrt_alphas_cumprod, t, xt), self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt)
            pred_x0, eps = a * xt - b * pred, a * pred + b * xt
        else:
            eps = pred
            pred_x0 = self.pred_x0_from_eps(xt, t, eps)     # invert Eq. 4 for x_0
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, xt, t)        # Eq. 7 written through Eq. 5
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)

    def pred_x0_from_eps(self, xt, t, eps):
        """Invert Eq. 4: x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps)

    def velocity(self, x0, t, noise):
        """The velocity target u = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 of x_t = q_sample(x0, t, noise)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def eps_from_pred_x0(self, xt, t, pred_x0):
        """Eq. 4 solved for eps: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, xt) * xt - pred_x0)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, xt))

    # --- losses --------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x0, xt, t, clip=False):
        """One term of Eq. 9 per example, in bits per dimension: L_{t-1} (a KL) for t > 0, L_0 at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(model, xt, t, clip=clip)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        # L_0: -log p_theta(x_0 | x_1) under the discretised Gaussian decoder.
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return dict(output=torch.where(t == 0, decoder_nll, kl), pred_x0=out["pred_x0"])

    def training_losses(self, model, x0, t, noise):
        """Per-example losses at chain indices t: dict(loss, mse, vb), each of shape (B,).

        hybrid: loss = mse + vb, where mse = ||eps - eps_theta||^2 / D (L_simple; with prediction
            "velocity", ||u - u_theta||^2 / D) and vb is the L_vlb term in bits/dim with a stop-gradient
            on that prediction (so on the mean: it trains only the variance), scaled by T/1000. That
            scaling is lambda = 0.001 of App. A.3: L_vlb sums T terms, i.e. T * E_t[L_t], and
            0.001 * T * E_t[L_t] = vb * T / 1000.
        simple: loss = mse.   kl: loss = vb * T (an unbiased estimate of the whole L_vlb).
        """
        C = x0.shape[1]
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t)).float()
        pred = out[:, :C]                                    # eps_theta, or u_theta
        target = noise if self.prediction == "eps" else self.velocity(x0, t, noise)
        terms = dict(mse=mean_flat((target - pred) ** 2))
        if self.loss_type == "kl":
            terms["vb"] = self._vb_terms_bpd(lambda *_: out, x0, xt, t)["output"]
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms
        if self.learn_sigma:
            ### BEGIN SOLUTION a2: the L_vlb term of L_hybrid: stop-gradient on pred, bits/dim, times T / 1000
            frozen = torch.cat([pred.detach(), out[:, C:]], dim=1)  # stop-gradient on the mean (App. A.3)
            terms["vb"] = self._vb_terms_bpd(lambda *_: frozen, x0, xt, t)["output"] * (self.num_timesteps / 1000.0)
            ### END SOLUTION
        else:
            terms["vb"] = torch.zeros_like(terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    @torch.no_grad()
    def losses_by_timestep(self, model, x0, timesteps, seed=0, batch=256):
        """The training loss resolved by noise level: for each chain index t of `timesteps`, the mean over
        the images x0 (N, C, H, W) of training_losses' mse (L_simple) and vb, one fixed noise draw per
        (t, image) from torch.Generator(seed + t) on x0's device (drawn for all N at once, so `batch`
        does not change the numbers). Returns dict(t, mse, vb): lists as long as timesteps.

        Why: the average loss that training logs weights every t alike, and a model can win it by
        fitting the nearly clean images (small t) exactly while it is still poor at the middle noise
        levels where a sample's shape is decided; this splits the average so that shows."""
        out = dict(t=[], mse=[], vb=[])
        for t in timesteps:
            t = int(t)
            if not 0 <= t < self.num_timesteps:
                raise ValueError(f"timestep {t} is outside this diffusion's chain 0 .. {self.num_timesteps - 1}")
            g = torch.Generator(device=x0.device).manual_seed(seed + t)
            noise = torch.randn(x0.shape, generator=g, device=x0.device)
            sums = dict(mse=0.0, vb=0.0)
            for start in range(0, len(x0), batch):
                xb = x0[start:start + batch]
                tt = torch.full((len(xb),), t, dtype=torch.long, device=x0.device)
                terms = self.training_losses(model, xb, tt, noise[start:start + batch])
                for k in sums:
                    sums[k] += float(terms[k].double().sum())
            out["t"].append(t)
            for k in sums:
                out[k].append(sums[k] / len(x0))
        return out

    def prior_bpd(self, x0):
        """L_T of Eq. 9 in bits/dim: KL(q(x_T | x_0) || N(0, I)); no parameters, ~0 for a good schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        log_variance = torch.log(self._extract(1.0 - self.alphas_cumprod, t, x0))
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, generator=None, progress=False):
        """The whole variational bound of Eq. 9 in bits/dim, (B,): sum_t L_t + L_T, one noise draw per t."""
        total = self.prior_bpd(x0)
        for i in plumbing.progress(range(self.num_timesteps - 1, -1, -1), "bpd", enabled=progress):
            t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device)
            xt = self.q_sample(x0, t, noise)
            total = total + self._vb_terms_bpd(model, x0, xt, t, clip=True)["output"]
        return total

    # --- samplers ------------------------------------------------------------------------------

    def p_sample(self, model, xt, t, clip=True, cond_fn=None, noise=None):
        """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, Algorithm 2), with optional guidance.

        cond_fn(x, t_model) returns a gradient g shaped like x (e.g. sum_m lambda_m grad log p(y_m|x_t));
        it is called with the ORIGINAL step index. Returns dict(sample, pred_x0, mean, variance).
        """
        # 1. predict eps and the variance, 2. x_0 from eps, 3. posterior mean (all in p_mean_variance)
        out = self.p_mean_variance(model, xt, t, clip=clip)
        mean = out["mean"]
        if cond_fn is not None:
            ### BEGIN SOLUTION a5: step 4, the guidance shift mu + Sigma g, g = cond_fn(x_t, original step)
            # 4. guidance shift (Sec. 2.2): mu~ = mu + Sigma g. The paper's text evaluates g at mu;
            #    the guided-diffusion recipe (and this code) evaluates it at x_t.
            mean = mean + out["variance"] * cond_fn(xt, self.model_timesteps(t)).float()
            ### END SOLUTION
        # 5. add noise, except at the last step (t = 0), which returns the mean.
        noise = torch.randn_like(xt) if noise is None else noise
        nonzero = (t != 0).float().reshape(-1, *([1] * (xt.dim() - 1)))
        sample = mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return dict(sample=sample, pred_x0=out["pred_x0"], mean=mean, variance=out["variance"])

    def ddim_step(self, model, xt, t, eta=0.0, noise=None, cond_fn=None, clip=True):
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12). eta = 0 is deterministic.

        With cond_fn, guidance acts on the score: eps <- eps - sqrt(1 - abar_t) g (Dhariwal & Nichol
        2021, Algorithm 2). Returns dict(sample, pred_x0, eps).
        """
        ### BEGIN SOLUTION a3: one DDIM step (Song et al. Eq. 12) with sigma_t(eta), guidance on eps
        # 1. predict eps (and x_0)
        out = self.p_mean_variance(model, xt, t, clip=clip)
        eps = out["eps"]
        if cond_fn is not None:
            # 2. guidance on the score
            eps = eps - self._extract(self.sqrt_one_minus_alphas_cumprod, t, xt) * cond_fn(xt, self.model_timesteps(t)).float()
            pred_x0 = self.pred_x0_from_eps(xt, t, eps)
            pred_x0 = pred_x0.clamp(-1.0, 1.0) if clip else pred_x0
        else:
            pred_x0 = out["pred_x0"]
        # 3. the eps consistent with the (possibly clipped) x_0
        eps = self.eps_from_pred_x0(xt, t, pred_x0)
        abar = self._extract(self.alphas_cumprod, t, xt)
        abar_prev = self._extract(self.alphas_cumprod_prev, t, xt)
        # 4. sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # 5. x_{t-1} = sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma^2) eps + sigma z
        mean = torch.sqrt(abar_prev) * pred_x0 + torch.sqrt(1 - abar_prev - sigma ** 2) * eps
        noise = torch.randn_like(xt) if noise is None else noise
        nonzero = (t != 0).float().reshape(-1, *([1] * (xt.dim() - 1)))
        return dict(sample=mean + nonzero * sigma * noise, pred_x0=pred_x0, eps=eps)
        ### END SOLUTION

    def ddim_reverse_step(self, model, xt, t, clip=False):
        """Deterministic DDIM inversion x_t -> x_{t+1}: the eta = 0 update run backwards in time."""
        out = self.p_mean_variance(model, xt, t, clip=clip)
        eps = self.eps_from_pred_x0(xt, t, out["pred_x0"])
        abar_next = self._extract(self.alphas_cumprod_next, t, xt)
        return dict(sample=torch.sqrt(abar_next) * out["pred_x0"] + torch.sqrt(1 - abar_next) * eps,
                    pred_x0=out["pred_x0"])

    def sample_loop(self, model, shape, *, sampler="ddpm", eta=0.0, noise=None, cond_fn=None,
                    clip=True, generator=None, device="cpu", progress=True, start_t=None, stop_t=-1):
        """Draw samples: start from x_T = noise (or N(0, I)) and apply p_sample or ddim_step repeatedly.

        sampler    : "ddpm" (ancestral, Algorithm 2) or "ddim" (eta controls the noise).
        generator  : a torch.Generator for every random draw, so a seed fixes the samples.
        start_t    : the chain level of ``noise`` (default T-1, pure noise); step i maps level i to
                     level i-1, so e.g. a partial DDIM inversion to level L is decoded with start_t=L.
        stop_t     : the level to stop at; -1 (default) is the clean image.
        """
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
        device = generator.device if generator is not None else torch.device(device)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        start = self.num_timesteps - 1 if start_t is None else start_t
        for i in plumbing.progress(range(start, stop_t, -1), f"{sampler} sampling", enabled=progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            with torch.no_grad():  # a cond_fn turns gradients back on for its own backward pass
                if sampler == "ddpm":
                    x = self.p_sample(model, x, t, clip=clip, cond_fn=cond_fn, noise=z)["sample"]
                else:
                    x = self.ddim_step(model, x, t, eta=eta, noise=z, cond_fn=cond_fn, clip=clip)["sample"]
        return x

    def ddim_invert(self, model, x, start_t=0, stop_t=None, progress=False):
        """Deterministic DDIM encoding from level start_t up to level stop_t (default T-1).

        A clean image is passed with start_t=0: step 0 treats it as x at level 0 (abar_0 ~ 1), the
        usual DDIM-inversion approximation. The result is what sample_loop(sampler="ddim", eta=0,
        start_t=stop_t) decodes; encode-then-decode is exact when eps_theta is the exact noise of a
        single data point, and otherwise off by the discretisation error of the ODE.
        """
        stop = self.num_timesteps - 1 if stop_t is None else stop_t
        for i in plumbing.progress(range(start_t, stop), "ddim inversion", enabled=progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            with torch.no_grad():
                x = self.ddim_reverse_step(model, x, t)["sample"]
        return x


# ----------------------------------------------------------------------------------------------
# Checkpoints: a trained model as one self-describing file
# ----------------------------------------------------------------------------------------------

def diffusion_from_config(d, respacing=None):
    """A Diffusion from the dict every zsi checkpoint stores under "diffusion":
    {schedule, T, learn_sigma, loss, respacing, prediction}. `respacing` overrides the stored one (e.g.
    "50" to sample with 50 steps from a model trained on all T); "" or None keeps all T steps. A dict
    without "prediction" (written before it existed) predicts eps."""
    spec = d.get("respacing") if respacing is None else respacing
    kept = space_timesteps(d["T"], spec) if spec else None
    return Diffusion(get_betas(d["schedule"], d["T"]), learn_sigma=d["learn_sigma"], loss=d["loss"], timesteps=kept,
                     prediction=d.get("prediction", "eps"))


def forward_demo(path, T=1000, size=32, radius=6.0, seed=0):
    """A picture of the forward process: x_t of one white disc for several t under both schedules
    (the same eps for every panel, Eq. 4), and abar_t against t / T for both schedules (Eq. 10).
    Writes a PNG to `path` and returns {schedule: abar (T,) float64}. Used by TUTORIAL.md."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    rows, cols = np.indices((size, size))
    x0 = np.where((cols - size / 2) ** 2 + (rows - size / 2) ** 2 <= radius ** 2, 1.0, -1.0)  # white disc on black
    eps = np.random.default_rng(seed).standard_normal((size, size))
    steps = [0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1]
    fig = Figure(figsize=(7.2, 4.6), dpi=72, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, len(steps))
    abars = {}
    for r, schedule in enumerate(("cosine", "linear")):
        abars[schedule] = abar = np.cumprod(1.0 - get_betas(schedule, T))
        for c, t in enumerate(steps):
            xt = np.sqrt(abar[t]) * x0 + np.sqrt(1.0 - abar[t]) * eps          # Eq. 4
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(xt, cmap="gray", vmin=-1.5, vmax=1.5, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"t={t}", fontsize=8)
            if c == 0:
                ax.set_ylabel(schedule, fontsize=9)
    ax = fig.add_subplot(grid[2, :])
    for schedule, abar in abars.items():
        ax.plot(np.arange(T) / T, abar, label=f"{schedule}: abar_t")
    ax.set_xlabel("t / T")
    ax.set_ylabel("abar_t")
    ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return abars


def main(argv=None):
    parser = plumbing.OneLineParser(description="Print the key numbers of a diffusion schedule.",
                                    renamed={"--respace": "--sample-steps", "--demo": "--out"})
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="noise schedule")
    parser.add_argument("--T", type=plumbing.positive_int, default=4000, help="number of diffusion steps")
    plumbing.add_flags(parser, sample_steps="250")
    parser.add_argument("--out", default="", help="also write OUT/forward_process.png: x_t for several t, abar_t "
                        "of both schedules ('' = print only)")
    plumbing.add_flags(parser, "overwrite")
    args = parser.parse_args(argv)
    if args.T < 2:
        parser.error(f"--T must be >= 2 (a chain needs two steps), got {args.T}")
    for schedule in ("cosine", "linear") if args.out else (args.schedule,):  # the figure draws both
        plumbing.vet(parser, "--T", check_schedule, schedule, args.T)
    betas = get_betas(args.schedule, args.T)
    try:
        kept = check_chain(args.T, args.sample_steps)
    except ValueError as e:
        parser.error(f"--sample-steps: {e}")
    if args.out:
        plumbing.check_out_folder(args.out)
        plumbing.refuse_overwrite(args.out, ["forward_process.png"], args.overwrite)
    d = Diffusion(betas, timesteps=kept)
    abar = np.cumprod(1 - betas)
    print(f"{args.schedule} schedule, T = {args.T}: beta_1 = {betas[0]:.6g}, beta_T = {betas[-1]:.6g}, "
          f"abar at T/2 = {abar[args.T // 2]:.6g}")
    print(f"respacing {args.sample_steps!r}: {d.num_timesteps} steps, first kept {kept[:6]}, last {kept[-3:]}")
    print(f"respaced betas: first {d.float64['betas'][0]:.6g}, last {d.float64['betas'][-1]:.6g}")
    if args.out:
        path = os.path.join(args.out, "forward_process.png")
        abars = forward_demo(path, T=args.T)
        half = {s: f"{a[args.T // 2]:.3f}" for s, a in abars.items()}
        print(f"abar at t = T/2: {half}; wrote {path}")


if __name__ == "__main__":
    plumbing.guard(main)
