"""Weights too large to keep: external data, synthetic weights, and weights streamed layer by layer."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from puma_onnx.export import export, prepare
from puma_onnx.plaintext import generate as plaintext_generation
from puma_onnx.runtime import session
from puma_onnx.runtime.executor import Executor, layer_of
from puma_onnx.runtime.generation import GenerateOptions, generate as secure_generate
from puma_onnx.runtime.party import Party
from puma_onnx.runtime.session import CLIENT, REWRITTEN_FILE, RunOptions, check_memory, memory_needs
from puma_onnx.runtime.store import TensorStore, generate, is_synthetic
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
    # Streamed weights arrive during the walk, too late for masks prepared in the setup (prepared.py):
    # the resident run leaves them out too, so both walks run the same protocol.
    monkeypatch.setattr(Executor, "prepare_products", lambda self, tokens, batch: None)
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


@pytest.mark.parametrize("damage", ["missing", "truncated", "outside the model's folder", "shape needs"])
def test_missing_or_truncated_external_data_is_one_line_before_any_share_moves(external, tmp_path, monkeypatch, damage):
    folder = tmp_path / "model"
    shutil.copytree(external, folder)
    data = folder / (REWRITTEN_FILE + ".data")
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:  # the graph itself names another file, or a length its tensor's shape does not have
        model = onnx.load(str(folder / REWRITTEN_FILE), load_external_data=False)
        tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        entry = next(e for e in tensor.external_data if e.key == ("location" if "outside" in damage else "length"))
        entry.value = "../../etc/passwd" if "outside" in damage else str(int(entry.value) - 4)
        onnx.save(model, str(folder / REWRITTEN_FILE))
        data = tensor.name
    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    opts = RunOptions(model=str(folder), input_ids=ids_file(tmp_path, IDS), progress=False)
    _, errors = run_threads([opts] * 3)
    assert all(isinstance(e, session.UserError) for e in errors), errors
    assert all(damage in str(e) and str(data) in str(e) and "\n" not in str(e) for e in errors), errors


def test_repeated_layers_are_wired_in_sequence(synthetic):
    """Each copy reads the previous layer's residual stream and its own cache; the final norm reads the last."""
    model = onnx.load(str(synthetic / REWRITTEN_FILE), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(layer_of(n.name))
    for k in range(4):
        norm = next(n for n in model.graph.node if n.name == f"/model/layers.{k}/input_layernorm/Cast")
        source = producer.get(norm.input[0])
        assert (layer_of(source.name) if source else None) == (k - 1 if k else None), (k, norm.input[0])
        # (the first cache's length also shapes the attention mask, outside the layers)
        assert readers[f"past_key_values.{k}.key"] - {None} == readers[f"past_key_values.{k}.value"] - {None} == {k}
        assert layer_of(producer[f"present.{k}.key"].name) == k
    final = next(n for n in model.graph.node if n.name.startswith("/model/norm/") and n.op_type == "Cast")
    assert layer_of(producer[final.input[0]].name) == 3
    assert len(model.graph.input) == 3 + 2 * 4 and len(model.graph.output) == 1 + 2 * 4
    names = [n.name for n in model.graph.node]
    assert not any("/layers.4/" in n for n in names)
    meta = __import__("json").loads((synthetic / "puma.json").read_text())
    assert len(meta["inputs"]) == 3 + 2 * 4 and meta["num_layers"] == 4
    # The copies and the nodes after them lose the built model's ranges (activations grow with depth).
    recorded = meta["ranges"]["nodes"]
    assert any("/layers.1/" in n for n in recorded) and not any(f"/layers.{k}/" in n for n in recorded for k in (2, 3))
    assert not any(n.startswith("/model/norm/") for n in recorded)


def test_synthetic_weights_match_onnxruntime_on_the_same_weights_written_out(synthetic, tmp_path):
    model = onnx.load(str(synthetic / REWRITTEN_FILE), load_external_data=False)
    fake = [t for t in model.graph.initializer if is_synthetic(t)]
    assert len(fake) == 1 + 7 * 4 + 1  # the embedding, 7 matrices a layer, the LM head
    values = [generate(t) for t in fake]
    assert len({float(v.reshape(-1)[0]) for v in values}) == len(fake)  # each copy draws its own weights
    np.testing.assert_array_equal(values[0], generate(fake[0]))  # the same values every time
    np.testing.assert_array_equal(values[0], values[0].astype(np.float16))  # float16 numbers: exact at half precision
    assert abs(float(np.std(values[1])) - 0.02) < 2e-3  # the built model's init (initializer_range 0.02)
    report = secure(synthetic, tmp_path, budget=0)
    assert report["weights"]["synthetic"] is True
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(IDS.shape[1])[None]}
    want = ort_outputs(synthetic / "materialized.onnx", feeds)["logits"][:, -1:]
    assert np.abs(report["outputs"]["logits"] - want).max() <= 2e-3
    materialize(synthetic / REWRITTEN_FILE, tmp_path / "half.onnx", half=True)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    half = ort.InferenceSession(str(tmp_path / "half.onnx"), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in half.get_inputs()}
    full = {**feeds, **{n: np.zeros((1, 2, 0, 32), np.float32) for n in wanted if n.startswith("past_key_values.")}}
    got = half.run(["logits"], {k: v for k, v in full.items() if k in wanted})[0][:, -1:]
    np.testing.assert_allclose(got, want, atol=1e-5)  # the same weights at half the bytes


def test_generation_with_streamed_synthetic_weights_follows_the_plaintext_loop(synthetic, tmp_path, monkeypatch):
    ids = np.array([[7, 21, 400, 5]])
    fixed_keys(monkeypatch)
    # Streamed weights arrive too late for prepared masks (prepared.py): the resident prompt goes without.
    monkeypatch.setattr(Executor, "prepare_products", lambda self, tokens, batch: None)
    reports = []
    for budget in (0, 1 << 40):
        opts = GenerateOptions(model=str(synthetic), input_ids=ids_file(tmp_path, ids), max_new_tokens=3,
                               progress=False, weight_budget=budget)
        results, errors = run_threads([opts] * 3, secure_generate)
        assert errors == [None] * 3, errors
        reports.append(results[CLIENT])
    streamed, resident = reports
    want, _ = plaintext_generation(synthetic / "materialized.onnx", ids, 3)
    assert streamed["outputs"]["new_ids"] == resident["outputs"]["new_ids"] == want
    assert streamed["weights"]["mode"] == "streamed" and streamed["resident_weights"] is False
    # Every step shares the weights again, outside its own row: the rows are the resident run's.
    assert streamed["weights"]["bytes_sent"] == 3 * resident["weights"]["bytes_sent"]
    assert [s["bytes"] for s in streamed["steps"]] == [s["bytes"] for s in resident["steps"]]

def test_the_memory_check_counts_the_ranks_that_share_a_host():
    manifest = [("a", [1 << 20, 64]), ("b", [1 << 20, 64]), ("c", [1 << 20, 64])]  # 3 x 64 Mi weights
    groups = [[0], [1], [2]]
    resident, streamed = memory_needs(manifest, groups, False), memory_needs(manifest, groups, True)
    assert resident[1] - streamed[1] == 8 * (1 << 26)  # streaming keeps two groups, not three
    assert streamed[0] - resident[0] == 8 * 2 * (1 << 26) - 4 * 3 * (1 << 26)  # the owner: encoded, 8 B a weight
    cached = memory_needs(manifest, groups, False, cached_bytes=24)
    assert [c - r for c, r in zip(cached, resident)] == [24 * 3 * (1 << 26)] * 3  # generation's caches
    one_host = [{"host": "h", "available": sum(resident) - 1}] * 3
    with pytest.raises(session.UserError, match="ranks 0, 1, 2 on h need about .* --weight-budget"):
        check_memory(one_host, resident, False)
    check_memory([{"host": f"h{r}", "available": sum(resident) - 1} for r in range(3)], resident, False)
    check_memory(one_host, streamed, True)
