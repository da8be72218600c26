"""Generation for a client outside the ranks (`puma-onnx serve`): the ranks pick every token inside MPC
and carry it to the next step as a one-hot share; only the client, adding the three components, learns
the ids. Diffed against the plaintext greedy loop on the same rewritten graph."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.plaintext import generate as plaintext_generation
from puma_onnx.runtime.generation import generate_shared
from puma_onnx.runtime.onehot import split
from puma_onnx.runtime.service import Query, batch_feeds
from puma_onnx.runtime.session import REWRITTEN_FILE, RunOptions, start

from .test_generation import decoders, record_reveals, with_metadata  # noqa: F401 - fixtures
from .test_session import run_threads

NEW = 6


def served(folder, ids, new=NEW, temperature=None, keep_going=None):
    """Each rank's (token components by step, steps) of generate_shared on the prompt `ids` (1, S)."""
    def prog(comm, opts):
        started = start(comm, opts, lambda info: ({}, None), caches=True)
        vocab = started.info["vocab"]["input_ids"]
        info = {**started.info, "vocab_size": vocab}
        piece = split(ids, vocab, seeds=(b"\1" * 16, b"\2" * 16))[comm.rank]
        public = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        feeds, _ = batch_feeds(info, [Query("q", ids.shape, public, "d", piece)])
        tokens = []

        def emit(step, index):
            tokens.append(index.first + started.party.zero_share(index.shape))

        steps = generate_shared(
            started.party, started.executor, info, feeds, ids.shape[1], new, temperature, emit, keep_going
        )
        return tokens, steps

    results, errors = run_threads([RunOptions(model=str(folder), progress=False)] * 3, prog)
    assert errors == [None] * 3, errors
    return results


def ids_of(results) -> list[int]:
    """What the client computes: the sum of the three components of each step's token."""
    return [int(sum(parts).view(np.int64)[0]) for parts in zip(*(tokens for tokens, _ in results))]


@pytest.mark.parametrize("name", ["gpt2", "llama-tiny"])
def test_the_ranks_generate_the_plaintext_greedy_ids_without_opening_them(decoders, monkeypatch, name):  # noqa: F811
    folder = decoders(name)
    ids = np.random.default_rng(5).integers(3, 1000, size=(1, 7), dtype=np.int64)
    opened = record_reveals(monkeypatch)
    results = served(folder, ids)
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, NEW)
    assert ids_of(results) == want
    # Nothing is opened but one end-of-sequence bit per step before the last, to every rank.
    assert all(shape == (1,) and to is None for _, shape, to, _ in opened)
    assert len(opened) == 3 * (NEW - 1) and all(value == [0] for _, _, _, value in opened)
    steps = results[0][1]
    assert [s["tokens_in_context"] for s in steps] == [7 + i for i in range(NEW)]


def test_the_ranks_stop_at_the_end_of_sequence_token(decoders, tmp_path):  # noqa: F811
    folder = decoders("gpt2")
    ids = np.random.default_rng(4).integers(3, 1000, size=(1, 8), dtype=np.int64)
    greedy, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, NEW)
    stop = greedy[2]
    model = with_metadata(folder, tmp_path, eos_token_id=[99999, stop])
    results = served(model, ids)
    cut = greedy.index(stop) + 1
    assert ids_of(results) == greedy[:cut] and len(results[0][1]) == cut


def test_a_stop_between_steps_ends_the_generation_early(decoders):  # noqa: F811
    folder = decoders("gpt2")
    ids = np.random.default_rng(7).integers(3, 1000, size=(1, 5), dtype=np.int64)
    asked = []

    def keep_going():  # every rank asks after each step; the second time, the service is stopping
        asked.append(1)
        return len(asked) <= 3

    results = served(folder, ids, keep_going=keep_going)
    want, _ = plaintext_generation(folder / REWRITTEN_FILE, ids, NEW)
    assert ids_of(results) == want[:2]
    assert all(len(steps) == 2 and steps[-1]["stopped"] for _, steps in results)
