"""Weight products whose input mask is prepared before the input arrives: an offline/online split.

x @ W with x replicated as (x_0, x_1, x_2) and W the owner's (rank 0, see weights.py): the owner holds
x_0 + x_1 and W, ranks 1 and 2 both hold x_2. Without preparation each of ranks 1 and 2 multiplies x_2
by a random component of W online (weights.matmul_part). Here those products move to the setup:

Setup, for a mask R (rows x k) from a key of ranks 1 and 2 (k_2, which the owner lacks):
    rank 1 computes R @ (W_1 + W_2); rank 2 computes R @ W_0 and sends rank 1 R @ W_0 - M, with M from
    the key of ranks 0 and 2 (k_0, which rank 1 lacks). Rank 1 keeps Q = R @ W - M.
Online, once the input is there:
    rank 2 sends the owner x_2 - R; the owner computes P = (x_0 + x_1 + x_2 - R) @ W + M.
    P + Q = x @ W, held 2-of-2 by ranks 0 and 1, so rank 2 deals its truncation (arith.truncate_from_two,
    dealer 2) or, for an answer left unscaled, its reshare (arith.reshare_from_two).
Products that read the same input (attention's q, k and v) share one R and one message, and truncate
in one batch. A prepared mask serves one walk: `take` hands it out once.

Security: the owner sees x_2 - R, uniform since R is; rank 1 sees R @ W_0 - M, uniform since M is, and
its own Q; rank 2 receives nothing. The truncation's views are those of `arith.truncate_from_two`.
Cost online: 3 rounds; bytes: 8 per input element (one R per input) from rank 2, then 44 per output
element over the three ranks (rank 2 12, ranks 0 and 1 16 each); the only online product is the
owner's (21 byte products, `byte_limbs.digit_count`). Setup: 8 bytes per output element from rank 2,
in one round, and ranks 1 and 2 each multiply R by a random matrix (36 byte products).
Compare `weights.matmul_part` + `arith.truncate_parts`: 2 rounds, 60 bytes per output element, and
three products online. (The correlated-randomness split of SPDZ-style preprocessing; the
dealer-aided truncation is Escudero et al. 2020, section 4.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from . import arith
from .party import Party
from .prg import PRG, SEED_BYTES
from .ring import ring_matmul
from .shares import AShare
from .weights import OWNER, WeightShare

SENDER = 2  # rank 2 sends x_2 - R and deals the truncation; ranks 0 (A) and 1 (B) hold the product
HOLDER = 1  # the rank that keeps Q = R @ W - M
U64 = np.uint64
# The owner's online product runs while ranks 1 and 2 wait: it may take the cores of all three.
OWNER_THREADS = min(os.cpu_count() or 1, 3)


def mask_seeds(party: Party) -> tuple[bytes | None, bytes | None]:
    """Fresh keys for one preparation: (seed of R, ranks 1 and 2; seed of M, ranks 0 and 2), None where
    this rank is not told. Rank 1's k_{2} is its prg_next, rank 2's its prg_prev; k_0 is rank 0's prg_prev
    and rank 2's prg_next."""
    if party.rank == OWNER:
        return None, party.prg_prev.words(SEED_BYTES, np.uint8).tobytes()
    if party.rank == HOLDER:
        return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), None
    seed_r = party.prg_prev.words(SEED_BYTES, np.uint8).tobytes()
    return seed_r, party.prg_next.words(SEED_BYTES, np.uint8).tobytes()


@dataclass(frozen=True)
class Product:
    """One weight product to prepare: its key (a node), the group whose input it reads, x @ W or x @ W^T."""

    key: object
    group: object
    weight: WeightShare
    transpose: bool = False

    @property
    def inner(self) -> int:
        """k: the width of the input x it multiplies."""
        shape = self.weight.value_shape
        return shape[-1] if self.transpose else shape[0]

    @property
    def width(self) -> int:
        """The width of x @ W (x @ W^T)."""
        shape = self.weight.value_shape
        return shape[0] if self.transpose else shape[-1]

    def right(self) -> np.ndarray:
        """This rank's right operand (weights.matmul_part's): W, W_1 + W_2 or W_0, transposed as asked."""
        op = self.weight.operand()
        return op.T if self.transpose != self.weight.transposed else op


@dataclass
class Prepared:
    """One rank's prepared masks: per group, its rows, input width and stream; per product, rank 1's Q."""

    seed_r: bytes | None
    seed_m: bytes | None
    groups: dict = field(default_factory=dict)  # group -> (rows, k, stream of R)
    members: dict = field(default_factory=dict)  # group -> its products' keys, in order
    streams: dict = field(default_factory=dict)  # product key -> stream of M
    q: dict = field(default_factory=dict)  # product key -> Q (rank 1 only)

    def covers(self, group, rows: int, k: int, keys) -> bool:
        """Whether `group` is prepared (and not yet taken) for an input of `rows` rows of width k, and for
        exactly the products `keys` (a group that the walk formed otherwise multiplies online)."""
        got = self.groups.get(group)
        return got is not None and got[0] >= rows and got[1] == k and self.members.get(group) == tuple(keys)

    def take(self, group) -> tuple[int, int, int]:
        """The group's (rows, k, stream), once: a mask reused for a second input would open x - x'."""
        return self.groups.pop(group)


def prepare(party: Party, products: list[Product], rows: dict, seeds=None) -> Prepared:
    """Setup for `products`: rows[group] rows of inputs for each group (see the module doc); a group's
    products read one input, so its width k is any member's `inner`.

    One round (rank 2 to rank 1, 8 bytes per output element, one message); ranks 1 and 2 multiply R by
    their components of W. Rank 2's components need no message, so it multiplies before the round, while
    the owner still shares the weights with rank 1. All ranks call it alike with the same public lists.
    """
    if len({p.key for p in products}) != len(products):
        raise ValueError("prepare: two products share a key (each needs a mask M of its own)")
    seed_r, seed_m = seeds or mask_seeds(party)
    out = Prepared(seed_r, seed_m)
    for stream, group in enumerate(dict.fromkeys(p.group for p in products)):
        k = next(p.inner for p in products if p.group == group)
        out.groups[group] = (int(rows[group]), int(k), stream)
        out.members[group] = tuple(p.key for p in products if p.group == group)
    r, comm = party.rank, party.comm
    shapes = []
    for stream, p in enumerate(products):
        out.streams[p.key] = stream
        n = out.groups[p.group][0]
        shapes.append((n, p.width))
    mine = []
    if r != OWNER:
        for p in products:
            n, k, r_stream = out.groups[p.group]
            product = ring_matmul(_mask_r(out, r_stream, (n, k)), p.right())
            mine.append(product if r == HOLDER else product - _mask_m(out, p.key, product.shape))
    total = sum(n * m for n, m in shapes)
    with comm.tag("prepare_products"):
        if r == SENDER:
            comm.exchange({HOLDER: np.concatenate([m.reshape(-1) for m in mine]) if mine else np.zeros(0, U64)}, {})
        elif r == HOLDER:
            got = comm.exchange({}, {SENDER: ((total,), U64)})[SENDER]
            at = 0
            for p, product, (n, m) in zip(products, mine, shapes):
                product += got[at : at + n * m].reshape(n, m)  # in place: the peak is twice Q, not three times
                out.q[p.key] = product
                at += n * m
        else:
            comm.exchange({}, {})
    return out


def _mask_r(prepared: Prepared, stream: int, shape) -> np.ndarray:
    """The first rows of a group's R (ranks 1 and 2), drawn again from its own stream."""
    return PRG(prepared.seed_r, stream=stream).words(shape)


def _mask_m(prepared: Prepared, key, shape) -> np.ndarray:
    """The first rows of product `key`'s M (ranks 0 and 2), drawn again from its own stream."""
    return PRG(prepared.seed_m, stream=prepared.streams[key]).words(shape)


def products(party: Party, x: AShare, group, members: list[Product], prepared: Prepared, bits: int | None):
    """x @ W for each member (all of `group`, which reads x), from the prepared masks: a list of replicated
    shares truncated by `bits`, or, with bits None, reshared at their untruncated scale (an answer the
    client rescales). Rounds 3 (2 with bits None); bytes as in the module doc."""
    r, comm = party.rank, party.comm
    lead, k = x.shape[:-1], x.shape[-1]
    n = int(np.prod(lead, dtype=np.int64))
    _, _, r_stream = prepared.take(group)
    widths = [m.width for m in members]
    with comm.tag("masked_products"):
        parts = None
        if r == SENDER:
            masked = x.first.reshape(n, k) - _mask_r(prepared, r_stream, (n, k))
            comm.exchange({OWNER: masked}, {})
        elif r == OWNER:
            got = comm.exchange({}, {SENDER: ((n, k), U64)})[SENDER]
            left = (x.first + x.second).reshape(n, k) + got
            parts = [
                ring_matmul(left, m.right(), OWNER_THREADS) + _mask_m(prepared, m.key, (n, w))
                for m, w in zip(members, widths)
            ]
        else:
            comm.exchange({}, {})
            parts = [prepared.q.pop(m.key)[:n] for m in members]
        flat = None if parts is None else np.concatenate([p.reshape(-1) for p in parts])
        total = n * sum(widths)
        if bits is None:
            share = arith.reshare_from_two(party, SENDER, flat, (total,))
        else:
            share = arith.truncate_from_two(party, SENDER, flat, bits, (total,))
    out, at = [], 0
    for w in widths:
        piece = AShare(share.first[at : at + n * w], share.second[at : at + n * w])
        out.append(piece.reshape(lead + (w,)))
        at += n * w
    return out
