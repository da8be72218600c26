"""The facade: the report and its table, node names, rewrite_file, inputs left untouched."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from puma_onnx.passes import RewriteReport, rewrite, rewrite_file

from .graphs import FLOAT, model, weight


def small_mlp():
    """x @ w, then SiLU: one matched rule, a MatMul and a puma op on secret values."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["/mlp/h"], name="/mlp/MatMul"),
        helper.make_node("Sigmoid", ["/mlp/h"], ["/mlp/act/s"], name="/mlp/act/Sigmoid"),
        helper.make_node("Mul", ["/mlp/h", "/mlp/act/s"], ["/mlp/act/y"], name="/mlp/act/Mul"),
    ]
    w = weight("w", np.ones((4, 4), np.float32))
    return model(nodes, [("x", FLOAT, [2, 4])], [("/mlp/act/y", FLOAT, [2, 4])], [w])


def test_table_lists_matches_secret_ops_and_value_counts():
    _, report = rewrite(small_mlp())
    assert isinstance(report, RewriteReport)
    assert report.secret_ops == {"MatMul": 1, "puma.SiLU": 1}
    assert (report.n_public, report.n_secret) == (0, 4)
    table = report.table()
    assert "silu" in table and "puma.SiLU" in table and "0 public, 4 secret" in table


def test_puma_nodes_are_named_after_the_scope_they_replace():
    out, _ = rewrite(small_mlp())
    assert [n.name for n in out.graph.node if n.domain == "puma"] == ["/mlp/act/puma.SiLU"]


def test_rewrite_leaves_its_input_untouched():
    m = small_mlp()
    before = m.SerializeToString()
    rewrite(m)
    assert m.SerializeToString() == before


def test_rewrite_file_writes_the_rewritten_model(tmp_path):
    onnx.save(small_mlp(), tmp_path / "in.onnx")
    report = rewrite_file(tmp_path / "in.onnx", tmp_path / "out.onnx")
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert report.matches["silu"] == 1 and [f.name for f in out.functions] == ["SiLU"]
