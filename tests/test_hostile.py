"""A hostile suite: bad flags, bad files and faults for every command line, generated from tables.

Each case runs a script's main() in this process (cheap) with one thing wrong, and asserts:
  * a non-zero exit (SystemExit), never an exception with a traceback;
  * one line of message, naming what was wrong;
  * nothing written: the output folder does not appear (or is byte-for-byte as it was);
  * no work done: reaching training or sampling with bad input is a failure (sentinels below).
The loading cases include a checkpoint whose unpickling would run code: it is refused and the code
never runs.
"""
import importlib
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT  # noqa: F401
import classifier
import fit
import multiguide
import plumbing
import unet

MARKER = "/tmp/zsi_hostile_code_ran"


class Evil:
    """Unpickling this would create MARKER: a checkpoint found on the internet that runs code."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class ReachedWork(Exception):
    """Raised by the sentinels: a bad input got past the checks into training or sampling."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Valid inputs (a tiny DDPM and classifier, samples, scores, a folder of images) and bad ones."""
    d = tmp_path_factory.mktemp("hostile")
    diffusion = dict(schedule="cosine", T=100, learn_sigma=True, loss="hybrid", respacing="")
    net, clf = unet.build_unet("tiny", image_size=16), classifier.build_classifier("tiny", image_size=16)
    names = dict(ddpm="ddpm.pt", clf="clf.pt", evil="evil.pt", cut="cut.pt", empty="empty.pt", text="text.pt",
                 old="old.pt", samples="samples.npz", floats="floats.npz", scores="scores.npy",
                 badscores="badscores.npy", notes="notes.txt", dir="dir")
    f = {k: str(d / v) for k, v in names.items()}
    plumbing.save_checkpoint(f["ddpm"], dict(kind="ddpm", model_config=net.config, diffusion=diffusion,
                                                model=net.state_dict(), ema=net.state_dict()))
    plumbing.save_checkpoint(f["clf"], dict(kind="classifier", model_config=clf.config, diffusion=diffusion,
                                               model=clf.state_dict(), ema=None))
    with open(f["evil"], "wb") as fh:
        pickle.dump(dict(kind="ddpm", payload=Evil()), fh, protocol=2)
    torch.save(dict(kind="ddpm", model_config=dict(width=3), model={}), f["old"])   # another layout
    data = open(f["ddpm"], "rb").read()
    open(f["cut"], "wb").write(data[: len(data) // 3])
    open(f["empty"], "wb").close()
    open(f["text"], "w").write("not a checkpoint\n")
    np.savez(f["samples"], images=np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(f["floats"], images=np.zeros((4, 16, 16, 3), np.float32))
    np.save(f["scores"], np.linspace(0, 1, 20))
    np.save(f["badscores"], np.array([0.1, 2.0, np.nan]))
    open(f["notes"], "w").write("a file, not a folder\n")
    os.makedirs(f["dir"])
    f["listrun"] = str(d / "listrun")                          # a run folder whose config.json is a JSON list
    os.makedirs(f["listrun"])
    open(os.path.join(f["listrun"], "config.json"), "w").write("[]\n")
    f["otherrun"] = str(d / "otherrun")                        # another tool's run folder (a train.py record)
    os.makedirs(f["otherrun"])
    open(os.path.join(f["otherrun"], "config.json"), "w").write('{"data": "folder", "seed": 0, "steps": 950}\n')
    f["below_file"] = os.path.join(f["notes"], "out")
    f["out"] = str(d / "never")
    return f


BAD_INT = ["abc", "1.5", "nan", ""]
BAD_POS_INT = BAD_INT + ["0", "-3"]
BAD_NONNEG_INT = BAD_INT + ["-1"]
BAD_FLOAT = ["abc", "nan", "inf", "-inf", ""]
BAD_POS_FLOAT = BAD_FLOAT + ["0", "-1e-3"]
BAD_UNIT = BAD_FLOAT + ["-0.1", "1.5"]
BAD_CKPT = ["missing", "evil", "cut", "empty", "text", "dir", "notes"]
BAD_OUT = ["notes.txt", "below_file"]
BAD_DEVICE = ["gpu", "cuda", "cuda:7", "tpu"]


def cases():
    """(id, script, argv with placeholders {name} for fixture files, expected word in the message)."""
    out = []

    def add(script, base, flag, values, word=None, sub=None):
        for v in values:
            argv = ([sub] if sub else []) + [a for a in base] + [flag, v]
            out.append((f"{script}{' ' + sub if sub else ''} {flag}={v!r}", script, argv, word if word is not None else flag))

    # train.py: every number of the Config, the lists, the devices, the outputs
    t = ["--threads", "1", "--out", "{out}"]
    for flag in ("--steps", "--batch", "--T", "--image-size", "--log-every", "--ckpt-every", "--n-samples",
                 "--sample-batch", "--clf-steps", "--clf-batch", "--runs"):
        add("train", t, flag, BAD_POS_INT)
    for flag in ("--regressor-steps", "--grid-every", "--stop-at", "--warmup", "--heatmap-t", "--threads"):
        add("train", t, flag, BAD_NONNEG_INT)
    for flag in ("--lr", "--clf-lr"):
        add("train", t, flag, BAD_POS_FLOAT)
    for flag in ("--weight-decay", "--grad-clip"):
        add("train", t, flag, BAD_FLOAT + ["-1"])
    add("train", t, "--ema", BAD_UNIT + ["1.0"])
    add("train", t, "--label-dropout", BAD_UNIT + ["1.0"])
    add("train", t, "--lambdas", ["30", "30,30,30", "a,b", "nan,30", "30,inf", ""])
    add("train", t, "--lambda-sweep", ["x", "1,,2", "nan"])
    add("train", t, "--sample-respacing", ["0", "1", "ddim0", "abc", "5000", "-3"])
    add("train", t, "--train-respacing", ["abc", "5000", "1"])
    add("train", t, "--T", ["1"], "--T")
    add("train", t, "--attention", ["x", "16,y", "0", "7", "32"])   # 7, 32: no feature map of the cpu U-Net
    add("train", t, "--seed", ["-1"])
    out.append(("train linear T 10", "train", t + ["--schedule", "linear", "--T", "10", "--sample-respacing", "5"], "--T"))
    out.append(("train --classes circles", "train", t + ["--classes", "a,b"], "--classes"))
    out.append(("train --classes csv", "train", t + ["--data", "csv", "--csv", "{notes}", "--classes", "a,b"], "--classes"))
    out.append(("train --print-config bad", "train", t + ["--print-config", "--steps", "-5"], "--steps"))
    out.append(("train --resume list config", "train", ["--threads", "1", "--out", "{listrun}", "--resume"], "config.json"))
    out.append(("train filter-args size", "train", t + ["--data", "folder", "--root", "{dir}", "--filter-args",
                                                        "--size 16"], "--filter-args"))
    add("train", t, "--image-size", ["33", "7"])
    add("train", t, "--heatmap-t", ["1000", "5000"])
    add("train", ["--out", "{out}"], "--device", BAD_DEVICE, "device")
    add("train", ["--threads", "1"], "--out", ["{notes}", "{below_file}"], "is a file")
    add("train", t, "--precision", ["fp16"], "fp16")
    add("train", t, "--data", ["faces", ""], "--data")
    add("train", t, "--unet", ["huge"], "--unet")
    add("train", t, "--backbone", ["rnn"], "--backbone")
    out.append(("train --resume --overwrite", "train", t + ["--resume", "--overwrite"], "--resume"))
    out.append(("train --paper --quick", "train", t + ["--paper", "--quick"], "--paper"))
    out.append(("train --loss simple learned sigma", "train", t + ["--loss", "simple"], "--no-learn-sigma"))
    out.append(("train --resume nothing", "train", t + ["--resume"], "no run to continue"))
    out.append(("train dit attention", "train", t + ["--backbone", "dit", "--attention", "8"], "--attention"))
    out.append(("train unknown flag", "train", t + ["--learning-rate", "1"], "unrecognized"))
    for data, need in (("folder", "--root"), ("csv", "--csv"), ("celeba", "--root")):
        out.append((f"train --data {data} without {need}", "train", t + ["--data", data], need))
    out.append(("train folder missing", "train", t + ["--data", "folder", "--root", "{out}/nope"], "nope"))
    out.append(("train folder is a file", "train", t + ["--data", "folder", "--root", "{notes}"], "notes.txt"))
    out.append(("train csv missing", "train", t + ["--data", "csv", "--csv", "{out}.csv"], ".csv"))
    out.append(("train filter-args bad", "train", t + ["--data", "folder", "--root", "{dir}", "--filter-args",
                                                       "'--steps"], "--filter-args"))

    # multiguide.py
    m = ["--ddpm", "{ddpm}", "--classifier", "{clf}", "--out", "{out}", "--threads", "1"]
    add("multiguide", m, "--n-samples", BAD_POS_INT)
    add("multiguide", m, "--batch", BAD_POS_INT)
    add("multiguide", m, "--seed", BAD_INT + ["-1"])
    add("multiguide", m, "--threads", BAD_NONNEG_INT)
    add("multiguide", m, "--eta", BAD_FLOAT + ["-0.5"])
    add("multiguide", m, "--lambdas", ["30", "30,30,30", "a,b", "nan,1", "1,-inf", ""])
    add("multiguide", m, "--sample-steps", ["0", "1", "abc", "5000", "ddim0", ""])
    add("multiguide", m, "--device", BAD_DEVICE, "device")
    add("multiguide", m, "--precision", ["fp16", "fp8"], "--precision")
    add("multiguide", m, "--guidance", ["free", "both"], "--guidance")
    for bad in BAD_CKPT + ["old", "clf"]:
        out.append((f"multiguide --ddpm {bad}", "multiguide", ["--ddpm", "{%s}" % bad if bad != "missing"
                    else "{out}.pt", "--out", "{out}"], ""))
    for bad in BAD_CKPT + ["ddpm"]:
        out.append((f"multiguide --classifier {bad}", "multiguide", ["--ddpm", "{ddpm}", "--classifier",
                    "{%s}" % bad if bad != "missing" else "{out}.pt", "--out", "{out}"], ""))
    add("multiguide", ["--ddpm", "{ddpm}"], "--out", ["{notes}", "{below_file}"], "is a file")
    out.append(("multiguide no --ddpm", "multiguide", ["--out", "{out}"], "--ddpm"))
    out.append(("multiguide old --n", "multiguide", m + ["--n", "3"], "--n-samples"))

    # evaluate.py
    for sub, base in (("circles", ["--samples", "{samples}", "--out", "{out}"]),
                      ("scores", ["--scores", "{scores}", "--out", "{out}"]),
                      ("classify", ["--samples", "{samples}", "--classifier", "{clf}", "--out", "{out}"]),
                      ("memorization", ["--samples", "{samples}", "--train", "circles", "--out", "{out}"]),
                      ("loss-by-t", ["--ddpm", "{ddpm}", "--train", "circles", "--out", "{out}"])):
        add("evaluate", base[:-2], "--out", ["{notes}", "{below_file}"], "is a file", sub=sub)
        if sub != "scores" and sub != "circles":
            add("evaluate", base, "--threads", BAD_NONNEG_INT, sub=sub)
    add("evaluate", ["--samples", "{samples}", "--out", "{out}"], "--threshold", BAD_INT + ["-5", "300"], sub="circles")
    for bad in ("{floats}", "{scores}", "{notes}", "{out}.npz", "{dir}", "{evil}"):
        out.append((f"evaluate circles --samples {bad}", "evaluate", ["circles", "--samples", bad, "--out", "{out}"], ""))
    add("evaluate", ["--scores", "{scores}", "--out", "{out}"], "--bins", BAD_POS_INT, sub="scores")
    for bad in ("{badscores}", "{notes}", "{out}.npy", "{samples}", "{dir}"):
        out.append((f"evaluate scores --scores {bad}", "evaluate", ["scores", "--scores", bad, "--out", "{out}"], ""))
    for bad in BAD_CKPT + ["ddpm", "clf"]:
        p = "{%s}" % bad if bad != "missing" else "{out}.pt"
        if bad != "clf":
            out.append((f"evaluate classify --classifier {bad}", "evaluate",
                        ["classify", "--samples", "{samples}", "--classifier", p, "--out", "{out}"], ""))
        if bad != "ddpm":
            out.append((f"evaluate loss-by-t --ddpm {bad}", "evaluate",
                        ["loss-by-t", "--ddpm", p, "--train", "circles", "--out", "{out}"], ""))
    lt = ["--ddpm", "{ddpm}", "--train", "circles", "--out", "{out}"]
    add("evaluate", lt, "--t", ["x", "-1", "5000", "1,,2"], "--t", sub="loss-by-t")
    add("evaluate", lt, "--n-images", BAD_NONNEG_INT, sub="loss-by-t")
    add("evaluate", lt, "--train", ["squares", "{notes}", "{out}.npz"], "", sub="loss-by-t")
    mem = ["--samples", "{samples}", "--train", "circles", "--out", "{out}"]
    add("evaluate", mem, "--pairs", BAD_POS_INT, sub="memorization")
    add("evaluate", mem, "--classifier", ["{evil}", "{cut}", "{ddpm}"], "", sub="memorization")

    # filter_data.py
    fd = ["--data", "folder", "--root", "{dir}", "--out", "{out}"]
    for flag in ("--steps", "--batch", "--width", "--size", "--workers"):
        add("filter_data", fd, flag, BAD_POS_INT)
    add("filter_data", fd, "--members", BAD_POS_INT + ["1"])
    add("filter_data", fd, "--lr", BAD_POS_FLOAT)
    add("filter_data", fd, "--tau1", BAD_UNIT + ["0", "1"])
    add("filter_data", fd, "--tau2", BAD_UNIT + ["0", "1"])
    add("filter_data", fd, "--per-side", ["10", "a,b", "0,5", "-1,2"])
    add("filter_data", fd, "--oversample", ["2", "0,1"])
    add("filter_data", fd, "--subset", ["100k"])
    add("filter_data", fd, "--classes", ["a,a", "a"])
    add("filter_data", fd, "--seed", ["-1"])
    out.append(("filter_data cache is a file", "filter_data", fd + ["--cache", "{notes}"], "--cache"))
    for extra in ([], ["--overwrite"]):
        out.append((f"filter_data --out another tool's run {extra}", "filter_data", ["--data", "folder", "--root", "{dir}",
                    "--out", "{otherrun}", *extra], "another tool"))
    add("filter_data", fd, "--device", BAD_DEVICE, "device")
    add("filter_data", fd, "--threads", BAD_NONNEG_INT)
    add("filter_data", ["--data", "folder", "--root", "{dir}"], "--out", ["{notes}", "{below_file}"], "is a file")
    out.append(("filter_data folder empty", "filter_data", fd, "class folders"))
    out.append(("filter_data folder is file", "filter_data", ["--data", "folder", "--root", "{notes}", "--out",
                                                              "{out}"], "notes.txt"))
    out.append(("filter_data celeba no attr", "filter_data", ["--data", "celeba", "--root", "{dir}", "--out", "{out}"],
                "--attr"))
    out.append(("filter_data celeba missing", "filter_data", ["--data", "celeba", "--root", "{dir}", "--attr",
                                                              "Smiling", "--out", "{out}"], "list_attr_celeba.txt"))
    out.append(("filter_data csv missing", "filter_data", ["--data", "csv", "--csv", "{out}.csv", "--out", "{out}"],
                ".csv"))
    out.append(("filter_data csv garbage", "filter_data", ["--data", "csv", "--csv", "{notes}", "--out", "{out}"],
                "notes.txt"))
    out.append(("filter_data classes with csv", "filter_data", ["--data", "csv", "--csv", "{notes}", "--classes",
                                                                "a,b", "--out", "{out}"], "--classes"))

    # latents.py, interpolants.py, generalization.py, classifier.py, toy_circles.py, ddpm.py, report.py
    li = ["--ddpm", "{ddpm}", "--out", "{out}", "--threads", "1"]
    for flag, values in (("--pairs", BAD_POS_INT), ("--frames", BAD_POS_INT + ["1"]), ("--nll-pairs", BAD_NONNEG_INT),
                         ("--batch", BAD_POS_INT), ("--seed", BAD_INT), ("--sample-steps", ["0", "1", "abc", "5000"]),
                         ("--invert-steps", ["abc", "ddim0", "1"]), ("--nll-steps", ["x", "-1"])):
        add("latents", li, flag, values, sub="interp")
    le = ["--ddpm", "{ddpm}", "--classifier", "{clf}", "--out", "{out}"]
    add("latents", le, "--n-samples", BAD_POS_INT, sub="edit")
    add("latents", le, "--invert-frac", BAD_FLOAT + ["0", "1.5"], sub="edit")
    add("latents", le, "--lambdas", ["30", "a,b", "nan,1"], sub="edit")
    add("latents", ["--ddpm", "{ddpm}", "--out", "{out}"], "--classifier", ["{evil}", "{cut}"], "", sub="edit")
    add("latents", ["--out", "{out}"], "--ddpm", ["{evil}", "{cut}", "{clf}", "{dir}"], "", sub="interp")
    add("interpolants", ["--out", "{out}"], "--intervals", BAD_POS_INT + ["1"], sub="twod")
    add("interpolants", ["--out", "{out}"], "--max-iter", BAD_POS_INT, sub="twod")
    add("interpolants", ["--out", "{out}"], "--n-samples", BAD_POS_INT + ["1"], sub="twod")
    add("interpolants", [], "--out", ["{notes}", "{below_file}"], "is a file", sub="twod")
    add("interpolants", [], "--d", BAD_POS_INT + ["2"], sub="bench")
    add("interpolants", [], "--repeats", BAD_POS_INT, sub="bench")
    g = ["--out", "{out}", "--threads", "1"]
    for flag in ("--pool", "--size", "--steps", "--batch", "--T", "--channels", "--n-eval", "--n-samples",
                 "--clf-steps", "--jac-images"):
        add("generalization", g, flag, BAD_POS_INT)
    add("generalization", g, "--T", ["1"])
    add("generalization", g, "--seed", ["-1"])
    add("generalization", g, "--sample-steps", ["1", "abc"])
    add("generalization", g, "--ns", ["x", "0", "4,,8", "99999"])
    add("generalization", g, "--lr", BAD_POS_FLOAT)
    add("generalization", g, "--ema", BAD_UNIT + ["1.0"])
    add("generalization", g, "--radius", BAD_POS_FLOAT)
    add("generalization", g, "--lambdas", ["x", "30", "nan,1"])
    add("generalization", g, "--eval-t", ["x", "-1", "5000"])
    add("generalization", g, "--device", BAD_DEVICE, "device")
    add("generalization", [], "--out", ["{notes}", "{below_file}"], "is a file")
    c = ["--ckpt", "{clf}", "--out", "{out}"]
    add("classifier", c, "--t", BAD_NONNEG_INT + ["100", "5000"])
    add("classifier", c, "--draws", BAD_POS_INT)
    add("classifier", c, "--batch", BAD_POS_INT)
    add("classifier", c, "--device", BAD_DEVICE, "device")
    add("classifier", ["--out", "{out}"], "--ckpt", ["{evil}", "{cut}", "{ddpm}", "{old}", "{out}.pt"], "")
    add("classifier", ["--ckpt", "{clf}"], "--out", ["{notes}", "{below_file}"], "is a file")
    add("toy_circles", ["--out", "{out}"], "--size", ["33", "0", "-8", "x", "128", "4", "2", "1"], "--size")
    add("digits", ["--out", "{out}"], "--seed", ["-1", "x"])
    add("unet", [], "--attention", ["7", "x", "16,y"])
    add("unet", [], "--batch", BAD_POS_INT)
    for flag in ("--batch", "--reps", "--threads"):
        add("dit", [], flag, BAD_POS_INT)
    add("dit", [], "--preset", ["huge"])
    add("toy_circles", ["--out", "{out}"], "--region", ["top"], "--region")
    add("toy_circles", [], "--out", ["{notes}", "{below_file}"], "is a file")
    add("ddpm", [], "--T", BAD_POS_INT + ["1"])
    add("ddpm", [], "--sample-steps", ["0", "1", "abc", "ddim0", "9999"])
    add("ddpm", [], "--out", ["{notes}", "{below_file}"], "is a file")
    out.append(("ddpm linear T 10", "ddpm", ["--schedule", "linear", "--T", "10", "--sample-steps", "5"], "--T"))
    out.append(("ddpm --out draws linear T 10", "ddpm", ["--T", "10", "--sample-steps", "5", "--out", "{out}"], "--T"))
    out.append(("report no results", "report", ["{dir}"], "results.json"))
    out.append(("report not a folder", "report", ["{notes}"], "results.json"))
    return out


CASES = cases()


def test_the_suite_is_large():
    assert len(CASES) >= 300, len(CASES)


@pytest.fixture(autouse=True)
def sentinels(monkeypatch):
    """Training and sampling must never start on bad input; the case fails if they do."""
    def reached(*a, **k):
        raise ReachedWork("bad input reached training or sampling")
    monkeypatch.setattr(fit, "fit", reached)
    monkeypatch.setattr(multiguide, "sample", reached)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def snapshot(paths):
    return {p: sorted((os.path.relpath(os.path.join(r, n), p), os.path.getmtime(os.path.join(r, n)))
                      for r, _, names in os.walk(p) for n in names) if os.path.isdir(p) else os.path.exists(p)
            for p in paths}


@pytest.mark.parametrize("name, script, argv, word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(name, script, argv, word, files, monkeypatch, capsys):
    paths = [a.format(**files) for a in argv if a.startswith("{")]         # the files this case hands over
    argv = [a.format(**files) if "{" in a else a for a in argv]
    watched = [files["out"], files["dir"], os.path.dirname(files["out"])]
    before = snapshot(watched)
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    code = exc.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None), f"{name}: accepted (exit {code!r})"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, f"{name}: {err!r}"
    named = word in err or any(os.path.basename(p) in err for p in paths if word == "" or "{" in name)
    assert named, f"{name}: the message names neither {word!r} nor the file: {err!r}"
    assert snapshot(watched) == before, f"{name}: something was written"
    assert not os.path.exists(MARKER), f"{name}: a checkpoint ran code"


@pytest.mark.parametrize("script, argv, name", [
    ("toy_circles", ["--size", "16"], "circles_train_16.png"),
    ("digits", [], "digits_grid_16.png"),
    ("ddpm", ["--T", "100", "--sample-steps", "5"], "forward_process.png")])
def test_a_second_run_does_not_replace_outputs_without_overwrite(script, argv, name, tmp_path, monkeypatch, capsys):
    module, out = importlib.import_module(script), str(tmp_path / "out")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv, "--out", out])
    module.main()
    before = snapshot([out])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert "--overwrite" in str(exc.value.code) and name in str(exc.value.code)
    assert snapshot([out]) == before
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv, "--out", out, "--overwrite"])
    module.main()
    assert os.path.isfile(os.path.join(out, name))


def test_resuming_from_a_checkpoint_of_another_kind_or_shape_is_one_line(files):
    """fit's resume refuses a classifier where a DDPM checkpoint should be, and weights of another network."""
    def restore(path, model, kind="ddpm"):
        opt = torch.optim.AdamW(model.parameters())
        return fit._restore(path, {}, model, None, opt, torch.amp.GradScaler("cpu", enabled=False), "t", False, kind)
    with pytest.raises(plumbing.CheckpointError, match="holds a 'classifier' model, expected a 'ddpm'"):
        restore(files["clf"], unet.build_unet("tiny", image_size=16))
    with pytest.raises(plumbing.CheckpointError, match="do not fit this network"):
        restore(files["ddpm"], unet.build_unet("cpu"))


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    """mkstemp makes 0600 files; outputs must be readable as any file the user writes (umask applies)."""
    path = tmp_path / "x.json"
    plumbing.write_json({"a": 1}, str(path))
    mask = os.umask(0o022)
    os.umask(mask)
    assert (os.stat(path).st_mode & 0o777) == (0o666 & ~mask)
