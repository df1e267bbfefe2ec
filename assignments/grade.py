"""assignments/grade.py -- grade student submissions with the instructor's tests, one sandboxed
pytest process per assignment, and write a gradebook.

What this file is
    The autograder (nbgrader's and otter-grader's idea, on plain pytest), built not to trust the
    submission. The REFERENCE is the instructor's repository (default: the one holding this script):
    its git-tracked files, read once into memory at the start, including the instructor-only hidden
    tests of assignments/hidden/ (build.py never copies them). The files a student edits are the
    reference's files that hold a solution region of a graded assignment (ddpm.py, unet.py,
    multiguide.py, evaluate.py, filter_data.py). For each submission (a folder: a student copy) the
    grader takes ONLY those files from it, as regular files (a symbolic link is refused), and lays
    them into a fresh copy of the reference. Everything else the submission ships is never read: its
    tests, conftest.py, pytest.ini / setup.cfg / pyproject.toml / tox.ini, sitecustomize.py, .pth
    files, extra modules, a points table.

    Which tests exist and what they are worth comes from one collection run on the reference itself
    (every test marked @pytest.mark.assignment("aK", points=N), in assignments/tests and
    assignments/hidden). Then, for each submission and each graded assignment, one process runs that
    assignment's tests (public and hidden) in its own fresh tree. The processes are forked by one
    fork server (gradeplugin.serve), which has imported numpy, torch and pytest once and never runs
    student code, so a run costs 0.4 s instead of 2 s of start-up. Each process gets:
      * `python -I -B`: no PYTHON* variables, no user site, no current folder on sys.path, no .pyc;
        a cleaned environment (PATH, a private HOME and TMPDIR, one thread, pytest's plugin
        autoload off); its own session; pytest with `-p no:cacheprovider -o addopts= -c <empty
        ini> --confcutdir <tree> --rootdir <tree>`, so no conftest.py or ini file from outside the
        tree is read;
      * resource limits set before pytest starts, hard and soft: address space (--memory GiB), CPU
        seconds (--timeout + 5), file size (64 MiB), no core files; a wall-clock timeout
        (--timeout) after which its whole process group is killed;
      * results through a pipe whose lines are HMAC-signed with a key the process receives on a
        second pipe (assignments/gradeplugin.py), cross-checked against pytest's JUnit XML report,
        written into a folder the grader creates. A test earns its points only when the signed
        record and the XML both say it passed, and every expected test id must be reported.
    A run that ends badly scores 0 for that assignment only, with the reason: "timed out after
    60 s", "process exited (status 0) while importing evaluate.py", "killed by SIGKILL", "hit the
    memory limit (3 GiB) in test_x", "raised SystemExit (sys.exit?) in test_x", "results not signed by the
    grader's plugin", "pytest's machinery was changed during test_x", "the JUnit report and the
    signed results disagree on test_x", "2 expected test(s) not reported".

    What a hostile submission can still do (run untrusted code in a container or as its own user):
    its code runs as your user, so it can read and write your files (the reference's hidden tests
    and solutions, other runs' folders) and signal or trace the grader's processes; inside its test
    process it can find the signing key in memory, or forge outcomes in ways the tamper check does
    not compare (it compares pytest's runner and report functions, the assertion helpers such as
    pytest.approx and numpy.testing, and the code of every collected test function; a returned
    object whose == always says True is one way it does not see); it can read the hidden tests'
    code during its own run; a process that double-forks into a new session escapes the kill of
    its group. Killing the fork server costs the runs in
    flight at that moment: each is run once more with a new server, and a run during which it dies
    twice scores 0 (with --jobs 1 only the killer's own run). The grader reads the reference once
    at the start, so a change to the instructor's files on disk during grading does not reach later
    runs; it warns when it finds one at the end.

    Outputs: a table on stdout (with one submission), a CSV gradebook (--csv: a "(possible)" row, then
    one row per submission: a column per assignment with its public + hidden points, total, hidden =
    the hidden tests' part of the total, notes), a JSON with every test's outcome (--json), and a
    markdown file per submission (--feedback DIR): each assignment's points, the failing public
    tests with the line of the test where they failed, the hidden tests by count only. Progress goes
    to stderr, one line per run; the last line is a one-line summary. Exit status: 0 when grading
    ran (whatever the scores), 1 when it could not (the reference's tests do not collect), 2 for bad
    flags or input.

Run
    python assignments/grade.py                                   # check this copy (what a student runs)
    python assignments/grade.py ../subs/* --jobs 2 --timeout 60 --csv grades.csv --json grades.json \
        --feedback feedback/                                      # an instructor's batch
    python assignments/grade.py ../subs/alice --only a3,a4         # two assignments of one submission
"""
import concurrent.futures
import csv
import hashlib
import hmac
import json
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from build import ASSIGNMENTS, ROOT, BuildError, OneLineParser, find_regions, source_files

PLUGIN = "gradeplugin"          # assignments/gradeplugin.py: the fork server and the pytest plugin
PRELOAD = ("numpy", "torch", "pytest", "matplotlib.figure", "cv2")   # imported once, by the fork server
FILE_LIMIT = 64 << 20           # bytes a grading process may write to one file
MAX_FILE = 1 << 20              # bytes of one student file the grader accepts
MAX_RESULTS = 4 << 20           # bytes of signed results read back from one run
SERVER = ("import sys\n"
          "sys.path.insert(0, sys.argv[1])\n"
          f"import {PLUGIN}\n"
          f"{PLUGIN}.serve(int(sys.argv[2]), sys.argv[3:])\n")


class GradeError(Exception):
    """Bad input (exit 2) or a reference whose tests cannot be collected (exit 1): one line."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


def note(message):
    print(f"grade.py: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The reference and the submissions
# ----------------------------------------------------------------------------------------------

def snapshot(root):
    """{rel: bytes} of the reference: its git-tracked files (hidden tests included), read once, now."""
    files = {}
    for rel in source_files(root, instructor=True):
        with open(os.path.join(root, rel), "rb") as fh:
            files[rel] = fh.read()
    return files


def editable_files(snap, graded):
    """The files a student edits: the reference's .py files that hold a region of a graded assignment."""
    found = []
    for rel, data in snap.items():
        if rel.endswith(".py"):
            try:
                regions = find_regions(data.decode("utf-8").splitlines(keepends=True), rel)
            except (BuildError, UnicodeDecodeError) as e:
                raise GradeError(f"--reference: {e}") from None
            if any(r["id"] in graded for r in regions):
                found.append(rel)
    return sorted(found)


def read_submission(path, editable):
    """({rel: bytes, or None when missing or refused}, [notes]) of the editable files of one submission.
    Only regular files, opened without following a link, of at most MAX_FILE bytes, are taken."""
    files, notes, top = {}, [], os.path.realpath(path)
    for rel in editable:
        full = os.path.join(path, rel)
        files[rel] = None
        if os.path.realpath(os.path.dirname(full)) != os.path.join(top, os.path.dirname(rel)).rstrip(os.sep):
            notes.append(f"{rel}: its folder is a link out of the submission; ignored")
            continue
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)   # no link; a FIFO cannot block
        except OSError:
            notes.append(f"{rel}: {'a symbolic link; ignored' if os.path.islink(full) else 'missing'}")
            continue
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                notes.append(f"{rel}: not a regular file; ignored")
                continue
            data = fh.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            notes.append(f"{rel}: larger than {MAX_FILE >> 10} KiB; ignored")
            continue
        files[rel] = data
        if rel.endswith(".py"):
            try:                                   # parses only: no student code runs here
                compile(data, rel, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as e:  # ValueError: null bytes
                where = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
                notes.append(f"{rel}{where}: does not compile ({type(e).__name__}: {getattr(e, 'msg', e)}); "
                             f"every test that imports it, in any assignment, fails")
    return files, notes


def submission_names(paths):
    """A unique name per submission: its folder's name, with -2, -3... on repeats."""
    names, seen = [], {}
    for p in paths:
        base = os.path.basename(os.path.realpath(p)) or "submission"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


# ----------------------------------------------------------------------------------------------
# One sandboxed pytest process
# ----------------------------------------------------------------------------------------------

class ServerDied(Exception):
    """The fork server ended while a run was starting or in flight (a submission can kill it)."""


class ForkServer:
    """The grader's end of gradeplugin.serve: fork(request, fds) -> (pid, generation); exit_code(pid,
    generation) -> its exit code, None while it runs, ServerDied when the server is gone. A dead
    server is started again on the next fork."""

    def __init__(self, workdir, plugin_source):
        self.folder = os.path.join(workdir, "server")
        for sub in ("home", "tmp"):
            os.makedirs(os.path.join(self.folder, sub), mode=0o700)
        with open(os.path.join(self.folder, f"{PLUGIN}.py"), "wb") as fh:
            fh.write(plugin_source)
        self.lock, self.cond = threading.Lock(), threading.Condition()
        self.count, self.generation, self.started, self.exited, self.dead = 0, 0, {}, {}, set()
        self._start()

    def _start(self):
        if self.generation:
            self.sock.close()                       # the dead server's end
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.generation += 1
        with open(os.path.join(self.folder, "server.log"), "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", SERVER, self.folder, str(theirs.fileno()),
                                          *PRELOAD], cwd=self.folder, env=clean_env(self.folder),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         pass_fds=(theirs.fileno(),), start_new_session=True)
        theirs.close()
        self.sock = ours
        threading.Thread(target=self._listen, args=(ours, self.proc, self.generation), daemon=True).start()

    def _listen(self, sock, proc, generation):
        """Record the server's messages until it ends."""
        while True:
            try:
                message = sock.recv(65536)
            except OSError:
                message = b""
            if not message:
                break
            m = json.loads(message)
            with self.cond:
                if "started" in m:
                    self.started[m["started"]] = m["pid"]
                else:
                    self.exited[(generation, m["exited"])] = m["code"]
                self.cond.notify_all()
        proc.wait()
        with self.cond:
            self.dead.add(generation)
            self.cond.notify_all()

    def fork(self, request, fds):
        with self.lock:
            if self.generation in self.dead:
                self._start()
            self.count += 1
            ident, generation = self.count, self.generation
            try:
                socket.send_fds(self.sock, [json.dumps(dict(request, id=ident)).encode()], fds)
            except OSError:
                raise ServerDied from None
        with self.cond:
            self.cond.wait_for(lambda: ident in self.started or generation in self.dead, timeout=120)
            if ident not in self.started:
                raise ServerDied
            return self.started.pop(ident), generation

    def exit_code(self, pid, generation, timeout=0.0):
        """Its exit code once it has ended (waiting up to timeout seconds), else None."""
        with self.cond:
            self.cond.wait_for(lambda: (generation, pid) in self.exited or generation in self.dead, timeout)
            if (generation, pid) in self.exited:
                return self.exited.pop((generation, pid))
            if generation in self.dead:
                raise ServerDied
            return None

    def log_tail(self):
        """The last line of the server's own log (why it did not start, when it did not)."""
        with open(os.path.join(self.folder, "server.log"), "rb") as fh:
            lines = fh.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else "(empty log)"

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # EOF for the server (it kills what it started and
        except OSError:                             # ends) and for our listener's recv
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def make_run_folder(workdir, snap, overlay):
    """A fresh folder: tree/ (the reference with the submission's files laid in; a missing one is
    removed, never left as the reference's solution), results/, home/, tmp/, an empty pytest.ini."""
    run = tempfile.mkdtemp(prefix="run-", dir=workdir)
    tree = os.path.join(run, "tree")
    for rel, data in list(snap.items()) + list(overlay.items()):
        path = os.path.join(tree, rel)
        if data is None:
            if os.path.exists(path):
                os.remove(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(data)
    for sub in ("results", "home", "tmp"):
        os.makedirs(os.path.join(run, sub), mode=0o700)
    with open(os.path.join(run, "pytest.ini"), "w") as fh:
        fh.write("[pytest]\n")                     # -c this file: no ini from the tree or above it
    return run


def clean_env(folder):
    """The environment of a grading process: nothing of the grader's but PATH."""
    home = os.path.join(folder, "home")
    return {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "TMPDIR": os.path.join(folder, "tmp"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "MPLBACKEND": "Agg", "MPLCONFIGDIR": os.path.join(home, "matplotlib"), "NO_COLOR": "1"}


def spawn(server, run, mode, targets, watched, key, opts):
    """Start one grading process; returns (pid, server generation, read end of the result pipe, XML path)."""
    key_r, key_w = os.pipe()
    os.write(key_w, key)
    os.close(key_w)
    res_r, res_w = os.pipe()
    log = os.open(os.path.join(run, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    tree = os.path.join(run, "tree")
    xml = os.path.join(run, "results", secrets.token_hex(8) + ".xml")
    limits = dict(RLIMIT_AS=int(opts.memory * (1 << 30)), RLIMIT_CPU=int(opts.timeout) + 5,
                  RLIMIT_FSIZE=FILE_LIMIT, RLIMIT_CORE=0)
    args = ["-q", "-p", "no:cacheprovider", "-o", "addopts=", "-c", os.path.join(run, "pytest.ini"),
            "--rootdir", tree, "--confcutdir", tree, "--tb=short", "--junitxml", xml]
    args += ["--collect-only"] if mode == "collect" else []
    request = dict(cwd=tree, env=clean_env(run), limits=limits, mode=mode, watched=watched,
                   args=[*args, "--", *targets])
    try:
        pid, generation = server.fork(request, [key_r, res_w, log])
    except ServerDied:
        os.close(res_r)
        raise
    finally:
        for fd in (key_r, res_w, log):
            os.close(fd)
    return pid, generation, res_r, xml


def wait_and_read(server, pid, generation, fd, timeout):
    """Read the result pipe until the process ends or the timeout; then kill its whole process group
    (what it left running too). Returns (bytes read, timed out, exit code or None)."""
    data, deadline, eof, code = bytearray(), time.monotonic() + timeout, False, None
    os.set_blocking(fd, False)
    try:
        while code is None and time.monotonic() < deadline:
            left = deadline - time.monotonic()
            if eof:                                 # the pipe is closed: only the exit code is missing
                code = server.exit_code(pid, generation, left)
            elif select.select([fd], [], [], min(left, 0.2))[0]:
                chunk = _read_some(fd)
                eof = chunk == b""
                data += chunk[:max(0, MAX_RESULTS + 1 - len(data))]
            else:                                   # ended, though something it started holds the pipe?
                code = server.exit_code(pid, generation)
        while not eof and len(data) <= MAX_RESULTS:
            chunk = _read_some(fd)
            eof = not chunk
            data += chunk
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        os.close(fd)
    return bytes(data), code is None, code


def _read_some(fd):
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def verify(data, key):
    """The signed records of one run, and what was wrong with the channel (None when nothing)."""
    records, lines = [], data.split(b"\n")
    if len(data) > MAX_RESULTS:
        return records, "more result data than any test run writes (a flood)"
    for line in lines[:-1]:
        mac, _, body = line.partition(b" ")
        if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).hexdigest().encode()):
            return records, "results not signed by the grader's plugin (forged?)"
        record = json.loads(body)
        if record.get("seq") != len(records):
            return records, "signed results out of sequence (replayed or dropped)"
        records.append(record)
    if lines[-1]:
        return records, "an unfinished result line (forged?)"
    return records, None


def junit_key(nodeid):
    """(classname, name) that pytest's JUnit XML gives the test `nodeid` (its mangle_test_address)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = names[0].replace("/", ".")
    names[0] = names[0][:-3] if names[0].endswith(".py") else names[0]
    return ".".join(names[:-1]), names[-1] + bracket + params


def read_junit(path):
    """{(classname, name): 'passed' | 'failed' | 'skipped'} from pytest's JUnit XML, or None."""
    if not os.path.isfile(path) or os.path.islink(path) or os.path.getsize(path) > MAX_RESULTS:
        return None
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return None
    found = {}
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        outcome = ("failed" if case.find("failure") is not None or case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        if found.get(key, "passed") == "passed":      # a teardown error adds a second entry: worst wins
            found[key] = outcome
    return found


def sandbox(server, snap, overlay, mode, targets, watched, opts):
    """Run pytest once in a fresh tree; returns what the grader knows of the run (see run_failure). A run
    during which the fork server died is run once more (it may have been another run's doing)."""
    for attempt in (1, 2):
        run = make_run_folder(opts.workdir, snap, overlay)
        key, start = secrets.token_bytes(32), time.monotonic()
        try:
            pid, generation, fd, xml = spawn(server, run, mode, targets, watched, key, opts)
            data, timed_out, code = wait_and_read(server, pid, generation, fd, opts.timeout)
            records, channel = verify(data, key)
            with open(os.path.join(run, "output.txt"), "rb") as fh:
                fh.seek(max(0, os.path.getsize(fh.name) - 3000))
                tail = fh.read().decode("utf-8", "replace")
            return dict(records=records, channel=channel, returncode=code, timed_out=timed_out,
                        junit=read_junit(xml), seconds=time.monotonic() - start, output=tail)
        except ServerDied:
            pass
        finally:
            remove_tree(run)
    return dict(records=[], channel="the grader's fork server died during this run, twice (killed by the submission?)",
                returncode=None, timed_out=False, junit=None, seconds=time.monotonic() - start, output="")


def remove_tree(path):
    """rmtree that also removes what a submission made read-only."""
    def retry(func, target, _):
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
        func(target)
    handler = {"onexc": retry} if sys.version_info >= (3, 12) else {"onerror": retry}
    try:
        shutil.rmtree(path, **handler)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Judging a run
# ----------------------------------------------------------------------------------------------

def short(nodeid, hidden):
    """'test_a1.py::test_x' for a public test; never a hidden test's name (feedback shows counts only)."""
    return "a hidden test" if nodeid in hidden else nodeid.rsplit("/", 1)[-1]


def last_place(records, hidden):
    """Where a run was when it ended: ' while importing ddpm.py', ' in test_a1.py::test_x', or ''."""
    importing, running, collected = [], None, False
    for r in records:
        kind = r.get("kind")
        if kind == "import":
            importing.append(r["module"])
        elif kind == "imported" and importing:
            importing.pop()
        elif kind == "start":
            running = r["id"]
        elif kind == "test":
            running = None
        collected = collected or kind == "collected"
    if importing:
        return f" while importing {importing[-1].replace('.', '/')}.py"
    if running is not None:
        return f" in {short(running, hidden)}"
    return "" if collected else " before its tests were collected"


def run_failure(run, expected, hidden, opts):
    """Why a run scores 0 (one sentence), or None when its per-test results count."""
    records = run["records"]
    where = last_place(records, hidden)
    if run["timed_out"]:
        return f"timed out after {opts.timeout:g} s{where}"
    if run["channel"]:
        return run["channel"]
    finish = [r for r in records if r.get("kind") == "finish"]
    if not finish:
        code = run["returncode"]
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            why = {"SIGXCPU": " (the CPU time limit)", "SIGXFSZ": f" (wrote more than {FILE_LIMIT >> 20} MiB)"}
            return f"killed by {name}{why.get(name, '')}{where}"
        return f"process exited (status {code}){where}"
    if finish[-1].get("exit") not in (0, 1):
        return f"pytest stopped with exit status {finish[-1].get('exit')} (interrupted or an internal error){where}"
    tests = {r["id"]: r for r in records if r.get("kind") == "test"}
    missing = [i for i in expected if i not in tests]
    if missing:
        return f"{len(missing)} expected test(s) not reported, e.g. {short(missing[0], hidden)}"
    for i in expected:
        if tests[i].get("tampered"):
            return f"pytest's machinery was changed during {short(i, hidden)}"
        if tests[i].get("memory"):
            return f"hit the memory limit ({opts.memory:g} GiB) in {short(i, hidden)}"
        if tests[i].get("error") in ("SystemExit", "KeyboardInterrupt"):
            return f"raised {tests[i]['error']} (sys.exit?) in {short(i, hidden)}"
    junit = run["junit"]
    if junit is None:
        return "pytest's JUnit report is missing or unreadable"
    for i in expected:
        if (junit.get(junit_key(i)) == "passed") != (tests[i].get("outcome") == "passed"):
            return f"the JUnit report and the signed results disagree on {short(i, hidden)} (tampering?)"
    return None


def grade_assignment(a, tests, run, opts):
    """The result of one assignment of one submission: points, status, reason, each test's outcome."""
    hidden = {t["id"] for t in tests if t["hidden"]}
    reason = run_failure(run, [t["id"] for t in tests], hidden, opts)
    signed = {r["id"]: r for r in run["records"] if r.get("kind") == "test"}
    rows = []
    for t in tests:
        r = signed.get(t["id"], {})
        rows.append(dict(id=t["id"], points=t["points"], hidden=t["hidden"], outcome=r.get("outcome", "not run"),
                         passed=reason is None and r.get("outcome") == "passed", line=r.get("line"),
                         error=r.get("error")))
    earned = lambda keep: sum(x["points"] for x in rows if x["passed"] and keep(x))  # noqa: E731
    possible = lambda keep: sum(x["points"] for x in rows if keep(x))               # noqa: E731
    return dict(title=ASSIGNMENTS[a][0], earned=earned(lambda x: True), possible=possible(lambda x: True),
                hidden_earned=earned(lambda x: x["hidden"]), hidden_possible=possible(lambda x: x["hidden"]),
                status="ok" if reason is None else "failed", reason=reason, seconds=round(run["seconds"], 2),
                tests=rows, output_tail=run["output"] if reason else None)


# ----------------------------------------------------------------------------------------------
# Collecting, then grading everything
# ----------------------------------------------------------------------------------------------

def collect_tests(server, snap, graded, opts):
    """{assignment: [dict(id, points, hidden)]} of the graded assignments, from one collection run on
    the reference itself: the ids and points no submission can change."""
    folders = [f for f in ("assignments/tests", "assignments/hidden") if any(r.startswith(f + "/") for r in snap)]
    run = sandbox(server, snap, {}, "collect", folders, [], opts)
    finish = [r for r in run["records"] if r.get("kind") == "finish"]
    if run["channel"] and "fork server" in run["channel"]:
        raise GradeError(f"the grader's fork server does not start: {server.log_tail()}", status=1)
    if run["timed_out"] or run["channel"] or not finish or finish[-1].get("exit") != 0:
        raise GradeError(f"the reference's grading tests do not collect; see `python -m pytest --collect-only "
                         f"{' '.join(folders)}` there ({run['output'].strip().splitlines()[-1:]})", status=1)
    tests = {a: [] for a in graded}
    for r in run["records"]:
        if r.get("kind") != "item":
            continue
        if r["assignment"] not in ASSIGNMENTS:
            raise GradeError(f"test {r['id']} is marked with unknown assignment {r['assignment']!r}", status=1)
        if r["assignment"] in tests:
            tests[r["assignment"]].append(dict(id=r["id"], points=r["points"],
                                               hidden=r["id"].startswith("assignments/hidden/")))
    return tests


def grade_all(server, subs, snap, tests, editable, opts):
    """Every (submission, assignment) run, --jobs at a time; returns one record per submission."""
    watched = [rel[:-3].replace("/", ".") for rel in editable]
    results = []
    for path, name in zip(subs, submission_names(subs)):
        overlay, notes = read_submission(path, editable)
        results.append(dict(name=name, path=os.path.abspath(path), notes=notes, overlay=overlay, assignments={}))
    jobs = [(k, a) for k in range(len(results)) for a in tests if tests[a]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        futures = {pool.submit(sandbox, server, snap, results[k]["overlay"], "run",
                               [t["id"] for t in tests[a]], watched, opts): (k, a) for k, a in jobs}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            k, a = futures[future]
            r = results[k]["assignments"][a] = grade_assignment(a, tests[a], future.result(), opts)
            note(f"[{n}/{len(jobs)}] {results[k]['name']} {a}: {fmt(r['earned'])} / {fmt(r['possible'])}"
                 f" ({r['seconds']:.1f} s){'; ' + r['reason'] if r['reason'] else ''}")
    for r in results:
        del r["overlay"]
        r["assignments"] = {a: r["assignments"][a] for a in tests if a in r["assignments"]}
        for field in ("earned", "possible", "hidden_earned", "hidden_possible"):
            r[field] = sum(v[field] for v in r["assignments"].values())
        r["notes"] += [f"{a}: {v['reason']}" for a, v in r["assignments"].items() if v["reason"]]
    return results


def fmt(points):
    return f"{points:g}"


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

def write_csv(path, results, tests):
    """The gradebook: a '(possible)' row, then one row per submission."""
    graded = [a for a in tests if tests[a]]
    possible = {a: sum(t["points"] for t in tests[a]) for a in graded}
    hidden = sum(t["points"] for a in graded for t in tests[a] if t["hidden"])
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["submission", *graded, "total", "hidden", "notes"])
        out.writerow(["(possible)", *[fmt(possible[a]) for a in graded], fmt(sum(possible.values())), fmt(hidden), ""])
        for r in results:
            out.writerow([r["name"], *[fmt(r["assignments"][a]["earned"]) for a in graded], fmt(r["earned"]),
                          fmt(r["hidden_earned"]), "; ".join(r["notes"])])


def source_line(snap, nodeid, line):
    """The line `line` of the (public) test file of nodeid, from the reference as read at the start."""
    lines = snap.get(nodeid.split("::")[0], b"").decode("utf-8", "replace").splitlines()
    return lines[line - 1].strip() if isinstance(line, int) and 0 < line <= len(lines) else None


def feedback_md(r, snap):
    """A submission's feedback: points per assignment, failing public tests with their line, hidden counts."""
    lines = [f"# Grading feedback: {r['name']}", "",
             f"Total: {fmt(r['earned'])} / {fmt(r['possible'])} points, of which hidden tests "
             f"{fmt(r['hidden_earned'])} / {fmt(r['hidden_possible'])}.", "",
             "| assignment | points | hidden tests passed | note |", "|---|---|---|---|"]
    for a, v in r["assignments"].items():
        hidden = [t for t in v["tests"] if t["hidden"]]
        count = f"{sum(t['passed'] for t in hidden)} of {len(hidden)}" if hidden else "-"
        lines.append(f"| {a} {v['title']} | {fmt(v['earned'])} / {fmt(v['possible'])} | {count} | "
                     f"{v['reason'] or ''} |")
    lines += [""] + [f"- {n}" for n in r["notes"] if not n.startswith(tuple(f"{a}: " for a in r["assignments"]))]
    for a, v in r["assignments"].items():
        failing = [t for t in v["tests"] if not t["passed"] and not t["hidden"]]
        if not failing or v["reason"]:
            continue
        lines += ["", f"## {a}: failing tests", ""]
        for t in failing:
            code = source_line(snap, t["id"], t["line"])
            where = f", line {t['line']}: `{code}`" if code else ""
            lines.append(f"- `{t['id'].rsplit('/', 1)[-1]}`{where} ({t['error'] or t['outcome']})")
    return "\n".join(lines) + "\n"


def print_table(r):
    """The table of one submission on stdout (what a student sees)."""
    width = max([len(f"{a} {v['title']}") for a, v in r["assignments"].items()] + [10])
    print(f"{'assignment':<{width}}  {'points':>9}  failing tests")
    for a, v in r["assignments"].items():
        failing = [t["id"].rsplit("/", 1)[-1] for t in v["tests"] if not t["passed"] and not t["hidden"]]
        hidden = sum(not t["passed"] for t in v["tests"] if t["hidden"])
        failing += [f"{hidden} hidden"] if hidden else []
        text = v["reason"] or ", ".join(failing) or "-"
        print(f"{a + ' ' + v['title']:<{width}}  {fmt(v['earned']) + ' / ' + fmt(v['possible']):>9}  {text}")
    print(f"{'total':<{width}}  {fmt(r['earned']) + ' / ' + fmt(r['possible']):>9}")
    for n in r["notes"]:                  # the submission's own notes (a file that does not compile, ...)
        if not n.startswith(tuple(f"{a}: " for a in r["assignments"])):
            print(f"note: {n}")
    for a, (title, kind) in ASSIGNMENTS.items():
        if kind == "report":
            print(f"{a} {title}: a report, graded by the checklist in assignments/{a}.md")


def write_outputs(args, results, tests, snap, seconds):
    """--json, --csv and --feedback; returns the names written."""
    written = []
    if args.json:
        record = dict(reference=os.path.abspath(args.reference), timeout=args.timeout, memory_gib=args.memory,
                      jobs=args.jobs, seconds=round(seconds, 2), tests=tests, submissions=results)
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
            fh.write("\n")
        written.append(args.json)
    if args.csv:
        write_csv(args.csv, results, tests)
        written.append(args.csv)
    if args.feedback:
        os.makedirs(args.feedback, exist_ok=True)
        for r in results:
            with open(os.path.join(args.feedback, f"{r['name']}.md"), "w") as fh:
                fh.write(feedback_md(r, snap))
        written.append(args.feedback.rstrip("/") + "/")
    return written


def changed_on_disk(root, snap):
    """The reference's files that differ now from what was read at the start (a tampering tripwire)."""
    changed = []
    for rel, data in snap.items():
        try:
            with open(os.path.join(root, rel), "rb") as fh:
                same = fh.read() == data
        except OSError:
            same = False
        if not same:
            changed.append(rel)
    return changed


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = OneLineParser(prog="grade.py", description="Grade submissions (student copies) with the reference's "
                           "tests, one sandboxed pytest process per assignment; write a gradebook.")
    parser.add_argument("submissions", nargs="*", metavar="SUB", help="submission folders (default: the "
                        "reference itself, i.e. check this copy)")
    parser.add_argument("--reference", default=ROOT, help="the instructor's repository: its tests, hidden tests "
                        "and everything but the student's files (default: the one holding this script)")
    parser.add_argument("--only", default=None, help="comma-separated assignments to grade (default: all with tests)")
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-clock seconds per assignment (default 60)")
    parser.add_argument("--memory", type=float, default=3.0, help="address-space limit per process in GiB (default 3)")
    parser.add_argument("--jobs", type=int, default=1, help="grading processes at a time (default 1)")
    parser.add_argument("--json", default=None, help="write every test's outcome to this JSON file")
    parser.add_argument("--csv", default=None, help="write the gradebook to this CSV file")
    parser.add_argument("--feedback", default=None, metavar="DIR", help="write one markdown file per submission here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.reference):
        parser.error(f"--reference {args.reference} is not a folder")
    for sub in args.submissions:
        if not os.path.isdir(sub):
            parser.error(f"submission {sub} is not a folder")
    if not (args.timeout > 0 and args.memory > 0 and args.jobs >= 1):
        parser.error("--timeout and --memory must be positive and --jobs at least 1")
    for flag in ("json", "csv"):
        path = getattr(args, flag)
        if path is not None and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            parser.error(f"--{flag} {path}: expected a file name in an existing folder")
    if args.feedback is not None and os.path.exists(args.feedback) and not os.path.isdir(args.feedback):
        parser.error(f"--feedback {args.feedback} is a file; expected a folder")
    tested = [a for a, (_, kind) in ASSIGNMENTS.items() if kind == "tests"]
    only = tested if args.only is None else [a.strip() for a in args.only.split(",") if a.strip()]
    if not only or any(a not in tested for a in only):
        parser.error(f"--only {args.only}: expected some of {','.join(tested)}")
    args.graded = [a for a in tested if a in only]
    args.submissions = args.submissions or [args.reference]
    return parser, args


def prepare(args):
    """The reference read into memory, the student-editable files, the plugin's source."""
    snap = snapshot(args.reference)
    if not any(rel.startswith("assignments/tests/") for rel in snap):
        raise GradeError(f"--reference {args.reference} has no assignments/tests folder to grade")
    editable = editable_files(snap, args.graded)
    if not editable and any(os.path.realpath(s) != os.path.realpath(args.reference) for s in args.submissions):
        raise GradeError(f"--reference {args.reference} holds no solution region of {','.join(args.graded)} (a "
                         f"student copy?); grade submissions against the instructor's repository")
    for sub in args.submissions:  # a folder without any graded file is a wrong path, not a submission worth 0
        if editable and not any(os.path.lexists(os.path.join(sub, rel)) for rel in editable):
            raise GradeError(f"submission {sub} holds none of the files graded for {','.join(args.graded)} "
                             f"({', '.join(editable)}); expected a student copy (assignments/build.py)")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{PLUGIN}.py"), "rb") as fh:
        plugin_source = fh.read()
    return snap, editable, plugin_source


def main(argv=None):
    parser, args = parse_args(argv)
    start = time.monotonic()
    args.workdir = tempfile.mkdtemp(prefix="zsi-grade-")
    server = None
    try:
        snap, editable, plugin_source = prepare(args)
        server = ForkServer(args.workdir, plugin_source)
        tests = collect_tests(server, snap, args.graded, args)
        results = grade_all(server, args.submissions, snap, tests, editable, args)
    except GradeError as e:
        parser.exit(e.status, f"{parser.prog}: error: {e}\n")
    finally:
        if server is not None:
            server.close()
        remove_tree(args.workdir)
    seconds = time.monotonic() - start
    if len(results) == 1:
        print_table(results[0])
    written = write_outputs(args, results, tests, snap, seconds)
    changed = changed_on_disk(args.reference, snap)
    if changed:
        note(f"warning: {len(changed)} file(s) of the reference changed on disk while grading (e.g. {changed[0]}); "
             f"the grades used the copy read at the start")
    graded = [a for a in tests if tests[a]]
    failed = sum(v["reason"] is not None for r in results for v in r["assignments"].values())
    mean = lambda field: sum(r[field] for r in results) / len(results)  # noqa: E731
    print(f"graded {len(results)} submission(s) x {len(graded)} assignment(s) in {seconds:.1f} s (--jobs "
          f"{args.jobs}): mean {mean('earned'):.4g} / {fmt(results[0]['possible'])} points, hidden "
          f"{mean('hidden_earned'):.4g} / {fmt(results[0]['hidden_possible'])}; {failed} run(s) scored 0 for a "
          f"failure{'; wrote ' + ', '.join(written) if written else ''}")


if __name__ == "__main__":
    main()
