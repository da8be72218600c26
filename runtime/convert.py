"""Conversions between arithmetic and boolean shares: msb (A2B of the sign), b2a, mul_bit.

All accept one operand or a list (one batch: the same rounds, summed bytes). Bytes
are per element per rank; where ranks differ, the largest and the mean are given.
"""

from __future__ import annotations

import numpy as np

from . import arith, boolean
from .arith import _listed
from .boolean import carry_out, pack_bits, split_elements, unpack_row
from .party import Party
from .shares import AShare, BShare, flat_concat, flat_split, vconcat


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


# Bits per leaf of msb's carry tree: rank 0 sends a one-hot of its 3 bits (7 rows, the 8th is implied).
LEAF_BITS = 3


def _one_hot(rows: np.ndarray) -> np.ndarray:
    """Packed one-hot rows of k-bit group values: rows (groups, k, nb) -> (2^k, groups, nb), entry a = [value == a]."""
    k = rows.shape[1]
    out = np.empty((2**k,) + rows.shape[:1] + rows.shape[2:], dtype=np.uint8)
    lits = [(~rows[:, i], rows[:, i]) for i in range(k)]
    # One-hot of the high bits first, then one AND per entry: 2^k + 2^(k-1) + ... ANDs in all.
    hot = [lits[k - 1][0], lits[k - 1][1]]
    for i in range(k - 2, -1, -1):
        hot = [h & lit for h in hot for lit in lits[i]]
    out[:] = hot
    return out


def _carry_leaves(
    party: Party, flat: AShare, L: int, offsets: np.ndarray, drop: int = 0
) -> tuple[BShare, BShare]:
    """Replicated generate/propagate rows of the 3-bit groups of u + v_j (u = x_0 + x_1, v_j = x_2 + offsets[j],
    low L-1 bits), with the top group's generate XOR u_{L-1} ^ v_{j, L-1}, so that the carry tree ends on
    the msb of x + offsets[j] itself. The offsets' results sit side by side on the byte axis.

    Idea: rank 0 knows u, ranks 1 and 2 know every v_j. Per group, rank 0 sends rank 1 its one-hot
    e[a] = [u_grp = a] masked by k_0 bytes M (rank 2 holds M): e is XOR-shared by ranks 1 and 2, and so is
    any f(u_grp, v_grp) = XOR_a e[a] f(a, v_grp), computed locally by both since they know v: G = [u + v >= 8],
    P = [u + v = 7] of the group, for every offset from the one message. `reshare_from_two` (rank 0
    dealing) makes G and P replicated. Zero padding bits at the bottom make L-1 a multiple of 3.
    `drop` low bits of u and v are ignored (their carry is lost): bits drop..L-1 only.
    Rounds 2; bytes/elem: rank 0 (7 groups + 1)/8 once, ranks 1 and 2 (2 groups - 1)/8 per offset.
    """
    r, n = party.rank, flat.size
    L -= drop
    k = LEAF_BITS
    pad = -(L - 1) % k
    groups = (L - 1 + pad) // k
    nb = -(-n // 8)
    J = len(offsets)
    shape = (J * nb * 8,)

    def leaves(word):
        rows = pack_bits(word >> np.uint64(drop), L)
        width = rows.shape[1]
        low = np.concatenate([np.zeros((pad, width), np.uint8), rows[: L - 1]]).reshape(groups, k, width)
        return _one_hot(low), rows[L - 1]

    sent = (2**k - 1) * groups + 1
    if r == 0:
        e, top = leaves(flat.first + flat.second)
        mask = party.prg_prev.words((sent, nb), np.uint8)
        party.comm.exchange({1: np.concatenate([e[1:].reshape(-1, nb), top[None]]) ^ mask}, {})
        gp = boolean.reshare_from_two(party, 0, None, (2 * groups - 1, J * nb), shape)
    else:
        if r == 1:
            share = party.comm.exchange({}, {0: ((sent, nb), np.uint8)})[0]
        else:
            share = party.prg_next.words((sent, nb), np.uint8)
            party.comm.exchange({}, {})
        mine = share[:-1].reshape(2**k - 1, groups, nb)
        first = np.bitwise_xor.reduce(mine, axis=0)
        # e[0] = 1 ^ XOR of the others: rank 1 holds the complement of its XOR, rank 2 the plain XOR.
        mine = np.tile(np.concatenate([(~first if r == 1 else first)[None], mine]), (1, 1, J))
        # All offsets side by side, each padded to whole bytes, so one packing serves them all.
        third = flat.second if r == 1 else flat.first
        words = np.zeros((J, 8 * nb), np.uint64)
        words[:, :n] = third[None, :] + offsets  # (J, n) or (J, 1)
        e, top = leaves(words.reshape(-1))
        # T_a = [a + v >= 8] = XOR_{b >= 8 - a} [v = b], a suffix XOR of v's one-hot (a loop:
        # ufunc accumulate is 50x slower here); P pairs a with 7 - a.
        t = e[::-1].copy()
        for j in range(1, 2**k):
            t[j] ^= t[j - 1]
        g_part = np.bitwise_xor.reduce(mine[1:] & t[: 2**k - 1], axis=0)
        p_part = np.bitwise_xor.reduce(mine & e[::-1], axis=0)
        g_part[-1] ^= np.tile(share[-1], J) ^ (top if r == 1 else np.uint8(0))
        gp = boolean.reshare_from_two(party, 0, np.concatenate([g_part, p_part[1:]]), (2 * groups - 1, J * nb), shape)
    # The lowest group's propagate is never read (the carry into it is 0); zeros keep the layout.
    zeros = np.zeros((1, J * nb), np.uint8)
    return gp.row(slice(0, groups)), vconcat([BShare(zeros, zeros, shape), gp.row(slice(groups, None))])


def msb(party: Party, x, bits: int | None = None, offsets=None, drop: int = 0):
    """Boolean share of the sign bit of x (any shape, or a list), exact for |x| < 2^(L-1).
    With `offsets` (public ring arrays broadcastable to one AShare x): the list of msb(x + o), one per
    offset, sharing rank 0's message. With `drop` = k > 0 the carry out of the low k bits is ignored:
    the result is [x < 0] or [x < 2^k] (either, per element) at the cost of an L - k bit comparison.

    Idea: reduce the shares mod 2^L locally (L = bits or party.msb_bits), write x = u + v with
    u = x_0 + x_1 (rank 0) and v = x_2 (ranks 1, 2; offsets join v), get each 3-bit group's
    generate and propagate from one message of rank 0 (`_carry_leaves`), then a carry tree over
    the m = ceil((L-1)/3) groups: msb = u_{L-1} ^ v_{L-1} ^ carry (the XOR rides in the top
    group's generate).
    Rounds 2 + ceil(log2 m) (6 for L = 48, 7 for 64). Bytes/elem: rank 0 (7m + 1 + t)/8, ranks 1
    and 2 (2m - 1 + t)/8, t = the tree's AND rows (26 for m = 16): 17.4, 7.1, 7.1 B at L = 48
    (31.6 over the ranks; the ABY3 adder with generate ANDs took 55.9, SPU's Kogge-Stone about 108).
    Each further offset adds (2m - 1 + t)/8 on ranks 1, 2 and t/8 on rank 0 (17.5 B over the ranks).
    ABY3 5.3 with the ring reduction of Escudero et al. 2020, 5; the one-hot leaves are this repository's.
    """
    L = bits or party.msb_bits
    if offsets is not None:
        if isinstance(x, (list, tuple)):
            raise TypeError("msb: offsets take one AShare, not a list")
        if all(np.ndim(o) == 0 for o in offsets):  # a column: every element takes the same offset j
            offs = np.asarray(offsets, dtype=np.uint64).reshape(-1, 1)
        else:
            offs = np.stack([np.broadcast_to(np.asarray(o, dtype=np.uint64), x.shape).reshape(-1) for o in offsets])
        with party.comm.tag("msb"):
            g, p = _carry_leaves(party, x.reshape(-1), L, offs, drop)
            out = carry_out(party, g, p)
        # Offset j's bits are bytes j nb .. (j + 1) nb of the row (each padded to whole bytes).
        nb = -(-x.size // 8)
        return [BShare(out.first[:, j * nb : (j + 1) * nb], out.second[:, j * nb : (j + 1) * nb], x.shape)
                for j in range(len(offs))]
    xs, was_list = _listed(x)
    flat, shapes = flat_concat(xs)
    with party.comm.tag("msb"):
        g, p = _carry_leaves(party, flat.reshape(-1), L, np.zeros((1, 1), np.uint64), drop)
        out = carry_out(party, g, p)
    parts = split_elements(out, shapes)
    return parts if was_list else parts[0]


def _bit_words(party: Party, b: BShare, shape) -> np.ndarray:
    """What this rank knows of b as 0/1 words, broadcast to `shape`: c = b_0 ^ b_1 on rank 0, b_2 on ranks 1, 2."""
    r = party.rank
    row = b.first ^ b.second if r == 0 else (b.second if r == 1 else b.first)
    words = unpack_row(row, b.size)
    return words if tuple(shape) == tuple(b.shape) else np.broadcast_to(words.reshape(b.shape), shape).reshape(-1)


def _many_bit_words(party: Party, bs: list[BShare]) -> np.ndarray:
    """`_bit_words` of one-row shares, concatenated; shares of one size (a thermometer's hundreds of
    bits) in one unpacking."""
    n = bs[0].size
    if len(bs) == 1 or any(b.size != n or b.rows != 1 for b in bs):
        return np.concatenate([_bit_words(party, b, b.shape) for b in bs])
    r = party.rank
    first, second = (np.concatenate([getattr(b, c) for b in bs]) for c in ("first", "second"))
    rows = first ^ second if r == 0 else (second if r == 1 else first)
    return np.unpackbits(rows, axis=1, count=n, bitorder="little").astype(np.uint64).reshape(-1)


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
        words = _many_bit_words(party, bs)
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


def _bit_terms(party: Party, groups: list[list[tuple[BShare, AShare]]]) -> list[np.ndarray | None]:
    """Per group, this rank's part of sum_k b_k y_k held 2-of-2 additively by ranks 1 and 2 (None on rank 0).

    Idea: b = c ^ t with c = b_0 ^ b_1 known to rank 0 and t = b_2 known to ranks 1 and 2, so
    b y = c y (1 - 2t) + t y, and t y is already additive between ranks 1 and 2 (y_1 + y_2 and y_0).
    Rank 0 sends rank 1 a = c - rho once per bit and c (y_0 + y_1) - rho' per term, with rho, rho'
    from k_0 (which rank 2 also holds): then c y = [c (y_0 + y_1) - rho' + a y_2] + [rho' + rho y_2],
    the first part on rank 1, the second on rank 2. Rank 1 sees words masked by rho, rho'; rank 2
    receives nothing. A bit used in several terms (same BShare object and shape) is sent once.
    Rounds 1; bytes: 8 per bit element and 8 per term element, from rank 0 only. This repository's
    construction (the c / b_2 split of b2a and mul_bit).
    """
    r = party.rank
    bits: dict = {}
    for group in groups:
        for b, y in group:
            bits.setdefault((id(b), y.shape), (b, y.shape))
    words = {key: _bit_words(party, b, shape) for key, (b, shape) in bits.items()}
    n_bits = sum(w.size for w in words.values())
    n_terms = sum(y.size for group in groups for _, y in group)
    if r == 0:
        rho = {key: party.prg_prev.words(w.size) for key, w in words.items()}
        msg = [words[key] - rho[key] for key in words]
        for group in groups:
            for b, y in group:
                c = words[(id(b), y.shape)]
                msg.append(c * np.ravel(y.first + y.second) - party.prg_prev.words(y.size))
        party.comm.exchange({1: np.concatenate(msg)}, {})
        return [None] * len(groups)
    if r == 1:
        got = party.comm.exchange({}, {0: ((n_bits + n_terms,), np.uint64)})[0]
        at, alpha = 0, {}
        for key, w in words.items():
            alpha[key] = got[at : at + w.size]
            at += w.size
    else:
        rho = {key: party.prg_next.words(w.size) for key, w in words.items()}
        party.comm.exchange({}, {})
    out = []
    for group in groups:
        total = None
        for b, y in group:
            key = (id(b), y.shape)
            t = words[key]
            if r == 1:
                y_1, y_2 = np.ravel(y.first), np.ravel(y.second)
                cy = got[at : at + y.size] + alpha[key] * y_2
                at += y.size
                part = cy * (np.uint64(1) - np.uint64(2) * t) + t * (y_1 + y_2)
            else:
                y_2, y_0 = np.ravel(y.first), np.ravel(y.second)
                cy = party.prg_next.words(y.size) + rho[key] * y_2
                part = cy * (np.uint64(1) - np.uint64(2) * t) + t * y_0
            total = part if total is None else total + part
        out.append(total)
    return out


def mul_bit(party: Party, b, x):
    """b * x for a one-row boolean share b (broadcast to x's shape) and an AShare x; lists batch.

    Idea: `_bit_terms` makes b x additive between ranks 1 and 2 in one round (rank 0 sends
    c - rho and c (x_0 + x_1) - rho'), then `arith.reshare_from_two` with rank 0 as the dealer.
    No truncation: b is 0/1.
    Rounds 2; bytes/elem: rank 0 16, ranks 1 and 2 8 each (32 over the three ranks; the bit's
    word counts per element of x). This repository's construction (SPU: 3-party OT, 2 rounds,
    8K bits per element).
    """
    bs, was_list = _listed(b)
    xs, _ = _listed(x)
    with party.comm.tag("mul_bit"):
        parts = _bit_terms(party, [[(bb, xx)] for bb, xx in zip(bs, xs, strict=True)])
        n = sum(xx.size for xx in xs)
        flat = None if party.rank == 0 else np.concatenate(parts)
        out = flat_split(arith.reshare_from_two(party, 0, flat, (n,)), [xx.shape for xx in xs])
    return out if was_list else out[0]


def select(party: Party, terms, bits: int, plain=(), base: AShare | None = None, held: bool = False):
    """sum_k b_k y_k (+ base) truncated by `bits`, plus sum_j b_j x_j untruncated: one secret
    selection-and-rescale.

    terms, plain: lists of (one-row BShare b, AShare y) with b of y's shape and all y of one shape.
    Idea: `_bit_terms` makes both sums additive between ranks 1 and 2 in one round, then
    `arith.truncate_from_two` (rank 0 as the dealer) truncates the first and adds the second
    before its final reshare. The sum (not each term) must satisfy |sum| < 2^62, so out-of-range
    garbage in a term whose bit is 0, or terms that cancel in the ring, cost nothing.
    Rounds 3; bytes/elem: 8 per distinct bit and 8 per term (plain ones too) from rank 0, plus
    the truncation's 44 over the three ranks (48 beyond 31 bits). `base`, a share of the terms' shape, joins
    the truncated sum for free: ranks 1 and 2 hold it 2-of-2 already. `held`: the answer as ranks 1 and 2
    hold it before the truncation's reshare (`arith.HeldByTwo`, dealer 0: 2 rounds, 16 B per element less).
    This repository's construction.
    """
    terms, plain = list(terms), list(plain)
    shape = terms[0][1].shape
    with party.comm.tag("select"):
        groups = [terms] + ([plain] if plain else [])
        parts = _bit_terms(party, groups)
        if base is not None and party.rank != 0:
            parts[0] = parts[0] + arith.two_parts(party, [base])
        return arith.truncate_from_two(party, 0, parts[0], bits, shape, parts[1] if plain else None, held)
