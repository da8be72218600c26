"""Which values are public and which are secret, and which secret ops have no secure kernel.

The rules (DESIGN.md section 1): graph structure and shapes are public; the
model owner's weights, the client's token ids and everything computed from
them are secret. Concretely:

- graph inputs named in PUBLIC_INPUTS are public, every other input is secret;
- initializers are weights (secret) unless they hold int64 or bool data (shapes,
  axes, indices); Constant nodes are graph structure (public);
- Shape and Size give public values whatever their input;
- every other output is secret as soon as one input is secret.

A node with a secret input needs a secure kernel: its (domain, op_type) must be
in SECURE_OPS and the operands that kernel takes in the clear must be public
(the divisor of Div, the indices of Gather, the condition of Where, the shape
and axes operands of shape ops, the mask of puma.Softmax). A public constant
that the kernel must encode in fixed point must fit the ring.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from puma_onnx.runtime.ring import FixedPoint

PUBLIC = "public"
SECRET = "secret"

PUBLIC_INPUTS = frozenset({"attention_mask", "position_ids"})

SECURE_OPS = frozenset(
    [
        ("", op)
        for op in (
            "MatMul Gemm Add Sub Mul Div Neg Reshape Transpose Concat Split Slice Squeeze"
            " Unsqueeze Gather Identity Cast Where Expand ReduceSum ReduceMean CumSum Flatten"
            " Shape Size"
        ).split()
    ]
    + [("puma", op) for op in ("Gelu", "Softmax", "LayerNorm", "RMSNorm", "SiLU", "Embedding")]
)

# Operands a secure kernel takes in the clear (input positions). Every other
# operand may be secret; a public constant there is encoded in fixed point.
PUBLIC_OPERANDS = {
    ("", "Div"): (1,),
    ("", "Gather"): (1,),
    ("", "Where"): (0,),
    ("", "Reshape"): (1,),
    ("", "Slice"): (1, 2, 3, 4),
    ("", "Split"): (1,),
    ("", "Squeeze"): (1,),
    ("", "Unsqueeze"): (1,),
    ("", "Expand"): (1,),
    ("", "ReduceSum"): (1,),
    ("", "ReduceMean"): (1,),
    ("", "CumSum"): (1,),
    ("puma", "Softmax"): (1,),
}

_SHAPE_ONLY = frozenset({("", "Shape"), ("", "Size")})

_FLOATS = frozenset(
    {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
)

# The executor's fixed point (18 fractional bits in Z_2^64, SPU's FM64) encodes
# |x| < 2^45; a constant in a secure op keeps one bit of headroom: |x| < 2^44.
FRAC_BITS = FixedPoint().frac_bits
ENCODABLE_LIMIT = FixedPoint().bound / 2


def is_weight(value: ir.Value) -> bool:
    """An initializer is the model owner's secret unless it holds int64 or bool data.

    int64 and bool tensors are what exporters use for shapes, axes and indices; every
    other initializer (float of any size, a learned scalar, int8/int32 quantized
    weights and biases) is a weight. Were a weight classed public it would travel to
    the other ranks in the clear with the graph.
    """
    tensor = value.const_value
    return tensor is not None and tensor.dtype not in (ir.DataType.INT64, ir.DataType.BOOL)


def analyze_graph(graph: ir.Graph) -> dict[ir.Value, str]:
    """PUBLIC or SECRET for every value of the graph (nodes in topological order)."""
    levels: dict[ir.Value, str] = {}
    for value in graph.inputs:
        levels[value] = PUBLIC if value.name in PUBLIC_INPUTS else SECRET
    for value in graph.initializers.values():
        levels.setdefault(value, SECRET if is_weight(value) else PUBLIC)
    for node in graph:
        if (node.domain, node.op_type) in _SHAPE_ONLY or node.op_type == "Constant":
            level = PUBLIC
        elif any(levels.get(v) == SECRET for v in node.inputs if v is not None):
            level = SECRET
        else:
            level = PUBLIC
        for out in node.outputs:
            levels[out] = level
    return levels


def _describe(node: ir.Node) -> str:
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    return f"{node.name or '<unnamed>'} ({op})"


def constant_array(value: ir.Value) -> np.ndarray | None:
    """The value of an initializer or Constant output, else None."""
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _cast_problem(node: ir.Node) -> str | None:
    source = node.inputs[0].dtype
    target = node.attributes.get_int("to")
    if source in _FLOATS and target is not None and ir.DataType(target) in _FLOATS:
        return None
    target_name = ir.DataType(target).name if target is not None else "?"
    source_name = source.name if source is not None else "unknown type"
    return f"casts a secret {source_name} to {target_name}; only float to float is supported"


def problems(graph: ir.Graph, levels: dict[ir.Value, str]) -> list[str]:
    """One line per node on secret data that the secure executor cannot run."""
    found = []
    for node in graph:
        inputs = list(node.inputs)
        secret = [i for i, v in enumerate(inputs) if v is not None and levels.get(v) == SECRET]
        if not secret:
            continue
        key = (node.domain if node.domain != "ai.onnx" else "", node.op_type)
        if key not in SECURE_OPS:
            found.append(f"{_describe(node)}: no secure kernel for this op on secret data")
            continue
        in_clear = PUBLIC_OPERANDS.get(key, ())
        for i in secret:
            if i in in_clear:
                found.append(
                    f"{_describe(node)}: input {i} ({inputs[i].name}) is secret but must be public"
                )
        if key == ("", "Cast"):
            reason = _cast_problem(node)
            if reason:
                found.append(f"{_describe(node)}: {reason}")
        for i, value in enumerate(inputs):
            if value is None or i in in_clear or levels.get(value) != PUBLIC:
                continue
            array = constant_array(value)
            if array is None or array.dtype == np.bool_ or array.size == 0:
                continue
            if not np.all(np.isfinite(array)) or np.max(np.abs(array)) >= ENCODABLE_LIMIT:
                found.append(
                    f"{_describe(node)}: constant input {i} ({value.name}) holds "
                    f"{np.min(array):.4g}..{np.max(array):.4g}, outside the fixed-point range "
                    f"|v| < 2^{int(np.log2(ENCODABLE_LIMIT))} ({FRAC_BITS} fractional bits)"
                )
    return found
