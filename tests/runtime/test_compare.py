import math

import numpy as np
import pytest

from puma_onnx.runtime import arith, compare, convert
from puma_onnx.runtime.boolean import reveal_bits
from puma_onnx.runtime.comm import run_parties

from .helpers import cost_of, encoded, open_fx, share_fx

rng = np.random.default_rng(9)


def test_less_than_and_ltz_against_numpy():
    x, y = rng.uniform(-1000, 1000, (2, 20, 30))
    y[0, :10] = x[0, :10]

    def prog(p):
        a, b = share_fx(p, x), share_fx(p, y, 1)
        return reveal_bits(p, compare.less_than(p, a, b)), reveal_bits(p, compare.ltz(p, a))

    lt, neg = run_parties(prog)[0]
    assert np.array_equal(lt, x < y) and np.array_equal(neg, x < 0)


def test_three_comparisons_share_one_batch():
    x = rng.uniform(-6, 6, 100)
    thresholds = [-4.0, -1.95, 3.0]

    def prog(p):
        a = share_fx(p, x)
        ts = [share_fx(p, np.full(100, t)) for t in thresholds]
        out, cost = cost_of(p, lambda: compare.less_than(p, [a] * 3, ts))
        return [reveal_bits(p, o) for o in out], cost

    out, cost = run_parties(prog)[0]
    assert cost.rounds == 6
    for got, t in zip(out, thresholds):
        assert np.array_equal(got, x < t)


def test_equal_against_numpy():
    x = rng.integers(-50, 50, (10, 17)).astype(np.float64)
    y = rng.integers(-50, 50, (10, 17)).astype(np.float64)
    y[:, :5] = x[:, :5]

    def prog(p):
        return reveal_bits(p, compare.equal(p, share_fx(p, x), share_fx(p, y, 2)))

    assert np.array_equal(run_parties(prog)[0], x == y)


@pytest.mark.parametrize("axis, keepdims, shape", [(-1, True, (3, 4, 13)), (0, False, (7, 5)), (1, True, (2, 1, 3))])
def test_max_along_axis(axis, keepdims, shape):
    x = rng.uniform(-100, 100, shape)
    got = run_parties(lambda p: open_fx(p, compare.max(p, share_fx(p, x), axis=axis, keepdims=keepdims)))[0]
    # The maximum is one of the inputs, selected exactly: only its encoding error remains.
    assert np.abs(got - x.max(axis=axis, keepdims=keepdims)).max() <= 2.0**-19


def test_cost_equal_at_64_bits():
    x = rng.uniform(-1, 1, 800)

    def prog(p):
        a = share_fx(p, x)
        return cost_of(p, lambda: compare.equal(p, a, a))[1]

    c = run_parties(prog)
    assert all(k.rounds == 7 for k in c)
    assert [k.bytes for k in c] == [(64 + 63) * 100, 63 * 100, 63 * 100]


def test_cost_max_levels():
    x = rng.uniform(-1, 1, (4, 16))

    def prog(p):
        a = share_fx(p, x)
        return cost_of(p, lambda: compare.max(p, a))[1]

    # 16 entries: 4 levels of msb (6 rounds) and mul_bit (2 rounds).
    assert all(k.rounds == 4 * 8 for k in run_parties(prog))


def test_party_level_comparison_width():
    x = rng.uniform(-100, 100, 64)

    def prog(p):
        a = share_fx(p, x)
        return reveal_bits(p, compare.ltz(p, a)), cost_of(p, lambda: compare.ltz(p, a))[1]

    neg, cost = run_parties(prog, msb_bits=32)[0]
    # |x| * 2^18 < 2^31: 32 bits suffice; 2 + ceil(log2 ceil(31 / 3)) = 6 rounds.
    assert np.array_equal(neg, x < 0) and cost.rounds == 6


def test_less_than_public_shares_rank_0s_message_across_thresholds():
    x = rng.uniform(-6, 6, 800)
    thresholds = [-4.0, -1.95, 3.0]

    def prog(p):
        a = share_fx(p, x)
        ts = [p.fxp.encode(np.float64(t)) for t in thresholds]
        one = cost_of(p, lambda: compare.ltz(p, a))[1]
        out, three = cost_of(p, lambda: compare.less_than_public(p, a, ts))
        return [reveal_bits(p, o) for o in out], one, three

    res = run_parties(prog)
    for got, t in zip(res[0][0], thresholds):
        assert np.array_equal(got, x < t)
    # Same rounds; rank 0's one-hot message (7 rows per 3-bit group and the top bit) goes once.
    groups = 16
    assert all(r[2].rounds == r[1].rounds == 6 for r in res)
    assert res[0][2].bytes == 3 * res[0][1].bytes - 2 * (7 * groups + 1) * 800 // 8
    assert [r[2].bytes for r in res[1:]] == [3 * r[1].bytes for r in res[1:]]


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_argmax_returns_the_max_and_the_first_index_holding_it(n):
    # Few distinct values: many ties, at every level of the tree.
    x = rng.integers(-3, 4, n).astype(np.float64)
    x[rng.integers(0, n)] = 3.0

    def prog(p):
        top, index = compare.argmax(p, share_fx(p, x))
        return open_fx(p, top), arith.reveal(p, index)

    top, index = run_parties(prog)[0]
    assert top == [x.max()] and index.view(np.int64).tolist() == [int(np.argmax(x))]


def test_argmax_breaks_ties_toward_the_first_position_across_levels():
    x = np.array([0.0, 5.0, 5.0, 0.0, 5.0])

    def prog(p):
        return arith.reveal(p, compare.argmax(p, share_fx(p, x))[1])

    assert run_parties(prog)[0].view(np.int64).tolist() == [1]


def test_argmax_costs_a_comparison_and_a_two_term_mul_bit_per_level():
    n = 64

    def prog(p):
        a = share_fx(p, rng.normal(size=n))
        return cost_of(p, lambda: compare.argmax(p, a))[1], cost_of(p, lambda: compare.ltz(p, a))[1]

    (cost, ltz), *_ = run_parties(prog)
    assert cost.rounds == 6 * (ltz.rounds + 2)  # log2(64) levels of msb + mul_bit


@pytest.mark.parametrize("n", [1, 2, 5, 64, 1000])
def test_argmax_onehot_puts_a_one_at_the_first_maximum_only(n):
    x = rng.integers(-3, 4, n).astype(np.float64)  # many ties, at every level
    x[rng.integers(0, n)] = 3.0

    def prog(p):
        index, onehot = compare.argmax_onehot(p, share_fx(p, x))
        return arith.reveal(p, index), arith.reveal(p, onehot)

    index, onehot = run_parties(prog)[0]
    first = int(np.argmax(x))
    assert index.view(np.int64).tolist() == [first]
    assert onehot.tolist() == np.eye(n, dtype=np.uint64)[first].tolist()


def test_argmax_onehot_costs_the_argmax_and_one_mul_bit_per_level():
    n = 64

    def prog(p):
        a = share_fx(p, rng.normal(size=n))
        return cost_of(p, lambda: compare.argmax_onehot(p, a))[1], cost_of(p, lambda: compare.argmax(p, a))[1]

    for onehot, argmax in run_parties(prog):
        assert onehot.rounds == argmax.rounds + 6 * 2  # log2(64) levels, a mul_bit (2 rounds) each
    total = sum(o.bytes - a.bytes for o, a in run_parties(prog))
    assert total == 32 * (n - 1)  # one mul_bit per compared pair: 32 bytes over the three ranks


def test_max_with_dropped_bits_keeps_an_entry_within_its_slack():
    """A level may keep the smaller of two entries closer than 2^k ring units: ties, near-ties below 2^k,
    and entries 2^k apart (which it must order), against the exact maximum."""
    k, ulp = 3, 2.0**-18
    base = rng.uniform(-50, 50, (64, 1))
    steps = np.array([0, 1, 2, 7, 8, 9, 3, 5, 16, 0, 6, 1, 4, 2, 7, 12])  # ulps above the row's base
    x = base + rng.permuted(np.tile(steps, (64, 1)), axis=1) * ulp
    enc = np.rint(x * 2**18) / 2**18

    def prog(p):
        a = share_fx(p, x)
        out, cost = cost_of(p, lambda: compare.max(p, a, bits=28, drop=k))
        return open_fx(p, out), cost

    (got, cost), *_ = run_parties(prog)
    levels = 4
    assert np.all((got == enc).any(axis=1))  # one of the row's entries, selected exactly
    short = (enc.max(axis=1, keepdims=True) - got) / ulp
    assert short.min() >= -1e-6 and short.max() <= levels * (2**k - 1)
    # 28 - 3 bits: 8 groups, a carry tree of 3 levels: 5 rounds per comparison, 2 for the mul_bit.
    assert cost.rounds == levels * (5 + 2)


@pytest.mark.parametrize("bits, f, drop", [(28, 18, 3), (31, 18, 6), (31, 17, 0), (48, 18, 0), (25, 18, 0),
                                           (64, 18, 0), (29, 20, 4), (2, 18, 0)])
def test_softmax_drops_the_fewest_bits_that_save_a_round(bits, f, drop):
    from puma_onnx.runtime.nonlinear import SOFTMAX_MAX_SLACK, max_drop_bits
    from puma_onnx.runtime.convert import LEAF_BITS

    assert max_drop_bits(bits, f) == drop
    tree = lambda b: math.ceil(math.log2(max(1, -(-(b - 1) // LEAF_BITS))))  # noqa: E731
    if drop:
        assert tree(bits - drop) == tree(bits) - 1 and tree(bits - drop + 1) == tree(bits)
        assert drop <= f - SOFTMAX_MAX_SLACK


@pytest.mark.parametrize("shape", [(3, 4), (2, 5), (6, 16), (2, 128), (1, 7), (3, 13), (2, 8), (2, 3), (4, 33), (2, 2)])
def test_max_by_levels_of_four_with_ties_and_leftovers(shape):
    """Integers with many ties (exactly one entry of a group must win: ties go to the later one) and lengths
    that leave one to three entries over, and last groups of two to eight."""
    x = rng.integers(-4, 4, shape).astype(np.float64)
    x[0, -1] = x[0].max()  # a tie for the maximum
    got = run_parties(lambda p: open_fx(p, compare.max(p, share_fx(p, x), quads=True)))[0]
    assert np.array_equal(got, x.max(axis=-1, keepdims=True))


def test_cost_max_ends_with_one_group_of_eight():
    """32 entries a row: a level of four to 8, then one group of 8 (28 comparisons in one msb batch, an AND tree
    of three rounds over 7 bits, the selection): 2 C + 4 + 5 rounds, where levels of two would take more."""
    x = rng.uniform(-1, 1, (2, 32))

    def prog(p):
        a = share_fx(p, x)
        got, total = cost_of(p, lambda: compare.max(p, a, quads=True))
        diffs = [share_fx(p, np.zeros(k * n)) for k, n in ((6, 16), (28, 2))]  # each level's differences
        probes = [cost_of(p, lambda d=d: convert.msb(p, d))[1] for d in diffs]
        return open_fx(p, got), total, probes

    for rank, (got, total, probes) in enumerate(run_parties(prog)):
        assert np.array_equal(got, encoded(x).max(axis=-1, keepdims=True))
        assert total.rounds == (6 + 2 + 2) + (6 + 3 + 2) == 21
        # AND rows: level of four (4 - 2) 4 of 16 elements (2 bytes each); group of 8: (8 - 2) 8 of 2 elements.
        ands = 2 * 4 * 2 + 6 * 8 * 1
        select = (16 * 4 if rank == 0 else 8) * 16 + (16 * 8 if rank == 0 else 8) * 2
        assert total.bytes == sum(c.bytes for c in probes) + ands + select


def test_cost_max_levels_of_four():
    """16 entries a row, 4 rows: two levels of four, each the msb of its six differences, two AND rounds of
    four rows and the selection (rank 0: 8 bytes per bit and per term, 4 of each; ranks 1, 2: the reshare)."""
    x = rng.uniform(-1, 1, (4, 16))

    def prog(p):
        a = share_fx(p, x)
        _, total = cost_of(p, lambda: compare.max(p, a, quads=True))
        diffs = [share_fx(p, np.zeros(6 * n)) for n in (16, 4)]  # each level's six differences, one batch
        probes = [cost_of(p, lambda d=d: convert.msb(p, d))[1] for d in diffs]
        return total, probes

    for rank, (total, probes) in enumerate(run_parties(prog)):
        assert total.rounds == 2 * (6 + 2 + 2) == 20 < 4 * 8  # levels of two: 4 x (msb + mul_bit)
        ands = 2 * 4 * (2 + 1)  # four rows of 16 then of 4 elements, packed 8 to a byte
        select = (64 if rank == 0 else 8) * (16 + 4)
        assert total.bytes == sum(c.bytes for c in probes) + ands + select
