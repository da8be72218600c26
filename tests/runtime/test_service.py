"""The service's pieces without MPI: query parsing, the ranks' agreement on batches, padding, replies."""

import base64
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from puma_onnx.runtime.onehot import split
from puma_onnx.runtime.service import (
    batch_feeds,
    decide,
    listen_address,
    parse_query,
    reply_body,
    output_layout,
)
from puma_onnx.runtime.session import UserError

VOCAB = 40
CARD = {"name": "m", "max_batch": 4, "max_positions": 16, "vocab_size": VOCAB, "inputs": ["input_ids", "attention_mask"]}


def meta_and_share(ids, rank, qid="q1", **public):
    piece = split(np.asarray(ids), VOCAB)[rank]
    meta = {
        "query": qid,
        "input_ids": {"shape": list(np.shape(ids)), "seeds": {str(k): v.hex() for k, v in piece.seeds.items()}},
        **public,
    }
    return meta, (piece.dense.astype("<u8").tobytes() if piece.dense is not None else None)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_a_well_formed_query_parses_on_every_rank(rank):
    ids = np.array([[1, 2, 3], [4, 5, 0]])
    meta, share = meta_and_share(ids, rank, attention_mask=[[1, 1, 1], [1, 1, 0]])
    q = parse_query(meta, share, rank, CARD)
    assert q.shape == (2, 3) and q.qid == "q1"
    assert q.public["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert q.public["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    # The digest covers the public part only: every rank computes the same one.
    others = [parse_query(*meta_and_share(ids, r, attention_mask=[[1, 1, 1], [1, 1, 0]]), r, CARD).digest for r in range(3)]
    assert len(set(others)) == 1 and others[0] == q.digest


def _bad(edit, rank=1):
    meta, share = meta_and_share(np.array([[1, 2, 3]]), rank)
    meta, share = edit(meta, share)
    with pytest.raises(ValueError) as e:
        parse_query(meta, share, rank, CARD)
    return str(e.value)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m, s: ({**m, "query": "no spaces allowed"}, s), "letters, digits"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "shape": [1]}}, s), "[B, S]"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "shape": [5, 3]}}, s), "at most 4 (--max-batch)"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "shape": [1, 17]}}, s), "17 tokens; m allows at most 16"),
        (lambda m, s: (m, s[:-8]), "1 x 3 x 40 uint64 words"),
        (lambda m, s: (m, None), "needs the binary part 'share'"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {"1": "zz"}}}, s), "hex seeds"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {"0": "00" * 16}}}, s), "components [1]"),
        (lambda m, s: ({**m, "attention_mask": [[1, 1]]}, s), "attention_mask has shape [1, 2]"),
        (lambda m, s: ({**m, "attention_mask": [[1, 2, 1]]}, s), "0 and 1 only"),
        (lambda m, s: ({**m, "attention_mask": [[0, 0, 0]]}, s), "at least one token"),
        (lambda m, s: ([m], s), "JSON object"),
    ],
)
def test_a_malformed_query_is_refused_with_its_reason(edit, words):
    assert words in _bad(edit)


def test_rank_0_takes_no_binary_share():
    assert "takes no binary share" in _bad(lambda m, s: (m, b"\0" * 8), rank=0)


def _view(pending, rejected=None, stop=False):
    return {"pending": pending, "rejected": rejected or {}, "stop": stop}


def test_ready_queries_run_in_rank_0s_order_up_to_the_batch_limit():
    # (id, digest, age, inputs): a arrived first at rank 0, then b, then c.
    held = [["a", "d", 3.0, 2, False], ["b", "d", 2.0, 2, False], ["c", "d", 1.0, 1, False]]
    shuffled = [held[2], held[0], held[1]]
    views = [_view(held), _view(shuffled), _view([[q, d, 0.1, n, g] for q, d, _, n, g in held])]
    assert decide(views, max_batch=4, wait_s=30) == (["a", "b"], {})
    assert decide(views, max_batch=5, wait_s=30) == (["a", "b", "c"], {})
    assert decide(views, max_batch=1, wait_s=30)[0] == ["a"]  # a query larger than the limit cannot arrive


def test_a_batch_that_is_not_full_waits_for_its_window():
    held = [["a", "d", 0.5, 2, False], ["b", "d", 0.2, 1, False]]
    views = [_view(held)] * 3
    assert decide(views, max_batch=4, wait_s=30, window_s=1.0) == ([], {})
    assert decide(views, max_batch=3, wait_s=30, window_s=1.0)[0] == ["a", "b"]  # full: no wait
    assert decide(views, max_batch=2, wait_s=30, window_s=1.0)[0] == ["a"]  # b does not fit: no wait
    older = [_view([["a", "d", 1.0, 2, False], ["b", "d", 0.2, 1, False]])] * 3
    assert decide(older, max_batch=4, wait_s=30, window_s=1.0)[0] == ["a", "b"]


def test_a_generation_runs_alone():
    held = [["a", "d", 3.0, 1, False], ["g", "d", 2.0, 1, True], ["c", "d", 1.0, 1, False]]
    views = [_view(held)] * 3
    assert decide(views, max_batch=8, wait_s=30)[0] == ["a"]
    assert decide([_view(held[1:])] * 3, max_batch=8, wait_s=30)[0] == ["g"]
    assert decide([_view(held[1:])] * 3, max_batch=8, wait_s=30, window_s=5.0)[0] == ["g"]  # no window either


def test_a_query_missing_on_a_rank_waits_then_gets_an_error():
    views = [_view([["a", "d", 1.0, 1, False]]), _view([["a", "d", 1.0, 1, False]]), _view([])]
    assert decide(views, 4, wait_s=30) == ([], {})
    late = [_view([["a", "d", 31.0, 1, False]]), _view([["a", "d", 0.5, 1, False]]), _view([])]
    batch, dropped = decide(late, 4, wait_s=30)
    assert batch == [] and dropped["a"][0] == 504 and "[2]" in dropped["a"][1]


def test_different_public_parts_or_a_refusal_drop_the_query_everywhere():
    views = [_view([["a", "d1", 1.0, 1, False]]), _view([["a", "d2", 1.0, 1, False]]), _view([["a", "d1", 1.0, 1, False]])]
    assert decide(views, 4, 30) == ([], {"a": (400, "the three ranks received different public inputs for this query")})
    views = [_view([["a", "d", 1.0, 1, False]]), _view([], {"a": "bad share"}), _view([["a", "d", 1.0, 1, False]])]
    batch, dropped = decide(views, 4, 30)
    assert batch == [] and dropped["a"] == (400, "rank 1 refused the query: bad share")


def test_listen_addresses():
    assert listen_address(("127.0.0.1:8600",), 2) == ("127.0.0.1", 8602)
    assert listen_address(("10.0.0.1:9000", "10.0.0.2:9000", "[::1]:9001"), 2) == ("::1", 9001)
    for bad in [("a:1", "b:2"), ("nohost",), ("h:99999",), ("h:x",)]:
        with pytest.raises(UserError):
            listen_address(bad, 0)


def _queries(info, shapes, rank=1):
    out = []
    for i, (b, s) in enumerate(shapes):
        ids = np.arange(b * s).reshape(b, s) % VOCAB
        mask = np.ones((b, s), np.int64)
        out.append(parse_query(*meta_and_share(ids, rank, qid=f"q{i}", attention_mask=mask.tolist()), rank, CARD))
    return out


@pytest.mark.parametrize("decoder", [False, True])
def test_queries_of_different_lengths_pad_on_the_models_side(decoder):
    info = {"decoder": decoder, "vocab_size": VOCAB, "inputs": ["input_ids", "attention_mask", "position_ids"], "past": {}}
    feeds, places = batch_feeds(info, _queries(info, [(1, 2), (2, 4)]))
    assert feeds["input_ids"].shape == (3, 4)
    mask = feeds["attention_mask"]
    if decoder:
        assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
        assert feeds["position_ids"][0].tolist() == [0, 0, 0, 1]
        assert places[0] == (0, 1, slice(2, 4))
    else:
        assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
        assert places[0] == (0, 1, slice(0, 2))
    assert places[1] == (1, 2, slice(0, 4))
    # Each query's one-hot rows land on its own tokens' flat positions.
    (first, pos0), (second, pos1) = feeds["input_ids"].sources
    assert pos0.tolist() == ([2, 3] if decoder else [0, 1])
    assert pos1.tolist() == list(range(4, 12))


def test_a_reply_holds_the_querys_rows_and_positions():
    graph = helper.make_graph(
        [], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", 2]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("scalar", TensorProto.FLOAT, [3]),
        ],
    )
    layout = output_layout(graph.output, graph.input)
    assert layout == {"tokens": (True, 1), "pooled": (True, None), "scalar": (False, None)}
    tokens = np.arange(3 * 4 * 2, dtype=np.uint64).reshape(3, 4, 2)
    pooled = np.arange(6, dtype=np.uint64).reshape(3, 2)
    scalar = np.array([7, 8, 9], np.int64)
    components = {
        "tokens": {"component": tokens, "scale": 0.5}, "pooled": {"component": pooled, "scale": 0.25},
        "scalar": {"value": scalar},
    }
    body = reply_body("q", components, (1, 2, slice(0, 3)), layout, {"queries": 2})
    got = {
        k: np.frombuffer(base64.b64decode(v["component"]), "<u8").reshape(v["shape"])
        for k, v in body["outputs"].items() if "component" in v
    }
    assert np.array_equal(got["tokens"], tokens[1:3, 0:3])
    assert np.array_equal(got["pooled"], pooled[1:3])
    assert body["outputs"]["tokens"]["scale"] == 0.5 and json.dumps(body)
    value = body["outputs"]["scalar"]
    assert np.frombuffer(base64.b64decode(value["value"]), value["dtype"]).tolist() == [7, 8, 9]  # not cut


DECODER = {**CARD, "decoder": True}


@pytest.mark.parametrize(
    "params, card, ids, words",
    [
        ({"max_new_tokens": 4}, CARD | {"decoder": False}, [[1, 2]], "encoder: it has no LM head"),
        ({"max_new_tokens": 0}, DECODER, [[1, 2]], "at least 1"),
        ({"max_new_tokens": True}, DECODER, [[1, 2]], "at least 1"),
        ({"max_new_tokens": 4, "temperature": 0.001}, DECODER, [[1, 2]], "[0.01, 100]"),
        ({"max_new_tokens": 4}, DECODER, [[1, 2], [3, 4]], "one prompt, got 2"),
        ({"max_new_tokens": 15}, DECODER, [[1, 2]], "allows at most 1 before 15 new ones"),
        (None, DECODER, [[1, 2]], "needs generate"),
    ],
)
def test_a_bad_generation_query_is_refused_with_its_reason(params, card, ids, words):
    meta, share = meta_and_share(np.array(ids), 2)
    if params is not None:
        meta["generate"] = params
    with pytest.raises(ValueError) as e:
        parse_query(meta, share, 2, card, generate=True)
    assert words in str(e.value)


def test_a_generation_query_parses_and_its_parameters_are_public():
    meta, share = meta_and_share(np.array([[1, 2, 3]]), 0)
    q = parse_query({**meta, "generate": {"max_new_tokens": 5, "temperature": 0.7}}, share, 0, DECODER, generate=True)
    assert q.generate == {"max_new_tokens": 5, "temperature": 0.7}
    other = parse_query({**meta, "generate": {"max_new_tokens": 6, "temperature": 0.7}}, share, 0, DECODER, generate=True)
    assert other.digest != q.digest  # ranks given different parameters do not run it
