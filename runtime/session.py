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
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from puma_onnx.models import REGISTRY
from puma_onnx.passes.last_position import last_position_logits, lm_head
from puma_onnx.passes.secrecy import PUBLIC_INPUTS

from . import approx, arith, network
from .comm import Communicator, Cost
from .executor import PRESENT_PREFIX, Executor, layer_of, parse_nodes, unsupported
from .kernels import FLAT_ORDER, Context, Held, Private, Scaled, Softmaxed, Unscaled, is_secret
from .padding import pad_encodings
from .party import DEFAULT_MSB_BITS, Party
from .positions import position_limit
from .ranges import RANGE_KEYS, RangeError, plan_kernels
from .ring import FixedPoint
from .shares import AShare
from .store import StoreError, TensorStore, is_external, is_synthetic
from .weights import CACHED_BYTES, WeightShare, WeightStream, caches_fit, keep_resident, layer_groups, share_weights
from .wire import barrier, broadcast_bytes, broadcast_json, gather_json

OWNER, CLIENT, HELPER = 0, 1, 2
REWRITTEN_FILE = "model.puma.onnx"
ORIGINAL_FILE = "model.onnx"
# A decoder's cache inputs; its outputs of the same name start with PRESENT_PREFIX.
PAST_PREFIX = "past_key_values."
# Weights stay resident (shared once, kept for every walk) while the largest per-rank form, rank 1's
# 8 bytes per weight, takes at most this; larger models stream their weights layer by layer.
WEIGHT_BUDGET = 4 << 30


class UserError(Exception):
    """A problem the user can fix; every rank prints it as one line and exits non-zero."""


@dataclass
class RunOptions:
    model: str
    text: str | tuple[str, ...] | None = None  # several texts: a batch, padded (`read_ids`)
    input_ids: str | None = None
    seq_len: int | None = None
    output: str | None = None
    report: str | None = None
    profile: bool = False
    frac_bits: int = 18
    progress: bool = True
    all_logits: bool = False  # a decoder's logits at every position, not only the last
    truncate: bool = False  # cut a --text longer than the model's positions (else an error)
    timeout: float = 300.0  # seconds a rank waits for a silent peer before the job ends
    networks: tuple[str, ...] = ()  # more BANDWIDTH,RTT settings for the report's network_estimates
    simulate_network: str | None = None  # BANDWIDTH,RTT: every round takes as long as over that link
    weight_budget: int = WEIGHT_BUDGET  # bytes per rank the shared weights may keep; past it they stream


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
) -> tuple[onnx.ModelProto, dict, list[str], TensorStore]:
    """The rewritten model (without its external data), its public info, the names of the secret
    initializers and the store that reads them one at a time (owner only).

    The info holds the approximation set and every secure kernel's planned variant (`ranges`),
    checked against the activation ranges puma.json records, so a range no kernel covers stops
    here, before any share moves. Missing or truncated external data stops here too.
    """
    from puma_onnx.passes import UnsupportedSecretOps, analyze, rewrite
    from puma_onnx.passes.functions import APPROX_DIGEST_KEY, APPROX_KEY

    path, folder = _model_paths(Path(path_str))
    meta = _read_metadata(folder / "puma.json")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several kinds on a corrupt file
        raise UserError(f"cannot read ONNX model {str(path)!r}: {e}") from None
    store = TensorStore(model, path.parent)
    try:
        store.check()
    except StoreError as e:
        raise UserError(str(e)) from None
    _check_opset(model, path)
    _check_shapes(model, path)
    if not is_rewritten(model):
        if store.any_synthetic:
            raise UserError(f"{str(path)!r} has synthetic weights but is not rewritten; export it again")
        if any(is_external(t) for t in model.graph.initializer):  # the rewriter needs the tensors loaded
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        try:
            model, _ = rewrite(model, meta.get("approx", approx.DEFAULT))
        except (UnsupportedSecretOps, ValueError) as e:  # ValueError: an unknown approximation set
            raise UserError(str(e).replace("\n", ";")) from None
    decoder = lm_head(model) is not None
    if decoder and not all_logits:
        model = last_position_logits(model)
    store = TensorStore(model, path.parent)
    levels = analyze(model)
    secret_weights = [t.name for t in model.graph.initializer if levels.get(t.name) == "secret"]
    synthetic_public = [t.name for t in model.graph.initializer if is_synthetic(t) and t.name not in secret_weights]
    if synthetic_public:
        raise UserError(f"{str(path)!r}: synthetic weight {synthetic_public[0]!r} is not a secret weight")
    _check_encodable(store, secret_weights, FixedPoint(frac_bits))
    nodes = parse_nodes(model.graph)
    missing = unsupported(nodes, lambda name: levels.get(name) == "secret")
    if missing:
        raise UserError("no secure kernel for: " + "; ".join(missing))
    # Models rewritten before the set was recorded carry PUMA's functions.
    props = {p.key: p.value for p in model.metadata_props}
    fits = props.get(APPROX_KEY, approx.PUMA.name)
    if fits not in approx.SETS:
        raise UserError(f"{str(path)!r} names an unknown approximation set {fits!r} (known: {', '.join(approx.SETS)})")
    # PUMA's constants are the paper's and never change; a rewrite that records no digest otherwise predates them.
    digest = props.get(APPROX_DIGEST_KEY)
    if digest != approx.SETS[fits].digest and not (digest is None and fits == approx.PUMA.name):
        raise UserError(
            f"{str(path)!r} was rewritten with other {fits!r} approximations than this version's (its functions "
            "would not match the secure kernels); export it again"
        )
    recorded = _recorded_ranges(meta, folder / "puma.json")
    try:
        plan = plan_kernels(
            nodes, lambda name: levels.get(name) == "secret", recorded, frac_bits, msb_bits, weights=_constants(model, store)
        )
    except RangeError as e:
        raise UserError(str(e)) from None
    tokenizer_file = folder / "tokenizer.json"
    shapes = [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    info = {
        "name": meta.get("model", path.stem),
        "max_positions": meta.get("max_positions") or position_limit(model),
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
        "synthetic_weights": any(store.synthetic(name) for name in secret_weights),
    }
    return model, info, secret_weights, store


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    """The default-domain opset is one this onnx knows (its reference ops run the public nodes)."""
    known = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not 7 <= opset.version <= known:
            raise UserError(f"{str(path)!r} uses ONNX opset {opset.version}; this onnx runs opsets 7 to {known}")


def _check_shapes(model: onnx.ModelProto, path: Path) -> None:
    """Shapes that cannot fit together (a matmul's inner dimensions, say) stop here, not mid-run.

    Strict shape inference on the graph with its float initializers declared rather than stored
    (their values do not shape anything): milliseconds instead of a copy of every weight.
    """
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL):
            graph.initializer.append(t)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        onnx.shape_inference.infer_shapes(light, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{str(path)!r} has shapes that do not fit together: {first}") from None


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
    for key, (fits, wanted) in _METADATA.items():
        if key in meta and not fits(meta[key]):
            raise UserError(f"{str(meta_file)!r}: {key!r} must be {wanted}, got {meta[key]!r} (re-export the model)")
    return meta


def _is_int(value, least: int) -> bool:
    """A JSON integer (not a boolean) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_count(value) -> bool:
    return _is_int(value, 1)


def _is_token_ids(value) -> bool:
    return value is None or all(_is_int(v, 0) for v in (value if isinstance(value, list) else [value]))


# The puma.json keys the runtime reads, and what each must hold.
_METADATA = {
    "model": (lambda v: isinstance(v, str) and v != "", "a name"),
    "approx": (lambda v: isinstance(v, str), "an approximation set's name"),
    "max_positions": (lambda v: v is None or _is_count(v), "a positive integer or null"),
    "eos_token_id": (_is_token_ids, "a token id, a list of them or null"),
}


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


def _constants(model: onnx.ModelProto, store: TensorStore) -> Callable[[str], np.ndarray]:
    """name -> array for initializers and Constant outputs, through Identity nodes (exporters alias
    equal weights that way); read on demand, the owner plans with them. KeyError for anything else."""
    tensors = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors.update({node.output[0]: a.t for a in node.attribute if a.name == "value"})
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}

    def value(name: str) -> np.ndarray:
        while name not in tensors and name not in store.tensors and name in alias:
            name = alias[name]
        return numpy_helper.to_array(tensors[name]) if name in tensors else store.read(name)

    return value


def _check_encodable(store: TensorStore, names: list[str], fxp: FixedPoint) -> None:
    """Every secret weight fits the fixed-point range, checked before any share moves (one weight
    read at a time)."""
    for name in names:
        try:
            worst = store.bound(name)
        except StoreError as e:
            raise UserError(str(e)) from None
        if not worst < fxp.bound:
            raise UserError(
                f"weight {name!r} does not fit fixed point with {fxp.frac_bits} fractional bits "
                f"(|x| < {fxp.bound:.4g})"
            )


def _vocab_limits(model: onnx.ModelProto) -> dict[str, int]:
    """For each graph input used as embedding ids (directly, or through reshapes: GPT-2 flattens its
    ids first): the number of rows of its table."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    made_by = {out: n for n in model.graph.node for out in n.output}
    limits = {}
    for node in model.graph.node:
        if node.domain == "puma" and node.op_type == "Embedding":
            ids = node.input[1]
            while ids in made_by and made_by[ids].domain == "" and ("", made_by[ids].op_type) in FLAT_ORDER:
                ids = made_by[ids].input[0]
            if ids in inputs:
                limits[ids] = int(dims[node.input[0]][0])
    return limits


def skeleton(model: onnx.ModelProto, secret_weights: list[str], store: TensorStore | None = None) -> tuple[bytes, list]:
    """The model without its secret initializers (bytes), and their (name, shape) list; public
    initializers kept in external data are read in (`store`).

    Built field by field: copying the whole model first would hold every weight twice.
    """
    secret = set(secret_weights)
    graph = onnx.GraphProto(name=model.graph.name)
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    graph.initializer.extend(
        (store.embedded(t.name) if store is not None else t) for t in model.graph.initializer if t.name not in secret
    )
    light = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name, graph=graph)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    manifest = [(t.name, list(t.dims)) for t in model.graph.initializer if t.name in secret]
    return light.SerializeToString(), manifest


# ----------------------------------------------------------------------------- the client's side


_NPY_MAGIC = b"\x93NUMPY"


def _tokenize(opts: RunOptions, info: dict, limit: int, allows: str):
    """The texts' ids, masks and token types, (B, S); never padded beyond the longest text; longer than
    `limit` is an error (`allows` says why) unless --truncate, which says on the client's stderr what
    it dropped. Several texts are padded to the longest with id 0 and mask 0: on the right, or on the
    left for a decoder (so that the last position, the one the LM head reads, is every row's own)."""
    if info["tokenizer"] is None:
        raise UserError(f"model {info['name']!r} has no tokenizer; use --input-ids or --seq-len")
    texts = [opts.text] if isinstance(opts.text, str) else list(opts.text)
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("--text is not valid UTF-8") from None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(info["tokenizer"])
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rows = [_encode(tokenizer, text, opts.truncate, limit, allows) for text in texts]
    return pad_encodings(rows, left=bool(info.get("decoder")))


def _encode(tokenizer, text: str, truncate: bool, limit: int, allows: str):
    """One text's encoding, cut to `limit` tokens with --truncate (said on stderr), else an error."""
    encoding = tokenizer.encode(text)
    if len(encoding.ids) > limit:
        if not truncate:
            raise UserError(f"the text has {len(encoding.ids)} tokens; {allows} (--truncate cuts it)")
        try:
            tokenizer.enable_truncation(limit)
            cut = tokenizer.encode(text)
            tokenizer.no_truncation()
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own kinds
            raise UserError(f"cannot cut the text to {limit} tokens: {e}") from None
        if not 0 < len(cut.ids) <= limit:  # its special tokens alone take more than the limit
            raise UserError(f"cannot cut the text to {limit} tokens; {allows}")
        print(f"puma-onnx: the text has {len(encoding.ids)} tokens; kept the first {len(cut.ids)} (--truncate)", file=sys.stderr)
        encoding = cut
    if not encoding.ids:
        raise UserError("the input has no tokens")
    return encoding


def _load_ids(path: str) -> np.ndarray:
    """--input-ids: a .npy file of integers, shape (S,) or (B, S) (a batch), read without pickles and memory-mapped
    (nothing of the size its header claims is allocated before the caller checks the length)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(_NPY_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read --input-ids {path!r}: {e.strerror}") from None
    if magic != _NPY_MAGIC:
        kind = "a .npz archive" if magic.startswith(b"PK") else "not a .npy file"
        raise UserError(f"--input-ids {path!r} is {kind}: save the ids with numpy.save(path, ids)")
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --input-ids {path!r}: {e}") from None
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"--input-ids must hold integers, got dtype {ids.dtype}")
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise UserError(f"--input-ids must have shape (S,) or (B, S), got {ids.shape}")
    return ids


# The longest input of a model whose positions are unknown (rotary, no puma.json): Llama 3's context.
MAX_TOKENS = 1 << 17


def read_ids(
    opts: RunOptions, info: dict, new_tokens: int = 0
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(ids, attention mask or None, token type ids or None), ids shaped (B, S) (B > 1: a batch, from
    several texts or an ids file of that shape); the length is checked before anything of its size is
    allocated, with room left for `new_tokens` (generation)."""
    given = [o for o in ("text", "input_ids", "seq_len") if getattr(opts, o) is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --text, --input-ids or --seq-len")
    mask = types = None
    vocab = info["vocab"].get("input_ids")
    if info["max_positions"] is not None:
        limit = info["max_positions"] - new_tokens
        allows = f"{info['name']} allows at most {limit} tokens" + (f" before {new_tokens} new ones" if new_tokens else "")
    else:
        limit = MAX_TOKENS - new_tokens
        allows = f"puma-onnx takes at most {limit} tokens when the model's positions are unknown"
    if opts.text is not None:
        ids, mask, types = _tokenize(opts, info, limit, allows)
    elif opts.input_ids is not None:
        ids = _load_ids(opts.input_ids)
    else:
        if opts.seq_len < 1:
            raise UserError(f"--seq-len must be at least 1, got {opts.seq_len}")
        if opts.seq_len > limit:
            raise UserError(f"--seq-len is {opts.seq_len}; {allows}")
        ids = np.random.default_rng().integers(0, vocab or 2, size=(1, opts.seq_len), dtype=np.int64)
    if ids.shape[1] < 1:
        raise UserError("the input has no tokens")
    if ids.shape[1] > limit:
        raise UserError(f"the input has {ids.shape[1]} tokens; {allows}")
    if ids.dtype == np.uint64 and int(ids.max()) > np.iinfo(np.int64).max:
        raise UserError(f"token id {int(ids.max())} is outside the int64 range of token ids")
    ids = np.array(ids, dtype=np.int64)  # a copy: the memory map is closed with it
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids[(ids < 0) | (ids >= vocab)][0])
        raise UserError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    return ids, mask, types


def check_outputs(opts: RunOptions) -> None:
    """The files the client writes at the end (--output, --report) can be written now. Checked before any
    share moves, so no result is lost to a bad path."""
    for path, flag in ((opts.output, "--output"), (opts.report, "--report")):
        if path:
            _check_writable(Path(path), flag)
    if opts.output and opts.report and Path(opts.output).resolve() == Path(opts.report).resolve():
        raise UserError(f"--output and --report both name {opts.output!r}")


def _check_writable(target: Path, flag: str) -> None:
    """An existing file we may overwrite, or a new file in an existing folder that takes one."""
    if target.is_dir():
        raise UserError(f"{flag} {str(target)!r} is a folder; give a file name")
    try:
        if target.exists():
            if not os.access(target, os.W_OK):
                raise PermissionError(13, "Permission denied")
            return
        folder = target.parent
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{flag} {str(target)!r}: {str(folder)!r} is not a folder")
        if not folder.is_dir():
            raise UserError(f"{flag} {str(target)!r}: the folder {str(folder)!r} does not exist")
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".puma-onnx-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {str(target)!r} cannot be written: {e.strerror or e}") from None


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
    """Public inputs in the clear, and the shapes of the private ones (client only); not the cache.
    The files the client will write are checked first."""
    check_outputs(opts)
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
    batch = next((v.shape[0] for v in feeds.values() if len(v.shape) == 2), 1)  # (B, S) inputs
    return {**feeds, **empty_cache(info, batch)}


def token_rows(feeds: dict) -> tuple[int, int] | None:
    """(tokens, batch) of the (B, S) token inputs: the rows of the hidden states, and of an LM head on the
    last position; None without such an input."""
    shape = next((tuple(v.shape) for v in feeds.values() if len(getattr(v, "shape", ())) == 2), None)
    return None if shape is None else (shape[0] * shape[1], shape[0])


# ----------------------------------------------------------------------------- the run


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def answer_share(party: Party, name: str, value) -> tuple[AShare | None, float | np.ndarray]:
    """A graph output as (its share, the public scale that turns the ring value, read as int64, into the
    answer), or (None, the value) when it is public. An untruncated product, or a secret times a public
    factor, stays as it is and the scale carries the rest: no probabilistic truncation's rounding comes
    between the answer and the client (`kernels.Unscaled`)."""
    scale = 2.0 ** -party.fxp.frac_bits
    if isinstance(value, Unscaled):
        return value.share, 2.0 ** -(party.fxp.frac_bits + value.bits)
    if isinstance(value, Scaled):
        return value.share, value.factor * scale
    if isinstance(value, (WeightShare, Softmaxed, Held)):
        return Context(party).secret(value), scale
    if isinstance(value, AShare):
        return value, scale
    if is_secret(value):  # the client's own ids passed through
        raise UserError(f"output {name!r} is a private input passed through; nothing to compute")
    return None, np.asarray(value)


def reveal_outputs(party: Party, outputs: dict) -> dict[str, np.ndarray]:
    """The graph outputs, opened to the client only (decoded there, `answer_share`). A decoder's
    key/value cache (present.*) is not an answer: it stays secret (opening it would show intermediate
    activations)."""
    opened = {}
    with party.comm.tag("reveal_outputs"):
        for name, value in outputs.items():
            if name.startswith(PRESENT_PREFIX):
                continue
            share, scale = answer_share(party, name, value)
            if share is None:
                if party.rank == CLIENT:
                    opened[name] = scale
                continue
            ring = arith.reveal(party, share, to=CLIENT)
            if party.rank == CLIENT:
                opened[name] = (ring.view(np.int64).astype(np.float64) * scale).astype(np.float32)
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

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, failed, *_) -> None:
        """Fill the bar on success; on a failure only clear it, so that the error line starts the line."""
        if self.bar is not None:
            if failed is None:
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
    manifest: list  # the secret weights' (name, shape), public
    masks: Cost = field(default_factory=Cost)  # preparing the weight products' masks (part of `setup`)
    masks_s: float = 0.0
    resident: bool = False  # the weights' forms are kept from walk to walk (`caches`), built in the setup

    def streamed(self) -> tuple[Cost, float]:
        """What sharing streamed weights has cost this rank so far: (counters, seconds)."""
        stream = self.executor.stream
        return (Cost(), 0.0) if stream is None else (stream.cost, stream.time_s)


def start(
    comm: Communicator,
    opts: RunOptions,
    client_input: Callable[[dict], tuple[dict, object]],
    check: Callable[[dict], None] | None = None,
    caches: bool = False,
    check_model: Callable[[onnx.ModelProto, dict], None] | None = None,
    prepare: bool = False,
) -> Started:
    """Setup up to the first walk: keys, the model (owner), its public parts, the client's input
    (`client_input(info)` -> (raw inputs, anything else), run on the client), the shared weights.
    `check(info)` runs on every rank on the public model info and raises UserError alike everywhere;
    `check_model(graph, info)` likewise, with the graph skeleton (no weights) every rank holds.
    `caches`: when they fit, the weights are resident (`weights.keep_resident`: several walks read them)
    and their forms are built in the setup (`Executor.warm_resident`); the memory check counts them.
    `prepare`: the weight products' masks for one walk on these inputs' shapes join the setup
    (`Executor.prepare_products`; not when the weights are streamed).

    Every check, the owner's and the client's, happens before the weights are shared.
    """
    began = time.perf_counter()
    comm.simulate = network.parse_link(opts.simulate_network) if opts.simulate_network else None
    party = Party.setup(comm, frac_bits=opts.frac_bits)
    r = comm.rank

    def load():
        with comm.busy():  # heartbeats: the others wait without a timeout while the owner loads (or exports)
            return load_model(opts.model, opts.frac_bits, party.msb_bits, opts.all_logits)

    loaded = agree(comm, OWNER, load)
    light = manifest = info = store = None
    if r == OWNER:
        model, info, secret_weights, store = loaded
        light, manifest = skeleton(model, secret_weights, store)
        del model, loaded
        # The owner's budget decides for all ranks (a rank streaming while another does not would
        # fall out of step).
        info["streamed"] = weight_bytes(manifest, CLIENT) > opts.weight_budget
        if info["ranges"] == "defaults":
            print(
                f"puma-onnx: {info['name']} has no recorded activation ranges (puma-onnx export records them): "
                "the norms assume |x| <= 2^15 and var in [2^-16, 2^30], other kernels |x| < 2^29",
                file=sys.stderr,
            )
    light = broadcast_bytes(comm, light, OWNER)
    public = broadcast_json(comm, {"info": info, "manifest": manifest} if r == OWNER else None, OWNER)
    info, manifest = public["info"], public["manifest"]
    graph = onnx.load_from_string(light)
    if check is not None:
        check(info)
    if check_model is not None:
        check_model(graph, info)

    taken = agree(
        comm, CLIENT, lambda: client_input(info),
        others_see=f"rank {CLIENT} (the client) rejected its input; it printed why",
    )
    raw, extra = taken if r == CLIENT else (None, None)
    feeds = make_feeds(comm, raw, info)
    executor = Executor(party, graph, {}, approx.lookup(info["approx"]), info["plan"])
    groups, starts = layer_groups(manifest, executor.first_use, lambda i: layer_of(executor.nodes[i].name))
    streamed = info["streamed"]
    hosts = gather_json(comm, {"host": os.uname().nodename, "available": _available_bytes()}, OWNER)
    count = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in manifest)
    cached = CACHED_BYTES if caches and not streamed and caches_fit(count, opts.weight_budget) else 0
    needs = memory_needs(manifest, groups, streamed, cached)
    rows = token_rows(feeds)
    shapes = {n: tuple(sh) for n, sh in manifest}
    masks = executor.mask_bytes(*rows, shapes) if prepare and rows and not streamed else [0] * len(needs)
    # What preparing adds on each rank (`Executor.mask_bytes`); where it does not fit, the products run
    # online and the memory check is the plain one.
    with_masks = [need + extra for need, extra in zip(needs, masks)]
    prepare = any(masks) and broadcast_json(
        comm, {"fits": fits_memory(hosts, with_masks)} if r == OWNER else None, OWNER
    )["fits"]
    if any(masks) and not prepare and r == OWNER:
        print(f"puma-onnx: the weight products' prepared masks (up to {max(masks) / 2**20:.0f} MiB a rank) do not "
              "fit in memory beside the weights: the products run online", file=sys.stderr)
    agree(comm, OWNER, lambda: check_memory(hosts, with_masks if prepare else needs, streamed))
    before_setup = comm.stats.snapshot()

    setup_start = time.perf_counter()
    values = store.read if r == OWNER else None
    if streamed:
        executor.stream = WeightStream(party, manifest, values, groups, starts, executor.last_use)
    else:
        executor.weights = share_weights(party, manifest, values, groups)
    resident = bool(cached) and keep_resident(executor.weights, opts.weight_budget)
    masks_start, before_masks = time.perf_counter(), comm.stats.snapshot()
    if prepare:
        executor.prepare_products(*rows)
    masks_s, masks_cost = time.perf_counter() - masks_start, comm.stats.snapshot() - before_masks
    if resident:  # input-independent: their cost is setup, not the first walk's
        executor.warm_resident()
    setup_cost = comm.stats.snapshot() - before_setup
    # The online phase starts on every rank at once (the owner may still be encoding); the barrier's byte
    # counts in neither phase.
    barrier(comm)
    setup_s = time.perf_counter() - setup_start
    return Started(
        party, info, executor, raw, feeds, extra, began, setup_s, setup_cost, comm.stats.snapshot(), manifest,
        masks_cost, masks_s, resident,
    )


# What a rank keeps per weight, resident: the owner its float32 weights, the client (rank 1) x_1, the
# helper nothing (it regenerates its components from keys). Streamed, the owner keeps them encoded.
KEPT_BYTES = {OWNER: 4, CLIENT: 8, HELPER: 0}
STREAMED_BYTES = {OWNER: 8, CLIENT: 8, HELPER: 0}
# A rank's memory beside its weights: the interpreter, onnx and numpy, the graph, activations (a rough
# floor, for the check before any share moves).
BASE_BYTES = 1 << 30


def weight_bytes(manifest: list, rank: int, indices=None, streamed: bool = False) -> int:
    """Bytes `rank` keeps for the weights (all, or the manifest `indices`) while they are shared."""
    chosen = range(len(manifest)) if indices is None else indices
    per_weight = (STREAMED_BYTES if streamed else KEPT_BYTES)[rank]
    return per_weight * sum(int(np.prod(manifest[i][1], dtype=np.int64)) for i in chosen)


def memory_needs(manifest: list, groups: list[list[int]], streamed: bool, cached_bytes: int = 0) -> list[int]:
    """Each rank's rough peak: BASE_BYTES, its kept weights (all, or the two largest groups when
    streamed: a group's weights read again later, a tied embedding say, outlive it), `cached_bytes`
    per weight (resident only), and a product's temporaries over the largest weight (its operand and
    float64 limbs, 32 bytes per weight)."""
    count = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in manifest)
    largest = max((int(np.prod(shape, dtype=np.int64)) for _, shape in manifest), default=0)
    needs = []
    for rank in (OWNER, CLIENT, HELPER):
        if streamed:
            kept = sum(sorted((weight_bytes(manifest, rank, g, streamed=True) for g in groups), reverse=True)[:2])
        else:
            kept = weight_bytes(manifest, rank) + cached_bytes * count
        needs.append(BASE_BYTES + kept + 32 * largest)
    return needs


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_memory(hosts: list[dict], needs: list[int]) -> bool:
    """Whether `check_memory` passes."""
    try:
        check_memory(hosts, needs, False)
    except UserError:
        return False
    return True


def check_memory(hosts: list[dict], needs: list[int], streamed: bool) -> None:
    """The ranks on each host need no more memory than it has available (`hosts[r]`: rank r's host
    name and available bytes): a clear error before any share moves instead of an out-of-memory kill."""
    by_host: dict[str, list[int]] = {}
    for rank, seen in enumerate(hosts):
        by_host.setdefault(seen["host"], []).append(rank)
    for host, ranks in by_host.items():
        available = hosts[ranks[0]]["available"]
        need = sum(needs[r] for r in ranks)
        if available is not None and need > available:
            hint = "" if streamed else "; a smaller --weight-budget streams the weights layer by layer"
            raise UserError(
                f"ranks {', '.join(map(str, ranks))} on {host} need about {need / 2**30:.1f} GiB "
                f"and {available / 2**30:.1f} GiB is available{hint}"
            )


def costs(comm: Communicator, started: Started, stats: list, extra: dict | None = None) -> list | None:
    """Every rank's online and setup counters, memory and per-op bytes (`stats`), and its `extra`
    (JSON-able), at the client."""
    streamed, streamed_s = started.streamed()
    online = comm.stats.snapshot() - started.online_from - streamed
    mine = {
        **(extra or {}),
        "trace": [[round(c, 6), int(b)] for c, b in comm.trace],
        "tail": round(comm.tail(), 6),
        "bytes_online": online.bytes,
        "rounds_online": online.rounds,
        "messages_online": online.messages,
        "bytes_setup": started.setup.bytes + streamed.bytes,
        "rounds_setup": started.setup.rounds + streamed.rounds,
        "bytes_masks": started.masks.bytes,
        "rounds_masks": started.masks.rounds,
        "weights_s": round(started.setup_s - started.masks_s + streamed_s, 3),
        "masks_s": round(started.masks_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "op_bytes": [s.bytes for s in stats],
        "by_protocol": {k: [c.bytes, c.rounds] for k, c in comm.stats.by_protocol().items()},
    }
    return gather_json(comm, mine, CLIENT)


def base_report(started: Started, everyone: list, opts: RunOptions, online_s: float, stats: list) -> dict:
    """The report's keys every command shares (see the README), at the client. `online_s` is the
    walk's wall time; time spent sharing streamed weights in it is reported under `weights`."""
    info = started.info
    streamed_s = started.streamed()[1]
    return {
        "model": info["name"],
        "inputs": {name: list(v.shape) for name, v in started.raw.items()},
        "wall_s": round(time.perf_counter() - started.start, 3),
        "setup_s": round(started.setup_s, 3),
        "online_s": round(online_s - streamed_s, 3),
        "bytes_sent": [e["bytes_online"] for e in everyone],
        "bytes_sent_total": sum(e["bytes_online"] for e in everyone),
        "rounds": [e["rounds_online"] for e in everyone],
        "messages": [e["messages_online"] for e in everyone],
        "setup_bytes_sent": [e["bytes_setup"] for e in everyone],
        "peak_rss_mb": [e["peak_rss_mb"] for e in everyone],
        "weights": {
            "mode": "streamed" if started.executor.stream is not None else "resident",
            "synthetic": info.get("synthetic_weights", False),
            "count": sum(int(np.prod(shape, dtype=np.int64)) for _, shape in started.manifest),
            "bytes_sent": sum(e["bytes_setup"] - e["bytes_masks"] for e in everyone),
            "rounds": max(e["rounds_setup"] - e["rounds_masks"] for e in everyone),
            "time_s": max(e["weights_s"] for e in everyone),
        },
        # Weight products on masks prepared in the setup and computed online, and what preparing cost.
        "weight_products": {
            **started.executor.product_paths,
            "masks": {
                "bytes_sent": sum(e["bytes_masks"] for e in everyone),
                "rounds": max(e["rounds_masks"] for e in everyone),
                "time_s": everyone[CLIENT]["masks_s"],  # rank 2's starts while the weights are shared
            },
        },
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
        "compute_s": [round(sum(c for c, _ in e["trace"]) + e["tail"], 3) for e in everyone],
        "network_estimates": network.estimates(
            [e["trace"] for e in everyone], [e["tail"] for e in everyone], tuple(map(network.parse_link, opts.networks))
        ) if len({len(e["trace"]) for e in everyone}) == 1 else None,  # (the ranks always agree; never lose the run)
        "simulated_network": network.parse_link(opts.simulate_network).label() if opts.simulate_network else None,
    }


def run(comm: Communicator, opts: RunOptions) -> dict | None:
    """One secure inference on this rank; the client returns the report, the others None."""
    started = start(comm, opts, lambda info: (client_feeds(opts, info), None), prepare=True)
    executor = started.executor
    online_start = time.perf_counter()
    comm.begin_trace()
    with Progress(executor, opts.progress and comm.rank == CLIENT) as progress:
        outputs = executor.run(started.feeds, on_node=progress)
    opened = reveal_outputs(started.party, outputs)
    online_s = time.perf_counter() - online_start
    everyone = costs(comm, started, executor.stats)
    if comm.rank != CLIENT:
        return None
    report = base_report(started, everyone, opts, online_s, executor.stats)
    report["outputs"] = opened
    return report
