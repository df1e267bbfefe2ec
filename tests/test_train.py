"""The trainer: smoke runs, exact resume, DDP replicas, bf16 on the CPU, refusal of bad input."""
import hashlib
import json
import os
import shutil
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddpm
import fit
import plumbing
import toy_circles
import train

from conftest import ENV, ROOT  # noqa: E402
TINY = ["--data", "circles", "--unet", "tiny", "--image-size", "16", "--T", "100", "--batch", "8",
        "--log-every", "5", "--ckpt-every", "5", "--grid-every", "0", "--sample-respacing", "5", "--threads", "1",
        "--regressor-steps", "4", "--clf", "tiny", "--clf-steps", "5", "--clf-batch", "8", "--n-samples", "8"]


def run_cli(*args, script="train.py", timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_twenty_step_smoke_run(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*TINY, "--steps", "20", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = plumbing.load_checkpoint(str(out / "ddpm.pt"), "ddpm")
    assert ckpt["step"] == 20 and [row["step"] for row in ckpt["log"]] == [5, 10, 15, 20]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in ckpt["log"])
    assert ckpt["model_config"]["image_size"] == 16 and ckpt["diffusion"]["T"] == 100
    assert set(ckpt) >= {"model", "ema", "optimizer", "scaler", "identity", "model_config", "diffusion"}
    assert (out / "config.json").exists() and (out / "grids" / "ddpm_step000020.png").exists()
    assert str(out) in r.stdout                       # the output folder is printed
    # the EMA weights differ from the raw ones after training, and rebuild a working U-Net
    import unet
    model = unet.UNet(**ckpt["model_config"])
    model.load_state_dict(ckpt["ema"])
    assert model(torch.zeros(1, 3, 16, 16), torch.tensor([3])).shape == (1, 6, 16, 16)


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*TINY, "--steps", "12", "--out", str(a)).returncode == 0
    r = run_cli(*TINY, "--steps", "12", "--out", str(b), "--stop-at", "7")
    assert r.returncode == 0, r.stderr[-2000:]
    assert plumbing.load_checkpoint(str(b / "ddpm.pt"))["step"] == 7
    assert "paused at step 7" in r.stdout and "HEADLINE" not in r.stdout     # a pause: checkpoint only
    assert not (b / "results.json").exists() and not (b / "classifier0.pt").exists()
    r = run_cli(*TINY, "--steps", "12", "--out", str(b), "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout + r.stderr
    ca, cb = plumbing.load_checkpoint(str(a / "ddpm.pt")), plumbing.load_checkpoint(str(b / "ddpm.pt"))
    assert cb["step"] == 12
    for key in ("model", "ema"):
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs after resume"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    # The logs too: step 7 split the interval 6..10, whose running sums the checkpoint carried over.
    wall = ("img_per_s", "wall_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in wall} for r in rows]  # noqa: E731
    assert strip(cb["log"]) == strip(ca["log"]) and [r["step"] for r in ca["log"]] == [5, 10, 12]
    la, lb = (fit.read_train_log(p / "logs" / "ddpm" / "train_log.csv") for p in (a, b))
    assert strip(la) == strip(lb) and len(la) == 3
    # The report's times are what the outputs cost over both processes: the DDPM's includes the 7 steps of
    # the paused process (its checkpoint carried their time), and says so.
    t = json.load(open(b / "results.json"))["timings_s"]
    assert t["ddpm_training_s"] >= cb["interval"]["wall_s"] >= lb[-1]["wall_s"] and t["credited_s"] > 0
    assert "This run was resumed" in (b / "report.md").read_text()
    # Resumed once more, finished: nothing is trained or drawn, and every stage still reports its cost.
    r = run_cli(*TINY, "--steps", "12", "--out", str(b), "--resume")
    t2 = json.load(open(b / "results.json"))["timings_s"]
    drawn = float(np.load(b / "samples" / "unconditional.npz")["seconds"])
    assert drawn > 0 and t2["unguided_sampling_s"] >= drawn and t2["ddpm_training_s"] >= cb["interval"]["wall_s"]
    assert t2["total_s"] >= t2["credited_s"] >= cb["interval"]["wall_s"] + drawn


def test_dit_backbone_trains_and_its_checkpoint_rebuilds_a_dit(tmp_path):
    # App. J: the same pipeline with a transformer denoiser, selected by one flag
    import dit
    import multiguide
    out = tmp_path / "dit"
    r = run_cli(*TINY, "--backbone", "dit", "--dit", "tiny", "--steps", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DiT 'tiny'" in r.stdout
    ckpt = plumbing.load_checkpoint(str(out / "ddpm.pt"), "ddpm")
    assert ckpt["backbone"] == "dit" and ckpt["model_config"]["patch_size"] == 2
    model, d, _ = multiguide.load_models(str(out / "ddpm.pt"))
    assert isinstance(model, dit.DiT) and model(torch.zeros(1, 3, 16, 16), torch.tensor([3])).shape == (1, 6, 16, 16)
    r = run_cli(*TINY, "--backbone", "dit", "--attention", "8", "--out", str(tmp_path / "bad"))
    assert r.returncode != 0 and "--attention" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_input_is_refused_with_one_line(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TINY, "--steps", "5", "--out", str(out)).returncode == 0
    before = digest(out / "ddpm.pt")
    cases = [
        (["--data", "faces"], "invalid choice"),
        (["--steps", "0", "--out", str(tmp_path / "x")], "--steps must be > 0"),
        (["--out", str(out / "config.json")], "is a file"),
        (["--steps", "5", "--out", str(out)], "already holds a run"),
        (["--steps", "5", "--out", str(out), "--resume", "--lr", "0.5"], "--lr"),
        (["--steps", "5", "--out", str(out), "--precision", "fp16"], "fp16 needs a CUDA device"),
        (["--sample-respacing", "ddim999", "--out", str(tmp_path / "y")], "--sample-respacing"),
        (["--t-tilt", "-1", "--out", str(tmp_path / "z")], "--t-tilt must be >= 0"),
    ]
    for args, message in cases:
        r = run_cli(*TINY, *args)
        assert r.returncode != 0, args
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert digest(out / "ddpm.pt") == before          # nothing was overwritten
    # A truncated checkpoint: one line, non-zero exit.
    data = open(out / "ddpm.pt", "rb").read()
    open(out / "ddpm.pt", "wb").write(data[: len(data) // 2])
    r = run_cli(*TINY, "--steps", "10", "--out", str(out), "--resume")
    assert r.returncode != 0 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_bf16_autocast_on_cpu(tmp_path):
    r = run_cli(*TINY, "--steps", "6", "--precision", "bf16", "--out", str(tmp_path / "bf"))
    assert r.returncode == 0, r.stderr[-2000:]
    log = plumbing.load_checkpoint(str(tmp_path / "bf" / "ddpm.pt"))["log"]
    assert all(row["loss"] == row["loss"] and row["loss"] < 10 for row in log)   # finite and sane


def test_ddp_two_processes_keep_replicas_identical(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", os.path.join(ROOT, "train.py"),
                        *TINY, "--steps", "6", "--out", str(tmp_path / "ddp")],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DDP: 2 replicas identical" in r.stdout
    assert plumbing.load_checkpoint(str(tmp_path / "ddp" / "ddpm.pt"))["step"] == 6


def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path):
    model = torch.nn.Linear(2, 1)
    calls = []

    def loss_fn(net, batch, g):
        calls.append(1)
        x = torch.randn(batch, 2, generator=g)
        loss = net(x).squeeze(1) ** 2
        return dict(loss=loss * float("nan") if len(calls) == 3 else loss)

    weights = []
    s = fit.FitSettings(steps=5, batch=4, lr=0.1, log_every=1, ckpt_every=100)
    rt = fit.Runtime(0, 1, torch.device("cpu"))
    _, _, log = fit.fit(model, loss_fn, s, str(tmp_path / "m.pt"), rt, dict(kind="test"), {},
                          on_step=lambda step, m: weights.append(m.weight.detach().clone()))
    assert [row["skipped"] for row in log] == [0, 0, 1, 1, 1]
    assert torch.equal(weights[1], weights[2])            # step 3 changed nothing
    assert not torch.equal(weights[2], weights[3])


def test_warmup_and_ema_formulas():
    s = fit.FitSettings(steps=10, batch=1, lr=1e-3, warmup=100)
    assert fit.lr_at(0, s) == pytest.approx(1e-5) and fit.lr_at(99, s) == pytest.approx(1e-3)
    assert fit.lr_at(500, s) == 1e-3
    ema, model = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0)
        model.weight.fill_(3.0)
    fit._update_ema(ema, model, 0.75)
    assert ema.weight.item() == pytest.approx(0.75 * 1 + 0.25 * 3)


def test_circles_pipeline_end_to_end_at_tiny_size(tmp_path):
    """data -> DDPM -> 2 classifiers -> guided, unguided and sweep samples -> evaluation -> report."""
    import json

    import numpy as np

    import evaluate
    out = tmp_path / "e2e"
    r = run_cli(*TINY, "--steps", "10", "--clf", "tiny", "--clf-steps", "6", "--clf-batch", "8", "--n-samples", "12",
                "--runs", "2", "--lambda-sweep", "0,10", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("HEADLINE accuracy")
    res = json.loads((out / "results.json").read_text())
    for name in ("figures/training_data.png", "figures/classifier_heatmap.png", "figures/centre_x_histogram.png",
                 "samples/guided_run0.png", "samples/unconditional.png", "samples/guided_run0.csv",
                 "classifier0.pt", "classifier1.pt", "ddpm.pt"):
        assert (out / name).exists(), name
    # Every number of results.json is recomputed from the saved samples.
    per_run = [evaluate.circle_stats(np.load(out / "samples" / f"guided_run{i}.npz")["images"]) for i in range(2)]
    assert [x["accuracy"] for x in res["per_run"]] == [s["accuracy"] for s in per_run]
    acc = [s["accuracy"] for s in per_run]
    assert res["accuracy"] == pytest.approx([np.mean(acc), np.std(acc)])
    uncond = np.load(out / "samples" / "unconditional.npz")
    assert uncond["images"].shape == (12, 16, 16, 3) and uncond["images"].dtype == np.uint8
    assert res["unconditional"]["accuracy"] == evaluate.circle_stats(uncond["images"])["accuracy"]
    assert [s["lam"] for s in res["lambda_sweep"]] == [0.0, 10.0]
    # lambda = 0 in the sweep is the unguided sampler with the same seed: identical samples.
    assert np.array_equal(np.load(out / "samples" / "sweep_lambda0.npz")["images"], uncond["images"])
    # App. H: the memorization numbers are those of the saved guided samples against the training set.
    guided0 = np.load(out / "samples" / "guided_run0.npz")["images"]
    train = toy_circles.make_circles(16, "train")
    memo = evaluate.memorization(guided0, train["images"], train["centres"], per_run[0])
    for key in ("near_copy_fraction", "on_training_centre_fraction", "n_middle", "middle_on_training_centre"):
        assert res["memorization"][key] == memo[key], key
    assert res["memorization"]["n"] == 12 and res["memorization"]["n_train"] == len(train["images"])
    assert (out / "figures" / "memorization_pairs.png").exists()
    report = (out / "report.md").read_text()
    assert "## Memorization (App. H)" in report and "figures/memorization_pairs.png" in report
    assert "78% +- 8.7%" in report and f"{100 * res['accuracy'][0]:.1f}%" in report
    assert "figures/classifier_heatmap.png" in report and "| 10 |" in report
    # Reports apart from computation: report.md and the plotted figures come back from results.json alone.
    import report as report_lib
    for name in ("report.md", "figures/classifier_heatmap.png", "figures/centre_x_histogram.png"):
        (out / name).unlink()
    assert report_lib.render(str(out)) == report
    assert (out / "report.md").read_text() == report
    assert (out / "figures/classifier_heatmap.png").exists() and (out / "figures/centre_x_histogram.png").exists()
    # Every trained network logs: train_log.csv (a row per log interval) and loss.png.
    for net in ("ddpm", "classifier0", "classifier1"):
        rows = fit.read_train_log(out / "logs" / net / "train_log.csv")
        assert rows and rows[-1]["step"] == (10 if net == "ddpm" else 6), net
        assert {"loss", "lr", "grad_norm", "img_per_s", "wall_s"} <= set(rows[0]), net
        assert (out / "logs" / net / "loss.png").exists(), net
    # A resumed run recomputes nothing: the DDPM and the classifiers are done, the samples reused.
    r = run_cli(*TINY, "--steps", "10", "--clf", "tiny", "--clf-steps", "6", "--clf-batch", "8", "--n-samples", "12",
                "--runs", "2", "--lambda-sweep", "0,10", "--out", str(out), "--resume")
    assert r.returncode == 0 and "sampling" not in r.stderr
    assert json.loads((out / "results.json").read_text())["per_run"] == res["per_run"]


def test_a_record_from_before_t_tilt_counts_as_uniform_t():
    # runs recorded before --t-tilt existed drew t uniformly: resuming one with the circles preset's tilt is
    # a different run; one of a real-image preset (uniform t) is the same
    circles, digits = train.parse_config(["--data", "circles"]), train.parse_config(["--data", "digits"])
    old = {k: v for k, v in train.identity(circles).items() if k != "t_tilt"}
    assert circles.t_tilt == 4.0 and train.identity_diff(old, train.identity(circles)) == ["t_tilt"]
    old = {k: v for k, v in train.identity(digits).items() if k != "t_tilt"}
    assert digits.t_tilt == 0.0 and train.identity_diff(old, train.identity(digits)) == []
    # and before --prediction they predicted eps: the circles preset's velocity is another run, digits' eps is not
    old = {k: v for k, v in train.identity(circles).items() if k != "prediction"}
    assert circles.prediction == "velocity" and train.identity_diff(old, train.identity(circles)) == ["prediction"]
    old = {k: v for k, v in train.identity(digits).items() if k != "prediction"}
    assert digits.prediction == "eps" and train.identity_diff(old, train.identity(digits)) == []
    import generalization
    assert generalization.ddpm_config(generalization.parse_config(["--quick"]), "x").prediction == "eps"


def test_a_run_that_stopped_before_its_ddpm_starts_again_with_the_same_command(tmp_path):
    """config.json is written before the data is read: after bad data stopped a run, the same command (the
    data fixed) starts again; other settings, or a run that has its DDPM, still need --resume or --overwrite."""
    out = str(tmp_path / "run")
    argv = ["--threads", "1", "--out", out]
    train.prepare_out(train.parse_config(argv))
    assert train.parse_config(argv).out == out                             # accepted: nothing to lose
    with pytest.raises(SystemExit, match="already holds a run"):
        train.parse_config(argv + ["--lr", "0.5"])
    open(os.path.join(out, "ddpm.pt"), "wb").close()
    with pytest.raises(SystemExit, match="already holds a run"):
        train.parse_config(argv)


def test_the_continue_command_pastes_back(monkeypatch, capsys):
    """Ctrl-C prints a command that runs as printed: quoted, with --resume and without --overwrite."""
    monkeypatch.setattr(sys, "argv", ["train.py", "--root", "my data/x y", "--overwrite", "--classes", "a, b"])
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        plumbing.guard(interrupted, resume_flag="--resume")
    line = capsys.readouterr().err.strip().split("Continue with: ")[1]
    assert shlex.split(line) == ["python", "train.py", "--root", "my data/x y", "--classes", "a, b", "--resume"]
