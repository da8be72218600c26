"""The client-side one-hot embedding against table[ids], its cost, and what the other ranks see."""

import numpy as np
import pytest

from puma_onnx.runtime import arith
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.embedding import embedding

from .helpers import cost_of, share_fx

rng = np.random.default_rng(1366)
VOCAB, HIDDEN = 300, 12
TABLE = rng.normal(0, 1, (VOCAB, HIDDEN))


def lookup(ids, owner, table_owner=0, spy=None):
    """Each rank's (revealed rows, cost, output share) for a table shared by `table_owner`."""

    def prog(p):
        table = share_fx(p, TABLE, table_owner)
        if spy is not None:
            spy(p)
        out, cost = cost_of(p, lambda: embedding(p, table, ids if p.rank == owner else None, owner, ids.shape))
        return p.fxp.decode(arith.reveal(p, out)), cost, out

    return run_parties(prog)


@pytest.mark.parametrize("owner", [0, 1, 2])
def test_embedding_equals_table_rows_for_every_client_rank(owner):
    ids = rng.integers(0, VOCAB, (3, 7))
    ids[0, :3] = [0, VOCAB - 1, 0]
    res = lookup(ids, owner, table_owner=(owner + 1) % 3)
    want = np.rint(TABLE[ids] * 2**18) / 2**18
    for got, _, _ in res:
        assert got.shape == (3, 7, HIDDEN)
        assert np.array_equal(got, want)


def test_embedding_cost_three_rounds_bits_to_one_rank_masked_products_to_the_client_and_one_reshare():
    ids = rng.integers(0, VOCAB, 10)
    owner = 2
    res = lookup(ids, owner)
    for rank, (_, cost, _) in enumerate(res):
        assert cost.rounds == 3
        out = ids.size * HIDDEN * 8
        bits = ids.size * (-(-VOCAB // 8) + 8) if rank == owner else 0  # Y and tau_B, to rank owner + 2
        products = 0 if rank == owner else out  # P_A + M_A and M_B - P_B, to the client
        assert cost.bytes == bits + products + out


def _received(owner, ids, receiver):
    """What `receiver` got in the embedding's exchanges, message by message."""
    seen = []

    def spy(p):
        if p.rank == receiver:
            exchange = p.comm.exchange

            def recording(sends, recvs):
                got = exchange(sends, recvs)
                if p.comm.path.endswith("embedding"):
                    seen.extend(got.values())
                return got

            p.comm.exchange = recording

    lookup(ids, owner, spy=spy)
    return seen


def _ones(words) -> float:
    return float(np.unpackbits(np.ascontiguousarray(words).view(np.uint8)).mean())


def test_embedding_bits_and_tau_look_uniform_to_their_receiver():
    ids = np.zeros(256, dtype=np.int64)  # the most structured one-hot there is
    owner = 1
    first = _received(owner, ids, (owner + 2) % 3)[0]
    packed = ids.size * -(-VOCAB // 8)
    y, tau = first[:packed].reshape(ids.size, -1), first[packed:]
    column = np.unpackbits(y, axis=1, count=VOCAB, bitorder="little")[:, 0]  # every id's own bit
    assert abs(_ones(y) - 0.5) < 0.01, f"fraction of set bits of Y {_ones(y):.4f}"
    assert abs(column.mean() - 0.5) < 0.15, f"fraction of set bits at the id {column.mean():.3f}"
    assert abs(_ones(tau) - 0.5) < 0.02, f"fraction of set bits of tau_B {_ones(tau):.4f}"


def test_embedding_products_look_uniform_to_the_client():
    ids = np.zeros(64, dtype=np.int64)
    owner = 0
    products = [w for w in _received(owner, ids, owner) if w.shape == (ids.size, HIDDEN)][:2]
    assert len(products) == 2
    for words in products:
        assert abs(_ones(words) - 0.5) < 0.01, f"fraction of set bits {_ones(words):.4f}"


def test_embedding_output_shares_are_fresh():
    ids = rng.integers(0, VOCAB, 5)
    first = lookup(ids, 0)[1][2]
    second = lookup(ids, 0)[1][2]
    assert not np.array_equal(first.first, second.first)


def test_embedding_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        lookup(np.array([3, VOCAB]), 0)
