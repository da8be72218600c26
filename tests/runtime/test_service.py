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
    batching_rule,
    Inbox,
    decide,
    listen_address,
    parse_query,
    reply_body,
    output_layout,
)
from puma_onnx.runtime.session import UserError

VOCAB = 40
CARD = {
    "name": "m", "max_batch": 4, "max_positions": 16, "vocab_size": VOCAB, "inputs": ["input_ids", "attention_mask"],
    "decoder": False, "generates": False, "batching": "any", "max_new_tokens": 64,
}


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
        (lambda m, s: (m, None), "needs the file part 'share'"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {"1": "zz"}}}, s), "hex strings"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {"0": "00" * 16}}}, s), "components ['1']"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {" 1": "00" * 16}}}, s), "components ['1']"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "seeds": {"1": "00" * 15}}}, s), "16 bytes"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "shape": [True, 3]}}, s), "[B, S]"),
        (lambda m, s: ({**m, "attention_mask": [[1, 1.0, 1]]}, s), "integers 0 and 1"),
        (lambda m, s: ({**m, "attention_mask": [[1, "1", 1]]}, s), "integers 0 and 1"),
        (lambda m, s: ({**m, "attention_mask": [[1, True, 1]]}, s), "integers 0 and 1"),
        (lambda m, s: ({**m, "attention_mask": [[1, 1]]}, s), "attention_mask has shape [1, 2]"),
        (lambda m, s: ({**m, "attention_mask": [[1, 2, 1]]}, s), "0 and 1 only"),
        (lambda m, s: ({**m, "input_ids": {**m["input_ids"], "shape": [1, 1 << 40]}}, s), "allows at most 16"),
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
    held = [["a", "d", 3.0, 2, ""], ["b", "d", 2.0, 2, ""], ["c", "d", 1.0, 1, ""]]
    shuffled = [held[2], held[0], held[1]]
    views = [_view(held), _view(shuffled), _view([[q, d, 0.1, n, g] for q, d, _, n, g in held])]
    assert decide(views, max_batch=4, wait_s=30) == (["a", "b"], {})
    assert decide(views, max_batch=5, wait_s=30) == (["a", "b", "c"], {})
    assert decide(views, max_batch=1, wait_s=30)[0] == ["a"]  # a query larger than the limit cannot arrive


def test_a_batch_that_is_not_full_waits_for_its_window():
    held = [["a", "d", 0.5, 2, ""], ["b", "d", 0.2, 1, ""]]
    views = [_view(held)] * 3
    assert decide(views, max_batch=4, wait_s=30, window_s=1.0) == ([], {})
    assert decide(views, max_batch=3, wait_s=30, window_s=1.0)[0] == ["a", "b"]  # full: no wait
    assert decide(views, max_batch=2, wait_s=30, window_s=1.0)[0] == ["a"]  # b does not fit: no wait
    older = [_view([["a", "d", 1.0, 2, ""], ["b", "d", 0.2, 1, ""]])] * 3
    assert decide(older, max_batch=4, wait_s=30, window_s=1.0)[0] == ["a", "b"]


def test_queries_batch_only_with_queries_of_their_key():
    held = [["a", "d", 3.0, 1, "length 4"], ["b", "d", 2.0, 1, "length 5"], ["c", "d", 1.0, 1, "length 4"]]
    views = [_view(held)] * 3
    assert decide(views, max_batch=8, wait_s=30)[0] == ["a"]  # b is next in line: it does not wait behind c
    assert decide([_view(held[1:])] * 3, max_batch=8, wait_s=30)[0] == ["b"]


def test_a_refusal_reaches_a_copy_that_arrives_later():
    inbox = Inbox(keep_s=30)
    inbox.reject("late", "bad share")
    first = inbox.summary()
    second = inbox.summary()  # the next tick still carries it
    assert first["rejected"] == second["rejected"] == {"late": "bad share"}
    views = [_view([["late", "d", 0.1, 1, ""]]), {**second, "stop": False}, _view([["late", "d", 0.1, 1, ""]])]
    assert decide(views, 4, 30)[1] == {"late": (400, "rank 1 refused the query: bad share")}
    assert Inbox(keep_s=0.0).summary()["rejected"] == {}


def test_a_generation_runs_alone():
    held = [["a", "d", 3.0, 1, ""], ["g", "d", 2.0, 1, "alone"], ["c", "d", 1.0, 1, ""]]
    views = [_view(held)] * 3
    assert decide(views, max_batch=8, wait_s=30)[0] == ["a"]
    assert decide([_view(held[1:])] * 3, max_batch=8, wait_s=30)[0] == ["g"]
    assert decide([_view(held[1:])] * 3, max_batch=8, wait_s=30, window_s=5.0)[0] == ["g"]  # no window either


def test_a_query_missing_on_a_rank_waits_then_gets_an_error():
    views = [_view([["a", "d", 1.0, 1, ""]]), _view([["a", "d", 1.0, 1, ""]]), _view([])]
    assert decide(views, 4, wait_s=30) == ([], {})
    late = [_view([["a", "d", 31.0, 1, ""]]), _view([["a", "d", 0.5, 1, ""]]), _view([])]
    batch, dropped = decide(late, 4, wait_s=30)
    assert batch == [] and dropped["a"][0] == 504 and "[2]" in dropped["a"][1]


def test_different_public_parts_or_a_refusal_drop_the_query_everywhere():
    views = [_view([["a", "d1", 1.0, 1, ""]]), _view([["a", "d2", 1.0, 1, ""]]), _view([["a", "d1", 1.0, 1, ""]])]
    assert decide(views, 4, 30) == ([], {"a": (400, "the three ranks received different public inputs for this query")})
    views = [_view([["a", "d", 1.0, 1, ""]]), _view([], {"a": "bad share"}), _view([["a", "d", 1.0, 1, ""]])]
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
    # Any answer without a batch axis keeps queries apart; a decoder that computes its positions from the
    # shape batches only inputs of one length (left padding would shift them).
    assert batching_rule({"decoder": False, "inputs": []}, layout) == "none"
    batched = {k: v for k, v in layout.items() if k != "scalar"}
    assert batching_rule({"decoder": False, "inputs": []}, batched) == "any"
    assert batching_rule({"decoder": True, "inputs": ["input_ids"]}, batched) == "same-length"
    assert batching_rule({"decoder": True, "inputs": ["input_ids", "position_ids"]}, batched) == "any"
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
    assert body["outputs"]["tokens"]["scale"] == 0.5
    left = reply_body("q", components, (1, 2, slice(2, 4)), layout, {"queries": 2})  # a left-padded query
    got = np.frombuffer(base64.b64decode(left["outputs"]["tokens"]["component"]), "<u8").reshape(2, 2, 2)
    assert np.array_equal(got, tokens[1:3, 2:4])
    # A secret answer without a batch axis never goes to the queries of a shared batch.
    with pytest.raises(AssertionError, match="no batch axis"):
        reply_body("q", {"pooled": components["pooled"]}, (1, 2, slice(0, 3)), {}, {"queries": 2})
    value = body["outputs"]["scalar"]
    assert np.frombuffer(base64.b64decode(value["value"]), value["dtype"]).tolist() == [7, 8, 9]  # not cut


DECODER = {**CARD, "decoder": True, "generates": True}


@pytest.mark.parametrize(
    "params, card, ids, words",
    [
        ({"max_new_tokens": 4}, CARD, [[1, 2]], "encoder: it has no LM head"),
        ({"max_new_tokens": 4}, DECODER | {"generates": False}, [[1, 2]], "without its key/value cache"),
        ({"max_new_tokens": 0}, DECODER, [[1, 2]], "in [1, 64]"),
        ({"max_new_tokens": True}, DECODER, [[1, 2]], "in [1, 64]"),
        ({"max_new_tokens": 65}, DECODER, [[1, 2]], "in [1, 64] (serve --max-new-tokens)"),
        ({"max_new_tokens": 4, "temperature": 0.001}, DECODER, [[1, 2]], "[0.01, 100]"),
        ({"max_new_tokens": 4, "temperature": True}, DECODER, [[1, 2]], "[0.01, 100]"),
        ({"max_new_tokens": 4}, DECODER, [[1, 2], [3, 4]], "one prompt, got 2"),
        ({"max_new_tokens": 15}, DECODER, [[1, 2]], "2 tokens and 15 new ones pass m's 16 positions"),
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


def _app(inbox):
    from starlette.testclient import TestClient

    from puma_onnx.runtime.service import make_app

    return TestClient(make_app(inbox, {**CARD, "rank": 1}, tokenizer=None))


def _form(meta, share=None):
    parts = {"meta": (None, json.dumps(meta), "application/json")}
    if share is not None:
        parts["share"] = ("share", share, "application/octet-stream")
    return parts


def test_a_second_request_with_a_pending_id_gets_409_and_spoils_nothing():
    inbox = Inbox()
    meta, share = meta_and_share(np.array([[1, 2, 3]]), 1, qid="taken")
    assert inbox.add(parse_query(meta, share, 1, CARD)) is None
    with _app(inbox) as http:
        reply = http.post("/v1/run", files=_form({**meta, "attention_mask": [[9, 9, 9]]}, share))
    assert reply.status_code == 409 and "already pending" in reply.json()["error"]
    assert inbox.summary()["rejected"] == {} and inbox.holds("taken")


def test_a_request_larger_than_any_query_is_refused_before_it_is_read():
    meta, _ = meta_and_share(np.array([[1, 2, 3]]), 1)
    with _app(Inbox()) as http:
        reply = http.post("/v1/run", files=_form(meta, b"\0" * (1 << 21)))
        model = http.get("/v1/model").json()
        tokenizer = http.get("/v1/tokenizer")
    assert reply.status_code == 413 and "reads at most" in reply.json()["error"]
    assert model["rank"] == 1 and tokenizer.status_code == 404


def test_a_full_inbox_answers_503_and_a_bad_query_400_with_its_reason():
    meta, share = meta_and_share(np.array([[1, 2, 3]]), 1)
    with _app(Inbox(most=0)) as http:
        full = http.post("/v1/run", files=_form(meta, share))
        bad = http.post("/v1/run", files=_form({**meta, "input_ids": {**meta["input_ids"], "shape": [1, 4]}}, share))
        not_json = http.post("/v1/run", files={"meta": (None, "{oops")})
        no_meta = http.post("/v1/run", files={"other": (None, "1")})
    assert full.status_code == 503 and "try again later" in full.json()["error"]
    assert bad.status_code == 400 and "1 x 4 x 40 uint64 words" in bad.json()["error"]
    assert not_json.status_code == 400 and "malformed query" in not_json.json()["error"]
    assert no_meta.status_code == 400 and "'meta'" in no_meta.json()["error"]


def test_check_servable_names_a_node_that_reads_the_ids_beyond_reshapes_and_the_embedding():
    from puma_onnx.runtime.service import check_servable

    def graph(*nodes):
        return helper.make_model(helper.make_graph(
            list(nodes), "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        ))

    info = {"name": "m", "vocab": {"input_ids": 10}, "inputs": ["input_ids"], "past": {}}
    ok = graph(
        helper.make_node("Reshape", ["input_ids", "shape"], ["flat"]),
        helper.make_node("Shape", ["input_ids"], ["dims"]),
        helper.make_node("Embedding", ["table", "flat"], ["out"], domain="puma"),
    )
    check_servable(ok, info)
    bad = graph(helper.make_node("Slice", ["input_ids", "a", "b"], ["part"]),
                helper.make_node("Embedding", ["table", "part"], ["out"], domain="puma"))
    with pytest.raises(UserError, match="Slice"):
        check_servable(bad, info)
    with pytest.raises(UserError, match="no embedding table"):
        check_servable(ok, {**info, "vocab": {}})
    with pytest.raises(UserError, match="cannot make: pixel_values"):
        check_servable(ok, {**info, "inputs": ["input_ids", "pixel_values"]})
