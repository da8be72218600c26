"""The owner's weight store on small hand-made models: external data read one weight at a time, its
entries checked, synthetic recipes (no export needed; the end-to-end runs are in test_streaming.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from puma_onnx.runtime.store import StoreError, TensorStore, generate, is_synthetic, synthetic_bound, synthetic_recipe
from puma_onnx.runtime.weights import layer_groups

WEIGHTS = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "v": np.float32([0.5, -2.0, 3.25])}


def saved(tmp_path) -> onnx.ModelProto:
    """A model whose two weights live in model.onnx.data, loaded without them."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v, k) for k, v in WEIGHTS.items()],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    return onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)


def test_external_weights_are_read_one_at_a_time_exactly(tmp_path):
    model = saved(tmp_path)
    assert all(not t.raw_data for t in model.graph.initializer)
    store = TensorStore(model, tmp_path)
    store.check()
    for name, value in WEIGHTS.items():
        np.testing.assert_array_equal(store.read(name), value)
        assert store.bound(name) == np.abs(value).max()
    assert numpy_helper.to_array(store.embedded("v")).tolist() == WEIGHTS["v"].tolist()


def _entry(model, name: str, key: str, value: str) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == name)
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)


@pytest.mark.parametrize(
    "key, value, says",
    [
        ("location", "../model.onnx.data", "outside the model's folder"),
        ("location", "/etc/passwd", "outside the model's folder"),
        ("location", "gone.data", "is missing"),
        ("offset", "-8", "shape needs"),
        ("offset", "eight", "not an integer"),
        ("length", "8", "shape needs"),
    ],
)
def test_bad_external_entries_are_one_line_naming_the_weight(tmp_path, key, value, says):
    model = saved(tmp_path)
    _entry(model, "w", key, value)
    with pytest.raises(StoreError, match=says) as caught:
        TensorStore(model, tmp_path).check()
    assert "'w'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_truncated_data_file_is_caught_before_reading(tmp_path):
    model = saved(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])  # the last weight loses its last value
    with pytest.raises(StoreError, match="truncated"):
        TensorStore(model, tmp_path).check()


def test_a_symbolic_link_inside_the_folder_may_point_elsewhere(tmp_path):
    model = saved(tmp_path)
    elsewhere = tmp_path / "blobs"
    elsewhere.mkdir()
    (tmp_path / "model.onnx.data").rename(elsewhere / "data")
    (tmp_path / "model.onnx.data").symlink_to(elsewhere / "data")  # a Hugging Face cache's layout
    store = TensorStore(model, tmp_path)
    store.check()
    np.testing.assert_array_equal(store.read("w"), WEIGHTS["w"])


def test_synthetic_weights_follow_their_recipe_the_same_every_time():
    values = np.random.default_rng(1).normal(0, 0.05, size=(64, 32)).astype(np.float32)
    tensor = numpy_helper.from_array(values, "layer.w")
    synthetic_recipe(tensor, 9, values)
    assert is_synthetic(tensor) and not tensor.raw_data and list(tensor.dims) == [64, 32]
    drawn = generate(tensor)
    np.testing.assert_array_equal(drawn, generate(tensor))
    np.testing.assert_array_equal(drawn, drawn.astype(np.float16).astype(np.float32))  # float16 numbers
    assert abs(float(drawn.std()) - float(values.std())) < 0.1 * float(values.std())
    assert np.abs(drawn).max() <= synthetic_bound(tensor)
    other = numpy_helper.from_array(values, "layer.w2")  # another name, other values
    synthetic_recipe(other, 9, values)
    assert not np.array_equal(generate(other), drawn)
    ones = numpy_helper.from_array(np.ones((4, 4), np.float32), "norm")
    synthetic_recipe(ones, 9, np.ones((4, 4), np.float32))
    np.testing.assert_array_equal(generate(ones), np.ones((4, 4), np.float32))


def test_a_synthetic_recipe_that_is_malformed_is_one_line(tmp_path):
    values = np.zeros((2, 2), np.float32) + np.float32([[1, -1], [-1, 1]])
    model = saved(tmp_path)
    tensor = next(t for t in model.graph.initializer if t.name == "w")
    synthetic_recipe(tensor, 3, values)
    _entry(model, "w", "puma_std", "wide")
    with pytest.raises(StoreError, match="malformed recipe"):
        TensorStore(model, tmp_path).check()


def test_layer_groups_follow_the_first_reader_and_share_unread_weights_first():
    manifest = [("emb", [4, 2]), ("w0", [2, 2]), ("b0", [2]), ("w1", [2, 2]), ("head", [2, 4]), ("output", [3])]
    first_use = {"emb": 0, "w0": 1, "b0": 2, "w1": 3, "head": 5}
    layers = [None, 0, 0, 1, None, None]
    groups, starts = layer_groups(manifest, first_use, lambda i: layers[i])
    assert sorted(groups[:2]) == [[0], [5]] and groups[2:] == [[1, 2], [3], [4]] and starts == [0, 0, 1, 3, 5]
