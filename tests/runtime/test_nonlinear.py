"""The secure nonlinear kernels against approx.py's float64 definitions (both sets: refit and
PUMA's), each definition against the exact function at its worst points, the kernels at both ends of
their stated domains, and their counted cost against the formulas in their docstrings. Errors are in
absolute terms; one ulp is 2^-18 = 3.8e-6."""

import dataclasses
import math

import numpy as np
import pytest
from scipy.special import erf

from puma_onnx.runtime import approx, arith, compare, convert, nonlinear
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.nonlinear import NormDomain

from .helpers import cost_of, encoded, open_fx, share_fx

ULP = 2.0**-18
rng = np.random.default_rng(2307)




def secure(fn, *arrays):
    """fn(party, *shared arrays), revealed; every array is shared by rank 0."""
    return run_parties(lambda p: open_fx(p, fn(p, *[share_fx(p, a) for a in arrays])))[0]


# ----------------------------------------------------------------------------- exp

SETS = list(approx.SETS.values())


@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_exp_neg_within_2_ulp_of_its_definition_on_minus_40_to_0(fit):
    e = fit.exp
    # Every cut point of both sets, and both sides of them (the secure cut may fall anywhere in [-cut_far, -cut]).
    x = np.concatenate([rng.uniform(-40, 0, 3000), [0.0, -1e-6, -e.cut, -e.cut_far, -e.cut + 1e-3, -e.cut_far - 1e-3]])
    got = secure(lambda p, a: nonlinear.exp_neg(p, a, e), x)
    want = e(encoded(x))
    between = (x < -e.cut) & (x >= -e.cut_far)
    err = np.abs(got - want)
    assert err[~between].max() <= 2 * ULP, f"max error {err[~between].max():.3g}"
    # Between the two cuts the secure value is 0 or the polynomial's, both below the set's value at -cut.
    assert np.all(got[between] <= e(np.array(-e.cut)) + 2 * ULP)


def _exp_at(f: int, bits: int, fit, x: np.ndarray) -> np.ndarray:
    """exp_neg's answer at `bits` fractional bits, on f-bit shares of x (in units of 2^-bits from its definition)."""
    out = run_parties(
        lambda p: arith.reveal(p, nonlinear._exp_neg(p, share_fx(p, x), bits, fit.exp)), frac_bits=f
    )[0]
    return (out.view(np.int64) / 2.0**bits - fit.exp(encoded(x, f))) * 2.0**bits


@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_exp_neg_at_the_softmax_scale_has_no_bias_and_little_noise(fit):
    """At f + 8 bits (the softmax's exp, whose row sum collects every entry's bias) exp keeps within 12
    2^-(f+8) of its definition on average at x = -3..-6, where y^4 = (x/8)^4 weighs most (c4 at 12 bits,
    EXP_SQ_BITS = 24, erred +85 there), and within 128 (half an ulp at f) each, near 0 too, where y^2's own
    rounding weighs most (EXP_SQ_BITS = 20: 238). The points are not dyadic, so y^2 does round."""
    own = np.random.default_rng(41)
    points = [-3.0, -4.0, -5.0, -6.0, -0.3, -0.05, -fit.exp.cut + 0.5]
    x = np.repeat(points, 200) + own.uniform(-1e-3, 1e-3, 200 * len(points))
    err = _exp_at(18, 18 + nonlinear.SOFTMAX_EXTRA_BITS, fit, x).reshape(len(points), -1)
    assert np.abs(err.mean(axis=1)).max() <= 12, err.mean(axis=1)
    assert np.abs(err).max() <= 128, np.abs(err).max(axis=1)


@pytest.mark.parametrize("f", [16, 20])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_exp_neg_within_2_ulp_at_the_ends_of_the_fixed_point_range(fit, f):
    """The CLI's --frac-bits 16 and 20: y^2's rounding weighs 2^(f-EXP_SQ_BITS) ulp near 0 (EXP_SQ_BITS = 20 gave
    3.9 ulp at f = 20)."""
    own = np.random.default_rng(43)
    x = np.concatenate([own.uniform(-1.5, 0, 2000), own.uniform(-fit.exp.cut, 0, 1000)])
    assert np.abs(_exp_at(f, f, fit, x)).max() <= 2


@pytest.mark.parametrize("fit, bound", [(approx.PUMA, 0.0086), (approx.REFIT, 1.2e-5)], ids=["puma", "refit"])
def test_exp_neg_against_the_exact_exp(fit, bound):
    x = np.concatenate([rng.uniform(-40, 0, 3000), -np.linspace(0, 16, 1601)])
    got = secure(lambda p, a: nonlinear.exp_neg(p, a, fit.exp), x)
    assert np.abs(got - np.exp(x)).max() < bound


def test_exp_neg_gives_zero_far_below_the_clip():
    x = -np.exp(rng.uniform(np.log(20), np.log(1e6), 500))
    for fit in SETS:
        assert np.abs(secure(lambda p, a: nonlinear.exp_neg(p, a, fit.exp), x)).max() <= ULP


def test_exp_neg_with_64_bit_comparisons_clips_beyond_the_48_bit_range():
    # -2^31 is beyond a 48-bit comparison at 18 fractional bits (2^29); a 64-bit one still clips it.
    x = np.array([-(2.0**31), -(2.0**40), -1.0, 0.0])
    got = secure(lambda p, a: nonlinear.exp_neg(p, a, approx.REFIT.exp, cmp_bits=64), x)
    assert np.abs(got - np.array([0.0, 0.0, np.exp(-1.0), 1.0])).max() <= 4 * ULP


@pytest.mark.parametrize("bits", [48, 64])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_exp_neg_at_the_far_end_of_its_stated_domain(fit, bits):
    # The docstring's |x| < 2^(L-1-f): 2^29 on 48-bit comparisons, 2^45 on 64 (the largest float below it).
    end = np.nextafter(2.0 ** (bits - 1 - 18), 0)
    x = np.array([-end, -end / 2, -(2.0 ** (bits - 2 - 18)), -1.0, -ULP, 0.0])
    got = secure(lambda p, a: nonlinear.exp_neg(p, a, fit.exp, cmp_bits=bits), x)
    with np.errstate(over="ignore"):  # the float64 definition's squares of 1 - 2^40 overflow to inf, then 0
        want = fit.exp(encoded(x))
    assert np.abs(got - want).max() <= 2 * ULP


# ----------------------------------------------------------------------------- reciprocal, rsqrt


def test_reciprocal_within_5_ulp_on_1_to_128():
    x = np.concatenate([np.exp(rng.uniform(0, np.log(128), 2000)), [1.0, 128.0, 2.0**0.5]])
    got = secure(lambda p, a: nonlinear.reciprocal(p, a, 1.0, 128.0), x)
    err = np.abs(got - 1 / encoded(x)).max()
    assert err <= 5 * ULP, f"max error {err:.3g}"


def test_reciprocal_over_the_whole_useful_range_at_both_ends():
    lo, hi = 2.0**-16, 2.0**40  # 1/x from 2^16 down to below one ulp; comparisons on 64 bits
    x = np.concatenate([[lo, 1.5 * lo, hi / 1.5, hi], np.exp(rng.uniform(np.log(lo), np.log(hi), 300))])
    got = secure(lambda p, a: nonlinear.reciprocal(p, a, lo, hi), x)
    want = 1 / encoded(x)
    # r, r^2 and r^4 each round by < 1 ulp at f bits: relative r^8 + (1/(1-r) + 1 + 1) 2^-f <= 7.5e-7 +
    # 3.21 ulp where 1/x is large (2.7 ulp seen in 16000 draws near lo), a few ulp where it is small.
    excess = np.abs(got - want) - (7.5e-7 + 3.25 * ULP) * want
    assert excess.max() <= 4 * ULP, f"max error {np.abs(got - want).max():.3g}"


def few_ulp_and_top(top):
    """The ends of what f = 18 can encode below `top`: 1-64 ulp, the top octave up to the largest float
    below top (2^42 or 2^44: the 2^60, 2^62 in the ring that the stated domains end at), and 300 points
    log-uniform in between (an rng of their own: the module's draws for other tests stay as they were)."""
    own = np.random.default_rng(8)
    below = np.nextafter(top, 0)
    return np.concatenate([
        np.arange(1, 65) * ULP, [below, below - 1.0, top * (1 - 2.0**-20)], top * (1 - own.uniform(0, 0.5, 60)),
        np.exp(own.uniform(np.log(ULP), np.log(top), 300)),
    ])


def test_reciprocal_at_the_true_ends_of_its_stated_domain():
    """lo = 2^-(60-2f) = 2^-24 and hi just below 2^(62-f) = 2^44, the extreme bounds the docstring admits,
    on inputs from 1 ulp (1/x = 2^18) to just below 2^44 (1/x = 2^-44, far below an ulp)."""
    lo, hi = 2.0**-24, np.nextafter(2.0**44, 0)
    x = few_ulp_and_top(2.0**44)
    got = secure(lambda p, a: nonlinear.reciprocal(p, a, lo, hi), x)
    want = 1 / encoded(x)
    # The docstring's bound: r^8 + 3.25 2^-f relative plus 4 ulp. Seen here: 1.75 ulp above the relative term,
    # 6.2e-6 relative at 1-64 ulp (1/x = 2^12..2^18); in 45,000 draws 3.5 ulp (1/x near 2e-6) and 8.6e-6.
    excess = np.abs(got - want) - (7.5e-7 + 3.25 * ULP) * want
    assert excess.max() <= 4 * ULP, f"max excess {excess.max() / ULP:.3g} ulp at x = {x[np.argmax(excess)]:.6g}"


@pytest.mark.parametrize("hi", [np.nextafter(2.0**42, 0), 2.0**22], ids=["normalised", "single-product"])
def test_rsqrt_at_the_true_ends_of_its_stated_domain(hi):
    """lo = 2^-(f+3) = 2^-21, the lowest bound the docstring admits, with hi just below 2^(60-f) = 2^42 (x
    normalised by its octave) or at 2^22, the widest range one product x g^2 still covers; inputs from
    1 ulp (1/sqrt = 512) to hi. Catches lo = 2^-21 without normalising: g^2 = 1/lo at 2^(60-f) is 2^63,
    which does not fit the ring (before, the kernel raised mid-protocol)."""
    lo = 2.0**-21
    x = few_ulp_and_top(hi)
    got = secure(lambda p, a: nonlinear.rsqrt(p, a, lo, hi), x)
    want = 1 / np.sqrt(encoded(x))
    excess = np.abs(got - want) - 2e-6 * want
    assert excess.max() <= 2 * ULP, f"max excess {excess.max() / ULP:.3g} ulp at x = {x[np.argmax(excess)]:.6g}"


def test_rsqrt_on_a_range_at_one_ulp_keeps_its_lo():
    """[2^-20, 2^-18]: admitted (lo >= 2^-21), and its only encodable input is 1 ulp; raising lo to one ulp
    there would leave an empty range (the kernel raised on it)."""
    x = np.array([2.0**-18])
    got = secure(lambda p, a: nonlinear.rsqrt(p, a, 2.0**-20, 2.0**-18), x)
    assert abs(got[0] - 512.0) <= 2e-6 * 512 + 2 * ULP, got


@pytest.mark.parametrize(
    "kernel, lo, hi, steps, exact, bound",
    [
        # reciprocal: r^8 + 3.25 ulp relative, plus 4 ulp; rsqrt: 2e-6 relative plus 2 ulp (their docstrings).
        ("reciprocal", 1.0, 1.2, nonlinear.RECIP_STEPS_PER_OCTAVE, lambda x: 1 / x, (7.5e-7 + 3.25 * ULP, 4 * ULP)),
        ("rsqrt", 1.0, 1.05, nonlinear.RSQRT_STEPS_PER_OCTAVE, lambda x: 1 / np.sqrt(x), (2e-6, 2 * ULP)),
    ],
)
def test_a_range_inside_one_guess_interval_is_split_at_its_middle(kernel, lo, hi, steps, exact, bound):
    """[1, 1.2] is less than a half-octave (reciprocal's step) and [1, 1.05] less than an eighth (rsqrt's):
    the grid has no inner edge of its own, and an empty thermometer failed in the guess's linear combination
    on every rank. The range now takes one threshold at its middle; both ends and the middle stay within
    the kernels' stated bounds."""
    thresholds, a, b = nonlinear._grid(lo, hi, steps, 18)
    assert len(thresholds) == 1 and a[0] == lo and b[-1] == hi
    x = np.concatenate([[lo, hi, np.sqrt(lo * hi)], a, b, rng.uniform(lo, hi, 64)])
    got = secure(lambda p, v: getattr(nonlinear, kernel)(p, v, lo, hi), x)
    want = exact(encoded(x))
    relative, absolute = bound
    assert (np.abs(got - want) - relative * want).max() <= absolute


def test_rsqrt_within_2e_minus_6_relative_plus_2_ulp_on_2e_minus_10_to_2e10():
    x = np.exp(rng.uniform(np.log(2.0**-10), np.log(2.0**10), 2000))
    got = secure(nonlinear.rsqrt, x)
    want = 1 / np.sqrt(encoded(x))
    excess = np.abs(got - want) - 2e-6 * want
    assert excess.max() <= 2 * ULP, f"max error {np.abs(got - want).max():.3g} (at 1/sqrt up to 32)"


def grid_edges(lo, hi, per_octave):
    """Both ends of every guess interval of a thermometer (`_grid`, inputs at 18 fractional bits): where
    |r| is largest, so where a series or a guess that is off first shows."""
    _, a, b = nonlinear._grid(lo, hi, per_octave, 18)
    return np.concatenate([a, b])


def test_reciprocal_at_every_interval_edge_of_its_half_octave_grid():
    x = grid_edges(1.0, 128.0, nonlinear.RECIP_STEPS_PER_OCTAVE)
    got = secure(lambda p, a: nonlinear.reciprocal(p, a, 1.0, 128.0), x)
    # As on random points: r^8 <= 7.5e-7 relative at the edges, plus the three roundings of r, r^2, r^4.
    excess = np.abs(got - 1 / x) - (7.5e-7 + 3.25 * ULP) / x
    assert excess.max() <= 4 * ULP, f"max error {np.abs(got - 1 / x).max():.3g}"


@pytest.mark.parametrize("lo, hi", [(2.0**-10, 2.0**10), (2.0**-16, 2.0**40)], ids=["default", "normalised"])
def test_rsqrt_at_every_interval_edge_of_its_eighth_octave_grid(lo, hi):
    x = grid_edges(lo, hi, nonlinear.RSQRT_STEPS_PER_OCTAVE)
    got = secure(lambda p, a: nonlinear.rsqrt(p, a, lo, hi), x)
    want = 1 / np.sqrt(x)
    # |r| = 0.0433 at the edges: the degree-3 series' 9.6e-7 (exact coefficients), within 2e-6 relative.
    excess = np.abs(got - want) - 2e-6 * want
    assert excess.max() <= 2 * ULP, f"max error {np.abs(got - want).max():.3g} (at 1/sqrt up to {want.max():.3g})"


def test_rsqrt_normalises_over_2e_minus_16_to_2e40_at_both_ends():
    lo, hi = 2.0**-16, 2.0**40
    x = np.concatenate([[lo, 1.1 * lo, hi / 1.1, hi], np.exp(rng.uniform(np.log(lo), np.log(hi), 300))])
    got = secure(lambda p, a: nonlinear.rsqrt(p, a, lo, hi), x)
    want = 1 / np.sqrt(encoded(x))
    excess = np.abs(got - want) - 2e-6 * want
    assert excess.max() <= 2 * ULP, f"max error {np.abs(got - want).max():.3g}"


# ----------------------------------------------------------------------------- GeLU, SiLU


def exact_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def exact_silu(x):
    return x / (1 + np.exp(-x))


def breakpoints(fit):
    """Each break, and a hair on either side of it."""
    return np.concatenate([[b - 1e-4, b, b + 1e-4] for b in fit.breaks])


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_piecewise_within_4_ulp_of_its_definition_near_the_breaks_and_far_out(fit, name):
    piecewise = getattr(fit, name)
    # (Exactly at a break the comparison sees the rounded break: either side's value is right.)
    x = np.concatenate([rng.uniform(-10, 10, 3000), breakpoints(piecewise), [-3e5, 3e5, -1000.5, 1000.5]])
    got = secure(lambda p, a: getattr(nonlinear, name)(p, a, piecewise), x)
    exact = np.isin(x, piecewise.breaks)
    err = np.abs(got - piecewise(encoded(x)))[~exact]
    assert err.max() <= 4 * ULP, f"max error {err.max():.3g}"


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_piecewise_exactly_at_its_encoded_breaks_takes_the_upper_piece(fit, name):
    """The comparisons [x < break] see the break rounded to 18 bits: x equal to it takes the upper piece,
    one ulp below it the lower one, as approx.Piecewise's half-open pieces with the rounded breaks."""
    piecewise = getattr(fit, name)
    breaks = encoded(np.array(piecewise.breaks))
    x = np.concatenate([breaks, breaks - ULP])
    got = secure(lambda p, a: getattr(nonlinear, name)(p, a, piecewise), x)
    want = dataclasses.replace(piecewise, breaks=tuple(breaks))(x)
    assert np.abs(got - want).max() <= 4 * ULP, f"errors {np.abs(got - want)}"


@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_gelu_held_by_ranks_1_and_2_is_the_same_answer_a_round_and_16_bytes_sooner(fit):
    """`held`: the select's truncation leaves its answer 2-of-2 at ranks 1 and 2 (`arith.HeldByTwo`); reshared
    later, it is GeLU within the same 4 ulp, at both breaks and far out; held, it has cost 16 B per element
    and a round less than the replicated answer."""
    own = np.random.default_rng(31)  # its own draws: the module's rng feeds the tests below as before
    x = np.concatenate([own.uniform(-6, 6, 200), breakpoints(fit.gelu), [-3e5, 3e5]])

    def prog(p):
        a = share_fx(p, x)
        held, cost = cost_of(p, lambda: nonlinear.gelu(p, a, fit.gelu, held=True))
        _, full = cost_of(p, lambda: nonlinear.gelu(p, a, fit.gelu))
        return open_fx(p, held.reshare(p)), cost, full

    results = run_parties(prog)
    got = results[0][0]
    exact = np.isin(x, fit.gelu.breaks)
    assert np.abs(got - fit.gelu(encoded(x)))[~exact].max() <= 4 * ULP
    assert all(r[1].rounds + 1 == r[2].rounds for r in results)
    assert sum(r[2].bytes - r[1].bytes for r in results) == 16 * x.size


# Each definition against the exact function: its largest error over all real x and where it occurs,
# and its largest error on [-1, 1], where most activations of real models lie.
EXACT_ERROR = {
    ("puma", "gelu"): (0.019913, 3.0, 0.008526),  # its jump at x = 3
    ("refit", "gelu"): (0.007154, 2.8, 0.00063727),  # its breaks, -2.8 and 2.8: the tails' own error
    ("puma", "silu"): (0.071945, 4.0, 0.008506),  # its jump at x = 4
    ("refit", "silu"): (0.035000, -4.5712, 0.0015985),  # the fit's cap, inside its middle piece
    ("puma", "exp"): (0.008547, -1.9789, None),
    ("refit", "exp"): (6.144e-6, -12.0, None),  # exp(-12), at its cut
}


@pytest.mark.parametrize("key", list(EXACT_ERROR), ids=lambda k: "-".join(k))
def test_definition_error_against_the_exact_function_at_its_worst_points(key):
    name, fn = key
    bound, worst, near_zero = EXACT_ERROR[key]
    if fn == "exp":
        definition, exact = approx.SETS[name].exp, np.exp
        x = np.concatenate([-np.linspace(0, 40, 400001), [worst, -approx.SETS[name].exp.cut]])
    else:
        definition, exact = getattr(approx.SETS[name], fn), exact_gelu if fn == "gelu" else exact_silu
        x = np.concatenate([np.linspace(-40, 40, 800001), breakpoints(definition), [worst]])
    err = np.abs(definition(x) - exact(x))
    assert 0.99 * bound < err.max() <= bound * 1.0001
    assert abs(x[np.argmax(err)] - worst) < 2e-4
    if near_zero is not None:
        assert np.abs(err[np.abs(x) <= 1]).max() <= near_zero * 1.0001


def test_refit_is_closer_to_the_exact_functions_than_pumas():
    x = np.linspace(-40, 40, 800001)
    near = np.abs(x) <= 1
    for fn, exact in (("gelu", exact_gelu), ("silu", exact_silu)):
        puma = np.abs(getattr(approx.PUMA, fn)(x) - exact(x))
        ours = np.abs(getattr(approx.REFIT, fn)(x) - exact(x))
        assert ours.max() < 0.65 * puma.max() and ours[near].max() < 0.7 * puma[near].max(), fn
    x = -np.linspace(0, 40, 400001)
    assert np.abs(approx.REFIT.exp(x) - np.exp(x)).max() * 1000 < np.abs(approx.PUMA.exp(x) - np.exp(x)).max()


def test_secure_gelu_against_the_exact_function():
    x = np.concatenate([rng.uniform(-6, 6, 3000), breakpoints(approx.REFIT.gelu)])
    for fit, bound in ((approx.PUMA, 0.02), (approx.REFIT, 0.0072)):
        got = secure(lambda p, a: nonlinear.gelu(p, a, fit.gelu), x)
        assert np.abs(got - exact_gelu(x)).max() < bound, fit.name


@pytest.mark.parametrize("fn", ["gelu", "silu"])
def test_piecewise_with_narrow_comparisons_up_to_the_end_of_their_range(fn):
    # 25 bits hold |x| < 2^(25 - 2 - 18) = 32 with a bit to spare: the ends of that range, every break.
    fit = getattr(approx.REFIT, fn)
    # Beside each break (at it, the encoded break may round either way: the pieces' jump is no error).
    near = np.concatenate([np.array(fit.breaks) + d for d in (-2 * ULP, 2 * ULP)])
    x = np.concatenate([[-32.0, -31.99, 31.99, 32.0, -ULP, 0.0, ULP], near, rng.uniform(-32, 32, 500)])
    got = secure(lambda p, a: getattr(nonlinear, fn)(p, a, fit, cmp_bits=25), x)
    assert np.abs(got - fit(encoded(x))).max() <= 4 * ULP


def test_softmax_with_narrow_comparisons_at_the_end_of_its_range():
    # 25 bits: scores within 2^(25 - 2 - 18) = 32 of each other; here 31 apart, and a row of ties.
    x = np.array([[15.5, -15.5, 0.0, 15.0, -15.0, 3.0], [7.0, 7.0, 7.0, 7.0, 7.0, 7.0]])
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, approx.REFIT.exp, cmp_bits=25), x)
    assert np.abs(got - exact_softmax(x, np.ones_like(x, dtype=bool))).max() <= 1e-4


@pytest.mark.parametrize("bits", [48, 64])
@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_piecewise_at_the_ends_of_its_stated_domain(fit, name, bits):
    """|x| up to 2^(L-2-f) (2^28 at L = 48, 2^44 at 64), and on to 2^(L-1-f) - 9: the comparisons take x
    minus each break (|break| <= 8). The domain once said |x| < 2^(L-1-f), where x - break wraps."""
    piecewise = getattr(fit, name)
    top, edge = 2.0 ** (bits - 2 - 18), 2.0 ** (bits - 1 - 18) - 9.0
    x = np.array([-top, top, -top + ULP, top - ULP, -edge, edge, -1.0, 1.0, -ULP, ULP, 0.0])
    got = secure(lambda p, a: getattr(nonlinear, name)(p, a, piecewise, cmp_bits=bits), x)
    assert np.abs(got - piecewise(encoded(x))).max() <= 4 * ULP


def test_piecewise_with_64_bit_comparisons_beyond_the_48_bit_range():
    x = np.array([-(2.0**35), 2.0**35, -1.0, 1.0, 2.0**40])
    got = secure(lambda p, a: nonlinear.gelu(p, a, approx.REFIT.gelu, cmp_bits=64), x)
    assert np.abs(got - approx.REFIT.gelu(x)).max() <= 4 * ULP


# ----------------------------------------------------------------------------- softmax


def exact_softmax(x, keep):
    e = np.where(keep, np.exp(x - np.where(keep, x, -np.inf).max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


def softmax_tolerance(x, keep, exp):
    """3 ulp, plus what the secure cut may keep between -cut_far and -cut (0 or exp's value there) per row."""
    d = np.where(keep, x - np.where(keep, x, -np.inf).max(-1, keepdims=True), 0.0)
    between = ((d < -exp.cut) & (d >= -exp.cut_far - 1e-3) & keep).sum(-1, keepdims=True)
    return 3 * ULP + between * exp(np.array(-exp.cut))


@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_softmax_without_mask_within_3_ulp(fit):
    x = rng.normal(0, 4, (6, 3, 32))
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, fit.exp), x)
    keep = np.ones(x.shape, bool)
    want = approx.softmax(encoded(x), None, fit.exp)
    assert np.all(np.abs(got - want) <= softmax_tolerance(encoded(x), keep, fit.exp))


@pytest.mark.parametrize("fit, bound", [(approx.PUMA, 0.075), (approx.REFIT, 4e-4)], ids=["puma", "refit"])
def test_softmax_against_the_exact_softmax(fit, bound):
    x = rng.normal(0, 3, (40, 128))
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, fit.exp), x)
    assert np.abs(got - exact_softmax(x, True)).max() < bound


def test_softmax_whose_max_ignores_low_bits_stays_within_3_ulp_on_near_ties():
    """On 28-bit comparisons (BERT-base's recorded scores) the max tree drops 3 low bits: rows whose top
    entries differ by 0-8 ulp (its worst case: it may keep the smaller), with scores near the range's end."""
    assert nonlinear.max_drop_bits(28, 18) == 3
    top = rng.uniform(-60, 60, (16, 1))
    x = top - rng.integers(0, 9, (16, 64)) * ULP  # the row's top within 8 ulp of each other
    x[:, ::2] -= rng.uniform(0, 5, (16, 32))
    x[:3, 1] = top[:3, 0] - 63.0  # the far end of the 28-bit range: 2^(28 - 2 - 18) = 64
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, approx.REFIT.exp, cmp_bits=28), x)
    keep = np.ones(x.shape, bool)
    want = approx.softmax(encoded(x), None, approx.REFIT.exp)
    assert np.all(np.abs(got - want) <= softmax_tolerance(encoded(x), keep, approx.REFIT.exp))


def test_softmax_with_causal_mask_within_3_ulp():
    x = rng.normal(0, 4, (4, 24, 24))
    causal = np.tril(np.ones((24, 24), dtype=bool))
    got = secure(lambda p, a: nonlinear.softmax(p, a, causal), x)
    want = approx.softmax(encoded(x), causal)
    keep = np.broadcast_to(causal, x.shape)
    assert np.all(np.abs(got - want) <= softmax_tolerance(encoded(x), keep, approx.REFIT.exp))
    assert np.all(got[:, ~causal] == 0.0)


def test_softmax_padding_mask_ignores_huge_masked_scores_and_zeroes_empty_rows():
    x = rng.normal(0, 3, (5, 16))
    x[:, 12:] = x[:, :2] = 1e6  # would win the max if the mask were applied after it
    keep = np.ones((5, 16), dtype=bool)
    keep[:, 12:] = keep[:, :2] = False  # padding on both sides: the first kept position is not the first
    keep[3] = False
    got = secure(lambda p, a: nonlinear.softmax(p, a, keep, approx.PUMA.exp), x)
    rows = [0, 1, 2, 4]
    err = np.abs(got[rows] - approx.softmax(encoded(x[rows]), keep[rows], approx.PUMA.exp)).max()
    assert err <= 3 * ULP, f"max error {err:.3g}"
    assert np.all(got[3] == 0.0) and np.all(got[:, 12:] == 0.0) and np.all(got[:, :2] == 0.0)


def _softmax_times(mask=None):
    return lambda p, a, v: nonlinear.softmax_rows(p, a, mask).times(p, v)


def test_softmax_times_v_takes_the_row_scaling_after_the_product():
    """(e @ v) / sum against approx.softmax @ v, with a padding mask (huge masked scores, an empty row): each
    answer within the softmax's own error carried through v, plus 2 ulp for the two truncations."""
    own = np.random.default_rng(32)
    x = own.normal(0, 3, (3, 10, 32))
    v = own.normal(0, 2, (3, 32, 6))
    keep = np.ones(x.shape, dtype=bool)
    keep[..., 28:] = keep[..., :3] = False
    keep[1, 4] = False  # an empty row: zeros
    x[~keep] = 1e6
    got = secure(_softmax_times(keep), x, v)
    with np.errstate(invalid="ignore"):  # approx.softmax's empty row is NaN; the secure one is 0
        probs = np.nan_to_num(approx.softmax(encoded(x), keep))
    per_row = softmax_tolerance(encoded(x), keep, approx.REFIT.exp)  # per score, for each row
    bound = per_row * np.abs(encoded(v)).sum(-2, keepdims=True) + 2 * ULP
    assert np.all(np.abs(got - probs @ encoded(v)) <= bound)
    assert np.all(got[1, 4] == 0.0)


def test_softmax_times_v_at_the_end_of_its_range():
    """Equal scores over 128 keys (every e = 1, the sum 128) and v = 1000: e @ v = 128000 at 2^44 is within
    2^-0.03 of 2^61, the most `SoftmaxRows.fits` admits; the answer, 1000, within the softmax's own 3 ulp per
    score carried through v (1/sum's relative error times 1000: 0.015 seen; a wrapped product is off by far
    more)."""
    assert nonlinear.SoftmaxRows.fits(18, 128, 1000.0) and not nonlinear.SoftmaxRows.fits(18, 128, 1030.0)
    assert not nonlinear.SoftmaxRows.fits(18, 8, 4100.0)  # the last product's own bound (2^49 x 4096 = 2^61)
    x = np.zeros((2, 128))
    v = np.full((128, 3), 1000.0)
    got = secure(_softmax_times(), x, v)
    assert np.abs(got - 1000.0).max() <= 3 * ULP * 128 * 1000.0 + 2 * ULP


def test_cost_softmax_times_v_two_products_per_output_element():
    """softmax @ v as `times`: the softmax's own cost without its last product, then a matmul and a product per
    output element as one chain (runtime/chain.py: 3 rounds, 32 B per truncation and 12 per element over the
    ranks, 12 B less than a matmul_fx and a mul_fx): n - d_v products per query fewer than the softmax's product."""
    own = np.random.default_rng(33)
    x, v = own.normal(0, 3, (2, 16, 32)), own.normal(0, 2, (2, 32, 8))
    rounds, nbytes, u = total_cost(_softmax_times(), x, v)
    rows_rounds, rows_bytes, _ = total_cost(lambda p, a, b: nonlinear.softmax_rows(p, a), x, v)
    assert rounds == rows_rounds + 2 + 1
    assert nbytes == rows_bytes + 2 * 16 * 8 * (32 * 2 + 12) == rows_bytes + 2 * 16 * 8 * (2 * u["M"][1] - 12)


def test_softmax_with_every_entry_masked_gives_zeros():
    """No kept entry at all: every row is the empty row's 0, returned before any message (exp and the product
    on the kept entries alone would otherwise run on empty arrays, which the comparisons cannot take)."""
    got = secure(lambda p, a: nonlinear.softmax(p, a, np.zeros((3, 8), dtype=bool)), rng.normal(0, 3, (3, 8)))
    assert got.shape == (3, 8) and np.all(got == 0.0)


@pytest.mark.parametrize("bits", [48, 64])
def test_softmax_with_kept_scores_at_the_far_end_of_their_stated_spread(bits):
    # Kept entries within 2^(L-2-f) of each other (2^28 at L = 48, 2^44 at 64): the largest float below it.
    s = np.nextafter(2.0 ** (bits - 2 - 18), 0)
    x = np.array([[s / 2, -s / 2, s / 2 - 1, s / 2 - 3], [0.0, -s, -1.0, -2.0]])
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, approx.REFIT.exp, cmp_bits=bits), x)
    keep = np.ones(x.shape, bool)
    with np.errstate(over="ignore"):  # as in exp_neg's test: the definition far below its cut
        want = approx.softmax(encoded(x), None, approx.REFIT.exp)
        tolerance = softmax_tolerance(encoded(x), keep, approx.REFIT.exp)
    assert np.all(np.abs(got - want) <= tolerance)


def test_softmax_with_64_bit_comparisons_takes_scores_beyond_the_48_bit_range():
    x = np.array([[3.0e9, 3.0e9 - 1.0, -3.0e9, 3.0e9 - 20.0]])
    got = secure(lambda p, a: nonlinear.softmax(p, a, None, approx.REFIT.exp, cmp_bits=64), x)
    want = exact_softmax(x - 3.0e9, True)
    assert np.abs(got - want).max() <= 1e-4


# ----------------------------------------------------------------------------- norms


VARIANCES = np.exp(np.linspace(np.log(1e-6), np.log(1e4), 12))
# The range of the inputs below, as calibration would record it.
TEST_DOMAIN = NormDomain(x_max=500.0, var_lo=1e-6, var_hi=1e4, scale_max=2.0)


def norm_inputs(n=48):
    """Rows whose variance runs over 1e-6 .. 1e4 exactly (standardised noise: a sampled variance past
    TEST_DOMAIN's 1e4 would leave the kernel's domain), with means up to 100."""
    z = rng.normal(0, 1, (12, n))
    z = (z - z.mean(axis=-1, keepdims=True)) / z.std(axis=-1, keepdims=True)
    x = z * np.sqrt(VARIANCES)[:, None] + rng.uniform(-100, 100, (12, 1))
    return x, rng.normal(1, 0.3, n), rng.normal(0, 0.3, n)


def check_norm_error(err):
    """Fixed point limits rows of tiny variance (at var 1e-6 the values carry ~260 steps per std)."""
    worst = err.max(axis=-1)
    assert worst[VARIANCES >= 1e-3].max() <= 12 * ULP, f"max error {worst[VARIANCES >= 1e-3].max():.3g}, var >= 1e-3"
    assert worst[VARIANCES >= 5e-6].max() <= 2e-4, f"max error {worst[VARIANCES >= 5e-6].max():.3g}, var >= 5e-6"
    assert worst.max() <= 3e-3, f"max error {worst.max():.3g} at var 1e-6"


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_over_variance_1e_minus_6_to_1e4(eps):
    x, scale, bias = norm_inputs()
    got = secure(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, eps, TEST_DOMAIN), x, scale, bias)
    check_norm_error(np.abs(got - approx.layer_norm(encoded(x), encoded(scale), encoded(bias), eps)))


def test_rms_norm_over_mean_square_1e_minus_6_to_1e4():
    z = rng.normal(0, 1, (12, 48))
    x = z / np.sqrt((z * z).mean(axis=-1, keepdims=True)) * np.sqrt(VARIANCES)[:, None]  # mean squares exactly
    scale = rng.normal(1, 0.3, 48)
    got = secure(lambda p, a, s: nonlinear.rms_norm(p, a, s, 1e-12, TEST_DOMAIN), x, scale)
    check_norm_error(np.abs(got - approx.rms_norm(encoded(x), encoded(scale), 1e-12)))


def test_layer_norm_of_a_constant_row_is_the_bias():
    x = np.full((2, 16), 3.25)
    scale, bias = rng.normal(1, 0.3, 16), rng.normal(0, 0.3, 16)
    got = secure(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, 1e-12), x, scale, bias)
    assert np.abs(got - encoded(bias)).max() <= ULP


def default_domain_rows(n, rms: bool):
    """Rows at both ends of the default domain: |x| = 2^15 everywhere (var 2^30), one 2^15 outlier
    (SmolLM2's shape), an ordinary row, and var at its floor 2^-16 (eps aside)."""
    flat = rng.normal(0, 1, n)
    rows = [
        rng.choice([-1.0, 1.0], n) * 2.0**15,
        np.r_[2.0**15, rng.normal(0, 3, n - 1)],
        rng.normal(0, 1, n),
        (flat - flat.mean()) / flat.std() * 2.0**-8 * 1.01,
    ]
    shift = 0.0 if rms else 1000.0
    return np.stack(rows) + shift * np.r_[0, 0, 1, 1][:, None]


def check_within_plan(got, want, plan, ulp=ULP):
    """The stated bound: relative 2^-(precision_bits - 1) of the row's largest output, plus 4 ulp."""
    err = np.abs(got - want).max(-1)
    bound = np.abs(want).max(-1) * 2.0 ** -(plan.precision_bits - 1) + 4 * ulp
    assert np.all(err <= bound), f"errors {err} above {bound}"


@pytest.mark.parametrize("n", [48, 576])
def test_rms_norm_default_domain_at_both_ends(n):
    x, scale = default_domain_rows(n, rms=True), rng.normal(1, 0.3, n)
    eps = 1e-5
    plan = nonlinear.norm_plan(18, n, eps, NormDomain(), centred=False)
    assert plan.prescale > 0 and plan.normalise and plan.cmp_bits == 64  # the widened variant
    got = secure(lambda p, a, s: nonlinear.rms_norm(p, a, s, eps), x, scale)
    check_within_plan(got, approx.rms_norm(encoded(x), encoded(scale), eps), plan)


def test_rms_norm_pre_scaled_sums_hold_rows_that_are_not_multiples_of_the_pre_scale():
    """At f = 20 and n = 4096 the pre-scale is 22 bits: values of about 2^15 that are not multiples of it
    leave a remainder in every element, so both dot products of the pre-scaled sum of squares count."""
    n, f, eps = 4096, 20, 1e-5
    x = rng.choice([-1.0, 1.0], (8, n)) * 2.0**15 * (1 - rng.uniform(0, 2.0**-10, (8, n)))
    scale = rng.normal(1, 0.3, n)
    plan = nonlinear.norm_plan(f, n, eps, NormDomain(), centred=False)
    assert plan.prescale > 16

    def program(p):
        return open_fx(p, nonlinear.rms_norm(p, share_fx(p, x), share_fx(p, scale), eps))

    got = run_parties(program, frac_bits=f)[0]
    q = lambda v: np.rint(v * 2**f) / 2**f  # noqa: E731
    check_within_plan(got, approx.rms_norm(q(x), q(scale), eps), plan, ulp=2.0**-f)


def test_layer_norm_default_domain_at_both_ends():
    n = 64
    x, scale, bias = default_domain_rows(n, rms=False), rng.normal(1, 0.3, n), rng.normal(0, 0.3, n)
    eps = 1e-12
    plan = nonlinear.norm_plan(18, n, eps, NormDomain(), centred=True)
    assert plan.shift < 0  # n x - sum x is truncated: n |2^15 scale| would overflow the ride's product
    got = secure(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, eps), x, scale, bias)
    want = approx.layer_norm(encoded(x), encoded(scale), encoded(bias), eps)
    check_within_plan(got - bias, want - encoded(bias), plan)


def test_norm_plans_widen_only_as_far_as_the_domain_needs():
    narrow = nonlinear.norm_plan(18, 768, 1e-12, NormDomain(x_max=40, var_lo=1e-3, var_hi=400, scale_max=2), True)
    assert (narrow.prescale, narrow.normalise, narrow.cmp_bits, narrow.shift) == (0, False, 48, 0)
    assert narrow.precision_bits >= 16
    wide = nonlinear.norm_plan(18, 768, 1e-12, NormDomain(), True)
    assert wide.prescale > 0 and wide.normalise and wide.cmp_bits == 64
    assert wide.precision_bits >= 11


def test_rows_too_long_for_the_pre_scaled_sum_of_squares_are_refused():
    nonlinear.norm_plan(20, 4096, 1e-5, NormDomain(), centred=False)
    with pytest.raises(nonlinear.DomainError, match="pre-scaled sum of squares"):
        nonlinear.norm_plan(20, 2**16, 1e-5, NormDomain(), centred=False)


def test_rsqrt_refuses_a_range_past_its_domain_before_any_message():
    def program(p):
        x = share_fx(p, np.ones(4))
        before = p.comm.stats.snapshot()
        with pytest.raises(ValueError, match="not below 2\\^42"):
            nonlinear.rsqrt(p, x, 1.0, 2.0**43)
        return (p.comm.stats.snapshot() - before).rounds

    assert run_parties(program) == [0, 0, 0]


@pytest.mark.parametrize(
    "domain, says",
    [
        (NormDomain(x_max=2.0**26), "row mean"),
        (NormDomain(x_max=2.0**17, var_lo=2.0**-20, var_hi=2.0**34), "fixed-point scale"),
    ],
)
def test_a_domain_no_variant_covers_is_refused(domain, says):
    with pytest.raises(nonlinear.DomainError, match=says):
        nonlinear.norm_plan(18, 4096, 1e-12, domain, centred=True)


# ----------------------------------------------------------------------------- costs


# exp's 5 products as one chain held for the clip (runtime/chain.py): a round per truncation, 28 B per truncation
# and 4 per step over the three ranks; then the clip on the held answer (`chain.times_bit`): 2 rounds, 36 B.
EXP_CHAIN_ROUNDS, EXP_CHAIN_BYTES = 5, 28 * 5 + 4 * 4
CLIP_ROUNDS, CLIP_BYTES = 2, 36


def probe_costs(p, n):
    """Rounds and bytes per element (summed over the ranks) of the layer below, on n elements:
    M and W fused multiply-truncates by <= 31 and > 31 bits, C ltz, X each further threshold of one
    less_than_public batch, A b2a, S mul_bit, R ring mul, Z and Y select of one term by one bit
    with a truncation by > 31 and <= 31 bits, D the comparison that drops f + 4 low bits (exp's clip),
    T a truncation of a linear function (2-of-2 for free, `arith.truncate`)."""
    out = {}
    x = share_fx(p, np.zeros(n))
    for name, fn in [
        ("M", lambda: arith.mul_fx(p, x, x)),
        ("W", lambda: arith.mul_fx(p, x, x, bits=40)),
        ("C", lambda: compare.ltz(p, x)),
        ("X", lambda: compare.less_than_public(p, x, [np.uint64(0), np.uint64(1)])),
        ("A", lambda: convert.b2a(p, compare.ltz(p, x))),
        ("S", lambda: convert.mul_bit(p, compare.ltz(p, x), x)),
        ("R", lambda: arith.mul(p, x, x)),
        ("T", lambda: arith.truncate(p, x, 30)),
        ("Z", lambda: convert.select(p, [(compare.ltz(p, x), x)], 40)),
        ("Y", lambda: convert.select(p, [(compare.ltz(p, x), x)], 30)),
        ("D", lambda: convert.msb(p, x, drop=18 + 4)),
        ("C64", lambda: compare.ltz(p, x, bits=64)),
        ("X64", lambda: compare.less_than_public(p, x, [np.uint64(0), np.uint64(1)], bits=64)),
    ]:
        _, cost = cost_of(p, fn)
        out[name] = cost
    out["A"] = out["A"] - out["C"]
    out["S"] = out["S"] - out["C"]
    out["Z"] = out["Z"] - out["C"]
    out["Y"] = out["Y"] - out["C"]
    out["X"] = out["X"] - out["C"]
    out["X64"] = out["X64"] - out["C64"]
    return out


def total_cost(fn, *arrays, probe=64):
    """The kernel's (rounds, bytes summed over ranks) and the probes' per-element units."""

    def prog(p):
        shared = [share_fx(p, a) for a in arrays]
        probes = probe_costs(p, probe)
        _, cost = cost_of(p, lambda: fn(p, *shared))
        return cost, probes

    res = run_parties(prog)
    rounds = {r[0].rounds for r in res}
    assert len(rounds) == 1, "every rank takes part in every round"
    unit = {k: (v.rounds, sum(r[1][k].bytes for r in res) / probe) for k, v in res[0][1].items()}
    return rounds.pop(), sum(r[0].bytes for r in res), unit


@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_cost_exp_neg_matches_docstring_and_is_the_same_for_both_sets(fit):
    n = 256
    rounds, nbytes, u = total_cost(lambda p, a: nonlinear.exp_neg(p, a, fit.exp), -rng.uniform(0, 20, n))
    # The clip's comparison runs beside the chain of 5 products (runtime/parallel.py, runtime/chain.py), then the
    # exact product with the clip's bit on the chain's held answer.
    assert rounds == max(u["D"][0], EXP_CHAIN_ROUNDS) + CLIP_ROUNDS == 8
    assert nbytes == n * (u["D"][1] + EXP_CHAIN_BYTES + CLIP_BYTES)
    # 60 B per element less than 5 fused products and a mul_bit after them.
    assert EXP_CHAIN_BYTES + CLIP_BYTES == 5 * u["M"][1] + u["S"][1] - 60


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("fit", SETS, ids=lambda s: s.name)
def test_cost_piecewise_matches_docstring(fit, name):
    n = 256
    piecewise = getattr(fit, name)
    kernel = getattr(nonlinear, name)
    rounds, nbytes, u = total_cost(lambda p, a: kernel(p, a, piecewise), rng.uniform(-6, 6, n))
    # The comparisons run beside the products (runtime/parallel.py): the longer of the two, then the select.
    assert rounds == max(u["C"][0], 2 * u["M"][0] + u["R"][0]) + u["Z"][0] == 9
    if len(piecewise.breaks) == 2:
        # Two thresholds in one batch, one ring product; the select takes 2 bits, 1 term and 1 plain term.
        assert nbytes == n * (u["C"][1] + u["X"][1] + 2 * u["M"][1] + u["R"][1] + u["Z"][1] + 8 * 2)
    else:
        # Three thresholds; a cubic low piece needs a second ring product (PUMA's GeLU, not its SiLU);
        # the select takes 3 bits, 3 terms and 1 plain term.
        ring = 2 if len(piecewise.low) == 4 else 1
        assert nbytes == n * (u["C"][1] + 2 * u["X"][1] + 2 * u["M"][1] + ring * u["R"][1] + u["Z"][1] + 8 * (2 + 3))


def test_cost_reciprocal_matches_docstring():
    rows, lo, hi = 16, 1.0, 128.0
    rounds, nbytes, u = total_cost(
        lambda p, a: nonlinear.reciprocal(p, a, lo, hi), np.exp(rng.uniform(0, np.log(hi), rows))
    )
    k = math.ceil(2 * math.log2(hi / lo))
    # The guess's b2a beside x times the guess by a select on the bits (3 rounds, truncation within 31 bits:
    # 8 bytes per bit and per term from rank 0, 44 over the ranks), then 3 batches of products.
    assert rounds == u["C"][0] + max(u["A"][0], 3) + 6 == 15
    select = 16 * (k - 1) + 44
    assert nbytes == rows * (u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1] + select + 5 * u["M"][1])


def test_cost_rsqrt_matches_docstring():
    rows = 16
    rounds, nbytes, u = total_cost(nonlinear.rsqrt, np.exp(rng.uniform(-5, 5, rows)))
    k = 8 * 20
    # The guess's b2a beside x g^2 by a select on the bits (truncation beyond 31 bits: 48 over the ranks).
    assert rounds == u["C"][0] + max(u["A"][0], 3) + 4 == 13
    select = 16 * (k - 1) + 48
    assert nbytes == rows * (u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1] + 3 * u["M"][1] + select)


def test_cost_softmax_matches_docstring():
    rows, n = 8, 32
    rounds, nbytes, u = total_cost(nonlinear.softmax, rng.normal(0, 3, (rows, n)))
    (rc, c), (rs, s), (ra, a), x, m = u["C"], u["S"], u["A"], u["X"][1], u["M"][1]
    k = math.ceil(2 * math.log2(n))
    exp = u["D"][1] + EXP_CHAIN_BYTES + CLIP_BYTES
    # The max: a level of four 32 -> 8 (C + 2 AND rounds + 2), then one group of 8 (C + 3 AND rounds + 2).
    # exp: its clip's comparison beside its chain of 5 products, then the product with its bit on the held answer (chain.times_bit).
    assert rounds == (rc + 4) + (rc + 5) + (max(u["D"][0], EXP_CHAIN_ROUNDS) + CLIP_ROUNDS) + (rc + max(ra, 3) + 6) + 2 == 46
    # Per row: 6 comparisons per output of the level of four (8 outputs) and 28 for the group's one, AND rows
    # of the 8 rows' elements packed 8 to a byte ((4 - 2) 4 rows of 64 elements, (8 - 2) 8 of 8: 8 and 1 bytes,
    # from each rank), and the selections: 16 g from rank 0 and 8 from each of ranks 1 and 2 per output.
    quads = (6 * 8 + 28) * c + (2 * 4 * 8 + 6 * 8 * 1) * 3 / rows + (16 * 4 + 16) * 8 + (16 * 8 + 16) * 1
    per_row = quads + n * exp + c + (k - 2) * x + (k - 1) * a + 16 * (k - 1) + 44 + 5 * m + n * m
    assert nbytes == rows * per_row


def test_cost_softmax_with_a_causal_mask_takes_exp_and_the_product_on_kept_entries_only():
    """A causal mask keeps (n + 1) / 2n of the entries: exp and the output's product cost per kept entry, the
    max and the reciprocal as without a mask (the rounds too). A kernel that ran exp on every entry and zeroed
    the masked ones after would cost (n - 1) / 2 (exp + M) more per row."""
    rows, n = 32, 32
    causal = np.tril(np.ones((rows, n), dtype=bool))
    scores = rng.normal(0, 3, (rows, n))
    full_rounds, full, u = total_cost(nonlinear.softmax, scores)
    rounds, nbytes, _ = total_cost(lambda p, a: nonlinear.softmax(p, a, causal), scores)
    exp = u["D"][1] + EXP_CHAIN_BYTES + CLIP_BYTES
    dropped = int((~causal).sum())
    assert rounds == full_rounds
    assert nbytes == full - dropped * (exp + u["M"][1])


NARROW = NormDomain(x_max=300.0, var_lo=1e-3, var_hi=1e4, scale_max=2.0)


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_cost_norms_match_docstring(name):
    rows, n = 8, 48
    x, scale, bias = norm_inputs(n)
    x = x[:rows]
    centred = name == "layer_norm"
    plan = nonlinear.norm_plan(18, n, 1e-5, NARROW, centred)
    assert not (plan.prescale or plan.normalise or plan.shift < 0) and plan.cmp_bits == 48
    if centred:
        kernel = lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, 1e-5, NARROW)  # noqa: E731
        rounds, nbytes, u = total_cost(kernel, x, scale, bias)
    else:
        rounds, nbytes, u = total_cost(lambda p, a, s: nonlinear.rms_norm(p, a, s, 1e-5, NARROW), x, scale)
    k = len(nonlinear._grid(plan.lo, plan.hi, 8, plan.sum_bits)[0]) + 1
    m, w = u["M"][1], u["W"][1]
    # rsqrt: the guess's b2a beside x g^2 by a select on the bits (`_guess_and_product`).
    assert rounds == 2 * centred + 2 + u["C"][0] + max(u["A"][0], 3) + 4 + 2 == 17 + 2 * centred
    select = 16 * (k - 1) + 48
    per_row = 4 * m + centred * u["T"][1] + select + u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1]
    assert nbytes == rows * (2 * n * m + per_row)


def test_cost_wide_rms_norm_matches_docstring():
    """The default domain's variant: d pre-scaled (T per element), two dot products per row, S normalised
    by its octave (one more product per row, two more rounds), comparisons on 64 bits."""
    rows, n = 8, 48  # whole bytes of bit-sliced rows, as the probes measure
    x, scale = np.concatenate([default_domain_rows(n, rms=True)] * 2), rng.normal(1, 0.3, n)
    plan = nonlinear.norm_plan(18, n, 1e-5, NormDomain(), centred=False)
    assert plan.prescale and plan.normalise and plan.shift >= 0 and plan.cmp_bits == 64
    rounds, nbytes, u = total_cost(lambda p, a, s: nonlinear.rms_norm(p, a, s, 1e-5), x, scale)
    k = len(nonlinear._grid(plan.lo, plan.hi, 8, plan.sum_bits)[0]) + 1
    m, w, (rc, c), x64 = u["M"][1], u["W"][1], u["C64"], u["X64"][1]
    assert rounds == 2 + 2 + rc + u["A"][0] + 2 + 6 + 2 == 23
    per_row = 6 * m + w + c + (k - 2) * x64 + (k - 1) * u["A"][1]
    assert nbytes == rows * (2 * n * m + n * u["T"][1] + per_row)
