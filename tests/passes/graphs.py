"""The smallest graphs the pass tests need, built with onnx.helper, and a runner."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
BOOL = TensorProto.BOOL


def const(name: str, value, dtype=np.float32) -> onnx.NodeProto:
    """A Constant node (public graph structure)."""
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype))
    )


def weight(name: str, array) -> onnx.TensorProto:
    """An initializer (secret if float with more than one element)."""
    return numpy_helper.from_array(np.asarray(array), name)


def model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    """inputs/outputs: (name, elem_type, shape) triples; shape None for unknown."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def op_types(m: onnx.ModelProto) -> list[str]:
    """Node op types of the main graph, domain-qualified outside the default domain."""
    return [n.op_type if not n.domain else f"{n.domain}.{n.op_type}" for n in m.graph.node]


def run(m: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
