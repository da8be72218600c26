"""LLaMA's RMSNorm, and the L2 normalisation of sentence-transformers, become puma.RMSNorm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, rewrite
from puma_onnx.runtime import approx

from .graphs import FLOAT, const, model, op_types, run, weight

X = [("x", FLOAT, [2, 3, 8])]
Y = [("y", FLOAT, [2, 3, 8])]
SCALE = np.linspace(0.5, 1.5, 8, dtype=np.float32)


def llama_rms_norm(cast=True, mean_axes=(-1,), eps=1e-6):
    """Pow 2, ReduceMean, Add eps, Sqrt, Div(1, .), Mul x, [Cast], Mul by the weight first."""
    nodes = [
        const("two", 2.0),
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        const("axes", list(mean_axes), np.int64),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        const("eps", eps),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        const("one", 1.0),
        helper.make_node("Div", ["one", "rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["n"]),
    ]
    if cast:
        nodes.append(helper.make_node("Cast", ["n"], ["nc"], to=FLOAT))
    return [*nodes, helper.make_node("Mul", ["scale", "nc" if cast else "n"], ["y"])]


@pytest.mark.parametrize("cast", [True, False])
def test_llama_rms_norm_becomes_puma_rms_norm(cast):
    out, report = rewrite(model(llama_rms_norm(cast), X, Y, [weight("scale", SCALE)]))
    assert op_types(out) == ["puma.RMSNorm"]
    assert report.matches["rms_norm_cast" if cast else "rms_norm"] == 1
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    np.testing.assert_allclose(
        run(out, x=x)[0], approx.rms_norm(x, SCALE, 1e-6), rtol=1e-5, atol=1e-6
    )


def test_rms_norm_over_another_axis_is_left_and_reported():
    m = model(llama_rms_norm(mean_axes=(1,)), X, Y, [weight("scale", SCALE)])
    with pytest.raises(UnsupportedSecretOps, match=r"\(Pow\)"):
        rewrite(m)


def l2_normalize():
    """sentence-transformers' Normalize: x / Expand(Clip(ReduceL2(x), eps), Shape(x))."""
    return [
        const("axes", [1], np.int64),
        helper.make_node("ReduceL2", ["x", "axes"], ["norm"], keepdims=1),
        const("eps", 1e-12),
        helper.make_node("Clip", ["norm", "eps", ""], ["clipped"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Expand", ["clipped", "shape"], ["den"]),
        helper.make_node("Div", ["x", "den"], ["y"]),
    ]


def test_l2_normalisation_becomes_rms_norm_with_scale_one_over_root_n():
    out, report = rewrite(model(l2_normalize(), [("x", FLOAT, [2, 8])], [("y", FLOAT, [2, 8])]))
    assert [t for t in op_types(out) if t != "Constant"] == ["puma.RMSNorm"]
    assert report.matches["l2_normalize"] == 1
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    want = x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(run(out, x=x)[0], want, rtol=1e-5, atol=1e-6)
