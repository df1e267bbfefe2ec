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


# ----------------------------------------------------------------------------------------------
# The commands the documentation shows use flags their script knows, and every flag it requires
# ----------------------------------------------------------------------------------------------

DOCUMENTED_IN = ["README.md", "TUTORIAL.md", *(f"{s}.py" for s in SCRIPTS), "real_images.py", "fit.py", "plumbing.py"]
COMMAND = re.compile(r"python (\w+)\.py((?: [^\s`|#;)]+)*)")


def documented_commands():
    """(file, line, script, argv) of every `python SCRIPT.py ...` of a top-level script that the README, the
    tutorial or a module's text shows; a backslash continues a command on the next line."""
    found = []
    for name in DOCUMENTED_IN:
        lines = open(f"{ROOT}/{name}", encoding="utf-8").read().split("\n")
        for i, line in enumerate(lines):
            j = i
            while line.rstrip().endswith("\\") and j + 1 < len(lines):
                j += 1
                line = line.rstrip()[:-1].rstrip() + " " + lines[j].strip()
            for m in COMMAND.finditer(line):
                if m.group(1) in SCRIPTS:
                    found.append((name, i + 1, m.group(1), m.group(2).split()))
    return found


def any_flags(text):
    return set(re.findall(r"(?<![\w-])(--[A-Za-z][A-Za-z0-9-]*)", text))   # --T too


def usage_flags(text):
    """(every flag in --help, the flags its usage line requires: those outside [ ] brackets)."""
    usage = text.split("\n\n")[0]
    while re.search(r"\[[^\[\]]*\]", usage):
        usage = re.sub(r"\[[^\[\]]*\]", "", usage)
    return any_flags(text), any_flags(usage)


def test_every_documented_command_uses_known_flags_and_the_required_ones(monkeypatch, capsys):
    commands, wrong, helps = documented_commands(), [], {}
    assert len(commands) > 30 and any(f == "multiguide.py" for f, *_ in commands)   # the scan sees them
    for name, line, script, argv in commands:
        sub = argv[0] if SCRIPTS[script] and argv and argv[0] in SCRIPTS[script] else None
        if SCRIPTS[script] and sub is None:
            continue                                    # "python evaluate.py --help" and the like
        if (script, sub) not in helps:
            helps[script, sub] = usage_flags(help_text(script, sub, monkeypatch, capsys))
        known, required = helps[script, sub]
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        if not given or "--help" in given or any(c in " ".join(argv) for c in ('"', "{", "...")):
            continue                 # a name in passing, a help call, a command built in code or elided
        if given - known or required - given:
            wrong.append(f"{name}:{line}: python {script}.py {' '.join(argv)}  unknown {sorted(given - known)}, "
                         f"missing {sorted(required - given)}")
    assert not wrong, "\n".join(wrong)
