"""The longest input a graph takes, read from the graph itself (for an .onnx file without puma.json).

A learned position table of R rows takes R tokens when positions count from 0 (BERT, GPT-2), fewer when
they start later: RoBERTa numbers positions from padding_idx + 1 = 2, so its 514 rows take 512 tokens.
The start is found by running the public part of the graph that computes the table's indices (from the
mask, the position ids or the shape alone) on a 2-token input: its largest index minus 1 is the offset.
"""

from __future__ import annotations

import numpy as np
import onnx

# The public inputs' values for the probe (the token ids are secret and never needed by the index path
# of the rewritten graph; zeros stand in for them in case only their shape is read).
PROBE_TOKENS = 2
# Constants larger than this in an index path mean it reads weights: not a position computation.
MAX_PROBE_CONSTANT = 1 << 16


def position_limit(model: onnx.ModelProto) -> int | None:
    """Tokens the graph takes: over the 2-D tables a Gather reads with anything but the token ids, the
    largest of rows minus offset; None for a graph that computes its positions (rotary embeddings).
    Expects the rewritten graph, where the token lookup is a puma.Embedding, not a Gather."""
    tables = {t.name: t.dims[0] for t in model.graph.initializer if len(t.dims) == 2}
    lookups = [
        n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tables and n.input[1] != "input_ids"
    ]
    if not lookups:
        return None
    offsets = index_offsets(model, [n.input[1] for n in lookups])
    return max(tables[n.input[0]] - offsets.get(n.input[1], 0) for n in lookups)


def index_offsets(model: onnx.ModelProto, names: list[str]) -> dict[str, int]:
    """For each index tensor, how far its largest value on a PROBE_TOKENS input lies past PROBE_TOKENS - 1
    (0 when it cannot be probed: the old guess, the table's rows)."""
    try:
        sub, feeds = _index_graph(model, names)
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(sub).run(names, feeds)
    except Exception:  # noqa: BLE001 - an index path we cannot run alone: keep the rows as the limit
        return {}
    return {name: max(0, int(np.max(v)) - (PROBE_TOKENS - 1)) if np.size(v) else 0 for name, v in zip(names, values)}


def _index_graph(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, dict]:
    """The nodes, small constants and inputs the tensors `names` depend on, as a model, and its feeds."""
    producer = {out: i for i, node in enumerate(model.graph.node) for out in node.output}
    constants = {t.name: t for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input}
    nodes, used_constants, used_inputs, stack, seen = set(), [], [], list(names), set()
    while stack:
        name = stack.pop()
        if not name or name in seen:
            continue
        seen.add(name)
        if name in producer:
            index = producer[name]
            nodes.add(index)
            node = model.graph.node[index]
            stack.extend(node.input)
            for attribute in node.attribute:  # an If or Loop reads outer names from its subgraphs
                if attribute.type == onnx.AttributeProto.GRAPH:
                    raise ValueError(f"{node.name} has a subgraph")
        elif name in constants:
            if int(np.prod(constants[name].dims)) > MAX_PROBE_CONSTANT:
                raise ValueError(f"{name} is a weight")
            used_constants.append(constants[name])
        elif name in inputs:
            used_inputs.append(inputs[name])
    graph = onnx.helper.make_graph(
        [model.graph.node[i] for i in sorted(nodes)], "index_probe", used_inputs,
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names], used_constants,
    )
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    sub.ir_version = model.ir_version
    return sub, {i.name: _probe_value(i) for i in used_inputs}


def _probe_value(value_info: onnx.ValueInfoProto) -> np.ndarray:
    """A public input for a PROBE_TOKENS-token input with an empty cache."""
    name = value_info.name
    if name == "attention_mask":
        return np.ones((1, PROBE_TOKENS), np.int64)
    if name == "position_ids":
        return np.arange(PROBE_TOKENS, dtype=np.int64)[None, :]
    if name in ("input_ids", "token_type_ids"):
        return np.zeros((1, PROBE_TOKENS), np.int64)
    if name.startswith("past_key_values"):
        heads, dim = (d.dim_value for d in value_info.type.tensor_type.shape.dim[1::2])
        return np.zeros((1, heads, 0, dim), np.float32)
    raise ValueError(f"no probe value for input {name!r}")
