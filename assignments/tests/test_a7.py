"""a7 -- ensemble filtering and the Chernoff bound (filter_data.py; App. D.1 and D.3):
disjoint_subsets (step 2's five disjoint training sets), keep_confident (steps 1 and 2: p(y_i | x_i) > tau),
chernoff_tail (P(X >= k) <= exp(-n D(k/n || p))) and leakage_estimate (App. D.3's worst case).

Checked against properties, hand-worked cases, App. D.3's printed numbers, bounds computed once at 40
digits and stored, and an exact binomial tail summed here with math.comb.
"""
import math

import numpy as np
import pytest


def exact_tail(n, p, k):
    """P(X >= k) for X ~ Binomial(n, p), exactly, as 1 - P(X < k) with integer binomials (small n only)."""
    return 1.0 - sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k))


@pytest.mark.assignment("a7", points=1)
def test_disjoint_subsets_partition_the_rows():
    import filter_data
    parts = filter_data.disjoint_subsets(23, parts=5, seed=0)
    assert len(parts) == 5
    assert sorted(np.concatenate(parts).tolist()) == list(range(23))          # disjoint and covering
    assert sorted(len(p) for p in parts) == [4, 4, 5, 5, 5]                   # sizes differ by at most one
    assert all(np.all(np.diff(p) > 0) for p in parts)                          # each sorted
    again = filter_data.disjoint_subsets(23, parts=5, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))             # a seed fixes the split
    other = filter_data.disjoint_subsets(23, parts=5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))         # ... and is random
    assert not np.array_equal(np.concatenate(parts), np.arange(23))            # not simply contiguous chunks


@pytest.mark.assignment("a7", points=1)
def test_keep_confident_needs_the_labelled_class_above_tau():
    import filter_data
    logits = np.array([[0.0, 3.0], [0.0, 3.0], [2.0, -1.0], [0.0, 0.1], [5.0, 0.0]])
    labels = np.array([1, 0, 0, 1, 1])
    # p(y | x) = sigmoid(+-(l1 - l0)): 0.953, 0.047, 0.953, 0.525, 0.0067
    assert filter_data.keep_confident(logits, labels, 0.9).tolist() == [True, False, True, False, False]
    assert filter_data.keep_confident(logits, labels, 0.5).tolist() == [True, False, True, True, False]
    # step 2: an image survives only if EVERY member is confident in its label
    members = [logits, logits + np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]])]
    agree = np.logical_and.reduce([filter_data.keep_confident(m, labels, 0.9) for m in members])
    assert agree.tolist() == [True, False, False, False, False]


@pytest.mark.assignment("a7", points=2)
def test_chernoff_tail_is_the_relative_entropy_bound():
    import filter_data
    n, p = 60000, 0.15 ** 5                                       # App. D.3: 60k images, 5 members at 85%
    # exp(-n D(k/n || p)) computed once at 40 digits (mpmath) and stored; the paper's rounded numbers beside them
    for k, stored, paper in ((10, 0.0891576844198005, 0.0892), (15, 0.000592942386718318, 5.93e-4),
                             (20, 7.20813763876635e-7, 7.21e-7)):
        assert filter_data.chernoff_tail(n, p, k) == pytest.approx(stored, rel=1e-9)
        assert filter_data.chernoff_tail(n, p, k) == pytest.approx(paper, rel=2e-3)
    for n, p, k, stored in ((20, 0.1, 5, 0.157767900923764), (50, 0.3, 25, 0.0127932872576026),
                            (100, 0.02, 6, 0.0689454083854148), (10, 0.5, 10, 0.5 ** 10)):
        bound = filter_data.chernoff_tail(n, p, k)
        assert bound == pytest.approx(stored, rel=1e-9)
        assert exact_tail(n, p, k) <= bound <= 1.0                  # it bounds the exact tail
    assert filter_data.chernoff_tail(10, 0.5, 10) == pytest.approx(0.5 ** 10)   # k = n: D = ln(1 / p)
    assert filter_data.chernoff_tail(100, 0.1, 5) == 1.0            # k <= np: no bound beyond 1
    assert filter_data.chernoff_tail(100, 0.1, 101) == 0.0          # more successes than trials
    assert filter_data.chernoff_tail(100, 0.0, 3) == 0.0            # members that never err


@pytest.mark.assignment("a7", points=1)
def test_leakage_estimate_of_app_d3():
    import filter_data
    est = filter_data.leakage_estimate(60000, 0.85, members=5, ks=(10, 20))
    p = 0.15 ** 5
    assert est["p"] == pytest.approx(p, rel=1e-12) and est["mean"] == pytest.approx(60000 * p, rel=1e-12)
    assert est["n"] == 60000 and est["members"] == 5 and est["accuracy"] == 0.85
    assert set(est["chernoff"]) == {"10", "20"} and set(est["exact"]) == {"10", "20"}
    assert est["chernoff"]["10"] == pytest.approx(0.0892, rel=2e-3)
    assert est["exact"]["20"] <= est["chernoff"]["20"]
    three = filter_data.leakage_estimate(1000, 0.9, members=3, ks=(5,))
    assert three["p"] == pytest.approx(0.1 ** 3, rel=1e-12) and three["mean"] == pytest.approx(1.0)
