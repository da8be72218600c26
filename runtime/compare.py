"""Comparisons on arithmetic shares: ltz, less_than, equal, max along an axis.

Results of ltz/less_than/equal are one-row boolean shares (bit-sliced); use
convert.b2a for an arithmetic 0/1 or convert.mul_bit to select with them.
"""

from __future__ import annotations

import numpy as np

from . import arith
from .boolean import and_, and_all, not_, split_elements, xor
from .convert import _bit_terms, msb, mul_bit, split_sum
from .party import Party
from .shares import AShare, concat, flat_concat, vconcat


def ltz(party: Party, x, bits: int | None = None):
    """[x < 0] for x (any shape, or a list): the sign bit, exact for |x| < 2^(L-1), L = bits or party.msb_bits.

    Rounds 2 + ceil(log2(ceil((L-1)/3))) (6 at L = 48, 7 at 64); bytes/elem 31.6 over the ranks at L = 48
    (see convert.msb). ABY3 5.3.
    """
    with party.comm.tag("ltz"):
        return msb(party, x, bits=bits)


def less_than_public(party: Party, x: AShare, thresholds, bits: int | None = None) -> list:
    """[x < t] for each public ring threshold t (arrays broadcastable to x): one comparison batch in
    which rank 0's message serves every threshold (see convert.msb's offsets), exact for |x - t| < 2^(L-1),
    L = bits or party.msb_bits.

    Rounds 2 + ceil(log2 m); bytes/elem 31.6 for the first threshold and 17.5 for each further
    one, over the three ranks at L = 48 (see convert.msb). ABY3 5.3.
    """
    with party.comm.tag("less_than_public"):
        if isinstance(thresholds, np.ndarray):  # a 1-D array of scalar thresholds: one conversion
            return msb(party, x, bits=bits, offsets=list(np.uint64(0) - arith._ring(thresholds)))
        return msb(party, x, bits=bits, offsets=[np.uint64(0) - arith._ring(t) for t in thresholds])


def less_than(party: Party, x, y):
    """[x < y] elementwise (broadcasting; lists batch), exact for |x - y| < 2^(L-1).

    Rounds and bytes of msb (of x - y). ABY3 5.3.
    """
    with party.comm.tag("less_than"):
        if isinstance(x, (list, tuple)):
            return msb(party, [arith.sub(a, b) for a, b in zip(x, y, strict=True)])
        return msb(party, arith.sub(x, y))


def equal(party: Party, x, y, bits: int = 64):
    """[x == y] elementwise (broadcasting; lists batch), exact for |x - y| < 2^bits (always at 64).

    Idea: d = x - y = u + v with u known to rank 0 and v to ranks 1 and 2 (`split_sum`),
    so d = 0 mod 2^bits iff u and -v agree on every bit: AND of the bits of ~(u ^ -v), as a tree.
    Rounds 1 + ceil(log2 bits) (7 at 64); bytes/elem: rank 0 bits/8 + (bits-1)/8, others
    (bits-1)/8 (16 and 8 at 64). Folklore equality-to-zero (an AND tree over XNOR bits);
    the u + v split of ABY3 5.3 makes the XNOR local.
    """
    was_list = isinstance(x, (list, tuple))
    pairs = zip(x, y, strict=True) if was_list else [(x, y)]
    diffs = [arith.sub(a, b) for a, b in pairs]
    flat, shapes = flat_concat(diffs)
    with party.comm.tag("equal"):
        u, v = split_sum(party, flat, bits, negate_third=True)
        out = and_all(party, not_(party, xor(u, v)))
    parts = split_elements(out, shapes)
    return parts if was_list else parts[0]


def max(  # noqa: A001
    party: Party, x: AShare, axis: int = -1, keepdims: bool = True, bits: int | None = None, drop: int = 0,
    quads: bool = False,
) -> AShare:
    """Maximum along an axis by a tree of comparisons; one level is one batch. Exact while any two
    entries differ by less than 2^(L-1), L = bits or party.msb_bits.

    Each level compares the first half of the remaining entries with the second half
    (msb of the difference), then keeps the larger by mul_bit; an odd one out waits.
    With `drop` = k the comparisons ignore the carry of the k low bits (convert.msb): a level may keep
    the smaller of two entries less than 2^k apart, so the result is an entry within
    ceil(log2 n) (2^k - 1) ring units below the maximum, for an (L - k)-bit comparison.
    With `quads`, levels of four (`_max_of_group`) come first while more than eight entries remain, then
    one group of the three to eight left: a level of four takes C + 4 rounds where two levels of two take
    2 (C' + 2), and the last group of eight C + 5 where three levels of two (or a level of four and one of
    two) take more (128 entries: 32, 8, 1 in 3 C + 13 rounds).
    Rounds per level of two msb's + 2 (8 at L = 48), ceil(log2 n) levels;
    bytes per compared pair 31.6 + 32 over the three ranks (msb and mul_bit). PUMA section 4 / SPU's reduce max.
    """
    with party.comm.tag("max"):
        x = x.moveaxis(axis, -1)
        while quads and x.shape[-1] > 8:
            q = x.shape[-1] // 4
            x = concat([_max_of_group(party, [x[..., i * q : (i + 1) * q] for i in range(4)], bits), x[..., 4 * q :]],
                       axis=-1)
        if quads and x.shape[-1] >= 3:
            x = _max_of_group(party, [x[..., i : i + 1] for i in range(x.shape[-1])], bits)
        while x.shape[-1] > 1:
            h = x.shape[-1] // 2
            a, b = x[..., :h], x[..., h : 2 * h]
            diff = arith.sub(b, a)
            larger = arith.add(a, mul_bit(party, msb(party, arith.neg(diff), bits=bits, drop=drop), diff))
            x = concat([larger, x[..., 2 * h :]], axis=-1)
        x = x.moveaxis(-1, axis) if keepdims else x.squeeze(-1)
    return x


def _max_of_group(party: Party, a: list[AShare], bits: int | None) -> AShare:
    """The elementwise maximum of g shares of one shape (3 <= g <= 8): one level of `max`'s tree.

    Idea: all g (g - 1) / 2 t_ij = [a_i > a_j] (i < j) in one msb batch; entry i wins when it beats the
    other g - 1 (i beats j: t_ij for i < j, not t_ji for i > j: ties go to the later entry), an AND of
    g - 1 bits in a balanced tree for the g entries at once. The comparisons are exact (no dropped bits),
    so the order is total and exactly one entry wins: max = sum_i w_i a_i, one `_bit_terms` round and a
    reshare.
    Rounds C + ceil(log2(g - 1)) + 2 (g = 4: 10 at L = 48; g = 8: 11); bytes per output element:
    g (g - 1) / 2 comparisons, (g - 2) g AND bits per rank, and 16 g from rank 0 plus 8 from each of ranks 1
    and 2 (g bits and g terms, the reshare). g = 4: about 6 x 31.6 + 83 = 273 over the ranks at L = 48,
    against 3 x (31.6 + 32) = 191 for the two levels of two it replaces (20 B more per entry of the level).
    This repository's construction (a tournament, as in sorting networks' comparators of four).
    """
    g = len(a)
    pairs = [(i, j) for i in range(g) for j in range(i + 1, g)]
    greater = dict(zip(pairs, msb(party, [arith.sub(a[j], a[i]) for i, j in pairs], bits=bits)))

    def beats(i, j):
        return greater[(i, j)] if i < j else not_(party, greater[(j, i)])

    # Term k: row i holds whether entry i beats its k-th other; the terms' AND, a level at a time.
    terms = [vconcat([beats(i, [j for j in range(g) if j != i][k]) for i in range(g)]) for k in range(g - 1)]
    while len(terms) > 1:
        h = len(terms) // 2
        both = and_(party, vconcat(terms[0 : 2 * h : 2]), vconcat(terms[1 : 2 * h : 2]))
        terms = [both.row(slice(k * g, (k + 1) * g)) for k in range(h)] + terms[2 * h :]
    (wins,) = terms
    (part,) = _bit_terms(party, [[(wins.row(i), a[i]) for i in range(g)]])
    shape = a[0].shape
    return arith.reshare_from_two(party, 0, part, (int(np.prod(shape)),)).reshape(shape)


def argmax(party: Party, x: AShare, bits: int | None = None) -> tuple[AShare, AShare]:
    """(max, index) of a 1-D x by a tree of comparisons, one level a batch; the index is an integer share
    (not fixed point) of the first position holding the maximum, as np.argmax.

    Each level compares neighbours, entry 2i with entry 2i+1 ([a < b], so a tie keeps the earlier index;
    the winners stay in index order, so ties resolve to the first position at every level), and keeps the
    larger value and its index with one mul_bit of two terms; an odd one out waits at the end. Exact while
    the entries differ by less than 2^(L-1), L = bits or party.msb_bits.
    Rounds per level msb's + 2 (8 at L = 48), ceil(log2 n) levels (128 for GPT-2's 50,257 logits);
    bytes per compared pair 31.6 (msb) + 56 (mul_bit: the bit's word once, two terms) over the three
    ranks: about 4.4 MB for 50,257 entries. PUMA / SPU's argmax in its text_generation.
    """
    with party.comm.tag("argmax"):
        x, index, _ = _tournament(party, x, bits)
    return x, index


def argmax_onehot(party: Party, x: AShare, bits: int | None = None) -> tuple[AShare, AShare]:
    """(index, one-hot) of the first maximum of a 1-D x: the index as `argmax`, and an integer share of
    the one-hot row with a 1 at that index (what an embedding lookup of the chosen token multiplies).

    Idea: after `argmax`'s tournament, walk its levels back down from the winner's [1]: a pair's share of
    the one-hot p splits into p (1 - [b won]) for its first entry and p [b won] for its second, with the
    comparison bits the tournament kept (one mul_bit per pair; an odd one out keeps p).
    Rounds: argmax's, plus 2 per level (mul_bit); bytes: argmax's, plus 32 per compared pair over the
    three ranks (about 0.8 MB more for 50,257 entries). This repository's construction.
    """
    with party.comm.tag("argmax"):
        _, index, levels = _tournament(party, x, bits)
        zero = np.zeros(1, np.uint64)
        onehot = arith.add_public(party, AShare(zero, zero.copy()), np.ones(1, np.int64))
        for h, later in reversed(levels):
            pairs = onehot[:h]
            second = mul_bit(party, later, pairs)
            first = arith.sub(pairs, second)
            woven = AShare(
                np.stack([first.first, second.first], axis=-1).reshape(-1),
                np.stack([first.second, second.second], axis=-1).reshape(-1),
            )
            onehot = concat([woven, onehot[h:]])
    return index, onehot


def _tournament(party: Party, x: AShare, bits: int | None):
    """argmax's levels: (max, index, each level's comparison bits [a < b] of its pairs)."""
    if x.ndim != 1:
        raise ValueError(f"argmax takes a 1-D share, got shape {x.shape}")
    index = arith.add_public(party, AShare(np.zeros(x.size, np.uint64), np.zeros(x.size, np.uint64)), np.arange(x.size))
    levels = []
    while x.size > 1:
        h = x.size // 2
        a, b, ia, ib = x[0 : 2 * h : 2], x[1 : 2 * h : 2], index[0 : 2 * h : 2], index[1 : 2 * h : 2]
        later = msb(party, arith.sub(a, b), bits=bits)  # [a < b]: the later neighbour wins
        dx, di = mul_bit(party, [later, later], [arith.sub(b, a), arith.sub(ib, ia)])
        x = concat([arith.add(a, dx), x[2 * h :]])
        index = concat([arith.add(ia, di), index[2 * h :]])
        levels.append((h, later))
    return x, index, levels
