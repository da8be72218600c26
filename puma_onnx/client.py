"""A client of `puma-onnx serve`, outside the three ranks.

    from puma_onnx import Client
    with Client(["127.0.0.1:8600", "127.0.0.1:8601", "127.0.0.1:8602"]) as client:
        vectors = client.embed(["A sentence to embed", "Another one"])
        outputs = client.run({"input_ids": ids})            # like onnxruntime's run, as a dict

The client tokenizes locally (the tokenizer is public: GET /v1/tokenizer), splits the one-hot of its
ids into replicated shares (`runtime/onehot.py`: two seeds and one dense component), sends each rank
its piece over HTTP(S), and adds the three ranks' components of every output. No rank sees the ids
or the outputs. Only the public parts (shape, attention mask, token types) travel in the clear.
Cost per query: 16 n V bytes up (n tokens, V words in the vocabulary), every output's size x 8 x 3 down.
"""

from __future__ import annotations

import base64
import json
import queue
import secrets
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from puma_onnx.runtime.onehot import split
from puma_onnx.runtime.padding import pad_encodings

RANKS = 3
API = "/v1"
# What the three ranks' model cards must agree on.
MODEL_KEYS = (
    "name", "decoder", "inputs", "outputs", "vocab_size", "max_positions", "max_batch", "frac_bits", "padding_side",
    "batching", "generates", "max_new_tokens",
)


class ServiceError(RuntimeError):
    """The service refused or failed a query; the message is the ranks' error reply."""


@dataclass
class Answer:
    """The outputs of one query and what its batch cost on the ranks (bytes and rounds summed over the
    ranks, the slowest rank's online seconds)."""

    outputs: dict[str, np.ndarray]
    batch: dict


def _base_url(server: str, tls: bool) -> str:
    if "://" in server:
        return server.rstrip("/")
    return f"{'https' if tls else 'http'}://{server}"


def _decode(entry: dict, key: str) -> np.ndarray:
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    return np.frombuffer(base64.b64decode(entry[key]), dtype=dtype).reshape(entry["shape"])


class Client:
    """Queries to the three ranks of one service. `servers`: three HOST:PORT (or URLs), rank 0 first,
    or one HOST:PORT whose port is rank 0's (rank i listens on PORT + i). `ca`: a CA bundle (PEM) to
    check the servers' TLS certificates; given, plain HOST:PORT addresses are reached over https."""

    def __init__(self, servers, ca: str | None = None, tls: bool | None = None, timeout: float = 600.0):
        import httpx

        if isinstance(servers, str):
            servers = [s for s in servers.split(",") if s]
        if len(servers) == 1 and "://" not in servers[0]:
            host, _, port = servers[0].rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{servers[0]!r} is not HOST:PORT")
            servers = [f"{host}:{int(port) + i}" for i in range(RANKS)]
        if len(servers) != RANKS:
            raise ValueError(f"a service has {RANKS} ranks: give {RANKS} addresses (or one, rank 0's), got {len(servers)}")
        tls = bool(ca) if tls is None else tls
        verify = ssl.create_default_context(cafile=ca) if ca else True
        self._http = [httpx.Client(base_url=_base_url(s, tls), verify=verify, timeout=timeout) for s in servers]
        self.model = self._card()
        self._tokenizer = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def close(self) -> None:
        for http in self._http:
            http.close()

    def _card(self) -> dict:
        cards = self._each(lambda rank: self._json(self._http[rank].get(f"{API}/model")))
        for rank, card in enumerate(cards):
            if card.get("rank") != rank:
                raise ServiceError(f"address {rank} answers as rank {card.get('rank')}: list the servers rank 0 first")
        if len({json.dumps({k: v for k, v in c.items() if k in MODEL_KEYS}, sort_keys=True) for c in cards}) != 1:
            raise ServiceError("the three servers describe different models")
        return cards[0]

    @staticmethod
    def _each(call) -> list:
        """call(rank) for the three ranks at once (threads of this call's own: queries from several
        threads of one Client must not wait for each other's answers)."""
        with ThreadPoolExecutor(RANKS) as pool:
            return list(pool.map(call, range(RANKS)))

    @staticmethod
    def _json(response) -> dict:
        try:
            body = response.json()
        except ValueError:
            raise ServiceError(f"HTTP {response.status_code} from {response.url}: not JSON") from None
        if response.status_code != 200:
            raise ServiceError(body.get("error", f"HTTP {response.status_code}") if isinstance(body, dict) else str(body))
        return body

    # --------------------------------------------------------------------- inputs

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            if not self.model["tokenizer"]:
                raise ServiceError(f"{self.model['name']} has no tokenizer: give token ids")
            response = self._http[0].get(f"{API}/tokenizer")
            if response.status_code != 200:
                raise ServiceError(f"cannot read the tokenizer: HTTP {response.status_code}")
            self._tokenizer = Tokenizer.from_str(response.text)
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
        return self._tokenizer

    def tokenize(self, texts) -> dict[str, np.ndarray]:
        """input_ids, attention_mask and token_type_ids (B, S) for the texts, padded to the longest with
        id 0 and mask 0 on the service's padding side."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        rows = [self.tokenizer.encode(t) for t in texts]
        if any(not r.ids for r in rows):
            raise ValueError("a text has no tokens")
        ids, mask, types = pad_encodings(rows, left=self.model["padding_side"] == "left")
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def _check(self, feeds: dict) -> dict[str, np.ndarray]:
        unknown = set(feeds) - {"input_ids", "attention_mask", "token_type_ids"}
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}: the service takes input_ids, attention_mask, token_type_ids")
        if "input_ids" not in feeds:
            raise ValueError("the feeds need input_ids")
        ids = np.asarray(feeds["input_ids"])
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers of shape (S,) or (B, S), got {ids.dtype} {ids.shape}")
        vocab, limit = self.model["vocab_size"], self.model["max_positions"]
        if ids.min() < 0 or ids.max() >= vocab:
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if limit is not None and ids.shape[1] > limit:
            raise ValueError(f"the input has {ids.shape[1]} tokens; {self.model['name']} allows at most {limit}")
        if ids.shape[0] > self.model["max_batch"]:
            raise ValueError(f"{ids.shape[0]} inputs in one query; the service takes at most {self.model['max_batch']}")
        out = {"input_ids": ids.astype(np.int64)}
        for name in ("attention_mask", "token_type_ids"):
            if feeds.get(name) is not None:
                value = np.asarray(feeds[name])
                value = value[None, :] if value.ndim == 1 else value
                if value.shape != ids.shape or not np.isin(value, (0, 1)).all() or value.dtype.kind not in "iub":
                    raise ValueError(f"{name} must be 0s and 1s of the ids' shape {ids.shape}, got {value.dtype} {value.shape}")
                out[name] = value.astype(np.int64)
        return out

    # --------------------------------------------------------------------- queries

    def query(self, feeds: dict) -> Answer:
        """One query: every output of the model for the feeds, and its batch's cost."""
        forms = self._forms(self._check(feeds))

        def send(rank: int) -> dict:
            return self._json(self._http[rank].post(f"{API}/run", files=forms[rank]))

        replies = self._each(send)
        layouts = [{k: (v["shape"], v.get("scale"), v["dtype"]) for k, v in r["outputs"].items()} for r in replies]
        if any(layout != layouts[0] for layout in layouts) or any(r.get("query") != replies[0].get("query") for r in replies):
            raise ServiceError("the three ranks answered with different outputs: not one service, or a fault")
        outputs = {}
        for name, entry in replies[0]["outputs"].items():
            if "component" in entry:
                total = sum(_decode(r["outputs"][name], "component") for r in replies)  # wraps mod 2^64
                outputs[name] = (total.view(np.int64).astype(np.float64) * entry["scale"]).astype(np.float32)
            else:
                outputs[name] = _decode(entry, "value")
        batches = [r["batch"] for r in replies]
        cost = {
            **{k: batches[0][k] for k in ("queries", "inputs", "tokens")},
            "online_s": max(b["online_s"] for b in batches),
            "bytes": sum(b["bytes"] for b in batches),
            "rounds": batches[0]["rounds"],
            "network_estimates": batches[0].get("network_estimates"),
        }
        return Answer(outputs, cost)

    def _forms(self, feeds: dict, extra: dict | None = None) -> list[dict]:
        """Each rank's multipart form for the checked feeds: the public part and its piece of the ids."""
        ids = feeds["input_ids"]
        pieces = split(ids, self.model["vocab_size"])
        public = {"query": secrets.token_hex(16), **{k: v.tolist() for k, v in feeds.items() if k != "input_ids"}, **(extra or {})}
        dense = next(p.dense for p in pieces if p.dense is not None).astype("<u8").tobytes()  # X2, for ranks 1 and 2
        forms = []
        for piece in pieces:
            meta = {**public, "input_ids": {"shape": list(ids.shape), "seeds": {str(k): s.hex() for k, s in piece.seeds.items()}}}
            parts = {"meta": (None, json.dumps(meta), "application/json")}
            if piece.dense is not None:
                parts["share"] = ("share", dense, "application/octet-stream")
            forms.append(parts)
        return forms

    def generate(
        self, prompt, max_new_tokens: int = 16, temperature: float | None = None, chat: bool = False, on_text=None
    ) -> dict:
        """Text generation by a decoder service: `prompt` is a text (tokenized here; `chat` wraps it in the
        model's chat template) or a 1-D array of ids. The ranks choose every token inside MPC and send
        this client its id in shares, one line per token as it comes; `on_text(piece)` gets the new text
        as it decodes. Returns prompt_ids, new_ids, text and what the generation cost the ranks."""
        if not self.model["decoder"]:
            raise ServiceError(f"{self.model['name']} is an encoder: it cannot generate")
        if isinstance(prompt, str):
            if chat:
                from puma_onnx.runtime.generation import render_chat

                if not self.model.get("chat_template"):
                    raise ValueError(f"{self.model['name']} has no chat template")
                prompt = render_chat(self.model["chat_template"], prompt)
            ids = np.array([self.tokenizer.encode(prompt).ids], np.int64)
        else:
            ids = np.asarray(prompt)
            if not np.issubdtype(ids.dtype, np.integer) or ids.ndim not in (1, 2) or (ids.ndim == 2 and ids.shape[0] != 1):
                raise ValueError(f"a prompt's ids are integers of shape (S,) or (1, S), got {ids.dtype} {ids.shape}")
            ids = ids.reshape(1, -1).astype(np.int64)
        limit = self.model["max_positions"]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError("max_new_tokens must be an integer of at least 1")
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise ValueError(
                f"the prompt has {ids.shape[1]} tokens; {self.model['name']} allows at most {limit - max_new_tokens} "
                f"before {max_new_tokens} new ones"
            )
        forms = self._forms(self._check({"input_ids": ids}), {"generate": {"max_new_tokens": max_new_tokens, "temperature": temperature}})
        lines: queue.Queue = queue.Queue()

        def listen(rank: int) -> None:
            """Every line of this rank's answer into `lines`; the last item is always ("end", ...) or an error."""
            try:
                with self._http[rank].stream("POST", f"{API}/generate", files=forms[rank]) as response:
                    if response.status_code != 200:
                        response.read()
                        lines.put((rank, "error", self._error_text(response)))
                        return
                    for line in response.iter_lines():
                        if line:
                            body = json.loads(line)
                            lines.put((rank, "end" if body.get("done") else "line", body))
                            if body.get("done"):
                                return
                lines.put((rank, "error", f"rank {rank}'s answer ended before its last line"))
            except Exception as e:  # noqa: BLE001 - reported in the caller's thread
                lines.put((rank, "error", f"{type(e).__name__}: {e}"))

        threads = [threading.Thread(target=listen, args=(r,), daemon=True) for r in range(RANKS)]
        for t in threads:
            t.start()
        tokens: dict[int, dict[int, np.ndarray]] = {}  # step -> rank -> component
        ends: dict[int, dict] = {}
        new_ids: list[int] = []
        decoded = ""
        while len(ends) < RANKS:
            rank, kind, body = lines.get()
            if kind == "error":
                raise ServiceError(body)
            if kind == "end":
                ends[rank] = body
                continue
            tokens.setdefault(body["step"], {})[rank] = _decode(body["token"], "component")
            while len(tokens.get(len(new_ids), {})) == RANKS:  # the next token's three components are in
                new_ids.append(int(sum(tokens.pop(len(new_ids)).values()).view(np.int64).reshape(-1)[0]))
                if on_text is not None and self.model["tokenizer"]:
                    text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                    if not text.endswith("\ufffd"):
                        on_text(text[len(decoded) :])
                        decoded = text
        for t in threads:
            t.join()
        if tokens or len({e["batch"]["new_tokens"] for e in ends.values()} | {len(new_ids)}) != 1:
            raise ServiceError("the three ranks streamed different numbers of tokens")
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True) if self.model["tokenizer"] else None
        batch = ends[0]["batch"]
        cost = {**batch, "bytes": sum(e["batch"]["bytes"] for e in ends.values()),
                "online_s": max(e["batch"]["online_s"] for e in ends.values())}
        cost.pop("steps", None)
        return {"prompt_ids": ids[0].tolist(), "new_ids": new_ids, "text": text, "stopped": bool(ends[0].get("stopped")),
                "cost": cost}

    @staticmethod
    def _error_text(response) -> str:
        try:
            return response.json().get("error", f"HTTP {response.status_code}")
        except ValueError:
            return f"HTTP {response.status_code}"

    def run(self, feeds: dict, output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs for `feeds` (input_ids, optional attention_mask and token_type_ids; (B, S) or (S,)),
        by name, as onnxruntime's InferenceSession.run computes them; `output_names` picks some."""
        outputs = self.query(feeds).outputs
        if output_names is None:
            return outputs
        missing = [n for n in output_names if n not in outputs]
        if missing:
            raise ValueError(f"the model has no output {missing[0]!r} (it has {sorted(outputs)})")
        return {n: outputs[n] for n in output_names}

    def embed(self, texts) -> np.ndarray:
        """One vector per text: the model's sentence_embedding output when it has one, else the mean of
        its first output over the attention mask."""
        if self.model["decoder"]:
            raise ServiceError(f"{self.model['name']} is a decoder: embed needs an encoder")
        feeds = self.tokenize(texts)
        outputs = self.run({k: v for k, v in feeds.items() if k in self.model["inputs"]})
        if "sentence_embedding" in outputs:
            return outputs["sentence_embedding"]
        hidden = outputs[self.model["outputs"][0]]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        return (hidden * mask).sum(axis=1) / mask.sum(axis=1)
