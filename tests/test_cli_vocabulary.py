"""One flag vocabulary in every command line: each script's --help, and each subcommand's, is walked.

--steps means training steps only, --sample-steps sampling steps, --n-samples a number of samples;
--seed, --device, --threads, --out and --overwrite mean the same everywhere; no default prints as
"None"; an old spelling is refused with one line naming the new flag.
"""
import importlib
import re
import sys

import pytest

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)

# script -> subcommands ([] = none)
SCRIPTS = {"train": [], "multiguide": [], "filter_data": [], "generalization": [], "classifier": [], "report": [],
           "toy_circles": [], "ddpm": [], "unet": [], "dit": [], "evaluate": ["circles", "scores", "classify",
           "memorization", "loss-by-t"], "latents": ["interp", "edit"], "interpolants": ["twod", "bench"]}
# the command lines that run a network and write results: the whole run-control vocabulary
RUNS_A_MODEL = {"train", "multiguide", "generalization", "classifier", "evaluate classify", "evaluate loss-by-t",
                "latents interp", "latents edit"}
SAMPLES = {"multiguide", "latents edit", "train", "generalization"}       # draw samples: --n-samples
TRAINS = {"train", "filter_data", "generalization"}                       # train networks: --steps
CASES = [(s, sub) for s, subs in SCRIPTS.items() for sub in (subs or [None])]


def help_text(script, sub, monkeypatch, capsys):
    module = importlib.import_module(script)
    argv = [sub, "--help"] if sub else ["--help"]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 0
    return capsys.readouterr().out


def flags(text):
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


@pytest.mark.parametrize("script, sub", CASES, ids=[f"{s} {b}" if b else s for s, b in CASES])
def test_help_speaks_the_vocabulary(script, sub, monkeypatch, capsys):
    text = help_text(script, sub, monkeypatch, capsys)
    name = f"{script} {sub}" if sub else script
    found = flags(text)
    assert "None" not in text, f"{name}: a default prints as None"
    assert not found & {"--n", "--m", "--respace", "--demo"}, f"{name}: old spellings {found & {'--n', '--m'}}"
    if name in RUNS_A_MODEL:
        assert {"--device", "--threads", "--out", "--overwrite"} <= found, (name, found)
        assert "--seed" in found or name == "evaluate classify", name        # classify draws nothing at random
    if name in SAMPLES:
        assert "--n-samples" in found and ("--sample-steps" in found or "--sample-respacing" in found), name
    if "--steps" in found:
        assert name in TRAINS, f"{name}: --steps means training steps; sampling steps are --sample-steps"


@pytest.mark.parametrize("argv, old, new", [
    (["multiguide", "--n", "4"], "--n", "--n-samples"),
    (["multiguide", "--steps", "4"], "--steps", "--sample-steps"),
    (["latents", "edit", "--n", "4"], "--n", "--n-samples"),
    (["evaluate", "loss-by-t", "--n", "4"], "--n", "--n-images"),
    (["interpolants", "twod", "--n", "4"], "--n", "--intervals"),
    (["generalization", "--m", "4"], "--m", "--n-samples"),
    (["ddpm", "--respace", "50"], "--respace", "--sample-steps"),
])
def test_an_old_spelling_names_its_new_flag(argv, old, new, monkeypatch, capsys):
    module = importlib.import_module(argv[0])
    monkeypatch.setattr(sys, "argv", [f"{argv[0]}.py", *argv[1:]])
    with pytest.raises(SystemExit) as exc:
        module.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{old} was renamed {new}" in err and len(err.strip().splitlines()) == 1, err
