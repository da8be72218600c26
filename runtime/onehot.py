"""Token ids from a client outside the ranks, as replicated shares of their one-hot rows.

When the client is a rank it builds the one-hot of its ids itself (`embedding.embedding`). A client
outside the ranks (`puma-onnx serve`) must hand the ranks shares instead, and no rank may learn an id.

Idea (Araki et al. 2016 replicated sharing, with the two random components compressed to seeds):
the client builds the one-hot E (n x V) of its n ids and splits it as E = X0 + X1 + X2 mod 2^64, where
X0 and X1 are the AES-128-CTR streams of two fresh seeds s0, s1 (`prg.PRG`, stream 0: 16 zero bytes as
the initial counter block, the key stream read as little-endian uint64 in row-major order) and
X2 = E - X0 - X1 is sent in full. Rank i holds (X_i, X_{i+1}) like every replicated share:
  rank 0: s0, s1          (32 bytes)
  rank 1: s1, X2          (16 + 8 n V bytes)
  rank 2: X2, s0          (8 n V + 16 bytes)
Security (semi-honest, one corrupt rank, client honest): rank 0 sees two independent seeds; rank 1 sees
X1 and X2 = E - X0 - X1, uniform because X0 comes from s0, which it lacks; rank 2 likewise lacks s1.
Each rank's view is therefore uniform and independent of the ids. Cost for the client: 1 message to each
rank, 16 n V bytes in all (244 KB per token for a 30,522-word vocabulary), no round among the ranks.
The product with the secret table is `embedding.shared_embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .comm import PARTIES
from .prg import PRG, SEED_BYTES, new_seed
from .shares import AShare

U64 = np.uint64
WORD = np.dtype("<u8")  # the key stream read as little-endian words, on any host (the wire protocol's)
# X0 and X1 travel as seeds, X2 in full.
SEEDED = (0, 1)
DENSE = 2


def held(rank: int) -> tuple[int, int]:
    """The components rank `rank` holds: (X_rank, X_rank+1)."""
    return rank, (rank + 1) % PARTIES


@dataclass
class Piece:
    """What one rank receives: its two components, each a seed (bytes) or the dense X2 (n x V uint64)."""

    rank: int
    seeds: dict[int, bytes]
    dense: np.ndarray | None


def split(ids: np.ndarray, vocab: int, seeds: tuple[bytes, bytes] | None = None) -> list[Piece]:
    """The client's side: one Piece per rank for the ids (any shape, flattened in C order)."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab})")
    s = seeds or (new_seed(), new_seed())
    dense = np.zeros((ids.size, vocab), dtype=U64)
    dense[np.arange(ids.size), ids] = 1
    for seed in s:
        dense -= PRG(seed).words(dense.shape, WORD).astype(U64, copy=False)
    return [
        Piece(r, {k: s[k] for k in held(r) if k in SEEDED}, dense if DENSE in held(r) else None) for r in range(PARTIES)
    ]


def check_piece(piece: Piece, rows: int, vocab: int) -> None:
    """A piece fit for `rows` tokens of a `vocab`-word table: the right seeds and a dense part of the
    right size. Raises ValueError naming what is wrong (the error reply of a malformed query)."""
    want = {k for k in held(piece.rank) if k in SEEDED}
    if set(piece.seeds) != want:
        raise ValueError(f"rank {piece.rank} takes seeds for components {sorted(want)}, got {sorted(piece.seeds)}")
    for k, seed in piece.seeds.items():
        if len(seed) != SEED_BYTES:
            raise ValueError(f"the seed of component {k} must be {SEED_BYTES} bytes, got {len(seed)}")
    if DENSE in held(piece.rank):
        size = 0 if piece.dense is None else piece.dense.size
        if size != rows * vocab:
            raise ValueError(
                f"the share must hold {rows} x {vocab} uint64 words ({rows * vocab * 8} bytes), got {size * 8} bytes"
            )
    elif piece.dense is not None:
        raise ValueError(f"rank {piece.rank} takes no dense share")


class OneHotShare:
    """A rank's replicated share of the one-hot rows, expanded a block of rows at a time, in order."""

    def __init__(self, piece: Piece, rows: int, vocab: int):
        check_piece(piece, rows, vocab)
        self.rows, self.vocab = rows, vocab
        self._piece = piece

    def blocks(self, size: int):
        """(start, AShare of rows [start, start + size)) for the whole matrix, in order. Each call starts
        the seeded components' streams afresh, so every walk reads the same matrix."""
        first, second = held(self._piece.rank)
        prgs = {k: PRG(seed) for k, seed in self._piece.seeds.items()}
        for start in range(0, self.rows, size):
            stop = min(start + size, self.rows)
            parts = [self._component(k, start, stop, prgs) for k in (first, second)]
            yield start, AShare(parts[0], parts[1])

    def _component(self, k: int, start: int, stop: int, prgs: dict) -> np.ndarray:
        if k == DENSE:
            return self._piece.dense.reshape(self.rows, self.vocab)[start:stop]
        return prgs[k].words((stop - start, self.vocab), WORD).astype(U64, copy=False)
