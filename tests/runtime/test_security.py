"""Security checks of the semi-honest protocols: fresh shares, uniform-looking views, no rank with all shares."""

import numpy as np
import pytest

from puma_onnx.runtime import arith, compare, convert
from puma_onnx.runtime.comm import ThreadComm, run_parties
from puma_onnx.runtime.shares import AShare

from .helpers import share_fx, share_ring

rng = np.random.default_rng(13)


def test_resharing_the_same_secret_gives_fresh_shares():
    v = rng.integers(0, 2**64, 64, dtype=np.uint64)

    def prog(p):
        a, b = share_ring(p, v), share_ring(p, v)
        one = share_ring(p, np.ones(64, dtype=np.uint64), owner=1)
        m1, m2 = arith.mul(p, a, one), arith.mul(p, a, one)
        t1, t2 = arith.truncate(p, a, 18), arith.truncate(p, a, 18)
        return [(x.first, y.first) for x, y in ((a, b), (m1, m2), (t1, t2))]

    for per_rank in run_parties(prog):
        for first, again in per_rank:
            # Two fresh uniform 64-bit words collide with probability 2^-64.
            assert not np.any(first == again)


def _replicated_shares(results):
    """The three shares x_0, x_1, x_2 from the ranks' (first, second) pairs, checking consistency."""
    for r in range(3):
        assert np.array_equal(results[r].second, results[(r + 1) % 3].first)
    return [results[r].first for r in range(3)]


@pytest.mark.parametrize("op", ["share", "mul", "mul_fx", "truncate", "b2a", "mul_bit", "select", "max"])
def test_no_rank_holds_all_three_shares(op):
    x = rng.uniform(-10, 10, 200)

    def prog(p):
        a = share_fx(p, x)
        return {
            "share": lambda: a,
            "mul": lambda: arith.mul(p, a, a),
            "mul_fx": lambda: arith.mul_fx(p, a, a),
            "truncate": lambda: arith.truncate(p, a, 5),
            "b2a": lambda: convert.b2a(p, compare.ltz(p, a)),
            "mul_bit": lambda: convert.mul_bit(p, compare.ltz(p, a), a),
            "select": lambda: convert.select(p, [(compare.ltz(p, a), a)], 5, [(compare.ltz(p, a), a)]),
            "max": lambda: compare.max(p, a.reshape(20, 10)),
        }[op]()

    results = run_parties(prog)
    shares = _replicated_shares(results)
    for r in range(3):
        missing = shares[(r + 2) % 3]
        # Rank r holds x_r and x_{r+1}; the third share is a fresh word equal to neither.
        assert not np.any(missing == results[r].first) and not np.any(missing == results[r].second)


def _rank1_blind(p, value):
    """The sharing x_0 = value, x_1 = x_2 = 0: rank 1's own shares are zero whatever the secret,
    so anything secret-dependent it sees can only come from the messages (a missing
    re-randomisation shows up as constant, unbalanced bits)."""
    zero = np.zeros_like(value)
    return {0: AShare(value, zero), 1: AShare(zero, zero), 2: AShare(zero, value)}[p.rank]


def _views(monkeypatch, prog, secret):
    """Bits rank 1 receives while running prog on the secret (setup and sharing excluded),
    by word width: {64: (words, 64) bit matrix of uint64 messages, 8: the same for byte messages}."""
    seen = {8: [], 64: []}
    original = ThreadComm._exchange

    def recording(self, sends, recvs):
        got = original(self, sends, recvs)
        if self.rank == 1 and self.path.rsplit("/", 1)[-1] not in ("setup", "share"):
            for a in got.values():
                width = 8 * a.dtype.itemsize
                seen[width].append(np.unpackbits(a.view(np.uint8).ravel()).reshape(-1, width))
        return got

    monkeypatch.setattr(ThreadComm, "_exchange", recording)
    run_parties(lambda p: prog(p, _rank1_blind(p, p.fxp.encode(secret))))
    return {w: np.concatenate(m) for w, m in seen.items() if m}


def _mul(p, a):
    return arith.mul(p, a, a)


def _mul_fx(p, a):
    return arith.mul_fx(p, a, a)


def _truncate(p, a):
    return arith.truncate(p, a, 18)


def _equal_zero(p, a):
    return compare.equal(p, a, arith.sub(a, a))


def _msb(p, a):
    return convert.msb(p, a)


def _b2a(p, a):
    return convert.b2a(p, compare.ltz(p, a))


def _mul_bit(p, a):
    return convert.mul_bit(p, compare.ltz(p, a), a)


def _select(p, a):
    bit = compare.ltz(p, a)
    return convert.select(p, [(bit, arith.mul_public(a, 1 << 20))], 20, [(bit, a)])


@pytest.mark.parametrize(
    "prog",
    [_mul, _mul_fx, _truncate, _msb, _equal_zero, _b2a, _mul_bit, _select],
    ids=["mul", "mul_fx", "truncate", "msb", "equal", "b2a", "mul_bit", "select"],
)
def test_received_words_do_not_depend_on_the_secret(monkeypatch, prog):
    # Two very different secrets: all zeros against all -1000 (every high bit set).
    n = 4000
    views = [_views(monkeypatch, prog, np.full(n, v)) for v in (0.0, -1000.0)]
    assert views[0].keys() == views[1].keys()
    for width in views[0]:
        b0, b1 = views[0][width], views[1][width]
        for bits in (b0, b1):
            # Every bit position of the received words is balanced (4000+ samples: sd <= 0.008).
            assert np.abs(bits.mean(axis=0) - 0.5).max() < 0.06
        # The two views have the same bit frequencies: difference of proportions within a
        # fixed, generous 8 standard deviations per position.
        sd = np.sqrt(0.25 / len(b0) + 0.25 / len(b1))
        assert np.abs(b0.mean(axis=0) - b1.mean(axis=0)).max() < 8 * sd
