"""`--paper` is the authors' released configuration: `train.py --print-config` compared field by field.

The table below holds the released values. Circles: the authors' released training and sampling
configuration for Sec. 5.5 (guided-diffusion's flags: image_size, num_channels, channel_mult,
num_res_blocks, attention_resolutions, learn_sigma, diffusion_steps, noise_schedule, use_kl,
timestep_respacing (training: none; sampling: 64), lr, batch_size, use_fp16, ema_rate, dropout;
the classifier's width, depth, iterations and lr; the sampler's classifier scales and sample count),
with no gradient clipping and an EMA without warm-up. Faces: App. C of the paper.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT

RELEASED = {
    "circles": {
        ("config", "image_size"): 64, ("denoiser", "model_channels"): 128, ("denoiser", "channel_mult"): [1, 2, 3, 4],
        ("denoiser", "num_res_blocks"): 3, ("denoiser", "attention_resolutions"): [16, 8],
        ("denoiser", "learn_sigma"): True, ("denoiser", "dropout"): 0.0, ("config", "T"): 4000,
        ("config", "schedule"): "cosine", ("config", "loss"): "hybrid", ("config", "train_respacing"): "",
        ("config", "t_tilt"): 0.0, ("config", "prediction"): "eps", ("config", "sample_respacing"): "64", ("ddpm_fit", "lr"): 1e-4, ("ddpm_fit", "batch"): 64,
        ("ddpm_fit", "precision"): "fp16", ("ddpm_fit", "ema"): 0.9999, ("ddpm_fit", "ema_warmup"): False,
        ("ddpm_fit", "grad_clip"): 0.0, ("ddpm_fit", "warmup"): 0, ("ddpm_fit", "steps"): 30000,
        ("ddpm_fit", "weight_decay"): 0.0, ("classifier", "model_channels"): 64, ("classifier", "num_res_blocks"): 2,
        ("classifier_fit", "steps"): 3000, ("classifier_fit", "lr"): 3e-4, ("config", "lambdas"): "30,30",
        ("config", "n_samples"): 1000, ("config", "runs"): 10, ("config", "sampler"): "ddpm",
    },
    "celeba": {  # App. C
        ("config", "image_size"): 64, ("denoiser", "model_channels"): 128, ("denoiser", "num_res_blocks"): 3,
        ("denoiser", "attention_resolutions"): [32, 16, 8], ("denoiser", "learn_sigma"): True, ("config", "T"): 4000,
        ("config", "schedule"): "cosine", ("config", "loss"): "hybrid", ("config", "train_respacing"): "",
        ("config", "t_tilt"): 0.0, ("config", "prediction"): "eps", ("config", "sample_respacing"): "250", ("ddpm_fit", "lr"): 1e-4, ("ddpm_fit", "steps"): 250000,
        ("ddpm_fit", "weight_decay"): 0.0, ("ddpm_fit", "ema"): 0.9999, ("ddpm_fit", "ema_warmup"): False,
        ("ddpm_fit", "grad_clip"): 0.0, ("classifier_fit", "steps"): 150000, ("classifier_fit", "lr"): 3e-4,
        ("config", "lambdas"): "30,30", ("config", "n_samples"): 10000, ("config", "subset"): "60k",
    },
}


def print_config(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args, "--print-config"], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("data", ["circles", "celeba"])
def test_paper_preset_is_the_released_configuration(data):
    got = print_config("--data", data, "--paper")      # resolves the numbers only: no data needed
    wrong = {f"{a}.{b}": (got[a][b], want) for (a, b), want in RELEASED[data].items() if got[a][b] != want}
    assert not wrong, wrong


def test_the_cpu_default_keeps_its_own_numbers():
    got = print_config("--data", "circles")
    digits = print_config("--data", "digits")["config"]
    assert got["config"]["t_tilt"] == 4.0 and digits["t_tilt"] == 0.0
    assert got["config"]["prediction"] == "velocity" and digits["prediction"] == "eps"   # measured on circles only
    assert print_config("--data", "corners")["config"]["prediction"] == "eps"
    assert got["ddpm_fit"]["ema_warmup"] is True and got["ddpm_fit"]["grad_clip"] == 1.0
    assert got["config"]["image_size"] == 32 and got["denoiser"]["stem"] == 2
