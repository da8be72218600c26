"""Weight products whose input mask is prepared before the input arrives: an offline/online split.

x @ W with x replicated as (x_0, x_1, x_2) and W the owner's (rank 0, see weights.py): the owner holds
x_0 + x_1 and W, ranks 1 and 2 both hold x_2. Without preparation each of ranks 1 and 2 multiplies x_2
by a random component of W online (weights.matmul_part). Here those products move to the setup:

Setup, for a mask R (rows x k) from a key of ranks 1 and 2 (k_2, which the owner lacks):
    rank 1 computes R @ (W_1 + W_2); rank 2 computes R @ W_0 and sends rank 1 R @ W_0 - M, with M from
    the key of ranks 0 and 2 (k_0, which rank 1 lacks). Rank 1 keeps Q = R @ W - M.
Online, once the input is there:
    rank 2 sends the owner x_2 - R; the owner computes P = (x_0 + x_1 + x_2 - R) @ W + M.
    P + Q = x @ W, held 2-of-2 by ranks 0 and 1, so rank 2 deals its truncation or, for an answer left
    unscaled, its reshare (arith.reshare_from_two).
The truncation (the dealer-aided one of arith.truncate_from_two, dealer 2) is prepared too where the
setup knows its shift. Q is there before the input, so rank 1 (arith's A) sends the owner its half of the
opening, c_1 = Q + 2^62 + r_1, in a second setup round, and rank 2 deals the owner (B) its shares of rc and
rb (functions of r = r_0 + r_1 and of rank 1's shares, all from keys) beside R @ W_0 - M to rank 1. Online
the owner sends rank 1 its half c_0 = P + r_0 and both finish (arith.trunc_finish_a, trunc_finish_b); the
reshare follows. r_1, rc_1, rb_1 come from the key of ranks 1 and 2, r_0 from that of ranks 0 and 2, each
on streams of its own. The owner keeps 20 bytes per output element until the walk, rank 1 Q (8).
Products that read the same input (attention's q, k and v) share one R and one message, and truncate
in one batch. A prepared mask serves one walk: `take` hands it out once.

Security: the owner sees x_2 - R, uniform since R is, c_1, uniform since r_1 is, and the dealt words,
masked by rank 1's rc_1, rb_1; rank 1 sees R @ W_0 - M, uniform since M is, its own Q and c_0, uniform
since r_0 is; c = c_0 + c_1 is uniform to both since r = r_0 + r_1 is; rank 2 receives nothing. These
are arith.truncate_from_two's views, with c_1 and the dealt words sent earlier.
Cost online: 3 rounds; bytes: 8 per input element (one R per input) from rank 2 (and 8 from rank 1 for an
input held 2-of-2 by ranks 1 and 2, `products`), then 24 per output
element over the three ranks (the owner 16: c_0 and its half of the reshare; rank 1 8: its half; 44
where the truncation is not prepared: rank 2 12, ranks 0 and 1 16 each); the only online product is the
owner's (21 byte products, `byte_limbs.digit_count`). Setup: 2 rounds (1 without a prepared truncation);
from rank 2 8 bytes per output element to rank 1 and 12 per output element of a prepared truncation to
the owner, from rank 1 8 per output element of a prepared truncation; ranks 1 and 2 each multiply R by a
random matrix (36 byte products).
Compare `weights.matmul_part` + `arith.truncate_parts`: 2 rounds, 44 bytes per output element, and
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
    shifts: dict = field(default_factory=dict)  # group -> the shift its truncation is prepared for
    c1: dict = field(default_factory=dict)  # product key -> c_1 = Q + 2^62 + r_1 (the owner only)
    dealt: dict = field(default_factory=dict)  # product key -> the owner's shares of rc and rb (the owner only)

    def covers(self, group, rows: int, k: int, keys) -> bool:
        """Whether `group` is prepared (and not yet taken) for an input of `rows` rows of width k, and for
        exactly the products `keys` (a group that the walk formed otherwise multiplies online)."""
        got = self.groups.get(group)
        return got is not None and got[0] >= rows and got[1] == k and self.members.get(group) == tuple(keys)

    def take(self, group) -> tuple[int, int, int]:
        """The group's (rows, k, stream), once: a mask reused for a second input would open x - x'."""
        return self.groups.pop(group)


# The truncation's words for product stream j, on streams of their own apart from R's and M's: r_0 under the
# key of M (ranks 0 and 2), r_1, rc_1 and rb_1 under the key of R (ranks 1 and 2); rank 2 deals the owner its
# rc_0 and rb_0.
TRUNC_STREAMS = 1 << 32


def _trunc_words(seed: bytes, stream: int, shape, which: int, dtype=np.uint64) -> np.ndarray:
    return PRG(seed, stream=TRUNC_STREAMS + 3 * stream + which).words(shape, dtype)


def prepare(party: Party, products: list[Product], rows: dict, seeds=None, shifts: dict | None = None) -> Prepared:
    """Setup for `products`: rows[group] rows of inputs for each group (see the module doc); a group's
    products read one input, so its width k is any member's `inner`. shifts[group], where given and not
    None, prepares that group's truncation by so many bits (a 1..31-bit shift).

    Rounds 1, or 2 with a prepared truncation (rank 2 to rank 1: 8 bytes per output element, and to the owner
    the dealt words, 12; then rank 1 to the owner c_1: 8 per output element of a prepared truncation); ranks 1 and 2
    multiply R by their components of W. Rank 2's components need no message, so it multiplies before the
    round, while the owner still shares the weights with rank 1. All ranks call it alike with the same
    public lists.
    """
    if len({p.key for p in products}) != len(products):
        raise ValueError("prepare: two products share a key (each needs a mask M of its own)")
    seed_r, seed_m = seeds or mask_seeds(party)
    out = Prepared(seed_r, seed_m)
    for stream, group in enumerate(dict.fromkeys(p.group for p in products)):
        k = next(p.inner for p in products if p.group == group)
        out.groups[group] = (int(rows[group]), int(k), stream)
        out.members[group] = tuple(p.key for p in products if p.group == group)
        shift = (shifts or {}).get(group)
        if shift is not None:
            if not 0 < shift <= 31:
                raise ValueError(f"prepare: a prepared truncation shifts by 1..31 bits, not {shift}")
            out.shifts[group] = int(shift)
    r, comm = party.rank, party.comm
    shapes = []
    for stream, p in enumerate(products):
        out.streams[p.key] = stream
        n = out.groups[p.group][0]
        shapes.append((n, p.width))
    total = sum(n * m for n, m in shapes)
    # Each prepared truncation's product, shape and slice of the words laid out one product after another.
    cuts, cut_total = [], 0
    for p, (n, m) in zip(products, shapes):
        if p.group in out.shifts:
            cuts.append((p, (n, m), slice(cut_total, cut_total + n * m)))
            cut_total += n * m
    mine = []
    if r != OWNER:
        for p in products:
            n, k, r_stream = out.groups[p.group]
            mine.append(ring_matmul(_mask_r(out, r_stream, (n, k)), p.right()))
    with comm.tag("prepare_products"):
        if r == SENDER:
            # R @ W_0 - M to rank 1 in one buffer built in place; the owner's dealt rc (uint64) and rb (uint32).
            masked, at = np.empty(total, U64), 0
            for p, product in zip(products, mine):
                masked[at : at + product.size] = (product - _mask_m(out, p.key, product.shape)).reshape(-1)
                at += product.size
            mine.clear()
            comm.exchange({HOLDER: masked, **({OWNER: _deal(out, cuts, cut_total)} if cuts else {})}, {})
        elif r == HOLDER:
            got = comm.exchange({}, {SENDER: ((total,), U64)})[SENDER]
            at = 0
            for i, (p, (n, m)) in enumerate(zip(products, shapes)):
                q = got[at : at + n * m].reshape(n, m)
                q += mine[i]  # in the received buffer: rank 1's products go as Q is made
                mine[i] = None
                out.q[p.key] = q
                at += n * m
        else:
            got = comm.exchange({}, {SENDER: ((12 * cut_total,), np.uint8)} if cuts else {})
            if cuts:
                words, rbs = got[SENDER][: 8 * cut_total].view(U64), got[SENDER][8 * cut_total :].view(np.uint32)
                for p, shape, at in cuts:
                    out.dealt[p.key] = (words[at].reshape(shape), rbs[at].reshape(shape))
        if cuts:
            _send_c1(party, out, cuts, cut_total)
    return out


def _deal(out: Prepared, cuts: list, cut_total: int) -> np.ndarray:
    """Rank 2's words for the owner (B of the truncation): its shares of rc and rb for every prepared truncation
    (`cuts`: product, shape, slice), against rank 1's (A's) from their key (`arith.trunc_deal`), all rc (uint64)
    then all rb (uint32)."""
    message = np.empty(12 * cut_total, np.uint8)
    words, rbs = message[: 8 * cut_total].view(U64), message[8 * cut_total :].view(np.uint32)
    for p, shape, at in cuts:
        j = out.streams[p.key]
        rc_1, rb_1 = _trunc_words(out.seed_r, j, shape, 1), _trunc_words(out.seed_r, j, shape, 2, np.uint32)
        rr = _trunc_words(out.seed_r, j, shape, 0) + _trunc_words(out.seed_m, j, shape, 0)
        rc_0, rb_0 = arith.trunc_deal(rr, rc_1, rb_1, U64(out.shifts[p.group]))
        words[at], rbs[at] = rc_0.reshape(-1), rb_0.reshape(-1)
    return message


def _send_c1(party: Party, out: Prepared, cuts: list, cut_total: int) -> None:
    """Setup's second round: rank 1 (A of the truncation) sends the owner c_1 = Q + 2^62 + r_1 for every
    product of a prepared truncation (`cuts`: product, shape, slice)."""
    r, comm = party.rank, party.comm
    if r == HOLDER:
        halves = np.empty(cut_total, U64)
        for p, _, at in cuts:
            halves[at] = _half_c1(out, p.key, out.q[p.key]).reshape(-1)
        comm.exchange({OWNER: halves}, {})
    elif r == OWNER:
        got = comm.exchange({}, {HOLDER: ((cut_total,), U64)})[HOLDER]
        for p, shape, at in cuts:
            out.c1[p.key] = got[at].reshape(shape)
    else:
        comm.exchange({}, {})


def _half_c1(out: Prepared, key, q: np.ndarray) -> np.ndarray:
    """Rank 1's half of the truncation's opening for (the first rows of) Q: Q + 2^62 + r_1."""
    return q + U64(1 << 62) + _trunc_words(out.seed_r, out.streams[key], q.shape, 0)


def _mask_r(prepared: Prepared, stream: int, shape) -> np.ndarray:
    """The first rows of a group's R (ranks 1 and 2), drawn again from its own stream."""
    return PRG(prepared.seed_r, stream=stream).words(shape)


def _mask_m(prepared: Prepared, key, shape) -> np.ndarray:
    """The first rows of product `key`'s M (ranks 0 and 2), drawn again from its own stream."""
    return PRG(prepared.seed_m, stream=prepared.streams[key]).words(shape)


def products(
    party: Party, x: AShare | arith.HeldByTwo, group, members: list[Product], prepared: Prepared, bits: int | None
):
    """x @ W for each member (all of `group`, which reads x), from the prepared masks: a list of replicated
    shares truncated by `bits`, or, with bits None, reshared at their untruncated scale (an answer the
    client rescales). Rounds 3 (2 with bits None); bytes as in the module doc (the prepared truncation's
    where the setup prepared it for `bits`).
    x may also be held 2-of-2 by ranks 1 and 2 (`arith.HeldByTwo` with the owner as its dealer: a
    truncation's answer before its reshare). Then rank 2 sends the owner x_B - R + m and rank 1 x_A - m,
    m from their key k_2 (which the owner lacks): the owner gets x - R as before, each word masked by a key
    it lacks, and the truncation's reshare is saved: 8 B per input element from rank 1 instead of 16 from
    ranks 1 and 2 and a round."""
    r, comm = party.rank, party.comm
    lead, k = x.shape[:-1], x.shape[-1]
    n = int(np.prod(lead, dtype=np.int64))
    held = isinstance(x, arith.HeldByTwo)
    if held and x.dealer != OWNER:
        raise ValueError(f"prepared products take a 2-of-2 input held by ranks 1 and 2, not dealt by {x.dealer}")
    _, _, r_stream = prepared.take(group)
    widths = [m.width for m in members]
    total = n * sum(widths)
    ready = bits is not None and prepared.shifts.get(group) == bits
    with comm.tag("masked_products"):
        parts = None
        if r == SENDER:
            mine = x.part.reshape(n, k) + party.prg_prev.words((n, k)) if held else x.first.reshape(n, k)
            comm.exchange({OWNER: mine - _mask_r(prepared, r_stream, (n, k))}, {})
        elif r == OWNER:
            if held:
                got = comm.exchange({}, {SENDER: ((n, k), U64), HOLDER: ((n, k), U64)})
                left = got[SENDER] + got[HOLDER]
            else:
                got = comm.exchange({}, {SENDER: ((n, k), U64)})[SENDER]
                left = (x.first + x.second).reshape(n, k) + got
            parts = [
                ring_matmul(left, m.right(), OWNER_THREADS) + _mask_m(prepared, m.key, (n, w))
                for m, w in zip(members, widths)
            ]
        else:
            if held:
                comm.exchange({OWNER: x.part.reshape(n, k) - party.prg_next.words((n, k))}, {})
            else:
                comm.exchange({}, {})
            parts = [prepared.q.pop(m.key)[:n] for m in members]
        if ready:
            share = _truncate_prepared(party, prepared, members, n, parts, bits)
        else:
            flat = None if parts is None else np.concatenate([p.reshape(-1) for p in parts])
            if bits is None:
                share = arith.reshare_from_two(party, SENDER, flat, (total,))
            else:
                share = arith.truncate_from_two(party, SENDER, flat, bits, (total,))
    for m in members:  # whatever path ran, the prepared words are used up
        prepared.c1.pop(m.key, None)
        prepared.dealt.pop(m.key, None)
    out, at = [], 0
    for w in widths:
        piece = AShare(share.first[at : at + n * w], share.second[at : at + n * w])
        out.append(piece.reshape(lead + (w,)))
        at += n * w
    return out


def _truncate_prepared(party: Party, prepared: Prepared, members, n: int, parts, bits: int) -> AShare:
    """floor(z / 2^bits) (+1) for z = P + Q (the owner's P and rank 1's Q, per member in `parts`), with c_1 and
    the dealt words from the setup: the owner sends rank 1 c_0 = P + r_0, both finish (rank 1 as arith's A, the
    owner as B), then the reshare (2 rounds)."""
    r, comm = party.rank, party.comm
    total, d = sum(m.width for m in members) * n, U64(bits)

    def joined(arrays):
        return np.concatenate([a.reshape(-1) for a in arrays])

    def words(which: int, dtype=U64):  # rank 1's r_1, rc_1 and rb_1 words of the first n rows
        return joined(_trunc_words(prepared.seed_r, prepared.streams[m.key], (n, m.width), which, dtype) for m in members)

    y = None
    with comm.tag("truncate_prepared"):
        if r == OWNER:
            streams = [prepared.streams[m.key] for m in members]
            c_0 = joined(p + _trunc_words(prepared.seed_m, j, p.shape, 0) for p, j in zip(parts, streams))
            comm.exchange({HOLDER: c_0}, {})
            c_1 = joined(prepared.c1[m.key][:n] for m in members)
            rc_0, rb_0 = (joined(prepared.dealt[m.key][i][:n] for m in members) for i in (0, 1))
            y = arith.trunc_finish_b(c_0 + c_1, rc_0, rb_0, d)
        elif r == HOLDER:
            c_0 = comm.exchange({}, {OWNER: ((total,), U64)})[OWNER]
            c_1 = joined(_half_c1(prepared, m.key, q) for m, q in zip(members, parts))
            y = arith.trunc_finish_a(c_0 + c_1, words(1), words(2, np.uint32), d)
        else:
            comm.exchange({}, {})
        return arith.reshare_from_two(party, SENDER, y, (total,))
