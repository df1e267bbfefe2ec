"""Faults: a second run on the same folder, Ctrl-C / SIGTERM, kill -9 during checkpoint writes.

The promise: one run per folder (the second is refused in one line); an interrupt leaves a resumable
checkpoint, says how to resume and exits 130 / 143; a run killed at any moment resumes to the same
weights, EMA, optimizer state and train_log.csv as an uninterrupted one (wall-time columns aside).
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fit
import plumbing
from conftest import ENV, ROOT
from test_train import TINY

FAST = [*TINY, "--steps", "60", "--log-every", "3", "--ckpt-every", "1", "--grid-every", "0"]  # paused at 40


def start(out, *extra):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def wait_for_step(out, step, proc, timeout=120):
    """Wait until the run's checkpoint has reached `step` (the file is replaced atomically: always whole)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        path = out / "ddpm.pt"
        if path.exists() and plumbing.load_checkpoint(str(path))["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step}")


def without_wall_time(rows):
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "wall_s")} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final DDPM checkpoint and train_log.csv rows."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out", str(out), "--stop-at", "40"],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return plumbing.load_checkpoint(str(out / "ddpm.pt")), fit.read_train_log(out / "logs" / "ddpm" / "train_log.csv")


def assert_same_as_reference(out, reference):
    ref, ref_log = reference
    ckpt = plumbing.load_checkpoint(str(out / "ddpm.pt"))
    assert ckpt["step"] == ref["step"] == 40
    for key in ("model", "ema"):
        assert all(torch.equal(ckpt[key][k], ref[key][k]) for k in ref[key]), key
    sa, sb = ckpt["optimizer"]["state"], ref["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sb)
    assert without_wall_time(ckpt["log"]) == without_wall_time(ref["log"])
    assert without_wall_time(fit.read_train_log(out / "logs" / "ddpm" / "train_log.csv")) == without_wall_time(ref_log)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "busy"
    with plumbing.RunLock(str(out)):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out", str(out)],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert r.returncode != 0 and "another run is using" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert sorted(os.listdir(out)) == [".lock"]                     # the refused run wrote nothing
    with plumbing.RunLock(str(out)):                                    # released: the next run may start
        pass


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupt_checkpoints_says_how_to_resume_and_resume_is_exact(tmp_path, reference, sig, code):
    out = tmp_path / "run"
    proc = start(out, "--stop-at", "40")
    wait_for_step(out, 5, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr and "--resume" in stderr and "interrupted at step" in stderr, stderr
    stopped = plumbing.load_checkpoint(str(out / "ddpm.pt"))["step"]
    assert 5 <= stopped < 40
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *FAST, "--out", str(out), "--stop-at", "40",
                        "--resume"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_as_reference(out, reference)


def test_kill_9_during_checkpoint_writes_ten_times_then_resume_is_exact(tmp_path, reference):
    """A checkpoint every step, SIGKILL at random moments (often mid-write): the last checkpoint always loads,
    and the run, resumed after every kill, ends where an uninterrupted run ends."""
    out, rng, kills = tmp_path / "run", random.Random(0), 0
    proc = start(out, "--stop-at", "40")
    wait_for_step(out, 1, proc)
    while kills < 10:
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:                   # finished before the kill: nothing left to interrupt
            break
        proc.kill()
        proc.communicate()
        kills += 1
        step = plumbing.load_checkpoint(str(out / "ddpm.pt"))["step"]   # the previous checkpoint always loads
        assert 1 <= step <= 40
        proc = start(out, "--stop-at", "40", "--resume")
    proc.communicate(timeout=300)
    assert proc.returncode == 0 and kills >= 5, (kills, proc.returncode)
    assert_same_as_reference(out, reference)
