"""Secure nonlinear functions on fixed-point AShares: PUMA's approximations, three parties.

Every input and output is an AShare with f = party.fxp.frac_bits fractional bits unless a
docstring says otherwise. The approximations and their constants are those of `approx`
(PUMA, Dong et al. 2023, arXiv 2307.12533, section 4); the tests compare each kernel with
the float64 definition there.

Costs. Each function runs under `comm.tag(<its name>)`. Bytes are sent bytes per rank, averaged
over the ranks (the truncation's dealer rotates), per element of the input unless "per row" is
said. In terms of the layer below, at msb_bits L = 48 (bytes per rank / summed over the 3 ranks):
    M  fused multiply-truncate by <= 31 bits (`arith.mul_fx`)   2 rounds  20 B  (60)
    W  fused multiply-truncate by  > 31 bits (8-byte share)     2 rounds  21.3 B (64)
    C  one comparison (`compare.ltz`)                           6 rounds  10.5 B (31.6)
    X  each further threshold of one `less_than_public` batch   (same)     5.8 B (17.5)
    A  `convert.b2a` of one bit                                 2 rounds  10.7 B (32)
    S  `convert.mul_bit`                                        2 rounds  10.7 B (32)
    R  ring product (`arith.mul`, no truncation)                1 round    8 B   (24)
    Z  `convert.select`, one bit and one term, truncation > 31  3 rounds  21.3 B (64),
       each further bit or term 2.7 B (8)
Several products of one step always go out in one batch (`mul_fx` on lists), so a batch costs
the rounds of one. tests/runtime/test_nonlinear.py measures M, W, C, A, S and checks every
function's rounds and bytes against the formula in its docstring (R and Z too).

Two ideas used throughout, beyond PUMA:
- Scales. Products truncate by however many bits keeps the next operand exact
  (`mul_fx(..., bits=)`), so 1 + x/2^t, x/2^s (the polynomials' variable) and the
  higher-precision reciprocal square root cost no extra truncation round.
- Thermometer start. reciprocal and rsqrt compare their (per-row) input with public
  thresholds lo * 2^(j/k) in one batched comparison, b2a the bits, and read a piecewise-constant
  first guess as a public linear combination of the bits: y0 = g_m - sum_j [x < T_j](g_j - g_{j-1}).
  No normalisation by the highest set bit, no extra product: the guess and its square are
  both free linear combinations, and a short series finishes the job in 3-4 batched products.
"""

from __future__ import annotations

import math

import numpy as np

from . import approx, arith, boolean, compare, convert
from .convert import b2a
from .party import Party
from .shares import AShare, stack

# exp_neg's intermediate squares (values in [0, 1]) carry this many fractional bits.
EXP_BITS = 30
# Thresholds per octave of the input range, and the series after the guess (see reciprocal, rsqrt).
RECIP_STEPS_PER_OCTAVE = 2
RSQRT_STEPS_PER_OCTAVE = 4
# Inside softmax, exp's values, their row sum and its reciprocal carry f + 8 bits: the sum of
# n rounded exps would otherwise cost ~sqrt(n)/2 ulp.
SOFTMAX_EXTRA_BITS = 8
# ... while the reciprocal (at most 1, times e <= 1) needs only f + 5: the output product then truncates
# by 13 + f = 31 bits, the most that ships a 4-byte share.
SOFTMAX_INV_BITS = 5
# Taylor coefficients of (1 - r)^(-1/2), k = 0..4, times 2^RSQRT_COEF_BITS (35/128 rounded to 36/128:
# 4.4e-7 at the largest |r|, and the series keeps 2 more bits of room).
RSQRT_COEF_BITS = 5
RSQRT_SERIES = (32, 16, 12, 10, 9)
# r = 1 - x y0^2 and its powers keep up to f + 8 bits when the output's range leaves room.
RSQRT_R_EXTRA_BITS = 8
# LayerNorm / RMSNorm accept var + eps in [NORM_VAR_LO, NORM_VAR_HI].
NORM_VAR_LO = 2.0**-20
NORM_VAR_HI = 2.0**14
# Fractional bits of the norms' 1/sqrt (scaled by 2^p/m ~ 1/16..1/32, see _normalise): its
# smallest value 2^-12 keeps 2^19 steps, its largest 2^6 (x 2.5 below range) times 2^(31 + f + 5) < 2^61,
# and the output product truncates by 31 bits, the most that still ships a 4-byte share (M, not W).
NORM_INV_BITS = 31
# 1/n in the variance's mean carries f + 12 bits; the mean only needs to be close there.
MEAN_EXTRA_BITS = 12
# The output product keeps d * scale with ~4 bits more than f.
CENTER_EXTRA_BITS = 4
# S = sum of squares carries up to f + 8 bits (fewer when the comparison range needs the room).
NORM_SUM_EXTRA_BITS = 8
# Fractional bits of u^2 in the piecewise polynomials (u = x / 2^s, |u| <= 1 where it matters).
PIECEWISE_SQ_BITS = 22
# Ring products before a truncation stay below 2^62 (arith's truncation bound) with this margin.
_HEADROOM = 61


def _encode(v, bits: int) -> np.ndarray:
    """round(v * 2^bits) as ring elements, for constants at a scale other than f."""
    scaled = np.rint(np.asarray(v, dtype=np.float64) * 2.0**bits)
    if not np.all(np.abs(scaled) < 2.0**63):
        raise ValueError(f"constant {v!r} does not fit the ring at 2^{bits}")
    return scaled.astype(np.int64).view(np.uint64)


def _one_minus(party: Party, minus: AShare, bits: int) -> AShare:
    """1 - minus, at scale `bits`."""
    return arith.add_public(party, arith.neg(minus), _encode(1.0, bits))


def _shift(x: AShare, bits: int) -> AShare:
    """x * 2^bits, exact and local."""
    return arith.mul_public(x, np.uint64(1) << np.uint64(bits))


def _lin(party: Party, terms: list[tuple[AShare, float, int]], const: float, bits: int) -> AShare:
    """const + sum c * x at scale `bits`, each x at scale s_x given as (x, c, bits - s_x): local."""
    out = None
    for x, c, cbits in terms:
        t = arith.mul_public(x, _encode(c, cbits))
        out = t if out is None else arith.add(out, t)
    return arith.add_public(party, out, _encode(const, bits))


# ----------------------------------------------------------------------------- thermometer


def _thermometer(party: Party, x: AShare, thresholds: np.ndarray, bits: int) -> AShare:
    """[x < T_j] for each public threshold (x at scale `bits`), as integer 0/1 AShares on a new trailing axis.

    One `less_than_public` batch and one batched b2a: C + A rounds, C + (len(T) - 1) X + len(T) A bytes
    per element of x.
    """
    below = compare.less_than_public(party, x, [_encode(t, bits) for t in thresholds])
    return stack(b2a(party, below), axis=-1)


def _steps(party: Party, below: AShare, values: np.ndarray, bits: int) -> AShare:
    """The step function values[i] on [T_i, T_{i+1}) from the thermometer bits `below`, at 2^bits.

    g(x) = g_m - sum_j [x < T_j] (g_j - g_{j-1}): a public linear combination, local.
    The encodings are differenced in the ring, so the result is exactly an encoded g_i.
    """
    g = _encode(values, bits)
    return arith.add_public(party, arith.neg(arith.mul_public(below, g[1:] - g[:-1]).sum(axis=-1)), g[-1])


def _grid(lo: float, hi: float, per_octave: int) -> np.ndarray:
    """Edges lo * 2^(j / per_octave) covering [lo, hi]."""
    if not 0 < lo < hi:
        raise ValueError(f"input range must satisfy 0 < lo < hi, got [{lo}, {hi}]")
    steps = max(1, math.ceil(per_octave * math.log2(hi / lo) - 1e-9))
    return lo * 2.0 ** (np.arange(steps + 1) / per_octave)


# ----------------------------------------------------------------------------- exp


def exp_neg(party: Party, x: AShare) -> AShare:
    """exp(x) for x <= 0 as PUMA: (1 + x/2^t)^(2^t) on [EXP_CLIP, 0], 0 below EXP_CLIP (t = EXP_SQUARINGS).

    1 + x/2^t is x + 2^(f+t) read at scale f+t (free). The squares (all <= 1) carry as many bits as
    keep every truncation within 31 bits (4-byte dealt shares; see `_square_scales`); the last
    square is a plain ring product whose truncation rides in the clip's `convert.select`.
    The clip: PUMA's value below EXP_CLIP is under 1e-8 (0.003 ulp) and exactly 0 at x = -2^t, so
    any cut in [-2^t, EXP_CLIP] is as good as EXP_CLIP's; the comparison with -2^t ignores the carry
    of the low f + 4 bits (convert.msb's drop), which moves the cut by less than 16 (to -16 at most).
    Valid for x in [-8000, 0] (the first square stays below 2^62); further down the clip still
    gives 0 (the garbage is multiplied by an exact 0), as far as the comparison reaches, |x| < 2^(L-1-f).
    Error: 1 ulp against approx.exp_neg; approx.exp_neg is 0.0085 from exp on [-40, 0].
    Rounds C + 2(t-1) + 1 + 3 = 18; bytes C' + 4M + R + Z' per element, C' the comparison on
    L - f - 4 bits (16.8 B over the ranks at L = 48), Z' = select of one bit and term with a
    truncation within 31 bits (60 B): 340.8 B over the three ranks (was 415.9). PUMA section 4.2.
    """
    with party.comm.tag("exp_neg"):
        return _exp_neg(party, x, party.fxp.frac_bits)


def _square_scales(first: int, out: int, t: int) -> list[int]:
    """Scales of the t squares ending at `out`, each at most EXP_BITS, every truncation within 31 bits."""
    scales = [out]
    for _ in range(t - 1):
        scales.insert(0, min(EXP_BITS, (31 + scales[0]) // 2))
    if 2 * first - scales[0] > 31:
        raise ValueError(f"exp_neg: no 31-bit schedule from scale {first} to {out}")
    return scales


def _exp_neg(party: Party, x: AShare, bits: int) -> AShare:
    """exp_neg with the result at scale `bits`."""
    f, t = party.fxp.frac_bits, approx.EXP_SQUARINGS
    slack = math.floor(math.log2(2.0**t + approx.EXP_CLIP))
    below = convert.msb(party, arith.add_public(party, x, _encode(2.0**t, f)), drop=f + slack)
    y = arith.add_public(party, x, _encode(1.0, f + t))
    scale = f + t
    scales = _square_scales(scale, bits, t)
    for out in scales[:-1]:
        y = arith.mul_fx(party, y, y, bits=2 * scale - out)
        scale = out
    return convert.select(party, [(boolean.not_(party, below), arith.mul(party, y, y))], 2 * scale - bits)


# ----------------------------------------------------------------------------- reciprocal


def reciprocal(party: Party, x: AShare, lo: float = 1.0, hi: float = 1024.0) -> AShare:
    """1/x for x in [lo, hi] (public bounds; softmax passes [1, row length]).

    Guess y0 = 2/(a+b) on each half-octave [a, b) of [lo, hi] from a thermometer (free linear
    combination), then Goldschmidt: r = 1 - x y0, y = y0 (1+r)(1+r^2)(1+r^4): |r| <= 0.1716, so the
    relative error is r^8 <= 7.5e-7 before fixed-point rounding; measured on [1, 128]: 3.8 ulp
    absolute. Outside [lo, hi] the guess is that of the nearest end and the error grows (it
    diverges beyond 2 hi).
    Rounds C + A + 8 = 16; bytes per row C + (k-2)X + (k-1)A + 6M with k = ceil(2 log2(hi/lo)) intervals
    (softmax over 128: 13 thresholds, 305 B per row).
    Why: SPU normalises by the highest set bit (a bit decomposition) and runs 2 Goldschmidt steps
    from 2.9142 - 2c, |1 - c w0| <= 0.0858, so 5.4e-5 relative; CrypTen's Newton from
    3 exp(0.5 - x) + 0.003 needs an exp and ~10 dependent Newton steps on [1, 128] (> 50 rounds).
    Here the rounds are one comparison, one b2a and 4 products, and the comparisons are per row.
    """
    with party.comm.tag("reciprocal"):
        return _reciprocal(party, x, party.fxp.frac_bits, lo, hi, party.fxp.frac_bits)


def _reciprocal(party: Party, x: AShare, in_bits: int, lo: float, hi: float, bits: int) -> AShare:
    """1/x at scale `bits` for x at scale in_bits: y, r and their products all carry `bits` bits."""
    edges = _grid(lo, hi, RECIP_STEPS_PER_OCTAVE)
    below = _thermometer(party, x, edges[1:-1], in_bits)
    y = _steps(party, below, 2.0 / (edges[:-1] + edges[1:]), bits)
    r = _one_minus(party, arith.mul_fx(party, x, y, bits=in_bits), bits)
    yr, r2 = arith.mul_fx(party, [y, r], [r, r], bits=bits)
    y = arith.add(y, yr)
    yr2, r4 = arith.mul_fx(party, [y, r2], [r2, r2], bits=bits)
    y = arith.add(y, yr2)
    return arith.add(y, arith.mul_fx(party, y, r4, bits=bits))


# ----------------------------------------------------------------------------- rsqrt


def _rsqrt(party: Party, x: AShare, in_bits: int, lo: float, hi: float, gain: float, out_bits: int, ride=None):
    """gain / sqrt(x) for x (at scale in_bits) in [lo, hi], at 2^out_bits; see rsqrt.

    Guess on quarter-octaves [a, b): g with g^2 = 2/(a+b), so r = 1 - x g^2 lies in +-0.0864.
    g^2 is a linear combination of the bits like g, at scale 60 - in_bits so that x g^2 ~ 1 fills
    the ring. (1 - r)^(-1/2) = sum_k C(2k,k)/4^k r^k to degree 4 (error <= 0.246 r^5 = 1.2e-6, and
    4.4e-7 from rounding 35/128 to 9/32).
    Batches: x g^2; r^2; r^3 and r^4; g * series.
    `ride` = (a, b, p): the caller's a * b / 2^p (a, b at f, result at f) goes out in the r^2 batch.
    Returns (result, ride product or None).
    """
    f = party.fxp.frac_bits
    edges = _grid(lo, hi, RSQRT_STEPS_PER_OCTAVE)
    g2 = 2.0 / (edges[:-1] + edges[1:])
    below = _thermometer(party, x, edges[1:-1], in_bits)
    sq_bits = _HEADROOM - 1 - in_bits
    # r and its powers carry rb bits, as many as the last product (result times series <= 2.5) allows.
    top = math.log2(2.5 * gain / math.sqrt(lo))
    rb = f + max(0, min(RSQRT_R_EXTRA_BITS, math.floor(_HEADROOM - out_bits - f - RSQRT_COEF_BITS - top)))
    r = _one_minus(party, arith.mul_fx(party, x, _steps(party, below, g2, sq_bits), bits=sq_bits + in_bits - rb), rb)
    if ride is None:
        r2, ridden = arith.mul_fx(party, r, r, bits=rb), None
    else:
        a, b, p = ride
        r2, ridden = arith.mul_fx(party, [r, a], [_shift(r, p), _shift(b, rb - f)], bits=rb + p)
    r3, r4 = arith.mul_fx(party, [r, r2], [r2, r2], bits=rb)
    c = RSQRT_SERIES
    series = _lin(party, [(r, c[1], 0), (r2, c[2], 0), (r3, c[3], 0), (r4, c[4], 0)], 1.0, rb + RSQRT_COEF_BITS)
    guess = _steps(party, below, gain * np.sqrt(g2), out_bits)
    return arith.mul_fx(party, guess, series, bits=rb + RSQRT_COEF_BITS), ridden


def rsqrt(party: Party, x: AShare, lo: float = 2.0**-10, hi: float = 2.0**10) -> AShare:
    """1/sqrt(x) for x in [lo, hi] (public bounds, lo >= 2^-(f+3)); the norms use the same kernel.

    Idea: a piecewise-constant guess from a quarter-octave thermometer, then the binomial series
    of (1 - r)^(-1/2) to degree 4, r = 1 - x y0^2 (|r| <= 0.0864): relative error <= 1.7e-6
    (1.2e-6 truncation of the series, 4.4e-7 from coefficients on a 2^-5 grid) plus fixed-point
    rounding. No highest-set-bit normalisation (SPU), no Newton loop.
    Measured on [2^-10, 2^10]: within 2e-6 relative + 2 ulp.
    Rounds C + A + 8 = 16; bytes per row C + (k-2)X + (k-1)A + 4M + W with k = ceil(4 log2(hi/lo))
    intervals (79 thresholds for the default range: 1.2 KB per row).
    """
    f = party.fxp.frac_bits
    if lo < 2.0 ** -(f + 3):
        raise ValueError(f"rsqrt: lo = {lo} is below 2^-{f + 3}, the smallest input range this fixed point supports")
    with party.comm.tag("rsqrt"):
        return _rsqrt(party, x, f, lo, hi, 1.0, f)[0]


# ----------------------------------------------------------------------------- GeLU, SiLU


def _max_abs(poly, lo: float, hi: float) -> float:
    """max |poly| on [lo, hi] (coefficients from the constant term up), on a fine grid."""
    return float(np.abs(approx.poly(np.linspace(lo, hi, 4097), tuple(poly))).max())


def _piecewise(party: Party, x: AShare, breaks, low, mid) -> AShare:
    """0 below breaks[0], `low` (degree <= 3) up to breaks[1], `mid` (even degree <= 6 plus a linear term) up to
    breaks[2], x above.

    Variable u = x / 2^s with 2^s >= |breaks[1]|, |breaks[2]| (x read at scale q = f + s, free), so |u| <= 1
    on mid's segment; s2 = u^2. Two truncations and two plain ring products:
      s2 = u u, truncated to PIECEWISE_SQ_BITS;  T = s2 (m4 + m6 s2), truncated so that s2 T lands at K;
      ring: s2 T and (low only) s2 (l2 + l3 u), both at K (the largest scale that keeps |mid| < 2^62).
    mid = m0 + m1 u + m2 s2 + s2 T and low = l0 + l1 u + s2 (l2 + l3 u) are then local, at scale K.
    Selection with the three bits b_i = [x < breaks_i] of one batched comparison, fused with the one
    rescale to f (`convert.select`): b2 mid + b1 (low - mid) - b0 low, plus x - b2 x untruncated.
    Values outside their own segment (even wrapped ones) are multiplied by an exact 0 or cancel
    in the ring, so the result is right for every x the comparison can take; only the segments'
    own ranges bound the scales.
    """
    f = party.fxp.frac_bits
    if len(low) > 4 or len(mid) > 7 or any(c != 0.0 for c in mid[3::2]):
        raise ValueError("_piecewise takes a cubic and an even sextic plus a linear term")
    s = math.ceil(math.log2(max(abs(breaks[1]), abs(breaks[2]))))
    q = f + s
    lw = [c * 2.0 ** (s * k) for k, c in enumerate(low)] + [0.0] * (4 - len(low))
    md = [c * 2.0 ** (s * k) for k, c in enumerate(mid)] + [0.0] * (7 - len(mid))
    # Bounds on the segments, in u: mid's segment, and T = s2 (m4 + m6 s2) there.
    u_lo, u_hi = breaks[1] / 2.0**s, breaks[2] / 2.0**s
    t_max = _max_abs([0.0, 0.0, md[4], 0.0, md[6]], u_lo, u_hi)
    k_out = math.floor(61.9 - math.log2(max(_max_abs(md, u_lo, u_hi), _max_abs(lw, breaks[0] / 2.0**s, u_lo))))
    sq = PIECEWISE_SQ_BITS
    e = math.floor(61.9 - math.log2(t_max) - sq)  # scale of m4 + m6 s2, so that s2 (m4 + m6 s2) < 2^62
    u = x

    # The three comparisons in one batch, rank 0's part of it sent once.
    b0, b1, b2 = compare.less_than_public(party, x, [_encode(b, f) for b in breaks])

    s2 = arith.mul_fx(party, u, u, bits=2 * q - sq)
    t = arith.mul_fx(party, s2, _lin(party, [(s2, md[6], e - sq)], md[4], e), bits=sq + e - (k_out - sq))
    products = [(s2, t)]
    if lw[3] != 0.0:
        products.append((s2, _lin(party, [(u, lw[3], k_out - sq - q)], lw[2], k_out - sq)))
    ring = arith.mul(party, [a for a, _ in products], [b for _, b in products])
    mid_v = arith.add(_lin(party, [(u, md[1], k_out - q), (s2, md[2], k_out - sq)], md[0], k_out), ring[0])
    low_terms = [(u, lw[1], k_out - q)] + ([] if lw[3] != 0.0 else [(s2, lw[2], k_out - sq)])
    low_v = _lin(party, low_terms, lw[0], k_out)
    if lw[3] != 0.0:
        low_v = arith.add(low_v, ring[1])
    picked = convert.select(
        party,
        [(b2, mid_v), (b1, arith.sub(low_v, mid_v)), (b0, arith.neg(low_v))],
        k_out - f,
        [(b2, arith.neg(x))],
    )
    return arith.add(x, picked)


def gelu(party: Party, x: AShare) -> AShare:
    """PUMA's GeLU: 0 | F0 (cubic) | F1 (degree 6, even + x/2) | x, breaks -4, -1.95, 3 (approx.GELU_*).

    See `_piecewise`: 3 comparisons in one batch, 2 truncated and 2 plain products, one select (3 bits,
    4 terms) that also rescales. Measured error vs approx.gelu 1.3 ulp on [-6, 6]; approx.gelu is
    0.0199 from the exact GeLU (at its jump at x = 3; 0.0140 elsewhere).
    Rounds C + 2 + 2 + 1 + 3 = 14; bytes C + 2X + 2M + 2R + Z + 5 * 8 / 3 = 112.9 per element per rank
    (338.6 over the three; was 655 with 5 truncations and 3 mul_bits). PUMA section 4.3.
    """
    with party.comm.tag("gelu"):
        return _piecewise(party, x, approx.GELU_BREAKS, approx.GELU_F0, approx.GELU_F1)


def silu(party: Party, x: AShare) -> AShare:
    """PUMA's SiLU: 0 | quadratic | degree 6 | x, breaks -8, -4, 4 (approx.SILU_*); as gelu.

    Measured error vs approx.silu 1.7 ulp on [-10, 10]; approx.silu jumps 0.072 away from the exact
    SiLU at x = 4. Rounds 14 as gelu; bytes as gelu less one ring product (the quadratic needs none):
    C + 2X + 2M + R + Z + 5 * 8 / 3 = 104.9 per element per rank. PUMA section 4.3.
    """
    with party.comm.tag("silu"):
        return _piecewise(party, x, approx.SILU_BREAKS, approx.SILU_S0, approx.SILU_S1)


# ----------------------------------------------------------------------------- softmax


def softmax(party: Party, x: AShare, mask: np.ndarray | None = None) -> AShare:
    """Softmax over the last axis with PUMA's exp; mask (public bool, broadcastable, False = weight 0).

    max over kept positions (masked ones are first overwritten, locally, with the row's first kept
    element, so no sentinel value has to fit the ring), e = exp_neg(x - max) * mask, ONE reciprocal
    per row of the sum (in [1, n]: the max contributes exp(0) = 1; kept at f + 8 bits), then a
    broadcast product.
    A row with no kept position gives 0 (approx.softmax gives NaN there; the ONNX export maps it to 0).
    Measured error vs approx.softmax 1.1 ulp; approx.softmax is up to ~0.035 from the exact softmax.
    The reciprocal carries f + 5 bits (enough against e <= 1), so the output product truncates by 31.
    Rounds ceil(log2 n) (C + S) + 18 (exp) + 16 (reciprocal) + 2 = 8 ceil(log2 n) + 36 (92 for
    n = 128); bytes per element (n-1)/n (C + S) [max] + exp's + M [product], plus the reciprocal's
    305 B per row at n = 128: 157.0 B per element per rank there (471 over the three; was 603).
    PUMA section 4.2.
    """
    f = party.fxp.frac_bits
    n = x.shape[-1]
    with party.comm.tag("softmax"):
        keep = None
        if mask is not None:
            keep = np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
            first = np.argmax(keep, axis=-1)[..., None]
            filler = AShare(np.take_along_axis(x.first, first, -1), np.take_along_axis(x.second, first, -1))
            x = arith.add(arith.mul_public(arith.sub(x, filler), keep.astype(np.int64)), filler)
        top = compare.max(party, x, axis=-1, keepdims=True)
        with party.comm.tag("exp_neg"):
            e = _exp_neg(party, arith.sub(x, top), f + SOFTMAX_EXTRA_BITS)
        if keep is not None:
            e = arith.mul_public(e, keep.astype(np.int64))
            empty = ~keep.any(axis=-1, keepdims=True)
            total = arith.add_public(
                party, e.sum(axis=-1, keepdims=True), _encode(empty.astype(np.float64), f + SOFTMAX_EXTRA_BITS)
            )
        else:
            total = e.sum(axis=-1, keepdims=True)
        with party.comm.tag("reciprocal"):
            inv = _reciprocal(party, total, f + SOFTMAX_EXTRA_BITS, 1.0, float(max(n, 2)), f + SOFTMAX_INV_BITS)
        return arith.mul_fx(party, e, inv, bits=f + SOFTMAX_EXTRA_BITS + SOFTMAX_INV_BITS)


# ----------------------------------------------------------------------------- norms


def _sum_squares_bits(party: Party, n: int) -> int:
    """Extra fractional bits for S = sum d^2: as many as the comparison's range leaves at S = n * NORM_VAR_HI."""
    room = party.msb_bits - 2 - party.fxp.frac_bits - math.ceil(math.log2(n * NORM_VAR_HI))
    return max(0, min(NORM_SUM_EXTRA_BITS, room))


def _normalise(party: Party, d: AShare, fine: AShare, mult: int, scale: AShare, eps: float) -> AShare:
    """scale * d / sqrt(mean(d^2) + eps) over the last axis (the shared tail of layer_norm and rms_norm).

    `fine` = mult * d exactly (LayerNorm: n x - sum x, no rounded 1/n; RMSNorm: 16 x), so the
    output keeps the centring exact and log2(mult) extra bits. S = sum d^2 is one fixed-point
    matmul per row (one truncation; bytes per row, not per element) with a few extra bits.
    The rsqrt returns 2^p sqrt(n) / (mult sqrt(S + n eps)) at NORM_INV_BITS, while
    fine * scale / 2^p (p = log2(mult) - 4, so the factor is 16..32) rides in its r^2 batch:
    one more full-size product gives the result. Needs mult |d scale| < 2^26 and |result| < 2^13.
    Rounds 2 + R_C + R_A + 8 + 2; bytes/elem 2M, plus per row M + rsqrt's.
    """
    f = party.fxp.frac_bits
    n = d.shape[-1]
    e = _sum_squares_bits(party, n)
    ss = arith.matmul_fx(party, d.expand_dims(-2), d.expand_dims(-1), bits=f - e)[..., 0]
    ss = arith.add_public(party, ss, _encode(n * eps, f + e))
    p = max(0, int(math.floor(math.log2(mult))) - CENTER_EXTRA_BITS)
    gain = math.sqrt(n) * 2.0**p / mult
    lo, hi = n * NORM_VAR_LO, n * NORM_VAR_HI
    inv, ds = _rsqrt(party, ss, f + e, lo, hi, gain, NORM_INV_BITS, (fine, scale, p))
    return arith.mul_fx(party, ds, inv, bits=NORM_INV_BITS)


def layer_norm(party: Party, x: AShare, scale: AShare, bias: AShare, eps: float) -> AShare:
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias; scale, bias secret.

    The variance's mean: local row sum times 1/n at f + 12 bits, one truncation per row; the
    output's centring is exact (n x - sum x, see `_normalise`). Then var via one matmul per row,
    1/sqrt per row (thermometer + binomial series, see rsqrt) and two full-size products.
    Ranges: var + eps in [2^-20, 2^14] (~1e-6 .. 1.6e4), n (var + eps) < 2^26, n |(x - mean) scale|
    < 2^26, |result - bias| < 2^13; the row mean only needs |mean| < 2^(26 - 12).
    Rounds 2 + 2 + R_C + R_A + 8 + 2 (= 22 at L = 48); bytes/elem 2M, plus per row 5M + W + T (the
    mean's truncation, 44 B over the ranks) + C + (k-2)X + (k-1)A with k = 4*34 = 136 intervals (see
    the module docstring). PUMA 4.4.
    """
    f = party.fxp.frac_bits
    n = x.shape[-1]
    with party.comm.tag("layer_norm"):
        total = x.sum(axis=-1, keepdims=True)
        cut = f + MEAN_EXTRA_BITS
        mean = arith.truncate(party, arith.mul_public(total, _encode(1.0 / n, cut)), cut)
        d = arith.sub(x, mean)
        centred = arith.sub(arith.mul_public(x, n), total)
        return arith.add(_normalise(party, d, centred, n, scale, eps), bias)


def rms_norm(party: Party, x: AShare, scale: AShare, eps: float) -> AShare:
    """RMSNorm over the last axis (LLaMA): x / sqrt(mean(x^2) + eps) * scale; scale secret.

    `_normalise` without the mean; ranges as layer_norm's with 16 |x scale| < 2^26.
    Rounds 2 + R_C + R_A + 8 + 2 (= 20 at L = 48); bytes/elem 2M, plus per row 5M + W + C + (k-2)X + (k-1)A.
    """
    with party.comm.tag("rms_norm"):
        return _normalise(party, x, _shift(x, CENTER_EXTRA_BITS), 2**CENTER_EXTRA_BITS, scale, eps)
