"""Secure nonlinear functions on fixed-point AShares, three parties, after PUMA's designs.

Every input and output is an AShare with f = party.fxp.frac_bits fractional bits unless a
docstring says otherwise. The approximations and their constants are those of `approx`, either set:
`refit` (GeLU and SiLU in two pieces, 0 | x/2 + an even degree-8 polynomial on [-T, T) | x, 19% fewer
bytes than PUMA's three; exp a degree-4 base squared three times, at PUMA's cost; the same rounds), or
PUMA's (Dong et al. 2023, arXiv 2307.12533, section 4); the tests compare each kernel with the float64
definition there.
Each function's docstring states its domain: the inputs where its error bound holds.

Costs. Each function runs under `comm.tag(<its name>)`. Bytes are sent bytes per rank, averaged
over the ranks (the truncation's dealer rotates), per element of the input unless "per row" is
said. In terms of the layer below, at msb_bits L = 48 (bytes per rank / summed over the 3 ranks):
    M  fused multiply-truncate by <= 31 bits (`arith.mul_fx`)   2 rounds  14.7 B (44)
    W  fused multiply-truncate by  > 31 bits (8-byte share)     2 rounds  16 B   (48)
    C  one comparison (`compare.ltz`)                           6 rounds  10.5 B (31.6)
    X  each further threshold of one `less_than_public` batch   (same)     5.8 B (17.5)
    A  `convert.b2a` of one bit                                 2 rounds   8 B   (24)
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
  both free linear combinations, and a short series finishes the job in 2-3 batched products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import approx, arith, boolean, chain, compare, convert
from .parallel import parallel
from .convert import b2a
from .party import Party
from .shares import AShare, stack

# exp_neg's intermediate squares (values in [0, 1]) carry this many fractional bits.
EXP_BITS = 30
# A polynomial exp base: y^2 (<= 4) carries EXP_SQ_BITS bits, the bracket times it 2^60 in all, so the
# bracket's c4 y^2 term takes c4 at 60 - 2 EXP_SQ_BITS bits: fewer bits for y^2 round it more (noise, +-4
# 2^-a relative near x = 0), more round c4 more (a bias where y^4 weighs, near x = -4). Measured at f + 8
# bits (the softmax's exp), f = 18, 2026-12-02: a = 24 erred +85 2^-26 on average at x = -4 (a bias the row
# sum collected: up to 3.5 ulp beyond the softmax's cut allowance), a = 20 up to 238 2^-26 near 0 (3.9 ulp at
# f = 20), a = 22 -8 on average and 60 at most: 1.1 ulp at f = 18 and 1.7 at f = 20 against the definition.
EXP_SQ_BITS = 22
# Thresholds per octave of the input range, and the series after the guess (see reciprocal, rsqrt).
RECIP_STEPS_PER_OCTAVE = 2
RSQRT_STEPS_PER_OCTAVE = 8
# Inside softmax, exp's values, their row sum and its reciprocal carry f + 8 bits: the sum of
# n rounded exps would otherwise cost ~sqrt(n)/2 ulp.
SOFTMAX_EXTRA_BITS = 8
# The softmax's max may fall this many bits of the fixed point short of the row's maximum per level of its
# tree (exp then reads inputs up to ceil(log2 n) 2^-12 above 0, which it takes like those below).
SOFTMAX_MAX_SLACK = 12
# ... while the reciprocal (at most 1, times e <= 1) needs only f + 5: the output product then truncates
# by 13 + f = 31 bits, the most that ships a 4-byte share.
SOFTMAX_INV_BITS = 5
# Taylor coefficients of (1 - r)^(-1/2), k = 0..3, times 2^RSQRT_COEF_BITS (exact: 1, 1/2, 3/8, 5/16).
RSQRT_COEF_BITS = 5
RSQRT_SERIES = (32, 16, 12, 10)
# r = 1 - x y0^2 and its powers keep up to f + 8 bits when the output's range leaves room.
RSQRT_R_EXTRA_BITS = 8
# rsqrt normalises x by its octave when g^2 would otherwise keep fewer than RSQRT_MIN_BITS bits; the
# normalised x and g^2 then carry RSQRT_NORM_BITS bits each.
RSQRT_MIN_BITS = 20
RSQRT_NORM_BITS = 30
# LayerNorm / RMSNorm: var + eps below NORM_VAR_LO is read as NORM_VAR_LO.
NORM_VAR_LO = 2.0**-20
# A norm's domain must leave its output about this many significant bits at the domain's ends.
NORM_MIN_PRECISION_BITS = 8
# Below this many bits at the ends of its range, a norm's rsqrt normalises S by its octave (+2 rounds per norm).
NORM_SINGLE_BITS = 16
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
# Fractional bits of s = x^2 / 2^k, w = s - c and w^2 in the piecewise polynomials (|w| <= 1 where it
# matters), and of the coefficients of the one ring product there (K - 2 * 20 bits, K ~ 60).
PIECEWISE_SQ_BITS = 20
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


class DomainError(ValueError):
    """A kernel's input range that no variant of it covers; the message says which bound fails."""


# ----------------------------------------------------------------------------- thermometer


def _below(party: Party, x: AShare, thresholds: np.ndarray, bits: int, cmp_bits: int | None = None) -> list:
    """The thermometer's bits [x < T_j] for each public threshold (x at scale `bits`), as boolean shares: one
    `less_than_public` batch on cmp_bits-bit words (default party.msb_bits), C + (len(T) - 1) X bytes per
    element of x. `_steps` reads a step function from their b2a."""
    return compare.less_than_public(party, x, _encode(np.asarray(thresholds, dtype=np.float64).reshape(-1), bits),
                                    bits=cmp_bits)


def _guess_and_product(party: Party, below: list, x: AShare, guess: tuple, product: tuple) -> tuple[AShare, AShare]:
    """From the thermometer's boolean bits: the step function guess = (values, bits) (`_steps`, after a b2a),
    and beside it x times the step function product = (values, bits, shift), truncated by `shift`.

    x g(x) = g_m x - sum_j [x < T_j] (g_j - g_{j-1}) x is a selection of public multiples of x by the bits
    themselves (`convert.select`, g_m x its base), so it needs no b2a first; the two run side by side
    (`parallel`): max(A, 3) = 3 rounds where b2a and then a product take A + 2 = 4. Bytes per element of x:
    len(T) A for the b2a, 16 len(T) from rank 0 and the truncation's 48 over the ranks for the select.
    """
    values, bits, shift = product
    g = _encode(values, bits)

    def steps(party: Party):
        return _steps(party, stack(b2a(party, below), axis=-1), *guess)

    def times_x(party: Party):
        minus = g[:-1] - g[1:]  # -(g_j - g_{j-1}), wrapping in the ring
        terms = [(b, arith.mul_public(x, minus[j])) for j, b in enumerate(below)]
        return convert.select(party, terms, shift, base=arith.mul_public(x, g[-1]))

    return tuple(parallel(party, steps, times_x))


def comparison_bits(spread: float, bits: int, msb_bits: int, narrow: bool = False) -> int:
    """The comparison width for values up to `spread` apart at scale `bits`: msb_bits when it holds them
    with a bit to spare (|x - t| 2^bits <= 2^(L-2)), else 64 (one more round, ~1.3x the bytes); DomainError
    beyond. `narrow` (a spread from recorded ranges, margin included): the fewest bits that hold it, L - 1
    a whole number of msb's 3-bit groups: at L = 25 instead of 48, 8 groups instead of 16, one round
    and about half the bytes fewer per comparison."""
    need = math.log2(max(spread, 2.0**-bits)) + bits + 2
    if need <= msb_bits:
        if narrow:
            return min(msb_bits, 3 * math.ceil((math.ceil(need) - 1) / 3) + 1)
        return msb_bits
    if need <= 64:
        return 64
    raise DomainError(f"values {spread:.4g} apart at 2^{bits} exceed what a 64-bit comparison holds")


def thermometer_bits(party: Party, top: float, bits: int) -> int:
    """`comparison_bits` for a thermometer over (0, top] at scale `bits`."""
    return comparison_bits(top, bits, party.msb_bits)


def _steps(party: Party, below: AShare, values: np.ndarray, bits: int) -> AShare:
    """The step function values[i] on [T_i, T_{i+1}) from the thermometer bits `below`, at 2^bits.

    g(x) = g_m - sum_j [x < T_j] (g_j - g_{j-1}): a public linear combination, local.
    The encodings are differenced in the ring, so the result is exactly an encoded g_i.
    """
    g = _encode(values, bits)
    return arith.add_public(party, arith.neg(arith.mul_public(below, g[1:] - g[:-1]).sum(axis=-1)), g[-1])


def _grid(lo: float, hi: float, per_octave: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The guess intervals of a thermometer at scale `bits`: edges lo 2^(j / per_octave) covering [lo, hi],
    the inner ones rounded up to the input's grid of 2^-bits (and merged where they meet there); a range
    narrower than one step is split at its geometric middle.

    x < T compares encodings, so interval i holds exactly the encodable x in [T_i, T_{i+1} - 2^-bits]:
    a guess for the middle of that range keeps its error bound even where x has few bits (x a few ulp).
    Returns (thresholds, a, b): the inner thresholds, and each interval's smallest and largest x.
    """
    if not 0 < lo < hi:
        raise ValueError(f"input range must satisfy 0 < lo < hi, got [{lo}, {hi}]")
    steps = math.ceil(per_octave * math.log2(hi / lo) - 1e-9)
    # A range inside one step still gets one inner edge, at its middle: the kernels' thermometer and its
    # linear combinations need at least one threshold.
    edges = lo * 2.0 ** (np.arange(1, steps) / per_octave) if steps >= 2 else np.array([math.sqrt(lo * hi)])
    ulp = 2.0**-bits
    thresholds = np.unique(np.ceil(edges / ulp)) * ulp
    a = np.concatenate([[lo], thresholds])
    b = np.maximum(np.concatenate([thresholds - ulp, [hi]]), a)
    return thresholds, a, b


# ----------------------------------------------------------------------------- exp


def exp_neg(party: Party, x: AShare, fit: approx.ExpNeg = approx.REFIT.exp, cmp_bits: int | None = None) -> AShare:
    """exp(x) for x <= 0: p(x/2^t)^(2^t) on [-fit.cut, 0], 0 below (`approx.ExpNeg`; PUMA's p is 1 + y).

    Domain: x <= 0 as far as the comparison reaches, |x| < 2^(L-1-f) (L = cmp_bits or party.msb_bits:
    2^29 at f = 18 and L = 48, 2^45 on 64-bit comparisons; the clip compares x + cut_far). Error against
    the float64 definition: 1-2 ulp, plus up to the value at -fit.cut (refit: 9.2e-6, PUMA: 1e-8) between
    the two cuts; `approx` states each set's error against exp.
    The base: PUMA's 1 + y is x + 2^(f+t) read at scale f+t (free). A degree 2-4 base
    1 + y + y^2 (c2 + c3 y + c4 y^2) takes two products, y^2 and y^2 times that bracket, with the
    coefficients riding in them (a coefficient times a share at a low scale would lose its bits), and
    needs two squarings fewer for the same accuracy: the same product count.
    The squares (all <= 1) carry as many bits as keep every truncation within 31 bits (4-byte dealt
    shares, and what a chained truncation allows; see `_square_scales`). The 5 products are one
    `chain.products`: each truncation's answer goes into the next product before any reshare. The clip
    multiplies the last one by the bit exactly before its reshare (`chain.times_bit`; rank 0 deals the chain).
    The clip compares x with -fit.cut_far ignoring the carry of the low f + log2(cut_far - cut) bits
    (convert.msb's drop), so the cut falls in [-cut_far, -cut], where the value is negligible.
    Garbage below the cut (even wrapped values) is multiplied by an exact 0.
    The clip's comparison runs beside the products (`parallel`: their rounds travel together).
    Rounds max(C', 5) + 2 = 8 for both sets (the chain: a round per truncation; then times_bit's two; 12 with
    5 mul_fx and a mul_bit, 18 one after the other); bytes C' + (28 5 + 4 4) + 36 per element, C' the
    comparison on L - f - log2(cut_far - cut) bits (16.8 B over the ranks at L = 48, 9 leaf groups for both
    sets): 208.8 B over the three ranks (268.8 with 5 mul_fx and a mul_bit, 340.8 before the truncation's
    dealer folded its part into its mask, 415.9 before the fused select). PUMA section 4.2.
    """
    with party.comm.tag("exp_neg"):
        return _exp_neg(party, x, party.fxp.frac_bits, fit, cmp_bits)


def _square_scales(out: int, t: int) -> list[int]:
    """Scales of the t squares ending at `out`, each at most EXP_BITS, every truncation within 31 bits;
    the input of the first square may carry up to min(EXP_BITS, (31 + scales[0]) // 2) bits."""
    scales = [out]
    for _ in range(t - 1):
        scales.insert(0, min(EXP_BITS, (31 + scales[0]) // 2))
    return scales


def _exp_power(party: Party, x: AShare, fit: approx.ExpNeg, scales: list[int]) -> chain.Held:
    """p(x / 2^t)^(2^t) at scales[-1], every product of one `chain.products` (each truncation's answer
    feeds the next product before any reshare), held for the clip (`chain.times_bit`: rank 0 deals).

    The base: PUMA's 1 + y is x + 2^(f+t) read at scale f+t (free), and the chain is its t squares. A
    degree 2-4 base 1 + y + y^2 (c2 + c3 y + c4 y^2) starts the chain with y^2 (at EXP_SQ_BITS) and y^2
    times the bracket (the coefficients ride in the products: a coefficient times a share at a low scale
    would lose its bits); the first square then reads 1 + y + that product."""
    f, t = party.fxp.frac_bits, fit.squarings
    q = f + t  # x read at this scale is y = x / 2^t, exactly
    c = tuple(fit.base) + (0.0,) * (5 - len(fit.base))
    if c[0] != 1.0 or c[1] != 1.0 or len(fit.base) > 5:
        raise ValueError(f"exp base must be 1 + y + c2 y^2 + c3 y^3 + c4 y^4, got {fit.base}")
    squares = [chain.Step(None, 1, None, 1, 2 * prev - out) for prev, out in zip(scales, scales[1:])]
    if len(fit.base) == 2:
        y = arith.add_public(party, x, _encode(1.0, q))
        if 2 * q - scales[0] > 31:
            raise ValueError(f"exp_neg: no 31-bit schedule from scale {q} to {scales[-1]}")
        return chain.products(party, arith.mul_local(y, y), 2 * q - scales[0], squares, dealer=0, held=True)
    first = min(EXP_BITS, (31 + scales[0]) // 2)
    if 2 * first - scales[0] > 31:
        raise ValueError(f"exp_neg: no 31-bit schedule from scale {first} to {scales[-1]}")
    # y^2 <= 4 at EXP_SQ_BITS; the bracket (<= 1) at k, so that their product stays below 2^61.
    a, k = EXP_SQ_BITS, _HEADROOM - 1 - EXP_SQ_BITS
    bracket = chain.Step(None, 1, _lin(party, [(x, c[3], k - q)], c[2], k), int(_encode(c[4], k - a)), a + k - first)
    base = _lin(party, [(x, 1.0, first - q)], 1.0, first)  # 1 + y; the chain adds y^2 times the bracket
    steps = [bracket, chain.Step(base, 1, base, 1, 2 * first - scales[0])] + squares
    return chain.products(party, arith.mul_local(x, x), 2 * q - a, steps, dealer=0, held=True)


def _exp_neg(party: Party, x: AShare, bits: int, fit: approx.ExpNeg, cmp_bits: int | None = None) -> AShare:
    """exp_neg with the result at scale `bits`."""
    f, t = party.fxp.frac_bits, fit.squarings
    slack = math.floor(math.log2(fit.cut_far - fit.cut))
    scales = _square_scales(bits, t)

    def clip(party: Party):
        return convert.msb(party, arith.add_public(party, x, _encode(fit.cut_far, f)), bits=cmp_bits, drop=f + slack)

    def power(party: Party):
        return _exp_power(party, x, fit, scales)

    # The clip's comparison and the polynomial do not depend on each other: their rounds travel together.
    below, power_of_base = parallel(party, clip, power)
    return chain.times_bit(party, boolean.not_(party, below), power_of_base)


# ----------------------------------------------------------------------------- reciprocal


def reciprocal(party: Party, x: AShare, lo: float = 1.0, hi: float = 1024.0) -> AShare:
    """1/x for x in [lo, hi]: any public bounds with 2^-(60-2f) <= lo < hi < 2^(62-f), the whole useful
    fixed-point range (softmax passes [1, row length]); comparisons on 64 bits when hi 2^(f+2) >=
    2^party.msb_bits (`thermometer_bits`).

    Domain: [lo, hi], where the error is within r^8 + 3.25 2^-f <= 1.3e-5 relative (r, r^2 and r^4 each
    round by < 1 ulp, the first one weighted by 1/(1-r) <= 1.21) plus 4 ulp: 3.8 ulp measured on
    [1, 128], 2.7 2^-f relative near 2^-16; asserted at both ends of [2^-16, 2^40], and at f = 18 from
    x = 1 ulp to just below 2^44 with lo = 2^-24 (8.6e-6 relative at 1-64 ulp, at most 3.5 ulp above the
    relative term, where 1/x is near 2e-6). The result carries f fractional bits, so 1/x keeps few
    significant bits where it is far below 1.

    Guess y0 = 2/(a+b) on each half-octave [a, b) of [lo, hi] from a thermometer (free linear
    combination), then Goldschmidt: r = 1 - x y0, y = y0 (1+r)(1+r^2)(1+r^4): |r| <= 0.1716, so the
    relative error is r^8 <= 7.5e-7 before fixed-point rounding; measured on [1, 128]: 3.8 ulp
    absolute. Outside [lo, hi] the guess is that of the nearest end and the error grows (it
    diverges beyond 2 hi).
    x y0 is a selection of public multiples of x by the thermometer's bits, beside the b2a of the guess
    (`_guess_and_product`).
    Rounds C + max(A, 3) + 6 = 15; bytes per row C + (k-2)X + (k-1)A + 16 (k-1) + 44 + 5M with
    k = max(2, ceil(2 log2(hi/lo))) intervals (softmax over 128: 13 thresholds, about 1030 B per row over the three ranks, 250 of them the
    select's).
    Why: SPU normalises by the highest set bit (a bit decomposition) and runs 2 Goldschmidt steps
    from 2.9142 - 2c, |1 - c w0| <= 0.0858, so 5.4e-5 relative; CrypTen's Newton from
    3 exp(0.5 - x) + 0.003 needs an exp and ~10 dependent Newton steps on [1, 128] (> 50 rounds).
    Here the rounds are one comparison, a b2a beside a select, and 3 products, and the comparisons are per row.
    """
    f = party.fxp.frac_bits
    if lo < 2.0 ** -(60 - 2 * f):
        raise ValueError(f"reciprocal: lo = {lo} is below 2^-{60 - 2 * f}: y r at 2^{2 * f} would overflow")
    with party.comm.tag("reciprocal"):
        return _reciprocal(party, x, f, lo, hi, f)


def _reciprocal(party: Party, x: AShare, in_bits: int, lo: float, hi: float, bits: int) -> AShare:
    """1/x at scale `bits` for x at scale in_bits: y, r and their products all carry `bits` bits."""
    thresholds, a, b = _grid(lo, hi, RECIP_STEPS_PER_OCTAVE, in_bits)
    below = _below(party, x, thresholds, in_bits, thermometer_bits(party, hi, in_bits))
    guess = 2.0 / (a + b)
    y, xy = _guess_and_product(party, below, x, (guess, bits), (guess, bits, in_bits))
    r = _one_minus(party, xy, bits)
    yr, r2 = arith.mul_fx(party, [y, r], [r, r], bits=bits)
    y = arith.add(y, yr)
    yr2, r4 = arith.mul_fx(party, [y, r2], [r2, r2], bits=bits)
    y = arith.add(y, yr2)
    return arith.add(y, arith.mul_fx(party, y, r4, bits=bits))


# ----------------------------------------------------------------------------- rsqrt


def _rsqrt(
    party: Party, x: AShare, in_bits: int, lo: float, hi: float, gain: float, out_bits: int, ride=None,
    cmp_bits: int | None = None, normalise: bool = False,
):
    """gain / sqrt(x) for x (at scale in_bits) in [lo, hi], at 2^out_bits; see rsqrt.

    Guess on eighth-octaves [a, b): g with g^2 = 2/(a+b), so r = 1 - x g^2 lies in +-0.0433.
    g^2 is a linear combination of the bits like g, at scale 60 - in_bits so that x g^2 ~ 1 fills
    the ring; g^2's relative precision is then x 2^in_bits / 2^60, poor where x 2^in_bits nears 2^60.
    `normalise` (wide ranges) first takes x 2^-e for the interval's octave e, a product with an exact
    power of two (a linear combination of the bits, like g), so that x g^2 = (x 2^-e)(g^2 2^e) multiplies
    two numbers near 1, each at 30 bits: one more batch, any range.
    (1 - r)^(-1/2) = sum_k C(2k,k)/4^k r^k to degree 3 (error <= 0.274 r^4 = 9.6e-7), as
    g + (g r)(1/2 + 3/8 r + 5/16 r^2): the coefficients are exact at 2^-5.
    Batches: [x 2^-e;] x g^2; g r and r^2; (g r) times the bracket.
    `ride` = (a, b, p): the caller's a * b / 2^p (a, b at f, result at f) goes out in the second batch.
    Returns (result, ride product or None).
    """
    f = party.fxp.frac_bits
    thresholds, a, b = _grid(lo, hi, RSQRT_STEPS_PER_OCTAVE, in_bits)
    g2 = 2.0 / (a + b)
    octave = np.floor(np.log2(a))
    top_octave = int(octave.max())  # 2^(top_octave - e) >= 1: every power of two below is exact
    if normalise and in_bits + top_octave > _HEADROOM - 2:
        raise ValueError(f"rsqrt: x up to 2^{top_octave + 1} at 2^{in_bits} leaves no room to normalise")
    below = _below(party, x, thresholds, in_bits, cmp_bits)
    # r and its square carry rb bits, as many as the products with the guess (result <= 1.03 of it) allow.
    top = math.log2(2.5 * gain / math.sqrt(lo))
    rb = f + max(0, min(RSQRT_R_EXTRA_BITS, math.floor(_HEADROOM - out_bits - f - RSQRT_COEF_BITS - top)))
    if normalise:
        ones = stack(b2a(party, below), axis=-1)  # the thermometer's bits as integer 0/1 shares
        z = min(RSQRT_NORM_BITS, in_bits + top_octave - 1)
        scaled = arith.mul_fx(party, x, _steps(party, ones, 2.0**-octave, top_octave), bits=in_bits + top_octave - z)
        mantissa = _steps(party, ones, g2 * 2.0**octave, _HEADROOM - 1 - z)
        xg2 = arith.mul_fx(party, scaled, mantissa, bits=_HEADROOM - 1 - rb)
        guess = _steps(party, ones, gain * np.sqrt(g2), out_bits)
    else:
        sq_bits = _HEADROOM - 1 - in_bits
        guess, xg2 = _guess_and_product(
            party, below, x, (gain * np.sqrt(g2), out_bits), (g2, sq_bits, sq_bits + in_bits - rb)
        )
    r = _one_minus(party, xg2, rb)
    pairs, bits = [(guess, r), (r, r)], [rb, rb]
    if ride is not None:
        left, right, p = ride
        pairs.append((left, right))
        bits.append(f + p)
    gr, r2, *ridden = arith.mul_fx(party, [u for u, _ in pairs], [v for _, v in pairs], bits=bits)
    c = RSQRT_SERIES
    bracket = _lin(party, [(r, c[2], 0), (r2, c[3], 0)], c[1] / c[0], rb + RSQRT_COEF_BITS)
    tail = arith.mul_fx(party, gr, bracket, bits=rb + RSQRT_COEF_BITS)
    return arith.add(guess, tail), (ridden[0] if ridden else None)


def single_product_bits(lo: float, hi: float, in_bits: int) -> float:
    """Significant bits left to x g^2 by `_rsqrt` without normalising, at its worse end: x at lo, or g^2 at hi."""
    return min(math.log2(lo) + in_bits, _HEADROOM - 1 - in_bits - math.log2(hi))


def rsqrt(party: Party, x: AShare, lo: float = 2.0**-10, hi: float = 2.0**10) -> AShare:
    """1/sqrt(x) for x in [lo, hi]: any public bounds with 2^-(f+3) <= lo < hi < 2^(60-f), i.e. the whole
    positive fixed-point range but its top two octaves; the norms use the same kernel. A lo below one ulp
    is read as one ulp: no encodable input lies below it (and g^2 = 1/lo at 2^(60-f) would not fit the
    ring at lo = 2^-(f+3)).

    Domain: [lo, hi]; there the error is <= 2e-6 relative + 2 ulp (measured on [2^-10, 2^10], at both
    ends of [2^-16, 2^40], and at f = 18 from x = 1 ulp up to just below 2^42 with lo = 2^-21: at most
    1.9 ulp above the relative term, under 1e-6 relative at x = 1-64 ulp). Below lo the guess of the lowest
    interval gives up to 2.5x the value at lo; above hi the series diverges.
    Idea: a piecewise-constant guess from an eighth-octave thermometer (the highest set bit of x to an
    eighth of an octave, without normalising x), then the binomial series of (1 - r)^(-1/2) to degree 3,
    r = 1 - x y0^2 (|r| <= 0.0433): relative error <= 9.6e-7 from the series (its coefficients exact at
    2^-5) plus fixed-point rounding, in two batches after x y0^2. No Newton loop. (A quarter-octave guess
    needed degree 4 and one batch, two rounds, more; the finer thermometer costs bytes per input only.)
    Comparisons on L = party.msb_bits bits when hi 2^(f+2) < 2^L, else on 64 bits (`thermometer_bits`).
    x y0^2 is a selection of public multiples of x by the thermometer's bits, beside the b2a of the guess
    (`_guess_and_product`; where x is normalised by its octave, b2a and the products one after the other).
    Rounds C + max(A, 3) + 4 = 13; bytes per element C + (k-2)X + (k-1)A + 3M + 16 (k-1) + 48 with
    k = max(2, ceil(8 log2(hi/lo))) intervals (159 thresholds for the default range: 3.1 KB per rank, 9.3 KB over the
    three; 6.9 before the select, which sends 8 bytes per bit and per term from rank 0).
    """
    f = party.fxp.frac_bits
    if lo < 2.0 ** -(f + 3):
        raise ValueError(f"rsqrt: lo = {lo} is below 2^-{f + 3}, the smallest input range this fixed point supports")
    if hi >= 2.0 ** (60 - f):
        raise ValueError(f"rsqrt: hi = {hi} is not below 2^{60 - f}, the largest input range this fixed point supports")
    if hi > 2.0**-f:  # (a range wholly below one ulp keeps its lo)
        lo = max(lo, 2.0**-f)
    normalise = _HEADROOM - 1 - f - math.log2(hi) < RSQRT_MIN_BITS
    with party.comm.tag("rsqrt"):
        return _rsqrt(party, x, f, lo, hi, 1.0, f, cmp_bits=thermometer_bits(party, hi, f), normalise=normalise)[0]


# ----------------------------------------------------------------------------- GeLU, SiLU


def _max_abs(poly, lo: float, hi: float) -> float:
    """max |poly| on [lo, hi] (coefficients from the constant term up), on a fine grid."""
    return float(np.abs(approx.poly(np.linspace(lo, hi, 4097), tuple(poly))).max())


@dataclass(frozen=True)
class PiecewisePlan:
    """How `_piecewise` reads a fit at f fractional bits; every field is public.

    The middle piece m1 x + Q(x^2) is evaluated in the centred square w = x^2 / 2^k - c (|w| <= 1 on
    its segment) as m1 x + a0 + a1 w + a2 w^2 + w^2 (a3 w + a4 w^2): the big alternating coefficients of
    Q in x^2 cancel to a few units, while every a_j is of the order of the piece's own values, so 20-bit
    shares and 20-bit coefficients keep it within an ulp or two.
    """

    k: int
    c: float
    a: tuple[float, float, float, float, float]
    out_bits: int  # K: every piece at this scale, the largest that keeps them below 2^61.9


def piecewise_plan(fit: approx.Piecewise) -> PiecewisePlan:
    lo, hi = fit.breaks[-2], fit.breaks[-1]
    top = max(lo * lo, hi * hi)
    k = math.ceil(math.log2(top)) - 1  # x^2 / 2^k in [0, 2] on the middle segment
    c = top / 2.0 ** (k + 1)
    mid = tuple(fit.mid) + (0.0,) * (9 - len(fit.mid))
    # Q(s) = m0 + m2 s + m4 s^2 + m6 s^3 + m8 s^4 with s = 2^k (w + c), as a polynomial in w.
    q_s = np.polynomial.Polynomial([mid[0], mid[2], mid[4], mid[6], mid[8]])
    q_w = q_s(np.polynomial.Polynomial([2.0**k * c, 2.0**k]))
    a = tuple(float(v) for v in np.pad(q_w.coef, (0, 5))[:5])
    values = [_max_abs(mid, lo, hi)]
    if len(fit.breaks) == 3:
        values.append(_max_abs(fit.low, fit.breaks[0], fit.breaks[1]))
    return PiecewisePlan(k, c, a, math.floor(61.9 - math.log2(max(values))))


def _piecewise(party: Party, x: AShare, fit: approx.Piecewise, cmp_bits: int | None, held: bool = False):
    """0 below breaks[0], `low` (degree <= 3; three breaks only) up to breaks[1], `mid` (even of degree
    <= 8 plus a linear term) up to breaks[-1], x above (`approx.Piecewise`).

    With s = x^2 / 2^k and w = s - c (`PiecewisePlan`), two truncations and one batch of plain ring products:
      s = x x truncated to PIECEWISE_SQ_BITS (w is s less a public constant);  w2 = w w truncated likewise;
      ring: w2 (a3 w + a4 w2), and (a cubic low piece only) s (l2 2^k + l3 2^k x), all at scale K.
    mid and low are then local sums at K.
    The bits b_i = [x < breaks_i] of one batched comparison, computed beside the products (`parallel`), then
    the selection, fused with the one rescale to f (`convert.select`). Three breaks: b2 mid + b1 (low - mid)
    - b0 low, plus x - b2 x untruncated (3 bits, 3 terms, 1 plain). Two: (b0 xor b1) mid, plus x - b1 x (b0
    implies b1, so the xor, free, is the middle segment's bit: 2 bits, 1 term, 1 plain).
    Values outside their own segment (even wrapped ones) are multiplied by an exact 0 or cancel
    in the ring, so the result is right for every x the comparison can take; only the segments'
    own ranges bound the scales.
    `held`: the answer as ranks 1 and 2 hold it before the select's reshare (`arith.HeldByTwo`).
    """
    f, sq = party.fxp.frac_bits, PIECEWISE_SQ_BITS
    plan = piecewise_plan(fit)
    k_out, a = plan.out_bits, plan.a
    e = k_out - sq  # scale of a3 w + a4 w2, so that w2 times it lands at K

    low = tuple(fit.low) + (0.0,) * (4 - len(fit.low))
    cubic = low[3] != 0.0

    def powers(party: Party):
        s = arith.mul_fx(party, x, x, bits=2 * f + plan.k - sq)
        w = arith.add_public(party, s, _encode(-plan.c, sq))
        w2 = arith.mul_fx(party, w, w, bits=sq)
        products = [(w2, _lin(party, [(w, a[3], e - sq), (w2, a[4], e - sq)], 0.0, e))]
        if cubic:
            bracket = _lin(party, [(x, low[3] * 2.0**plan.k, k_out - sq - f)], low[2] * 2.0**plan.k, k_out - sq)
            products.append((s, bracket))
        return s, w, w2, arith.mul(party, [p for p, _ in products], [q for _, q in products])

    # The comparisons and the products do not depend on each other: their rounds travel together.
    bits, (s, w, w2, ring) = parallel(party, lambda p: _below(p, x, fit.breaks, f, cmp_bits), powers)
    mid_v = arith.add(
        _lin(party, [(x, fit.mid[1], k_out - f), (w, a[1], k_out - sq), (w2, a[2], k_out - sq)], a[0], k_out), ring[0]
    )
    if len(fit.breaks) == 2:
        b0, b1 = bits
        picked = convert.select(party, [(boolean.xor(b0, b1), mid_v)], k_out - f, [(b1, arith.neg(x))], held=held)
        return picked.plus(party, x) if held else arith.add(x, picked)
    low_terms = [(x, low[1], k_out - f)] + ([] if cubic else [(s, low[2] * 2.0**plan.k, k_out - sq)])
    low_v = _lin(party, low_terms, low[0], k_out)
    if cubic:
        low_v = arith.add(low_v, ring[1])
    b0, b1, b2 = bits
    picked = convert.select(
        party,
        [(b2, mid_v), (b1, arith.sub(low_v, mid_v)), (b0, arith.neg(low_v))],
        k_out - f,
        [(b2, arith.neg(x))],
        held=held,
    )
    return picked.plus(party, x) if held else arith.add(x, picked)


def gelu(
    party: Party, x: AShare, fit: approx.Piecewise = approx.REFIT.gelu, cmp_bits: int | None = None,
    held: bool = False,
):
    """GeLU as 0 | degree 8 (even + linear) | x (refit), or PUMA's 0 | cubic | degree 6 | x (`approx.Piecewise`).

    Domain: |x| <= 2^(L-2-f) (L = cmp_bits or party.msb_bits: 2^28 at f = 18 and L = 48, 2^44 on 64-bit
    comparisons; what `comparison_bits` provisions for |x| + 8). The comparisons take x minus each break
    (|break| <= 8), so it holds up to |x| < 2^(L-1-f) - 8; past that they wrap and the result is garbage.
    Values outside a piece's segment are multiplied by an exact 0. Error against the float64 definition:
    1.6 ulp measured on [-8, 8] (both sets); the definitions are 0.0072 (refit; 0.00064 on [-1, 1]) and
    0.0199 (PUMA) from the exact GeLU.
    See `_piecewise`: 2 truncated and 1 plain products (PUMA's cubic: 2 plain) beside the comparisons (their
    rounds travel together, `parallel`), then one select that also rescales.
    Rounds max(C, 2 + 2 + 1) + 3 = 9 for both sets (14 one after the other). Bytes per element per rank:
      refit: C + X + 2M + R + Z + 2 * 8 / 3 = 80.4 (241.1 over the three; 306.6 with PUMA's three pieces);
      PUMA:  C + 2X + 2M + 2R + Z + 5 * 8 / 3 = 102.2 (306.6 over the three; was 655 with 5 truncations).
    `held`: the answer held 2-of-2 by ranks 1 and 2 (`arith.HeldByTwo`): 8 rounds, 16 B per element less, for
    a consumer that takes it so (a prepared weight product: `prepared.products`).
    PUMA section 4.3.
    """
    with party.comm.tag("gelu"):
        return _piecewise(party, x, fit, cmp_bits, held)


def silu(party: Party, x: AShare, fit: approx.Piecewise = approx.REFIT.silu, cmp_bits: int | None = None) -> AShare:
    """SiLU as 0 | degree 8 (even + linear) | x (refit), or PUMA's 0 | quadratic | degree 6 | x
    (`approx.Piecewise`); domain and method as gelu's.

    Error against the float64 definition: 1.9 ulp measured on [-8, 8] (PUMA's: 1.6); the definitions are
    0.035 (refit; 0.0016 on [-1, 1]) and 0.072 (PUMA, its jump at x = 4) from the exact SiLU.
    Rounds 9 as gelu; bytes as gelu's (refit: 80.4 per element per rank), and for PUMA's quadratic one ring
    product less: C + 2X + 2M + R + Z + 5 * 8 / 3 = 94.2. PUMA section 4.3.
    """
    with party.comm.tag("silu"):
        return _piecewise(party, x, fit, cmp_bits)


# ----------------------------------------------------------------------------- softmax


def max_drop_bits(bits: int, f: int) -> int:
    """Low bits the softmax's max comparisons ignore (`compare.max`'s drop) on `bits`-bit comparisons: the
    fewest that take convert.msb's carry tree one level lower, if they keep each level of the max tree
    within 2^-SOFTMAX_MAX_SLACK of the larger entry (a drop of at most f - SOFTMAX_MAX_SLACK); else 0.
    28 bits (BERT-base's recorded scores) at f = 18: 3 bits, 5 rounds a comparison instead of 6."""
    groups = -(-(bits - 1) // convert.LEAF_BITS)
    if groups <= 1:
        return 0
    need = bits - 1 - convert.LEAF_BITS * 2 ** (math.ceil(math.log2(groups)) - 1)
    return need if 0 < need <= f - SOFTMAX_MAX_SLACK else 0


def softmax(
    party: Party, x: AShare, mask: np.ndarray | None = None, fit: approx.ExpNeg = approx.REFIT.exp,
    cmp_bits: int | None = None,
) -> AShare:
    """Softmax over the last axis with an approximate exp (`fit`); mask (public bool, broadcastable,
    False = weight 0).

    Domain: kept entries of a row within 2^(L-2-f) of each other (L = cmp_bits or party.msb_bits: 2^28
    at f = 18), for the max tree's comparisons and exp's clip; masked entries may hold anything.

    max over kept positions (masked ones are first overwritten, locally, with the row's first kept
    element, so no sentinel value has to fit the ring), e = exp_neg(x - max) on kept entries (exact 0
    elsewhere), ONE reciprocal per row of the sum (in [1, n]: the max contributes exp(0) = 1; kept at f + 8
    bits), then a broadcast product. Where fewer low bits keep a comparison a round shorter (`max_drop_bits`), the max
    tree's levels of two (rows that come down to two entries) ignore them: its max is then an entry up to
    2^-12 per such level below the row's, so the sum stays >= 1 and may pass n by 0.2% at most, and
    softmax's invariance to the shift keeps the result.
    A row with no kept position gives 0 (approx.softmax gives NaN there; the ONNX export maps it to 0).
    Measured error vs approx.softmax: 0.33 ulp on average, 2.0 ulp at most (400 rows of 32 N(0, 2) scores,
    2026-12-02 evening; 6.5 ulp while exp's c4 kept 12 bits, see EXP_SQ_BITS), plus what the cut zone of
    exp keeps. approx.softmax is up to
    0.07 from the exact softmax with PUMA's exp, 4e-4 with the refit one (rows of 128 scores).
    The reciprocal carries f + 5 bits (enough against e <= 1), so the output product truncates by 31.
    The max (`compare.max`): levels of four (exact comparisons, C + 4 rounds each) while more than eight
    entries remain, then one group of the rest (three to eight: C + 5 rounds for eight); levels of two
    (C' + S, C' on L - max_drop_bits(L, f) bits) only for rows that come down to two.
    Rounds for n = 128 (128, 32, 8, 1): 2 (C + 4) + (C + 5) + 8 (exp) + 15 (reciprocal) + 2 = 56 at L = 48
    (60 before exp's products were chained, 74 with levels of two after the levels of four, exp's clip
    before its products and the reciprocal's b2a before its first product, 83 with levels of two only, 92
    before the dropped bits); bytes per
    element: the max's (six comparisons and 80 B per output of a level of four, 28 and 144 B per output of
    a group of eight: about 25 B more per element than levels of two at L = 48), plus exp's + M [product]
    per KEPT element (with a mask that drops entries, exp and the product run on the kept ones only: a
    causal mask over n keys keeps (n + 1) / 2n of them), plus the reciprocal's (about 1030 B per row over the ranks at
    n = 128). `softmax_rows` stops before the last product, which `SoftmaxRows.times` moves after a product
    with v.
    PUMA section 4.2.
    """
    rows = softmax_rows(party, x, mask, fit, cmp_bits)
    return rows if isinstance(rows, AShare) else rows.normalised(party)


@dataclass
class SoftmaxRows:
    """A softmax before its last product: e = exp(x - max) (exact zeros where the mask drops entries) at
    f + SOFTMAX_EXTRA_BITS, and each row's 1/sum at f + SOFTMAX_INV_BITS (keepdims). `keep` lists the kept
    entries when the mask drops some (the product then runs on those only)."""

    e: AShare
    inv: AShare
    keep: np.ndarray | None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.e.shape

    @property
    def kept(self) -> int:
        """How many entries the last product multiplies (`normalised`)."""
        return self.e.size if self.keep is None else int(self.keep.sum())

    def normalised(self, party: Party) -> AShare:
        """The softmax: e times its row's 1/sum, one product per kept entry (M each)."""
        bits = party.fxp.frac_bits + SOFTMAX_EXTRA_BITS + SOFTMAX_INV_BITS
        with party.comm.tag("softmax"):
            if self.keep is not None:
                inv = self.inv.broadcast_to(self.shape)[self.keep]
                return _scatter(arith.mul_fx(party, self.e[self.keep], inv, bits=bits), self.keep)
            return arith.mul_fx(party, self.e, self.inv, bits=bits)

    def times(self, party: Party, v: AShare) -> AShare:
        """softmax @ v as (e @ v) times each row's 1/sum: the row scaling then costs one product per output
        element instead of one per kept entry (attention over n keys with heads of width d_v: d_v instead of
        n per query). e @ v carries f + SOFTMAX_EXTRA_BITS bits (a truncation by f), and the product by 1/sum
        truncates by SOFTMAX_EXTRA_BITS + SOFTMAX_INV_BITS + f = f + 13 bits (31 at f = 18), as the softmax's
        own last product does. The caller checks
        `fits` first: e @ v is the row's sum (up to n) times the answer before its truncation.
        Error: that of e and 1/sum, as in `normalised`, plus 1 ulp of e @ v (2^-8 ulp of the answer) and
        the last truncation's; no rounding of the softmax itself to f bits. The two products are one
        `chain.products` (e @ v's truncated answer is multiplied by 1/sum before any reshare): rounds 3; bytes
        76 per output element over the three ranks (2M = 88 as a matmul_fx then a mul_fx)."""
        f = party.fxp.frac_bits
        with party.comm.tag("softmax_matmul"):
            scale = chain.Step(None, 1, self.inv, 0, f + SOFTMAX_EXTRA_BITS + SOFTMAX_INV_BITS)
            return chain.products(party, arith.matmul_local(self.e, v), f, [scale])

    @staticmethod
    def fits(f: int, keys: int, answer_max: float) -> bool:
        """Whether `times` stays in range for answers |softmax @ v| <= answer_max: e @ v is at most keys times
        that at 2^(2f + SOFTMAX_EXTRA_BITS) before its truncation, and the answer times 2^(2f + 13) before the
        last; both below 2^61."""
        return keys * answer_max * 2.0 ** (2 * f + SOFTMAX_EXTRA_BITS) < 2.0**61 and (
            answer_max * 2.0 ** (2 * f + SOFTMAX_EXTRA_BITS + SOFTMAX_INV_BITS) < 2.0**61
        )


def softmax_rows(
    party: Party, x: AShare, mask: np.ndarray | None = None, fit: approx.ExpNeg = approx.REFIT.exp,
    cmp_bits: int | None = None,
) -> SoftmaxRows | AShare:
    """`softmax` up to its last product (`SoftmaxRows`), or its answer when there is nothing left to
    multiply (every entry masked: zeros)."""
    f = party.fxp.frac_bits
    n = x.shape[-1]
    with party.comm.tag("softmax"):
        keep = None
        if mask is not None:
            keep = np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
            if not keep.any():  # every row empty: all zeros, known to every rank from the public mask
                return AShare(np.zeros(x.shape, np.uint64), np.zeros(x.shape, np.uint64))
            first = np.argmax(keep, axis=-1)[..., None]
            filler = AShare(np.take_along_axis(x.first, first, -1), np.take_along_axis(x.second, first, -1))
            x = arith.add(arith.mul_public(arith.sub(x, filler), keep.astype(np.int64)), filler)
        drop = max_drop_bits(cmp_bits or party.msb_bits, f)
        top = compare.max(party, x, axis=-1, keepdims=True, bits=cmp_bits, drop=drop, quads=True)
        shifted = arith.sub(x, top)
        # exp and the output's product are elementwise: where the mask drops entries (a causal mask drops
        # nearly half), they run on the kept ones only, gathered flat and scattered back among exact zeros.
        sparse = keep is not None and not keep.all()
        with party.comm.tag("exp_neg"):
            e = _exp_neg(party, shifted[keep] if sparse else shifted, f + SOFTMAX_EXTRA_BITS, fit, cmp_bits)
        if keep is not None:
            e = _scatter(e, keep) if sparse else e
            empty = ~keep.any(axis=-1, keepdims=True)
            total = arith.add_public(
                party, e.sum(axis=-1, keepdims=True), _encode(empty.astype(np.float64), f + SOFTMAX_EXTRA_BITS)
            )
        else:
            total = e.sum(axis=-1, keepdims=True)
        with party.comm.tag("reciprocal"):
            inv = _reciprocal(party, total, f + SOFTMAX_EXTRA_BITS, 1.0, float(max(n, 2)), f + SOFTMAX_INV_BITS)
        return SoftmaxRows(e, inv, keep if sparse else None)


def _scatter(values: AShare, keep: np.ndarray) -> AShare:
    """The flat `values` at the True positions of `keep`, exact zeros elsewhere (local)."""
    out = AShare(np.zeros(keep.shape, np.uint64), np.zeros(keep.shape, np.uint64))
    out.first[keep], out.second[keep] = values.first, values.second
    return out


# ----------------------------------------------------------------------------- norms


@dataclass(frozen=True)
class NormDomain:
    """The public input range a norm is planned for: |x| <= x_max, the row's variance (LayerNorm) or
    mean square (RMSNorm) in [var_lo, var_hi] before eps, and |scale| <= scale_max.

    The defaults are what real models produce (LLaMA-family outliers: |x| up to 2^15, mean squares up
    to 2^30; rows flatter than var 2^-16 = 1.5e-5 lose precision, eps aside); calibration narrows them.
    """

    x_max: float = 2.0**15
    var_lo: float = 2.0**-16
    var_hi: float = 2.0**30
    scale_max: float = 16.0


@dataclass(frozen=True)
class NormPlan:
    """How one norm runs for a row length, fixed point and domain (`norm_plan`); every field is public."""

    frac_bits: int
    n: int
    eps: float
    base: int  # the numerator before its shift: n d (LayerNorm: n x - sum x, exact) or d (RMSNorm)
    shift: int  # numerator = base * 2^shift: a free shift when >= 0, a truncation (T per element) when < 0
    mean_bits: int  # LayerNorm: 1/n carried at f + mean_bits
    prescale: int  # k > 0: S from d / 2^k and its remainder (n |d|^2 at 2^2f would pass 2^61)
    sum_bits: int  # S = sum d^2 (+ n eps) at this scale
    normalise: bool  # the rsqrt normalises S by its octave (wide ranges)
    cmp_bits: int  # comparison width of the thermometer
    lo: float  # S's range, eps included
    hi: float
    inv_bits: int  # scale of 2^p sqrt(n) / (mult sqrt(S))

    @property
    def mult(self) -> float:
        return self.base * 2.0**self.shift

    @property
    def p(self) -> int:
        return max(0, math.floor(math.log2(self.mult)) - CENTER_EXTRA_BITS)

    @property
    def precision_bits(self) -> float:
        """The fewest significant bits the norm keeps at the domain's worst point: among S at its smallest,
        the rsqrt guess's g^2 at S's largest (x g^2 ~ 2^60), 1/sqrt at its smallest and the numerator.
        The norm's stated bound: each row's error is at most 2^-(precision_bits - 1) times the row's
        largest |output| (before LayerNorm's bias), plus 4 ulp; with the default NormDomain precision_bits
        is 11-12 (n = 48..4096), so 4.9e-4 to 9.8e-4 of the row's largest output."""
        inv_min = 2.0**self.p * math.sqrt(self.n) / (self.mult * math.sqrt(self.hi))
        # The numerator mult d at f bits, for a row of standard deviation sqrt(lo / n).
        numerator = math.log2(self.mult * math.sqrt(self.lo / self.n)) + self.frac_bits
        bits = [math.log2(self.lo) + self.sum_bits, self.inv_bits + math.log2(inv_min), numerator]
        if not self.normalise:
            bits.append(single_product_bits(self.lo, self.hi, self.sum_bits))
        return min(bits)


def norm_plan(f: int, n: int, eps: float, domain: NormDomain, centred: bool, msb_bits: int = 48) -> NormPlan:
    """The variant of LayerNorm (centred) or RMSNorm that covers `domain` at f fractional bits.

    Raises DomainError when none does. Every bound is a true value that must stay below 2^61 in the
    ring (the truncation's 2^62 with a bit to spare), or below 2^(L-2) where it is compared.
    """
    d_max = (2.0 if centred else 1.0) * domain.x_max
    room = _HEADROOM - 2 * f  # a product of two values at f bits is exact below 2^room in real terms
    mean_bits = 0
    if centred:
        mean_bits = min(MEAN_EXTRA_BITS, math.floor(room - math.log2(domain.x_max)))
        if mean_bits < 0:
            raise DomainError(f"|x| up to {domain.x_max:.4g} leaves the row mean no room at 2^{f}")
    # The numerator times the scale (the ride's product) stays below 2^room: a shift up to CENTER_EXTRA_BITS
    # (RMSNorm), or down by a truncation when |base scale| could pass it.
    base = n if centred else 1
    top = math.log2(base * d_max * max(domain.scale_max, 2.0**-f))
    shift = min(0 if centred else CENTER_EXTRA_BITS, math.floor(room - top))
    var_lo = max(domain.var_lo + eps, NORM_VAR_LO)
    var_hi = max(min(domain.var_hi, d_max**2) + eps, 2 * var_lo)
    lo, hi = n * var_lo, n * var_hi
    prescale = max(0, math.ceil(math.log2(hi) + 2 * f - _HEADROOM))
    if prescale and math.log2(n) + 2 * prescale >= _HEADROOM:  # the remainders' squares, l.l < n 2^2k
        raise DomainError(f"rows of {n} values up to {d_max:.4g} overflow the pre-scaled sum of squares at 2^{f}")
    # S's scale: as many bits as the ring allows. Where one product x g^2 cannot keep NORM_SINGLE_BITS at
    # both ends of [lo, hi] (at the scale that balances them), the rsqrt normalises S by its octave first.
    widest = min(f + NORM_SUM_EXTRA_BITS, 2 * f - prescale - 1)
    balanced = min(widest, math.floor((_HEADROOM - 1 - math.log2(hi) - math.log2(lo)) / 2))
    normalise = single_product_bits(lo, hi, balanced) < NORM_SINGLE_BITS
    sum_bits = min(widest, _HEADROOM - 2 - math.ceil(math.log2(hi))) if normalise else balanced
    cmp_bits = comparison_bits(hi, sum_bits, msb_bits)
    # inv = 2^p / (mult sqrt(var)) at 2^inv_bits: its largest value times the series (at f + 5 bits, <= 2.5)
    # and the result (<= sqrt(n) scale_max, at f + inv_bits) stay below 2^61; at most 31 bits, so that the
    # last product ships 4-byte shares.
    mult = base * 2.0**shift
    inv_max = 2.0 ** max(0, math.floor(math.log2(mult)) - CENTER_EXTRA_BITS) / (mult * math.sqrt(var_lo))
    inv_bits = min(
        NORM_INV_BITS,
        math.floor(_HEADROOM - f - RSQRT_COEF_BITS - math.log2(2.5 * inv_max)),
        math.floor(_HEADROOM - f - math.log2(math.sqrt(n) * max(domain.scale_max, 1.0))),
    )
    plan = NormPlan(f, n, eps, base, shift, mean_bits, prescale, sum_bits, normalise, cmp_bits, lo, hi, inv_bits)
    if plan.precision_bits < NORM_MIN_PRECISION_BITS:
        raise DomainError(
            f"variance range [{var_lo:.3g}, {var_hi:.3g}] is too wide for one fixed-point scale "
            f"(about {plan.precision_bits:.0f} significant bits left, {NORM_MIN_PRECISION_BITS} needed)"
        )
    return plan


def _sum_squares(party: Party, d: AShare, coarse: AShare | None, plan: NormPlan) -> AShare:
    """S = sum d^2 + n eps over the last axis at 2^plan.sum_bits, one value per row.

    Direct: one dot product per row and one truncation (bytes per row). Pre-scaled (plan.prescale = k > 0,
    when n |d|^2 at 2^2f would pass 2^61): `coarse` c = truncate(d, k), the remainder l = d - 2^k c
    (|l| < 2^k ring units) is local, and d.d = 2^k c.(d + l) + l.l exactly. c.(d + l) is about d.d / 2^k
    and l.l below n 2^2k, both far below 2^61, so the two dot products truncate by bits that differ by k
    in one batch: S keeps its full precision. Rounds 2; bytes per row M (2M pre-scaled).
    """
    f, k = party.fxp.frac_bits, plan.prescale
    if k == 0:
        ss = arith.matmul_fx(party, d.expand_dims(-2), d.expand_dims(-1), bits=2 * f - plan.sum_bits)
    else:
        rest = arith.sub(d, _shift(coarse, k))
        high, low = arith.matmul_fx(
            party,
            [coarse.expand_dims(-2), rest.expand_dims(-2)],
            [arith.add(d, rest).expand_dims(-1), rest.expand_dims(-1)],
            bits=[2 * f - k - plan.sum_bits, 2 * f - plan.sum_bits],
        )
        ss = arith.add(high, low)
    return arith.add_public(party, ss[..., 0], _encode(plan.n * plan.eps, plan.sum_bits))


def _normalise(party: Party, d: AShare, base: AShare, scale: AShare, plan: NormPlan) -> AShare:
    """scale * d / sqrt(mean(d^2) + eps) over the last axis (the shared tail of layer_norm and rms_norm).

    `base` = plan.base * d exactly (LayerNorm: n x - sum x, no rounded 1/n; RMSNorm: x); the numerator
    is base * 2^shift (16 x for RMSNorm), so the output keeps the centring exact and a few extra bits.
    When the domain is wide, the pre-scaling of d (`_sum_squares`) and a down-shift of the numerator
    are truncations of one batch. S = sum d^2 (`_sum_squares`).
    The rsqrt returns 2^p sqrt(n) / (mult sqrt(S + n eps)) at plan.inv_bits, while
    numerator * scale / 2^p (p = log2(mult) - 4, so the factor is 16..32) rides in its r^2 batch:
    one more full-size product gives the result.
    Rounds 2 (+2 with truncations) + R_C + 3 + 4 + 2 (normalised: R_C + R_A + 2 + 6 + 2), R_C the
    thermometer's comparison on plan.cmp_bits (6 rounds at 48 bits, 7 at 64; the 3 are the guess's b2a beside
    x g^2's select, `_guess_and_product`); bytes/elem 2M (+ T per truncated value), plus per row M (2M
    pre-scaled) + rsqrt's (one M more when normalised).
    """
    cuts = ([(d, plan.prescale)] if plan.prescale else []) + ([(base, -plan.shift)] if plan.shift < 0 else [])
    cut = arith.truncate(party, [v for v, _ in cuts], [b for _, b in cuts]) if cuts else []
    coarse = cut[0] if plan.prescale else None
    numerator = cut[-1] if plan.shift < 0 else _shift(base, plan.shift)
    ss = _sum_squares(party, d, coarse, plan)
    gain = math.sqrt(plan.n) * 2.0**plan.p / plan.mult
    inv, ds = _rsqrt(
        party, ss, plan.sum_bits, plan.lo, plan.hi, gain, plan.inv_bits, (numerator, scale, plan.p), plan.cmp_bits,
        plan.normalise,
    )
    return arith.mul_fx(party, ds, inv, bits=plan.inv_bits)


def layer_norm(
    party: Party, x: AShare, scale: AShare, bias: AShare, eps: float, domain: NormDomain = NormDomain()
) -> AShare:
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * scale + bias; scale, bias secret.

    Domain (`domain`, public): |x| <= x_max, var in [var_lo, var_hi], |scale| <= scale_max; the default
    covers |x| <= 2^15 and var + eps in [2^-16, 2^30]. Within it each row's error is at most
    2^-(plan.precision_bits - 1) times the row's largest |output - bias| plus 4 ulp (`NormPlan.precision_bits`;
    the tests assert it at both ends of the default domain, where precision_bits is 11-12 for n = 48..4096:
    4.9e-4 to 9.8e-4 of the row's largest output), e.g. 5 ulp measured for var >= 1e-3 on a domain with
    var in [1e-6, 1e4]; `norm_plan` picks the variant or raises DomainError.
    The variance's mean: local row sum times 1/n at f + 12 bits (fewer for |x| near 2^15), one
    truncation per row; the output's centring is exact (n x - sum x, truncated by a few bits when
    n |x scale| could pass 2^(61-2f)). Then var via one matmul per row (pre-scaled for large |x|),
    1/sqrt per row (thermometer + binomial series, see rsqrt) and two full-size products.
    Rounds 2 + `_normalise`'s (19 for a narrow domain at L = 48; the default domain's variant adds 2 for
    the truncations, 3 for the normalised rsqrt and 1 for 64-bit comparisons: 25); bytes/elem 2M (+T per
    truncation), plus per row 4M + 16 (k-1) + 48 (x g^2's select) + T (the mean's truncation, 44 B over the
    ranks) + C + (k-2)X + (k-1)A (6M + W + ... pre-scaled and normalised) with k <= ceil(8 log2(hi/lo)) intervals (272 for var in
    [2^-20, 2^14], 368 for the default domain). PUMA 4.4.
    """
    f = party.fxp.frac_bits
    n = x.shape[-1]
    plan = norm_plan(f, n, eps, domain, centred=True, msb_bits=party.msb_bits)
    with party.comm.tag("layer_norm"):
        total = x.sum(axis=-1, keepdims=True)
        cut = f + plan.mean_bits
        mean = arith.truncate(party, arith.mul_public(total, _encode(1.0 / n, cut)), cut)
        centred = arith.sub(arith.mul_public(x, n), total)
        return arith.add(_normalise(party, arith.sub(x, mean), centred, scale, plan), bias)


def rms_norm(party: Party, x: AShare, scale: AShare, eps: float, domain: NormDomain = NormDomain()) -> AShare:
    """RMSNorm over the last axis (LLaMA): x / sqrt(mean(x^2) + eps) * scale; scale secret.

    Domain as layer_norm's, var = mean(x^2): by default |x| <= 2^15 and mean(x^2) + eps in [2^-16, 2^30],
    which covers SmolLM2's |x| = 24,926 and mean squares of 1.09e6; the numerator is 16 x while
    16 x_max scale_max < 2^(61-2f). Error bound as layer_norm's: each row's error is at most
    2^-(plan.precision_bits - 1) times its largest |output| plus 4 ulp (precision_bits = 12 for the
    default domain at n = 48..4096: 4.9e-4 of the row's largest output).
    Rounds `_normalise`'s: 17 for a narrow domain at L = 48, 23 for the default domain's variant
    (tests/runtime/test_nonlinear.py checks both); bytes/elem 2M (+T per truncation), plus per row
    4M + 16 (k-1) + 48 + C + (k-2)X + (k-1)A (6M + W + ... pre-scaled and normalised).
    """
    plan = norm_plan(party.fxp.frac_bits, x.shape[-1], eps, domain, centred=False, msb_bits=party.msb_bits)
    with party.comm.tag("rms_norm"):
        return _normalise(party, x, x, scale, plan)
