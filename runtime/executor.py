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

from . import approx
from .kernels import FLAT_ORDER, KERNELS, PRIVATE_LOCAL, Context, KernelError, Node, Private, SharedIds, is_secret
from .party import Party

# A decoder's key/value cache outputs (they stay secret: the next step reads them).
PRESENT_PREFIX = "present."
LAYER = re.compile(r"(?:^|/|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:/|\.|_|$)")


def layer_of(name: str) -> int | None:
    """The transformer layer a node belongs to, read from its exported name (/encoder/layer.3/...)."""
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def parse_nodes(graph: onnx.GraphProto) -> list[Node]:
    return [
        Node(
            name=n.name or f"{n.op_type}_{i}",
            op_type=n.op_type,
            domain=n.domain or "",
            inputs=list(n.input),
            outputs=list(n.output),
            attrs={a.name: onnx.helper.get_attribute_value(a) for a in n.attribute},
        )
        for i, n in enumerate(graph.node)
    ]


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

    def answers_stay_secret(self) -> None:
        """The outputs feed more MPC (generation's argmax), not an opening: every product is truncated
        in its node, as its consumer needs it (no `Unscaled` answers)."""
        self._final = [False] * len(self.nodes)

    def run(self, feeds: dict, on_node: Callable[[Node], None] | None = None) -> dict:
        """Walk the graph; returns the graph outputs (shares, private or public values)."""
        env = {**self.public, **self.weights, **feeds}
        ctx = Context(self.party, self.fits, self.plan)
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
        return {name: env[name] for name in self.output_names}

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
