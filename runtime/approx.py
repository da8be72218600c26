"""The approximations of the nonlinear functions: the constants, once, in two sets.

Both readers take their numbers from here: the plaintext ONNX functions that
`puma_onnx.passes` attach to every `puma.*` op, and the secure kernels in
`puma_onnx.runtime.nonlinear`. The numpy functions below are the plaintext
definition in float64; the tests compare both readers against them, and each
set against the exact functions.

Two sets, with the same rounds:
- `refit` (the default). GeLU and SiLU: x/2 plus an even polynomial of degree 8 on
  [-T, T), 0 below and x above: two breakpoints instead of PUMA's three, one middle
  piece for both sides (their odd part is exactly x/2), no low piece, so one
  comparison, one ring product and two selection terms fewer (19% fewer bytes);
  coefficients fitted where real activations live under a cap on the largest
  error. exp squares a degree-4 base polynomial 3 times instead of 1 + x/32 five
  times, at PUMA's cost.
- `puma`: Dong et al., "PUMA: Secure Inference of LLaMA-7B in Five Minutes"
  (arXiv 2307.12533), section 4, and SecretFlow SPU's implementation, so that
  the paper's numbers stay reproducible.

Error against the exact function (tests/runtime/test_nonlinear.py asserts each):
                  over all x                      on [-1, 1]
  GeLU  puma      0.0199 (its jump at x = 3)      0.0085
        refit     0.0072 (its breaks, -2.8, 2.8)  0.00064
  SiLU  puma      0.0719 (its jump at x = 4)      0.0085
        refit     0.035                           0.0016
  exp   puma      0.0085 on [-14, 0] (6% at x = -2)
        refit     6.1e-6, at its cut at x = -12 (4.5e-6 above it; 0.003% at x = -2)

This module imports numpy only, so a graph pass may import it without pulling
in MPI or the protocols.
"""

from __future__ import annotations

import hashlib
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
    """0 below breaks[0], `low` up to breaks[1], `mid` up to breaks[-1], x from there on; with two breaks
    there is no `low` piece (0 | mid | x).

    Half-open pieces, as the secure comparisons [x < break] split them. Coefficients are
    listed from the constant term upwards; `low` has degree <= 3 (empty with two breaks), `mid` is
    m0 + m1 x + m2 x^2 + m4 x^4 + m6 x^6 + m8 x^8 (the odd powers above 1 are zero).
    """

    breaks: tuple[float, ...]
    low: tuple[float, ...]
    mid: tuple[float, ...]

    def __post_init__(self):
        if len(self.breaks) not in (2, 3) or list(self.breaks) != sorted(self.breaks):
            raise ValueError(f"Piecewise takes 2 or 3 increasing breaks, got {self.breaks}")
        if (len(self.breaks) == 2) != (len(self.low) == 0) or len(self.low) > 4:
            raise ValueError("Piecewise: a low piece (degree <= 3) with three breaks, none with two")
        if len(self.mid) > 9 or any(c != 0.0 for c in self.mid[3::2]):
            raise ValueError("Piecewise: mid is even of degree <= 8 plus a linear term")

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        upper = np.where(x < self.breaks[-1], poly(x, self.mid), x)
        if len(self.breaks) == 3:
            upper = np.where(x < self.breaks[1], poly(x, self.low), upper)
        return np.where(x < self.breaks[0], 0.0, upper)


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

    @property
    def digest(self) -> str:
        """A fingerprint of the constants: a rewrite records it, so that a model rewritten with another
        version of a set (its ONNX functions no longer what the secure kernels compute) is caught."""
        return hashlib.sha256(repr((self.gelu, self.silu, self.exp)).encode()).hexdigest()[:16]


def _even_mid(m0: float, m1: float, m2: float, m4: float, m6: float, m8: float = 0.0) -> tuple:
    return (m0, m1, m2, 0.0, m4, 0.0, m6) + ((0.0, m8) if m8 else ())


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

# Refits (benchmarks/fit_approx.py reproduces them). GeLU and SiLU: x/2 plus an even polynomial of degree 8
# on [-T, T), 0 below and x above. Their odd part is exactly x/2, so one symmetric middle piece covers
# both sides and needs no low piece: two comparisons, and the products of PUMA's degree 6 (the secure
# kernel reads it in a centred square, see nonlinear._piecewise). Weighted least squares under a density
# where real activations live (GeLU: N(-0.7, 1); SiLU: Laplace(0, 0.5)), with the largest error over all
# real x capped (0.008 and 0.035) and T searched: near 0, where most activations are and a small offset
# adds up over a layer's units, they err 5-13x less than PUMA's (GeLU 0.00064 on [-1, 1] against 0.0085).
# Chosen on the real models over the earlier refit of PUMA's three pieces: MiniLM's token embeddings
# 0.012 from the exact model (was 0.016; PUMA's GeLU: 0.082), SmolLM2's perplexity 18.214 (was 18.221;
# exact 18.168) and logits 1.14 (was 1.18), plaintext, with this exp.
# exp: p(x/8)^8 with p of degree 4 and p = 1 + y + ... (exact leading terms, which the secure kernel
# needs), minimax on [-16, 0]: 4.5e-6; 0 below a cut in [-16, -12], where exp is below 6.1e-6.
REFIT = ApproxSet(
    name="refit",
    gelu=Piecewise(
        breaks=(-2.8, 2.8),
        low=(),
        mid=_even_mid(
            0.0005968055716214261, 0.4999982693087741, 0.39349201319984833, -0.058752115908402694,
            0.006038902250887905, -0.0002640797778692598,
        ),
    ),
    silu=Piecewise(
        breaks=(-5.0, 5.0),
        low=(),
        mid=_even_mid(
            0.0007284410984257856, 0.4999999999999999, 0.2437767093476948, -0.015677626930133935,
            0.0006878713373992751, -1.180949292785199e-05,
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
