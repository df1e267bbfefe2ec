"""assignments/gradeplugin.py -- the pytest plugin inside every grading process of grade.py.

What this file is
    grade.py starts one FORK SERVER per grading session, `python -I -B -c SERVER`, which imports this
    module from a folder of the grader's (never from a graded tree), then the trusted heavy modules
    (numpy, torch, pytest, matplotlib, cv2: 2 s of every process's start-up, paid once), and then
    forks one fresh process per grading run (serve). The forked child (child) takes its own session,
    its log as stdout and stderr, its resource limits, its tree as working folder and a clean
    environment, and calls run(), which registers the plugin below with pytest.main(plugins=[...]).
    So the plugin is in place before pytest reads the tree's conftest.py and before any student
    module is imported (the grading tests import the concept files inside each test); no student
    code ever runs in the server.

    The results go back through a pipe, not through a file: the grader passes the write end of a
    pipe (result fd) and the read end of another one holding a fresh random key (key fd). run()
    reads the key and closes that fd before pytest starts, then signs every line it writes with
    HMAC-SHA256(key, line) and a sequence number. Lines the grader cannot verify (a submission that
    writes to the fd, a forged JUnit XML, replayed or dropped lines) void the run. Records:
        item       (collect mode) one per test: id, assignment, points
        collected  (run mode) the ids pytest collected
        import / imported   a watched student module started / finished importing (so a process that
                            dies inside an import is reported as "exited while importing ddpm.py")
        start      a test started
        test       a test ended: outcome (passed, failed, error, skipped), the line of the test file
                   where it failed, the exception's type name, and `tampered` when pytest's own
                   machinery (its plugins, runner and report functions), an assertion helper
                   (pytest.approx, numpy.testing, torch.allclose, ...) or the code of a collected
                   test function changed since collection
        finish     pytest.main returned: its exit code

    What a hostile submission can still do in-process: the key is in this process's memory (a
    closure cell) and its code runs in the same interpreter, so one that searches memory (gc,
    ctypes) can sign what it likes, and one that rewrites pytest's internals more cleverly than the
    tamper check looks for can report passes. grade.py's docstring lists the remaining risks.

Run
    Not by hand: grade.py copies it into its own temporary folder and starts the server (grade.py).
"""
import hashlib
import hmac
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import resource
import select
import signal
import socket
import sys
import tempfile
import traceback

import pytest


def make_sender(key, fd):
    """send(kind, **fields): one signed line '<hex mac> <json>' per record, sequence-numbered."""
    state = {"seq": 0}

    def send(kind, **fields):
        body = json.dumps(dict(fields, kind=kind, seq=state["seq"]), sort_keys=True)
        state["seq"] += 1
        data = (hmac.new(key, body.encode(), hashlib.sha256).hexdigest() + " " + body + "\n").encode()
        while data:                          # one line is usually written at once (< PIPE_BUF)
            data = data[os.write(fd, data):]
    return send


class ImportWatch(importlib.abc.MetaPathFinder):
    """Reports the start and the end of importing each watched (student) module."""

    def __init__(self, send, names):
        self.send, self.names = send, set(names)

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, send = spec.loader.exec_module, self.send

        def exec_module(module):
            send("import", module=name)
            try:
                run(module)
            finally:
                send("imported", module=name)
        spec.loader.exec_module = exec_module
        return spec


# The comparisons the grading tests lean on: a submission that swaps one for a function that always
# agrees would pass every test that uses it.
ASSERTION_HELPERS = (("pytest", "approx"), ("numpy.testing", "assert_allclose"), ("numpy.testing", "assert_array_equal"),
                     ("numpy.testing", "assert_array_almost_equal"), ("numpy.testing", "assert_equal"),
                     ("numpy", "allclose"), ("numpy", "isclose"), ("numpy", "array_equal"), ("torch", "allclose"),
                     ("torch", "equal"), ("torch.testing", "assert_close"), ("math", "isclose"))


def machinery(config, items=()):
    """What a submission would change to forge outcomes in-process: pytest's registered plugins and the
    functions that run a test and build its report, the assertion helpers the tests call, and the code
    of every collected test function (a submission imported by one test could empty the others).
    Taken when collection ends, before any student module is imported; compared after every test."""
    from _pytest import python, reports, runner
    helpers = tuple(getattr(importlib.import_module(module), name) for module, name in ASSERTION_HELPERS)
    tests = tuple((item.nodeid, getattr(getattr(item, "obj", None), "__code__", None)) for item in items)
    hooks = [h.function for name in ("pytest_runtest_makereport", "pytest_runtest_call", "pytest_pyfunc_call",
                                     "pytest_runtest_protocol", "pytest_runtest_logreport")
             for h in getattr(config.hook, name).get_hookimpls()]
    return (frozenset(map(id, config.pluginmanager.get_plugins())), tuple(hooks), runner.call_and_report,
            runner.CallInfo.__dict__["from_call"], python.Function.runtest,
            reports.TestReport.__dict__["from_item_and_call"], reports.BaseReport.passed, reports.BaseReport.failed,
            helpers, tests)


class GradePlugin:
    """Sends the collected tests (collect mode) or each test's outcome (run mode) through `send`."""

    def __init__(self, send, collect):
        self.send, self.collect = send, collect
        self.config, self.guard, self.tests, self.items = None, None, {}, ()

    def pytest_configure(self, config):
        self.config = config

    def pytest_collection_finish(self, session):
        if self.collect:
            for item in session.items:
                marker = item.get_closest_marker("assignment")
                if marker is not None and marker.args:
                    self.send("item", id=item.nodeid, assignment=str(marker.args[0]),
                              points=float(marker.kwargs.get("points", 0)))
        else:
            self.send("collected", ids=[item.nodeid for item in session.items])
        self.items = tuple(session.items)
        self.guard = machinery(session.config, self.items)

    def pytest_runtest_logstart(self, nodeid, location):
        self.send("start", id=nodeid)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        entry = self.tests.setdefault(item.nodeid, dict(outcome="passed", line=None, error=None, memory=False))
        if call.excinfo is not None and not report.passed and entry["error"] is None:
            entry["error"] = call.excinfo.typename[:60]
            text = str(call.excinfo.value)[:2000]
            entry["memory"] = call.excinfo.errisinstance(MemoryError) or "allocate memory" in text
            here = [e.lineno + 1 for e in call.excinfo.traceback if str(e.path) == str(item.path)]
            entry["line"] = here[-1] if here else None      # the innermost line of the test file itself
        if report.when == "call" and report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
        if report.failed:
            entry["outcome"] = "failed" if report.when == "call" else "error"
        elif report.skipped and report.when == "setup":
            entry["outcome"] = "skipped"

    def pytest_runtest_logreport(self, report):
        if report.when != "teardown":
            return
        entry = self.tests.get(report.nodeid, dict(outcome="error", line=None, error="no report", memory=False))
        tampered = self.guard is None or machinery(self.config, self.items) != self.guard
        self.send("test", id=report.nodeid, tampered=tampered, **entry)


def run(key_fd, out_fd, mode, watched, args):
    """One grading process: read the key, sign from now on, watch the student modules, run pytest.
    MODE is 'collect' or 'run'. Returns pytest's exit code."""
    with os.fdopen(key_fd, "rb") as fh:
        key = fh.read()
    os.set_inheritable(out_fd, False)            # a child process of the tests does not get the channel
    send = make_sender(key, out_fd)
    del key
    sys.meta_path.insert(0, ImportWatch(send, watched))
    code = pytest.main(list(args), plugins=[GradePlugin(send, collect=mode == "collect")])
    send("finish", exit=int(code))
    return int(code)


def set_limits(limits):
    """Soft and hard resource limits (so the tests cannot raise them again): {RLIMIT name: value}."""
    for name, n in limits.items():
        which = getattr(resource, name)
        hard = resource.getrlimit(which)[1]
        n = n if hard == resource.RLIM_INFINITY else min(n, hard)
        resource.setrlimit(which, (n, n))


def child(server_fds, request, fds):
    """The forked grading process: its own session, output, limits, folder and environment; then run().
    Never returns."""
    code = 70
    try:
        signal.set_wakeup_fd(-1)                 # the server's SIGCHLD wake-up is not ours
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in server_fds:
            os.close(fd)
        os.setsid()                              # its own process group: the grader kills all of it
        key_fd, out_fd, log_fd = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        set_limits(request["limits"])
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None                  # TMPDIR is read again
        sys.argv = ["pytest"]
        code = run(key_fd, out_fd, request["mode"], request["watched"], request["args"])
    except BaseException:                        # noqa: B036  anything: report it in the log, exit 70
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:                    # noqa: BLE001  a closed stream must not keep us alive
                pass
        os._exit(code)


def reap(sock, live):
    """Tell the grader about every finished child: {"exited": pid, "code": exit code or -signal}."""
    while live:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            live.clear()
            return
        if pid == 0:
            return
        live.discard(pid)
        sock.send(json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode())


def serve(sock_fd, preload):
    """The fork server: import the trusted heavy modules (torch...) once, then fork one fresh grading
    process per request {"id", "cwd", "env", "limits", "mode", "watched", "args"} + 3 fds (key, result,
    log) on the SOCK_SEQPACKET socket, answering {"started": id, "pid": pid}. Ends when the grader
    closes the socket, killing what it started."""
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError:                       # not installed: the tests that need it will say so
            pass
    sock, live = socket.socket(fileno=sock_fd), set()
    wake_r, wake_w = os.pipe()                    # a finished child wakes the loop up at once
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        reap(sock, live)
        ready = select.select([sock, wake_r], [], [], 1.0)[0]
        if wake_r in ready:
            os.read(wake_r, 4096)
        if sock not in ready:
            continue
        message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 3)
        if not message:
            break
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            child((sock.fileno(), wake_r, wake_w), request, fds)
        for fd in fds:
            os.close(fd)
        live.add(pid)
        sock.send(json.dumps({"started": request["id"], "pid": pid}).encode())
    for pid in live:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
