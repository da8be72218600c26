import numpy as np

from puma_onnx.runtime import boolean
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.convert import split_sum
from puma_onnx.runtime.shares import BShare

from .helpers import share_ring

rng = np.random.default_rng(3)


def test_pack_bits_slices_low_bits_little_endian():
    x = rng.integers(0, 2**64, 21, dtype=np.uint64)
    rows = boolean.pack_bits(x, 40)
    assert rows.shape == (40, 3)
    for j in (0, 17, 39):
        assert np.array_equal(boolean.unpack_row(rows[j], 21), (x >> np.uint64(j)) & np.uint64(1))


def reveal_rows(p, b: BShare) -> np.ndarray:
    """All rows of a boolean share, opened (test only): rows x n bits."""
    return np.stack([boolean.reveal_bits(p, b.row(j)) for j in range(b.rows)])


def test_and_of_split_inputs_is_bitwise_and():
    x = rng.integers(0, 2**64, 50, dtype=np.uint64)

    def prog(p):
        u, v = split_sum(p, share_ring(p, x), 64)
        return reveal_rows(p, u), reveal_rows(p, v), reveal_rows(p, boolean.and_(p, u, v))

    u, v, uv = run_parties(prog)[1]
    assert np.array_equal(uv, u & v)
    # u + v is the shared value, bit by bit.
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    to_int = lambda bits: (bits.T.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)  # noqa: E731
    assert np.array_equal(to_int(u) + to_int(v), x)


def test_carry_out_is_the_carry_of_the_sum():
    bits = 13
    x = rng.integers(0, 2**64, 300, dtype=np.uint64)

    def prog(p):
        u, v = split_sum(p, share_ring(p, x), bits)
        g = boolean.and_(p, u, v)
        return boolean.reveal_bits(p, boolean.carry_out(p, g, boolean.xor(u, v))), reveal_rows(p, u), reveal_rows(p, v)

    carry, u, v = run_parties(prog)[2]
    weights = np.uint64(1) << np.arange(bits, dtype=np.uint64)
    uu = (u.T.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    vv = (v.T.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    assert np.array_equal(carry, (uu + vv) >> np.uint64(bits) == 1)


def test_and_all_is_true_only_for_all_ones_rows():
    x = rng.integers(0, 2, (5, 40), dtype=np.uint64)
    x[:, :3] = 1

    def prog(p):
        u, v = split_sum(p, share_ring(p, x.T.copy() @ (np.uint64(1) << np.arange(5, dtype=np.uint64))), 5)
        return boolean.reveal_bits(p, boolean.and_all(p, boolean.xor(u, v)))

    assert np.array_equal(run_parties(prog)[0], x.all(axis=0))


def test_cost_and_one_round_rows_bits_per_element():
    x = rng.integers(0, 2**64, 800, dtype=np.uint64)

    def prog(p):
        u, v = split_sum(p, share_ring(p, x), 10)
        before = p.comm.stats.snapshot()
        boolean.and_(p, u, v)
        return p.comm.stats.snapshot() - before

    # 10 rows of 800 bits: 1000 bytes from every rank.
    assert all(c.rounds == 1 and c.bytes == 1000 for c in run_parties(prog))


def test_cost_reveal_bits_one_round_one_bit_per_element():
    x = rng.integers(0, 2**64, 800, dtype=np.uint64)

    def prog(p):
        u, _ = split_sum(p, share_ring(p, x), 1)
        before = p.comm.stats.snapshot()
        boolean.reveal_bits(p, u)
        return p.comm.stats.snapshot() - before

    assert all(c.rounds == 1 and c.bytes == 100 for c in run_parties(prog))
