"""Improved DDPM's loss-aware sampling of t, measured on the circles default (a benchmark, not a preset).

Which noise levels should training show the network? `fit.ddpm_loss` draws t uniformly (the paper,
`--t-tilt 0`) or from ddpm.timestep_probs (the circles CPU preset, `--t-tilt 4`). Improved DDPM
(Nichol & Dhariwal 2021, Sec. 3.3) proposes a third way, importance sampling by the loss:

    keep the last `history` = 10 losses seen at every t; until every t has 10, draw t uniformly;
    then p(t) = (1 - u) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + u / T   with u = 0.001,
    and weight each example's loss by 1 / (T p(t)), so the objective stays the uniform mean over t
    (unbiased) while its gradient is estimated with less variance.

This script runs `train.py` with that draw of t in place of fit.ddpm_loss's; every option goes to
train.py unchanged. Its history lives in memory only, so `--resume` is refused; classifier-free
guidance (`--guidance free`, `--cfg`) is not supported; both are refused before anything is written.
What it did to the circles default (docs/RESULTS.md, "Which t training should see"): L_hybrid is
largest near the clean end, so it spends about two thirds of the draws on t < 100, and its unguided
samples were empty about three times as often (seed 0).

Run:  python benchmarks/loss_aware_t.py --data circles --seed 0 --out runs/loss_aware_t
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # as a script: make zsi importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fit  # noqa: E402
import plumbing  # noqa: E402
import train  # noqa: E402


class LossAwareT:
    """The loss-second-moment sampler of t over a chain of T steps (improved DDPM, Sec. 3.3)."""

    def __init__(self, T, history=10, uniform=0.001):
        self.T, self.history, self.uniform = T, history, uniform
        self.losses = torch.zeros(T, history, dtype=torch.float64)  # the last `history` losses at each t
        self.seen = torch.zeros(T, dtype=torch.long)                 # how many of them are filled

    def probs(self):
        """p(t), float64 (T,): uniform until every t holds `history` losses, then by sqrt(E[L_t^2])."""
        if (self.seen < self.history).any():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = self.losses.pow(2).mean(dim=1).sqrt()
        return (1 - self.uniform) * w / w.sum() + self.uniform / self.T

    def update(self, t, losses):
        """Append each example's loss to its t's history (the oldest one drops out when full)."""
        for ti, loss in zip(t.tolist(), losses.detach().double().tolist()):
            if self.seen[ti] == self.history:
                self.losses[ti] = torch.roll(self.losses[ti], -1)
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, self.seen[ti]] = loss
                self.seen[ti] += 1


def loss_aware_ddpm_loss(diffusion, x0, hflip=True, labels=None, label_dropout=0.0, swap_labels=True, t_tilt=0.0):
    """fit.ddpm_loss (same signature; label_dropout and t_tilt unused) with t drawn by LossAwareT and each
    loss weighted by 1 / (T p(t)); the batch and eps come from the step's generator as in fit.ddpm_loss.
    The sampler is `loss_fn.sampler`."""
    if labels is not None:
        raise ValueError("loss_aware_t: classifier guidance only (an unconditional DDPM); drop --cfg")
    sampler = LossAwareT(diffusion.num_timesteps)

    def loss_fn(net, batch, g):
        x, _ = fit.draw_batch(x0, None, batch, g, hflip, swap_labels)
        p = sampler.probs()
        t = torch.multinomial(p.float().to(g.device), batch, replacement=True, generator=g).to(x0.device)
        noise = torch.randn(x.shape, generator=g, device=g.device).to(x0.device)
        terms = diffusion.training_losses(net, x, t, noise)
        sampler.update(t.cpu(), terms["loss"])
        weight = (1.0 / (diffusion.num_timesteps * p[t.cpu()])).float().to(x0.device)
        return dict(terms, loss=terms["loss"] * weight, t_below_100=(t < 100).float())
    loss_fn.sampler = sampler
    return loss_fn


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # train.py's parser first (abbreviations, --flag=value, every check of train.py; nothing is written),
    # then what this sampler cannot do, read off the parsed configuration rather than the raw words
    cfg = train.parse_config(argv)
    if cfg.resume:
        raise SystemExit("loss_aware_t.py: --resume is not supported (the sampler's history lives in memory, "
                         "not in the checkpoint): start a new run without it")
    if cfg.guidance != "classifier":
        raise SystemExit(f"loss_aware_t.py: --guidance {cfg.guidance} (--cfg) is not supported (an unconditional "
                         "DDPM, classifier guidance only): drop it, or use --guidance classifier")
    fit.ddpm_loss = loss_aware_ddpm_loss  # train.py calls fit.ddpm_loss: every other line is train.py's
    train.main(argv)


if __name__ == "__main__":
    plumbing.guard(main)
