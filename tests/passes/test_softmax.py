"""Attention softmax with its additive mask becomes puma.Softmax(x, public bool mask)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, analyze, rewrite
from puma_onnx.passes.secrecy import ENCODABLE_LIMIT
from puma_onnx.runtime import approx

from .graphs import BOOL, FLOAT, INT64, const, model, op_types, run

SHAPE = [2, 2, 4, 4]
SCORES = [("x", FLOAT, SHAPE)]
Y = [("y", FLOAT, SHAPE)]
MASK_IN = [("attention_mask", INT64, [2, 4])]


def where_mask(low):
    """GPT-2/LLaMA: Where(keep, 0, low) from the public attention mask, broadcast as [b,1,1,s]."""
    return [
        const("axes", [1, 2], np.int64),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["keep"], to=BOOL),
        const("zero", 0.0),
        const("low", low),
        helper.make_node("Where", ["keep", "zero", "low"], ["bias"]),
    ]


def bert_mask():
    """BERT: (1 - mask) then Where(Cast(1 - mask, bool), -3.4e38, 1 - mask)."""
    return [
        const("axes", [1, 2], np.int64),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["mf"], to=FLOAT),
        const("one", 1.0),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Cast", ["inv"], ["masked"], to=BOOL),
        const("low", -3.4028234663852886e38),
        helper.make_node("Where", ["masked", "low", "inv"], ["bias"]),
    ]


def masked_softmax(mask_nodes, guard=False):
    nodes = [*mask_nodes, helper.make_node("Add", ["x", "bias"], ["s_in"])]
    if not guard:
        return [*nodes, helper.make_node("Softmax", ["s_in"], ["y"], axis=-1)]
    return [
        *nodes,
        helper.make_node("Softmax", ["s_in"], ["s"], axis=-1),
        helper.make_node("IsNaN", ["s"], ["nan"]),
        const("z", 0.0),
        helper.make_node("Where", ["nan", "z", "s"], ["y"]),
    ]


def feeds():
    rng = np.random.default_rng(0)
    mask = np.ones((2, 4), np.int64)
    mask[1, 2:] = 0
    return {"x": (rng.standard_normal(SHAPE) * 4).astype(np.float32), "attention_mask": mask}


def constants_feeding_secret_ops(m: onnx.ModelProto) -> list[float]:
    """Every float constant that a node with a secret input reads."""
    levels = analyze(m)
    values = {
        n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
        for n in m.graph.node
        if n.op_type == "Constant"
    }
    found = []
    for node in m.graph.node:
        if any(levels.get(i) == "secret" for i in node.input):
            found += [
                float(np.max(np.abs(values[i])))
                for i in node.input
                if i in values and values[i].dtype.kind == "f"
            ]
    return found


@pytest.mark.parametrize("guard", [False, True])
def test_where_mask_becomes_the_bool_mask_itself(guard):
    m = model(masked_softmax(where_mask(float("-inf")), guard), SCORES + MASK_IN, Y)
    out, report = rewrite(m)
    assert op_types(out).count("puma.Softmax") == 1
    assert not {"Softmax", "IsNaN", "Add"} & set(op_types(out))
    f = feeds()
    keep = f["attention_mask"].astype(bool)[:, None, None, :]
    np.testing.assert_allclose(run(out, **f)[0], approx.softmax(f["x"], keep), rtol=1e-5, atol=1e-7)
    assert report.matches["softmax_masked_guarded" if guard else "softmax_masked"] == 1


def test_bert_mask_becomes_the_negated_condition_without_a_bias():
    m = model(masked_softmax(bert_mask()), SCORES + MASK_IN, Y)
    out, _ = rewrite(m)
    assert "Add" not in op_types(out)
    f = feeds()
    keep = f["attention_mask"].astype(bool)[:, None, None, :]
    want = approx.softmax(f["x"], keep)
    np.testing.assert_allclose(run(out, **f)[0], want, rtol=1e-5, atol=1e-7)
    assert max(constants_feeding_secret_ops(out), default=0.0) < ENCODABLE_LIMIT


def other_bias():
    """Where(c, -3.4e38, b) with a finite public bias b that is not 0 at kept positions."""
    return [
        const("axes", [1, 2], np.int64),
        helper.make_node("Unsqueeze", ["attention_mask", "axes"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["masked"], to=BOOL),
        helper.make_node("Not", ["masked"], ["masked_"]),
        helper.make_node("Cast", ["m4"], ["mf"], to=FLOAT),
        const("quarter", 0.25),
        helper.make_node("Mul", ["mf", "quarter"], ["finite"]),
        const("low", -3.4028234663852886e38),
        helper.make_node("Where", ["masked_", "low", "finite"], ["bias"]),
    ]


def test_finite_public_bias_is_still_added_to_the_scores():
    out, _ = rewrite(model(masked_softmax(other_bias()), SCORES + MASK_IN, Y))
    assert "Add" in op_types(out)
    f = feeds()
    keep = f["attention_mask"].astype(bool)[:, None, None, :]
    want = approx.softmax(f["x"] + 0.25 * keep, keep)
    np.testing.assert_allclose(run(out, **f)[0], want, rtol=1e-5, atol=1e-7)
    assert max(constants_feeding_secret_ops(out), default=0.0) < ENCODABLE_LIMIT


def test_masked_positions_weigh_exactly_zero():
    out, _ = rewrite(model(masked_softmax(bert_mask()), SCORES + MASK_IN, Y))
    f = feeds()
    assert np.all(run(out, **f)[0][1, :, :, 2:] == 0.0)


def test_softmax_without_mask_keeps_every_position():
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], SCORES, Y)
    out, report = rewrite(m)
    assert report.matches["softmax"] == 1
    x = feeds()["x"]
    np.testing.assert_allclose(run(out, x=x)[0], approx.softmax(x), rtol=1e-5, atol=1e-7)


def test_softmax_over_another_axis_is_left_and_reported():
    m = model([helper.make_node("Softmax", ["x"], ["y"], axis=1)], SCORES, Y)
    with pytest.raises(UnsupportedSecretOps, match=r"\(Softmax\)"):
        rewrite(m)


def test_secret_additive_mask_is_not_folded():
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["s_in"]),
        helper.make_node("Softmax", ["s_in"], ["y"], axis=-1),
    ]
    out, report = rewrite(model(nodes, SCORES + [("bias", FLOAT, SHAPE)], Y))
    assert report.matches["softmax_masked"] == 0 and report.matches["softmax"] == 1
    assert "Add" in op_types(out)
