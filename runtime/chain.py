"""Fixed-point products in sequence on one dealer: each truncation's answer stays 2-of-2 for the next.

The dealer-aided truncation (`arith._truncate_two`: dealer D, A = D+1, B = D+2) leaves
    A: y_A = p + u,   B: y_B = v,
with p = (c mod 2^63) >> d + 2^(63-d) msb(c) - 2^(62-d) (`arith.trunc_public`) public to A and B, and, for
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

from . import arith, convert
from .comm import PARTIES
from .party import Party
from .shares import AShare, BShare

U64 = np.uint64
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
        scale = int(scale) % (1 << 64)
        if share is not None and scale:
            term = share if scale == 1 else arith.mul_public(share, _ring_int(scale))
            m = term if m is None else arith.add(m, term)
    both = None if left is None or right is None else arith.mul_local(left, right)
    return m, both


def _plus(part: np.ndarray | None, term: np.ndarray) -> np.ndarray:
    return term if part is None else part + term


def _times(k: U64, x: np.ndarray) -> np.ndarray:
    return x if k == 1 else k * x


@dataclass
class Held:
    """A chain's last answer before its reshare: A holds y = p + u, B holds y = v, both hold the opened c
    (`part`, `opened`); the dealer holds u0 + v0 + u1 + v1 and rb_A + rb_B (`dealt`), what `times_bit` needs."""

    dealer: int
    shape: tuple[int, ...]
    bits: int
    part: np.ndarray | None = None
    opened: np.ndarray | None = None
    dealt: tuple[np.ndarray, np.ndarray] | None = None

    def reshare(self, party: Party) -> AShare:
        """The replicated share (`arith.reshare_from_two`): 1 round, 8 B per element from A and from B."""
        part = None if self.part is None else np.ravel(self.part)
        return arith.HeldByTwo(self.dealer, part, self.shape).reshare(party)


def products(
    party: Party, parts: np.ndarray, bits: int, steps: list[Step], dealer: int | None = None, held: bool = False
) -> AShare | Held:
    """The answer of the last step, as a replicated share, for a chain that starts from this rank's additive
    part `parts` of a product (`arith.mul_local` / `matmul_local`: |z| < 2^62) truncated by `bits`, then
    runs each Step on the previous answer (see the module doc); every step's product must keep |P| < 2^62 too.
    Every truncation but the last shifts by at most CHAINED_MAX_BITS. `dealer`: the chain's dealer (default:
    the next in turn, `party.next_dealer`); `held`: the last answer before its reshare (`Held`: a round and
    16 B per element less). Cost in the module doc."""
    shifts = [bits] + [s.bits for s in steps]
    for d in shifts:
        if not 0 < d <= 62:
            raise ValueError(f"chain: truncation by {d} bits: allowed 1..62")
    if any(d > CHAINED_MAX_BITS for d in shifts[:-1]):
        raise ValueError(f"chain: a truncation that feeds a step shifts by at most {CHAINED_MAX_BITS} bits: {shifts}")
    comm, r = party.comm, party.rank
    dealer = party.next_dealer() if dealer is None else dealer
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
                if nxt is None:  # what times_bit needs of the last answer
                    rb = rb_a + rb_b
                    last = (-rc_a - rc_b + (rb.astype(U64) << (U64(63) - d)), rb)
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
        if r == dealer:
            out = Held(dealer, shape, shifts[-1], dealt=last)
        else:
            out = Held(dealer, shape, shifts[-1], part=y.reshape(shape), opened=c.reshape(shape))
        return out if held else out.reshare(party)


def times_bit(party: Party, b: BShare, value: Held) -> AShare:
    """b * value for a one-row boolean share b of value's shape and a chain's answer held with rank 0 as its
    dealer, as a replicated share: `convert.mul_bit` without the reshare before it.

    Idea: b = c ^ t with c = b_0 ^ b_1 known to rank 0 and t = b_2 to ranks 1 and 2 (A and B), so
    b y = c y (1 - 2t) + t y, and t y is A's t y_A plus B's t y_B. With y = p + (u0 + v0 + u1 + v1) -
    2 msb(c') (u1 + v1) (c' the chain's opened word, p public to A and B), rank 0 sends A
    alpha = c - rho_1, beta = c (u0 + v0 + u1 + v1) - rho_2 and gamma = c (rb_A + rb_B) - rho_3 (so that
    2 c (u1 + v1) = 2^(64-d) c (rb_A + rb_B)), rho from k_0, which B holds too: A takes
    alpha p + beta - msb(c') 2^(64-d) gamma, B rho_1 p + rho_2 - msb(c') 2^(64-d) rho_3, the two halves of c y.
    Then `arith.reshare_from_two` with rank 0 as the dealer.
    Security: A receives words masked by k_0, which it lacks; B receives nothing here.
    Rounds 2; bytes per element: rank 0 20 (24 beyond 31 bits), A and B 8 each (36 over the three ranks,
    against 16 for the chain's reshare and 32 for a `convert.mul_bit` after it)."""
    if value.dealer != 0:
        raise ValueError(f"times_bit takes a chain dealt by rank 0 (which knows c of the bit), not by {value.dealer}")
    r, shape, n = party.rank, value.shape, int(np.prod(value.shape))
    d = U64(value.bits)
    wide = arith.rb_type(value.bits)
    with party.comm.tag("times_bit"):
        words = convert._bit_words(party, b, shape)
        if r == 0:
            rho = party.prg_prev
            w, rb = value.dealt
            alpha = words - rho.words(n)
            beta = words * np.ravel(w) - rho.words(n)
            gamma = (words * np.ravel(rb).astype(U64)).astype(wide) - rho.words(n, wide)
            party.comm.exchange({1: arith._pack(alpha, beta, gamma)}, {})
            part = None
        else:
            p, top = np.ravel(arith.trunc_public(value.opened, d)), np.ravel(value.opened) >> U64(63)
            if r == 1:
                size = np.dtype(wide).itemsize
                got = party.comm.exchange({}, {0: ((n * (16 + size),), np.uint8)})[0]
                alpha, beta, gamma = got[: 8 * n].view(U64), got[8 * n : 16 * n].view(U64), got[16 * n :].view(wide)
            else:
                rho = party.prg_next
                alpha, beta, gamma = rho.words(n), rho.words(n), rho.words(n, wide)
                party.comm.exchange({}, {})
            cy = alpha * p + beta - top * (gamma.astype(U64) << (U64(64) - d))
            part = cy * (U64(1) - U64(2) * words) + words * np.ravel(value.part)
        return arith.reshare_from_two(party, 0, part, (n,)).reshape(shape)


def _dealer_next(step: Step, shape, d: U64, rc_a, rb_a, rc_b, rb_b) -> tuple[np.ndarray, np.ndarray]:
    """D's part of the next product (folded into its next mask) and kappa (uint32), from the dealt words of
    the truncation that makes T. The terms with u1 = 2^h rb_A and v1 = 2^h rb_B (h = 63 - d) are kappa's terms
    shifted by h, so each product is taken once."""
    m, both = _replicated_terms(step, shape)
    h = U64(63) - d
    rb_a, rb_b = rb_a.astype(U64), rb_b.astype(U64)
    ab2 = _ring_int(2 * int(step.alpha) * int(step.beta))
    part, kappa = (None if both is None else np.ravel(both)), None
    if m is not None:
        m_d, m_a = np.ravel(m.first), np.ravel(m.second)
        k = m_d * rb_a + m_a * rb_b
        part = _plus(part, (k << h) - m_d * rc_a - m_a * rc_b)  # M_D (u0 + u1) + M_A (v0 + v1)
        kappa = -k
    if ab2:
        k = rb_b * rc_a + rb_a * rc_b  # -(u0 rb_B + rb_A v0)
        # 2 ab (u0 v0 + u0 v1 + u1 v0) = 2 ab (rc_A rc_B - 2^h k)
        part = _plus(part, _times(ab2, rc_a * rc_b - (k << h)))
        kappa = _plus(kappa, _times(ab2, k))
    zeros = np.zeros(rc_a.shape, U64)
    return (zeros if part is None else part), (zeros if kappa is None else kappa).astype(np.uint32)


def _holder_next(is_a: bool, step: Step, shape, d: U64, c, y, kappa) -> np.ndarray:
    """A's or B's part of the next product, from the opened c, its answer part y and its share of kappa."""
    m, both = _replicated_terms(step, shape)
    ab = _ring_int(int(step.alpha) * int(step.beta))
    part = None if both is None else np.ravel(both)
    public = None if is_a else arith.trunc_public(c, d)
    if m is not None:
        first, second = np.ravel(m.first), np.ravel(m.second)
        # A holds (M_A, M_B): (M_A + M_B) y_A; B holds (M_B, M_D): (M_B + M_D) y_B + M_D p.
        part = _plus(part, (first + second) * y if is_a else (first + second) * y + second * public)
    if ab:
        # A: y_A^2; B: y_B^2 + 2 p y_B.
        part = _plus(part, _times(ab, y * y if is_a else y * (y + (public << U64(1)))))
    correction = (c >> U64(63)) * (kappa.astype(U64) << (U64(64) - d))
    return correction if part is None else part + correction
