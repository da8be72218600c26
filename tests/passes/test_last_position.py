"""A decoder's LM head reads the last position only; other graphs stay as they are."""

from __future__ import annotations

import numpy as np
from onnx import helper

from puma_onnx.passes.last_position import last_position_logits, lm_head

from .graphs import FLOAT, model, run, weight

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def head(output="logits"):
    return model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], [output], name="lm_head")],
        [("x", FLOAT, [1, "S", 3])],
        [(output, FLOAT, [1, "S", 4])],
        [weight("w", W)],
    )


def test_the_logits_become_the_last_positions_row():
    x = np.random.default_rng(0).normal(size=(1, 5, 3)).astype(np.float32)
    full = run(head(), x=x)[0]
    sliced = last_position_logits(head())
    assert lm_head(sliced) is not None
    (last,) = run(sliced, x=x)
    assert last.shape == (1, 1, 4) and np.array_equal(last, full[:, -1:])
    assert sliced.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 1


def test_a_graph_without_a_logits_head_is_left_alone():
    other = head("last_hidden_state")
    assert lm_head(other) is None and last_position_logits(other) is other
