"""The approximations of the nonlinear functions: the constants, once, in two sets.

Both readers take their numbers from here: the plaintext ONNX functions that
`puma_onnx.passes` attach to every `puma.*` op, and the secure kernels in
`puma_onnx.runtime.nonlinear`. The numpy functions below are the plaintext
definition in float64; the tests compare both readers against them, and each
set against the exact functions.

Two sets with the same secure cost (the same comparisons, products and rounds):
- `refit` (the default): PUMA's own structures refitted. GeLU and SiLU keep PUMA's
  three breakpoints, cubic (SiLU: quadratic) low piece and even-sextic-plus-linear
  middle piece, with breakpoints and coefficients fitted where real activations
  live under a cap on the largest error; exp squares a degree-4 base polynomial
  3 times instead of 1 + x/32 five times.
- `puma`: Dong et al., "PUMA: Secure Inference of LLaMA-7B in Five Minutes"
  (arXiv 2307.12533), section 4, and SecretFlow SPU's implementation, so that
  the paper's numbers stay reproducible.

Error against the exact function (tests/runtime/test_nonlinear.py asserts each):
                  over all x                      on [-1, 1]
  GeLU  puma      0.0199 (its jump at x = 3)      0.0085
        refit     0.0120                          0.0019
  SiLU  puma      0.0719 (its jump at x = 4)      0.0085
        refit     0.0450                          0.0056
  exp   puma      0.0085 on [-14, 0] (6% at x = -2)
        refit     6.1e-6, at its cut at x = -12 (4.5e-6 above it; 0.003% at x = -2)

This module imports numpy only, so a graph pass may import it without pulling
in MPI or the protocols.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def poly(x: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    """Evaluate sum(c_k x^k), coefficients from the constant term upwards."""
    out = np.zeros_like(x, dtype=np.float64)
    for c in reversed(coeffs):
        out = out * x + c
    return out


@dataclass(frozen=True)
class Piecewise:
    """0 below breaks[0], `low` up to breaks[1], `mid` up to breaks[2], x from there on.

    Half-open pieces, as the secure comparisons [x < break] split them. Coefficients are
    listed from the constant term upwards; `low` has degree <= 3, `mid` is
    m0 + m1 x + m2 x^2 + m4 x^4 + m6 x^6 (the odd powers above 1 are zero).
    """

    breaks: tuple[float, float, float]
    low: tuple[float, ...]
    mid: tuple[float, float, float, float, float, float, float]

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        b0, b1, b2 = self.breaks
        return np.where(
            x < b0, 0.0, np.where(x < b1, poly(x, self.low), np.where(x < b2, poly(x, self.mid), x))
        )


@dataclass(frozen=True)
class ExpNeg:
    """exp(x) for x <= 0: p(x / 2^squarings)^(2^squarings), and 0 below -cut.

    `base` is p (constant term first; degree 1, 2 or 4). The secure kernel may cut anywhere
    in [-cut_far, -cut] (it compares with -cut_far and ignores low bits); the value there is
    below the set's stated error, so both cuts agree to that error.
    """

    base: tuple[float, ...]
    squarings: int
    cut: float
    cut_far: float

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        y = poly(x / 2.0**self.squarings, self.base)
        for _ in range(self.squarings):
            y = y * y
        return np.where(x < -self.cut, 0.0, y)


@dataclass(frozen=True)
class ApproxSet:
    name: str
    gelu: Piecewise
    silu: Piecewise
    exp: ExpNeg


def _even_mid(m0: float, m1: float, m2: float, m4: float, m6: float) -> tuple:
    return (m0, m1, m2, 0.0, m4, 0.0, m6)


PUMA = ApproxSet(
    name="puma",
    # GeLU: 0 below -4, F0 on [-4, -1.95), F1 on [-1.95, 3), x from 3 on.
    gelu=Piecewise(
        breaks=(-4.0, -1.95, 3.0),
        low=(-0.5054031199708174, -0.42226581151983866, -0.11807612951181953, -0.011034134030615728),
        mid=_even_mid(0.008526321541038084, 0.5, 0.3603292692789629, -0.037688200365904236, 0.0018067462606141187),
    ),
    # SiLU (LLaMA): 0 below -8, S0 on [-8, -4), S1 on [-4, 4), x from 4 on.
    silu=Piecewise(
        breaks=(-8.0, -4.0, 4.0),
        low=(-0.3067541139982155, -0.0819767021525476, -0.0055465625580307),
        mid=_even_mid(0.0085064025895951, 0.5, 0.2281430841728270, -0.011113046708173, 0.0002743776353465),
    ),
    # (1 + x/32)^32 on [-14, 0]; PUMA's value below -14 is under 1e-8, so any cut in [-32, -14] agrees.
    exp=ExpNeg(base=(1.0, 1.0), squarings=5, cut=14.0, cut_far=32.0),
)

# Refits of PUMA's structures (benchmarks/fit_approx.py reproduces them). GeLU and SiLU: weighted least
# squares under a density where real activations live (GeLU: N(-0.7, 1); SiLU: Laplace(0, 0.5)), with
# the largest error over all real x capped (0.012 and 0.045) and the breakpoints searched: near 0, where
# most activations are and a small offset adds up over a layer's units, they err 4-5x less than PUMA's
# (0.0019 on [-1, 1] against 0.0085). Chosen on the real models: MiniLM's token embeddings 0.016 from the
# exact model (PUMA's GeLU: 0.082), SmolLM2's logits 0.90 (PUMA's SiLU: 2.68; plaintext, with this exp).
# exp: p(x/8)^8 with p of degree 4 and p = 1 + y + ... (exact leading terms, which the secure kernel
# needs), minimax on [-16, 0]: 4.5e-6; 0 below a cut in [-16, -12], where exp is below 6.1e-6.
REFIT = ApproxSet(
    name="refit",
    gelu=Piecewise(
        breaks=(-2.983798362590779, -1.148535671930511, 2.603900886357936),
        low=(-0.32546584992410543, -0.16034877990494079, 0.0053459510337067195, 0.007871822635688194),
        mid=_even_mid(
            0.0012797084999400402, 0.4994653102290298, 0.38643051745600276, -0.04958056079572045,
            0.003083949154153692,
        ),
    ),
    silu=Piecewise(
        breaks=(-5.463417661698898, -1.6119605844475138, 4.622174724666276),
        low=(-0.46077083373047245, -0.12914642645925759, -0.008198879231006276),
        mid=_even_mid(
            0.0019085146669066064, 0.4987671592164863, 0.23605120479943345, -0.011577960739628204,
            0.00026215324188428625,
        ),
    ),
    exp=ExpNeg(
        base=(1.0, 1.0, 0.4996077416988375, 0.16290907800582485, 0.03166681890314486),
        squarings=3,
        cut=12.0,
        cut_far=16.0,
    ),
)

SETS: dict[str, ApproxSet] = {s.name: s for s in (REFIT, PUMA)}
DEFAULT = REFIT.name


def lookup(name: str) -> ApproxSet:
    try:
        return SETS[name]
    except KeyError:
        raise ValueError(f"unknown approximation set {name!r}; known: {', '.join(SETS)}") from None


def softmax(x: np.ndarray, mask: np.ndarray | None = None, exp: ExpNeg = REFIT.exp) -> np.ndarray:
    """Softmax over the last axis with an approximate exp; masked-out positions (mask False) weigh 0."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(mask, x.shape)
    top = np.max(np.where(keep, x, -np.inf), axis=-1, keepdims=True)
    e = np.where(keep, exp(np.where(keep, x - top, 0.0)), 0.0)
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis (LLaMA)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * scale
