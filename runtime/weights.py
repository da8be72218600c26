"""The model owner's weights as replicated shares that two ranks can regenerate instead of storing.

Sharing (owner o = 0, like `arith.share`): x_0 comes from a key the owner shares
with rank 2, x_2 from a key common to all ranks, and the owner sends
x_1 = W - x_0 - x_2 to rank 1. Unlike `arith.share`, each weight draws its PRG
words from its own AES-CTR stream (nonce = the weight's index), so x_0 and x_2
can be drawn again at any time: ranks keep only x_1 (ranks 0 and 1) or nothing
(rank 2), half the memory of stored shares (8 bytes per weight on two ranks,
0 on the third), and pay one AES pass per regenerated component when the weight
is used (GB/s with AES-NI).

Security is that of `arith.share`: rank 1 sees x_1, masked by x_0 whose key it
lacks; rank 2 sees x_0 and x_2, both independent of W.
Cost: 1 round per weight, 8 bytes per weight from the owner, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .comm import PARTIES
from .party import Party
from .prg import SEED_BYTES
from .shares import AShare

OWNER = 0


def _stream(seed: bytes, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """Words number 0.. of the AES-CTR stream keyed by seed with nonce `index`."""
    count = int(np.prod(shape, dtype=np.int64))
    enc = Cipher(algorithms.AES(seed), modes.CTR(index.to_bytes(8, "big") + b"\0" * 8)).encryptor()
    out = bytearray(count * 8 + 15)
    enc.update_into(memoryview(out)[: count * 8], out)
    return np.frombuffer(out, dtype=np.uint64, count=count).reshape(shape)


@dataclass
class WeightShare:
    """One rank's share of one weight: the stored component, and seeds for the regenerable ones."""

    index: int
    shape: tuple[int, ...]
    rank: int
    stored: np.ndarray | None  # x_1 on ranks 0 and 1
    seed_0: bytes | None  # key of x_0 (ranks 0 and 2)
    seed_2: bytes  # key of x_2 (all ranks)

    def materialize(self) -> AShare:
        x0 = (lambda: _stream(self.seed_0, self.index, self.shape))
        x2 = (lambda: _stream(self.seed_2, self.index, self.shape))
        if self.rank == 0:
            return AShare(x0(), self.stored)
        if self.rank == 1:
            return AShare(self.stored, x2())
        return AShare(x2(), x0())


def weight_seeds(party: Party) -> tuple[bytes | None, bytes]:
    """Fresh weight keys from the setup keys: (k for x_0 on ranks 0 and 2, common k for x_2)."""
    seed_2 = party.prg_all.words(SEED_BYTES, np.uint8).tobytes()
    if party.rank == OWNER:
        return party.prg_prev.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    if party.rank == (OWNER - 1) % PARTIES:
        return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    return None, seed_2


def share_weights(party: Party, manifest: list, values) -> dict[str, WeightShare]:
    """Share each (name, shape) of the manifest; `values(name)` gives the owner its ring array."""
    seed_0, seed_2 = weight_seeds(party)
    comm, r = party.comm, party.rank
    out = {}
    with comm.tag("share_weights"):
        for index, (name, shape) in enumerate(manifest):
            shape = tuple(shape)
            stored = None
            if r == OWNER:
                stored = values(name) - _stream(seed_0, index, shape) - _stream(seed_2, index, shape)
                comm.exchange({1: stored}, {})
            elif r == 1:
                stored = comm.exchange({}, {OWNER: (shape, np.uint64)})[OWNER]
            else:
                comm.exchange({}, {})
            out[name] = WeightShare(index, shape, r, stored, seed_0, seed_2)
    return out
