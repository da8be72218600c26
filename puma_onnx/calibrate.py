"""Activation ranges of a rewritten model on calibration inputs, recorded at export.

`puma-onnx export` runs the rewritten model in onnxruntime on a few texts (the
shipped `models/texts/calibration.txt`, or `--calibration FILE` with one text
per line; random token ids when the model has no tokenizer) and records, per
node, what each secure kernel's domain depends on:

  puma.Gelu, puma.SiLU, puma.Softmax   x_max: the largest |x| of the data input
  puma.LayerNorm, puma.RMSNorm         x_max, and var_min / var_max over rows
                                       (variance; RMSNorm: the mean square)
  MatMul, Gemm, Mul of two activations y_max: the largest |output|

They go into puma.json under "ranges". `puma_onnx.runtime.ranges` checks each
kernel's domain against them, with a margin, before any share moves. The
ranges describe the model on ordinary inputs, not any user's input: they are
public model metadata that the owner publishes with the model.

onnxruntime's own calibrators (onnxruntime.quantization) collect per-tensor
min/max, but a norm's domain is a per-row statistic (the variance), so the
graph's tensors are read here directly: one augmented session, the same run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from puma_onnx.runtime.session import model_feeds, past_inputs

# Without a tokenizer: random ids of these lengths (seeded).
RANDOM_LENGTHS = (8, 32, 128)

_INPUT_STATS = {"Gelu", "SiLU", "Softmax"}
_NORMS = {"LayerNorm", "RMSNorm"}
_PRODUCTS = {"MatMul", "Gemm", "Mul"}


def shipped_texts() -> Path:
    """The shipped calibration texts (also installed as package data)."""
    from puma_onnx import models

    return Path(models.__file__).parent / "texts" / "calibration.txt"


def read_texts(path: str | Path) -> list[str]:
    """One text per non-empty line."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {str(path)!r} holds no text")
    return texts


def calibration_ids(
    texts: list[str] | None, tokenizer_json: str | None, vocab: int, max_len: int | None
) -> list[np.ndarray]:
    """Token ids (1, S) per input: the texts through the tokenizer, or seeded random ids."""
    if tokenizer_json is None or texts is None:
        rng = np.random.default_rng(0)
        lengths = [n for n in RANDOM_LENGTHS if max_len is None or n <= max_len] or [max_len]
        return [rng.integers(0, vocab, size=(1, n), dtype=np.int64) for n in lengths]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    out = []
    for text in texts:
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        out.append(ids[:, :max_len] if max_len else ids)
    return out


def _watched(model: onnx.ModelProto) -> list[tuple[str, onnx.NodeProto]]:
    """The nodes whose ranges are recorded: puma ops, and products of two non-constant values."""
    constant = {t.name for t in model.graph.initializer}
    constant |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    watched = []
    for index, node in enumerate(model.graph.node):
        if node.domain == "puma" and node.op_type in _INPUT_STATS | _NORMS:
            watched.append((node_name(node, index), node))
        elif node.domain in ("", "ai.onnx") and node.op_type in _PRODUCTS:
            if node.op_type != "Mul" or not any(i in constant for i in node.input[:2]):
                watched.append((node_name(node, index), node))
    return watched


def node_name(node: onnx.NodeProto, index: int) -> str:
    """The name the executor gives a node (its own, or op type and position)."""
    return node.name or f"{node.op_type}_{index}"


def record_ranges(model_path: str | Path, inputs: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Per node name, the statistics of the module docstring over all inputs (plain floats)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)  # external weights stay in their file
    watched = _watched(model)
    wanted = [node.output[0] if node.op_type in _PRODUCTS else node.input[0] for _, node in watched]
    known = {o.name for o in model.graph.output}
    for name in dict.fromkeys(wanted):
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    # Saved beside the model, so that its external data (if any) is found where the model says.
    with tempfile.NamedTemporaryFile(dir=model_path.parent, prefix=".calibration.", suffix=".onnx") as f:
        onnx.save(model, f.name)
        session = ort.InferenceSession(f.name, providers=["CPUExecutionProvider"])
    del model
    names = [i.name for i in session.get_inputs()]
    past = past_inputs((i.name, i.shape) for i in session.get_inputs())
    outputs = [o.name for o in session.get_outputs()]
    ranges: dict[str, dict[str, float]] = {}
    for ids in inputs:
        values = dict(zip(outputs, session.run(None, model_feeds(names, ids, past=past))))
        for (name, node), tensor in zip(watched, wanted):
            _update(ranges.setdefault(name, {}), node, values[tensor].astype(np.float64))
    return ranges


def _update(stats: dict, node: onnx.NodeProto, x: np.ndarray) -> None:
    key = "y_max" if node.op_type in _PRODUCTS else "x_max"
    stats[key] = max(stats.get(key, 0.0), float(np.abs(x).max(initial=0.0)))
    if node.op_type in _NORMS:
        var = x.var(axis=-1) if node.op_type == "LayerNorm" else (x * x).mean(axis=-1)
        stats["var_min"] = min(stats.get("var_min", np.inf), float(var.min()))
        stats["var_max"] = max(stats.get("var_max", 0.0), float(var.max()))
