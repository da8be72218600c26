"""`puma-onnx export`: every registry model exports and onnxruntime matches PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from puma_onnx.models import REGISTRY
from puma_onnx.runtime.session import past_inputs

from .conftest import TEST_LAYERS

CLI = [sys.executable, "-m", "puma_onnx"]
SEQ = 16


def feeds_for(session, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, a mask with padding at the end of the second row, matching position ids."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, SEQ), dtype=np.int64)
    mask[1, SEQ - 5 :] = 0
    values = {
        "input_ids": rng.integers(3, vocab_size, size=(2, SEQ), dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((2, SEQ), dtype=np.int64),
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None),
    }
    for name, (heads, dim) in past_inputs((i.name, i.shape) for i in session.get_inputs()).items():
        values[name] = np.zeros((2, heads, 0, dim), np.float32)  # a decoder's empty cache
    return {i.name: values[i.name] for i in session.get_inputs()}


# The real models are checked against their own reference in their tests (minilm below, smollm2 in test_smollm2).
# llama-7b is too large for the suite (tests/passes/test_registry_rewrite.py).
@pytest.mark.parametrize("name", sorted(set(REGISTRY) - {"minilm", "smollm2", "llama-7b"}))
def test_registry_model_matches_pytorch(exported, name):
    import onnxruntime as ort
    import torch

    from puma_onnx.export import build_torch_model

    folder = exported(name)
    meta = json.loads((folder / "puma.json").read_text())
    assert meta["random_weights"] is True
    assert meta["num_layers"] == TEST_LAYERS
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = feeds_for(session, meta["vocab_size"])
    onnx_out = session.run(None, feeds)[0]

    model = build_torch_model(name, layers=TEST_LAYERS)
    with torch.no_grad():
        torch_out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    assert onnx_out.shape == torch_out.shape
    assert np.abs(onnx_out - torch_out).max() <= 1e-4


def test_minilm_sentence_embedding_matches_sentence_transformers(exported):
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    folder = exported("minilm")
    meta = json.loads((folder / "puma.json").read_text())
    assert meta["random_weights"] is False and meta["tokenizer"] is True
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Secure inference keeps the prompt and the weights private.",
        "A sentence embedding maps text to a vector.",
    ]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = SentenceTransformer(str(REGISTRY["minilm"].local_dir()), device="cpu")
    reference[0].auto_model.encoder.layer = reference[0].auto_model.encoder.layer[:TEST_LAYERS]
    expected = reference.encode(sentences, convert_to_numpy=True)
    for sentence, want in zip(sentences, expected):
        encoding = tokenizer.encode(sentence)  # padded to 128 as the model's tokenizer.json asks
        feeds = {
            "input_ids": np.array([encoding.ids], dtype=np.int64),
            "attention_mask": np.array([encoding.attention_mask], dtype=np.int64),
        }
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        assert np.abs(outputs["sentence_embedding"][0] - want).max() <= 1e-4


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_unknown_model_lists_known_names(tmp_path):
    result = run_cli("export", "no-such-model", "-o", str(tmp_path / "x"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0]
    assert all(name in lines[0] for name in REGISTRY)


def test_missing_folder_is_one_line_error(tmp_path):
    result = run_cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "x"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"puma-onnx: error: model folder {str(tmp_path / 'missing')!r} does not exist"
    ]


def test_unreadable_folder_is_one_line_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    result = run_cli("export", str(folder), "-o", str(tmp_path / "x"))
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot read" in result.stderr


def test_failed_export_is_one_line_error(tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    result = run_cli("export", str(folder), "-o", str(tmp_path / "x"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("puma-onnx: error: export of 'weird' failed")


def test_random_weights_are_announced_on_stderr(tmp_path):
    result = run_cli("export", "llama-tiny", "-o", str(tmp_path / "l"), "--layers", "1")
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stderr
    meta = json.loads((tmp_path / "l" / "puma.json").read_text())
    assert meta["random_weights"] is True and meta["num_layers"] == 1
    # A decoder exports with its key/value cache, for generate.
    assert [i["name"] for i in meta["inputs"]] == [
        "input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"
    ]
    assert meta["task"] == "text-generation-with-past" and meta["eos_token_id"] == 2
    # No tokenizer: the ranges come from random ids; the default approximations are the refit ones.
    assert meta["approx"] == "refit" and meta["ranges"]["source"].startswith("random token ids")
    assert (tmp_path / "l" / "model.puma.onnx").exists()


@pytest.mark.parametrize("name, task", [("bert-base", "feature-extraction"), ("llama-tiny", "text-generation-with-past")])
def test_local_folder_exports_with_its_weights(tmp_path, name, task):
    """A local folder exports with its own weights; a decoder's with its key/value cache, for generate."""
    from puma_onnx.export import build_torch_model

    model = build_torch_model(name, layers=1)
    folder = tmp_path / f"my-{name}"
    model.save_pretrained(folder)
    result = run_cli("export", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "puma.json").read_text())
    assert meta["random_weights"] is False and meta["task"] == task
    assert "RANDOM" not in result.stderr
    past = [i["name"] for i in meta["inputs"] if i["name"].startswith("past_key_values.")]
    assert past == ([] if task == "feature-extraction" else ["past_key_values.0.key", "past_key_values.0.value"])


def test_help_describes_every_option():
    result = run_cli("export", "--help")
    assert result.returncode == 0
    for option in ("--output", "--opset", "--layers", "--seed", "--approx", "--calibration"):
        assert option in result.stdout


def prepared_copy(exported, tmp_path, name="bert-base", **options):
    import shutil

    from puma_onnx.export import prepare

    folder = tmp_path / name
    shutil.copytree(exported(name), folder)
    report, inputs = prepare(folder, warn=lambda msg: None, **options)
    return folder, json.loads((folder / "puma.json").read_text()), inputs


def test_export_records_a_range_for_every_secure_nonlinear_op(exported, tmp_path):
    import onnx

    folder, meta, inputs = prepared_copy(exported, tmp_path)
    ranges = meta["ranges"]
    assert ranges["source"] == "shipped texts" and ranges["inputs"] == inputs == 8
    model = onnx.load(str(folder / "model.puma.onnx"), load_external_data=False)
    puma_nodes = [n for n in model.graph.node if n.domain == "puma" and n.op_type != "Embedding"]
    assert {n.op_type for n in puma_nodes} == {"Gelu", "Softmax", "LayerNorm"}
    for node in puma_nodes:
        seen = ranges["nodes"][node.name]
        assert seen["x_max"] > 0
        if node.op_type == "LayerNorm":
            assert 0 < seen["var_min"] <= seen["var_max"] <= seen["x_max"] ** 2
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert all(ranges["nodes"][name]["y_max"] > 0 for name in matmuls)


def test_export_calibrates_on_a_given_file_with_the_chosen_approximations(exported, tmp_path):
    import onnx

    from puma_onnx.passes.functions import APPROX_KEY

    texts = tmp_path / "texts.txt"
    texts.write_text("First calibration sentence.\n\nA second one, a little longer than the first.\n")
    folder, meta, inputs = prepared_copy(exported, tmp_path, calibration=texts, approx_set="puma")
    assert inputs == 2 and meta["ranges"]["source"] == str(texts) and meta["approx"] == "puma"
    model = onnx.load(str(folder / "model.puma.onnx"), load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}[APPROX_KEY] == "puma"


def test_unreadable_calibration_file_is_one_line_error_before_the_export(tmp_path):
    result = run_cli("export", "bert-base", "-o", str(tmp_path / "x"), "--calibration", str(tmp_path / "none.txt"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read --calibration" in lines[0]
    assert not (tmp_path / "x").exists()


def test_max_positions_is_the_longest_input_the_graph_takes(exported):
    """RoBERTa numbers positions from padding_idx + 1: its 514-row table takes 512 tokens."""
    import onnxruntime as ort

    folder = exported("roberta-base")
    limit = json.loads((folder / "puma.json").read_text())["max_positions"]
    assert limit == 512
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    def feeds(n):
        ids = np.full((1, n), 5, dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    assert session.run(None, feeds(limit))[0].shape[1] == limit
    with pytest.raises(Exception, match="out of bounds|indices element out of data bounds"):
        session.run(None, feeds(limit + 1))


def test_a_cached_export_with_other_approximations_is_exported_again(tmp_path, monkeypatch):
    """`run NAME` reuses ~/.cache/puma-onnx/NAME only while its recorded approximations are this version's."""
    from puma_onnx import export as ex
    from puma_onnx.runtime import approx

    monkeypatch.setenv(ex.CACHE_ENV, str(tmp_path))
    exports = []

    def fake_export(name, out, warn=None):
        exports.append(name)
        (Path(out) / ex.REWRITTEN_FILE).write_text("new")

    def fake_prepare(out, warn=None):
        meta = {"approx": "refit", "approx_digest": approx.REFIT.digest}
        (Path(out) / ex.METADATA_FILE).write_text(json.dumps(meta))

    monkeypatch.setattr(ex, "export", fake_export)
    monkeypatch.setattr(ex, "prepare", fake_prepare)
    cached = tmp_path / "minilm"
    cached.mkdir()
    (cached / ex.REWRITTEN_FILE).write_text("old")
    (cached / ex.METADATA_FILE).write_text(json.dumps({"approx": "refit", "approx_digest": "0123456789abcdef"}))
    said = []
    assert ex.cached_export("minilm", warn=said.append) == cached
    assert exports == ["minilm"] and (cached / ex.REWRITTEN_FILE).read_text() == "new"
    assert "has other approximations than this version's: exporting it again" in said[0]
    said.clear()
    assert ex.cached_export("minilm", warn=said.append) == cached  # now current: reused
    assert exports == ["minilm"] and "using the export of minilm cached" in said[0]


def test_an_export_with_pumas_approximations_runs_securely_on_them(exported, tmp_path):
    """`export NAME --approx puma` end to end: the CLI's export (here its python entries, export and then
    prepare, as puma_onnx.cli calls them) of 2-layer bert-base with PUMA's GeLU and exp, then a secure run on
    three thread ranks. It must follow onnxruntime on the PUMA-rewritten model, closer than the default
    (refit) set's rewrite is to it, and report approx "puma": catches an executor that runs another set
    than the recorded one, or PUMA's three-piece GeLU failing under the recorded (narrowed) comparisons."""
    from puma_onnx.passes import rewrite_file
    from puma_onnx.runtime.session import CLIENT, REWRITTEN_FILE, RunOptions
    from tests.runtime.test_session import ort_run, run_threads

    folder, meta, _ = prepared_copy(exported, tmp_path, approx_set="puma")
    assert meta["approx"] == "puma"
    ids = np.random.default_rng(3).integers(0, meta["vocab_size"], size=(1, 12))
    np.save(tmp_path / "ids.npy", ids)
    opts = RunOptions(model=str(folder), input_ids=str(tmp_path / "ids.npy"), progress=False)
    results, errors = run_threads([opts] * 3)
    assert errors == [None] * 3, errors
    report = results[CLIENT]
    assert report["approx"] == "puma" and report["ranges"] == "recorded"

    def plain(path):
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        return ort_run(path, feeds)["last_hidden_state"]

    rewrite_file(folder / "model.onnx", tmp_path / "refit.onnx", "refit")
    secure = report["outputs"]["last_hidden_state"]
    puma, refit = plain(folder / REWRITTEN_FILE), plain(tmp_path / "refit.onnx")
    err = np.abs(secure - puma).max()
    assert err <= 2e-3, f"secure vs onnxruntime on the PUMA rewrite: {err:.3g}"
    assert err < np.abs(refit - puma).max() / 4
