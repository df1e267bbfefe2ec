"""The documentation: README.md is a short front door, and what it says stays true.

    python -m pytest -q tests/test_docs.py        (under a second; needs neither torch nor a GPU)

What is checked:
    1. README.md is at most README_MAX_BYTES bytes.
    2. Every number README.md quotes appears in docs/RESULTS.md (or in a results file committed
       under docs/, *.json or *.csv), so the front door and the results log cannot drift apart.
       Which numbers count, and which are skipped and why, is spelled out at `quoted_numbers`.
    3. The test command of the README's quick start is exactly the one CI runs (.ci/run), and the
       quick start shows the headline command `python train.py --data circles`.
    4. Every relative link and image in README.md and docs/*.md points to a file that exists inside
       the repository; a link to a heading (`file.md#anchor`) names a heading of that file.
    5. docs/RESULTS.md's table of contents lists each of its sections.
    6. No tracked text file (`git ls-files`, except .ci/) points outside the repository or speaks
       of how the code was produced instead of citing the paper: see FORBIDDEN.
"""
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"
CI_SCRIPT = ROOT / ".ci" / "run"
README_MAX_BYTES = 16_000


# ----------------------------------------------------------------------------------------------
# Reading markdown
# ----------------------------------------------------------------------------------------------

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)


def blank(match):
    """A regex replacement that keeps a span's newlines (so line numbers survive) and blanks the rest."""
    return re.sub(r"[^\n]", " ", match.group(0))


def code_blocks(text):
    """The fenced code blocks of a markdown text, each as its list of lines (fences excluded)."""
    return [m.group(0).split("\n")[1:-1] for m in FENCE.finditer(text)]


def section(text, heading):
    """The body of the section `## heading` (up to the next heading of level 1 or 2)."""
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert m, f"no section '## {heading}'"
    return m.group(1)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    """Every heading anchor of a markdown text, duplicates numbered as GitHub does (x, x-1, x-2)."""
    seen, out = {}, set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# ----------------------------------------------------------------------------------------------
# 1. Size
# ----------------------------------------------------------------------------------------------

def test_readme_is_small():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, (f"README.md is {size} bytes, over {README_MAX_BYTES}: move detail to "
                                      "docs/RESULTS.md or docs/REFERENCE.md and link to it")


# ----------------------------------------------------------------------------------------------
# 2. Every number the README quotes is in the results log
# ----------------------------------------------------------------------------------------------

# A number: an integer (thousands may be grouped, 60,000), with an optional decimal part and an
# optional percent sign. Not preceded by a letter, digit, underscore or dot, so the digits of
# identifiers (classifier0.pt, bf16, x_0, App. D.3) are not numbers.
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(%?)")

# Spans removed from the README before its numbers are read. None of them is a measurement, so the
# results log has no reason to hold them:
SKIPPED = [
    # link and image targets, and URLs: file names and addresses (test 4 checks the files exist)
    re.compile(r"\]\([^)\s]*\)"),
    re.compile(r"\bhttps?://\S+"),
    # version pins and version numbers in the install commands: torch==2.13.0, numpy>=1.24, 2.13.0
    re.compile(r"[\w.-]*(?:==|>=|<=|~=|!=)\s*\d[\w.]*"),
    re.compile(r"\b\d+\.\d+\.\d+\w*"),
    # citations of the paper: Sec. 5.5, Sections 5.1-5.3, App. D.1, Eq. 2, Fig. 7b, Table 1
    re.compile(r"\b(?:Sec\.|Sections?|App\.|Appendix|Eqs?\.|Equations?|Figs?\.|Figures?|Tables?|Alg\.|Algorithm)"
               r"\s*[A-Z]?\d+(?:\.\d+)*[a-z]?(?:\s*(?:-|,|/|and)\s*[A-Z]?\d+(?:\.\d+)*[a-z]?)*"),
    # the year of a citation: ICML 2024
    re.compile(r"\b(?:ICML|ICLR|NeurIPS|CVPR|ICCV|ECCV|AAAI|TMLR|arXiv)\s+\d{4}\b"),
    # the markers of a numbered list: "7. `fit.py`"
    re.compile(r"^\s*\d+\.(?=\s)", re.M),
]


def numbers(text):
    """The numbers of a text as strings (thousands commas dropped, % dropped): '60000', '85.5'."""
    return {(m.group(1).replace(",", "") + (m.group(2) or "")) for m in NUMBER.finditer(text)}


def quoted_numbers(text):
    """(line number, number) for every number a README quotes.

    Counted: decimals (0.13, 11.2), percentages (6%, 85.5%) and integers of two or more digits
    (722, 4000). Single-digit integers are skipped: they count things (two classes, 5 classifiers,
    step 4 of a list) far more often than they report a measurement, and would tie ordinary prose to
    the results log. Also skipped: everything in SKIPPED (links, URLs, version pins, citations of
    the paper's sections, a venue's year, list markers).
    """
    for pattern in SKIPPED:
        text = pattern.sub(blank, text)
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):
        for m in NUMBER.finditer(line):
            integer, decimals, percent = m.groups()
            if decimals or percent or len(integer.replace(",", "")) >= 2:
                out.append((lineno, integer.replace(",", "") + (decimals or "")))
    return out


def results_sources():
    """docs/RESULTS.md and every results file (*.json, *.csv) under docs/."""
    return [RESULTS] + sorted(p for p in (ROOT / "docs").rglob("*") if p.suffix in (".json", ".csv") and p.is_file())


def test_numbers_skipped_and_counted_on_a_hand_made_line():
    line = ("torch==2.13.0 (ICML 2024, Sec. 5.5, App. D.3, Sections 5.1-5.3): 85.5% of 256 samples, "
            "6% bad, 0.13 / 0.61, 60,000 faces, 5 classifiers, classifier0.pt, bf16, "
            "![x](docs/results/dit_6000.png) https://example.org/v12")
    assert sorted(n for _, n in quoted_numbers(line)) == sorted(["85.5", "256", "6", "0.13", "0.61", "60000"])
    assert quoted_numbers("1. `toy_circles.py`\n10. `train.py`, 12 files") == [(2, "12")]
    assert numbers("1,201,048 params, 0,10,30,60") == {"1201048", "0", "10", "30", "60"}


def test_every_number_quoted_in_the_readme_is_in_the_results_log():
    known = set()
    for path in results_sources():
        known |= numbers(path.read_text(encoding="utf-8"))
    lines = README.read_text(encoding="utf-8").split("\n")
    missing = [f"README.md:{i}: {n}   | {lines[i - 1].strip()[:90]}"
               for i, n in quoted_numbers("\n".join(lines)) if n not in known]
    assert not missing, ("numbers quoted in README.md but absent from docs/RESULTS.md (add the result "
                         "there, with its command, or drop it here):\n" + "\n".join(missing))


# ----------------------------------------------------------------------------------------------
# 3. The quick start's commands
# ----------------------------------------------------------------------------------------------

PYTEST_COMMAND = re.compile(r"^\s*(python3? -m pytest\b[^#]*)")


def test_readme_test_command_is_the_ci_command():
    ci = [m.group(1).strip() for line in CI_SCRIPT.read_text().split("\n") if (m := PYTEST_COMMAND.match(line))]
    assert len(ci) == 1, f".ci/run should run pytest once, found {ci}"
    text = README.read_text(encoding="utf-8")
    readme = {m.group(1).strip() for block in code_blocks(text) for line in block if (m := PYTEST_COMMAND.match(line))}
    assert readme == {ci[0]}, f"README's test command(s) {sorted(readme)} differ from .ci/run's {ci[0]!r}"
    quick = "\n".join("\n".join(b) for b in code_blocks(section(text, "Quick start")))
    assert ci[0] in quick and "python train.py --data circles" in quick


# ----------------------------------------------------------------------------------------------
# 4. Links and images
# ----------------------------------------------------------------------------------------------

# [text](target), ![alt](target), [text](target "title"); reference definitions [id]: target;
# HTML src= and href=. Code (fenced blocks, `inline spans`) is removed first: a link there is text.
LINKS = [
    re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"),
    re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M),
    re.compile(r"\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']"),
]


def markdown_files():
    return [README] + sorted((ROOT / "docs").rglob("*.md"))


def links(text):
    """(line number, target) of every link and image of a markdown text, outside code."""
    text = FENCE.sub(blank, text)
    text = re.sub(r"`[^`\n]*`", blank, text)
    out = []
    for pattern in LINKS:
        for m in pattern.finditer(text):
            out.append((text.count("\n", 0, m.start(1)) + 1, m.group(1)))
    return sorted(out)


def broken_link(source, target):
    """Why a link from the file `source` to `target` is broken, or None if it is fine."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):       # http:, https:, mailto: ...
        return None
    path, _, anchor = target.partition("#")
    dest = (source.parent / path).resolve() if path else source
    if ROOT not in dest.parents and dest != ROOT:
        return "points outside the repository"
    if not dest.exists():
        return "no such file"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
        return f"no heading with anchor #{anchor} in {dest.relative_to(ROOT)}"
    return None


def test_slug_follows_github():
    assert slug("Circles: the headline (Sec. 5.5)") == "circles-the-headline-sec-55"
    assert slug("The fix that made it work: input_skip in the U-Net") == "the-fix-that-made-it-work-input_skip-in-the-u-net"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## B: c") == {"a", "a-1", "b-c"}


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_exists(path):
    found = links(path.read_text(encoding="utf-8"))
    assert found, f"{path.name}: no link found (is the link pattern broken?)"
    bad = [f"{path.relative_to(ROOT)}:{line}: {target} ({why})"
           for line, target in found if (why := broken_link(path, target))]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_results_contents_lists_every_section():
    text = RESULTS.read_text(encoding="utf-8")
    contents = section(text, "Contents")
    listed = {target[1:] for _, target in links(contents) if target.startswith("#")}
    headings = {slug(m.group(1)) for m in re.finditer(r"^#{2,3} +(.+)$", FENCE.sub("", text), re.M)} - {"contents"}
    assert headings - listed == set(), f"sections missing from the contents of docs/RESULTS.md: {sorted(headings - listed)}"


# ----------------------------------------------------------------------------------------------
# 6. Nothing points outside the repository or tells how the code was made
# ----------------------------------------------------------------------------------------------

# Written so that this file does not match itself (no pattern's source contains its own match).
FORBIDDEN = {
    "a path into a folder beside the repository": re.compile(r"\.\.[/\\]shared\b"),
    "the internal notes file (cite the paper's section or the authors' released configuration)":
        re.compile(r"PAPER[_]FACTS", re.I),
    "how the code was produced (a working session)": re.compile(r"\bthis\s+session", re.I),
    "how the work was organised (an issue tracker)": re.compile(r"\bthe\s+issues?\b", re.I),
}


def tracked_files():
    """Tracked files (git ls-files); without git, every file outside hidden and generated folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in {"runs", "out", "venv", "__pycache__"}]
            files += [Path(folder) / name for name in names]
        return files


def text_of(path):
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_points_outside_or_tells_how_it_was_made():
    offending = []
    for path in tracked_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(".ci/") or not path.is_file() or (text := text_of(path)) is None:
            continue
        for lineno, line in enumerate(text.split("\n"), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    offending.append(f"{rel}:{lineno}: {what}: {line.strip()[:100]}")
    assert not offending, "lines to rewrite:\n" + "\n".join(offending)
