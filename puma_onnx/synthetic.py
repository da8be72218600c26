"""Synthetic-weight exports: a model too large to materialise, described by its graph and a seed.

LLaMA-7B's 27 GB of fp32 weights fit neither this machine's memory nor, comfortably,
its disk, and with random weights nothing is lost by not writing them: `export
--synthetic-weights` exports a few layers at full width with real random weights,
rewrites them, then

1. turns every secret matrix that looks like random initialisation (an
   initializer of two or more dimensions with mean near 0) into a synthetic
   weight (`runtime/store.py`): its recipe (normal values with the tensor's
   standard deviation, or its constant) and a seed, no data; vectors (norm
   weights) and structured matrices keep their values;
2. repeats the last exported layer up to the requested depth (`clone_layers`):
   its nodes, its own weights (as new synthetic weights), its past/present inputs
   and outputs, with the residual stream chained through the copies.

The owner generates each weight when it is shared, so no rank, and no file, ever
holds the whole model. onnxruntime cannot run the result; `materialize` writes the
same weights out for a plaintext check of models small enough.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from puma_onnx.runtime.executor import layer_of
from puma_onnx.runtime.store import generate, is_synthetic, synthetic_recipe

PRESENT, PAST = "present.", "past_key_values."


class CloneError(Exception):
    """The graph's layers are not copies of one another that this pass can repeat."""


def make_synthetic(model: onnx.ModelProto, secret: set[str], seed: int) -> int:
    """Turn the secret random-init matrices of `model` (loaded with its data) into synthetic weights;
    returns how many. A matrix whose mean is not within a tenth of its standard deviation of 0 (a
    table of cosines, say) is structure, not noise, and keeps its values."""
    count = 0
    for tensor in model.graph.initializer:
        if tensor.name in secret and len(tensor.dims) >= 2 and not is_synthetic(tensor):
            values = numpy_helper.to_array(tensor).astype(np.float64)
            if abs(values.mean()) > 0.1 * values.std():
                continue
            synthetic_recipe(tensor, seed, values)
            count += 1
    return count


def _renamer(source: int, target: int):
    """Names in layer `source` -> the same names in layer `target`: /layers.1/ -> /layers.7/, present.1.
    -> present.7., anything else gets a __layer7 suffix."""
    in_layer = re.compile(rf"((?:^|/|\.)(?:layer|layers|h|block|blocks)\.){source}(?=/|\.|_|$)")
    cache = re.compile(rf"^({re.escape(PRESENT)}|{re.escape(PAST)}){source}\.")

    def rename(name: str) -> str:
        if not name:
            return name
        new = cache.sub(rf"\g<1>{target}.", name)
        if new != name:
            return new
        new = in_layer.sub(rf"\g<1>{target}", name)
        return new if new != name else f"{name}__layer{target}"

    return rename


def clone_layers(model: onnx.ModelProto, layers: int) -> dict[str, str]:
    """Repeat the model's last layer until it has `layers`; returns {copied node name: its source}
    (to copy recorded ranges). The model is changed in place."""
    graph = model.graph
    nodes = list(graph.node)
    have = sorted({layer_of(n.name) for n in nodes} - {None})
    if not have or have != list(range(len(have))):
        raise CloneError(f"the graph's layers are not numbered 0..n-1 (found {have[:5]})")
    if layers <= len(have):
        return {}
    last = have[-1]
    if last == 0:
        raise CloneError("export at least 2 layers to repeat one (layer 0 reads the embedding)")
    members = [i for i, n in enumerate(nodes) if layer_of(n.name) == last]
    member_set = set(members)
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output}
    users = defaultdict(list)
    for i, n in enumerate(nodes):
        for x in n.input:
            users[x].append(i)
    back = _renamer(last, last - 1)
    # The layer's output: what it produces for nodes outside it (the residual stream; present.* are
    # graph outputs). Its input from the layer before: the same tensor, one layer earlier.
    outputs = {
        o for i in members for o in nodes[i].output
        if o and any(u not in member_set for u in users[o])
    }
    if len(outputs) != 1:
        raise CloneError(f"layer {last} hands {len(outputs)} tensors to the rest of the graph, not one residual stream")
    (out,) = outputs
    early = [nodes[u].name for u in users[out] if u not in member_set and u < max(members)]
    if early:
        raise CloneError(f"{early[0]!r} reads layer {last}'s output before the layer ends")
    residual = back(out)
    if residual not in produced_by or layer_of(nodes[produced_by[residual]].name) != last - 1:
        raise CloneError(f"layer {last}'s input {residual!r} is not the output of layer {last - 1}")
    initializers = {t.name: t for t in graph.initializer}
    own_weights = {
        x for i in members for x in nodes[i].input
        if x in initializers and all(u in member_set for u in users[x])
    }
    inputs = {v.name: v for v in graph.input}
    graph_outputs = {v.name: v for v in graph.output}

    copies, sources, previous_out = [], {}, out
    for k in range(last + 1, layers):
        rename = _renamer(last, k)
        local = {o for i in members for o in nodes[i].output if o} | own_weights
        local |= {x for i in members for x in nodes[i].input if x.startswith(PAST)}

        def mapped(name: str) -> str:
            if name == residual:
                return previous_out
            return rename(name) if name in local else name

        for i in members:
            node = onnx.NodeProto()
            node.CopyFrom(nodes[i])
            node.name = rename(node.name)
            sources[node.name] = nodes[i].name
            node.input[:] = [mapped(x) for x in node.input]
            node.output[:] = [mapped(x) for x in node.output]
            copies.append(node)
        for name in sorted(own_weights):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(initializers[name])
            tensor.name = rename(name)
            graph.initializer.append(tensor)
        for name in sorted(local):
            if name in inputs:
                graph.input.append(_renamed_value(inputs[name], rename(name)))
            if name in graph_outputs:
                graph.output.append(_renamed_value(graph_outputs[name], rename(name)))
        previous_out = rename(out)

    after = max(members) + 1
    tail = nodes[after:]
    for node in tail:
        node.input[:] = [previous_out if x == out else x for x in node.input]
    del graph.node[:]
    graph.node.extend(nodes[:after] + copies + tail)
    for value in graph.output:  # the model's answer read straight from the layer (no final norm)
        if value.name == out:
            raise CloneError(f"the graph output {out!r} is the layer's own output")
    return sources


def _renamed_value(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(value)
    out.name = name
    return out


def materialize(path: str | Path, out_path: str | Path, half: bool = False) -> None:
    """Write the model at `path` with its synthetic weights generated, as external data beside
    `out_path`, for onnxruntime. With `half`, they are stored as float16 (exactly: synthetic values
    are float16 numbers) behind a Cast to float32 at each use, so LLaMA-7B's weights take 13.5 GB
    of disk and memory instead of 27; run it without graph optimisations, which would fold the casts."""
    model = onnx.load(str(path), load_external_data=False)
    casts = []
    for tensor in model.graph.initializer:
        if is_synthetic(tensor):
            values = generate(tensor)
            if half:
                name = tensor.name
                tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name + "/float16"))
                casts.append(onnx.helper.make_node("Cast", [name + "/float16"], [name], to=onnx.TensorProto.FLOAT))
            else:
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    if casts:
        nodes = casts + list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    onnx.save(model, str(out_path), save_as_external_data=True, location=Path(out_path).name + ".data")


def synthetic_bytes(model: onnx.ModelProto) -> int:
    """The fp32 bytes the synthetic weights stand for."""
    return 4 * sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if is_synthetic(t))
