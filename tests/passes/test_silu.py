"""x * Sigmoid(x) on secret data becomes puma.SiLU."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, rewrite
from puma_onnx.runtime import approx

from .graphs import FLOAT, model, op_types, run

XY = [("x", FLOAT, [16]), ("y", FLOAT, [16])]


@pytest.mark.parametrize("operands", [["x", "s"], ["s", "x"]])
def test_x_times_sigmoid_x_becomes_puma_silu(operands):
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", operands, ["out"])]
    out, report = rewrite(model(nodes, XY[:1], [("out", FLOAT, [16])]))
    assert op_types(out) == ["puma.SiLU"] and report.matches["silu"] == 1
    x = (np.linspace(-9, 9, 16) + 0.01).astype(np.float32)
    np.testing.assert_allclose(run(out, x=x)[0], approx.REFIT.silu(x), rtol=1e-5, atol=1e-6)


def test_sigmoid_times_another_value_is_left_and_reported():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["s"]),
        helper.make_node("Mul", ["y", "s"], ["out"]),
    ]
    with pytest.raises(UnsupportedSecretOps, match=r"\(Sigmoid\)"):
        rewrite(model(nodes, XY, [("out", FLOAT, [16])]))
