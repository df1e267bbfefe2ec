"""assignments/grade.py -- run the grading tests and print the points per assignment.

What this file is
    The autograder (nbgrader's and otter-grader's idea, on plain pytest). Every grading test in
    assignments/tests/ carries @pytest.mark.assignment("aK", points=N); the conftest there copies the
    marker into the test's user_properties, and pytest writes them into its own --junitxml report.
    This script runs pytest once on --root (the reference repository or a student copy), reads that
    XML, and sums the points of the passing tests per assignment. A test that fails, errors or is
    skipped earns nothing. Nothing is parsed out of pytest's printed text.

    Output: a table (assignment, points earned / possible, the failing tests) and, with --json, the
    same for a gradebook: {"root", "total": {"earned", "possible"}, "assignments": {"a1": {"title",
    "kind", "earned", "possible", "failing", "tests": [{"name", "points", "passed"}]}}}. Report
    assignments (a8) are listed with their checklist instead of points.

    Exit status: 0 when the grading ran (whatever the score), 1 when it could not (no report, a
    grading test file that does not even collect, pytest's own usage error), 2 for bad flags.

Run
    python assignments/grade.py                                   # grade this repository
    python assignments/grade.py --root ../zsi-student --json grades.json
"""
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

from build import ASSIGNMENTS, ROOT, OneLineParser


def run_pytest(root, xml_path, timeout, show):
    """pytest on root/assignments/tests with a JUnit XML report; returns pytest's exit code."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--tb=short",
           "--rootdir", root, "--junitxml", xml_path, os.path.join(root, "assignments", "tests")]
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), PYTHONDONTWRITEBYTECODE="1")
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=not show, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"grade.py: the grading tests ran past --timeout {timeout} s (an endless loop?)") from None
    return proc.returncode


def read_report(xml_path):
    """Per test: dict(name, assignment, points, passed), from the JUnit XML; plus collection errors."""
    tests, errors = {}, []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        name = f"{module}.py::{case.get('name')}" if module else case.get("name", "")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        failed = any(case.find(tag) is not None for tag in ("failure", "error", "skipped"))
        if "assignment" not in props:
            if failed:   # e.g. a grading file that does not import: pytest reports it without properties
                errors.append(name)
            continue
        entry = tests.setdefault(name, dict(name=name, assignment=props["assignment"],
                                            points=float(props["points"]), passed=True))
        entry["passed"] = entry["passed"] and not failed    # a teardown error adds a second entry
    return list(tests.values()), errors


def score(tests):
    """{assignment: dict(title, kind, earned, possible, failing, tests)} for every assignment."""
    table = {}
    for a, (title, kind) in ASSIGNMENTS.items():
        mine = [t for t in tests if t["assignment"] == a]
        table[a] = dict(title=title, kind=kind, earned=sum(t["points"] for t in mine if t["passed"]),
                        possible=sum(t["points"] for t in mine),
                        failing=[t["name"] for t in mine if not t["passed"]],
                        tests=[dict(name=t["name"], points=t["points"], passed=t["passed"]) for t in mine])
    for t in tests:
        if t["assignment"] not in ASSIGNMENTS:
            raise SystemExit(f"grade.py: test {t['name']} is marked with unknown assignment {t['assignment']!r}")
    return table


def fmt(points):
    return f"{points:g}"


def print_table(table):
    width = max(len(f"{a} {v['title']}") for a, v in table.items())
    print(f"{'assignment':<{width}}  {'points':>9}  failing tests")
    for a, v in table.items():
        label = f"{a} {v['title']}"
        if v["kind"] == "report":
            print(f"{label:<{width}}  {'report':>9}  graded by the checklist in assignments/{a}.md")
            continue
        pts = f"{fmt(v['earned'])} / {fmt(v['possible'])}" if v["possible"] else "no tests"
        print(f"{label:<{width}}  {pts:>9}  {', '.join(v['failing']) or '-'}")
    earned = sum(v["earned"] for v in table.values())
    possible = sum(v["possible"] for v in table.values())
    print(f"{'total':<{width}}  {fmt(earned) + ' / ' + fmt(possible):>9}")
    return earned, possible


def main(argv=None):
    parser = OneLineParser(prog="grade.py", description="Run the grading tests (assignments/tests) and print "
                           "the points per assignment.")
    parser.add_argument("--root", default=ROOT, help="repository to grade: the reference or a student copy "
                        "(default: the one holding this script)")
    parser.add_argument("--json", default=None, help="also write the grades to this JSON file (for a gradebook)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the grading run is stopped")
    parser.add_argument("--show-output", action="store_true", help="print pytest's own output too")
    args = parser.parse_args(argv)
    root = os.path.abspath(args.root)
    if not os.path.isdir(os.path.join(root, "assignments", "tests")):
        parser.error(f"--root {args.root} has no assignments/tests folder to grade")
    if args.json is not None and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a folder; expected a file name")
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "report.xml")
        code = run_pytest(root, xml_path, args.timeout, args.show_output)
        if not os.path.isfile(xml_path) or code not in (0, 1):
            raise SystemExit(f"grade.py: pytest could not run the grading tests in {root} (exit code {code}); "
                             f"rerun with --show-output to see why")
        tests, errors = read_report(xml_path)
    table = score(tests)
    earned, possible = print_table(table)
    if args.json is not None:
        record = dict(root=root, total=dict(earned=earned, possible=possible), assignments=table, errors=errors)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
            fh.write("\n")
    if errors:
        raise SystemExit(f"grade.py: grading files that did not run: {', '.join(errors)}")


if __name__ == "__main__":
    main()
