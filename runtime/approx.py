"""PUMA's approximations of the nonlinear functions: the constants, once.

Both readers take their numbers from here: the plaintext ONNX functions that
`puma_onnx.passes` attach to every `puma.*` op, and the secure kernels in
`puma_onnx.runtime.nonlinear`. The numpy functions below are the plaintext
definition in float64; the tests compare both readers against them.

This module imports numpy only, so a graph pass may import it without pulling
in MPI or the protocols.

Source: Dong et al., "PUMA: Secure Inference of LLaMA-7B in Five Minutes"
(arXiv 2307.12533), section 4, and SecretFlow SPU's implementation.
"""

from __future__ import annotations

import numpy as np

# GeLU: 0 below -4, F0 on [-4, -1.95), F1 on [-1.95, 3), x from 3 on (half-open
# pieces, as the secure comparisons [x < break] split them).
# Coefficients are listed from the constant term upwards.
GELU_BREAKS = (-4.0, -1.95, 3.0)
GELU_F0 = (
    -0.5054031199708174,
    -0.42226581151983866,
    -0.11807612951181953,
    -0.011034134030615728,
)
GELU_F1 = (
    0.008526321541038084,
    0.5,
    0.3603292692789629,
    0.0,
    -0.037688200365904236,
    0.0,
    0.0018067462606141187,
)

# SiLU (LLaMA): 0 below -8, S0 on [-8, -4), S1 on [-4, 4), x from 4 on.
SILU_BREAKS = (-8.0, -4.0, 4.0)
SILU_S0 = (-0.3067541139982155, -0.0819767021525476, -0.0055465625580307)
SILU_S1 = (
    0.0085064025895951,
    0.5,
    0.2281430841728270,
    0.0,
    -0.011113046708173,
    0.0,
    0.0002743776353465,
)

# exp(x) for x <= 0: (1 + x / 2^EXP_SQUARINGS)^(2^EXP_SQUARINGS) on
# [EXP_CLIP, 0], and 0 below EXP_CLIP.
EXP_SQUARINGS = 5
EXP_CLIP = -14.0


def poly(x: np.ndarray, coeffs: tuple[float, ...]) -> np.ndarray:
    """Evaluate sum(c_k x^k), coefficients from the constant term upwards."""
    out = np.zeros_like(x, dtype=np.float64)
    for c in reversed(coeffs):
        out = out * x + c
    return out


def piecewise(x: np.ndarray, breaks: tuple[float, float, float], low: tuple, mid: tuple) -> np.ndarray:
    """0 below breaks[0], low poly up to breaks[1], mid poly up to breaks[2], x from there on."""
    x = np.asarray(x, dtype=np.float64)
    b0, b1, b2 = breaks
    return np.where(
        x < b0, 0.0, np.where(x < b1, poly(x, low), np.where(x < b2, poly(x, mid), x))
    )


def gelu(x: np.ndarray) -> np.ndarray:
    """PUMA's piecewise-polynomial GeLU (max error 0.0199 against the exact erf form, at x = 3)."""
    return piecewise(x, GELU_BREAKS, GELU_F0, GELU_F1)


def silu(x: np.ndarray) -> np.ndarray:
    """PUMA's piecewise-polynomial SiLU."""
    return piecewise(x, SILU_BREAKS, SILU_S0, SILU_S1)


def exp_neg(x: np.ndarray) -> np.ndarray:
    """exp for x <= 0 by repeated squaring of (1 + x/2^t), clipped to 0 below EXP_CLIP."""
    x = np.asarray(x, dtype=np.float64)
    y = 1.0 + x / 2.0**EXP_SQUARINGS
    for _ in range(EXP_SQUARINGS):
        y = y * y
    return np.where(x < EXP_CLIP, 0.0, y)


def softmax(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis with PUMA's exp; masked-out positions (mask False) weigh 0."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(x.shape, dtype=bool) if mask is None else np.broadcast_to(mask, x.shape)
    top = np.max(np.where(keep, x, -np.inf), axis=-1, keepdims=True)
    e = np.where(keep, exp_neg(np.where(keep, x - top, 0.0)), 0.0)
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
