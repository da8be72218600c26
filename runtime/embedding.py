"""Secure embedding lookup of the client's private token ids in a secret table.

PUMA builds a secret one-hot of the ids by secure equality tests against every vocabulary
index (in SPU's 2PC this alone was 23 of 36 GB for BERT-base, SPU issue 1366). Here the
client is one of the three ranks and knows its ids in plaintext, so it builds the one-hot
itself and only the part of the table it does not hold needs a protocol.
"""

from __future__ import annotations

import numpy as np

from . import arith
from .comm import PARTIES
from .onehot import OneHotShare
from .party import Party
from .ring import ring_matmul
from .shares import AShare
from .weights import WeightShare, matmul_part

U64 = np.uint64


def embedding(party: Party, table: AShare, ids: np.ndarray | None, owner: int, shape=None) -> AShare:
    """Rows table[ids] as an AShare of shape (*ids.shape, H); ids are the client's (rank `owner`) secret.

    Idea (indices mod 3, client o, T = T_o + T_{o+1} + T_{o+2}, rank i holds (T_i, T_{i+1})):
    the client builds the one-hot E (n x V) of its ids, so E @ T = E @ (T_o + T_{o+1}) + E @ T_{o+2}.
    The first term is a row gather the client does alone. T_{o+2} is held by both other ranks
    (rank o+1 as its second component, rank o+2 as its first): the client splits E = Ea + Eb with Ea
    drawn from k_{o+1} (the PRG it shares with rank o+1, which draws the same words) and sends
    Eb = E - Ea to rank o+2. Rank o+1 computes Ea @ T_{o+2}, rank o+2 computes Eb @ T_{o+2} (one
    exact ring matmul each); the three additive parts sum to E @ T and are reshared into a
    replicated share with a fresh zero-sharing (each rank sends part + alpha to its predecessor).
    Security (semi-honest, one corruption): rank o+1 sees Ea, a PRG stream independent of the ids;
    rank o+2 sees Eb = E - Ea, uniform because Ea comes from a key it does not hold; in the reshare
    each rank receives its successor's part masked by alpha_{i+1} = F(k_{i+1}) - F(k_{i+2}), whose
    k_{i+2} it lacks, so the received words are uniform and the output share is fresh. The client
    learns nothing it did not know (it receives only masked words). No rank sees all of T.
    Rounds 2. Bytes: the client sends n V 8 (Eb) to rank o+2, once; then every rank 8 per output
    element (n H 8). Work: two ranks multiply n x V by V x H in the ring. (SPU: ~131 messages per
    token and secure equality tests; PUMA: V equality tests per token.)
    ids: integer array in [0, V) on the owner, None elsewhere; `shape` (public) is required there.
    """
    comm = party.comm
    vocab, hidden = table.shape
    role = (party.rank - owner) % PARTIES
    before = (owner + 2) % PARTIES
    if role == 0:
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= vocab)):
            raise ValueError(f"token ids must be integers in [0, {vocab}) for this embedding table")
        shape = ids.shape
    elif shape is None:
        raise ValueError("embedding: ranks other than the owner must pass the (public) shape of the ids")
    shape = tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    with comm.tag("embedding"):
        if role == 0:
            flat = ids.reshape(-1)
            onehot = np.zeros((n, vocab), dtype=U64)
            onehot[np.arange(n), flat] = 1
            ea = party.prg_next.words((n, vocab))
            comm.exchange({before: onehot - ea}, {})
            part = table.first[flat] + table.second[flat]
        elif role == 1:
            ea = party.prg_prev.words((n, vocab))
            comm.exchange({}, {})
            part = ring_matmul(ea, table.second)
        else:
            eb = comm.exchange({}, {owner: ((n, vocab), U64)})[owner]
            part = ring_matmul(eb, table.first)
        part = part + party.zero_share(part.shape)
        got = comm.exchange({party.prev: part}, {party.next: (part.shape, U64)})
        out = AShare(part, got[party.next])
    return out.reshape(shape + (hidden,))


# Rows of a one-hot share multiplied at a time: 256 x V words (62 MB for V = 30,522) at most.
SHARED_BLOCK_ROWS = 256


def shared_embedding(
    party: Party, table: AShare | WeightShare, sources: list[tuple[OneHotShare, np.ndarray]], rows: int
) -> AShare:
    """Rows of `table` (V x H) for ids an outside client sent as shares of their one-hot rows (onehot.py).

    `sources` places each query's one-hot share at flat row positions of the (rows x H) answer; rows no
    query fills (padding) are zero. Idea: E @ T is a replicated product (Araki et al. 2016) of the shared
    one-hot E and the table. A shared weight T (weights.py: x_2 from the common key) needs one ring
    product per rank, `matmul_part`; a general share two, [E_i, E_{i+1}] @ [[T_i + T_{i+1}], [T_i]]. Each
    rank computes its additive part a block of rows at a time (no message), then every part is reshared
    at once with a fresh zero-sharing. No truncation: E holds integers.
    Rounds 1. Bytes: 8 per output element (rows x H x 8 per rank). Work: every rank multiplies n x V by
    V x H in the ring once (n real tokens): 3 such products in all, against 2 for `embedding`, where the
    client is a rank and gathers its own rows.
    """
    vocab, hidden = table.value_shape if isinstance(table, WeightShare) else table.shape
    parts = np.zeros((rows, hidden), dtype=U64)
    for onehot, positions in sources:
        if onehot.vocab != vocab or positions.shape != (onehot.rows,):
            raise ValueError(f"a one-hot share of {onehot.rows} x {onehot.vocab} does not fit a {vocab}-row table")
        for start, block in onehot.blocks(SHARED_BLOCK_ROWS):
            if isinstance(table, WeightShare):
                part = matmul_part(block, table)
            else:
                part = arith.matmul_local(block, table)
            parts[positions[start : start + block.shape[0]]] = part
    with party.comm.tag("embedding"):
        (out,) = arith.reshare_parts(party, [parts])
    return out
