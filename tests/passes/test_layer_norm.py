"""LayerNormalization and its opset-14 decomposition become puma.LayerNorm over the last axis."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, rewrite
from puma_onnx.runtime import approx

from .graphs import FLOAT, const, model, op_types, run, weight

X = [("x", FLOAT, [2, 3, 8])]
Y = [("y", FLOAT, [2, 3, 8])]
RNG = np.random.default_rng(0)
SCALE = RNG.standard_normal(8).astype(np.float32)
BIAS = RNG.standard_normal(8).astype(np.float32)
PARAMS = [weight("scale", SCALE), weight("bias", BIAS)]


def decomposed(axes=(-1,), opset=14, eps=1e-5):
    """ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add (axes as at opset 14)."""

    def mean(src, dst):
        if opset >= 18:
            return [
                const(dst + "_axes", list(axes), np.int64),
                helper.make_node("ReduceMean", [src, dst + "_axes"], [dst]),
            ]
        return [helper.make_node("ReduceMean", [src], [dst], axes=list(axes))]

    return [
        *mean("x", "mu"),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        const("two", 2.0),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        *mean("sq", "var"),
        const("eps", eps),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "scale"], ["ns"]),
        helper.make_node("Add", ["ns", "bias"], ["y"]),
    ]


def check_layer_norm(m, rule):
    out, report = rewrite(m)
    assert op_types(out) == ["puma.LayerNorm"] and report.matches[rule] == 1
    x = RNG.standard_normal((2, 3, 8)).astype(np.float32)
    want = approx.layer_norm(x, SCALE, BIAS, 1e-5)
    np.testing.assert_allclose(run(out, x=x)[0], want, rtol=1e-4, atol=1e-5)


def test_layer_normalization_op_becomes_puma_layer_norm():
    node = helper.make_node(
        "LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, epsilon=1e-5
    )
    check_layer_norm(model([node], X, Y, PARAMS), "layer_norm")


@pytest.mark.parametrize("opset", [14, 18])
def test_decomposed_layer_norm_becomes_puma_layer_norm(opset):
    check_layer_norm(
        model(decomposed(opset=opset), X, Y, PARAMS, opset=opset), "layer_norm_decomposed"
    )


def test_layer_norm_over_another_axis_is_left_and_reported():
    node = helper.make_node(
        "LayerNormalization", ["x", "scale", "bias"], ["y"], axis=1, epsilon=1e-5
    )
    params = [
        weight("scale", np.ones((3, 8), np.float32)),
        weight("bias", np.zeros((3, 8), np.float32)),
    ]
    with pytest.raises(UnsupportedSecretOps, match=r"\(LayerNormalization\)"):
        rewrite(model([node], X, Y, params))


def test_decomposition_reducing_another_axis_is_left_and_reported():
    with pytest.raises(UnsupportedSecretOps, match=r"\(Sqrt\)"):
        rewrite(model(decomposed(axes=(1,)), X, Y, PARAMS, opset=14))
