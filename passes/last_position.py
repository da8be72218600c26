"""A decoder's LM head on the last position only: the next token needs one row of logits, not S.

Decoder exports end with `logits = MatMul(hidden, W)`, hidden of shape (batch, S, H) and W the
(vocabulary x H)-sized output projection: on secret data that product is S rows of the model's
largest matmul (GPT-2: 768 x 50257). PUMA's "N tokens in, 1 out" needs only the last row, so
`last_position_logits` puts `Slice(hidden, -1:, axis=-2)` in front of the head; the `logits`
output becomes (batch, 1, V). The slice's bounds are public int64 constants.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

LOGITS = "logits"
_INT64_MAX = np.iinfo(np.int64).max


def lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul that produces the `logits` graph output, or None (an encoder, another head)."""
    if LOGITS not in {o.name for o in model.graph.output}:
        return None
    return next((n for n in model.graph.node if LOGITS in n.output and n.op_type == "MatMul"), None)


def last_position_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose LM head reads only the last position (unchanged when it has none)."""
    head = lm_head(model)
    if head is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    head = next(n for n in out.graph.node if LOGITS in n.output)
    hidden, last = head.input[0], head.input[0] + "/last_position"
    bounds = {name: np.array([v], np.int64) for name, v in (("starts", -1), ("ends", _INT64_MAX), ("axes", -2))}
    names = {key: f"{last}/{key}" for key in bounds}
    out.graph.initializer.extend(numpy_helper.from_array(v, names[k]) for k, v in bounds.items())
    index = list(out.graph.node).index(head)
    slice_node = helper.make_node(
        "Slice", [hidden, names["starts"], names["ends"], names["axes"]], [last], name=f"{head.name}/last_position"
    )
    out.graph.node.insert(index, slice_node)
    head.input[0] = last
    for output in out.graph.output:
        if output.name == LOGITS and len(output.type.tensor_type.shape.dim) == 3:
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1
    return out
