"""Arithmetic protocols on replicated shares over Z_2^64.

Costs are per element of the output and per rank, as counted by the communicator
(a round is one `exchange`). Multiplications and truncations accept a list of
operands as well as a single one: a list goes out in one batch (same rounds, summed
bytes), so independent work shares its rounds.

Papers: Araki, Furukawa, Lindell, Nof, Ohara, "High-throughput semi-honest secure
three-party computation with an honest majority" (CCS 2016) for sharing, reveal and
multiplication; Mohassel, Rindal, "ABY3" (CCS 2018) section 5 for fixed point;
Escudero, Ghosh, Keller, Rachuri, Scholl, "Improved primitives for MPC over mixed
arithmetic-binary circuits" (CRYPTO 2020) section 4 for the truncation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .comm import PARTIES
from .party import Party
from .ring import ring_matmul
from .shares import AShare

U64 = np.uint64


def _ring(c) -> np.ndarray:
    """Public integers as ring elements (negative ones wrap)."""
    c = np.asarray(c)
    if c.dtype == np.uint64:
        return c
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"ring constants must be integers, got dtype {c.dtype}; use the *_fx variant for reals")
    return c.astype(np.int64).view(np.uint64)


def _listed(x):
    """(list, was_a_list) so that every protocol handles one operand or a batch alike."""
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def _unlisted(out: list, was_list: bool):
    return out if was_list else out[0]


def _flat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(p) for p in parts]) if len(parts) > 1 else np.ravel(parts[0])


def _unflat(flat: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(flat[at : at + n].reshape(s))
        at += n
    return out


# ----------------------------------------------------------------------------- input and output


def share(party: Party, value: np.ndarray | None, owner: int, shape=None) -> AShare:
    """Secret-share the owner's ring array; the others pass None and the (public) shape.

    Idea: x_o comes from k_o (owner and rank o-1), x_{o+2} from the common key, and the
    owner sends x_{o+1} = x - x_o - x_{o+2} to rank o+1; x_o hides x from rank o+1.
    Rounds 1; bytes/elem: 8 from the owner, 0 from the others. Araki et al. 2016, 2.2.
    """
    comm, r = party.comm, party.rank
    if r == owner:
        value = _ring(value)
        shape = value.shape
    shape = tuple(shape)
    with comm.tag("share"):
        if r == owner:
            x_o = party.prg_prev.words(shape)
            x_o2 = party.prg_all.words(shape)
            x_o1 = value - x_o - x_o2
            comm.exchange({(owner + 1) % PARTIES: x_o1}, {})
            return AShare(x_o, x_o1)
        if r == (owner + 1) % PARTIES:
            x_o2 = party.prg_all.words(shape)
            got = comm.exchange({}, {owner: (shape, U64)})
            return AShare(got[owner], x_o2)
        x_o2 = party.prg_all.words(shape)
        x_o = party.prg_next.words(shape)
        comm.exchange({}, {})
        return AShare(x_o2, x_o)


def reveal(party: Party, x: AShare, to: int | None = None) -> np.ndarray | None:
    """Open x to rank `to` (None: to all); returns the ring array there and None elsewhere.

    Idea: the receiver i misses only x_{i+2}, which rank i+1 holds as its second component.
    Rounds 1; bytes/elem: 8 per receiver, sent by the rank after it. Araki et al. 2016, 2.2.
    """
    comm, r = party.comm, party.rank
    receivers = range(PARTIES) if to is None else [to]
    with comm.tag("reveal"):
        sends = {party.prev: x.second} if party.prev in receivers else {}
        recvs = {party.next: (x.shape, U64)} if r in receivers else {}
        got = comm.exchange(sends, recvs)
    if r not in receivers:
        return None
    return x.first + x.second + got[party.next]


# ----------------------------------------------------------------------------- local operations
# Linear maps act on each share component: 0 rounds, 0 bytes (Araki et al. 2016, 2.2).


def add(x: AShare, y: AShare) -> AShare:
    return AShare(x.first + y.first, x.second + y.second)


def sub(x: AShare, y: AShare) -> AShare:
    return AShare(x.first - y.first, x.second - y.second)


def neg(x: AShare) -> AShare:
    return AShare(-x.first, -x.second)


def add_public(party: Party, x: AShare, c) -> AShare:
    """x + c for a public ring array c (broadcasting): c joins x_0, held by ranks 0 and 2."""
    c = _ring(c)
    shape = np.broadcast_shapes(x.shape, c.shape)
    first, second = np.broadcast_to(x.first, shape), np.broadcast_to(x.second, shape)
    if party.rank == 0:
        first = first + c
    elif party.rank == PARTIES - 1:
        second = second + c
    return AShare(first, second)


def mul_public(x: AShare, c) -> AShare:
    """x * c for a public ring integer array c (broadcasting), no truncation."""
    c = _ring(c)
    return AShare(x.first * c, x.second * c)


# ----------------------------------------------------------------------------- products


def _reshare(party: Party, parts: list[np.ndarray]) -> list[AShare]:
    """Additive parts z_i (sum = z) to a replicated share of z, re-randomised.

    Rank i sends z_i + alpha_i to rank i-1 (alpha a fresh zero-sharing); 1 round, 8 B/elem.
    """
    z = _flat(parts)
    z = z + party.zero_share(z.shape)
    got = party.comm.exchange({party.prev: z}, {party.next: (z.shape, U64)})
    shapes = [p.shape for p in parts]
    return [AShare(a, b) for a, b in zip(_unflat(z, shapes), _unflat(got[party.next], shapes))]


def reshare_parts(party: Party, parts: list[np.ndarray]) -> list[AShare]:
    """This rank's additive parts of each z (sum over the ranks = z) as replicated shares, re-randomised.
    Rounds 1; bytes/elem 8 (`_reshare`)."""
    with party.comm.tag("reshare_parts"):
        return _reshare(party, parts)


def _mul_parts(x: AShare, y: AShare) -> np.ndarray:
    # x_i y_i + x_i y_{i+1} + x_{i+1} y_i in two products.
    return x.first * (y.first + y.second) + x.second * y.first


def mul_local(x: AShare, y: AShare) -> np.ndarray:
    """This rank's additive part of x * y (no message; broadcasting): what a truncation or `chain.products` takes."""
    return _mul_parts(x, y)


def matmul_local(x: AShare, y: AShare) -> np.ndarray:
    """This rank's additive part of x @ y (no message); `reshare_parts` makes a share of the parts."""
    return _matmul_parts(x, y)


def _matmul_parts(x: AShare, y: AShare) -> np.ndarray:
    # The two products of the three-term sum in one ring matmul over a doubled inner dimension.
    if x.ndim < 2 or y.ndim < 2:
        raise ValueError(f"matmul of shares needs operands with at least 2 dims, got {x.shape} @ {y.shape}")
    shape = np.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    left = np.concatenate(
        [np.broadcast_to(x.first, shape + x.shape[-2:]), np.broadcast_to(x.second, shape + x.shape[-2:])], axis=-1
    )
    right = np.concatenate(
        [np.broadcast_to(y.first + y.second, shape + y.shape[-2:]), np.broadcast_to(y.first, shape + y.shape[-2:])],
        axis=-2,
    )
    return ring_matmul(left, right)


def mul(party: Party, x, y):
    """Ring product x * y (broadcasting); x, y may be lists of equal length (one batch).

    Idea: rank i computes x_i y_i + x_i y_{i+1} + x_{i+1} y_i, adds a fresh zero-sharing
    and sends it to rank i-1. Rounds 1; bytes/elem 8. Araki et al. 2016, section 2.2.
    """
    xs, was_list = _listed(x)
    ys, _ = _listed(y)
    with party.comm.tag("mul"):
        return _unlisted(_reshare(party, [_mul_parts(a, b) for a, b in zip(xs, ys, strict=True)]), was_list)


def matmul(party: Party, x, y):
    """Ring matrix product x @ y (np.matmul broadcasting over leading dims); lists batch.

    Idea: the three-term product as [x_i, x_{i+1}] @ [[y_i + y_{i+1}], [y_i]], one exact
    ring matmul, then a re-randomised reshare. Rounds 1; bytes per output elem 8. Araki et al. 2016.
    """
    xs, was_list = _listed(x)
    ys, _ = _listed(y)
    with party.comm.tag("matmul"):
        return _unlisted(_reshare(party, [_matmul_parts(a, b) for a, b in zip(xs, ys, strict=True)]), was_list)


# ----------------------------------------------------------------------------- truncation

_LOW63 = U64((1 << 63) - 1)


def _pack(*arrays: np.ndarray) -> np.ndarray:
    # Several arrays for one peer in one round travel as one byte message.
    return np.concatenate([a.view(np.uint8).ravel() for a in arrays])


def reshare_from_two(party: Party, dealer: int, part: np.ndarray | None, shape) -> AShare:
    """A value held 2-of-2 additively by A = dealer+1 and B = dealer+2, as a replicated share.

    Idea: x_D = m_BD and x_A = m_AD are PRG words the dealer shares with B and A; A and B
    swap part - mask, so both learn x_B = y - m_AD - m_BD, and each sees the other's part
    masked by a word it lacks. The dealer passes part=None.
    Rounds 1; bytes/elem 8 from A and B, 0 from the dealer. (As the second round of
    Escudero et al. 2020's dealer-aided truncation.)
    """
    comm, r = party.comm, party.rank
    shape = tuple(shape)
    a_rank, b_rank = (dealer + 1) % PARTIES, (dealer + 2) % PARTIES
    if r == dealer:
        m_a, m_b = party.prg_next.words(shape), party.prg_prev.words(shape)
        comm.exchange({}, {})
        return AShare(m_b, m_a)
    if r == a_rank:
        m_a = party.prg_prev.words(shape)
        w = part - m_a
        got = comm.exchange({b_rank: w}, {b_rank: (shape, U64)})
        return AShare(m_a, w + got[b_rank])
    m_b = party.prg_next.words(shape)
    w = part - m_b
    got = comm.exchange({a_rank: w}, {a_rank: (shape, U64)})
    return AShare(w + got[a_rank], m_b)


@dataclass
class HeldByTwo:
    """A secret held 2-of-2 additively by A = dealer+1 and B = dealer+2 (`part`: this rank's, None on the
    dealer): a truncation's answer before its reshare. `reshare` makes the replicated share (1 round, 8 B
    per element from A and from B); a consumer that needs less can take the parts as they are
    (`prepared.products`: the owner's masked input, when the dealer is the owner)."""

    dealer: int
    part: np.ndarray | None
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def reshare(self, party: Party) -> AShare:
        return reshare_from_two(party, self.dealer, self.part, (self.size,)).reshape(self.shape)

    def plus(self, party: Party, x: AShare) -> HeldByTwo:
        """self + x for a replicated x, free: A and B already hold x 2-of-2 (`two_parts`)."""
        if self.part is None:
            return self
        return HeldByTwo(self.dealer, self.part + two_parts(party, [x.broadcast_to(self.shape)], self.dealer), self.shape)


def _part_bits(bits, sizes: list[int]):
    """(shift, widest): the truncation amount as one U64, or per element when `bits` lists one per part."""
    per_part = list(bits) if isinstance(bits, (list, tuple)) else [bits] * len(sizes)
    if len(per_part) != len(sizes):
        raise ValueError(f"truncation: {len(per_part)} bit counts for {len(sizes)} operands")
    for b in per_part:
        if not 0 < b <= 62:
            raise ValueError(f"truncation by {b} bits: allowed 1..62")
    if len(set(per_part)) == 1:
        return U64(per_part[0]), per_part[0]
    return np.repeat(np.array(per_part, dtype=U64), sizes), max(per_part)


def _trunc_parts(party: Party, parts: list[np.ndarray], bits) -> list[AShare]:
    """Additive parts z_i of z (|z| < 2^62) to a replicated share of floor(z / 2^bits) + {0, 1}.
    `bits` is one int, or one per part (a batch of truncations by different amounts).

    `_truncate_two` with a rotating dealer D (`party.next_dealer`) that passes its own part z_D:
    it folds z_D into the mask (r = r_A + r_B - z_D), so it sends no part of the opening.
    Cost: 2 rounds; bytes/elem: dealer 12 (16 beyond 31 bits), A and B 16 each (44 over the three
    ranks, 14.7 per rank on average as the dealer rotates; 60 when the dealer sent its part
    z_D + r_D to both). Escudero et al. 2020, section 4 (TruncPr with the MSB trick).
    """
    shapes = [p.shape for p in parts]
    z = _flat(parts)
    flat = _truncate_two(party, party.next_dealer(), z, _part_bits(bits, [p.size for p in parts]), (z.size,))
    return [AShare(s, t) for s, t in zip(_unflat(flat.first, shapes), _unflat(flat.second, shapes))]


def _truncate_two(
    party: Party, dealer: int, part: np.ndarray | None, bits: tuple, shape, addend=None, held: bool = False
) -> AShare | HeldByTwo:
    """floor(z / 2^d) + {0, 1} (+ addend, untruncated) as a replicated share, for z = z_D + z_A + z_B held
    additively by a dealer D and A = D+1, B = D+2 (|z| < 2^62); `part` is this rank's z_i (None: z_D = 0).
    `bits` is `_part_bits`' (shift, widest).

    With r = r_A + r_B - z_D (r_A from k_A, which D and A hold, r_B from k_B, D and B), A and B
    swap c_A = z_A + 2^62 + r_A and c_B = z_B + r_B and both learn c = z + 2^62 + r; D alone knows r
    and deals B its shares of rc = (r mod 2^63) >> d and rb = msb(r) (A's shares are words of k_A).
    Since z + 2^62 + (r mod 2^63) < 2^64, its top bit is e = msb(c) xor rb, and
        y = (c mod 2^63) >> d - rc + 2^(63-d) e - 2^(62-d)
    equals floor(z / 2^d) or that + 1 (the borrow of the two floors): the error is below
    one unit of the last place for every |z| < 2^62, with no catastrophic failure; it is +1
    with probability about frac(z / 2^d). e = c_msb + rb - 2 c_msb rb is linear in rb
    because c is public to A and B, and only rb mod 2^(d+1) matters, so its share is a uint32
    up to d = 31. `addend` (another 2-of-2 value at A and B) joins y, free. Round 2 turns
    y_A + y_B into a replicated share (`reshare_from_two`); with `held`, y stays 2-of-2 (`HeldByTwo`, 1 round
    and 16 B per element less).
    Security: c is uniform to A because r_B is, to B because r_A is, whatever z_D is (D's part
    only shifts the mask, and D knows the shift); the dealt words reach B masked by k_A words it
    lacks; D receives nothing.
    Rounds 2; bytes/elem: dealer 12 (16 beyond 31 bits), A and B 16 each (44 over the three
    ranks). Escudero et al. 2020, section 4, with the dealer's part folded into its mask.
    """
    d, widest = bits
    comm, r = party.comm, party.rank
    shape = tuple(shape)
    n = int(np.prod(shape))
    rb_dtype = rb_type(widest)
    a_rank, b_rank = (dealer + 1) % PARTIES, (dealer + 2) % PARTIES
    if r == dealer:
        with_a, with_b = party.prg_next, party.prg_prev
        r_a, rc_a, rb_a = with_a.words(n), with_a.words(n), with_a.words(n, rb_dtype)
        mask = r_a + with_b.words(n)
        if part is not None:
            mask = mask - np.ravel(part)
        rc_b, rb_b = trunc_deal(mask, rc_a, rb_a, d)
        comm.exchange({b_rank: _pack(rc_b, rb_b)}, {})
        y = None
    elif r == a_rank:
        with_d = party.prg_prev
        r_a, rc_a, rb_a = with_d.words(n), with_d.words(n), with_d.words(n, rb_dtype)
        # The offset makes z + 2^62 non-negative for |z| < 2^62; A adds it and removes it in trunc_finish_a.
        c_a = np.ravel(part) + U64(1 << 62) + r_a
        got = comm.exchange({b_rank: c_a}, {b_rank: ((n,), U64)})
        y = trunc_finish_a(c_a + got[b_rank], rc_a, rb_a, d)
    else:
        c_b = np.ravel(part) + party.prg_next.words(n)
        rb_bytes = np.dtype(rb_dtype).itemsize
        got = comm.exchange({a_rank: c_b}, {a_rank: ((n,), U64), dealer: ((n * (8 + rb_bytes),), np.uint8)})
        dealt = got[dealer]
        y = trunc_finish_b(got[a_rank] + c_b, dealt[: 8 * n].view(U64), dealt[8 * n :].view(rb_dtype), d)
    if y is not None and addend is not None:
        y = y + np.ravel(addend)
    out = HeldByTwo(dealer, y, shape)
    return out if held else out.reshare(party)


def truncate_from_two(
    party: Party, dealer: int, part: np.ndarray | None, bits, shape, addend=None, held: bool = False
) -> AShare | HeldByTwo:
    """floor(z / 2^bits) + {0, 1} (+ addend, untruncated) for z held 2-of-2 additively by A = dealer+1 and
    B = dealer+2 (|z| < 2^62); the dealer passes part=None (and addend=None).

    `_truncate_two` with z_D = 0. `bits` may also be a (shift, widest) pair from `_part_bits`: a
    per-element amount. `held`: the answer before its reshare (`HeldByTwo`; 1 round, 16 B per element less).
    Rounds 2; bytes/elem: dealer 12 (16 beyond 31 bits), A and B 16 each (44 over the three
    ranks). Escudero et al. 2020, section 4.
    """
    bits = bits if isinstance(bits, tuple) else _part_bits(bits, [1])
    with party.comm.tag("truncate_from_two"):
        return _truncate_two(party, dealer, part, bits, shape, addend, held)


# The pieces of the dealer-aided truncation (`_truncate_two`'s proof) for a protocol that opens c = z + 2^62 + r
# its own way (`prepared.products`: rank 1's part of c is known before the input arrives).


def rb_type(widest: int):
    """The dtype of the dealt shares of msb(r): only rb mod 2^(d+1) matters."""
    return np.uint32 if widest <= 31 else np.uint64


def trunc_deal(rr: np.ndarray, rc_a: np.ndarray, rb_a: np.ndarray, d) -> tuple[np.ndarray, np.ndarray]:
    """The dealer's words for B: its shares of rc = (r mod 2^63) >> d and of rb = msb(r), given A's (PRG) shares."""
    return ((rr & _LOW63) >> d) - rc_a, (rr >> U64(63)).astype(rb_a.dtype) - rb_a


def trunc_public(c: np.ndarray, d) -> np.ndarray:
    """The part of floor(z / 2^d) (+1) that A and B both compute from the opened c:
    (c mod 2^63) >> d + 2^(63-d) msb(c) - 2^(62-d). A's part is this plus what B's own words give it."""
    return ((c & _LOW63) >> d) + ((c >> U64(63)) << (U64(63) - d)) - (U64(1) << (U64(62) - d))


def trunc_finish_a(c: np.ndarray, rc_a: np.ndarray, rb_a: np.ndarray, d) -> np.ndarray:
    """A's part of floor(z / 2^d) (+1) from the opened c = z + 2^62 + r (A added the 2^62): the public part
    and, as B's, its words' rb_a (1 - 2 msb(c)) 2^(63-d) - rc_a."""
    return trunc_public(c, d) + trunc_finish_b(c, rc_a, rb_a, d)


def trunc_finish_b(c: np.ndarray, rc_b: np.ndarray, rb_b: np.ndarray, d) -> np.ndarray:
    """B's part of floor(z / 2^d) (+1) from the opened c."""
    c_msb = c >> U64(63)
    return ((rb_b.astype(U64) * (U64(1) - U64(2) * c_msb)) << (U64(63) - d)) - rc_b


def truncate_parts(party: Party, parts: list[np.ndarray], bits: int) -> list[AShare]:
    """Replicated shares of floor(z / 2^bits) (+1 at most) from this rank's additive parts of each z.

    For products a rank computes alone (e.g. a matmul with a weight its owner knows; see
    weights.matmul_part). The dealer protocol of `_trunc_parts`: 2 rounds, 44 B/elem over the
    ranks (dealer 12, others 16; 48 beyond 31 bits).
    """
    with party.comm.tag("truncate_parts"):
        return _trunc_parts(party, parts, bits)


def two_parts(party: Party, xs: list[AShare], dealer: int = 0) -> np.ndarray | None:
    """x held 2-of-2 by A = dealer+1 and B = dealer+2, free: x_A + x_B on A, x_D on B (None on the dealer;
    with dealer 0: x_1 + x_2 on rank 1, x_0 on rank 2)."""
    role = (party.rank - dealer) % PARTIES
    if role == 0:
        return None
    return _flat([a.first + a.second if role == 1 else a.second for a in xs])


def truncate(party: Party, x, bits):
    """floor(x / 2^bits) + {0, 1} for |x| < 2^62 (one ulp at most, never more); lists batch, with one
    `bits` for all or one per operand.

    Idea: ranks 1 and 2 already hold x 2-of-2 (x_1 + x_2 and x_0), so `truncate_from_two` with
    rank 0 as the dealer applies (the proof is `_truncate_two`'s).
    Rounds 2; bytes/elem: rank 0 12 (16 beyond 31 bits), ranks 1 and 2 16 each (44 over the three
    ranks). Escudero et al. 2020, 4.
    """
    xs, was_list = _listed(x)
    shapes = [a.shape for a in xs]
    n = sum(int(np.prod(s)) for s in shapes)
    with party.comm.tag("truncate"):
        flat = truncate_from_two(party, 0, two_parts(party, xs), _part_bits(bits, [a.size for a in xs]), (n,))
    out = [AShare(s, t) for s, t in zip(_unflat(flat.first, shapes), _unflat(flat.second, shapes))]
    return _unlisted(out, was_list)


def mul_fx(party: Party, x, y, bits: int | None = None):
    """Fixed-point product: the local three-term product fed straight into the truncation.

    Idea: the three-term parts are masked by the truncation's r, so they need no zero-sharing
    and no reshare round of their own; the dealer folds its part into the mask (`_trunc_parts`).
    Rounds 2; bytes/elem 14.7 per rank on average (dealer 12, others 16; 44 over the three ranks, 48
    beyond 31 bits); needs |x y| < 2^(62 - 2f) in real terms. `bits` (default f) truncates by another
    amount, for intermediates kept at a higher scale (one per operand pair in a batch, or one
    for all). ABY3 5.1 with Escudero et al. 2020, 4.
    """
    xs, was_list = _listed(x)
    ys, _ = _listed(y)
    with party.comm.tag("mul_fx"):
        parts = [_mul_parts(a, b) for a, b in zip(xs, ys, strict=True)]
        return _unlisted(_trunc_parts(party, parts, party.fxp.frac_bits if bits is None else bits), was_list)


def matmul_fx(party: Party, x, y, bits: int | None = None):
    """Fixed-point matrix product, fused with the truncation as in `mul_fx`.

    Rounds 2; bytes per output elem 14.7 per rank on average (dealer 12, others 16); `bits` as in
    `mul_fx` (an int, or one per pair). ABY3 5.1 with Escudero et al. 2020, 4.
    """
    xs, was_list = _listed(x)
    ys, _ = _listed(y)
    with party.comm.tag("matmul_fx"):
        parts = [_matmul_parts(a, b) for a, b in zip(xs, ys, strict=True)]
        return _unlisted(_trunc_parts(party, parts, party.fxp.frac_bits if bits is None else bits), was_list)


def mul_public_fx(party: Party, x: AShare, c, bits: int | None = None) -> AShare:
    """x * c for a public real array c (broadcasting): encode c, multiply locally, truncate by `bits` (default f).

    The product is linear, so it is held 2-of-2 by ranks 1 and 2 for free and truncates as `truncate`.
    Rounds 2; bytes/elem: rank 0 12 (16 beyond 31 bits), ranks 1 and 2 16 each. ABY3 5.1.
    """
    prod = mul_public(x, party.fxp.encode(c))
    with party.comm.tag("mul_public_fx"):
        return truncate_from_two(
            party, 0, two_parts(party, [prod]), party.fxp.frac_bits if bits is None else bits, prod.shape
        )
