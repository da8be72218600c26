import numpy as np
import pytest

from puma_onnx.runtime import arith, convert
from puma_onnx.runtime.boolean import reveal_bits
from puma_onnx.runtime.comm import run_parties

from .helpers import cost_of, open_fx, share_fx, share_ring

rng = np.random.default_rng(8)


@pytest.mark.parametrize("bits", [48, 64, 20])
def test_msb_is_the_sign_within_range(bits):
    half = 2 ** (bits - 1)
    z = rng.integers(-half, half, 5000, dtype=np.int64)
    z[:6] = [-half, half - 1, 0, -1, 1, -2]

    def prog(p):
        return reveal_bits(p, convert.msb(p, share_ring(p, z.view(np.uint64)), bits=bits))

    assert np.array_equal(run_parties(prog)[0], z < 0)


def test_msb_dropping_low_bits_decides_below_zero_or_below_two_to_the_k():
    k = 22
    z = rng.integers(-(2**30), 2**30, 5000, dtype=np.int64)

    def prog(p):
        return reveal_bits(p, convert.msb(p, share_ring(p, z.view(np.uint64)), drop=k))

    got = run_parties(prog)[0]
    assert np.all(got[z < 0]) and not np.any(got[z >= 2**k])


def test_msb_accepts_lists_and_any_shape_in_one_batch():
    xs = [rng.uniform(-5, 5, (3, 4, 5)), rng.uniform(-5, 5, 7)]

    def prog(p):
        shared = [share_fx(p, v) for v in xs]
        out, cost = cost_of(p, lambda: convert.msb(p, shared))
        return [reveal_bits(p, o) for o in out], cost

    out, cost = run_parties(prog)[0]
    assert cost.rounds == 6
    for got, v in zip(out, xs):
        assert got.shape == v.shape and np.array_equal(got, v < 0)


def test_b2a_gives_integer_bits():
    x = rng.uniform(-5, 5, (6, 9))

    def prog(p):
        return arith.reveal(p, convert.b2a(p, convert.msb(p, share_fx(p, x))))

    assert np.array_equal(run_parties(prog)[0], (x < 0).astype(np.uint64))


def test_mul_bit_selects_and_broadcasts():
    x, c = rng.uniform(-50, 50, (4, 10)), rng.uniform(-5, 5, (4, 1))

    def prog(p):
        a = share_fx(p, x)
        bit = convert.msb(p, share_fx(p, c))
        return open_fx(p, convert.mul_bit(p, bit, a)), open_fx(p, convert.mul_bit(p, [bit], [a])[0])

    got, got_list = run_parties(prog)[0]
    want = (c < 0) * x
    # The bit product is exact in the ring: only x's encoding error (half an ulp) remains.
    assert np.abs(got - want).max() <= 2.0**-19 and np.array_equal(got, got_list)


@pytest.mark.parametrize("bits", [20, 42])
def test_select_truncates_the_selected_sum_and_adds_plain_terms(bits):
    # Terms at scale f + bits; two wrapped (garbage) terms on one bit cancel exactly in the ring.
    x, y, c0, c1 = (rng.uniform(-3, 3, 500) for _ in range(4))

    def prog(p):
        a, b = share_fx(p, x), share_fx(p, y)
        s0, s1 = convert.msb(p, [share_fx(p, c0), share_fx(p, c1)])
        junk = arith.mul_public(a, np.uint64(1) << np.uint64(50))
        terms = [(s0, arith.mul_public(a, np.uint64(1) << np.uint64(bits))), (s1, junk), (s1, arith.neg(junk))]
        return open_fx(p, convert.select(p, terms, bits, [(s1, b)]))

    got = run_parties(prog)[0]
    want = (c0 < 0) * x + (c1 < 0) * y
    # Encoding (half an ulp each) and the truncation's one ulp.
    assert np.abs(got - want).max() <= 2 * 2.0**-18


# ----------------------------------------------------------------------------- costs, as the docstrings state

N = 800  # a multiple of 8: packed rows have no padding byte


def per_rank_cost(fn):
    x = rng.uniform(-1, 1, N)

    def prog(p):
        a = share_fx(p, x)
        bit = convert.msb(p, a)
        return cost_of(p, lambda: fn(p, a, bit))[1]

    return run_parties(prog)


@pytest.mark.parametrize("bits", [48, 64, 16])
def test_cost_msb(bits):
    c = per_rank_cost(lambda p, a, b: convert.msb(p, a, bits=bits))
    # 3-bit leaves: rank 0 sends 7 rows per group and the top bit, ranks 1 and 2 reshare G and P
    # (the lowest group's P is never needed), then the carry tree's AND rows (2 per pair - 1 per level).
    groups = -(-(bits - 1) // 3)
    tree, m, levels = 0, groups, 0
    while m > 1:
        tree, m, levels = tree + 2 * (m // 2) - 1, -(-m // 2), levels + 1
    assert all(k.rounds == 2 + levels for k in c)
    assert [k.bytes for k in c] == [
        (7 * groups + 1 + tree) * N // 8,
        (2 * groups - 1 + tree) * N // 8,
        (2 * groups - 1 + tree) * N // 8,
    ]


def test_cost_b2a_two_rounds():
    c = per_rank_cost(lambda p, a, b: convert.b2a(p, b))
    assert all(k.rounds == 2 for k in c)
    assert [k.bytes for k in c] == [8 * N, 8 * N, 8 * N]


def test_cost_mul_bit_two_rounds():
    c = per_rank_cost(lambda p, a, b: convert.mul_bit(p, b, a))
    assert all(k.rounds == 2 for k in c)
    assert [k.bytes for k in c] == [16 * N, 8 * N, 8 * N]


@pytest.mark.parametrize("bits", [20, 42])
def test_cost_select_three_rounds(bits):
    # Two terms on one bit, one plain term on it: the bit goes once, every term costs 8 B from rank 0.
    c = per_rank_cost(lambda p, a, b: convert.select(p, [(b, a), (b, a)], bits, [(b, a)]))
    assert all(k.rounds == 3 for k in c)
    dealt = 12 if bits <= 31 else 16
    assert [k.bytes for k in c] == [(8 + 3 * 8 + dealt) * N, 16 * N, 16 * N]
