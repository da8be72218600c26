"""Each approximation of runtime/approx.py against the exact function, segment by segment on a dense grid
that holds both ends of every piece, and PUMA's published constants as literals: a changed constant
moves a segment's error (first test) or differs from the paper's (second), whichever set it is in."""

import numpy as np
import pytest
from scipy.special import erf

from puma_onnx.runtime import approx


def exact_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def exact_silu(x):
    return x / (1 + np.exp(-x))


def segment(lo, hi, n=20001):
    """[lo, hi) densely, with its left end and the largest float below hi (the pieces are half-open)."""
    return np.concatenate([np.linspace(lo, hi, n)[:-1], [np.nextafter(hi, -np.inf)]])


# The largest error against the exact function on each segment, from -40 to 40 (pieces of approx.Piecewise:
# 0 | low | mid | x, or 0 | mid | x; exp: 0 below -cut | the powered polynomial), as measured on these grids. Pinned to
# 0.1%: a coefficient off by 1e-4 (PUMA's 0.36033 -> 0.36043) moves its segment's error by a few percent.
# Where the worst point is a break, it is that segment's end.
SEGMENT_ERRORS = {
    ("puma", "gelu"): (1.267e-4, 7.533e-4, 0.01991, 0.00405),  # 0 at -4, F0 at -4, F1 at 3, x at 3
    ("refit", "gelu"): (0.007154, 0.006121, 0.007154),  # 0 below -2.8 | mid | x from 2.8: the tails at the breaks
    ("puma", "silu"): (0.002683, 0.004353, 0.009651, 0.07194),  # at -8, -4, -4 and the jump at 4
    ("refit", "silu"): (0.03346, 0.035, 0.03346),  # the tails at -5 and 5; the cap, 0.035, at -4.57
    ("puma", "exp"): (8.315e-7, 0.008547),  # exp(-14) below the cut; 6% relative at x = -1.98
    ("refit", "exp"): (6.144e-6, 4.471e-6),  # exp(-12) below the cut; the minimax fit's level on [-12, 0]
}


@pytest.mark.parametrize("key", list(SEGMENT_ERRORS), ids=lambda k: "-".join(k))
def test_error_of_every_segment_against_the_exact_function(key):
    name, fn = key
    if fn == "exp":
        definition, exact = approx.SETS[name].exp, np.exp
        edges = (-40.0, -definition.cut, 0.0)
    else:
        definition, exact = getattr(approx.SETS[name], fn), exact_gelu if fn == "gelu" else exact_silu
        edges = (-40.0, *definition.breaks, 40.0)
    got = [np.abs(definition(x) - exact(x)).max() for x in (segment(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]))]
    assert got == pytest.approx(SEGMENT_ERRORS[key], rel=1e-3)


@pytest.mark.parametrize("fit", approx.SETS.values(), ids=list(approx.SETS))
def test_exp_is_exact_at_zero_and_zero_below_its_cut(fit):
    # The softmax's row maximum lands on x = 0: p(0)^(2^t) = 1 exactly, or every row is scaled.
    assert fit.exp(np.array(0.0)) == 1.0
    assert fit.exp(np.array([np.nextafter(-fit.exp.cut, -np.inf), -40.0])).tolist() == [0.0, 0.0]


def test_pumas_published_constants():
    """PUMA (arXiv 2307.12533, section 4) as SecretFlow SPU implements it (hack_gelu, hack_silu; exp by
    (1 + x/2^5)^(2^5) on [-14, 0]): literals, so that a mistyped constant fails here as well as above."""
    gelu, silu, exp = approx.PUMA.gelu, approx.PUMA.silu, approx.PUMA.exp
    assert gelu.breaks == (-4.0, -1.95, 3.0)
    assert gelu.low == (-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728)
    assert gelu.mid == (0.008526321541038084, 0.5, 0.3603292692789629, 0.0, -0.037688200365904236, 0.0,
                        0.0018067462606141187)
    assert silu.breaks == (-8.0, -4.0, 4.0)
    assert silu.low == (-0.3067541139982155, -0.0819767021525476, -0.0055465625580307)
    assert silu.mid == (0.0085064025895951, 0.5, 0.2281430841728270, 0.0, -0.011113046708173, 0.0, 0.0002743776353465)
    assert (exp.base, exp.squarings, exp.cut) == ((1.0, 1.0), 5, 14.0)
