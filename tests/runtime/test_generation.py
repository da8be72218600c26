"""Secure generation with a secret key/value cache, diffed against a plaintext greedy (or Gumbel-max)
loop in onnxruntime on the same rewritten graph with the same cache handling."""

from __future__ import annotations

import re
from dataclasses import replace

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
    # One logits vector per generated token on each side (zip would pass over an empty list).
    assert len(seen[CLIENT]) == len(logits) == len(report["outputs"]["new_ids"]) == NEW
    for step, (secure, plain) in enumerate(zip(seen[CLIENT], logits)):
        assert np.abs(secure - plain).max() <= 1e-2, f"step {step}"
    check_steps(report, prompt=8, new=NEW)
    # The logits feed the argmax: the LM head truncates in its node, not reshared untruncated first.
    assert "reshare_parts" not in report["by_protocol"] and "truncate_parts" in report["by_protocol"]
    # The prompt's weight products ran on masks prepared in the setup, every later token's online.
    paths = report["weight_products"]
    assert paths["prepared"] >= 8 and paths["online"] == (NEW - 1) * paths["prepared"]
    # GPT-2's GeLU answers reach their prepared FFN products (through a Reshape) as ranks 1 and 2 hold them,
    # one per layer of the prompt; llama-tiny has no GeLU (its SiLU's answer goes to gate x up, no weight).
    assert paths["held_inputs"] == (2 if name == "gpt2" else 0)


def check_steps(report: dict, prompt: int, new: int) -> None:
    """The report's rows per step, the prompt step's shares of them, and the phase of every per-op row."""
    steps = report["steps"]
    # One row per step, numbered; after the prompt, each step holds one more token in its context.
    assert [s["step"] for s in steps] == list(range(new))
    assert [s["tokens_in_context"] for s in steps] == [prompt + i for i in range(new)]
    assert all(s["bytes"] > 0 and s["rounds"] > 0 for s in steps)
    assert report["prompt_step"] == {
        f"{key}_share": round(steps[0][field] / sum(s[field] for s in steps), 4)
        for key, field in (("time", "time_s"), ("bytes", "bytes"), ("rounds", "rounds"))
    }
    # The prompt's walk, node by node, then the same nodes summed over the later steps.
    rows = report["per_op"]
    nodes = len(rows) // 2
    assert [r["phase"] for r in rows] == ["prompt"] * nodes + ["generation"] * nodes
    assert [r["name"] for r in rows[:nodes]] == [r["name"] for r in rows[nodes:]]


def record_reveals(monkeypatch) -> list:
    """Every reveal any rank takes part in: (rank, shape, receiver, the value's integer words at the receiver)."""
    opened = []
    reveal = arith.reveal

    def recorded(party, x, to=None):
        value = reveal(party, x, to)
        opened.append((party.rank, x.shape, to, None if value is None else value.tolist()))
        return value

    monkeypatch.setattr(arith, "reveal", recorded)
    return opened


@pytest.mark.parametrize("temperature", [None, 0.7], ids=["greedy", "sampled"])
def test_only_the_token_ids_are_opened_and_only_to_the_client(decoders, tmp_path, monkeypatch, temperature):
    folder = decoders("gpt2")
    _, ids_path = prompt_ids(tmp_path, seed=1)
    opened = record_reveals(monkeypatch)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=4, temperature=temperature,
                           progress=False)
    results, errors = run_threads([opts] * 3, generate)
    assert errors == [None] * 3
    # Four steps, each opening one id (shape (1,)) to the client: nothing else, never the cache or the logits.
    assert sorted((r, shape, to) for r, shape, to, _ in opened) == sorted(
        (rank, (1,), CLIENT) for rank in range(3) for _ in range(4)
    )
    # What the client opened is exactly the token ids it reports, not a logit or a maximum.
    seen = [value[0] for rank, _, _, value in opened if rank == CLIENT]
    assert seen == results[CLIENT]["outputs"]["new_ids"]


def test_run_on_a_decoder_opens_the_last_logits_only_never_its_cache(decoders, tmp_path, monkeypatch):
    from puma_onnx.runtime.session import RunOptions, run

    folder = decoders("gpt2")
    _, ids_path = prompt_ids(tmp_path, seed=3)
    opened = record_reveals(monkeypatch)
    results, errors = run_threads([RunOptions(model=str(folder), input_ids=ids_path, progress=False)] * 3, run)
    assert errors == [None] * 3
    assert list(results[CLIENT]["outputs"]) == ["logits"]
    assert sorted((r, shape, to) for r, shape, to, _ in opened) == [(rank, (1, 1, 50257), CLIENT) for rank in range(3)]


def with_metadata(folder, tmp_path, **changes):
    import json
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    meta = json.loads((copy / "puma.json").read_text())
    meta.update(changes)
    (copy / "puma.json").write_text(json.dumps(meta))
    return copy


def test_generation_stops_at_the_end_of_sequence_token_on_every_rank(decoders, tmp_path):
    folder = decoders("gpt2")
    ids, ids_path = prompt_ids(tmp_path, seed=4)
    greedy, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6)
    stop = greedy[2]  # the model's own third token now ends the answer
    model = with_metadata(folder, tmp_path, eos_token_id=[99999, stop])
    opts = GenerateOptions(model=str(model), input_ids=ids_path, max_new_tokens=6, progress=False)
    results, errors = run_threads([opts] * 3, generate)
    assert errors == [None] * 3
    cut = greedy.index(stop) + 1
    assert results[CLIENT]["outputs"]["new_ids"] == greedy[:cut] and len(results[CLIENT]["steps"]) == cut
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6, eos={99999, stop})
    assert want == greedy[:cut]


def test_a_one_token_prompt_may_fill_the_positions_exactly_but_not_pass_them(decoders, tmp_path):
    folder = with_metadata(decoders("llama-tiny"), tmp_path, max_positions=4)
    ids, ids_path = prompt_ids(tmp_path, length=1, seed=5)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=3, progress=False)
    results, errors = run_threads([opts] * 3, generate)
    assert errors == [None] * 3
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 3)
    assert results[CLIENT]["outputs"]["new_ids"] == want
    too_many = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=4, progress=False)
    _, errors = run_threads([too_many] * 3, generate)
    assert "--max-new-tokens 4 leaves no room for a prompt in llama-tiny's 4 positions" in str(errors[CLIENT])
    _, two_path = prompt_ids(tmp_path, length=2, seed=5)
    longer = GenerateOptions(model=str(folder), input_ids=two_path, max_new_tokens=3, progress=False)
    _, errors = run_threads([longer] * 3, generate)
    assert "the input has 2 tokens; llama-tiny allows at most 1 tokens before 3 new ones" in str(errors[CLIENT])


def test_gumbel_sampling_is_reproducible_and_matches_plaintext_gumbel_max(decoders, tmp_path):
    folder = decoders("gpt2")
    ids, ids_path = prompt_ids(tmp_path, seed=2)
    opts = GenerateOptions(model=str(folder), input_ids=ids_path, max_new_tokens=6, temperature=0.7, seed=11,
                           progress=False)
    # The second run gives the seed to the helper alone (as the README says to deploy it: whoever knows the
    # seed knows g): only the helper's seed draws the noise, so the answer is the same.
    unseeded = replace(opts, seed=None)
    runs = [run_threads([opts] * 3, generate), run_threads([unseeded, unseeded, opts], generate)]
    assert all(errors == [None] * 3 for _, errors in runs)
    first, second = (results[CLIENT]["outputs"]["new_ids"] for results, _ in runs)
    assert first == second
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6, temperature=0.7, seed=11)
    assert first == want
    greedy, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, 6)
    assert first != greedy  # the noise changed the choice somewhere, so it was used


# (the change, what the line says, who says it: every rank (a public option: the client's value, its verdict
# shared) or the client alone (the others say it rejected its input)). For the public ones the other ranks
# are given another bad value: each must print the client's line, not its own.
BAD_OPTIONS = [
    ({"max_new_tokens": 0}, "--max-new-tokens must be at least 1, got 0", "all"),
    ({"max_new_tokens": 2050}, "--max-new-tokens 2050 leaves no room for a prompt in gpt2's 1024 positions", "all"),
    ({"temperature": 0.0}, "--temperature must lie in [0.01, 100.0]", "client"),
    ({"temperature": 1e4}, "--temperature must lie in [0.01, 100.0]", "client"),
    ({"seed": 3}, "--seed draws the sampling noise", "client"),
    ({"chat": True}, "has no chat template", "client"),
]


@pytest.mark.parametrize("change, says, who", BAD_OPTIONS)
def test_bad_generation_options_are_one_line_before_any_share_moves(decoders, tmp_path, monkeypatch, change, says,
                                                                    who):
    from puma_onnx.runtime import session

    folder = decoders("gpt2")
    _, ids_path = prompt_ids(tmp_path)
    if change.get("chat"):
        change = {**change, "input_ids": None, "text": "hello"}
    monkeypatch.setattr(session, "share_weights", lambda *a, **k: pytest.fail("weights shared"))
    opts = GenerateOptions(**{"model": str(folder), "input_ids": ids_path, "progress": False, **change})
    others = replace(opts, max_new_tokens=-opts.max_new_tokens - 1) if who == "all" else opts
    _, errors = run_threads([others, opts, others], generate)
    assert all(isinstance(e, UserError) for e in errors), errors
    assert says in str(errors[CLIENT]) and "\n" not in str(errors[CLIENT])
    if who == "all":
        assert all(str(e) == str(errors[CLIENT]) for e in errors), errors
    else:
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


def test_profile_prints_the_prompt_step_and_the_generation_steps_apart(capsys):
    from types import SimpleNamespace

    from puma_onnx.runtime.reports import finish_generate

    def row(op_type, time_s, phase):
        return {"name": op_type, "layer": 0, "op_type": op_type, "time_s": time_s, "bytes": 2_000_000, "rounds": 3,
                "phase": phase}

    report = {
        "model": "m", "online_s": 3.0, "setup_s": 1.0, "bytes_sent_total": 8_000_000, "rounds": [9, 9, 9],
        "peak_rss_mb": [100, 100, 100],
        "steps": [{"step": 0, "time_s": 2.0}, {"step": 1, "time_s": 1.0}],
        "outputs": {"prompt_ids": [1], "new_ids": [2, 3], "text": "2 3"},
        "per_op": [row("MatMul", 1.5, "prompt"), row("Softmax", 0.5, "prompt"), row("MatMul", 0.25, "generation"),
                   row("MatMul", 0.5, "generation")],
    }
    finish_generate(report, SimpleNamespace(output=None, report=None, profile=True))
    printed = capsys.readouterr().err
    assert "prompt step:" in printed and "generation steps:" in printed
    prompt, generation = printed.split("prompt step:")[1].split("generation steps:")
    # Each table sums its own phase's rows: the prompt's MatMul and Softmax, the two later MatMuls.
    assert re.search(r"^MatMul +1\.500 +2\.00 +3 +1$", prompt, re.M) and "Softmax" in prompt
    assert re.search(r"^MatMul +0\.750 +4\.00 +6 +2$", generation, re.M) and "Softmax" not in generation


class Writes:
    """A stdout that records each write."""

    def __init__(self):
        self.writes = []

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        pass


def byte_level_tokenizer() -> str:
    """GPT-2's kind of tokenizer, byte-level BPE, over the 256 bytes and one merge ("hi"): a character of
    several UTF-8 bytes takes a token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet + ["hi"])}
    tokenizer = Tokenizer(models.BPE(vocab, [("h", "i")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


def test_the_streamer_writes_each_token_as_it_comes_and_holds_back_half_a_character():
    from tokenizers import Tokenizer

    tokenizer_json = byte_level_tokenizer()
    ids = Tokenizer.from_str(tokenizer_json).encode("hi é!").ids
    assert len(ids) == 5  # "hi", " ", the two bytes of "é", "!"
    out = Writes()
    streamer = generation.Streamer(tokenizer_json, [7, 8], out)
    written = []
    for token in ids:
        streamer.add(token)
        written.append(list(out.writes))
    # One write per token as it arrives; "é"'s first byte writes nothing until its second completes it.
    assert written == [["hi"], ["hi", " "], ["hi", " "], ["hi", " ", "é"], ["hi", " ", "é", "!"]]
    assert streamer.result() == {"prompt_ids": [7, 8], "new_ids": ids, "text": "hi é!"}
    plain = generation.Streamer(None, [7], Writes())
    for token in (5, 9):
        plain.add(token)
    assert plain.out.writes == ["5 ", "9 "] and plain.result() == {"prompt_ids": [7], "new_ids": [5, 9], "text": "5 9"}
