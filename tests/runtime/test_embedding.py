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


def test_embedding_cost_two_rounds_one_onehot_message_and_one_reshare():
    ids = rng.integers(0, VOCAB, 10)
    owner = 2
    res = lookup(ids, owner)
    for rank, (_, cost, _) in enumerate(res):
        assert cost.rounds == 2
        onehot = ids.size * VOCAB * 8 if rank == owner else 0
        assert cost.bytes == onehot + ids.size * HIDDEN * 8


def test_embedding_onehot_message_looks_uniform_to_its_receiver():
    ids = np.zeros(16, dtype=np.int64)  # the most structured one-hot there is
    owner = 1
    seen = []

    def spy(p):
        if p.rank == (owner + 2) % 3:
            exchange = p.comm.exchange

            def recording(sends, recvs):
                got = exchange(sends, recvs)
                if p.comm.path.endswith("embedding") and owner in got:
                    seen.append(got[owner])
                return got

            p.comm.exchange = recording

    lookup(ids, owner, spy=spy)
    (words,) = [w for w in seen if w.shape == (ids.size, VOCAB)]
    ones = np.unpackbits(words.view(np.uint8)).mean()
    assert abs(ones - 0.5) < 0.005, f"fraction of set bits {ones:.4f}"


def test_embedding_output_shares_are_fresh():
    ids = rng.integers(0, VOCAB, 5)
    first = lookup(ids, 0)[1][2]
    second = lookup(ids, 0)[1][2]
    assert not np.array_equal(first.first, second.first)


def test_embedding_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        lookup(np.array([3, VOCAB]), 0)
