"""Lookups of secret ids in a weight table become puma.Embedding; other Gathers stay."""

from __future__ import annotations

import numpy as np
from onnx import helper

from puma_onnx.passes import rewrite

from .graphs import FLOAT, INT64, const, model, op_types, run, weight

TABLE = weight("table", np.arange(40, dtype=np.float32).reshape(10, 4))
OUT = [("rows", FLOAT, [1, 3, 4])]


def test_lookup_of_secret_ids_becomes_puma_embedding():
    node = helper.make_node("Gather", ["table", "input_ids"], ["rows"])
    out, report = rewrite(model([node], [("input_ids", INT64, [1, 3])], OUT, [TABLE]))
    assert op_types(out) == ["puma.Embedding"] and report.matches["embedding"] == 1
    ids = np.array([[9, 0, 4]], np.int64)
    np.testing.assert_array_equal(run(out, input_ids=ids)[0], np.arange(40).reshape(10, 4)[ids])


def test_lookup_of_public_position_ids_stays_a_gather():
    node = helper.make_node("Gather", ["table", "position_ids"], ["rows"])
    out, report = rewrite(model([node], [("position_ids", INT64, [1, 3])], OUT, [TABLE]))
    assert op_types(out) == ["Gather"] and report.matches["embedding"] == 0


def test_gathers_on_shapes_stay():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        const("one", 1, np.int64),
        helper.make_node("Gather", ["shape", "one"], ["n"]),
    ]
    out, report = rewrite(model(nodes, [("x", FLOAT, [2, 5])], [("n", INT64, [])]))
    assert "Gather" in op_types(out) and report.matches["embedding"] == 0
