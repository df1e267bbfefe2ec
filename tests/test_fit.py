"""fit.py's mixed precision on the CPU: float16 autocast with loss scaling (torch.amp.GradScaler on the
CPU device), the step whose fp16 gradients overflow (skipped, counted, the scale backed off by 0.5),
the scale's growth after loss_scale_growth_interval clean steps (against a hand-run of the rule), an
exact fp16 resume, the tiny U-Net's DDPM loss under fp16, and bf16 (no scaler). `pytest -k fp16`
selects the fp16 ones. The command lines keep fp16 for CUDA (tests/test_train.py checks the refusal)."""
import pytest
import torch

import ddpm
import fit
import plumbing
import toy_circles
import unet

CPU = fit.Runtime(0, 1, torch.device("cpu"))
TARGET = torch.tensor([[1.5], [-2.0], [0.5], [3.0]])       # y = x @ TARGET + 0.25: a least-squares fit


def regression(overflow_at=(), seen=None):
    """loss_fn for y = x W + b on fresh Gaussian x: the squared error per example. At the 0-based call
    indices in overflow_at the loss is multiplied by 1e6: finite in float32 (the loss itself is ~1e7),
    but with a loss scale S >= 2^8 the gradient of the fp16 output, S 1e6 2 err / 32, exceeds 65504,
    the largest float16, so the backward pass overflows to inf. seen collects the dtypes of the output."""
    calls = []

    def loss_fn(net, batch, g):
        x = torch.randn(batch, 4, generator=g)
        out = net(x)
        if seen is not None:
            seen.append(out.dtype)
        err = (out.float() - (x @ TARGET + 0.25)) ** 2
        calls.append(1)
        return dict(loss=err.squeeze(1) * (1e6 if len(calls) - 1 in overflow_at else 1.0))
    return loss_fn


def run(tmp_path, loss_fn, precision, steps, name="m.pt", resume=False, lr=0.05, **settings):
    """fit() a fresh Linear(4, 1) (seed 0) for `steps` steps, one log row per step; returns (log, the
    weights after every step, the checkpoint)."""
    torch.manual_seed(0)
    model, weights = torch.nn.Linear(4, 1), []
    s = fit.FitSettings(steps=steps, batch=32, lr=lr, grad_clip=0.0, precision=precision, log_every=1,
                        ckpt_every=1000, **settings)
    path = str(tmp_path / name)
    _, _, log = fit.fit(model, loss_fn, s, path, CPU, dict(kind="test"), {},
                        on_step=lambda step, m: weights.append(torch.cat([m.weight.flatten(), m.bias]).detach().clone()),
                        resume=resume)
    return log, weights, plumbing.load_checkpoint(path)


def test_fp16_fit_trains_on_the_cpu_with_a_loss_scaler(tmp_path):
    seen = []
    log, weights, ckpt = run(tmp_path, regression(seen=seen), "fp16", 100, lr=0.1)
    assert set(seen) == {torch.float16}                        # the forward ran in float16 (autocast)
    losses = [row["loss"] for row in log if "loss" in row]
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    # The default first scale, 2^16, overflows float16 at first (the weight gradient sums 32 examples):
    # the scaler halves it at each skipped step, and it does not grow again before 2000 clean steps.
    skipped = [row["skipped"] for row in log]
    assert skipped[-1] > 0 and [row["loss_scale"] for row in log] == [2.0 ** 16 * 0.5 ** k for k in skipped]
    assert ckpt["scaler"]["scale"] == log[-1]["loss_scale"] and ckpt["scaler"]["_growth_tracker"] == 100 - skipped[-1]
    w = torch.cat([TARGET.flatten(), torch.tensor([0.25])])
    assert weights[-1].dtype == torch.float32 and (weights[-1] - w).abs().max() < 0.02   # float32 master weights


def test_fp16_overflowing_step_is_skipped_counted_and_backs_off_the_scale(tmp_path):
    # first scale 2^8: small enough that only the step with the loss x 1e6 overflows
    log, weights, ckpt = run(tmp_path, regression(overflow_at={2}), "fp16", 5, loss_scale_init=256.0)
    assert [row["loss_scale"] for row in log] == [256.0, 256.0, 128.0, 128.0, 128.0]   # backed off by 0.5
    assert [row["skipped"] for row in log] == [0, 0, 1, 1, 1]    # cumulative: optimizer steps not taken
    assert torch.equal(weights[2], weights[1])                  # step 3 changed nothing
    assert not torch.equal(weights[3], weights[2]) and not torch.equal(weights[1], weights[0])
    assert "loss" not in log[2] and "grad_norm" not in log[2]   # its terms stay out of the interval means
    assert all(torch.isfinite(w).all() for w in weights)
    assert ckpt["optimizer"]["state"][0]["step"].item() == 4    # AdamW stepped 4 times in 5 steps
    # the same loss in float32 does not overflow: the skip above is fp16's, not the loss's
    log32, w32, _ = run(tmp_path, regression(overflow_at={2}), "fp32", 5, name="fp32.pt", loss_scale_init=256.0)
    assert [row["skipped"] for row in log32] == [0] * 5 and not torch.equal(w32[2], w32[1])
    assert "loss_scale" not in log32[0]                          # no scaler, no column


def scale_rule(init, interval, overflow, steps):
    """GradScaler's rule run by hand: after each step the scale halves on an overflow (and the count of
    clean steps restarts), else the count grows and the scale doubles when it reaches `interval`."""
    scale, clean, out = init, 0, []
    for k in range(steps):
        if k in overflow:
            scale, clean = scale * 0.5, 0
        else:
            clean += 1
            if clean == interval:
                scale, clean = scale * 2.0, 0
        out.append(scale)
    return out


def test_fp16_scale_grows_after_growth_interval_clean_steps_and_backs_off(tmp_path):
    log, weights, _ = run(tmp_path, regression(overflow_at={4}), "fp16", 9, loss_scale_init=256.0,
                          loss_scale_growth_interval=3)
    expected = scale_rule(256.0, 3, {4}, 9)
    assert expected == [256, 256, 512, 512, 256, 256, 256, 512, 512]
    assert [row["loss_scale"] for row in log] == expected
    assert [row["skipped"] for row in log] == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert torch.equal(weights[4], weights[3])              # at S = 512 the output's gradient is still
    # ~512 * 1e6 * 2 |err| / 32 >> 65504: step 5 overflows and is skipped, as the rule says


def test_fp16_interrupted_and_resumed_equals_uninterrupted_scale_included(tmp_path):
    loss_fn = lambda: regression(overflow_at={3})  # noqa: E731  (a fresh call counter per run)
    full, w_full, c_full = run(tmp_path, loss_fn(), "fp16", 8, name="full.pt", loss_scale_growth_interval=2)
    a = tmp_path / "paused"
    a.mkdir()
    run(a, loss_fn(), "fp16", 8, name="p.pt", loss_scale_growth_interval=2, stop_at=5)
    # the resumed run's loss_fn restarts its call counter: the overflow sits at call 3 of the first part only
    resumed, _, c_res = run(a, regression(), "fp16", 8, name="p.pt", resume=True, loss_scale_growth_interval=2)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert c_res["scaler"] == c_full["scaler"]
    assert all(torch.equal(c_res["model"][k], c_full["model"][k]) for k in c_full["model"])


def test_fp16_ddpm_loss_of_the_tiny_unet_runs_in_float16_on_the_cpu(tmp_path):
    # every op of the U-Net (convolutions, GroupNorm, SiLU, attention, the time embedding) has a float16
    # CPU kernel in this torch: the forward is float16 and the loss and float32 gradients are finite
    d = ddpm.diffusion_from_config(dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing=""))
    x0 = plumbing.to_tensor(toy_circles.make_circles(16, "train")["images"])
    torch.manual_seed(0)
    net, dtypes = unet.build_unet("tiny"), []
    net.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    s = fit.FitSettings(steps=3, batch=8, lr=1e-3, precision="fp16", log_every=1, ckpt_every=100)
    _, _, log = fit.fit(net, fit.ddpm_loss(d, x0), s, str(tmp_path / "ddpm.pt"), CPU, dict(kind="test"), {})
    assert dtypes and set(dtypes) == {torch.float16}
    assert all(0 < row["loss"] < 10 and row["grad_norm"] > 0 for row in log) and log[-1]["skipped"] == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


def test_bf16_fit_trains_on_the_cpu_without_a_scaler(tmp_path):
    seen = []
    log, weights, ckpt = run(tmp_path, regression(seen=seen), "bf16", 100, lr=0.1)
    assert set(seen) == {torch.bfloat16}
    losses = [row["loss"] for row in log]                       # every step taken: bf16 has float32's range
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])
    assert log[-1]["skipped"] == 0 and "loss_scale" not in log[0] and ckpt["scaler"] == {}   # no loss scaling
    w = torch.cat([TARGET.flatten(), torch.tensor([0.25])])
    assert (weights[-1] - w).abs().max() < 0.02


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_dtype_of_each_precision(precision):
    with plumbing.autocast(precision, "cpu"):
        y = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    assert y.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]



def test_fit_optimizer_is_adamw_in_closed_form_and_ema_lerps_every_tensor():
    """fit's optimizer (fused AdamW on the CPU) after two steps with given gradients equals AdamW written
    out in float64: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps)
    with m^ = m / (1 - b1^k), v^ = v / (1 - b2^k); the multi-tensor EMA update equals decay * ema +
    (1 - decay) * theta for every tensor."""
    lr, wd, b1, b2, eps = 1e-2, 0.01, 0.9, 0.999, 1e-8
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(2)]
    opt = fit.make_optimizer(params, fit.FitSettings(steps=2, batch=1, lr=lr, weight_decay=wd), torch.device("cpu"))
    assert opt.defaults["fused"]
    want = [p.detach().double().clone() for p in params]
    m, v = [torch.zeros_like(w) for w in want], [torch.zeros_like(w) for w in want]
    for k, gs in enumerate(grads, start=1):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(gs):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            want[i] = want[i] * (1 - lr * wd) - lr * (m[i] / (1 - b1 ** k)) / ((v[i] / (1 - b2 ** k)).sqrt() + eps)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-6)
    ema, model = fit._copy_for_ema(unet.build_unet("tiny")), unet.build_unet("tiny")
    expected = [0.9 * pe.double() + 0.1 * pm.double() for pe, pm in zip(ema.parameters(), model.parameters())]
    fit._update_ema(ema, model, 0.9)
    for pe, w in zip(ema.parameters(), expected):
        torch.testing.assert_close(pe.double(), w, rtol=0, atol=1e-6)


def test_stage_times_credit_what_earlier_processes_spent(tmp_path):
    """plumbing.timed + plumbing.credit: a credit counts in every open stage (and once per timings dict in
    credited_s), not in stages already closed; fit credits the training time a resumed checkpoint carries."""
    outer, inner = {}, {}
    with plumbing.timed(outer, "run"):
        with plumbing.timed(inner, "filter"):
            plumbing.credit(7.25)
        plumbing.credit(0.5)
    plumbing.credit(100.0)                                   # no stage open: counted nowhere
    assert 7.75 <= outer["run"] < 7.75 + 1 and outer["credited_s"] == 7.75
    assert 7.25 <= inner["filter"] < 7.25 + 1 and inner["credited_s"] == 7.25
    run(tmp_path, regression(), "fp32", 6, stop_at=4)
    carried = plumbing.load_checkpoint(str(tmp_path / "m.pt"))["interval"]["wall_s"]   # the paused process's time
    assert carried > 0
    timings = {}
    with plumbing.timed(timings, "training_s"):
        log, _, ckpt = run(tmp_path, regression(), "fp32", 6, resume=True)
    assert timings["credited_s"] == carried and timings["training_s"] >= carried
    assert carried <= log[-1]["wall_s"] <= ckpt["interval"]["wall_s"]   # the last row, then the final checkpoint
    timings = {}
    with plumbing.timed(timings, "training_s"):              # a finished network: its whole training time
        run(tmp_path, regression(), "fp32", 6, resume=True)
    assert timings["credited_s"] == ckpt["interval"]["wall_s"]


def _signalled_rank(rank, port, out, results):
    """One of two gloo ranks: SIGTERM reaches rank 1 during step 3 and rank 0 only during step 4."""
    import datetime
    import os
    import signal
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    calls = []

    def loss_fn(net, batch, g):
        calls.append(1)
        if len(calls) == (3 if rank == 1 else 4):
            os.kill(os.getpid(), signal.SIGTERM)
        return dict(loss=net(torch.randn(batch, 2, generator=g)).squeeze(1) ** 2)

    torch.manual_seed(0)
    s = fit.FitSettings(steps=50, batch=4, lr=0.1, log_every=1, ckpt_every=1000)
    try:
        fit.fit(torch.nn.Linear(2, 1), loss_fn, s, os.path.join(out, "m.pt"), fit.Runtime(rank, 2, torch.device("cpu")),
                dict(kind="test"), {})
        results[rank] = "finished"
    except plumbing.Interrupted as e:
        results[rank] = ("paused", e.step, e.exit_code)
    except Exception as e:  # noqa: BLE001  (what the test reports if the ranks disagree)
        results[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_pause_at_the_same_step_when_a_signal_reaches_them_at_different_steps(tmp_path):
    """Under torchrun, Ctrl-C reaches every process, but not at the same step boundary. The ranks agree
    (the signal rides on each step's all-reduce): all pause after step 3, and rank 0 writes that checkpoint."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_signalled_rank, args=(port, str(tmp_path), results), nprocs=2, join=True)
        results = dict(results)
    assert results == {0: ("paused", 3, 143), 1: ("paused", 3, 143)}, results   # 128 + SIGTERM
    assert plumbing.load_checkpoint(str(tmp_path / "m.pt"))["step"] == 3


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    # torchrun --nproc_per_node 2 on a machine with one GPU: rank 1's LOCAL_RANK has no device
    monkeypatch.setattr(plumbing, "check_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="started 2 processes on this machine, which has 1 CUDA device"):
        fit.setup_runtime("cuda")
