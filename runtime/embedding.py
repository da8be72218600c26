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
from .ring import ring_matmul_bytes
from .shares import AShare
from .weights import WeightShare, matmul_part

U64 = np.uint64


def embedding(party: Party, table: AShare | WeightShare, ids: np.ndarray | None, owner: int, shape=None) -> AShare:
    """Rows table[ids] as an AShare of shape (*ids.shape, H); ids are the client's (rank `owner`) secret.

    Idea (indices mod 3, client c = owner, ranks A = c+1 and B = c+2, T = T_c + T_{c+1} + T_{c+2}, rank i
    holding (T_i, T_{i+1})): E @ T = E @ (T_c + T_{c+1}) + E @ T_{c+2} for the client's one-hot E (n x V).
    The first term is a row gather the client does alone. T_{c+2} is held by A (second component) and B
    (first), so its rows are a two-server lookup, with bits for masks:
      1. The client splits E = X xor Y with uniform bits X from k_A (the key it shares with A, which draws
         the same bits) and sends Y to B: V/8 bytes per id. Per row, X - Y is 0 off the id and
         sigma = +-1 at it (sigma = +1 where X holds the 1), so X @ T_{c+2} - Y @ T_{c+2} = sigma T_{c+2}[id].
         The client also shares tau = [sigma = -1] additively: tau_A from k_A, tau_B = tau - tau_A sent
         with Y.
      2. A computes P_A = X @ T_{c+2}, B computes P_B = Y @ T_{c+2}: one bits-by-words product each (one
         uint8 GEMM against the table's bytes, `ring_matmul_bytes`). With masks M_A, M_B from k_B (A and
         B's key), A sends P_A + M_A and B sends M_B - P_B to the client, which adds them: U = Q + M with
         Q = P_A - P_B = sigma T_{c+2}[id] and M = M_A + M_B.
      3. sigma U = sigma Q + sigma M, and sigma M = M - 2 tau M = M - 2 tau_A M - 2 tau_B M with M known to
         A and B: the parts  client: gather + sigma U,  A: 2 tau_A M - M,  B: 2 tau_B M  sum to E @ T, and
         are reshared with a fresh zero-sharing (each rank sends part + alpha to its predecessor).
    Security (semi-honest, one corruption): A sees X and tau_A, PRG streams independent of the ids; B sees
    Y = X xor E and tau_B = tau - tau_A, uniform because X and tau_A come from a key B lacks; the client
    sees P_A + M_A and M_B - P_B, uniform and independent under masks from a key it lacks; in the reshare
    each rank receives its successor's part masked by alpha_{i+1} = F(k_{i+1}) - F(k_{i+2}), whose k_{i+2}
    it lacks. No rank sees all of T, and neither A nor B learns sigma (it would tell A whether X holds
    the id's bit, a bit about the id). (A client that also knows T, the owner of a shared weight, can
    recompute the products and strip the masks: it learns nothing it did not know.)
    Rounds 3. Bytes: the client sends n (ceil(V/8) + 8) to B; A and B send 8 per output element (n H 8)
    to the client; then every rank 8 per output element. (It was n V 8 for a one-hot of words: 31 MB
    for 128 BERT tokens, now 0.5 MB.) Work: A and B multiply n x V bits by V x H words, 8 byte products
    where words took 36 limb products. (SPU: ~131 messages per token and secure equality tests; PUMA: V
    equality tests per token.)
    ids: integer array in [0, V) on the owner, None elsewhere; `shape` (public) is required there.
    A shared weight (`WeightShare`) gives each rank only what it reads: the client its rows, A and B
    their one component.
    """
    comm = party.comm
    vocab, hidden = table.value_shape if isinstance(table, WeightShare) else table.shape
    role = (party.rank - owner) % PARTIES
    b_rank = (owner + 2) % PARTIES
    if role == 0:
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < 0 or ids.max() >= vocab)):
            raise ValueError(f"token ids must be integers in [0, {vocab}) for this embedding table")
        shape = ids.shape
    elif shape is None:
        raise ValueError("embedding: ranks other than the owner must pass the (public) shape of the ids")
    shape = tuple(shape)
    n = int(np.prod(shape, dtype=np.int64))
    packed = (n, -(-vocab // 8))
    bits = lambda rows: np.unpackbits(rows, axis=1, count=vocab, bitorder="little")  # noqa: E731
    with comm.tag("embedding"):
        if role == 0:
            flat = ids.reshape(-1)
            x = party.prg_next.words(packed, np.uint8)
            tau_a = party.prg_next.words(n)
            y = x.copy()
            held = (x[np.arange(n), flat // 8] >> (flat % 8).astype(np.uint8)) & np.uint8(1)  # X at the id
            y[np.arange(n), flat // 8] ^= (np.uint8(1) << (flat % 8).astype(np.uint8))
            tau = (np.uint8(1) - held).astype(U64)
            comm.exchange({b_rank: np.concatenate([y.reshape(-1), (tau - tau_a).view(np.uint8)])}, {})
            # The client's own rows while A and B multiply.
            rows = table.row_sum(flat) if isinstance(table, WeightShare) else table.first[flat] + table.second[flat]
            got = comm.exchange({}, {(owner + 1) % PARTIES: ((n, hidden), U64), b_rank: ((n, hidden), U64)})
            u = sum(got.values())
            sigma = (np.uint64(1) - np.uint64(2) * tau)[:, None]
            part = rows + sigma * u
        else:
            if role == 1:
                x = party.prg_prev.words(packed, np.uint8)
                tau_part = party.prg_prev.words(n)
                comm.exchange({}, {})
            else:
                got = comm.exchange({}, {owner: ((packed[0] * packed[1] + 8 * n,), np.uint8)})[owner]
                x = got[: packed[0] * packed[1]].reshape(packed)
                tau_part = got[packed[0] * packed[1] :].view(U64)
            # A and B draw the masks alike from their common key: A's prg_next is B's prg_prev.
            key = party.prg_next if role == 1 else party.prg_prev
            m_a, m_b = key.words((n, hidden)), key.words((n, hidden))
            which = 1 if role == 1 else 0  # T_{c+2}: A's second component, B's first
            if isinstance(table, WeightShare):
                product = table.component_product(which, bits(x))
            else:
                product = ring_matmul_bytes(bits(x), (table.first, table.second)[which])
            comm.exchange({owner: product + m_a if role == 1 else m_b - product}, {})
            mask = m_a + m_b
            part = U64(2) * tau_part[:, None] * mask
            if role == 1:
                part = part - mask
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
