"""Fresh shares from every re-randomising protocol. What each rank sees is tested in test_views.py:
its view, with its own keys and shares fixed, must not depend on the secret (so no rank can
compute a missing share either)."""

import numpy as np

from puma_onnx.runtime import arith
from puma_onnx.runtime.comm import run_parties

from .helpers import share_ring

rng = np.random.default_rng(13)


def test_resharing_the_same_secret_gives_fresh_shares():
    v = rng.integers(0, 2**64, 64, dtype=np.uint64)

    def prog(p):
        a, b = share_ring(p, v), share_ring(p, v)
        one = share_ring(p, np.ones(64, dtype=np.uint64), owner=1)
        m1, m2 = arith.mul(p, a, one), arith.mul(p, a, one)
        t1, t2 = arith.truncate(p, a, 18), arith.truncate(p, a, 18)
        return [(x, y) for x, y in ((a, b), (m1, m2), (t1, t2))]

    for per_rank in run_parties(prog):
        for once, again in per_rank:
            # Both components fresh: two uniform 64-bit words collide with probability 2^-64.
            assert not np.any(once.first == again.first) and not np.any(once.second == again.second)
