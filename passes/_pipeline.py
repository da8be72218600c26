"""The driver: run the rule families in order, attach the functions, check what is left."""

from __future__ import annotations

import collections
import dataclasses
import os
import warnings

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass
from onnxscript.rewriter import pattern

from puma_onnx.passes import (
    embedding,
    functions,
    gelu,
    layer_norm,
    position_ids,
    rms_norm,
    secrecy,
    silu,
    softmax,
)
from puma_onnx.passes._common import Levels
from puma_onnx.runtime import approx

# Position ids first, so that the lookups they feed are seen with public
# indices; the embedding rule then takes only lookups on secret ids.
_FAMILIES = (position_ids, embedding, layer_norm, rms_norm, gelu, silu, softmax)

# Above this many bytes of tensors a model is written with external data.
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclasses.dataclass
class RewriteReport:
    """What a rewrite did and what the secure executor will face."""

    matches: dict[str, int]
    secret_ops: collections.Counter
    n_public: int
    n_secret: int
    problems: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        width = max([len(k) for k in [*self.matches, *self.secret_ops]] + [24])
        lines = [f"{'rule':<{width}}  matches"]
        lines += [f"{name:<{width}}  {count:>7}" for name, count in self.matches.items()]
        lines += ["", f"{'op on secret values':<{width}}  nodes"]
        lines += [f"{op:<{width}}  {n:>7}" for op, n in sorted(self.secret_ops.items())]
        lines += ["", f"values: {self.n_public} public, {self.n_secret} secret"]
        if self.problems:
            lines += ["", f"{len(self.problems)} ops on secret data without a secure kernel:"]
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class UnsupportedSecretOps(ValueError):
    """Ops on secret data that the secure executor cannot run; `.report` has the rest."""

    def __init__(self, report: RewriteReport) -> None:
        self.report = report
        super().__init__(
            f"{len(report.problems)} ops on secret data have no secure kernel:\n  "
            + "\n  ".join(report.problems)
        )


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def survey(model: ir.Model, matches: dict[str, int]) -> RewriteReport:
    """The report for `model` as it stands: secrecy, ops on secret values, problems."""
    ShapeInferencePass(check_type=False, strict_mode=False)(model)
    graph = model.graph
    levels = secrecy.analyze_graph(graph)
    secret_ops = collections.Counter(
        _op_name(node)
        for node in graph
        if any(levels.get(v) == secrecy.SECRET for v in node.inputs if v is not None)
    )
    n_secret = sum(level == secrecy.SECRET for level in levels.values())
    return RewriteReport(
        matches=matches,
        secret_ops=secret_ops,
        n_public=len(levels) - n_secret,
        n_secret=n_secret,
        problems=secrecy.problems(graph, levels),
    )


def _attach_functions(model: ir.Model, fits: approx.ApproxSet) -> None:
    """One shared function per puma op used, built for the model's default opset from `fits`,
    whose name the model's metadata records."""
    opset = model.opset_imports.get("", model.graph.opset_imports.get(""))
    used = sorted({n.op_type for n in model.graph if n.domain == functions.DOMAIN})
    for op_type in used:
        function = ir.serde.deserialize_function(functions.function(op_type, opset, fits))
        model.functions[function.identifier()] = function
    if used:
        model.graph.opset_imports[functions.DOMAIN] = functions.VERSION
        model.metadata_props[functions.APPROX_KEY] = fits.name
        model.metadata_props[functions.APPROX_DIGEST_KEY] = fits.digest


def _name_puma_nodes(graph: ir.Graph) -> None:
    """Name each puma node after the scope of the nodes it replaced, for readable errors.

    "/encoder/layer.0/intermediate/intermediate_act_fn/Mul_1_output_0" gives
    "/encoder/layer.0/intermediate/intermediate_act_fn/puma.Gelu"; a graph output
    "token_embeddings" gives "token_embeddings/puma.LayerNorm".
    """
    taken = {node.name for node in graph}
    for node in graph:
        if node.domain != functions.DOMAIN:
            continue
        output = node.outputs[0].name
        scope = output.rpartition("/")[0] if "/" in output else output
        name = f"{scope}/{functions.DOMAIN}.{node.op_type}"
        while name in taken:
            name += "_"
        taken.add(name)
        node.name = name


def rewrite_ir(model: ir.Model, approx_set: str = approx.DEFAULT) -> RewriteReport:
    """Rewrite `model` in place with the approximation set `approx_set` (runtime.approx.SETS);
    raise UnsupportedSecretOps if secret ops lack a kernel."""
    fits = approx.lookup(approx_set)
    ShapeInferencePass(check_type=False, strict_mode=False)(model)
    levels = Levels()
    matches = {}
    for family in _FAMILIES:
        for rule in family.rules(levels):
            levels.refresh(model.graph)
            matches[rule.name] = pattern.RewriteRuleSet([rule], commute=True).apply_to_model(model)
    RemoveUnusedNodesPass()(model)
    _name_puma_nodes(model.graph)
    _attach_functions(model, fits)
    report = survey(model, matches)
    if report.problems:
        raise UnsupportedSecretOps(report)
    return report


def rewrite(model: onnx.ModelProto, approx_set: str = approx.DEFAULT) -> tuple[onnx.ModelProto, RewriteReport]:
    """The model with every secret nonlinearity replaced by a puma op (approximations `approx_set`),
    and the report.

    Raises UnsupportedSecretOps (a ValueError) naming the node and op type of every
    op left on secret data without a secure kernel, before anything runs.
    """
    ir_model = ir.serde.deserialize_model(model)
    report = rewrite_ir(ir_model, approx_set)
    return ir.serde.serialize_model(ir_model), report


def analyze(model: onnx.ModelProto) -> dict[str, str]:
    """Value name -> "public" or "secret" for every value of the main graph."""
    with warnings.catch_warnings():  # a synthetic weight's recipe keys (runtime/store.py) are not onnx's
        warnings.filterwarnings("ignore", message=r"Ignoring unknown external data key")
        levels = secrecy.analyze_graph(ir.serde.deserialize_model(model).graph)
    return {value.name: level for value, level in levels.items()}


def rewrite_file(
    in_path: str | os.PathLike, out_path: str | os.PathLike, approx_set: str = approx.DEFAULT,
    external_data: bool | None = None,
) -> RewriteReport:
    """Rewrite the ONNX file at in_path into out_path, with its weights in external data beside it
    (OUT.data) when `external_data`, or by default when they pass 1 GB."""
    model = ir.load(in_path)
    report = rewrite_ir(model, approx_set)
    if external_data is None:
        size = sum(t.const_value.nbytes for t in model.graph.initializers.values() if t.const_value)
        external_data = size > _EXTERNAL_DATA_BYTES
    ir.save(model, out_path, external_data=os.path.basename(out_path) + ".data" if external_data else None)
    return report
