"""The puma.* ONNX functions compute what runtime/approx.py defines, for both approximation sets,
at opsets 14 and 18."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper

from puma_onnx.passes import functions
from puma_onnx.runtime import approx

from .graphs import BOOL, FLOAT, INT64, run

RTOL = 1e-5  # float32 evaluation of the float64 reference
# Grids miss the breakpoints: there float32 rounding of the break may pick the other piece.
OFFSET = 0.00123


def call(op_type, inputs, opset, out_shape=None, fits=approx.REFIT, **attributes):
    """A model that is one call of puma.<op_type>, with its function (output shaped like x)."""
    graph = helper.make_graph(
        [helper.make_node(op_type, [n for n, _, _ in inputs], ["y"], domain="puma", **attributes)],
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("y", FLOAT, out_shape or inputs[0][2])],
    )
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("puma", 1)],
        functions=[functions.function(op_type, opset, fits)],
        ir_version=10,
    )
    onnx.checker.check_model(m, full_check=True)
    return m


OPSETS = pytest.mark.parametrize("opset", [14, 18])
SETS = pytest.mark.parametrize("fits", list(approx.SETS.values()), ids=list(approx.SETS))


@OPSETS
@SETS
def test_gelu_is_the_sets_piecewise_polynomial(opset, fits):
    x = (np.linspace(-6, 6, 2401) + OFFSET).astype(np.float32)
    (y,) = run(call("Gelu", [("x", FLOAT, [None])], opset, fits=fits), x=x)
    np.testing.assert_allclose(y, fits.gelu(x), rtol=RTOL, atol=1e-6)


@OPSETS
@SETS
def test_silu_is_the_sets_piecewise_polynomial(opset, fits):
    x = (np.linspace(-10, 10, 4001) + OFFSET).astype(np.float32)
    (y,) = run(call("SiLU", [("x", FLOAT, [None])], opset, fits=fits), x=x)
    np.testing.assert_allclose(y, fits.silu(x), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("op_type", ["Gelu", "SiLU"])
@SETS
def test_piecewise_function_exactly_at_its_breaks_takes_the_upper_piece(op_type, fits):
    """Less(x, break) in float32: x equal to the float32 break takes the upper piece, the float below it the
    lower one, as approx.Piecewise's half-open pieces with the breaks rounded to float32."""
    piecewise = fits.gelu if op_type == "Gelu" else fits.silu
    breaks = np.float32(piecewise.breaks)
    x = np.concatenate([breaks, np.nextafter(breaks, np.float32(-np.inf))])
    (y,) = run(call(op_type, [("x", FLOAT, [None])], 18, fits=fits), x=x)
    want = dataclasses.replace(piecewise, breaks=tuple(breaks.astype(np.float64)))(x)
    np.testing.assert_allclose(y, want, rtol=RTOL, atol=1e-6)


@OPSETS
@SETS
def test_softmax_uses_the_sets_exp_and_gives_masked_positions_zero_weight(opset, fits):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 6)) * 6).astype(np.float32)
    mask = rng.random((2, 1, 4, 6)) > 0.3
    mask[..., 0] = True
    m = call("Softmax", [("x", FLOAT, [2, 3, 4, 6]), ("mask", BOOL, [2, 1, 4, 6])], opset, fits=fits)
    (y,) = run(m, x=x, mask=mask)
    np.testing.assert_allclose(y, approx.softmax(x, mask, fits.exp), rtol=RTOL, atol=1e-6)
    assert np.all(y[np.broadcast_to(~mask, y.shape)] == 0)


def test_the_two_sets_give_different_functions():
    x = (np.linspace(-6, 6, 2401) + OFFSET).astype(np.float32)
    ours, puma = (run(call("Gelu", [("x", FLOAT, [None])], 18, fits=f), x=x)[0] for f in (approx.REFIT, approx.PUMA))
    assert np.abs(ours - puma).max() > 0.01


@OPSETS
def test_layer_norm_matches_reference_with_epsilon_by_reference(opset):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    scale, bias = (
        rng.standard_normal(8).astype(np.float32),
        rng.standard_normal(8).astype(np.float32),
    )
    inputs = [("x", FLOAT, [2, 5, 8]), ("scale", FLOAT, [8]), ("bias", FLOAT, [8])]
    for eps in (1e-5, 0.5):
        m = call("LayerNorm", inputs, opset, epsilon=eps, axis=-1)
        (y,) = run(m, x=x, scale=scale, bias=bias)
        np.testing.assert_allclose(y, approx.layer_norm(x, scale, bias, eps), rtol=1e-4, atol=1e-5)


@OPSETS
def test_rms_norm_matches_reference(opset):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    scale = rng.standard_normal(8).astype(np.float32)
    m = call("RMSNorm", [("x", FLOAT, [2, 5, 8]), ("scale", FLOAT, [8])], opset, epsilon=1e-6)
    (y,) = run(m, x=x, scale=scale)
    np.testing.assert_allclose(y, approx.rms_norm(x, scale, 1e-6), rtol=1e-4, atol=1e-5)


@OPSETS
def test_embedding_is_a_row_lookup(opset):
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids = np.array([[3, 0, 2]], dtype=np.int64)
    inputs = [("table", FLOAT, [4, 3]), ("ids", INT64, [1, 3])]
    m = call("Embedding", inputs, opset, out_shape=[1, 3, 3])
    (y,) = run(m, table=table, ids=ids)
    np.testing.assert_array_equal(y, table[ids])


def test_function_attributes_are_references_not_copies():
    body = functions.function("LayerNorm", 18)
    refs = {a.ref_attr_name for n in body.node for a in n.attribute if a.ref_attr_name}
    assert refs == {"epsilon", "axis"}
    assert list(body.attribute) == ["epsilon", "axis"]
