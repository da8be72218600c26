"""One secure inference: roles, setup, input, the walk, output and report.

Roles: rank 0 is the model owner (the only rank that reads the model file),
rank 1 the client (the only rank that reads the input and learns the output),
rank 2 a helper. In order:

1. the owner loads the model, rewriting it if needed, and checks every op on
   secret data has a kernel; it sends the graph without its secret weights,
   the tokenizer (public) and the input specification to the others;
2. the client reads and checks its input; public inputs (attention mask,
   position ids) go to everyone in the clear, token ids stay with the client;
3. the owner secret-shares every weight (setup);
4. all ranks walk the graph (online); the client alone receives the outputs;
5. the client gathers every rank's counters and writes the report.

A problem found by the owner or the client in steps 1-2 reaches every rank as
one line before any share moves (`UserError`).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from puma_onnx.models import REGISTRY
from puma_onnx.passes.last_position import last_position_logits, lm_head
from puma_onnx.passes.secrecy import PUBLIC_INPUTS

from . import approx, arith
from .comm import Communicator, Cost
from .executor import Executor, layer_of, parse_nodes, unsupported
from .kernels import Context, Private, Scaled
from .party import DEFAULT_MSB_BITS, Party
from .ranges import RANGE_KEYS, RangeError, plan_kernels
from .ring import FixedPoint
from .shares import AShare
from .weights import WeightShare, share_weights
from .wire import broadcast_bytes, broadcast_json, gather_json

OWNER, CLIENT, HELPER = 0, 1, 2
REWRITTEN_FILE = "model.puma.onnx"
ORIGINAL_FILE = "model.onnx"
# A decoder's cache inputs; its outputs of the same name start with PRESENT_PREFIX.
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


class UserError(Exception):
    """A problem the user can fix; every rank prints it as one line and exits non-zero."""


@dataclass
class RunOptions:
    model: str
    text: str | None = None
    input_ids: str | None = None
    seq_len: int | None = None
    output: str | None = None
    report: str | None = None
    profile: bool = False
    frac_bits: int = 18
    progress: bool = True
    all_logits: bool = False  # a decoder's logits at every position, not only the last


def agree(comm: Communicator, root: int, step, others_see: str | None = None):
    """Run step() on `root`; a UserError there is raised on every rank. Returns step's result on root.

    The other ranks get the same message, or `others_see` when the details are root's own
    business (the client's token ids are its secret even when they are wrong).
    """
    result, error = None, None
    if comm.rank == root:
        try:
            result = step()
        except UserError as e:
            error = str(e)
    said = broadcast_json(comm, {"error": error if others_see is None else bool(error)}, root)["error"]
    if said:
        raise UserError(error if comm.rank == root else others_see or said)
    return result


# ----------------------------------------------------------------------------- the owner's side


def _model_paths(path: Path) -> tuple[Path, Path]:
    """(the .onnx file to load, the folder with puma.json and tokenizer.json)."""
    if path.is_dir():
        rewritten, original = path / REWRITTEN_FILE, path / ORIGINAL_FILE
        if rewritten.exists():
            return rewritten, path
        if original.exists():
            return original, path
        raise UserError(f"model folder {str(path)!r} has neither {REWRITTEN_FILE} nor {ORIGINAL_FILE}")
    if path.is_file():
        return path, path.parent
    if str(path) in REGISTRY:
        return _model_paths(_registry_export(str(path)))
    known = ", ".join(REGISTRY)
    raise UserError(f"model {str(path)!r} not found (neither a file, a folder nor a registry name: {known})")


def _registry_export(name: str) -> Path:
    """The cached export of a registry model, made on first use (`puma_onnx.export.cached_export`)."""
    from puma_onnx.export import ExportError, cached_export

    try:
        return cached_export(name)
    except ImportError as e:
        raise UserError(
            f"{name} is not exported yet and this rank cannot export it ({e.name} is not installed): "
            f"run puma-onnx export {name} -o DIR where the export extra is installed, then pass DIR"
        ) from None
    except ExportError as e:
        raise UserError(str(e)) from None


def is_rewritten(model: onnx.ModelProto) -> bool:
    return any(f.domain == "puma" for f in model.functions)


def load_model(
    path_str: str, frac_bits: int = 18, msb_bits: int = DEFAULT_MSB_BITS, all_logits: bool = False
) -> tuple[onnx.ModelProto, dict, list[str]]:
    """The rewritten model, its public info, and the names of the secret initializers (owner only).

    The info holds the approximation set and every secure kernel's planned variant (`ranges`),
    checked against the activation ranges puma.json records, so a range no kernel covers stops
    here, before any share moves.
    """
    from puma_onnx.passes import UnsupportedSecretOps, analyze, rewrite
    from puma_onnx.passes.functions import APPROX_KEY

    path, folder = _model_paths(Path(path_str))
    meta = _read_metadata(folder / "puma.json")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises several kinds on a corrupt file
        raise UserError(f"cannot read ONNX model {str(path)!r}: {e}") from None
    if not is_rewritten(model):
        try:
            model, _ = rewrite(model, meta.get("approx", approx.DEFAULT))
        except (UnsupportedSecretOps, ValueError) as e:  # ValueError: an unknown approximation set
            raise UserError(str(e).replace("\n", ";")) from None
    decoder = lm_head(model) is not None
    if decoder and not all_logits:
        model = last_position_logits(model)
    levels = analyze(model)
    secret_weights = [t.name for t in model.graph.initializer if levels.get(t.name) == "secret"]
    _check_encodable(model, set(secret_weights), FixedPoint(frac_bits))
    nodes = parse_nodes(model.graph)
    missing = unsupported(nodes, lambda name: levels.get(name) == "secret")
    if missing:
        raise UserError("no secure kernel for: " + "; ".join(missing))
    # Models rewritten before the set was recorded carry PUMA's functions.
    fits = {p.key: p.value for p in model.metadata_props}.get(APPROX_KEY, approx.PUMA.name)
    if fits not in approx.SETS:
        raise UserError(f"{str(path)!r} names an unknown approximation set {fits!r} (known: {', '.join(approx.SETS)})")
    recorded = _recorded_ranges(meta, folder / "puma.json")
    try:
        plan = plan_kernels(
            nodes, lambda name: levels.get(name) == "secret", recorded, frac_bits, msb_bits, weights=_constants(model)
        )
    except RangeError as e:
        raise UserError(str(e)) from None
    tokenizer_file = folder / "tokenizer.json"
    shapes = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    info = {
        "name": meta.get("model", path.stem),
        "max_positions": meta.get("max_positions"),
        "tokenizer": tokenizer_file.read_text() if tokenizer_file.exists() else None,
        "chat_template": _chat_template(folder),
        "eos_token_id": meta.get("eos_token_id"),
        "decoder": decoder,
        "inputs": [i.name for i in model.graph.input],
        "past": past_inputs(shapes),
        "vocab": _vocab_limits(model),
        "approx": fits,
        "ranges": "recorded" if recorded else "defaults",
        "plan": plan,
    }
    return model, info, secret_weights


def _chat_template(folder: Path) -> str | None:
    """The tokenizer's chat template, when the export has one (public, like the tokenizer)."""
    standalone = folder / "chat_template.jinja"
    if standalone.exists():
        return standalone.read_text()
    config = folder / "tokenizer_config.json"
    if config.exists():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except ValueError:
            return None
        return template if isinstance(template, str) else None
    return None


def _read_metadata(meta_file: Path) -> dict:
    if not meta_file.exists():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {str(meta_file)!r}: {e}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{str(meta_file)!r} is not a JSON object")
    return meta


def _recorded_ranges(meta: dict, meta_file: Path) -> dict | None:
    """puma.json's per-node ranges, checked: finite non-negative numbers under the known keys."""
    ranges = meta.get("ranges")
    if ranges is None:
        return None
    nodes = ranges.get("nodes") if isinstance(ranges, dict) else None
    if not isinstance(nodes, dict):
        raise UserError(f"{str(meta_file)!r}: 'ranges' must hold a 'nodes' object (re-export the model)")
    for name, seen in nodes.items():
        ok = isinstance(seen, dict) and set(seen) <= RANGE_KEYS and all(
            isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in seen.values()
        )
        if not ok:
            raise UserError(f"{str(meta_file)!r}: the ranges of node {name!r} are malformed: {seen!r}")
    return nodes or None


def _constants(model: onnx.ModelProto) -> Callable[[str], np.ndarray]:
    """name -> array for initializers and Constant outputs, through Identity nodes (exporters alias
    equal weights that way); read on demand, the owner plans with them. KeyError for anything else."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def value(name: str) -> np.ndarray:
        while name not in tensors and name in alias:
            name = alias[name]
        return numpy_helper.to_array(tensors[name])

    return value


def _check_encodable(model: onnx.ModelProto, names: set[str], fxp: FixedPoint) -> None:
    """Every secret weight fits the fixed-point range, checked before any share moves."""
    for t in model.graph.initializer:
        if t.name in names:
            worst = float(np.abs(numpy_helper.to_array(t)).max(initial=0.0))
            if not worst < fxp.bound:
                raise UserError(
                    f"weight {t.name!r} does not fit fixed point with {fxp.frac_bits} fractional bits "
                    f"(|x| < {fxp.bound:.4g})"
                )


def _vocab_limits(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input used as embedding ids: the number of rows of its table."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    limits = {}
    for node in model.graph.node:
        if node.domain == "puma" and node.op_type == "Embedding" and node.input[1] in inputs:
            limits[node.input[1]] = int(dims[node.input[0]][0])
    return limits


def skeleton(model: onnx.ModelProto, secret_weights: list[str]) -> tuple[bytes, list]:
    """The model without its secret initializers (bytes), and their (name, shape) list.

    Built field by field: copying the whole model first would hold every weight twice.
    """
    secret = set(secret_weights)
    graph = onnx.GraphProto(name=model.graph.name)
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    graph.initializer.extend(t for t in model.graph.initializer if t.name not in secret)
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name, graph=graph)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    manifest = [(t.name, list(t.dims)) for t in model.graph.initializer if t.name in secret]
    return light.SerializeToString(), manifest


# ----------------------------------------------------------------------------- the client's side


def read_ids(opts: RunOptions, info: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(ids, attention mask or None, token type ids or None), ids shaped (1, S); checked."""
    given = [o for o in ("text", "input_ids", "seq_len") if getattr(opts, o) is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --text, --input-ids or --seq-len")
    mask = types = None
    vocab = info["vocab"].get("input_ids")
    if opts.text is not None:
        if info["tokenizer"] is None:
            raise UserError(f"model {info['name']!r} has no tokenizer; use --input-ids or --seq-len")
        from tokenizers import Tokenizer

        encoding = Tokenizer.from_str(info["tokenizer"]).encode(opts.text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        types = np.array([encoding.type_ids], dtype=np.int64)
    elif opts.input_ids is not None:
        try:
            ids = np.load(opts.input_ids, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --input-ids {opts.input_ids!r}: {e}") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"--input-ids must hold integers, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise UserError(f"--input-ids must have shape (S,) or (1, S), got {ids.shape}")
        ids = ids.astype(np.int64)
    else:
        if opts.seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {opts.seq_len}")
        rng = np.random.default_rng()
        ids = rng.integers(0, vocab or 2, size=(1, opts.seq_len), dtype=np.int64)
    if ids.shape[1] < 1:
        raise UserError("the input has no tokens")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise UserError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    limit = info["max_positions"]
    if limit is not None and ids.shape[1] > limit:
        raise UserError(f"the input has {ids.shape[1]} tokens; {info['name']} allows at most {limit}")
    return ids, mask, types


def past_inputs(inputs) -> dict[str, list[int]]:
    """(heads, head_dim) of every past key/value input of a decoder exported with its cache, from
    (name, shape) pairs (shapes (batch, heads, past, head_dim))."""
    return {name: [int(shape[1]), int(shape[3])] for name, shape in inputs if name.startswith(PAST_PREFIX)}


def model_feeds(names: list[str], ids: np.ndarray, mask: np.ndarray | None = None, types=None, past=None) -> dict:
    """The graph inputs `names` for token ids (B, S): the mask (ones by default), token types (zeros)
    and position ids (counting kept tokens) that Hugging Face exports take, and an empty cache for
    the `past` inputs ({name: (heads, head_dim)}, see past_inputs) of a decoder's first step."""
    if mask is None:
        mask = np.ones_like(ids)
    values = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids) if types is None else types,
        "position_ids": np.clip(np.cumsum(mask, axis=1) - 1, 0, None),
    }
    for name, (heads, dim) in (past or {}).items():
        values[name] = np.zeros((ids.shape[0], heads, 0, dim), np.float32)
    unknown = [name for name in names if name not in values]
    if unknown:
        raise UserError(f"the model wants inputs puma-onnx cannot make: {', '.join(unknown)}")
    return {name: values[name] for name in names}


def client_feeds(opts: RunOptions, info: dict) -> dict:
    """Public inputs in the clear, and the shapes of the private ones (client only); not the cache."""
    ids, mask, types = read_ids(opts, info)
    return model_feeds([n for n in info["inputs"] if n not in info["past"]], ids, mask, types)


def empty_cache(info: dict, batch: int = 1) -> dict[str, AShare]:
    """A decoder's empty key/value cache (past length 0), as shares of nothing."""
    out = {}
    for name, (heads, dim) in info["past"].items():
        zero = np.zeros((batch, heads, 0, dim), np.uint64)
        out[name] = AShare(zero, zero)
    return out


def make_feeds(comm: Communicator, raw: dict | None, info: dict) -> dict:
    """Every rank's view of the inputs: public arrays, Private values (value at the client only);
    a decoder's cache starts empty."""
    described = None
    if comm.rank == CLIENT:
        described = {
            name: {"shape": list(v.shape), "data": v.tolist() if name in PUBLIC_INPUTS else None}
            for name, v in raw.items()
        }
    described = broadcast_json(comm, described, CLIENT)
    feeds = {}
    for name, d in described.items():
        if name in PUBLIC_INPUTS:
            feeds[name] = np.array(d["data"], dtype=np.int64).reshape(d["shape"])
        else:
            feeds[name] = Private(CLIENT, tuple(d["shape"]), raw[name] if comm.rank == CLIENT else None)
    return {**feeds, **empty_cache(info)}


# ----------------------------------------------------------------------------- the run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reveal_outputs(party: Party, outputs: dict) -> dict[str, np.ndarray]:
    """The graph outputs, opened to the client only (decoded there). A decoder's key/value cache
    (present.*) is not an answer: it stays secret (opening it would show intermediate activations)."""
    opened = {}
    with party.comm.tag("reveal_outputs"):
        for name, value in outputs.items():
            if name.startswith(PRESENT_PREFIX):
                continue
            if isinstance(value, (WeightShare, Scaled)):
                value = Context(party).secret(value)
            if isinstance(value, AShare):
                ring = arith.reveal(party, value, to=CLIENT)
                if party.rank == CLIENT:
                    opened[name] = party.fxp.decode(ring).astype(np.float32)
            elif isinstance(value, Private):
                raise UserError(f"output {name!r} is a private input passed through; nothing to compute")
            elif party.rank == CLIENT:
                opened[name] = np.asarray(value)
    return opened


class Progress:
    """A per-layer progress bar on the client's stderr, shown only for runs longer than 2 s."""

    def __init__(self, executor: Executor, enabled: bool):
        self.bar = None
        self.seen = set()
        if enabled and executor.layers:
            from tqdm import tqdm

            self.bar = tqdm(total=len(executor.layers), unit="layer", delay=2.0, file=sys.stderr, leave=False)

    def __call__(self, node) -> None:
        layer = layer_of(node.name)
        if self.bar is not None and layer is not None and layer not in self.seen:
            if self.seen:
                self.bar.update(1)
            self.seen.add(layer)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()


@dataclass
class Started:
    """A run after its setup, on one rank: the weights are shared and the inputs are in place."""

    party: Party
    info: dict
    executor: Executor
    raw: dict | None  # the client's own inputs (None elsewhere)
    feeds: dict  # every rank's view of them, for the first walk
    extra: object  # what the client's input step decided beside the inputs (generation.Prompt; None elsewhere)
    start: float
    setup_s: float
    setup: Cost
    online_from: Cost  # the counters when the weights were shared


def start(
    comm: Communicator,
    opts: RunOptions,
    client_input: Callable[[dict], tuple[dict, object]],
    check: Callable[[dict], None] | None = None,
) -> Started:
    """Setup up to the first walk: keys, the model (owner), its public parts, the client's input
    (`client_input(info)` -> (raw inputs, anything else), run on the client), the shared weights.
    `check(info)` runs on every rank on the public model info and raises UserError alike everywhere.

    Every check, the owner's and the client's, happens before the weights are shared.
    """
    began = time.perf_counter()
    party = Party.setup(comm, frac_bits=opts.frac_bits)
    r = comm.rank

    loaded = agree(comm, OWNER, lambda: load_model(opts.model, opts.frac_bits, party.msb_bits, opts.all_logits))
    light = manifest = info = None
    if r == OWNER:
        model, info, secret_weights = loaded
        light, manifest = skeleton(model, secret_weights)
        if info["ranges"] == "defaults":
            print(
                f"puma-onnx: {info['name']} has no recorded activation ranges (puma-onnx export records them): "
                "the norms assume |x| <= 2^15 and var in [2^-16, 2^30], other kernels |x| < 2^29",
                file=sys.stderr,
            )
    light = broadcast_bytes(comm, light, OWNER)
    public = broadcast_json(comm, {"info": info, "manifest": manifest} if r == OWNER else None, OWNER)
    info, manifest = public["info"], public["manifest"]
    if check is not None:
        check(info)

    taken = agree(
        comm, CLIENT, lambda: client_input(info),
        others_see=f"rank {CLIENT} (the client) rejected its input; it printed why",
    )
    raw, extra = taken if r == CLIENT else (None, None)
    feeds = make_feeds(comm, raw, info)
    before_setup = comm.stats.snapshot()

    setup_start = time.perf_counter()
    initializers = {t.name: t for t in model.graph.initializer} if r == OWNER else {}
    if r == OWNER:
        del model, loaded

    def weight(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers.pop(name))

    weights = share_weights(party, manifest, weight)
    initializers.clear()
    setup_s = time.perf_counter() - setup_start
    after_setup = comm.stats.snapshot()
    executor = Executor(party, onnx.load_from_string(light), weights, approx.lookup(info["approx"]), info["plan"])
    return Started(party, info, executor, raw, feeds, extra, began, setup_s, after_setup - before_setup, after_setup)


def costs(comm: Communicator, started: Started, stats: list, extra: dict | None = None) -> list | None:
    """Every rank's online and setup counters, memory and per-op bytes (`stats`), and its `extra`
    (JSON-able), at the client."""
    online = comm.stats.snapshot() - started.online_from
    mine = {
        **(extra or {}),
        "bytes_online": online.bytes,
        "rounds_online": online.rounds,
        "messages_online": online.messages,
        "bytes_setup": started.setup.bytes,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "op_bytes": [s.bytes for s in stats],
        "by_protocol": {k: [c.bytes, c.rounds] for k, c in comm.stats.by_protocol().items()},
    }
    return gather_json(comm, mine, CLIENT)


def base_report(started: Started, everyone: list, opts: RunOptions, online_s: float, stats: list) -> dict:
    """The report's keys every command shares (see the README), at the client."""
    info = started.info
    return {
        "model": info["name"],
        "inputs": {name: list(v.shape) for name, v in started.raw.items()},
        "wall_s": round(time.perf_counter() - started.start, 3),
        "setup_s": round(started.setup_s, 3),
        "online_s": round(online_s, 3),
        "bytes_sent": [e["bytes_online"] for e in everyone],
        "bytes_sent_total": sum(e["bytes_online"] for e in everyone),
        "rounds": [e["rounds_online"] for e in everyone],
        "messages": [e["messages_online"] for e in everyone],
        "setup_bytes_sent": [e["bytes_setup"] for e in everyone],
        "peak_rss_mb": [e["peak_rss_mb"] for e in everyone],
        "frac_bits": opts.frac_bits,
        "approx": info["approx"],
        "ranges": info["ranges"],
        "plan": info["plan"],
        "per_op": [
            {
                "name": s.name,
                "layer": s.layer,
                "op_type": s.op_type,
                "time_s": round(s.time_s, 6),
                "bytes": sum(e["op_bytes"][i] for e in everyone),
                "rounds": s.rounds,
            }
            for i, s in enumerate(stats)
        ],
        "by_protocol": {
            k: {"bytes": sum(e["by_protocol"].get(k, [0, 0])[0] for e in everyone), "rounds": v[1]}
            for k, v in everyone[CLIENT]["by_protocol"].items()
        },
    }


def run(comm: Communicator, opts: RunOptions) -> dict | None:
    """One secure inference on this rank; the client returns the report, the others None."""
    started = start(comm, opts, lambda info: (client_feeds(opts, info), None))
    executor = started.executor
    progress = Progress(executor, opts.progress and comm.rank == CLIENT)
    online_start = time.perf_counter()
    outputs = executor.run(started.feeds, on_node=progress)
    opened = reveal_outputs(started.party, outputs)
    online_s = time.perf_counter() - online_start
    progress.close()
    everyone = costs(comm, started, executor.stats)
    if comm.rank != CLIENT:
        return None
    report = base_report(started, everyone, opts, online_s, executor.stats)
    report["outputs"] = opened
    return report
