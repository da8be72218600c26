"""What the rules share: the secrecy of the graph being rewritten, constant and axis checks."""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from puma_onnx.passes import secrecy
from puma_onnx.passes.functions import DOMAIN


class Levels:
    """The secrecy of the values of the graph being rewritten.

    The driver recomputes it before each rule runs; values a rule creates are
    unknown until then and count as secret, so a check that needs a public
    operand never accepts one it cannot vouch for.
    """

    def __init__(self) -> None:
        self.levels: dict[ir.Value, str] = {}

    def refresh(self, graph: ir.Graph) -> None:
        self.levels = secrecy.analyze_graph(graph)

    def is_public(self, value: ir.Value | None) -> bool:
        return value is not None and self.levels.get(value) == secrecy.PUBLIC

    def is_secret(self, value: ir.Value | None) -> bool:
        return value is not None and not self.is_public(value)


class PumaRule(pattern.RewriteRuleClassBase):
    """A rewrite rule that sees the secrecy of the graph it rewrites."""

    def __init__(self, levels: Levels, name: str | None = None) -> None:
        super().__init__(name or type(self).__name__)
        self.levels = levels


def scalar(value: ir.Value | None) -> float | None:
    """The number held by a one-element constant, else None."""
    if value is None:
        return None
    array = secrecy.constant_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def is_close(value: ir.Value | None, expected: float, rel_tol: float = 1e-5) -> bool:
    got = scalar(value)
    return got is not None and math.isclose(got, expected, rel_tol=rel_tol)


def is_last_axis(axis: int, x: ir.Value) -> bool:
    """Whether `axis` is the last axis of `x` (-1, or rank - 1 when the rank is known)."""
    rank = x.shape.rank() if x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def reduces_last_axis(output: ir.Value) -> bool:
    """Whether `output` comes from a keepdims reduction over the last axis only.

    Covers both encodings: axes as an attribute (opset < 18) and as a constant
    input (opset 18 on).
    """
    node = output.producer()
    if node is None or node.attributes.get_int("keepdims", 1) != 1:
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = secrecy.constant_array(node.inputs[1])
        axes = None if axes is None else axes.reshape(-1).tolist()
    else:
        axes = node.attributes.get_ints("axes")
        axes = None if axes is None else list(axes)
    return axes is not None and len(axes) == 1 and is_last_axis(axes[0], node.inputs[0])


def puma(op, op_type: str, *inputs, **attributes):
    """A call of `puma.<op_type>` (defined by `functions.function`)."""
    return getattr(op, op_type)(*inputs, _domain=DOMAIN, **attributes)
