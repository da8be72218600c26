"""Independent protocols side by side (runtime/parallel.py): the same values as one after the other, the longer
branch's rounds and the sum of the bytes, branches of any lengths, and an error that stops the run without a hang."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime import arith, compare, convert
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.parallel import parallel

from .helpers import cost_of, encoded, open_fx, share_fx

RNG = np.random.default_rng(31)
X = RNG.uniform(-4, 4, 40)
Y = RNG.uniform(-4, 4, 40)


def products(p, a, b, times: int):
    """`times` fixed-point products in sequence (2 rounds each)."""
    for _ in range(times):
        a = arith.mul_fx(p, a, b)
    return a


@pytest.mark.parametrize("times", [0, 1, 3])  # shorter than the comparison, and longer
def test_branches_give_their_own_values_with_the_longer_rounds_and_the_summed_bytes(times):
    def prog(p):
        a, b = share_fx(p, X), share_fx(p, Y, 1)
        alone = [cost_of(p, lambda: products(p, a, b, times))[1], cost_of(p, lambda: compare.ltz(p, a))[1]]
        (prod, below), both = cost_of(p, lambda: parallel(p, lambda q: products(q, a, b, times), lambda q: compare.ltz(q, a)))
        return open_fx(p, prod), arith.reveal(p, convert.b2a(p, below)), alone, both

    results = run_parties(prog)
    for prod, below, alone, both in results:
        want = encoded(X)
        for _ in range(times):
            want = encoded(want * encoded(Y))
        # One ulp per truncation, carried on through the later products by |Y| <= 4.
        assert np.abs(prod - want).max() <= sum(4.0**k for k in range(times)) * 2.0**-18 * 1.01
        assert below.tolist() == (X < 0).astype(np.uint64).tolist()
        assert both.rounds == max(c.rounds for c in alone)
    # Over the ranks (which rank deals a truncation rotates, so a rank's own share of the bytes may move).
    assert sum(r[3].bytes for r in results) == sum(c.bytes for r in results for c in r[2])


def test_three_branches_and_one_without_rounds():
    def prog(p):
        a = share_fx(p, X)
        out, cost = cost_of(p, lambda: parallel(
            p, lambda q: arith.mul(q, a, a), lambda q: arith.add(a, a), lambda q: arith.truncate(q, a, 2)
        ))
        return [arith.reveal(p, o).view(np.int64) for o in out], cost.rounds

    for (square, double, quarter), rounds in run_parties(prog):
        x = encoded(X) * 2.0**18
        assert np.array_equal(square, (x.astype(np.int64) * x.astype(np.int64)).astype(np.int64))
        assert np.array_equal(double, 2 * x.astype(np.int64))
        assert np.all(np.abs(quarter - np.floor(x / 4)) <= 1)
        assert rounds == 2  # the truncation's; the product's one round travels with its first


def test_each_branch_draws_keys_of_its_own_that_the_pairs_agree_on():
    """A zero-sharing inside a branch sums to zero over the ranks, and the branches' sharings differ."""

    def prog(p):
        return parallel(p, lambda q: q.zero_share(8), lambda q: q.zero_share(8))

    (a0, b0), (a1, b1), (a2, b2) = run_parties(prog)
    assert not (a0 + a1 + a2).any() and not (b0 + b1 + b2).any()
    assert not np.array_equal(a0, b0)


def test_an_error_in_one_branch_stops_the_other_and_is_raised():
    def failing(q):
        arith.mul(q, share_fx(q, X), share_fx(q, X))  # one round, then a fault
        raise ValueError("a branch failed")

    def prog(p):
        a, b = share_fx(p, X), share_fx(p, Y, 1)
        parallel(p, lambda q: products(q, a, b, 5), failing)

    with pytest.raises(ValueError, match="a branch failed"):
        run_parties(prog)
