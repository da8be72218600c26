"""The graph walker: a loop over the nodes of a rewritten ONNX graph and a table of kernels.

Every rank walks the same graph in the same order. A node whose inputs are all
public runs in plaintext on every rank (onnx's reference implementation of the
op); a node with a secret input runs its secure kernel from `kernels.KERNELS`.
Values die after their last use, so peak memory follows the live activations.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from . import approx, prepared
from .kernels import (
    FLAT_ORDER, KERNELS, PRIVATE_LOCAL, Context, KernelError, Node, Private, SharedIds, is_secret, weight_products,
)
from .party import Party
from .weights import WeightShare

# A decoder's key/value cache outputs (they stay secret: the next step reads them).
PRESENT_PREFIX = "present."
# The input of an LM head that reads the last position only (passes/last_position.py).
LAST_POSITION = "/last_position"
LAYER = re.compile(r"(?:^|/|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:/|\.|_|$)")


def layer_of(name: str) -> int | None:
    """The transformer layer a node belongs to, read from its exported name (/encoder/layer.3/...)."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def parse_nodes(graph: onnx.GraphProto) -> list[Node]:
    """The graph's nodes, each with a name of its own: ONNX allows empty and repeated names, and the
    executor keys per-node state by name (a repeat gets "#index" appended)."""
    nodes, seen = [], set()
    for i, n in enumerate(graph.node):
        name = n.name or f"{n.op_type}_{i}"
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        nodes.append(Node(
            name=name,
            op_type=n.op_type,
            domain=n.domain or "",
            inputs=list(n.input),
            outputs=list(n.output),
            attrs={a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
        ))
    return nodes


def _reads_weight(node: Node, weights) -> bool:
    """A MatMul, or a Gemm that only multiplies and adds (alpha = beta = 1, no transA), of an input by a weight."""
    if node.domain or len(node.inputs) < 2 or node.inputs[1] not in weights:
        return False
    if node.op_type == "MatMul":
        return True
    plain = node.attrs.get("alpha", 1.0) == 1.0 and node.attrs.get("beta", 1.0) == 1.0
    return node.op_type == "Gemm" and plain and not node.attrs.get("transA", 0)


def product_groups(nodes: list[Node], weights, final: list[bool]) -> dict[int, list[int]]:
    """Weight products grouped by the input they read: the first node's index -> the group's node indices,
    in walk order. A product whose outputs are answers (`final`) stays alone: it is reshared, not truncated."""
    groups: dict[int, list[int]] = {}
    first: dict[str, int] = {}
    for i, node in enumerate(nodes):
        if not _reads_weight(node, weights):
            continue
        head = i if final[i] else first.setdefault(node.inputs[0], i)
        groups.setdefault(head, []).append(i)
    return groups


def unsupported(nodes: list[Node], secret: Callable[[str], bool]) -> list[str]:
    """Nodes with a secret input and no secure kernel, described for the user."""
    return [n.describe() for n in nodes if any(secret(i) for i in n.inputs if i) and n.key not in KERNELS]


class PublicOps:
    """Plaintext evaluation of public nodes by onnx's reference implementation of each op.

    One ReferenceEvaluator over the whole graph builds every node's op once (0.4 s for
    GPT-2's 2,500 nodes; an evaluator per node took ten times as long).
    """

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        self._ops = ReferenceEvaluator(model).rt_nodes_

    def run(self, index: int, inputs: list) -> list:
        return list(self._ops[index].run(*inputs))


@dataclass
class OpStats:
    """What one node cost on this rank."""

    name: str
    layer: int | None
    op_type: str
    time_s: float
    bytes: int
    rounds: int


@dataclass
class Executor:
    """Runs a graph skeleton (secret initializers removed) given the secret weights.

    Weights stay WeightShares (compact, see weights.py) until a kernel reads them.
    """

    party: Party
    model: onnx.ModelProto
    weights: dict
    fits: approx.ApproxSet = approx.REFIT
    plan: dict = field(default_factory=dict)  # per node, its planned variant (ranges.plan_kernels)
    stats: list[OpStats] = field(default_factory=list)
    stream: object = None  # a weights.WeightStream: weights shared layer by layer during the walk

    def __post_init__(self):
        graph = self.model.graph
        self.nodes = parse_nodes(graph)
        self.public = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.output_names = [o.name for o in graph.output]
        self._public_ops = PublicOps(self.model)
        # Per value name, the index of the first and of the last node that reads it.
        self.first_use, self.last_use = {}, {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                self.first_use.setdefault(name, i)
                self.last_use[name] = i
        self.layers = sorted({layer_of(n.name) for n in self.nodes} - {None})
        # Nodes whose outputs are answers only (no later node reads them, and not a decoder's cache, which
        # stays secret for the next step): their products may stay untruncated (`kernels.Unscaled`).
        answers = {name for name in self.output_names if not name.startswith(PRESENT_PREFIX)}
        self._final = [
            all(name in answers and self.last_use.get(name, -1) <= i for name in n.outputs if name)
            for i, n in enumerate(self.nodes)
        ]
        self.prepared: prepared.Prepared | None = None  # `prepare_products`; one walk uses it up
        self.product_paths: dict[str, int] = {}  # the last walk's weight products, by path (Context.product_paths)

    def answers_stay_secret(self) -> None:
        """The outputs feed more MPC (generation's argmax), not an opening: every product is truncated
        in its node, as its consumer needs it (no `Unscaled` answers)."""
        self._final = [False] * len(self.nodes)

    def _weight_names(self) -> set[str]:
        """The names that hold a weight: the secret weights, and a 2-D weight read through a Transpose (a tied
        LM head's embedding table; `kernels.transpose` keeps it a WeightShare)."""
        names = set(self.weights)
        if self.stream is not None:
            names |= {name for name, _ in self.stream.manifest}
        return names | set(self._transposed_weights(names))

    def _transposed_weights(self, names: set[str]) -> dict[str, str]:
        """Transposed weight -> the weight it reads."""
        return {
            n.outputs[0]: n.inputs[0]
            for n in self.nodes
            if n.key == ("", "Transpose") and n.inputs[0] in names and n.attrs.get("perm") in (None, [1, 0])
        }

    def _product(self, index: int, weights: dict, group=None) -> prepared.Product:
        node = self.nodes[index]
        return prepared.Product(node.name, group, weights[node.inputs[1]], self._product_transposed(index))

    def _with_transposes(self, by_name: dict, transpose) -> dict:
        """`by_name` (weight name -> value) with every Transpose of a weight (`_transposed_weights`) under its
        output's name, its value transpose(the weight's)."""
        aliases = self._transposed_weights(set(by_name))
        return {**by_name, **{alias: transpose(by_name[source]) for alias, source in aliases.items()}}

    def _prepared_groups(self, shapes: dict) -> dict[int, list[int]]:
        """The product groups `prepare_products` prepares (head -> members): those whose weights are all 2-D;
        a group with another multiplies online. `shapes`: weight name -> shape, transposed weights included."""
        groups = product_groups(self.nodes, set(shapes), self._final)
        return {h: m for h, m in groups.items() if all(len(shapes[self.nodes[i].inputs[1]]) == 2 for i in m)}

    def _rows(self, head: int, tokens: int, batch: int) -> int:
        """A group's input rows: `tokens` (batch x sequence), or `batch` for an LM head on the last position."""
        return batch if self.nodes[head].inputs[0].endswith(LAST_POSITION) else tokens

    def _product_transposed(self, index: int) -> bool:
        node = self.nodes[index]
        return node.op_type == "Gemm" and bool(node.attrs.get("transB", 0))

    def _shift(self, head: int) -> int | None:
        """The truncation a prepared group's products take: f, or None for answers left unscaled."""
        return None if self._final[head] else self.party.fxp.frac_bits

    def mask_bytes(self, tokens: int, batch: int, shapes: dict) -> list[int]:
        """The peak bytes `prepare_products` adds on each rank, from the weights' public `shapes` (name ->
        shape), per output element of every product it prepares: rank 1 keeps Q (8 bytes; twice that while
        preparing), rank 2 holds its products and builds its messages (16, and 12 more where the truncation is
        prepared), and the owner keeps c_1 and the dealt words of each prepared truncation (20)."""
        shapes = self._with_transposes({name: tuple(shape) for name, shape in shapes.items()}, lambda s: s[::-1])
        every, cut = 0, 0
        for head, members in self._prepared_groups(shapes).items():
            rows = self._rows(head, tokens, batch)
            for i in members:
                out = rows * shapes[self.nodes[i].inputs[1]][0 if self._product_transposed(i) else 1]
                every += out
                cut += 0 if self._final[head] else out
        return [20 * cut, 16 * every, 16 * every + 12 * cut]

    def warm_resident(self) -> None:
        """Build, in the setup, the kept forms of resident weights (`weights.keep_resident`) that the walks
        read: a weight product's right operand, and the share of a weight read any other way (an embedding
        table, a bias), so that no walk pays for them. A Transpose of a weight reads nothing (a tied LM head
        is an operand through its alias); a tied table is both."""
        aliases = self._transposed_weights(set(self.weights))
        names = set(self.weights) | set(aliases)
        for node in self.nodes:
            product = _reads_weight(node, names)
            for position, name in enumerate(node.inputs):
                weight = self.weights.get(aliases.get(name, name))
                if weight is None or not weight.resident or (node.key == ("", "Transpose") and name in self.weights):
                    continue
                if product and position == 1:
                    weight.operand()
                else:
                    weight.materialize()

    def prepare_products(self, tokens: int, batch: int) -> None:
        """Setup for the next walk: masks for every product with a 2-D weight (`prepared.prepare`), for inputs
        of `_rows` rows, and their truncations. All ranks call it alike, after the weights are shared."""
        weights = self._with_transposes(dict(self.weights), lambda w: w.transpose() if len(w.shape) == 2 else w)
        groups = self._prepared_groups({n: w.value_shape for n, w in weights.items()})
        products = [self._product(i, weights, head) for head, members in groups.items() for i in members]
        rows = {head: self._rows(head, tokens, batch) for head in groups}
        shifts = {head: self._shift(head) for head in groups}
        self.prepared = prepared.prepare(self.party, products, rows, shifts=shifts)

    def run(self, feeds: dict, on_node: Callable[[Node], None] | None = None) -> dict:
        """Walk the graph; returns the graph outputs (shares, private or public values)."""
        env = {**self.public, **self.weights, **feeds}
        ctx = Context(self.party, self.fits, self.plan)
        ctx.prepared, self.prepared = self.prepared, None
        groups = product_groups(self.nodes, self._weight_names(), self._final)
        keep = set(self.output_names)
        comm = self.party.comm
        self.stats = []
        for i, node in enumerate(self.nodes):
            if on_node is not None:
                on_node(node)
            if self.stream is not None:
                self.stream.arrive(i, env)
            inputs = [env[name] if name else None for name in node.inputs]
            before, start = comm.stats.snapshot(), time.perf_counter()
            ctx.final = self._final[i]
            with comm.tag(node.op_type):
                if i in groups:
                    self._run_products(ctx, groups[i], env)
                outputs = self._run_node(ctx, i, node, inputs)
            cost = comm.stats.snapshot() - before
            self.stats.append(
                OpStats(node.name, layer_of(node.name), node.op_type, time.perf_counter() - start, cost.bytes, cost.rounds)
            )
            for name, value in zip(node.outputs, outputs):
                if name:
                    env[name] = value
            for name in node.inputs:
                if name and self.last_use.get(name) == i and name not in keep and name not in self.public:
                    env.pop(name, None)
        self.product_paths = dict(ctx.product_paths)
        return {name: env[name] for name in self.output_names}

    def _run_products(self, ctx: Context, members: list[int], env: dict) -> None:
        """The weight products of one group at its first node, in one batch (`kernels.weight_products`);
        each node's kernel then finds its own in `ctx.ready`. Members whose weight has not arrived yet (a
        streamed weight of a later layer) run alone at their own node."""
        x = env[self.nodes[members[0]].inputs[0]]
        here = [i for i in members if isinstance(env.get(self.nodes[i].inputs[1]), WeightShare)]
        if not is_secret(x) or not here:
            return
        group = members[0] if len(here) == len(members) else None
        products = [self._product(i, env, group) for i in here]
        for p, out in zip(products, weight_products(ctx, x, products, group)):
            ctx.ready[p.key] = out

    def _run_node(self, ctx: Context, index: int, node: Node, inputs: list) -> list:
        if not any(is_secret(v) for v in inputs):
            return self._public_ops.run(index, inputs)
        if node.key in PRIVATE_LOCAL and all(isinstance(v, Private) for v in inputs if is_secret(v)):
            return self._run_private(index, inputs)
        if node.key in FLAT_ORDER and isinstance(inputs[0], SharedIds):
            return self._run_shared_ids(index, inputs)
        kernel = KERNELS.get(node.key)
        if kernel is None:
            raise KernelError(f"{node.describe()} has a secret input and no secure kernel")
        # Optional trailing inputs may be absent; kernels take them as None.
        while inputs and inputs[-1] is None:
            inputs.pop()
        return list(kernel(ctx, node, *inputs))

    def _run_shared_ids(self, index: int, inputs: list) -> list:
        """A reshape of ids an outside client shared (`kernels.SharedIds`): the same rows in the same
        order under a new public shape, found by running the op on zeros."""
        ids = inputs[0]
        plain = [np.zeros(ids.shape, dtype=np.int64)] + inputs[1:]
        (out,) = self._public_ops.run(index, plain)
        return [SharedIds(tuple(np.shape(out)), ids.sources)]

    def _run_private(self, index: int, inputs: list) -> list:
        """A data-movement op on the client's private value: its owner runs it in the clear.

        The other ranks run it on zeros of the same public shape to learn the output shape.
        """
        (owner,) = {v.owner for v in inputs if isinstance(v, Private)}
        mine = self.party.rank == owner
        plain = [
            (v.value if mine else np.zeros(v.shape, dtype=np.int64)) if isinstance(v, Private) else v for v in inputs
        ]
        outputs = self._public_ops.run(index, plain)
        return [Private(owner, tuple(np.shape(o)), o if mine else None) for o in outputs]
