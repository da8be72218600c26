"""Weights too large to keep: external data, synthetic weights, and weights streamed layer by layer."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from puma_onnx.export import export, prepare
from puma_onnx.runtime import session
from puma_onnx.runtime.party import Party
from puma_onnx.runtime.session import CLIENT, REWRITTEN_FILE, RunOptions, check_memory, memory_needs
from puma_onnx.runtime.store import TensorStore, generate, is_synthetic
from puma_onnx.runtime.weights import layer_groups
from puma_onnx.synthetic import materialize
from tests.runtime.test_session import ids_file, run_threads
from tests.test_run_mpi import ort_outputs

IDS = np.array([[5, 17, 300, 4000, 12, 9]])


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """llama-tiny, 2 layers, its rewritten model's weights in model.puma.onnx.data."""
    out = tmp_path_factory.mktemp("external")
    export("llama-tiny", out, layers=2, warn=lambda msg: None)
    prepare(out, external_data=True, warn=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """llama-tiny with synthetic weights: 2 layers built, repeated to 4; and its weights materialized."""
    out = tmp_path_factory.mktemp("synthetic")
    export("llama-tiny", out, layers=4, seed=3, synthetic=True, warn=lambda msg: None)
    prepare(out, warn=lambda msg: None)
    materialize(out / REWRITTEN_FILE, out / "materialized.onnx")
    return out


def fixed_keys(monkeypatch):
    """Every run draws the same randomness: the parties take fixed keys instead of agreeing on fresh ones."""
    keys = {name: bytes([i]) * 16 for i, name in enumerate(["k0", "k1", "k2", "all", "own0", "own1", "own2"])}
    monkeypatch.setattr(session.Party, "setup", classmethod(lambda cls, comm, frac_bits=18, **k: Party.from_keys(comm, keys, frac_bits)))


def secure(folder, tmp_path, budget: int) -> dict:
    opts = RunOptions(model=str(folder), input_ids=ids_file(tmp_path, IDS), progress=False, weight_budget=budget)
    results, errors = run_threads([opts] * 3)
    assert errors == [None] * 3, errors
    return results[CLIENT]


def test_external_data_is_read_one_weight_at_a_time_and_runs(external, tmp_path):
    assert (external / (REWRITTEN_FILE + ".data")).stat().st_size > 10_000_000
    model = onnx.load(str(external / REWRITTEN_FILE), load_external_data=False)
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(big) >= 10 and all(not t.raw_data for t in big)  # the owner's graph carries no weights
    store = TensorStore(model, external)
    full = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(external / REWRITTEN_FILE)).graph.initializer}
    for t in big:
        np.testing.assert_array_equal(store.read(t.name), full[t.name])
    report = secure(external, tmp_path, budget=0)
    want = ort_outputs(external / REWRITTEN_FILE, {"input_ids": IDS, "attention_mask": np.ones_like(IDS),
                                                    "position_ids": np.arange(IDS.shape[1])[None]})["logits"][:, -1:]
    assert report["weights"]["mode"] == "streamed"
    assert np.abs(report["outputs"]["logits"] - want).max() <= 2e-3


def test_streamed_and_resident_weights_give_the_same_ring_values(external, tmp_path, monkeypatch):
    fixed_keys(monkeypatch)
    resident = secure(external, tmp_path, budget=1 << 40)
    streamed = secure(external, tmp_path, budget=0)
    assert resident["weights"]["mode"] == "resident" and streamed["weights"]["mode"] == "streamed"
    np.testing.assert_array_equal(resident["outputs"]["logits"], streamed["outputs"]["logits"])
    # The same online protocol; the weights cost the same bytes, in one round per layer group either way.
    assert resident["bytes_sent"] == streamed["bytes_sent"] and resident["rounds"] == streamed["rounds"]
    assert resident["weights"]["bytes_sent"] == streamed["weights"]["bytes_sent"] == 8 * resident["weights"]["count"]
    assert streamed["weights"]["rounds"] == resident["weights"]["rounds"] >= 2 + 2  # 2 layers, embedding, head
    # A deliberately different sharing (fresh keys) changes the ring values: the test can see a difference.
    monkeypatch.undo()
    assert not np.array_equal(secure(external, tmp_path, budget=0)["outputs"]["logits"], streamed["outputs"]["logits"])


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_external_data_is_one_line_before_any_share_moves(external, tmp_path, monkeypatch, damage):
    folder = tmp_path / "model"
    shutil.copytree(external, folder)
    data = folder / (REWRITTEN_FILE + ".data")
    if damage == "missing":
        data.unlink()
    else:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    opts = RunOptions(model=str(folder), input_ids=ids_file(tmp_path, IDS), progress=False)
    _, errors = run_threads([opts] * 3)
    assert all(isinstance(e, session.UserError) for e in errors), errors
    assert all(damage in str(e) and str(data) in str(e) for e in errors)


def test_synthetic_weights_match_onnxruntime_on_the_same_weights_written_out(synthetic, tmp_path):
    model = onnx.load(str(synthetic / REWRITTEN_FILE), load_external_data=False)
    names = [n.name for n in model.graph.node]
    assert any("/layers.3/" in n for n in names) and not any("/layers.4/" in n for n in names)
    assert {o.name for o in model.graph.output} >= {"present.3.key", "present.3.value"}
    fake = [t for t in model.graph.initializer if is_synthetic(t)]
    assert len(fake) == 1 + 7 * 4 + 1  # the embedding, 7 matrices a layer, the LM head
    values = [generate(t) for t in fake]
    assert len({float(v.reshape(-1)[0]) for v in values}) == len(fake)  # each copy draws its own weights
    np.testing.assert_array_equal(values[0], generate(fake[0]))  # the same values every time
    assert abs(float(np.std(values[1])) - 0.02) < 2e-3  # the built model's init (initializer_range 0.02)
    report = secure(synthetic, tmp_path, budget=0)
    assert report["weights"]["synthetic"] is True
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None]}
    want = ort_outputs(synthetic / "materialized.onnx", feeds)["logits"][:, -1:]
    assert np.abs(report["outputs"]["logits"] - want).max() <= 2e-3


def test_layer_groups_follow_the_first_reader_and_share_unread_weights_first():
    manifest = [("emb", [4, 2]), ("w0", [2, 2]), ("b0", [2]), ("w1", [2, 2]), ("head", [2, 4]), ("output", [3])]
    first_use = {"emb": 0, "w0": 1, "b0": 2, "w1": 3, "head": 5}
    layers = [None, 0, 0, 1, None, None]
    groups, starts = layer_groups(manifest, first_use, lambda i: layers[i])
    assert sorted(groups[:2]) == [[0], [5]] and groups[2:] == [[1, 2], [3], [4]] and starts == [0, 0, 1, 3, 5]


def test_the_memory_check_counts_the_ranks_that_share_a_host():
    manifest = [("a", [1 << 20, 64]), ("b", [1 << 20, 64])]  # 2 x 64 Mi weights: rank 1 keeps 1 GiB
    groups = [[0], [1]]
    resident, streamed = memory_needs(manifest, groups, False), memory_needs(manifest, groups, True)
    assert resident[1] - streamed[1] == 8 * (1 << 26)  # streaming keeps one group, not both
    one_host = [{"host": "h", "available": sum(resident) - 1}] * 3
    with pytest.raises(session.UserError, match="ranks 0, 1, 2 on h need about .* --weight-budget"):
        check_memory(one_host, resident, False)
    check_memory([{"host": f"h{r}", "available": sum(resident) - 1} for r in range(3)], resident, False)
    check_memory(one_host, streamed, True)
