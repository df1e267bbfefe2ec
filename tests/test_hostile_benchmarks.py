"""Hostile input for the benchmark scripts (benchmarks/*.py), as test_hostile.py does for the science.

Each case runs a script's main(argv) in this process with one thing wrong and asserts: a non-zero exit,
one line naming the flag, no traceback, nothing written, and no work done (sentinels below raise
ReachedWork where each script's work starts: a timing, a filter run, sampling, training). A few cases
check that valid input still gets through (to the sentinel), and that --help shows real defaults.
"""
import dataclasses
import json
import os

import pytest
import torch

from conftest import ROOT, refused_in_one_line  # noqa: F401  (ROOT puts the repository on sys.path)
import evaluate
import fit
import train
from benchmarks import (bad_samples, bench_grading, bench_guidance, bench_memorization, bench_unet,
                        circles_targets, digits_table1, filter_mild, front_door, loss_aware_t)


class ReachedWork(Exception):
    """Raised by the sentinels: the input got past the checks into the work."""


def reached(*args, **kwargs):
    raise ReachedWork("reached the work")


@pytest.fixture(autouse=True)
def sentinels(monkeypatch):
    for module, name in ((bench_unet, "run_worker"), (bench_guidance, "build_setup"), (evaluate, "nearest_neighbours"),
                         (filter_mild, "write_faces"), (filter_mild, "run_one"), (bad_samples, "run_folder"),
                         (circles_targets, "run_train"), (front_door, "write_folder"), (fit, "fit"), (train, "main")):
        monkeypatch.setattr(module, name, reached)
    monkeypatch.setattr(fit, "ddpm_loss", fit.ddpm_loss)  # loss_aware_t replaces it: put it back afterwards
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tree(path):
    """Every file and folder under path with its mtime: what a refused case must leave alone."""
    return sorted((os.path.relpath(os.path.join(r, n), path), os.path.getmtime(os.path.join(r, n)))
                  for r, dirs, names in os.walk(path) for n in dirs + names)


def refused(main, argv, capsys, folder, *words):
    """main(argv) exits non-zero with one line holding every word, no traceback, nothing changed in folder."""
    before = tree(folder)
    err = refused_in_one_line(main, argv, capsys, *words)
    assert tree(folder) == before, f"{argv}: something was written"
    return err


def accepted(main, argv):
    """main(argv) passes every check and reaches the work (the sentinel)."""
    with pytest.raises(ReachedWork):
        main(argv)


@pytest.fixture
def files(tmp_path):
    """A circles run folder as bad_samples reads it before any work (config.json; the checkpoints only have
    to exist), a regular file, an old JSON result, and an output folder that must not appear."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dict(data="circles", T=1000, lambdas="60,60")))
    for name in ("ddpm.pt", "classifier0.pt"):
        (run / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("a file, not a folder\n")
    (tmp_path / "old.json").write_text("{}\n")
    return dict(run=str(run), notes=str(tmp_path / "notes.txt"), below=str(tmp_path / "notes.txt" / "x.json"),
                old=str(tmp_path / "old.json"), dir=str(tmp_path), out=str(tmp_path / "never"), tmp=tmp_path)


# 1. bad_samples.py: --sample-steps (and --lambdas) checked against each run before any sampling

@pytest.mark.parametrize("flag, value", [("--sample-steps", v) for v in ("0", "1", "abc", "ddim0", "5000", "-3")]
                         + [("--lambdas", v) for v in ("30", "30,30,30", "a,b", "nan,1")])
def test_bad_samples_refuses_bad_steps_and_lambdas(flag, value, files, capsys):
    refused(bad_samples.main, [files["run"], "--out", files["out"], "--n-samples", "2", flag, value], capsys,
            files["tmp"], flag)


def test_bad_samples_accepts_good_steps_and_lambdas(files):
    accepted(bad_samples.main, [files["run"], "--out", files["out"], "--sample-steps", "ddim10", "--lambdas", "1,2"])


# 2. filter_mild.py: --seeds

@pytest.mark.parametrize("value", ["x", "0,,1", "-1", "1.5", "1,1", ""])
def test_filter_mild_refuses_bad_seeds(value, files, capsys):
    refused(filter_mild.main, ["--out", files["out"], "--seeds", value], capsys, files["tmp"], "--seeds")


def test_filter_mild_seeds_and_outputs_of_an_earlier_run(files, capsys):
    accepted(filter_mild.main, ["--out", files["out"], "--seeds", "0, 2", "--data", "faces"])
    os.makedirs(files["out"])
    open(os.path.join(files["out"], "filter_mild.json"), "w").write("{}\n")
    refused(filter_mild.main, ["--out", files["out"]], capsys, files["tmp"], "--overwrite", "filter_mild.json")
    accepted(filter_mild.main, ["--out", files["out"], "--overwrite", "--data", "faces"])


def test_front_door_keeps_an_earlier_run_without_overwrite(files, capsys):
    os.makedirs(os.path.join(files["out"], "faces"))
    refused(front_door.main, ["--out", files["out"]], capsys, files["tmp"], "--overwrite", "faces")
    accepted(front_door.main, ["--out", files["out"], "--overwrite"])


# 3. bench_unet.py: the one-line parser, --trials

@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", ""])
def test_bench_unet_refuses_bad_trials(value, files, capsys):
    refused(bench_unet.main, ["--trials", value], capsys, files["tmp"], "--trials")


def test_bench_unet_unknown_flag_is_one_line_and_good_flags_pass(files, capsys):
    refused(bench_unet.main, ["--trails", "2"], capsys, files["tmp"], "--trails")
    refused(bench_unet.main, ["--worker"], capsys, files["tmp"], "--worker")   # internal, needs its spec
    accepted(bench_unet.main, ["--trials", "2", "--json", os.path.join(files["out"], "unet.json")])


# 4. --json: checked before the timing (not a folder, not below a file, an old file only with --overwrite)

JSON_SCRIPTS = {"bench_guidance": (bench_guidance.main, ["--quick"]), "bench_unet": (bench_unet.main, ["--quick"]),
                "bench_memorization": (bench_memorization.main, ["--refs", "10", "--queries", "2", "--size", "4"]),
                "circles_targets": (circles_targets.main, ["--out", "{out}"])}


@pytest.mark.parametrize("script", JSON_SCRIPTS)
@pytest.mark.parametrize("where, words", [("below", ("--json", "is a file")), ("dir", ("--json", "is a folder")),
                                          ("old", ("--json", "--overwrite"))])
def test_json_path_is_refused_before_any_work(script, where, words, files, capsys):
    main, base = JSON_SCRIPTS[script]
    refused(main, [a.format(**files) for a in base] + ["--json", files[where]], capsys, files["tmp"], *words)


@pytest.mark.parametrize("script", JSON_SCRIPTS)
def test_json_overwrite_and_new_paths_pass_the_check(script, files):
    main, base = JSON_SCRIPTS[script]
    base = [a.format(**files) for a in base]
    accepted(main, base + ["--json", files["old"], "--overwrite"])
    accepted(main, base + ["--json", os.path.join(files["out"], "deeper", "new.json")])


def test_json_is_written_atomically_over_an_old_file_with_overwrite(files, monkeypatch):
    monkeypatch.undo()  # a real (tiny) search: 10 refs x 2 queries of 4 x 4 pixels
    assert bench_memorization.main(["--refs", "10", "--queries", "2", "--size", "4", "--json", files["old"],
                                    "--overwrite"]) == 0
    assert json.load(open(files["old"]))["refs"] == 10
    assert not [n for n in os.listdir(files["dir"]) if n.startswith(".tmp_")]


# 5. loss_aware_t.py: --resume and classifier-free guidance refused from the parsed command line, first

TINY = ["--threads", "1", "--unet", "tiny", "--clf", "tiny", "--image-size", "16", "--T", "100", "--steps", "2"]


@pytest.mark.parametrize("argv", [["--guidance=free"], ["--guidance", "free"], ["--cfg"], ["--gui", "free"]])
def test_loss_aware_t_refuses_classifier_free_guidance_however_spelled(argv, files, capsys):
    refused(loss_aware_t.main, TINY + ["--out", files["out"], *argv], capsys, files["tmp"], "--guidance free")


@pytest.mark.parametrize("flag", ["--resume", "--resu"])
def test_loss_aware_t_refuses_resume_however_spelled(flag, files, capsys):
    # a run folder that train.py itself would resume: its config.json is this configuration's
    run = os.path.join(files["dir"], "la")
    os.makedirs(run)
    cfg = train.parse_config(TINY + ["--out", run])
    open(os.path.join(run, "config.json"), "w").write(json.dumps(dataclasses.asdict(cfg)))
    refused(loss_aware_t.main, TINY + ["--out", run, flag], capsys, files["tmp"], "--resume is not supported")
    refused(loss_aware_t.main, TINY + ["--out", files["out"], flag], capsys, files["tmp"], "--resume")  # no run there
    assert fit.ddpm_loss is not loss_aware_t.loss_aware_ddpm_loss


def test_loss_aware_t_accepts_the_default_guidance_spelled_out(files):
    accepted(loss_aware_t.main, TINY + ["--out", files["out"], "--guidance", "classifier"])
    assert fit.ddpm_loss is loss_aware_t.loss_aware_ddpm_loss and not os.path.exists(files["out"])


# 6. --help: real defaults, each said once; never "None" or an empty "(default: )"

HELP = {"bad_samples": bad_samples.main, "bench_grading": bench_grading.main, "bench_guidance": bench_guidance.main,
        "bench_memorization": bench_memorization.main, "bench_unet": bench_unet.main,
        "circles_targets": circles_targets.main, "digits_table1": digits_table1.main, "filter_mild": filter_mild.main,
        "front_door": front_door.main}  # loss_aware_t's --help is train.py's


@pytest.mark.parametrize("script", HELP)
def test_help_shows_each_default_once_and_never_an_empty_one(script, capsys):
    with pytest.raises(SystemExit) as exc:
        HELP[script](["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    blocks = [" ".join(b.split()) for b in ("\n" + text).split("\n  -")[1:]]  # one per option, unwrapped
    assert blocks and "(default: )" not in text and "None" not in text, text
    for block in blocks:
        assert block.count("(default:") <= 1, block
    if script == "bad_samples":
        assert any("(default: each run's --lambdas)" in b for b in blocks)
        assert any("(default: each run's --sample-respacing)" in b for b in blocks)
    if script in ("bench_memorization", "bench_guidance", "bench_unet"):
        assert any(b.startswith("-json") and "(default: none" in b for b in blocks)
