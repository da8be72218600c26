"""Each secure kernel's domain against the model's recorded activation ranges, before any share moves.

`puma-onnx export` records per node what the plaintext model produced on calibration inputs
(`puma_onnx.calibrate`): the largest |x| of every nonlinear op's input, the norms' row
variances, the largest |output| of every product of activations. Here the owner widens each
recorded range by MARGIN (x4 on magnitudes, x16 on variances) and checks it against the
domain of the kernel that will run, picking the kernel's wider variant where one exists:

  puma.Gelu, puma.SiLU    comparisons on party.msb_bits (|x| < 2^(L-1-f)) or on 64 bits
  puma.Softmax            the same for the differences of a row (|x_i - x_j| < 2^(L-2-f))
  puma.LayerNorm/RMSNorm  `nonlinear.norm_plan` for the NormDomain (pre-scaled sums of squares,
                          a normalised rsqrt, 64-bit comparisons; see there)
  MatMul, Gemm, Mul       the product before its truncation, |y| 2^(2f) < 2^61 (no wider variant)

A domain that no variant covers stops the run with one line naming the node, the bound and the
domain (`RangeError`). Nodes without a record (a model exported before ranges were recorded, or
a bare .onnx file) get the defaults: the norms' NormDomain(), which covers LLaMA-family outliers
(|x| <= 2^15, variances up to 2^30), and 48-bit comparisons elsewhere (|x| < 2^29 at f = 18).

The plan (per node: comparison width, or the norm's domain) is public: every rank runs the
same variants. It reveals the recorded ranges rounded to the plan, and each norm's largest
|scale| rounded up to a power of two.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .kernels import Node
from .nonlinear import DomainError, NormDomain, norm_plan

MARGIN = 4.0
_PRODUCT_HEADROOM = 61


class RangeError(ValueError):
    """A recorded range that no variant of its kernel covers; one line for the user."""


def _comparison_bits(node: Node, spread: float, f: int, msb_bits: int) -> int:
    """The narrowest comparison width that holds values `spread` apart at f fractional bits."""
    for bits in (msb_bits, 64):
        if spread * 2.0**f < 2.0 ** (bits - 2):
            return bits
    raise RangeError(
        f"{node.describe()}: recorded values {spread:.4g} apart (with the x{MARGIN:g} margin) exceed what "
        f"64-bit comparisons hold at {f} fractional bits (2^{62 - f})"
    )


def _piecewise(node: Node, seen: dict | None, f: int, msb_bits: int, **_) -> dict:
    if seen is None:
        return {"cmp_bits": msb_bits}
    # The comparisons take x minus each break (|break| <= 8).
    return {"cmp_bits": _comparison_bits(node, MARGIN * seen["x_max"] + 8.0, f, msb_bits)}


def _softmax(node: Node, seen: dict | None, f: int, msb_bits: int, **_) -> dict:
    if seen is None:
        return {"cmp_bits": msb_bits}
    # The max tree compares entries of a row, the exp's clip x - max + 16 (or 32).
    return {"cmp_bits": _comparison_bits(node, 2 * MARGIN * seen["x_max"] + 32.0, f, msb_bits)}


def _norm(node: Node, seen: dict | None, f: int, msb_bits: int, weights: Callable, **_) -> dict:
    scale = weights(node.inputs[1])
    scale_max = 2.0 ** math.ceil(math.log2(max(float(np.abs(scale).max(initial=0.0)), 2.0**-8)))
    if seen is None:
        domain = NormDomain(scale_max=scale_max)
    else:
        domain = NormDomain(
            x_max=MARGIN * seen["x_max"],
            var_lo=seen["var_min"] / MARGIN**2,
            var_hi=seen["var_max"] * MARGIN**2,
            scale_max=scale_max,
        )
    centred = node.op_type == "LayerNorm"
    eps = float(node.attrs.get("epsilon", 1e-5 if centred else 1e-6))
    try:
        norm_plan(f, int(np.size(scale)), eps, domain, centred, msb_bits)
    except DomainError as e:
        where = "its default domain" if seen is None else "the recorded range"
        raise RangeError(
            f"{node.describe()}: {where} (|x| <= {domain.x_max:.4g}, var in [{domain.var_lo:.3g}, "
            f"{domain.var_hi:.3g}], with the x{MARGIN:g} margin) is beyond every variant: {e}"
        ) from None
    return {"domain": [domain.x_max, domain.var_lo, domain.var_hi, domain.scale_max]}


def _product(node: Node, seen: dict | None, f: int, scalings: Callable, **_) -> dict:
    if seen is None:
        return {}
    # A product whose operands carry pending public scalings (attention's 1/sqrt(sqrt(d)) twice)
    # truncates them away: before that truncation it is |y| / (their product) in size.
    bound = MARGIN * seen["y_max"] / scalings(node)
    limit = 2.0 ** (_PRODUCT_HEADROOM - 2 * f)
    if bound >= limit:
        raise RangeError(
            f"{node.describe()}: recorded outputs up to {seen['y_max']:.4g} (x{MARGIN:g} margin, before its "
            f"scalings {bound:.4g}) exceed the fixed-point product's range {limit:.4g} at {f} fractional bits"
        )
    return {}


PLANNERS: dict[tuple[str, str], Callable] = {
    ("puma", "Gelu"): _piecewise,
    ("puma", "SiLU"): _piecewise,
    ("puma", "Softmax"): _softmax,
    ("puma", "LayerNorm"): _norm,
    ("puma", "RMSNorm"): _norm,
    ("", "MatMul"): _product,
    ("", "Gemm"): _product,
    ("", "Mul"): _product,
}


def plan_kernels(
    nodes: list[Node],
    secret: Callable[[str], bool],
    ranges: dict | None,
    f: int,
    msb_bits: int,
    weights: Callable[[str], np.ndarray],
    scalings: Callable[[Node], float] = lambda node: 1.0,
) -> dict[str, dict]:
    """Per secure node name, the parameters of the variant that covers its recorded range.

    `secret(name)` tells secret values, `weights(name)` gives the owner a weight or constant,
    `scalings(node)` the product of pending public scalars on a product's operands.
    Products of a secret with a public value are checked only when both operands are secret
    or one is a weight; a product with a public constant is a scaling, exact.
    """
    plan = {}
    for node in nodes:
        planner = PLANNERS.get(node.key)
        if planner is None or not any(secret(i) for i in node.inputs if i):
            continue
        if planner is _product and not all(secret(i) for i in node.inputs[:2] if i):
            continue
        seen = None if ranges is None else ranges.get(node.name)
        plan[node.name] = planner(
            node, seen, f=f, msb_bits=msb_bits, weights=weights, scalings=scalings
        )
    return plan
