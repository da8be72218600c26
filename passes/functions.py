"""The plaintext definitions of the `puma.*` ops, as ONNX functions.

Every rewritten model carries one function per `puma` op it uses (attributes
by reference, never one copy per call site), so onnxruntime runs the rewritten
model as it is, and the difference between the original and the rewritten
model is exactly the approximation error. The numbers come from one set of
`puma_onnx.runtime.approx` (refit or PUMA's), which the secure kernels read
too; each function computes what the float64 reference of the same name there
computes, and the model records the set's name in its metadata
(`APPROX_KEY`), so that the executor evaluates the same set.

The bodies use the model's own default-domain opset (onnxruntime resolves a
function's ops against the model's opset), so they stay within ops that exist
from opset 14 on and switch only where an op changed signature (the axes of
ReduceMax/ReduceMin became an input at opset 18). Constants are float32: the
exports are float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from puma_onnx.runtime import approx

DOMAIN = "puma"
VERSION = 1
# The model metadata key that names the approximation set of the functions.
APPROX_KEY = "puma_onnx.approx"
APPROX_DIGEST_KEY = "puma_onnx.approx_digest"  # approx.ApproxSet.digest of the set the functions hold

# Attribute each op takes, in the order of the function's declaration.
ATTRIBUTES = {
    "Gelu": (),
    "SiLU": (),
    "Softmax": (),
    "LayerNorm": ("epsilon", "axis"),
    "RMSNorm": ("epsilon",),
    "Embedding": (),
}


class _Body:
    """Appends nodes to a function body and hands out fresh value names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"_{op_type.lower()}{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, value, dtype=np.float32) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr(self, name: str, kind: str, attr_type: int) -> str:
        """A Constant whose value is the caller's attribute `name` (a reference, not a copy)."""
        out = f"_{name}{len(self.nodes)}"
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref(kind, attr_type))
        node.attribute[0].ref_attr_name = name
        self.nodes.append(node)
        return out

    def reduce_last(self, op_type: str, x: str) -> str:
        """ReduceMax/ReduceMin over the last axis, keepdims (axes moved to an input at opset 18)."""
        if self.opset >= 18:
            return self.op(op_type, x, self.const([-1], np.int64), keepdims=1)
        return self.op(op_type, x, axes=[-1], keepdims=1)

    def mean(self, x: str, axis: str) -> str:
        """Mean over the axis held in the int64 scalar `axis`, keepdims, valid from opset 13."""
        axes = self.op("Reshape", axis, self.const([1], np.int64))
        total = self.op("ReduceSum", x, axes, keepdims=1)
        count = self.op(
            "Cast", self.op("Gather", self.op("Shape", x), axis), to=onnx.TensorProto.FLOAT
        )
        return self.op("Div", total, count)

    def poly(self, x: str, coeffs: tuple[float, ...]) -> str:
        """Horner's rule, coefficients from the constant term upwards (approx.poly)."""
        out = self.const(coeffs[-1])
        for c in reversed(coeffs[:-1]):
            out = self.op("Add", self.op("Mul", out, x), self.const(c))
        return out

    def piecewise(self, x: str, fit: approx.Piecewise) -> str:
        """0 below breaks[0], low to breaks[1] (three breaks only), mid to breaks[-1], x above
        (approx.Piecewise)."""
        upper = self.op("Where", self.op("Less", x, self.const(fit.breaks[-1])), self.poly(x, fit.mid), x)
        if len(fit.breaks) == 3:
            upper = self.op("Where", self.op("Less", x, self.const(fit.breaks[1])), self.poly(x, fit.low), upper)
        return self.op("Where", self.op("Less", x, self.const(fit.breaks[0])), self.const(0.0), upper)


def _gelu(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    return ["x"], b.piecewise("x", fits.gelu)


def _silu(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    return ["x"], b.piecewise("x", fits.silu)


def _softmax(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    """approx.softmax: masked-out positions (mask False) weigh 0; no infinity is needed.

    The row maximum is taken over kept positions only: masked positions are
    replaced by the row minimum, which never exceeds a kept value.
    """
    exp = fits.exp
    floor = b.op("Where", "mask", "x", b.reduce_last("ReduceMin", "x"))
    top = b.reduce_last("ReduceMax", floor)
    d = b.op("Where", "mask", b.op("Sub", "x", top), b.const(0.0))
    y = b.poly(b.op("Div", d, b.const(2.0**exp.squarings)), exp.base)
    for _ in range(exp.squarings):
        y = b.op("Mul", y, y)
    e = b.op("Where", b.op("Less", d, b.const(-exp.cut)), b.const(0.0), y)
    e = b.op("Where", "mask", e, b.const(0.0))
    total = b.op("ReduceSum", e, b.const([-1], np.int64), keepdims=1)
    return ["x", "mask"], b.op("Div", e, total)


def _layer_norm(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    """approx.layer_norm over `axis`: (x - mean) / sqrt(var + epsilon) * scale + bias."""
    axis = b.attr("axis", "value_int", AttributeProto.INT)
    eps = b.attr("epsilon", "value_float", AttributeProto.FLOAT)
    centred = b.op("Sub", "x", b.mean("x", axis))
    var = b.mean(b.op("Mul", centred, centred), axis)
    normed = b.op("Div", centred, b.op("Sqrt", b.op("Add", var, eps)))
    return ["x", "scale", "bias"], b.op("Add", b.op("Mul", normed, "scale"), "bias")


def _rms_norm(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    """approx.rms_norm over the last axis: x / sqrt(mean(x^2) + epsilon) * scale."""
    eps = b.attr("epsilon", "value_float", AttributeProto.FLOAT)
    ms = b.mean(b.op("Mul", "x", "x"), b.const(-1, np.int64))
    normed = b.op("Div", "x", b.op("Sqrt", b.op("Add", ms, eps)))
    return ["x", "scale"], b.op("Mul", normed, "scale")


def _embedding(b: _Body, fits: approx.ApproxSet) -> tuple[list[str], str]:
    """Row lookup: the secure kernel multiplies a one-hot of the ids by the table."""
    return ["table", "ids"], b.op("Gather", "table", "ids", axis=0)


_BODIES = {
    "Gelu": _gelu,
    "SiLU": _silu,
    "Softmax": _softmax,
    "LayerNorm": _layer_norm,
    "RMSNorm": _rms_norm,
    "Embedding": _embedding,
}


def function(op_type: str, opset: int, fits: approx.ApproxSet = approx.REFIT) -> onnx.FunctionProto:
    """The ONNX function defining `puma.<op_type>` with the approximations `fits`, for a model whose
    default opset is `opset`."""
    body = _Body(opset)
    inputs, out = _BODIES[op_type](body, fits)
    body.nodes.append(helper.make_node("Identity", [out], ["y"]))
    return helper.make_function(
        DOMAIN,
        op_type,
        inputs,
        ["y"],
        body.nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES[op_type]),
    )
