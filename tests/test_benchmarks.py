"""The benchmark scripts: a tiny smoke run of each CLI, and their PASS/FAIL logic on hand-made numbers."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import bench_guidance, bench_memorization, circles_targets

from conftest import ENV, ROOT  # noqa: E402
TINY_TRAIN = ["--unet", "tiny", "--clf", "tiny", "--image-size", "16", "--T", "100", "--steps", "10",
              "--clf-steps", "5", "--batch", "8", "--n-samples", "8", "--sample-respacing", "5",
              "--grid-every", "0", "--threads", "1", "--regressor-steps", "4"]


def run_script(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV, cwd=ROOT)


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ----------------------------------------------------------------------------------------------
# bench_guidance.py: App. C, one guided step costs one U-Net forward + one classifier fwd + bwd
# ----------------------------------------------------------------------------------------------

def test_bench_guidance_smoke(tmp_path):
    out = tmp_path / "guidance.json"
    r = run_script("bench_guidance.py", "--unet", "tiny", "--clf", "tiny", "--image-size", "16", "--batch", "4",
                   "--quick", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "guided / unguided" in r.stdout
    rec = json.loads(out.read_text())
    assert set(rec) >= {"config", "rows", "ratio_guided_unguided", "target_ratio", "verdict",
                        "guidance_overhead_ms", "classifier_fwd_bwd_ms"}
    assert [row["name"] for row in rec["rows"]] == ["unguided step", "guided step (30,30)", "one-class step (0,30)",
                                                    "classifier forward", "classifier fwd+bwd"]
    for row in rec["rows"]:
        assert all(positive_finite(row[k]) for k in ("median_ms", "min_ms", "max_ms", "ms_per_image",
                                                      "ratio_to_unguided"))
        assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["trials"] == 2
    assert positive_finite(rec["ratio_guided_unguided"]) and rec["target_ratio"] == 2.5
    assert rec["verdict"] == ("PASS" if rec["ratio_guided_unguided"] <= 2.5 else "FAIL")


def test_bench_guidance_verdict_on_hand_made_timings():
    names = ["unguided step", "guided step (30,30)", "one-class step (0,30)", "classifier forward",
             "classifier fwd+bwd"]
    ok = bench_guidance.summarize(dict(zip(names, [[0.1, 0.3, 0.2], [0.5, 0.4, 0.6], [0.5] * 3, [0.1] * 3,
                                                    [0.3] * 3])), batch=10)
    assert ok["ratio_guided_unguided"] == pytest.approx(2.5) and ok["verdict"] == "PASS"  # medians 0.5 / 0.2
    assert ok["rows"][1]["min_ms"] == pytest.approx(400) and ok["rows"][1]["ms_per_image"] == pytest.approx(50)
    assert ok["guidance_overhead_ms"] == pytest.approx(300) and ok["classifier_fwd_bwd_ms"] == pytest.approx(300)
    bad = bench_guidance.summarize(dict(zip(names, [[0.2], [0.52], [0.5], [0.1], [0.3]])), batch=10)
    assert bad["ratio_guided_unguided"] == pytest.approx(2.6) and bad["verdict"] == "FAIL"


def test_bench_guidance_refuses_bad_flags_in_one_line(capsys):
    for argv in (["--batch", "0"], ["--lambdas", "30,30,30"], ["--lambdas", "0,0"], ["--unet", "nope"]):
        with pytest.raises(SystemExit) as e:
            bench_guidance.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


# ----------------------------------------------------------------------------------------------
# circles_targets.py: the targets of `python train.py --data circles`
# ----------------------------------------------------------------------------------------------

def test_circles_targets_smoke(tmp_path):
    out, js = tmp_path / "ct", tmp_path / "targets.json"
    r = run_script("circles_targets.py", "--out", str(out), "--json", str(js), "--", *TINY_TRAIN)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "verdict" in r.stdout and (out / "results.json").exists()
    rec = json.loads(js.read_text())
    assert set(rec) >= {"command", "seeds", "measurements", "targets", "all_pass"}
    (m,) = rec["measurements"]
    assert positive_finite(m["wall_min"]) and positive_finite(m["peak_mib"]) and m["runs"] == 1
    for key in ("accuracy", "bad_fraction", "unconditional_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert [row["key"] for row in rec["targets"]] == ["wall_min", "peak_mib", "accuracy", "bad_fraction",
                                                       "unconditional_accuracy"]
    assert all(row["verdict"] in ("PASS", "FAIL") for row in rec["targets"])
    assert rec["all_pass"] == all(row["verdict"] == "PASS" for row in rec["targets"])


def write_results(folder, accuracy, bad, uncond, runs=3):
    """A results.json with the keys train.py writes that circles_targets reads."""
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(dict(
        accuracy=[accuracy, 0.02], bad_fraction=[bad, 0.01], unconditional=dict(accuracy=uncond, bad_fraction=0.0),
        runs=runs)))
    return folder


def verdicts(rows):
    return {row["key"]: row["verdict"] for row in rows}


def test_circles_targets_verdicts_on_hand_made_results(tmp_path):
    # one run meeting every target, at the boundaries where they are inclusive
    good = circles_targets.read_measurement(write_results(tmp_path / "good", 0.85, 0.04, 0.05), 5 * 60.0, 1024.0)
    assert good["wall_min"] == 5.0 and good["accuracy_std_over_runs"] == 0.02
    assert set(verdicts(circles_targets.evaluate_targets([good])).values()) == {"PASS"}
    # and one missing every target
    bad = circles_targets.read_measurement(write_results(tmp_path / "bad", 0.84, 0.05, 0.06), 5 * 60.0 + 1, 1025.0)
    assert set(verdicts(circles_targets.evaluate_targets([bad])).values()) == {"FAIL"}
    # across seeds: quality on the mean, time and memory on the worst seed
    s0 = circles_targets.read_measurement(write_results(tmp_path / "s0", 0.90, 0.02, 0.00), 4 * 60.0, 1000.0)
    s1 = circles_targets.read_measurement(write_results(tmp_path / "s1", 0.82, 0.05, 0.00), 6 * 60.0, 900.0)
    rows = circles_targets.evaluate_targets([s0, s1])
    assert verdicts(rows) == dict(wall_min="FAIL", peak_mib="PASS", accuracy="PASS", bad_fraction="PASS",
                                  unconditional_accuracy="PASS")
    acc = rows[2]
    assert acc["mean"] == pytest.approx(0.86) and acc["std"] == pytest.approx(0.04)  # population std
    assert rows[0]["judged_value"] == 6.0 and rows[1]["judged_value"] == 1000.0


def test_circles_targets_pass_through_and_refusals(capsys):
    args, train_args = circles_targets.parse_args(["--out", "d", "--unet", "tiny", "--runs", "2", "--seeds", "0,1",
                                                   "--", "--steps", "10"])
    assert args.out == "d" and args.seeds == [0, 1]
    assert train_args == ["--unet", "tiny", "--steps", "10", "--runs", "2"]
    for argv in (["--", "--out", "x"], ["--resume"], ["--seeds", "0,1", "--seed", "3"], ["--seeds", "a"],
                 ["--runs", "0"]):
        with pytest.raises(SystemExit) as e:
            circles_targets.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


# ----------------------------------------------------------------------------------------------
# bench_memorization.py: the App. H search at CelebA size stays within one float64 block
# ----------------------------------------------------------------------------------------------

def test_bench_memorization_small_run_and_its_memory_bound(tmp_path):
    out = tmp_path / "memo.json"
    r = run_script("bench_memorization.py", "--refs", "3000", "--queries", "16", "--size", "16", "--ref-chunk", "500",
                   "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["matches_direct"] is True and positive_finite(rec["seconds"])
    assert rec["float64_copy_mb"] == pytest.approx(3000 * 16 * 16 * 3 * 8 / 2 ** 20, abs=0.05)
    block_mb = 500 * 16 * 16 * 3 * 8 / 2 ** 20                       # 2.9 MB; the refs' float64 copy: 17.6 MB
    assert block_mb <= rec["added_mb"] < 2 * block_mb + 1.0            # one block (+ samples, products), not all refs
    with pytest.raises(SystemExit) as e:
        bench_memorization.parse_args(["--ref-chunk", "0"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------
# bad_samples.py: when along the chain a sample goes bad (issue: why samples go bad)
# ----------------------------------------------------------------------------------------------

def test_bad_samples_went_bad_phases_on_hand_made_chains():
    """Three samples over four steps (t = 900, 600, 300, 0 of T = 1000): A holds one circle until
    t = 600, then none: it went bad in the middle; B never holds one; C ends with one (good)."""
    from benchmarks import bad_samples
    import evaluate
    none, two, one = evaluate.BAD_KINDS[0], evaluate.BAD_KINDS[1], "good"
    kinds = np.array([[one, none, one], [one, two, two], [none, none, one], [none, two, one]])
    final = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    final[2] = evaluate.draw_disc(16, 8, 8, evaluate.default_radius(16))
    s = bad_samples.summarize(kinds, [900, 600, 300, 0], final, 1000)
    assert s["went_bad"] == {"early": 0, "middle": 1, "late": 0, "never one": 1}
    assert s["per_step"]["one circle"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert s["per_step"]["two or more"] == pytest.approx([0, 2 / 3, 0, 1 / 3])
    assert s["per_step"]["no circle"] == pytest.approx([1 / 3, 0, 2 / 3, 1 / 3])
    assert s["final"][none] == 2 and s["final"]["good"] == 1 and s["n"] == 3
    assert [bad_samples.phase(t, 1000) for t in (999, 667, 666, 334, 333, 0)] == \
        ["early", "early", "middle", "middle", "late", "late"]


def test_bad_samples_smoke_reproduces_the_sampler(tmp_path):
    """On a tiny run: the chain's finished samples are multiguide.sample's (same seed, one batch), the
    final kinds are evaluate.bad_kinds of them, each step's shares sum to 1, and every finished bad
    sample is counted once in 'went bad'."""
    import evaluate
    import multiguide
    import plumbing
    import train
    from benchmarks import bad_samples
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", "circles", *TINY_TRAIN,
                        "--out", str(run)], capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("bad_samples.py", str(run), "--n-samples", "6", "--threads", "1", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "went bad" in r.stdout and (tmp_path / "b" / "bad_samples.png").stat().st_size > 0
    rec = json.loads((tmp_path / "b" / "bad_samples.json").read_text())["runs"][str(run)]
    model, d, clf = multiguide.load_models(str(run / "ddpm.pt"), str(run / "classifier0.pt"))
    for name, lambdas in (("unguided", [0.0, 0.0]), ("guided", plumbing.float_list(train.Config.lambdas))):
        s = rec[name]
        assert s["lambdas"] == lambdas and s["n"] == 6 and len(s["t"]) == 5 and s["t"][0] > s["t"][-1] == 0
        for k in range(5):
            assert sum(s["per_step"][c][k] for c in bad_samples.COUNTS) == pytest.approx(1.0)
        want = plumbing.to_uint8(multiguide.sample(model, d, 6, classifier=clf, lambdas=lambdas, respacing="5",
                                                   batch=6, seed=0, progress=False))
        assert s["final"] == evaluate.bad_kinds(want)
        bad = s["final"][evaluate.BAD_KINDS[0]] + s["final"][evaluate.BAD_KINDS[1]]
        assert sum(s["went_bad"].values()) == bad
    r = run_script("bad_samples.py", str(run), "--out", str(tmp_path / "b"))       # outputs there: refused
    assert r.returncode != 0 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run_script("bad_samples.py", str(tmp_path), "--out", str(tmp_path / "c"))  # not a run folder
    assert r.returncode != 0 and "config.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "d").mkdir()
    for name in ("ddpm.pt", "classifier0.pt"):
        (tmp_path / "d" / name).write_bytes((run / name).read_bytes())
    (tmp_path / "d" / "config.json").write_text(json.dumps({"data": "digits"}))
    r = run_script("bad_samples.py", str(tmp_path / "d"), "--out", str(tmp_path / "e"))  # not circles
    assert r.returncode != 0 and "--data digits" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# loss_aware_t.py: improved DDPM's importance sampling of t (Sec. 3.3)
# ----------------------------------------------------------------------------------------------

def test_loss_aware_t_probabilities_on_a_hand_made_history():
    import torch
    from benchmarks import loss_aware_t
    s = loss_aware_t.LossAwareT(3, history=2, uniform=0.1)
    s.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 2.0]))
    assert torch.equal(s.probs(), torch.full((3,), 1 / 3, dtype=torch.float64))   # t = 2 has no loss yet
    s.update(torch.tensor([1, 2, 2, 0]), torch.tensor([2.0, 4.0, 4.0, 7.0]))      # t = 0 keeps its last two: 3, 7
    rms = np.array([math.sqrt((9 + 49) / 2), 2.0, 4.0])
    want = 0.9 * rms / rms.sum() + 0.1 / 3
    assert np.allclose(s.probs().numpy(), want, rtol=0, atol=1e-15) and abs(want.sum() - 1) < 1e-15
    assert s.losses[0].tolist() == [3.0, 7.0] and s.seen.tolist() == [2, 2, 2]


def test_loss_aware_t_weights_keep_the_objective_unbiased():
    import toy_circles
    import plumbing
    from benchmarks import loss_aware_t
    import fit

    class Fixed:  # a stand-in diffusion: the loss of an example is its t + 1
        num_timesteps = 4

        def training_losses(self, model, x, t, noise):
            return dict(loss=(t + 1).double(), mse=(t + 1).double())
    x0 = plumbing.to_tensor(toy_circles.make_circles(8, "train")["images"])
    loss_fn = loss_aware_t.loss_aware_ddpm_loss(Fixed(), x0)
    for step in range(8):                                                  # fills every t's history
        loss_fn(None, 64, fit.step_generator(0, 0, 0, step, "cpu"))
    p = loss_fn.sampler.probs().numpy()
    rms = np.arange(1, 5.0)
    assert np.allclose(p, 0.999 * rms / rms.sum() + 0.001 / 4, atol=1e-12)  # constant losses: E[L^2]^0.5 = t + 1
    terms = loss_fn(None, 20000, fit.step_generator(0, 0, 0, 99, "cpu"))
    weighted = terms["loss"].numpy()
    # each weighted loss is (t + 1) / (T p(t)); its mean estimates the uniform mean over t, (1+2+3+4)/4
    t = (terms["mse"].numpy() - 1).astype(int)
    assert np.allclose(weighted, (t + 1) / (4 * p[t]), rtol=1e-6)
    assert abs(weighted.mean() - 2.5) < 4 * weighted.std() / math.sqrt(len(weighted))
    assert abs(terms["t_below_100"].mean().item() - 1.0) < 1e-12


def test_loss_aware_t_runs_train_py_and_refuses_resume(tmp_path):
    r = run_script("loss_aware_t.py", *TINY_TRAIN, "--out", str(tmp_path / "la"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "HEADLINE" in r.stdout and (tmp_path / "la" / "results.json").exists()
    r = run_script("loss_aware_t.py", *TINY_TRAIN, "--out", str(tmp_path / "la"), "--resume")
    assert r.returncode != 0 and "--resume is not supported" in r.stderr and len(r.stderr.strip().splitlines()) == 1
