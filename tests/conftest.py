"""Shared fixtures: registry models exported once per test session."""

from __future__ import annotations

import pytest

TEST_LAYERS = 2


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name) -> folder with model.onnx of registry model `name` at 2 layers (cached)."""
    from puma_onnx.export import export

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            export(name, out, layers=TEST_LAYERS, warn=lambda msg: None)
            cache[name] = out
        return cache[name]

    return get


@pytest.fixture
def unsupported_model(tmp_path):
    """An ONNX file whose secret embedding output goes through Exp, which has no secure kernel."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    table = onnx.numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="embed"),
            helper.make_node("Exp", ["emb"], ["out"], name="bad_exp"),
        ],
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "S"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "S", 3])],
        [table],
    )
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path
