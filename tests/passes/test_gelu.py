"""GeLU forms on secret data become puma.Gelu; anything else is left alone."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, rewrite
from puma_onnx.runtime import approx

from .graphs import FLOAT, INT64, const, model, op_types, run

X = [("x", FLOAT, [2, 8])]
Y = [("y", FLOAT, [2, 8])]


def erf_gelu(order="half_last", root2=1.4142135, swap=False):
    nodes = [
        const("root2", root2),
        const("one", 1.0),
        const("half", 0.5),
        helper.make_node("Div", ["x", "root2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
    ]
    if order == "half_last":
        nodes += [
            helper.make_node("Mul", ["a", "x"] if swap else ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ]
    else:
        nodes += [
            helper.make_node("Mul", ["x", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["y"]),
        ]
    return nodes


def tanh_gelu():
    """GPT-2's order as Optimum exports it."""
    return [
        const("half", 0.5),
        const("three", 3.0),
        const("cubic", 0.044715),
        const("scale", 0.7978845834732056),
        const("one", 1.0),
        helper.make_node("Mul", ["x", "half"], ["h"]),
        helper.make_node("Pow", ["x", "three"], ["p"]),
        helper.make_node("Mul", ["p", "cubic"], ["c"]),
        helper.make_node("Add", ["x", "c"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["t_in"]),
        helper.make_node("Tanh", ["t_in"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["a"]),
        helper.make_node("Mul", ["h", "a"], ["y"]),
    ]


def assert_puma_gelu(m):
    out, report = rewrite(m)
    assert op_types(out) == ["puma.Gelu"]
    x = np.linspace(-5, 5, 16, dtype=np.float32).reshape(2, 8) + 0.01
    np.testing.assert_allclose(run(out, x=x)[0], approx.REFIT.gelu(x), rtol=1e-5, atol=1e-6)
    return report


@pytest.mark.parametrize("swap", [False, True])
def test_erf_gelu_becomes_puma_gelu(swap):
    report = assert_puma_gelu(model(erf_gelu(swap=swap), X, Y))
    assert report.matches["gelu_erf"] == 1


def test_erf_gelu_with_half_applied_first_becomes_puma_gelu():
    report = assert_puma_gelu(model(erf_gelu(order="half_first"), X, Y))
    assert report.matches["gelu_erf_half_first"] == 1


def test_gpt2_tanh_gelu_becomes_puma_gelu():
    report = assert_puma_gelu(model(tanh_gelu(), X, Y))
    assert report.matches["gelu_tanh"] == 1


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_opset20_gelu_op_becomes_puma_gelu(approximate):
    node = helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)
    report = assert_puma_gelu(model([node], X, Y, opset=20))
    assert report.matches["gelu_op"] == 1


def test_gelu_on_public_values_stays_exact():
    nodes = [helper.make_node("Cast", ["attention_mask"], ["x"], to=FLOAT), *erf_gelu()]
    out, report = rewrite(model(nodes, [("attention_mask", INT64, [2, 8])], Y))
    assert "Erf" in op_types(out) and "puma.Gelu" not in op_types(out)
    assert sum(report.matches.values()) == 0


def test_erf_form_with_another_constant_is_left_and_reported():
    m = model(erf_gelu(root2=2.0), X, Y)
    with pytest.raises(UnsupportedSecretOps, match=r"\(Erf\)"):
        rewrite(m)
