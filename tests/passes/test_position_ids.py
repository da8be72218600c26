"""RoBERTa's position ids are computed from the public attention mask instead of the secret ids."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from puma_onnx.passes import analyze, rewrite

from .graphs import FLOAT, INT64, const, model, run, weight

PAD = 1
INPUTS = [("input_ids", INT64, ["batch", "seq"]), ("attention_mask", INT64, ["batch", "seq"])]


def roberta_embeddings():
    """Equal(ids, pad), Not, Cast, CumSum, Mul, Cast, Add pad, then the two lookups."""
    return [
        const("pad", PAD, np.int64),
        helper.make_node("Equal", ["input_ids", "pad"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["real"]),
        helper.make_node("Cast", ["real"], ["real_i"], to=TensorProto.INT32),
        const("axis", 1, np.int64),
        helper.make_node("CumSum", ["real_i", "axis"], ["cs"]),
        helper.make_node("Mul", ["cs", "real_i"], ["pos_i"]),
        helper.make_node("Cast", ["pos_i"], ["pos"], to=INT64),
        helper.make_node("Add", ["pos", "pad"], ["position_ids_"]),
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["positions", "position_ids_"], ["p"]),
        helper.make_node("Add", ["w", "p"], ["y"]),
    ]


def roberta_model():
    rng = np.random.default_rng(0)
    tables = [
        weight("words", rng.standard_normal((10, 4)).astype(np.float32)),
        weight("positions", rng.standard_normal((12, 4)).astype(np.float32)),
    ]
    return model(roberta_embeddings(), INPUTS, [("y", FLOAT, ["batch", "seq", 4])], tables)


def test_position_ids_become_public():
    m = roberta_model()
    assert analyze(m)["position_ids_"] == "secret"
    out, report = rewrite(m)
    assert report.matches["position_ids_from_mask"] == 1
    assert analyze(out)["position_ids_"] == "public"
    assert not {"Equal", "Not", "CumSum"} & {
        n.op_type for n in out.graph.node if "input_ids" in n.input
    }


def test_rewritten_position_ids_equal_the_original_when_the_mask_marks_the_pads():
    m = roberta_model()
    out, _ = rewrite(m)
    ids = np.array([[5, 7, 3, 2], [4, 9, PAD, PAD]], np.int64)
    mask = (ids != PAD).astype(np.int64)
    np.testing.assert_array_equal(
        run(out, input_ids=ids, attention_mask=mask)[0],
        run(m, input_ids=ids, attention_mask=mask)[0],
    )
