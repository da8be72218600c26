"""Secure generation with a secret key/value cache, diffed against a plaintext greedy (or Gumbel-max)
loop in onnxruntime on the same rewritten graph with the same cache handling."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime import arith, generation
from puma_onnx.runtime.generation import GenerateOptions, generate
from puma_onnx.plaintext import generate as plaintext_generation
from puma_onnx.runtime.session import CLIENT, REWRITTEN_FILE, UserError

from .test_session import ids_file, run_threads

NEW = 8


@pytest.fixture(scope="module")
def decoders(exported):
    from puma_onnx.export import prepare

    def get(name):
        folder = exported(name)
        if not (folder / REWRITTEN_FILE).exists():
            prepare(folder, warn=lambda msg: None)
        return folder

    return get


def prompt_ids(tmp_path, vocab=1000, length=8, seed=0):
    ids = np.random.default_rng(seed).integers(3, vocab, size=(1, length), dtype=np.int64)
    return ids, ids_file(tmp_path, ids)


@pytest.mark.parametrize("name", ["gpt2", "llama-tiny"])
def test_greedy_generation_matches_the_plaintext_loop_token_by_token(decoders, tmp_path, monkeypatch, name):
    folder = decoders(name)
    ids, ids_path = prompt_ids(tmp_path)
    seen = {}  # test-only: the logits, opened to every thread rank to compare them

    def observed(party, logits, temperature, noise):
        value = party.fxp.decode(arith.reveal(party, logits))
        seen.setdefault(party.rank, []).append(value)
        return next_token(party, logits, temperature, noise)

    next_token = generation.next_token
    monkeypatch.setattr(generation, "next_token", observed)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=NEW, progress=False)
    results, errors = run_threads([opts] * 3, generate)
    assert errors == [None] * 3
    report = results[CLIENT]
    want, logits = plaintext_generation(folder / REWRITTEN_FILE, ids, NEW)
    assert report["outputs"]["new_ids"] == want
    assert report["outputs"]["prompt_ids"] == ids[0].tolist()
    for step, (secure, plain) in enumerate(zip(seen[CLIENT], logits)):
        assert np.abs(secure - plain).max() <= 1e-2, f"step {step}"
    # One row per step; after the prompt, each step holds one more token in its context.
    assert [s["tokens_in_context"] for s in report["steps"]] == [8 + i for i in range(NEW)]
    assert all(s["bytes"] > 0 and s["rounds"] > 0 for s in report["steps"])


def test_only_the_token_ids_are_opened_and_only_to_the_client(decoders, tmp_path, monkeypatch):
    folder = decoders("gpt2")
    _, ids_path = prompt_ids(tmp_path, seed=1)
    opened = []

    def recorded(party, x, to=None):
        opened.append((party.rank, x.shape, to))
        return reveal(party, x, to)

    reveal = arith.reveal
    monkeypatch.setattr(arith, "reveal", recorded)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=4, progress=False)
    results, errors = run_threads([opts] * 3, generate)
    assert errors == [None] * 3
    # Four steps, each opening one id (shape (1,)) to the client: nothing else, never the cache or the logits.
    assert sorted(opened) == sorted((rank, (1,), CLIENT) for rank in range(3) for _ in range(4))


def test_gumbel_sampling_is_reproducible_and_matches_plaintext_gumbel_max(decoders, tmp_path):
    folder = decoders("gpt2")
    ids, ids_path = prompt_ids(tmp_path, seed=2)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=6, temperature=0.7, seed=11,
                           progress=False)
    runs = [run_threads([opts] * 3, generate) for _ in range(2)]
    assert all(errors == [None] * 3 for _, errors in runs)
    first, second = (results[CLIENT]["outputs"]["new_ids"] for results, _ in runs)
    assert first == second
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6, temperature=0.7, seed=11)
    assert first == want
    greedy, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6)
    assert first != greedy  # the noise changed the choice somewhere, so it was used


@pytest.mark.parametrize(
    "change, says",
    [
        ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
        ({"max_new_tokens": 2050}, "pass gpt2's 1024 positions"),
        ({"temperature": 0.0}, "--temperature must be positive"),
        ({"seed": 3}, "--seed draws the sampling noise"),
        ({"chat": True}, "has no chat template"),
    ],
)
def test_bad_generation_options_are_one_line_before_any_share_moves(decoders, tmp_path, monkeypatch, change, says):
    from puma_onnx.runtime import session

    folder = decoders("gpt2")
    _, ids_path = prompt_ids(tmp_path)
    if change.get("chat"):
        change = {**change, "input_ids": None, "text": "hello"}
    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    opts = GenerateOptions(**{"model": str(folder), "input_ids": ids_path, "progress": False, **change})
    _, errors = run_threads([opts] * 3, generate)
    assert all(isinstance(e, UserError) for e in errors), errors
    assert says in str(errors[CLIENT]) and "\n" not in str(errors[CLIENT])
    assert all("rejected its input" in str(errors[r]) for r in (0, 2))


def test_an_encoder_is_refused_on_every_rank(exported, tmp_path, monkeypatch):
    from puma_onnx.runtime import session

    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    _, ids_path = prompt_ids(tmp_path)
    opts = GenerateOptions(model=str(exported("bert-base")), input_ids=ids_path, progress=False)
    _, errors = run_threads([opts] * 3, generate)
    assert all(isinstance(e, UserError) and "is not a decoder" in str(e) for e in errors), errors


def test_a_decoder_exported_without_its_cache_is_refused(tmp_path, monkeypatch):
    from optimum.exporters.onnx import onnx_export_from_model

    from puma_onnx.export import build_torch_model
    from puma_onnx.runtime import session

    folder = tmp_path / "no-cache"
    onnx_export_from_model(build_torch_model("llama-tiny", layers=1), folder, task="text-generation",
                           do_validation=False)
    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    _, ids_path = prompt_ids(tmp_path)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, progress=False)
    _, errors = run_threads([opts] * 3, generate)
    assert all(isinstance(e, UserError) and "without its past keys/values" in str(e) for e in errors), errors
