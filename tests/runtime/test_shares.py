import numpy as np

from puma_onnx.runtime import arith, shares
from puma_onnx.runtime.comm import run_parties

from .helpers import share_ring

rng = np.random.default_rng(21)
X = rng.integers(0, 2**64, (2, 3, 4), dtype=np.uint64)


def test_shape_operations_are_local_and_match_numpy():
    ops = [
        lambda a: a.reshape(6, 4),
        lambda a: a.transpose(2, 0, 1),
        lambda a: a.transpose((1, 0, 2)),
        lambda a: a.transpose(),
        lambda a: a.swapaxes(0, 2),
        lambda a: a[1, :, ::2],
        lambda a: a[:, [2, 0]],
        lambda a: a.sum(axis=1, keepdims=True),
    ]

    def prog(p):
        a = share_ring(p, X)
        before = p.comm.stats.snapshot()
        out = [op(a) for op in ops] + [a.broadcast_to((5, 2, 3, 4))]
        local = p.comm.stats.snapshot() - before
        return [arith.reveal(p, o) for o in out], local

    got, local = run_parties(prog)[0]
    assert local.rounds == 0
    for secure, op in zip(got, ops):
        assert np.array_equal(secure, op(X))
    assert np.array_equal(got[-1], np.broadcast_to(X, (5, 2, 3, 4)))


def test_expand_squeeze_and_module_functions():
    def prog(p):
        a = share_ring(p, X)
        parts = shares.split(a, [1], axis=1)
        out = [
            a.expand_dims(0).squeeze(0),
            shares.concat(parts, axis=1),
            shares.stack([a, a], axis=1),
            *shares.flat_split(*shares.flat_concat([a, a[0]])),
        ]
        before = p.comm.stats.snapshot()
        opened = [arith.reveal(p, o) for o in out]
        return opened, p.comm.stats.snapshot() - before

    (same, cat, stacked, flat_a, flat_a0), cost = run_parties(prog)[0]
    assert np.array_equal(same, X) and np.array_equal(cat, X)
    assert np.array_equal(stacked, np.stack([X, X], axis=1))
    assert np.array_equal(flat_a, X) and np.array_equal(flat_a0, X[0])
    # Only the five reveals communicated.
    assert cost.rounds == 5
