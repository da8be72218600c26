"""The model owner's weights as replicated shares that two ranks can regenerate instead of storing.

Sharing (owner o = 0, like `arith.share`): x_0 comes from a key the owner shares
with rank 2, x_2 from a key common to all ranks, and the owner sends
x_1 = W - x_0 - x_2 to rank 1. Unlike `arith.share`, each weight draws its PRG
words from its own AES-CTR stream (nonce = the weight's index), so x_0 and x_2
can be drawn again at any time. Rank 1 keeps x_1 (8 bytes per weight), the
owner keeps its float32 weights (4 bytes) and recomputes x_1 = W - x_0 - x_2,
rank 2 keeps nothing: 12 bytes per weight over the three ranks instead of 48
for stored shares. Each use pays one AES pass per regenerated component (GB/s
with AES-NI) and, on the owner, one encoding.

Security is that of `arith.share`: rank 1 sees x_1, masked by x_0 whose key it
lacks; rank 2 sees x_0 and x_2, both independent of W.
Cost: 1 round per weight, 8 bytes per weight from the owner, once.

Products with a weight (`matmul_part`) use that the owner knows W: with x shared
as (x_0, x_1, x_2), x W = (x_0 + x_1) W + x_2 (W_1 + W_2) + x_2 W_0, one ring
matmul per rank (rank 0 the first term, rank 1 the second, rank 2 the third)
instead of the two of a product of two shares: half the work, no extra bytes.
The three additive parts then go through the truncation, which masks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .comm import PARTIES
from .party import Party
from .prg import PRG, SEED_BYTES
from .ring import FixedPoint, ring_matmul
from .shares import AShare

OWNER = 0


# The owner rebuilds x_1 in pieces of this many words, so a 50257 x 768 table needs
# no full-size temporaries beyond the share itself.
CHUNK = 1 << 20


def _stream(seed: bytes, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The first words of weight `index`'s own stream under `seed`."""
    return PRG(seed, stream=index).words(shape)


def _encode_minus_streams(
    fxp: FixedPoint, plain: np.ndarray, seeds: list[bytes], index: int, checked: bool = False
) -> np.ndarray:
    """encode(plain) - stream(seed_1) - stream(seed_2) - ..., built CHUNK words at a time; `checked` skips
    the range test (the weight was encoded once already, when it was shared)."""
    flat = plain.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint64)
    streams = [PRG(seed, stream=index) for seed in seeds]
    for lo in range(0, flat.size, CHUNK):
        piece = out[lo : lo + CHUNK]
        piece[...] = fxp.encode(flat[lo : lo + CHUNK], checked=checked)
        for prg in streams:
            piece -= prg.words(piece.size)
    return out.reshape(plain.shape)


@dataclass
class WeightShare:
    """One rank's share of one weight: what it keeps, and seeds for the regenerable components.

    With `resident` set (`keep_resident`), the share and the matmul operand, once computed, are kept
    for later uses: a generation step reuses every weight, and regenerating them per step costs more
    than the step's own products (16 more bytes per weight and rank).
    """

    index: int
    shape: tuple[int, ...]
    rank: int
    kept: np.ndarray | None  # the float weights on the owner, x_1 on rank 1, None on rank 2
    seed_0: bytes | None  # key of x_0 (ranks 0 and 2)
    seed_2: bytes  # key of x_2 (all ranks)
    fxp: FixedPoint
    resident: bool = False
    transposed: bool = False  # a 2-D weight read through a Transpose: W^T, from the same components
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def value_shape(self) -> tuple[int, ...]:
        """The shape of the value this share stands for (`shape` is the stored weight's)."""
        return tuple(reversed(self.shape)) if self.transposed else self.shape

    def transpose(self) -> WeightShare:
        """W^T, lazily: the same components (and cache), read transposed."""
        if len(self.shape) != 2:
            raise ValueError(f"only a 2-D weight transposes lazily, got shape {self.shape}")
        return replace(self, transposed=not self.transposed, _cache=self._cache)

    def _x0(self) -> np.ndarray:
        return _stream(self.seed_0, self.index, self.shape)

    def _x2(self) -> np.ndarray:
        return _stream(self.seed_2, self.index, self.shape)

    def _kept(self, key: str, make):
        if not self.resident:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def materialize(self) -> AShare:
        share = self._kept("share", self._materialize)
        return share.transpose() if self.transposed else share

    def _materialize(self) -> AShare:
        if self.rank == OWNER:
            x1 = _encode_minus_streams(self.fxp, self.kept, [self.seed_0, self.seed_2], self.index, checked=True)
            return AShare(self._x0(), x1)
        if self.rank == 1:
            return AShare(self.kept, self._x2())
        return AShare(self._x2(), self._x0())

    def operand(self) -> np.ndarray:
        """This rank's right operand of `matmul_part`: W on the owner, x_1 + x_2 on rank 1, x_0 on rank 2."""
        return self._kept("operand", self._operand)

    def _operand(self) -> np.ndarray:
        if self.rank == OWNER:  # checked when it was shared
            return self.fxp.encode(self.kept, checked=True)
        if self.rank == 1:
            return self.kept + self._x2()
        return self._x0()


# Weights kept resident for generation while they take at most this many bytes per rank (GPT-2 base and
# SmolLM2-135M: about 2 GB; larger models regenerate their components per step, as one pass does).
RESIDENT_BYTES = 4 << 30


def keep_resident(weights: dict[str, WeightShare], budget: int = RESIDENT_BYTES) -> bool:
    """Mark every weight resident when its kept forms fit the budget, counted at 24 bytes per weight (a
    weight is read as a share, 16 bytes, or as a matmul operand, 8, a tied embedding as both); all ranks
    decide alike from the public shapes. Returns whether they were marked."""
    total = 24 * sum(int(np.prod(w.shape)) for w in weights.values())
    if total > budget:
        return False
    for w in weights.values():
        w.resident = True
    return True


def matmul_part(x: AShare, w: WeightShare, transpose: bool = False) -> np.ndarray:
    """This rank's additive part of x @ W (x @ W^T with transpose), in the ring; see the module doc."""
    left = x.first + x.second if w.rank == OWNER else (x.second if w.rank == 1 else x.first)
    right = w.operand()
    return ring_matmul(left, right.T if transpose != w.transposed else right)


def weight_seeds(party: Party) -> tuple[bytes | None, bytes]:
    """Fresh weight keys from the setup keys: (k for x_0 on ranks 0 and 2, common k for x_2)."""
    seed_2 = party.prg_all.words(SEED_BYTES, np.uint8).tobytes()
    if party.rank == OWNER:
        return party.prg_prev.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    if party.rank == (OWNER - 1) % PARTIES:
        return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    return None, seed_2


def share_weights(party: Party, manifest: list, values) -> dict[str, WeightShare]:
    """Share each (name, shape) of the manifest; `values(name)` gives the owner its float array."""
    seed_0, seed_2 = weight_seeds(party)
    comm, r = party.comm, party.rank
    out = {}
    with comm.tag("share_weights"):
        for index, (name, shape) in enumerate(manifest):
            shape = tuple(shape)
            kept = None
            if r == OWNER:
                kept = np.asarray(values(name), dtype=np.float32)
                comm.exchange({1: _encode_minus_streams(party.fxp, kept, [seed_0, seed_2], index)}, {})
            elif r == 1:
                kept = comm.exchange({}, {OWNER: (shape, np.uint64)})[OWNER]
            else:
                comm.exchange({}, {})
            out[name] = WeightShare(index, shape, r, kept, seed_0, seed_2, party.fxp)
    return out
