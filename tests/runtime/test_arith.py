import numpy as np
import pytest

from puma_onnx.runtime import arith
from puma_onnx.runtime.comm import run_parties

from .helpers import cost_of, encoded, open_fx, share_fx, share_ring

rng = np.random.default_rng(5)
ULP = 2.0**-18




def test_share_reveal_roundtrip_from_every_owner():
    v = rng.integers(0, 2**64, (3, 4), dtype=np.uint64)

    def prog(p):
        return [arith.reveal(p, share_ring(p, v, owner)) for owner in range(3)]

    for per_rank in run_parties(prog):
        for got in per_rank:
            assert np.array_equal(got, v)


def test_reveal_to_one_rank_only():
    v = rng.integers(0, 2**64, 7, dtype=np.uint64)
    out = run_parties(lambda p: arith.reveal(p, share_ring(p, v), to=2))
    assert out[0] is None and out[1] is None and np.array_equal(out[2], v)


def test_local_operations_match_ring_arithmetic():
    x, y = rng.integers(0, 2**64, (2, 5, 3), dtype=np.uint64)
    c = rng.integers(-100, 100, (3,))

    def prog(p):
        a, b = share_ring(p, x, 0), share_ring(p, y, 1)
        return [
            arith.reveal(p, r)
            for r in (arith.add(a, b), arith.sub(a, b), arith.neg(a), arith.add_public(p, a, c), arith.mul_public(a, c))
        ]

    got = run_parties(prog)[0]
    cu = c.astype(np.int64).view(np.uint64)
    for g, want in zip(got, (x + y, x - y, -x, x + cu, x * cu)):
        assert np.array_equal(g, want)


def test_ring_mul_and_matmul_are_exact():
    x, y = rng.integers(0, 2**64, (2, 6, 8), dtype=np.uint64)
    w = rng.integers(0, 2**64, (8, 3), dtype=np.uint64)

    def prog(p):
        a, b, m = share_ring(p, x, 0), share_ring(p, y, 1), share_ring(p, w, 2)
        return arith.reveal(p, arith.mul(p, a, b)), arith.reveal(p, arith.matmul(p, a, m))

    prod, mm = run_parties(prog)[0]
    assert np.array_equal(prod, x * y) and np.array_equal(mm, x @ w)


def test_mul_fx_broadcasts_and_errs_below_one_ulp():
    x, y = rng.uniform(-100, 100, (4, 50)), rng.uniform(-100, 100, (4, 1))
    got = run_parties(lambda p: open_fx(p, arith.mul_fx(p, share_fx(p, x), share_fx(p, y, 1))))[0]
    assert np.abs(got - encoded(x) * encoded(y)).max() < ULP


def test_mul_fx_is_unbiased():
    """+1 with probability frac(z / 2^f): no systematic error, which would add up over a matmul's terms
    and a model's layers (a bias of one ulp shifts the mean by 1; 20,000 products leave 0.004 of noise)."""
    x, y = rng.uniform(-8, 8, 20_000), rng.uniform(-8, 8, 20_000)
    got = run_parties(lambda p: open_fx(p, arith.mul_fx(p, share_fx(p, x), share_fx(p, y, 1))))[0]
    assert abs(np.mean(got - encoded(x) * encoded(y))) < 0.05 * ULP


def test_matmul_fx_batched_against_float64():
    x, w = rng.uniform(-2, 2, (2, 5, 64)), rng.uniform(-2, 2, (64, 7))
    got = run_parties(lambda p: open_fx(p, arith.matmul_fx(p, share_fx(p, x), share_fx(p, w, 1))))[0]
    # The 64 products and their sum are exact in the ring: one truncation.
    assert np.abs(got - encoded(x) @ encoded(w)).max() < ULP


def test_mul_public_fx_against_float64():
    x, c = rng.uniform(-50, 50, 100), rng.uniform(-3, 3, 100)
    got = run_parties(lambda p: open_fx(p, arith.mul_public_fx(p, share_fx(p, x), c)))[0]
    assert np.abs(got - encoded(x) * encoded(c)).max() < ULP


@pytest.mark.parametrize("bits", [18, 40])
def test_truncate_error_below_one_ulp(bits):
    # The result is floor(z / 2^d) or one more, for every |z| < 2^62: no failure probability at all,
    # so 1e8 or more truncations are as safe as these. Millions of random words cover both carry cases
    # of the top bit (rank 0 deals; the test below rotates the dealer and gives it a part).
    n = 2_000_000 if bits == 18 else 200_000
    z = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    z[:4] = [-(2**62), 2**62 - 1, 0, -1]

    def prog(p):
        x = share_ring(p, z.view(np.uint64))
        return [arith.reveal(p, arith.truncate(p, x, bits)).view(np.int64) for _ in range(3)]

    frac = (z & ((1 << bits) - 1)) / 2.0**bits
    for got in run_parties(prog)[0]:
        diff = got - (z >> bits)
        assert diff.min() >= 0 and diff.max() <= 1
        # +1 with probability frac(z / 2^bits): unbiased (a constant +1, also within {0, 1}, moves this by 0.5).
        assert abs(np.mean(diff - frac)) < 0.01


@pytest.mark.parametrize("bits", [18, 40])
def test_truncate_parts_with_the_dealers_part_in_its_mask_errs_below_one_ulp_to_the_ends_of_its_range(bits):
    """z = z_0 + z_1 + z_2 with every rank's part a full random word (the dealer's folded into its mask),
    |z| up to 2^62, three calls so that each rank deals once: floor(z / 2^d) or that + 1, never more."""
    n = 200_000
    z = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
    z[:4] = [-(2**62), 2**62 - 1, 0, -1]
    parts = [rng.integers(0, 2**64, n, dtype=np.uint64) for _ in range(2)]
    parts.append(z.view(np.uint64) - parts[0] - parts[1])

    def prog(p):
        return [arith.reveal(p, arith.truncate_parts(p, [parts[p.rank]], bits)[0]).view(np.int64) for _ in range(3)]

    for got in run_parties(prog)[0]:
        diff = got - (z >> bits)
        assert diff.min() >= 0 and diff.max() <= 1


def test_list_operands_share_rounds():
    x, y = rng.uniform(-5, 5, (2, 10)), rng.uniform(-5, 5, (2, 3))

    def prog(p):
        a, b = share_fx(p, x), share_fx(p, y)
        outs, cost = cost_of(p, lambda: arith.mul_fx(p, [a, b], [a, b]))
        return [open_fx(p, o) for o in outs], cost

    (sq_x, sq_y), cost = run_parties(prog)[0]
    assert cost.rounds == 2
    assert np.abs(sq_x - x * x).max() < 1e-4 and np.abs(sq_y - y * y).max() < 1e-4


# ----------------------------------------------------------------------------- costs, as the docstrings state


def costs(fn, shape=(10, 12)):
    """Per-rank Cost of fn(party, x, y) on shares of random values."""
    x, y = rng.uniform(-1, 1, shape), rng.uniform(-1, 1, shape)

    def prog(p):
        a, b = share_fx(p, x), share_fx(p, y, 1)
        return cost_of(p, lambda: fn(p, a, b))[1]

    return run_parties(prog)


def test_cost_share_one_round_eight_bytes_from_owner():
    c = costs(lambda p, a, b: share_fx(p, np.zeros((10, 12)), owner=2))
    assert [k.rounds for k in c] == [1, 1, 1]
    assert [k.bytes for k in c] == [0, 0, 8 * 120]


def test_cost_reveal_one_round_eight_bytes_per_receiver():
    c = costs(lambda p, a, b: arith.reveal(p, a))
    assert all(k.rounds == 1 and k.bytes == 8 * 120 for k in c)
    c = costs(lambda p, a, b: arith.reveal(p, a, to=0))
    assert [k.bytes for k in c] == [0, 8 * 120, 0]


def test_cost_mul_and_matmul_one_round_eight_bytes():
    for c in (costs(lambda p, a, b: arith.mul(p, a, b)), costs(lambda p, a, b: arith.matmul(p, a, b.transpose())),):
        assert all(k.rounds == 1 for k in c)
    assert all(k.bytes == 8 * 120 for k in costs(lambda p, a, b: arith.mul(p, a, b)))
    assert all(k.bytes == 8 * 100 for k in costs(lambda p, a, b: arith.matmul(p, a, b.transpose())))


@pytest.mark.parametrize("op", ["truncate", "mul_public_fx"])
def test_cost_linear_truncations_two_rounds_forty_four_bytes_over_three_ranks(op):
    # Ranks 1 and 2 hold a linear function of x 2-of-2 already: rank 0 only deals.
    fn = {
        "truncate": lambda p, a, b: arith.truncate(p, a, 18),
        "mul_public_fx": lambda p, a, b: arith.mul_public_fx(p, a, 0.5),
    }[op]
    c = costs(fn)
    assert all(k.rounds == 2 for k in c)
    assert [k.bytes for k in c] == [12 * 120, 16 * 120, 16 * 120]


@pytest.mark.parametrize("op", ["mul_fx", "matmul_fx", "mul_fx_wide"])
def test_cost_truncating_products_two_rounds_forty_four_bytes_over_three_ranks(op):
    fn = {
        "mul_fx": lambda p, a, b: arith.mul_fx(p, a, b),
        "matmul_fx": lambda p, a, b: arith.matmul_fx(p, a, b.reshape(12, 10)),
        "mul_fx_wide": lambda p, a, b: arith.mul_fx(p, a, b, bits=40),
    }[op]
    c = costs(fn)
    n = 100 if op == "matmul_fx" else 120
    assert all(k.rounds == 2 for k in c)
    # The dealer folds its part of the product into its mask: it only deals B rc (8 B) and rb (4 B, 8 beyond
    # 31 bits), the other two swap their halves of the opening and of the reshare (16 each).
    assert sorted(k.bytes for k in c) == [(16 if op == "mul_fx_wide" else 12) * n, 16 * n, 16 * n]


def test_mul_fx_truncates_by_requested_bits():
    x, y = rng.uniform(-4, 4, 50), rng.uniform(-4, 4, 50)
    # Keep 10 extra fractional bits: the result carries f + 10 of them.
    got = run_parties(lambda p: arith.reveal(p, arith.mul_fx(p, share_fx(p, x), share_fx(p, y, 1), bits=8)))[0]
    scaled = got.view(np.int64) / 2.0**28
    assert np.abs(scaled - encoded(x) * encoded(y)).max() < 2.0**-28


def test_other_fraction_bits():
    x, y = rng.uniform(-30, 30, 40), rng.uniform(-30, 30, 40)

    def prog(p):
        assert p.fxp.frac_bits == 12
        return open_fx(p, arith.mul_fx(p, share_fx(p, x), share_fx(p, y, 1)))

    got = run_parties(prog, frac_bits=12)[0]
    assert np.abs(got - encoded(x, 12) * encoded(y, 12)).max() < 2.0**-12
