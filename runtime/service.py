"""`puma-onnx serve`: weights shared once, then queries from clients outside the three ranks.

Each rank answers HTTP (uvicorn running a starlette app, TLS from the standard certificate options)
in a thread of its own; its main thread keeps MPI. A client (`puma_onnx.client`) sends every rank
the same public part of a query and that rank's piece of the shared one-hot ids (`onehot.py`); each
rank answers with an additive component of every output, re-randomised, and the client adds the
three. No rank sees a token id or an output. The wire format is in the README ("Wire protocol").

The ranks agree on what to run by a tick, every TICK_S while idle: each sends the others the queries
it holds (id, digest of the public part, age) and whether it is stopping (`allgather_json`, 2 rounds).
A query all three hold with the same digest is ready; ready queries run in rank 0's order of arrival,
batched up to --max-batch inputs (padded to the longest: right for encoders, left for decoders); a
batch that is not full waits up to --batch-window for more. A
query that only some ranks received within QUERY_WAIT_S, or whose public parts differ, gets an error
reply on every rank that holds it. A stop (SIGINT or SIGTERM on any rank) ends the loop on all three
after the batch in hand.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import network
from .comm import Communicator
from .executor import PRESENT_PREFIX
from .kernels import FLAT_ORDER, SharedIds
from .onehot import DENSE, SEEDED, OneHotShare, Piece, check_piece, held
from .launch import say
from .session import MAX_TOKENS, RunOptions, UserError, _is_int, answer_share, empty_cache, model_feeds, start
from .shares import AShare
from .wire import allgather_json

TICK_S = 0.02
QUERY_WAIT_S = 30.0
MAX_PENDING = 64  # queries a rank holds before it answers 503
DEFAULT_MAX_NEW_TOKENS = 512
ALONE = "alone"  # the batching key of a query that runs by itself (a generation)
DEFAULT_PORT = 8600
DEFAULT_MAX_BATCH = 16
QUERY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
API = "/v1"


@dataclass
class ServeOptions(RunOptions):
    listen: tuple[str, ...] = ()  # one HOST:PORT for all (rank i takes PORT + i), or one per rank
    tls_cert: str | None = None
    tls_key: str | None = None
    max_batch: int = DEFAULT_MAX_BATCH
    batch_window_s: float = 0.0  # a batch that is not full waits this long for more queries
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # the longest generation a query may ask for
    query_wait_s: float = QUERY_WAIT_S


def listen_address(listen: tuple[str, ...], rank: int) -> tuple[str, int]:
    """This rank's (host, port): the rank-th of three addresses, or one address's port + rank."""
    if len(listen) not in (1, 3):
        raise UserError(f"give --listen once (rank i takes PORT + i) or three times (one per rank), got {len(listen)}")
    text = listen[rank] if len(listen) == 3 else listen[0]
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise UserError(f"--listen {text!r} is not HOST:PORT")
    port = int(port) + (rank if len(listen) == 1 else 0)
    if not 0 < port < 65536:
        raise UserError(f"--listen {text!r}: port {port} is out of range")
    return host.strip("[]"), port


# ----------------------------------------------------------------------------- queries


@dataclass
class Query:
    """One client query as this rank received it."""

    qid: str
    shape: tuple[int, int]  # (B, S)
    public: dict[str, np.ndarray]  # attention_mask, token_type_ids: (B, S)
    digest: str  # of the public part: the three ranks must have received the same
    piece: Piece
    key: str = ""  # queries batch only with queries of the same key (ALONE: never)
    generate: dict | None = None  # {"max_new_tokens", "temperature"} for a generation query
    arrived: float = field(default_factory=time.monotonic)
    reply: object = None  # callable(status, body): the answer or an error, thread-safe; set by the HTTP handler
    emit: object = None  # callable(body): one streamed line of a generation, thread-safe


def _public_part(meta: dict, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """attention_mask (default ones) and token_type_ids (default zeros): (B, S) arrays of JSON 0 and 1."""
    out = {}
    for name in ("attention_mask", "token_type_ids"):
        if meta.get(name) is None:
            out[name] = np.ones(shape, np.int64) if name == "attention_mask" else np.zeros(shape, np.int64)
            continue
        value = np.array(meta[name], dtype=object)
        if value.shape != shape:
            raise ValueError(f"{name} has shape {list(value.shape)}, the ids {list(shape)}")
        if not all(_is_int(v, 0) and v <= 1 for v in value.reshape(-1)):
            raise ValueError(f"{name} must hold the integers 0 and 1 only")
        out[name] = value.astype(np.int64)
    if not out["attention_mask"].any(axis=1).all():
        raise ValueError("every input needs at least one token with attention_mask 1")
    return out


def _generation(meta: dict, model: dict, shape: tuple[int, int], mask: np.ndarray) -> dict:
    """The public parameters of a generation query; ValueError names what is wrong."""
    params = meta.get("generate")
    if not isinstance(params, dict):
        raise ValueError("a generation query needs generate: {max_new_tokens, temperature}")
    if not model["decoder"]:
        raise ValueError(f"{model['name']} is an encoder: it has no LM head to generate with")
    if not model["generates"]:
        raise ValueError(f"{model['name']} was exported without its key/value cache: it cannot generate here")
    n, temperature = params.get("max_new_tokens"), params.get("temperature")
    if not _is_int(n, 1) or n > model["max_new_tokens"]:
        raise ValueError(f"max_new_tokens must be an integer in [1, {model['max_new_tokens']}] (serve --max-new-tokens)")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0.01 <= temperature <= 100):
        raise ValueError("temperature must be null (greedy) or a number in [0.01, 100]")
    if shape[0] != 1:
        raise ValueError(f"a generation query takes one prompt, got {shape[0]}")
    if not mask.all():
        raise ValueError("a generation prompt takes no padding: its attention_mask must be all ones")
    limit = model["max_positions"]
    if limit is not None and shape[1] + n > limit:
        raise ValueError(f"the prompt's {shape[1]} tokens and {n} new ones pass {model['name']}'s {limit} positions")
    return {"max_new_tokens": n, "temperature": None if temperature is None else float(temperature)}


def max_body_bytes(model: dict) -> int:
    """The largest request a rank reads: a full batch of the longest inputs' one-hot words, and 1 MB."""
    return model["max_batch"] * token_limit(model) * model["vocab_size"] * 8 + (1 << 20)


def token_limit(model: dict) -> int:
    return model["max_positions"] or MAX_TOKENS


def parse_query(meta, share: bytes | None, rank: int, model: dict, generate: bool = False) -> Query:
    """A query (a generation with `generate`) from its JSON part and this rank's binary share; ValueError
    names what is wrong. Sizes are checked before anything of their size is allocated."""
    if not isinstance(meta, dict):
        raise ValueError("the meta part must be a JSON object")
    qid = meta.get("query")
    if not isinstance(qid, str) or not QUERY_ID.fullmatch(qid):
        raise ValueError("query must be an id of 1 to 64 letters, digits, '-' or '_'")
    ids = meta.get("input_ids")
    if not isinstance(ids, dict):
        raise ValueError("input_ids must be an object with shape and seeds")
    shape = ids.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d, 1) for d in shape)):
        raise ValueError("input_ids.shape must be [B, S] with integers B, S >= 1")
    batch, length = shape
    if batch > model["max_batch"]:
        raise ValueError(f"the query holds {batch} inputs; this service takes at most {model['max_batch']} (--max-batch)")
    if length > token_limit(model):
        raise ValueError(f"the input has {length} tokens; {model['name']} allows at most {token_limit(model)}")
    seeds = ids.get("seeds")
    want = {str(k) for k in held(rank) if k in SEEDED}
    if not isinstance(seeds, dict) or set(seeds) != want or not all(isinstance(v, str) for v in seeds.values()):
        raise ValueError(f"input_ids.seeds must map exactly the components {sorted(want)} to hex seeds for rank {rank}")
    try:
        seeds = {int(k): bytes.fromhex(v) for k, v in seeds.items()}
    except ValueError:
        raise ValueError("input_ids.seeds must be hex strings") from None
    vocab = model["vocab_size"]
    dense = None
    if DENSE in held(rank):
        if not share:
            raise ValueError(
                f"rank {rank} needs the file part 'share' (component {DENSE} of the one-hot ids, sent with a filename)"
            )
        if len(share) != batch * length * vocab * 8:
            raise ValueError(
                f"the share must hold {batch} x {length} x {vocab} uint64 words ({batch * length * vocab * 8} bytes), "
                f"got {len(share)} bytes"
            )
        dense = np.frombuffer(share, dtype="<u8").reshape(batch * length, vocab)
    elif share:
        raise ValueError(f"rank {rank} takes no binary share")
    piece = Piece(rank, seeds, dense)
    check_piece(piece, batch * length, vocab)
    public = _public_part(meta, (batch, length))
    params = _generation(meta, model, (batch, length), public["attention_mask"]) if generate else None
    digest = hashlib.sha256(
        json.dumps({"query": qid, "shape": shape, "generate": params, **{k: v.tolist() for k, v in public.items()}}).encode()
    ).hexdigest()
    if generate or model["batching"] == "none":
        key = ALONE
    else:
        key = f"length {length}" if model["batching"] == "same-length" else ""
    return Query(qid, (batch, length), public, digest, piece, key, params)


class Inbox:
    """The queries this rank holds, shared by the HTTP thread (adds) and the MPI loop (takes), and the
    ones it refused (kept `keep_s`, so that a copy that reaches another rank later is dropped too)."""

    def __init__(self, keep_s: float = QUERY_WAIT_S, most: int = MAX_PENDING):
        self._lock = threading.Lock()
        self._queries: dict[str, Query] = {}
        self._rejected: dict[str, tuple[str, float]] = {}
        self.keep_s, self.most = keep_s, most

    def add(self, query: Query) -> str | None:
        """None once held, or why not."""
        with self._lock:
            if query.qid in self._queries:
                return "already pending"
            if len(self._queries) >= self.most:
                return "full"
            self._queries[query.qid] = query
            return None

    def holds(self, qid: str) -> bool:
        with self._lock:
            return qid in self._queries

    def reject(self, qid: str, reason: str) -> None:
        """A query this rank refused: the others drop it too (`decide`)."""
        with self._lock:
            if qid not in self._queries:
                self._rejected[qid] = (reason, time.monotonic())

    def summary(self) -> dict:
        now = time.monotonic()
        with self._lock:
            self._rejected = {q: (r, t) for q, (r, t) in self._rejected.items() if now - t <= self.keep_s}
            return {
                "pending": [[q.qid, q.digest, round(now - q.arrived, 3), q.shape[0], q.key] for q in self._queries.values()],
                "rejected": {q: r for q, (r, _) in self._rejected.items()},
            }

    def take(self, qid: str) -> Query | None:
        with self._lock:
            return self._queries.pop(qid, None)

    def drain(self) -> list[Query]:
        with self._lock:
            out, self._queries = list(self._queries.values()), {}
            return out


def decide(
    views: list[dict], max_batch: int, wait_s: float, window_s: float = 0.0
) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """From every rank's summary (the same list on every rank): the next batch (query ids, in rank 0's
    order of arrival) and the queries to drop, with the HTTP status and reason of their error reply.
    Queries batch only with ones of the same key (`parse_query`; ALONE: never). A batch that is not full
    waits until its oldest query has waited `window_s` at rank 0, so that queries arriving together run
    together. A pure function, so the ranks agree."""
    held_by = [{qid: (digest, age, batch, key) for qid, digest, age, batch, key in v["pending"]} for v in views]
    dropped: dict[str, tuple[int, str]] = {}
    for rank, v in enumerate(views):
        for qid, reason in v["rejected"].items():
            dropped.setdefault(qid, (400, f"rank {rank} refused the query: {reason}"))
    everywhere = set(held_by[0]) & set(held_by[1]) & set(held_by[2])
    for qid in sorted(set().union(*held_by) - everywhere):
        age = max(h[qid][1] for h in held_by if qid in h)
        if age > wait_s:
            missing = [r for r in range(3) if qid not in held_by[r]]
            dropped.setdefault(qid, (504, f"rank(s) {missing} did not receive the query within {wait_s:g} s"))
    for qid in sorted(everywhere):
        if len({h[qid][0] for h in held_by}) != 1 or len({h[qid][3] for h in held_by}) != 1:
            dropped.setdefault(qid, (400, "the three ranks received different public inputs for this query"))
    ready = sorted((q for q in everywhere if q not in dropped), key=lambda q: (-held_by[0][q][1], q))
    if not ready:
        return [], dropped
    key = held_by[0][ready[0]][3]
    if key == ALONE:
        return ready[:1], dropped
    batch, inputs, full = [], 0, False
    for qid in ready:
        size, other = held_by[0][qid][2], held_by[0][qid][3]
        if batch and (other != key or inputs + size > max_batch):
            full = True
            break
        batch.append(qid)
        inputs += size
    if not full and inputs < max_batch and held_by[0][batch[0]][1] < window_s:
        return [], dropped
    return batch, dropped


# ----------------------------------------------------------------------------- one batch


def batch_feeds(info: dict, queries: list[Query]) -> tuple[dict, list[tuple[int, int, slice]]]:
    """The executor's feeds for queries run together, and where each query's rows are: (first row,
    rows, the columns of its own tokens). Inputs are padded to the longest with mask 0 and zero one-hot
    rows: on the right, or on the left for a decoder (its last position is every row's own)."""
    total = sum(q.shape[0] for q in queries)
    width = max(q.shape[1] for q in queries)
    mask = np.zeros((total, width), np.int64)
    types = np.zeros((total, width), np.int64)
    sources, places, row = [], [], 0
    for q in queries:
        batch, length = q.shape
        cols = slice(width - length, width) if info["decoder"] else slice(0, length)
        mask[row : row + batch, cols] = q.public["attention_mask"]
        types[row : row + batch, cols] = q.public["token_type_ids"]
        flat = ((row + np.arange(batch))[:, None] * width + np.arange(width)[cols][None, :]).reshape(-1)
        sources.append((OneHotShare(q.piece, batch * length, info["vocab_size"]), flat))
        places.append((row, batch, cols))
        row += batch
    names = [n for n in info["inputs"] if n not in info["past"]]
    feeds = model_feeds(names, np.zeros((total, width), np.int64), mask, types)
    feeds["input_ids"] = SharedIds((total, width), sources)
    return {**feeds, **empty_cache(info, total)}, places


def output_components(party, outputs: dict) -> dict[str, dict]:
    """Each graph output as this rank's additive component (its first share component plus a fresh
    zero-sharing, so the three sum to the value and reveal nothing else) and the public scale that
    turns the ring value into the answer (`answer_share`); a public output as it is. The cache
    (present.*) stays."""
    out = {}
    for name, value in outputs.items():
        if name.startswith(PRESENT_PREFIX):
            continue
        share, scale = answer_share(party, name, value)
        if share is None:
            out[name] = {"value": scale}
        else:
            out[name] = {"component": share.first + party.zero_share(share.shape), "scale": scale}
    return out


def output_layout(graph_outputs, inputs) -> dict[str, tuple[bool, int | None]]:
    """For each graph output: whether its first axis is the batch (the same symbolic dim as input_ids'
    first) and which axis runs along the tokens (as input_ids' second), so that a query cut from a
    padded batch gets its own rows and positions back. An output without them is the same for all."""
    ids = next((i for i in inputs if i.name == "input_ids"), None)
    dims = [d.dim_param for d in ids.type.tensor_type.shape.dim] if ids is not None else []
    batch, seq = (dims + ["", ""])[:2]
    layout = {}
    for o in graph_outputs:
        params = [d.dim_param for d in o.type.tensor_type.shape.dim]
        batched = bool(batch) and bool(params) and params[0] == batch
        axis = next((a for a, d in enumerate(params) if a > 0 and seq and d == seq), None)
        layout[o.name] = (batched, axis)
    return layout


def _encode_array(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()).decode()


def reply_body(qid: str, components: dict, place: tuple[int, int, slice], layout: dict, batch: dict) -> dict:
    """The JSON answer to one query: its rows (and own positions) of every output (`output_layout`)."""
    row, count, cols = place
    outputs = {}
    for name, c in components.items():
        part = c.get("component", c.get("value"))
        batched, axis = layout.get(name, (False, None))
        if "component" in c and not batched and batch["queries"] > 1:
            raise AssertionError(f"output {name!r} has no batch axis: its queries must not share a batch")
        if batched:
            part = part[row : row + count]
        if axis is not None:
            index = [slice(None)] * part.ndim
            index[axis] = cols
            part = part[tuple(index)]
        if "component" in c:
            outputs[name] = {"shape": list(part.shape), "dtype": "uint64", "scale": c["scale"], "component": _encode_array(part)}
        else:
            part = np.asarray(part)
            outputs[name] = {"shape": list(part.shape), "dtype": str(part.dtype), "value": _encode_array(part)}
    return {"query": qid, "outputs": outputs, "batch": batch}


# ----------------------------------------------------------------------------- HTTP


def model_card(info: dict, opts: ServeOptions, rank: int, output_names: list[str], batching: str) -> dict:
    """What GET /v1/model answers: the public facts a client needs."""
    return {
        "name": info["name"],
        "rank": rank,
        "decoder": info["decoder"],
        "inputs": [n for n in info["inputs"] if n not in info["past"]],
        "outputs": [n for n in output_names if not n.startswith(PRESENT_PREFIX)],
        "vocab_size": info["vocab_size"],
        "max_positions": info["max_positions"],
        "max_batch": opts.max_batch,
        "frac_bits": opts.frac_bits,
        "tokenizer": info["tokenizer"] is not None,
        "chat_template": info["chat_template"],
        "padding_side": "left" if info["decoder"] else "right",
        "batching": batching,
        "generates": bool(info["decoder"] and info["past"]),
        "max_new_tokens": opts.max_new_tokens,
    }


def batching_rule(info: dict, layout: dict) -> str:
    """How queries may share a batch: "any" (padded to the longest), "same-length" (a decoder that
    computes its positions from the shape: left padding would shift them), or "none" (an answer without
    a batch axis would show one client the others' rows)."""
    if not all(batched for name, (batched, _) in layout.items() if not name.startswith(PRESENT_PREFIX)):
        return "none"
    if info["decoder"] and "position_ids" not in info["inputs"]:
        return "same-length"
    return "any"


def check_servable(model: onnx.ModelProto, info: dict) -> None:
    """Before any weight is shared: the graph reads input_ids only through reshapes, Shape or Size and
    the embedding (what shared ids can go through), and puma-onnx can make its other inputs."""
    if info["vocab"].get("input_ids") is None:
        raise UserError(f"{info['name']} has no embedding table of input_ids to serve")
    flows = {"input_ids"}
    for node in model.graph.node:
        reads = [i for i in node.input if i in flows]
        if not reads:
            continue
        key = (node.domain, node.op_type)
        if key in FLAT_ORDER and node.input[0] in flows:
            flows.update(o for o in node.output if o)
        elif key in (("", "Shape"), ("", "Size")) or (key == ("puma", "Embedding") and node.input[1] in flows):
            continue
        else:
            raise UserError(f"{info['name']}: node {node.name!r} ({node.op_type}) reads the token ids, which the service "
                            "can only reshape and embed")
    model_feeds([n for n in info["inputs"] if n not in info["past"]], np.zeros((1, 1), np.int64))


def make_app(inbox: Inbox, card: dict, tokenizer: str | None):
    """The starlette app of one rank: GET /v1/model, GET /v1/tokenizer, POST /v1/run, POST /v1/generate."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    rank = card["rank"]

    async def model(request: Request):
        return JSONResponse(card)

    async def tokenizer_json(request: Request):
        if tokenizer is None:
            return JSONResponse({"error": f"{card['name']} has no tokenizer"}, status_code=404)
        return Response(tokenizer, media_type="application/json")

    async def receive(request: Request, generate: bool):
        """The query in a request, or the error response to send instead."""
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > max_body_bytes(card):
            return JSONResponse(
                {"error": f"the request declares {declared} bytes; this service reads at most {max_body_bytes(card)}"},
                status_code=413,
            )
        try:
            async with request.form(max_files=1, max_fields=1, max_part_size=64 << 20) as form:
                meta_text = form.get("meta")
                if not isinstance(meta_text, str):
                    raise ValueError("the form needs a field 'meta' (JSON)")
                upload = form.get("share")
                share = await upload.read() if upload is not None and not isinstance(upload, str) else None
            meta = json.loads(meta_text)
        except (ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError; so are form errors
            return JSONResponse({"error": f"malformed query: {e}"}, status_code=400)
        except Exception as e:  # noqa: BLE001 - multipart parsing raises its own kinds
            return JSONResponse({"error": f"malformed query: {type(e).__name__}: {e}"}, status_code=400)
        qid = meta.get("query") if isinstance(meta, dict) else None
        if isinstance(qid, str) and inbox.holds(qid):  # never let a second request spoil the first
            return JSONResponse({"error": f"query {qid!r} is already pending"}, status_code=409)
        try:
            return parse_query(meta, share, rank, card, generate)
        except ValueError as e:
            if isinstance(qid, str) and QUERY_ID.fullmatch(qid):
                inbox.reject(qid, str(e))
            return JSONResponse({"error": str(e)}, status_code=400)

    async def admit(request: Request, generate: bool):
        """(the queue the MPI loop's answers arrive in, None) once the inbox holds the query, or (None, the
        error response to send instead). Answers: ("line", 200, body) lines, then ("end", status, body)."""
        query = await receive(request, generate)
        if not isinstance(query, Query):
            return None, query
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        query.reply = lambda status, body: loop.call_soon_threadsafe(events.put_nowait, ("end", status, body))
        query.emit = lambda body: loop.call_soon_threadsafe(events.put_nowait, ("line", 200, body))
        refused = inbox.add(query)
        if refused == "full":
            return None, JSONResponse({"error": f"{inbox.most} queries are waiting; try again later"}, status_code=503)
        if refused:
            return None, JSONResponse({"error": f"query {query.qid!r} is already pending"}, status_code=409)
        return events, None

    async def run(request: Request):
        events, refusal = await admit(request, generate=False)
        if refusal is not None:
            return refusal
        _, status, body = await events.get()
        return JSONResponse(body, status_code=status)

    async def generate(request: Request):
        """A generation streams one JSON line per new token, then a last line with the costs."""
        events, refusal = await admit(request, generate=True)
        if refusal is not None:
            return refusal
        first = await events.get()
        if first[0] == "end" and first[1] != 200:
            return JSONResponse(first[2], status_code=first[1])

        async def lines():
            event = first
            while True:
                yield json.dumps(event[-1]) + "\n"
                if event[0] == "end":
                    return
                event = await events.get()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    return Starlette(
        routes=[
            Route(f"{API}/model", model),
            Route(f"{API}/tokenizer", tokenizer_json),
            Route(f"{API}/run", run, methods=["POST"]),
            Route(f"{API}/generate", generate, methods=["POST"]),
        ]
    )


class HttpThread:
    """uvicorn serving the app in a thread (it installs no signal handlers off the main thread)."""

    def __init__(self, app, host: str, port: int, cert: str | None, key: str | None):
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, ssl_certfile=cert, ssl_keyfile=key, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="puma-onnx-http", daemon=True)

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # noqa: BLE001 - reported by `start`
            self.failed = e

    def start(self, wait_s: float = 10.0) -> None:
        """Start and wait until it listens; UserError if it cannot (address in use, bad certificate)."""
        self.thread.start()
        deadline = time.monotonic() + wait_s
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            why = "" if self.failed is None or isinstance(self.failed, SystemExit) else f": {self.failed}"
            raise UserError(
                f"cannot serve on {self.server.config.host}:{self.server.config.port} (an address in use or not this "
                f"host's, or unreadable TLS files){why}"
            )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5.0)


# ----------------------------------------------------------------------------- the loop


class StopFlag:
    """SIGINT and SIGTERM set it; the loop ends at the next tick on every rank."""

    def __init__(self):
        self.signal: int | None = None
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, self._set)

    def _set(self, number, frame) -> None:
        self.signal = number


def serve(comm: Communicator, opts: ServeOptions) -> dict | None:
    """This rank's part of the service: share the weights, listen, answer until stopped."""
    if not 1 <= opts.max_batch <= 4096:
        raise UserError(f"--max-batch must be in [1, 4096], got {opts.max_batch}")
    if not 0 <= opts.batch_window_s <= 60 or not 0 < opts.query_wait_s <= 3600:
        raise UserError("--batch-window must be in [0, 60] s and --query-wait in (0, 3600] s")
    if (opts.tls_cert is None) != (opts.tls_key is None):
        raise UserError("give both --tls-cert and --tls-key, or neither")
    if not 1 <= opts.max_new_tokens <= 1 << 16:
        raise UserError(f"--max-new-tokens must be in [1, 65536], got {opts.max_new_tokens}")
    host, port = [listen_address(opts.listen, r) for r in range(3)][comm.rank]  # every rank checks all three
    started = start(comm, opts, lambda info: ({}, None), caches=True, check_model=check_servable)
    party, info, executor = started.party, started.info, started.executor
    resident = started.resident  # every query walks every weight again: their forms are kept (`start`)
    info = {**info, "vocab_size": info["vocab"]["input_ids"]}
    light = executor.model
    layout = output_layout(light.graph.output, light.graph.input)
    card = model_card(info, opts, comm.rank, executor.output_names, batching_rule(info, layout))
    with comm.tag("service"):
        shared = allgather_json(comm, [started.setup_s, int(started.setup.bytes), int(started.setup.rounds)])
    card["weights_shared"] = {  # paid once, at start-up (streamed weights are shared again by every batch)
        "seconds": round(max(s for s, _, _ in shared), 3), "bytes": sum(b for _, b, _ in shared), "rounds": shared[0][2],
        "streamed": executor.stream is not None, "resident": resident,
    }
    inbox = Inbox(keep_s=opts.query_wait_s)
    http = HttpThread(make_app(inbox, card, info["tokenizer"]), host, port, opts.tls_cert, opts.tls_key)
    agree_all(comm, http.start)
    stop = StopFlag()
    scheme = "https" if opts.tls_cert else "http"
    say(
        f"rank {comm.rank} serves {info['name']} at {scheme}://{host}:{port}{API} (weights shared once: "
        f"{card['weights_shared']['seconds']:.1f} s, {card['weights_shared']['bytes'] / 1e6:.0f} MB over the three ranks)"
    )
    answered = 0
    try:
        while True:
            with comm.untraced(), comm.tag("service"):
                views = allgather_json(comm, {**inbox.summary(), "stop": stop.signal is not None})
            if any(v["stop"] for v in views):
                break
            batch, dropped = decide(views, opts.max_batch, opts.query_wait_s, opts.batch_window_s)
            for qid, (status, reason) in dropped.items():
                query = inbox.take(qid)
                if query is not None:
                    query.reply(status, {"error": reason})
            if not batch:
                time.sleep(TICK_S)
                continue
            queries = [inbox.take(q) for q in batch]
            try:
                if queries[0].generate is not None:
                    answered += run_generation(party, executor, info, queries[0], lambda: still_serving(comm, stop))
                else:
                    answered += run_batch(party, executor, info, queries, layout)
            except BaseException:  # the rank ends the service (launch.py); these clients hear why first
                for query in queries:
                    query.reply(500, {"error": "the service failed while running this query, and stops"})
                raise
    finally:
        for query in inbox.drain():
            query.reply(503, {"error": "the service is stopping"})
        http.stop()
    say(f"rank {comm.rank} stopped after {answered} queries")
    return None


def agree_all(comm: Communicator, step) -> None:
    """step() on every rank; a UserError on any rank stops all three with its line."""
    error = None
    try:
        step()
    except UserError as e:
        error = str(e)
    errors = [e for e in (v["error"] for v in allgather_json(comm, {"error": error})) if e]
    if errors:
        raise UserError(errors[0])


def run_batch(party, executor, info: dict, queries: list[Query], layout: dict) -> int:
    """Run queries together and reply to each with its part of every output; returns how many."""
    comm = party.comm
    feeds, places = batch_feeds(info, queries)
    before, began = comm.stats.snapshot(), time.perf_counter()
    comm.begin_trace()
    outputs = executor.run(feeds)
    components = output_components(party, outputs)
    cost = comm.stats.snapshot() - before
    online_s = time.perf_counter() - began
    with comm.untraced(), comm.tag("service"):  # every rank's rounds, for the network model (public figures)
        everyone = allgather_json(comm, {"trace": comm.trace, "tail": comm.tail()})
    batch = {
        "queries": len(queries),
        "inputs": int(feeds["input_ids"].shape[0]),
        "tokens": int(feeds["input_ids"].shape[1]),
        "online_s": round(online_s, 4),
        "bytes": int(cost.bytes),
        "rounds": int(cost.rounds),
        "network_estimates": network.estimates([e["trace"] for e in everyone], [e["tail"] for e in everyone]),
    }
    for query, place in zip(queries, places):
        query.reply(200, reply_body(query.qid, components, place, layout, batch))
    return len(queries)


def still_serving(comm: Communicator, stop: StopFlag) -> bool:
    """Whether no rank has been told to stop (one exchange, untraced): a long generation asks every step."""
    with comm.untraced(), comm.tag("service"):
        return not any(allgather_json(comm, stop.signal is not None))


def run_generation(party, executor, info: dict, query: Query, keep_going) -> int:
    """A generation query: its prompt's walk, then one walk per new token; each token goes to the client
    as this rank's additive component of its id (a line of the streamed answer), as it comes. It ends
    early, with "stopped" in its last line, when the service is told to stop."""
    from .generation import generate_shared

    comm = party.comm
    feeds, _ = batch_feeds(info, [query])
    comm.begin_trace()

    def emit(step: int, index: AShare) -> None:
        component = index.first + party.zero_share(index.shape)
        query.emit({"step": step, "token": {"shape": list(index.shape), "dtype": "uint64", "component": _encode_array(component)}})

    began = time.perf_counter()
    params = query.generate
    steps = generate_shared(
        party, executor, info, feeds, query.shape[1], params["max_new_tokens"], params["temperature"], emit, keep_going
    )
    stopped = steps[-1].get("stopped", False)
    query.reply(200, {"query": query.qid, "done": True, "stopped": stopped, "batch": {
        "queries": 1, "inputs": 1, "tokens": query.shape[1], "new_tokens": len(steps),
        "online_s": round(time.perf_counter() - began, 4), "bytes": int(sum(st["bytes"] for st in steps)),
        "rounds": int(sum(st["rounds"] for st in steps)), "steps": steps,
    }})
    return 1
