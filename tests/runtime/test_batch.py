"""Batches in `run`: several texts padded to the longest (right for encoders, left for decoders), or a
(B, S) ids file; every row matches onnxruntime on that row alone."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime.generation import GenerateOptions, generate
from puma_onnx.runtime.session import CLIENT, RunOptions, UserError, _tokenize

from .test_session import ids_file, ort_run, run_threads

TEXTS = ("Hello there.", "A much longer sentence about private inference of transformers.", "Short one")


@pytest.fixture(scope="module")
def minilm(exported):
    return exported("minilm")


def test_a_batch_of_texts_of_different_lengths_matches_onnxruntime_row_by_row(minilm, tmp_path):
    from tokenizers import Tokenizer

    from puma_onnx.passes import rewrite_file

    rewrite_file(minilm / "model.onnx", tmp_path / "rewritten.onnx")  # the same approximations as the secure run

    results, errors = run_threads([RunOptions(model=str(minilm), text=TEXTS, progress=False)] * 3)
    assert errors == [None] * 3, errors
    got = results[CLIENT]["outputs"]
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.no_padding()
    lengths = []
    for b, text in enumerate(TEXTS):
        ids = np.array([tokenizer.encode(text).ids])
        lengths.append(ids.shape[1])
        want = ort_run(tmp_path / "rewritten.onnx", {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                               "token_type_ids": np.zeros_like(ids)})
        n = ids.shape[1]
        assert np.abs(got["token_embeddings"][b, :n] - want["token_embeddings"][0]).max() <= 2e-3
        assert np.abs(got["sentence_embedding"][b] - want["sentence_embedding"][0]).max() <= 2e-4
    assert got["token_embeddings"].shape[:2] == (3, max(lengths)) and len(set(lengths)) == 3


def test_several_texts_pad_right_for_an_encoder_and_left_for_a_decoder(minilm):
    info = {"tokenizer": (minilm / "tokenizer.json").read_text(), "name": "m"}
    opts = RunOptions(model="m", text=TEXTS[:2])
    for decoder in (False, True):
        ids, mask, _ = _tokenize(opts, {**info, "decoder": decoder}, 512, "")
        short = int(mask[0].sum())
        assert ids.shape == mask.shape == (2, int(mask[1].sum())) and short < ids.shape[1]
        kept = mask[0][-short:] if decoder else mask[0][:short]
        assert kept.all() and mask[0].sum() == short  # the pads sit at the other end
        assert (ids[0][mask[0] == 0] == 0).all()


def test_a_batch_of_ids_runs_a_decoder_row_by_row(exported, tmp_path):
    folder = exported("llama-tiny")
    ids = np.random.default_rng(4).integers(3, 32000, size=(2, 6))
    results, errors = run_threads([RunOptions(model=str(folder), input_ids=ids_file(tmp_path, ids), progress=False)] * 3)
    assert errors == [None] * 3, errors
    got = results[CLIENT]["outputs"]["logits"]
    assert got.shape == (2, 1, 32000)
    from puma_onnx.passes import rewrite_file
    from tests.test_run_mpi import ort_outputs

    rewrite_file(folder / "model.onnx", tmp_path / "rewritten.onnx")  # the same approximations as the secure run
    for b in range(2):
        row = ids[b : b + 1]
        want = ort_outputs(tmp_path / "rewritten.onnx", {"input_ids": row, "attention_mask": np.ones_like(row),
                                                    "position_ids": np.arange(6)[None]})["logits"][:, -1:]
        assert np.abs(got[b] - want[0]).max() <= 2e-3


def test_generate_takes_one_prompt(exported, tmp_path):
    folder = exported("llama-tiny")
    ids = np.ones((2, 4), np.int64)
    opts = GenerateOptions(model=str(folder), input_ids=ids_file(tmp_path, ids), max_new_tokens=2, progress=False)
    _, errors = run_threads([opts] * 3, generate)
    assert all(isinstance(e, UserError) for e in errors), errors
    assert "one prompt" in str(errors[CLIENT])
