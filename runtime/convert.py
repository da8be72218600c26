"""Conversions between arithmetic and boolean shares: msb (A2B of the sign), b2a, mul_bit.

All accept one operand or a list (one batch: the same rounds, summed bytes). Bytes
are per element per rank; where ranks differ, the largest and the mean are given.
"""

from __future__ import annotations

import numpy as np

from . import arith
from .boolean import and_, carry_out, pack_bits, split_elements, unpack_row, xor
from .party import Party
from .shares import AShare, BShare, flat_concat, flat_split


def split_sum(party: Party, x: AShare, bits: int, negate_third: bool = False) -> tuple[BShare, BShare]:
    """Bit-sliced boolean shares of u = x_0 + x_1 and v = x_2 (or -x_2), low `bits` bits.

    Rank 0 holds x_0 and x_1, so it knows u and reshares it: u = M ^ (u ^ M) with M from
    k_0 (ranks 0 and 2) and u ^ M sent to rank 1. Ranks 1 and 2 both hold x_2, so v's
    sharing (0, 0, v) is free. Then x = u + v mod 2^bits. Rounds 1; bytes/elem bits/8 from rank 0.
    ABY3 5.3 (two-input A2B).
    """
    x = x.reshape(-1)
    n, r = x.size, party.rank
    zeros = np.zeros((bits, -(-n // 8)), dtype=np.uint8)
    if r == 0:
        u = pack_bits(x.first + x.second, bits)
        mask = party.prg_prev.words(u.shape, np.uint8)
        party.comm.exchange({1: u ^ mask}, {})
        return BShare(mask, u ^ mask, (n,)), BShare(zeros, zeros, (n,))
    third = x.second if r == 1 else x.first
    v = pack_bits(-third if negate_third else third, bits)
    if r == 1:
        got = party.comm.exchange({}, {0: (zeros.shape, np.uint8)})
        return BShare(got[0], zeros, (n,)), BShare(zeros, v, (n,))
    mask = party.prg_next.words(zeros.shape, np.uint8)
    party.comm.exchange({}, {})
    return BShare(zeros, mask, (n,)), BShare(v, zeros, (n,))


def _listed(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def msb(party: Party, x, bits: int | None = None):
    """Boolean share of the sign bit of x (any shape, or a list), exact for |x| < 2^(L-1).

    Idea: reduce the shares mod 2^L locally (L = bits or party.msb_bits), split x = u + v
    as in `split_sum`, and compute only the carry into bit L-1 of u + v with a carry tree
    on bit-sliced shares: msb = u_{L-1} ^ v_{L-1} ^ carry.
    Rounds 2 + ceil(log2(L-1)) (8 for L = 48 or 64). Bytes/elem: every rank sends
    (3L - 5 - ceil(log2(L-1)))/8 in ANDs (L-1 generate rows, 2(L-2) - ceil(log2(L-1)) tree
    rows), rank 0 another L/8: 16.6 and 22.6 B at L = 48 (mean 18.6; SPU's Kogge-Stone
    MSB at L = 64 takes about 36). ABY3 5.3 with the ring reduction of Escudero et al. 2020, 5.
    """
    xs, was_list = _listed(x)
    flat, shapes = flat_concat(xs)
    L = bits or party.msb_bits
    with party.comm.tag("msb"):
        u, v = split_sum(party, flat, L)
        low = slice(0, L - 1)
        g = and_(party, u.row(low), v.row(low))
        carry = carry_out(party, g, xor(u, v).row(low))
        out = xor(xor(u.row(L - 1), v.row(L - 1)), carry)
    parts = split_elements(out, shapes)
    return parts if was_list else parts[0]


def _bit_words(party: Party, b: BShare, shape) -> np.ndarray:
    """What this rank knows of b as 0/1 words, broadcast to `shape`: c = b_0 ^ b_1 on rank 0, b_2 on ranks 1, 2."""
    r = party.rank
    row = b.first ^ b.second if r == 0 else (b.second if r == 1 else b.first)
    return np.broadcast_to(unpack_row(row, b.size).reshape(b.shape), shape).reshape(-1)


def _share_c_and_reshare(party: Party, c: np.ndarray | None, parts: np.ndarray):
    """One round that shares rank 0's words c arithmetically (as arith.share, owner 0) and
    reshares this rank's additive parts (as arith._reshare): (AShare of c, AShare of the parts' sum)."""
    r, n = party.rank, parts.size
    shape = (n,)
    if r == 0:
        c_0, c_2 = party.prg_prev.words(shape), party.prg_all.words(shape)
        c_1 = c - c_0 - c_2
    elif r == 1:
        c_2 = party.prg_all.words(shape)
    else:
        c_2, c_0 = party.prg_all.words(shape), party.prg_next.words(shape)
    z = parts + party.zero_share(shape)
    sends = {party.prev: z}
    recvs = {party.next: (shape, np.uint64)}
    if r == 0:
        sends[1] = c_1
    if r == 1:
        recvs[0] = (shape, np.uint64)
    got = party.comm.exchange(sends, recvs)
    c_sh = AShare(c_0, c_1) if r == 0 else AShare(got[0], c_2) if r == 1 else AShare(c_2, c_0)
    return c_sh, AShare(z, got[party.next])


def b2a(party: Party, b):
    """Arithmetic share (integer 0/1, not fixed point) of a one-row boolean share; lists batch.

    Idea: b = c ^ b_2 = c (1 - 2 b_2) + b_2 with c = b_0 ^ b_1 known to rank 0 and b_2 known
    to ranks 1 and 2. Rank 0 sends c - R to rank 1 (R from k_0, which rank 2 also holds), so
    ranks 1 and 2 hold b 2-of-2: (c - R)(1 - 2 b_2) + b_2 and R (1 - 2 b_2); then
    `arith.reshare_from_two` with rank 0 as the dealer.
    Rounds 2; bytes/elem 8 on every rank. This repository's construction; SPU uses a
    3-party OT (2 rounds, 8K bits).
    """
    bs, was_list = _listed(b)
    shapes = [x.shape for x in bs]
    r = party.rank
    with party.comm.tag("b2a"):
        words = np.concatenate([_bit_words(party, x, x.shape) for x in bs])
        n = words.size
        if r == 0:
            party.comm.exchange({1: words - party.prg_prev.words(n)}, {})
            part = None
        elif r == 1:
            masked = party.comm.exchange({}, {0: ((n,), np.uint64)})[0]
            part = masked * (np.uint64(1) - np.uint64(2) * words) + words
        else:
            mask = party.prg_next.words(n)
            party.comm.exchange({}, {})
            part = mask * (np.uint64(1) - np.uint64(2) * words)
        flat = arith.reshare_from_two(party, 0, part, (n,))
    out = flat_split(flat, shapes)
    return out if was_list else out[0]


def mul_bit(party: Party, b, x):
    """b * x for a one-row boolean share b (broadcast to x's shape) and an AShare x; lists batch.

    Idea: with c = b_0 ^ b_1 (rank 0) and b_2 (ranks 1, 2), b x = w + c (x - 2 w) where
    w = b_2 x. Round 1 both shares c and reshares w (b_2 times the shares ranks 1 and 2
    hold is an additive sharing of w); round 2 is one ring mul. No truncation: b is 0/1.
    Rounds 2 (b2a then mul would take 3); bytes/elem: rank 0 24, ranks 1 and 2 16 (mean 18.7).
    This repository's construction (SPU: 3-party OT, 2 rounds, 8K bits per element).
    """
    bs, was_list = _listed(b)
    xs, _ = _listed(x)
    r = party.rank
    with party.comm.tag("mul_bit"):
        flat, shapes = flat_concat(xs)
        words = np.concatenate([_bit_words(party, bb, xx.shape) for bb, xx in zip(bs, xs, strict=True)])
        if r == 0:
            parts = np.zeros_like(flat.first)
        elif r == 1:
            parts = words * flat.first
        else:
            parts = words * (flat.first + flat.second)
        c_sh, w = _share_c_and_reshare(party, words if r == 0 else None, parts)
        out = flat_split(arith.add(w, arith.mul(party, c_sh, arith.sub(flat, arith.mul_public(w, 2)))), shapes)
    return out if was_list else out[0]

