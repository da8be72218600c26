"""Each secure kernel's domain against the model's recorded activation ranges, before any share moves.

`puma-onnx export` records per node what the plaintext model produced on calibration inputs
(`puma_onnx.calibrate`): the largest |x| of every nonlinear op's input, the norms' row
variances, the largest |output| of every product of activations. Here the owner widens each
recorded range by MARGIN (x4 on magnitudes, x16 on variances) and checks it against the
domain of the kernel that will run, picking the kernel's wider variant where one exists:

  puma.Gelu, puma.SiLU    comparisons on the fewest bits L that hold the widened range (|x| < 2^(L-2-f),
                          L - 1 a multiple of 3, at most party.msb_bits), or on 64 bits
  puma.Softmax            the same for the differences of a row (|x_i - x_j| < 2^(L-2-f))
  puma.LayerNorm/RMSNorm  `nonlinear.norm_plan` for the NormDomain (pre-scaled sums of squares,
                          a normalised rsqrt, 64-bit comparisons; see there)
  MatMul, Gemm, Mul       the product before its truncation, |y| 2^(2f) < 2^61 (no wider variant; a
                          MatMul folds its operands' public scalings into its truncation only while
                          the bound leaves room for them)

A domain that no variant covers stops the run with one line naming the node, the bound and the
domain (`RangeError`). Nodes without a record (a model exported before ranges were recorded, or
a bare .onnx file) get the defaults: the norms' NormDomain(), which covers LLaMA-family outliers
(|x| <= 2^15, variances up to 2^30), and 48-bit comparisons elsewhere (|x| < 2^29 at f = 18).

The plan (per node: comparison width, a norm's domain, a matmul's output bound) is public: every
rank runs the same variants. It holds the recorded ranges widened by the margin, and each norm's
largest |scale| rounded up to a power of two.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .kernels import Node
from .nonlinear import DomainError, NormDomain, comparison_bits, norm_plan

MARGIN = 4.0
_PRODUCT_HEADROOM = 61
# What puma.json records per node (puma_onnx.calibrate).
RANGE_KEYS = frozenset({"x_max", "var_min", "var_max", "y_max"})


class RangeError(ValueError):
    """A recorded range that no variant of its kernel covers; one line for the user."""


def _comparison_bits(node: Node, spread: float, f: int, msb_bits: int) -> int:
    """The narrowest comparison width that holds values `spread` apart at f fractional bits."""
    try:
        return comparison_bits(spread, f, msb_bits, narrow=True)
    except DomainError:
        raise RangeError(
            f"{node.describe()}: recorded values {spread:.4g} apart (with the x{MARGIN:g} margin) exceed what "
            f"64-bit comparisons hold at {f} fractional bits (2^{62 - f})"
        ) from None


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
    # The scale bounds the ride's product; a computed (not constant) scale has no bound here: KeyError.
    scale = weights(node.inputs[1])
    scale_max = 2.0 ** math.ceil(math.log2(max(float(np.abs(scale).max(initial=0.0)), 2.0**-8)))
    if seen is None:
        domain = NormDomain(scale_max=scale_max)
    else:
        # A row of zeros records 0: a bound of 1 costs nothing and keeps the logarithms finite.
        domain = NormDomain(
            x_max=max(MARGIN * seen["x_max"], 1.0),
            var_lo=seen["var_min"] / MARGIN**2,
            var_hi=max(seen["var_max"] * MARGIN**2, 1.0),
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


def _product(node: Node, seen: dict | None, f: int, **_) -> dict:
    if seen is None:
        return {}
    bound = MARGIN * seen["y_max"]
    limit = 2.0 ** (_PRODUCT_HEADROOM - 2 * f)
    if bound >= limit:
        raise RangeError(
            f"{node.describe()}: recorded outputs up to {seen['y_max']:.4g} (x{MARGIN:g} margin: {bound:.4g}) "
            f"exceed the fixed-point product's range {limit:.4g} at {f} fractional bits"
        )
    # A matmul whose operands carry public scalings (attention's 1/sqrt(sqrt(d)) twice, computed at run
    # time) truncates them away only while the bound leaves room for them (kernels.matmul).
    return {"y_max": bound} if node.op_type == "MatMul" else {}


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
) -> dict[str, dict]:
    """Per secure node name, the parameters of the variant that covers its recorded range.

    `secret(name)` tells secret values, `weights(name)` gives the owner a weight or constant.
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
        try:
            plan[node.name] = planner(node, seen, f=f, msb_bits=msb_bits, weights=weights)
        except KeyError as e:
            raise RangeError(f"{node.describe()}: its record or a constant it needs lacks {e}") from None
    return plan
