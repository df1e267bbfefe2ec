"""Hidden grading tests (instructor only): assignments/build.py never copies this folder.

grade.py runs them next to the public tests of the same assignment, in the same process, and
reports their points in a separate column (feedback lists them by count only). They follow the
rules of assignments/tests: closed forms, no call into another assignment's code, concept files
imported inside each test. This conftest only puts the repository on sys.path; the marker is
registered by assignments/tests/conftest.py or, when this folder runs alone, here.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "assignment(id, points): the assignment a grading test belongs to, "
                                       "and the points it is worth")
