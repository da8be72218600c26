"""The secure nonlinear kernels against approx.py's float64 definitions (PUMA's approximations),
against the exact functions where that means something, and their counted cost against the
formulas in their docstrings. Errors are in absolute terms; one ulp is 2^-18 = 3.8e-6."""

import math

import numpy as np
import pytest
from scipy.special import erf

from puma_onnx.runtime import approx, arith, compare, convert, nonlinear
from puma_onnx.runtime.comm import run_parties

from .helpers import cost_of, open_fx, share_fx

ULP = 2.0**-18
rng = np.random.default_rng(2307)


def encoded(x):
    """What the kernels actually receive: x rounded to 18 fractional bits."""
    return np.rint(np.asarray(x) * 2**18) / 2**18


def secure(fn, *arrays):
    """fn(party, *shared arrays), revealed; every array is shared by rank 0."""
    return run_parties(lambda p: open_fx(p, fn(p, *[share_fx(p, a) for a in arrays])))[0]


# ----------------------------------------------------------------------------- exp


def test_exp_neg_within_2_ulp_of_puma_exp_on_minus_40_to_0():
    x = np.concatenate([rng.uniform(-40, 0, 3000), [0.0, approx.EXP_CLIP, -1e-6]])
    got = secure(nonlinear.exp_neg, x)
    err = np.abs(got - approx.exp_neg(encoded(x))).max()
    assert err <= 2 * ULP, f"max error {err:.3g}"
    # PUMA's exp itself is 0.0085 from the exact one on [-40, 0].
    assert np.abs(got - np.exp(x)).max() < 0.0086


def test_exp_neg_gives_zero_far_below_the_clip():
    x = -np.exp(rng.uniform(np.log(20), np.log(1e6), 500))
    assert np.abs(secure(nonlinear.exp_neg, x)).max() <= ULP


# ----------------------------------------------------------------------------- reciprocal, rsqrt


def test_reciprocal_within_5_ulp_on_1_to_128():
    x = np.concatenate([np.exp(rng.uniform(0, np.log(128), 2000)), [1.0, 128.0, 2.0**0.5]])
    got = secure(lambda p, a: nonlinear.reciprocal(p, a, 1.0, 128.0), x)
    err = np.abs(got - 1 / encoded(x)).max()
    assert err <= 5 * ULP, f"max error {err:.3g}"


def test_rsqrt_within_2e_minus_6_relative_plus_2_ulp_on_2e_minus_10_to_2e10():
    x = np.exp(rng.uniform(np.log(2.0**-10), np.log(2.0**10), 2000))
    got = secure(nonlinear.rsqrt, x)
    want = 1 / np.sqrt(encoded(x))
    excess = np.abs(got - want) - 2e-6 * want
    assert excess.max() <= 2 * ULP, f"max error {np.abs(got - want).max():.3g} (at 1/sqrt up to 32)"


# ----------------------------------------------------------------------------- GeLU, SiLU


def exact_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_gelu_within_4_ulp_of_puma_gelu_on_minus_6_to_6_and_far_out():
    # (Exactly at a break the comparison sees the rounded break: either side's value is right.)
    x = np.concatenate([rng.uniform(-6, 6, 3000), [-3e5, 3e5, -1000.5, 1000.5]])
    got = secure(nonlinear.gelu, x)
    err = np.abs(got - approx.gelu(encoded(x))).max()
    assert err <= 4 * ULP, f"max error {err:.3g}"
    # PUMA's polynomial vs the exact GeLU: 0.0199, at the jump at x = 3 (0.0140 elsewhere).
    assert np.abs(got - exact_gelu(x)).max() < 0.02


def test_silu_within_4_ulp_of_puma_silu_on_minus_10_to_10_and_far_out():
    x = np.concatenate([rng.uniform(-10, 10, 3000), [-3e5, 3e5]])
    got = secure(nonlinear.silu, x)
    err = np.abs(got - approx.silu(encoded(x))).max()
    assert err <= 4 * ULP, f"max error {err:.3g}"
    # PUMA's SiLU jumps by 0.072 at x = 4 (it returns x above 4; silu(4) = 3.928).
    x, got = x[:-2], got[:-2]
    assert np.abs(got - x / (1 + np.exp(-x))).max() < 0.073


# ----------------------------------------------------------------------------- softmax


def exact_softmax(x, keep):
    e = np.where(keep, np.exp(x - np.where(keep, x, -np.inf).max(-1, keepdims=True)), 0.0)
    return e / e.sum(-1, keepdims=True)


def test_softmax_without_mask_within_3_ulp():
    x = rng.normal(0, 4, (6, 3, 32))
    got = secure(nonlinear.softmax, x)
    err = np.abs(got - approx.softmax(encoded(x))).max()
    assert err <= 3 * ULP, f"max error {err:.3g}"
    # PUMA's exp makes softmax up to ~0.035 off the exact one.
    assert np.abs(got - exact_softmax(x, True)).max() < 0.035


def test_softmax_with_causal_mask_within_3_ulp():
    x = rng.normal(0, 4, (4, 24, 24))
    causal = np.tril(np.ones((24, 24), dtype=bool))
    got = secure(lambda p, a: nonlinear.softmax(p, a, causal), x)
    err = np.abs(got - approx.softmax(encoded(x), causal)).max()
    assert err <= 3 * ULP, f"max error {err:.3g}"
    assert np.all(got[:, ~causal] == 0.0)


def test_softmax_padding_mask_ignores_huge_masked_scores_and_zeroes_empty_rows():
    x = rng.normal(0, 3, (5, 16))
    x[:, 12:] = 1e6  # would win the max if the mask were applied after it
    keep = np.ones((5, 16), dtype=bool)
    keep[:, 12:] = False
    keep[3] = False
    got = secure(lambda p, a: nonlinear.softmax(p, a, keep), x)
    rows = [0, 1, 2, 4]
    err = np.abs(got[rows] - approx.softmax(encoded(x[rows]), keep[rows])).max()
    assert err <= 3 * ULP, f"max error {err:.3g}"
    assert np.all(got[3] == 0.0) and np.all(got[:, 12:] == 0.0)


# ----------------------------------------------------------------------------- norms


VARIANCES = np.exp(np.linspace(np.log(1e-6), np.log(1e4), 12))


def norm_inputs(n=48):
    """Rows whose variance runs over the documented range 1e-6 .. 1e4, with means up to 100."""
    x = rng.normal(0, 1, (12, n)) * np.sqrt(VARIANCES)[:, None] + rng.uniform(-100, 100, (12, 1))
    return x, rng.normal(1, 0.3, n), rng.normal(0, 0.3, n)


def check_norm_error(err):
    """Fixed point limits rows of tiny variance (at var 1e-6 the values carry ~260 steps per std)."""
    worst = err.max(axis=-1)
    assert worst[VARIANCES >= 1e-3].max() <= 8 * ULP, f"max error {worst[VARIANCES >= 1e-3].max():.3g}, var >= 1e-3"
    assert worst[VARIANCES >= 5e-6].max() <= 2e-4, f"max error {worst[VARIANCES >= 5e-6].max():.3g}, var >= 5e-6"
    assert worst.max() <= 2e-3, f"max error {worst.max():.3g} at var 1e-6"


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_over_variance_1e_minus_6_to_1e4(eps):
    x, scale, bias = norm_inputs()
    got = secure(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, eps), x, scale, bias)
    check_norm_error(np.abs(got - approx.layer_norm(encoded(x), encoded(scale), encoded(bias), eps)))


def test_rms_norm_over_mean_square_1e_minus_6_to_1e4():
    x = rng.normal(0, 1, (12, 48)) * np.sqrt(VARIANCES)[:, None]
    scale = rng.normal(1, 0.3, 48)
    got = secure(lambda p, a, s: nonlinear.rms_norm(p, a, s, 1e-12), x, scale)
    check_norm_error(np.abs(got - approx.rms_norm(encoded(x), encoded(scale), 1e-12)))


def test_layer_norm_of_a_constant_row_is_the_bias():
    x = np.full((2, 16), 3.25)
    scale, bias = rng.normal(1, 0.3, 16), rng.normal(0, 0.3, 16)
    got = secure(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, 1e-12), x, scale, bias)
    assert np.abs(got - encoded(bias)).max() <= ULP


# ----------------------------------------------------------------------------- costs


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
    ]:
        _, cost = cost_of(p, fn)
        out[name] = cost
    out["A"] = out["A"] - out["C"]
    out["S"] = out["S"] - out["C"]
    out["Z"] = out["Z"] - out["C"]
    out["Y"] = out["Y"] - out["C"]
    out["X"] = out["X"] - out["C"]
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


def test_cost_exp_neg_matches_docstring():
    n = 256
    rounds, nbytes, u = total_cost(nonlinear.exp_neg, -rng.uniform(0, 20, n))
    assert rounds == u["D"][0] + 2 * (approx.EXP_SQUARINGS - 1) + u["R"][0] + u["Y"][0] == 18
    assert nbytes == n * (u["D"][1] + 4 * u["M"][1] + u["R"][1] + u["Y"][1])


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_cost_piecewise_matches_docstring(name):
    n = 256
    rounds, nbytes, u = total_cost(getattr(nonlinear, name), rng.uniform(-6, 6, n))
    assert rounds == u["C"][0] + 2 * u["M"][0] + u["R"][0] + u["Z"][0] == 14
    # Three thresholds in one batch; GeLU's cubic needs one more ring product than SiLU's quadratic;
    # the select takes 3 bits and 4 terms.
    ring = 2 if name == "gelu" else 1
    assert nbytes == n * (u["C"][1] + 2 * u["X"][1] + 2 * u["M"][1] + ring * u["R"][1] + u["Z"][1] + 8 * (2 + 3))


def test_cost_reciprocal_matches_docstring():
    rows, lo, hi = 16, 1.0, 128.0
    rounds, nbytes, u = total_cost(
        lambda p, a: nonlinear.reciprocal(p, a, lo, hi), np.exp(rng.uniform(0, np.log(hi), rows))
    )
    k = math.ceil(2 * math.log2(hi / lo))
    assert rounds == u["C"][0] + u["A"][0] + 8 == 16
    assert nbytes == rows * (u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1] + 6 * u["M"][1])


def test_cost_rsqrt_matches_docstring():
    rows = 16
    rounds, nbytes, u = total_cost(nonlinear.rsqrt, np.exp(rng.uniform(-5, 5, rows)))
    k = 4 * 20
    assert rounds == u["C"][0] + u["A"][0] + 8 == 16
    assert nbytes == rows * (u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1] + 4 * u["M"][1] + u["W"][1])


def test_cost_softmax_matches_docstring():
    rows, n = 8, 32
    rounds, nbytes, u = total_cost(nonlinear.softmax, rng.normal(0, 3, (rows, n)))
    (rc, c), (rs, s), (ra, a), x, m = u["C"], u["S"], u["A"], u["X"][1], u["M"][1]
    levels, k = int(math.log2(n)), math.ceil(2 * math.log2(n))
    exp = u["D"][1] + 4 * m + u["R"][1] + u["Y"][1]
    assert rounds == levels * (rc + rs) + (u["D"][0] + 8 + 1 + u["Y"][0]) + (rc + ra + 8) + 2 == 76
    per_row = (n - 1) * (c + s) + n * exp + c + (k - 2) * x + (k - 1) * a + 6 * m + n * m
    assert nbytes == rows * per_row


@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_cost_norms_match_docstring(name):
    rows, n = 8, 48
    x, scale, bias = norm_inputs(n)
    x = x[:rows]
    if name == "layer_norm":
        rounds, nbytes, u = total_cost(lambda p, a, s, b: nonlinear.layer_norm(p, a, s, b, 1e-5), x, scale, bias)
        mean = 1
    else:
        rounds, nbytes, u = total_cost(lambda p, a, s: nonlinear.rms_norm(p, a, s, 1e-5), x, scale)
        mean = 0
    k = 4 * 34
    m, w = u["M"][1], u["W"][1]
    assert rounds == 2 * mean + 2 + u["C"][0] + u["A"][0] + 8 + 2 == 20 + 2 * mean
    per_row = 5 * m + mean * u["T"][1] + w + u["C"][1] + (k - 2) * u["X"][1] + (k - 1) * u["A"][1]
    assert nbytes == rows * (2 * n * m + per_row)
