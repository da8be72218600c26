"""Products chained on one dealer (runtime/chain.py): exact where the truncations are, floor or floor + 1 at
the end of the truncation's range, and the cost its docstring states."""

import numpy as np
import pytest

from puma_onnx.runtime import arith, chain
from puma_onnx.runtime.chain import Step
from puma_onnx.runtime.comm import run_parties

from .helpers import cost_of, share_ring

rng = np.random.default_rng(11)
B16 = 1 << 16


def ring(v) -> np.ndarray:
    return np.asarray([int(a) % (1 << 64) for a in np.ravel(v)], dtype=np.uint64).reshape(np.shape(v))


def signed(v: np.ndarray) -> list[int]:
    return [int(a) for a in v.view(np.int64).ravel()]


def run_chain(x, lefts, steps_of, bits, repeat=3):
    """chain.products on x * x truncated by `bits`, then steps_of(shares of lefts) (one chain per dealer when
    repeat = 3); the opened answers."""

    def prog(p):
        xs = share_ring(p, ring(x), owner=0)
        ls = [share_ring(p, ring(v), owner=i % 3) for i, v in enumerate(lefts)]
        outs = [chain.products(p, arith.mul_local(xs, xs), bits, steps_of(ls)) for _ in range(repeat)]
        return [arith.reveal(p, o) for o in outs]

    return run_parties(prog)[0]


def exact_chain(x, lefts, plan, bits):
    """The chain in Python integers with exact division (each product divisible by its shift): plan is a list of
    (left index or None, alpha, right index or None, beta, bits)."""
    t = [a * a >> bits for a in x]
    for li, alpha, ri, beta, d in plan:
        out = []
        for j, tj in enumerate(t):
            left = (lefts[li][j] if li is not None else 0) + alpha * tj
            right = (lefts[ri][j] if ri is not None else 0) + beta * tj
            z = left * right
            assert z % (1 << d) == 0 and abs(z) < 2**62, "the test's own data must divide exactly and fit"
            out.append(z >> d)
        t = out
    return t


# Every form of a step: a product with T alone, both factors replicated with T at negative and non-unit
# coefficients, T^2, a replicated factor alone times 7 T, -2 T times one; a chained shift of 31 (h^2 = 2^64
# vanishes just there). Ring values are multiples of 2^16 (x, L in units of 2^16) until the shift by 31, and
# each product divides its shift, so the chain must be exact. (The last shift beyond 31 bits: the floor test.)
PLAN = [
    (None, 1, 0, -3, 16),  # T (L0 - 3 T)
    (0, -1, 1, 5, 16),  # (L0 - T)(L1 + 5 T)
    (None, 1, None, 1, 31),  # T^2, by 31: T is then 2 V^2
    (0, 0, None, 7, 17),  # L0 (7 T)
    (None, -2, 1, 0, 16),  # (-2 T) L1
]


def _steps(plan):
    def build(ls):
        return [Step(None if li is None else ls[li], a, None if ri is None else ls[ri], b, d) for li, a, ri, b, d in plan]

    return build


def test_chain_is_exact_where_every_product_divides_its_shift_for_every_dealer():
    n = 64
    x = rng.integers(-2, 3, n) * B16
    lefts = [rng.integers(-2, 3, n) * B16, rng.integers(-2, 3, n) * B16]
    x[:3], lefts[0][:3], lefts[1][:3] = [2 * B16, -2 * B16, 0], [-2 * B16, 2 * B16, 2 * B16], [2 * B16, -2 * B16, -1 * B16]
    want = exact_chain([int(a) for a in x], [[int(a) for a in v] for v in lefts], PLAN, 16)
    for got in run_chain(x, lefts, _steps(PLAN), 16):
        assert signed(got) == want


def test_chain_each_step_alone_is_exact():
    """A wrong term in one form of step would hide behind the others' in a long chain: each alone."""
    n = 32
    x = rng.integers(-40, 41, n) * B16
    lefts = [rng.integers(-200, 200, n) * B16, rng.integers(-200, 200, n) * B16]
    for step in PLAN[:2] + [(1, 2, None, 1, 16), (None, 3, None, -1, 16), (0, 0, 1, 0, 16), (None, 1, None, 1, 31)]:
        want = exact_chain([int(a) for a in x], [[int(a) for a in v] for v in lefts], [step], 16)
        got = run_chain(x, lefts, _steps([step]), 16, repeat=1)[0]
        assert signed(got) == want, step


def test_chain_last_truncation_is_floor_or_floor_plus_one_up_to_2_62():
    """Exact first steps, then a last product up to |z| = 2^62 - 2^40 that no shift divides: the answer is
    floor(z / 2^d) or that + 1, for both signs, at the end of the truncation's range."""
    n = 400
    x = rng.integers(-(2**14), 2**14, n) * B16  # T = x^2 / 2^16, a multiple of 2^16 below 2^60
    x[:2] = [2**14 * B16 - B16, -(2**14) * B16]
    t = [int(a) * int(a) >> 16 for a in x]
    top = 2**62 - 2**40
    odd = rng.integers(0, 2**14, n) * 2 + 1
    lefts = [np.asarray([max(1, top // tt - o) if tt else o for tt, o in zip(t, odd)], dtype=np.int64)]
    lefts[0][1::2] *= -1  # both signs of z
    for d in (17, 29, 45):
        got = run_chain(x, lefts, lambda ls, d=d: [Step(ls[0], 0, None, 1, d)], 16, repeat=1)[0]
        z = [int(a) * tt for a, tt in zip(lefts[0], t)]
        assert max(abs(v) for v in z) > 2**61.9
        err = [g - (v >> d) for g, v in zip(signed(got), z)]
        assert set(err) <= {0, 1}, d


def test_chain_refuses_a_chained_shift_beyond_31_bits():
    def prog(p):
        x = share_ring(p, ring(np.ones(4, np.int64)))
        with pytest.raises(ValueError, match="at most 31"):
            chain.products(p, arith.mul_local(x, x), 32, [Step(None, 1, None, 1, 16)])
        return True

    assert all(run_parties(prog))


@pytest.mark.parametrize("last", [18, 40])
def test_cost_chain_matches_docstring(last):
    """N truncations: N + 1 rounds; the dealer 12 B per element and truncation (+4 for kappa before each step,
    +4 for rb beyond 31 bits), A and B 8 per truncation and 8 for the reshare: 32 N + 12 over the ranks."""
    n, steps = 50, 3

    def prog(p):
        x = share_ring(p, ring(rng.integers(-(2**20), 2**20, n)))
        return [
            cost_of(p, lambda: chain.products(p, arith.mul_local(x, x), 18, [Step(None, 1, x, 1, 18)] * (steps - 1)
                                              + [Step(None, 1, x, 1, last)]))[1]
            for _ in range(3)
        ]

    costs = run_parties(prog)
    big = 4 if last > 31 else 0
    for dealer in range(3):
        per_rank = [costs[r][dealer] for r in range(3)]
        assert all(c.rounds == steps + 2 for c in per_rank)  # N = steps + 1 truncations
        dealt = (12 * (steps + 1) + 4 * steps + big) * n
        assert sorted(c.bytes for c in per_rank) == sorted([dealt, (8 * (steps + 1) + 8) * n, (8 * (steps + 1) + 8) * n])
        assert sum(c.bytes for c in per_rank) == (32 * (steps + 1) + 12 + big) * n


# ----------------------------------------------------------------------------- times_bit


def _times_bit(x, lefts, plan, bits, bit_of):
    """The chain of `plan` held with rank 0 as its dealer, times the bit [bit_of < 0] (compare.ltz)."""
    from puma_onnx.runtime import compare

    def prog(p):
        xs = share_ring(p, ring(x), owner=0)
        ls = [share_ring(p, ring(v), owner=1) for v in lefts]
        held = chain.products(p, arith.mul_local(xs, xs), bits, _steps(plan)(ls), dealer=0, held=True)
        bit = compare.ltz(p, share_ring(p, ring(bit_of), owner=2))
        return arith.reveal(p, chain.times_bit(p, bit, held))

    return run_parties(prog)[0]


@pytest.mark.parametrize(
    "plan, unit", [(PLAN, B16), (PLAN[:1] + [(None, 1, 0, 0, 40)], 1 << 24)], ids=["last by 16", "last by 40"]
)
def test_times_bit_on_a_held_chain_is_exact(plan, unit):
    """b * y for the chain's answer before its reshare: exact, for both bits, for a last shift within 31 bits and
    beyond (gamma's 8-byte words: 2^(64-40) gamma needs gamma mod 2^40). With L in units of 2^24, T (L0 - 3 T)
    is a multiple of 2^16 and its product with L0 one of 2^40."""
    n = 64
    x = rng.integers(-2, 3, n) * B16
    lefts = [rng.integers(-2, 3, n) * unit, rng.integers(-2, 3, n) * unit]
    x[:2] = [2 * B16, -2 * B16]
    signs = rng.integers(-5, 5, n)
    signs[:4] = [-1, 0, -(2**40), 2**40]
    want = exact_chain([int(a) for a in x], [[int(a) for a in v] for v in lefts], plan, 16)
    got = _times_bit(x, lefts, plan, 16, signs)
    assert signed(got) == [w if s < 0 else 0 for w, s in zip(want, signs)]


def test_times_bit_refuses_a_chain_another_rank_dealt():
    from puma_onnx.runtime import compare

    def prog(p):
        x = share_ring(p, ring(np.ones(4, np.int64) * B16))
        held = chain.products(p, arith.mul_local(x, x), 16, [], dealer=1, held=True)
        with pytest.raises(ValueError, match="dealt by rank 0"):
            chain.times_bit(p, compare.ltz(p, x), held)
        return True

    assert all(run_parties(prog))


@pytest.mark.parametrize("last", [18, 40])
def test_cost_times_bit_matches_docstring(last):
    """2 rounds; rank 0 20 B per element (24 beyond 31 bits), ranks 1 and 2 8 each: 36 over the ranks, against 48
    for the chain's reshare and a convert.mul_bit after it."""
    from puma_onnx.runtime import compare

    n = 40

    def prog(p):
        x = share_ring(p, ring(rng.integers(-(2**20), 2**20, n)))
        held = chain.products(p, arith.mul_local(x, x), last, [], dealer=0, held=True)
        bit = compare.ltz(p, x)
        return cost_of(p, lambda: chain.times_bit(p, bit, held))[1]

    costs = run_parties(prog)
    assert all(c.rounds == 2 for c in costs)
    assert [c.bytes for c in costs] == [(24 if last > 31 else 20) * n, 8 * n, 8 * n]
