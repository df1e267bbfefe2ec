"""TUTORIAL.md runs: every ```bash block, as written, with the sizes that train or sample shrunk.

The shrinking is the table SHRINK below, which TUTORIAL.md documents in "How this tutorial is
tested"; each entry must match the tutorial at least once, so the two cannot drift apart silently.
Outputs go to a temporary folder instead of runs/tutorial/.
"""
import os
import re
import subprocess

from conftest import ENV, ROOT  # noqa: E402

TUTORIAL = os.path.join(ROOT, "TUTORIAL.md")
MARK = "<!-- runnable -->"
SHRINK = [("--steps 1000", "--steps 6"), ("--clf-steps 300", "--clf-steps 4"), ("--n-samples 64", "--n-samples 8"),
          ("--n-samples 16", "--n-samples 4"), ("--sample-steps 50 ", "--sample-steps 5 "), ("for lam in 0 10 30 60", "for lam in 0 30")]


def bash_blocks(text):
    """[(marked runnable, code)] for every fenced ```bash block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip().startswith("```bash"):
            previous = next((l.strip() for l in reversed(lines[:i]) if l.strip()), "")
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            blocks.append((previous == MARK, "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def test_every_block_is_runnable_and_every_reference_picture_is_small():
    text = open(TUTORIAL).read()
    blocks = bash_blocks(text)
    assert len(blocks) >= 7 and all(marked for marked, _ in blocks), "every bash block must be marked runnable"
    pictures = re.findall(r"\]\((docs/tutorial/[\w.-]+\.png)\)", text)
    assert len(pictures) >= 7
    for rel in pictures:
        path = os.path.join(ROOT, rel)
        assert os.path.isfile(path) and os.path.getsize(path) < 100_000, rel
    assert "[TUTORIAL.md](TUTORIAL.md)" in open(os.path.join(ROOT, "README.md")).read()


def test_tutorial_commands_run_and_write_their_pictures(tmp_path):
    text = open(TUTORIAL).read()
    out = str(tmp_path / "tutorial")
    for k, (_, code) in enumerate(bash_blocks(text)):
        for old, new in SHRINK:
            code = code.replace(old, new)
        code = code.replace("runs/tutorial", out)
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, f"block {k + 1}:\n{code}\n{r.stderr[-3000:]}"
        if "unet.py" in code:
            assert "parameters:" in r.stdout and "-> output (2, 6, 32, 32)" in r.stdout
    for old, _ in SHRINK:
        assert old in text, f"TUTORIAL.md no longer contains {old!r}: update SHRINK and its paragraph"
    named = set(re.findall(r"runs/tutorial/\w[\w/.-]*\.png", text))
    assert len(named) >= 8
    for rel in named:
        assert os.path.isfile(rel.replace("runs/tutorial", out)), f"{rel} was not written"
