"""Fixed-point products in sequence on one dealer: each truncation's answer stays 2-of-2 for the next.

The dealer-aided truncation (`arith._truncate_two`: dealer D, A = D+1, B = D+2) leaves
    A: y_A = p + u,   B: y_B = v,
with p = (c mod 2^63) >> d + 2^(63-d) msb(c) - 2^(62-d) public to A and B (both opened c), and, for
s = 1 - 2 msb(c) (public to A and B) and h = 2^(63-d),
    u = u0 + s u1,  v = v0 + s v1,  u0 = -rc_A, u1 = h rb_A, v0 = -rc_B, v1 = h rb_B,
all four known to D, who dealt them. A product of that answer T with replicated shares therefore needs no
reshare first. For the next step's P = (L1 + alpha T)(L2 + beta T) with L1, L2 replicated and alpha, beta
public ring integers, write M = beta L1 + alpha L2, so P = L1 L2 + M T + alpha beta T^2, and let each
rank take the terms it can (indices of the replicated components, as in arith: rank i holds x_i, x_i+1):
    A: (L1 L2)_A + (M_A + M_B) y_A + ab y_A^2                   + msb(c) kappa_A 2^(64-d)
    B: (L1 L2)_B + M_D p + (M_B + M_D) y_B + ab (y_B^2 + 2 p y_B) + msb(c) kappa_B 2^(64-d)
    D: (L1 L2)_D + M_D (u0 + u1) + M_A (v0 + v1) + 2 ab (u0 v0 + u0 v1 + u1 v0)
with ab = alpha beta. The terms D cannot finish are those with s: s x = x - 2 msb(c) x, so D takes the
s = 1 part and A and B add msb(c) K for K = -2 (M_D u1 + M_A v1) - 4 ab (u0 v1 + u1 v0) = 2^(64-d) kappa,
kappa = -(M_D rb_A + M_A rb_B) - 2 ab (u0 rb_B + rb_A v0) mod 2^d (u1 v1 has h^2 = 2^(126-2d), zero in the
ring for d <= 31). D deals B kappa_B = kappa - kappa_A, kappa_A a word of k_A, in the message of the
truncation that makes T (D knows L1, L2 then), and folds its own part into the next mask as in
`arith._trunc_parts`. The sum of the three parts is P exactly, so the next truncation's proof is
`arith._truncate_two`'s.

Security: every word is a truncation's (c uniform to A because r_B is, to B because r_A is; the dealt
words reach B masked by k_A words it lacks) or kappa_B, masked by kappa_A from k_A; D receives nothing.
Cost for N truncations (the first product's and one per step): rounds N + 1 (the last answer's reshare),
against 2N for N `arith.mul_fx`; bytes per element: per truncation D 12 (+4 for kappa when a step
follows; rb 8 bytes beyond 31 bits, allowed for the last only), A and B 8 each; the reshare 8 each from A
and B: 32 N + 12 over the three ranks, against 44 N.
(Escudero et al. 2020, section 4, for the truncation; the products on its held answer are this
repository's construction, a dealer-assisted Beaver-style product whose triple is the truncation's own
dealt words.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import arith
from .comm import PARTIES
from .party import Party
from .shares import AShare

U64 = np.uint64
_LOW63 = U64((1 << 63) - 1)
# A truncation whose answer feeds another step: h^2 = 2^(126-2d) must vanish in the ring, kappa fit 4 bytes.
CHAINED_MAX_BITS = 31


@dataclass(frozen=True)
class Step:
    """The next product, truncated by `bits`: (left + alpha T) * (right + beta T), T the previous answer.

    left, right: replicated shares broadcast to T's shape, or None (0); alpha, beta: public ring integers
    (0: the factor does not read T)."""

    left: AShare | None
    alpha: int
    right: AShare | None
    beta: int
    bits: int


def _ring_int(v) -> U64:
    return np.asarray(int(v) % (1 << 64), dtype=U64)


def _replicated_terms(step: Step, shape) -> tuple[AShare | None, np.ndarray | None]:
    """(M = beta L1 + alpha L2, this rank's part of L1 L2), each broadcast to `shape`, None where absent."""
    left = None if step.left is None else step.left.broadcast_to(shape)
    right = None if step.right is None else step.right.broadcast_to(shape)
    m = None
    for share, scale in ((left, step.beta), (right, step.alpha)):
        if share is not None and int(scale) % (1 << 64):
            term = arith.mul_public(share, _ring_int(scale))
            m = term if m is None else arith.add(m, term)
    both = None if left is None or right is None else arith._mul_parts(left, right)
    return m, both


def _peak(c: np.ndarray, d: U64) -> np.ndarray:
    """p: the part of the answer that A and B both compute from the opened c."""
    return ((c & _LOW63) >> d) + ((c >> U64(63)) << (U64(63) - d)) - (U64(1) << (U64(62) - d))


def products(party: Party, parts: np.ndarray, bits: int, steps: list[Step]) -> AShare:
    """The answer of the last step, as a replicated share, for a chain that starts from this rank's additive
    part `parts` of a product (`arith._mul_parts` / `_matmul_parts`: |z| < 2^62) truncated by `bits`, then
    runs each Step on the previous answer (see the module doc). Every truncation but the last shifts by at
    most CHAINED_MAX_BITS. Cost in the module doc."""
    shifts = [bits] + [s.bits for s in steps]
    for d in shifts:
        if not 0 < d <= 62:
            raise ValueError(f"chain: truncation by {d} bits: allowed 1..62")
    if any(d > CHAINED_MAX_BITS for d in shifts[:-1]):
        raise ValueError(f"chain: a truncation that feeds a step shifts by at most {CHAINED_MAX_BITS} bits: {shifts}")
    comm, r = party.comm, party.rank
    dealer = party.next_dealer()
    a_rank, b_rank = (dealer + 1) % PARTIES, (dealer + 2) % PARTIES
    shape = parts.shape
    n = parts.size
    z = np.ravel(parts)
    with comm.tag("chain"):
        for i, d_int in enumerate(shifts):
            d = U64(d_int)
            nxt = steps[i] if i < len(steps) else None
            rb_dtype = arith.rb_type(d_int)
            if r == dealer:
                with_a, with_b = party.prg_next, party.prg_prev
                r_a, rc_a, rb_a = with_a.words(n), with_a.words(n), with_a.words(n, rb_dtype)
                rc_b, rb_b = arith.trunc_deal(r_a + with_b.words(n) - z, rc_a, rb_a, d)
                message = [rc_b, rb_b]
                if nxt is not None:
                    z, kappa = _dealer_next(nxt, shape, d, rc_a, rb_a, rc_b, rb_b)
                    message.append(kappa - with_a.words(n, np.uint32))
                comm.exchange({b_rank: arith._pack(*message)}, {})
                continue
            if r == a_rank:
                with_d = party.prg_prev
                r_a, rc_a, rb_a = with_d.words(n), with_d.words(n), with_d.words(n, rb_dtype)
                c_a = z + U64(1 << 62) + r_a
                c = c_a + comm.exchange({b_rank: c_a}, {b_rank: ((n,), U64)})[b_rank]
                y = arith.trunc_finish_a(c, rc_a, rb_a, d)
                kappa = None if nxt is None else with_d.words(n, np.uint32)
            else:
                c_b = z + party.prg_next.words(n)
                rb_bytes = np.dtype(rb_dtype).itemsize
                extra = 0 if nxt is None else 4
                got = comm.exchange(
                    {a_rank: c_b}, {a_rank: ((n,), U64), dealer: ((n * (8 + rb_bytes + extra),), np.uint8)}
                )
                c, dealt = got[a_rank] + c_b, got[dealer]
                rb_end = 8 * n + rb_bytes * n
                y = arith.trunc_finish_b(c, dealt[: 8 * n].view(U64), dealt[8 * n : rb_end].view(rb_dtype), d)
                kappa = None if nxt is None else dealt[rb_end:].view(np.uint32)
            if nxt is not None:
                z = _holder_next(r == a_rank, nxt, shape, d, c, y, kappa)
        return arith.HeldByTwo(dealer, None if r == dealer else y, shape).reshare(party)


def _dealer_next(step: Step, shape, d: U64, rc_a, rb_a, rc_b, rb_b) -> tuple[np.ndarray, np.ndarray]:
    """D's part of the next product (folded into its next mask) and kappa (uint32), from the dealt words of
    the truncation that makes T."""
    m, both = _replicated_terms(step, shape)
    h = U64(63) - d
    u0, u1, v0, v1 = -rc_a, rb_a.astype(U64) << h, -rc_b, rb_b.astype(U64) << h
    ab, ab2 = (_ring_int(k * int(step.alpha) * int(step.beta)) for k in (1, 2))
    part = np.zeros(u0.shape, U64) if both is None else np.ravel(both)
    kappa = np.zeros(u0.shape, U64)
    if m is not None:
        m_d, m_a = np.ravel(m.first), np.ravel(m.second)
        part = part + m_d * (u0 + u1) + m_a * (v0 + v1)
        kappa -= m_d * rb_a.astype(U64) + m_a * rb_b.astype(U64)
    if ab:
        part = part + ab2 * (u0 * v0 + u0 * v1 + u1 * v0)
        kappa -= ab2 * (u0 * rb_b.astype(U64) + rb_a.astype(U64) * v0)
    return part, kappa.astype(np.uint32)


def _holder_next(is_a: bool, step: Step, shape, d: U64, c, y, kappa) -> np.ndarray:
    """A's or B's part of the next product, from the opened c, its answer part y and its share of kappa."""
    m, both = _replicated_terms(step, shape)
    ab = _ring_int(int(step.alpha) * int(step.beta))
    part = np.zeros(y.shape, U64) if both is None else np.ravel(both)
    peak = None if is_a else _peak(c, d)
    if m is not None:
        first, second = np.ravel(m.first), np.ravel(m.second)
        # A holds (M_A, M_B), B holds (M_B, M_D).
        part = part + (first + second) * y + (0 if is_a else second * peak)
    if ab:
        part = part + ab * (y * y if is_a else y * y + U64(2) * peak * y)
    return part + (c >> U64(63)) * (kappa.astype(U64) << (U64(64) - d))
