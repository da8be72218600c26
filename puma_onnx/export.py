"""`puma-onnx export`: a Hugging Face model to ONNX through Optimum's exporter.

Offline only. A registry name without weights is built from its shipped config
with random weights (said on stderr and in the metadata); a local model folder
or a packaged real model (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) is exported
with its real weights. `prepare` then rewrites the export for the secure
executor and records its activation ranges (`puma_onnx.calibrate`).

torch, transformers and optimum are imported inside the functions: the computing
ranks import this package without them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from puma_onnx.models import REGISTRY, ModelSpec, lookup

DEFAULT_OPSET = 18
METADATA_FILE = "puma.json"
REWRITTEN_FILE = "model.puma.onnx"
TOKENIZER_FILES = (
    "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
)
DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# A synthetic-weight export builds this many layers in PyTorch and repeats the last (layer 0 reads the
# embedding, so the repeated layer is a middle one).
SYNTHETIC_BUILT = 2


class ExportError(Exception):
    """An export that cannot go on; the message is one line for the user."""


@dataclass
class Source:
    """What to export: a registry recipe, or a local folder read as a recipe."""

    name: str
    spec: ModelSpec
    folder: Path | None  # a model folder with weights, or None for random weights


def resolve(name_or_dir: str) -> Source:
    """A registry name or a local Hugging Face model folder."""
    path = Path(name_or_dir)
    if name_or_dir not in REGISTRY and path.exists():
        return Source(path.name, _spec_from_folder(path), path)
    if name_or_dir not in REGISTRY and name_or_dir.startswith((".", "/", "~")):
        raise ExportError(f"model folder {name_or_dir!r} does not exist")
    if name_or_dir not in REGISTRY and "/" in name_or_dir:
        raise ExportError(
            f"{name_or_dir!r} is neither a registry name nor a local folder, and the Hugging Face hub "
            "is not reachable offline; download the model folder and pass its path"
        )
    try:
        spec = lookup(name_or_dir)
        folder = spec.local_dir() if spec.has_weights else None
    except (KeyError, FileNotFoundError) as e:
        raise ExportError(e.args[0]) from None
    return Source(name_or_dir, spec, folder)


def _spec_from_folder(path: Path) -> ModelSpec:
    config_file = path / "config.json"
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise ExportError(f"cannot read model folder {str(path)!r}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {str(config_file)!r}: {e}") from None
    architectures = config.get("architectures") or []
    decoder = any(a.endswith(DECODER_SUFFIXES) for a in architectures)
    library = "sentence_transformers" if (path / "modules.json").exists() else "transformers"
    return ModelSpec(
        name=path.name,
        description=f"local folder {path}",
        task="text-generation" if decoder else "feature-extraction",
        config=config,
        library=library,
    )


def optimum_task(task: str) -> str:
    """Decoders export with their past keys/values: one graph serves the prompt step and every later
    step of `generate` (past length 0 for the prompt, as `run` feeds it)."""
    return "text-generation-with-past" if task == "text-generation" else task


def _build_model(source: Source, layers: int | None, seed: int):
    """The PyTorch model to export (eval mode, float32)."""
    import torch
    import transformers

    spec = source.spec
    auto = (
        transformers.AutoModelForCausalLM
        if spec.task == "text-generation"
        else transformers.AutoModel
    )
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    if source.folder is None:
        config = transformers.AutoConfig.for_model(**{**spec.config, **overrides})
        torch.manual_seed(seed)
        return auto.from_config(config).eval()
    if spec.gguf_file:
        return auto.from_pretrained(
            str(source.folder), gguf_file=spec.gguf_file, torch_dtype=torch.float32, **overrides
        ).eval()
    if spec.library == "sentence_transformers":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(source.folder), device="cpu", local_files_only=True)
        if layers is not None:
            encoder = model[0].auto_model
            encoder.encoder.layer = encoder.encoder.layer[:layers]
            encoder.config.num_hidden_layers = layers
        return model.eval()
    return auto.from_pretrained(str(source.folder), local_files_only=True, **overrides).eval()


def build_torch_model(name_or_dir: str, layers: int | None = None, seed: int = 0):
    """The same PyTorch model `export` exports (random weights are seeded), for comparisons."""
    return _build_model(resolve(name_or_dir), layers, seed)


def _copy_tokenizer(source: Source, out_dir: Path) -> bool:
    """Copy tokenizer files when they exist offline; True if any were written."""
    if source.spec.gguf_file:
        _save_gguf_tokenizer(source, out_dir)
        return True
    if source.folder is not None:
        folder = source.folder
    elif source.spec.tokenizer == "bert-base-uncased":
        # all-MiniLM-L6-v2 ships the bert-base-uncased vocabulary.
        folder = REGISTRY["minilm"].local_dir()
    else:
        return False
    copied = False
    for name in TOKENIZER_FILES:
        if (folder / name).exists():
            shutil.copyfile(folder / name, out_dir / name)
            copied = True
    return copied


def _save_gguf_tokenizer(source: Source, out_dir: Path) -> None:
    """The tokenizer transformers converts from the GGUF file, with the recipe's fixes (SmolLM2's
    conversion adds a BOS token the model never saw and names <|im_start|> as end of sequence)."""
    from transformers import AutoTokenizer

    spec = source.spec
    tokenizer = AutoTokenizer.from_pretrained(str(source.folder), gguf_file=spec.gguf_file)
    if spec.add_bos_token is not None:
        tokenizer.add_bos_token = spec.add_bos_token
    if spec.eos_token is not None:
        tokenizer.eos_token = spec.eos_token
    tokenizer.save_pretrained(str(out_dir))


def _io_table(model_path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)

    def describe(values):
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            rows.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
        return rows

    return describe(model.graph.input), describe(model.graph.output)


def _quiet_exporters() -> None:
    """Keep the tracer's and loggers' chatter off the user's terminal; errors still raise."""
    import warnings

    import transformers
    from optimum.utils import logging as optimum_logging

    warnings.filterwarnings("ignore", module=r"(torch|transformers|optimum|sentence_transformers)\b")
    transformers.logging.set_verbosity_error()
    optimum_logging.set_verbosity_error()


def export(
    name_or_dir: str,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    layers: int | None = None,
    seed: int = 0,
    warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    synthetic: bool | None = None,
) -> dict:
    """Export to OUT_DIR/model.onnx with tokenizer files and puma.json; returns the metadata.

    `synthetic` (default: the registry entry's choice) exports at most SYNTHETIC_BUILT layers with
    real random weights and records the depth asked for; `prepare` then makes the rewritten model
    synthetic at that depth (`puma_onnx.synthetic`).
    """
    if layers is not None and layers < 1:
        raise ExportError(f"--layers must be at least 1, got {layers}")
    source = resolve(name_or_dir)
    out_dir = Path(out_dir)
    random_weights = source.folder is None
    synthetic = source.spec.synthetic if synthetic is None else synthetic
    target_layers = None
    if synthetic:
        if not random_weights:
            raise ExportError(f"{source.name} has real weights; --synthetic-weights is for random-weight models")
        target_layers = layers or source.spec.config.get("num_hidden_layers")
        if not target_layers:
            raise ExportError(f"{source.name}'s config has no num_hidden_layers to repeat")
        layers = min(target_layers, SYNTHETIC_BUILT)
    if random_weights:
        warn(
            f"puma-onnx: {source.name} has no local weights: exporting RANDOM weights "
            f"(seed {seed}) from the shipped config"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    start = time.perf_counter()
    _quiet_exporters()
    try:
        model = _build_model(source, layers, seed)
        from optimum.exporters.onnx import onnx_export_from_model

        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_export_from_model(model, out_dir, opset=opset, task=optimum_task(source.spec.task), do_validation=False)
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many kinds; the user needs one line
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"export of {source.name!r} failed: {first_line}") from e
    has_tokenizer = _copy_tokenizer(source, out_dir) or any((out_dir / f).exists() for f in TOKENIZER_FILES)
    inputs, outputs = _io_table(out_dir / "model.onnx")
    network = model[0].auto_model if source.spec.library == "sentence_transformers" else model
    config = network.config
    metadata = {
        "model": source.name,
        "description": source.spec.description,
        "task": optimum_task(source.spec.task),
        "library": source.spec.library,
        "opset": opset,
        "random_weights": random_weights,
        "seed": seed if random_weights else None,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "max_positions": _max_positions(network),
        "tokenizer": has_tokenizer,
        "eos_token_id": getattr(config, "eos_token_id", None),
        "inputs": inputs,
        "outputs": outputs,
        "export_s": round(time.perf_counter() - start, 2),
    }
    if synthetic:
        metadata["synthetic_weights"] = {"seed": seed, "layers": target_layers, "built_layers": layers}
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _max_positions(network) -> int | None:
    """The longest input: the configured positions (rotary models: their context), less the offset of
    models that number positions from padding_idx + 1 (RoBERTa: 514 rows, 512 positions)."""
    config = network.config
    rows = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    table = next((m for name, m in network.named_modules() if name.endswith("position_embeddings")), None)
    if rows and getattr(table, "padding_idx", None) is not None:
        rows -= table.padding_idx + 1
    return rows


def prepare(
    out_dir: str | Path,
    approx_set: str | None = None,
    calibration: str | Path | None = None,
    warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    external_data: bool = False,
):
    """Rewrite OUT_DIR/model.onnx into model.puma.onnx with the approximation set `approx_set`, run it
    in onnxruntime on the calibration inputs and record the activation ranges in puma.json.

    With `external_data`, model.puma.onnx keeps its weights in model.puma.onnx.data (as any model
    past 1 GB does). A synthetic-weight export (`export(synthetic=True)`) is then made synthetic at
    its full depth (`synthesize`).

    Returns (the rewrite report, the number of calibration inputs). Raises ExportError for a
    calibration file that cannot be read; the rewrite's UnsupportedSecretOps passes through.
    """
    from puma_onnx.calibrate import calibration_ids, read_texts, record_ranges, shipped_texts
    from puma_onnx.passes import rewrite_file
    from puma_onnx.runtime import approx

    out_dir = Path(out_dir)
    approx_set = approx_set or approx.DEFAULT
    try:
        approx.lookup(approx_set)
    except ValueError as e:
        raise ExportError(str(e)) from None
    meta_file = out_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    report = rewrite_file(out_dir / "model.onnx", out_dir / REWRITTEN_FILE, approx_set, external_data=external_data or None)
    source = str(calibration) if calibration else "shipped texts"
    try:
        texts = read_texts(calibration or shipped_texts())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ExportError(f"cannot read --calibration {str(calibration)!r}: {e}") from None
    tokenizer = out_dir / "tokenizer.json"
    if not tokenizer.exists():
        source = "random token ids (no tokenizer)"
        if calibration:
            warn(f"puma-onnx: {meta['model']} has no tokenizer: calibrating on random token ids, not on {calibration}")
    inputs = calibration_ids(
        texts, tokenizer.read_text() if tokenizer.exists() else None, meta["vocab_size"], meta.get("max_positions")
    )
    nodes = record_ranges(out_dir / REWRITTEN_FILE, inputs)
    meta["approx"] = approx_set
    meta["approx_digest"] = approx.lookup(approx_set).digest
    meta["ranges"] = {"source": source, "inputs": len(inputs), "nodes": nodes}
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    if meta.get("synthetic_weights"):
        synthesize(out_dir)
    return report, len(inputs)


def synthesize(out_dir: str | Path) -> dict:
    """Make OUT_DIR's rewritten model synthetic at the depth puma.json asks for: secret matrices become
    seeded recipes, the last built layer is repeated, the built model's files are removed (the
    synthetic model.puma.onnx replaces them). Returns the metadata.

    The recorded ranges stay valid for the built layers only (they see the same inputs at any depth):
    the copies and everything after them (the final norm, the head) lose theirs and run on the
    kernels' default domains, which cover LLaMA-family outliers. (Copying the layer's own ranges would
    be wrong: random-init activations grow with depth, by about 7 in mean square a layer for LLaMA-7B.)"""
    import onnx

    from puma_onnx.passes import analyze
    from puma_onnx.synthetic import CloneError, clone_layers, make_synthetic, synthetic_bytes

    out_dir = Path(out_dir)
    meta_file = out_dir / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    plan = meta["synthetic_weights"]
    rewritten = out_dir / REWRITTEN_FILE
    model = onnx.load(str(rewritten))
    levels = analyze(model)
    secret = {t.name for t in model.graph.initializer if levels.get(t.name) == "secret"}
    make_synthetic(model, secret, plan["seed"])
    try:
        sources = clone_layers(model, plan["layers"])
    except CloneError as e:
        raise ExportError(f"cannot repeat the layers of {meta['model']}: {e}") from None
    for path in out_dir.iterdir():  # the built model and its data: the synthetic model replaces them
        if path.name.startswith(("model.onnx", REWRITTEN_FILE)):
            path.unlink()
    onnx.save(model, str(rewritten))
    ranges = meta.get("ranges")
    if sources and ranges:
        built = {n.name for n in model.graph.node if n.name not in sources}
        first_copy = next(i for i, n in enumerate(model.graph.node) if n.name in sources)
        before = {n.name for n in list(model.graph.node)[:first_copy]} & built
        ranges["nodes"] = {name: seen for name, seen in ranges["nodes"].items() if name in before}
        ranges["source"] += (
            f"; layers {plan['built_layers']}-{plan['layers'] - 1} and the nodes after them: default domains"
        )
    inputs, outputs = _io_table(rewritten)
    meta["inputs"], meta["outputs"] = inputs, outputs
    plan["fp32_bytes"] = synthetic_bytes(model)
    meta["num_layers"] = plan["layers"]
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


CACHE_ENV = "PUMA_ONNX_CACHE"


def _current_approximations(meta_file: Path) -> bool:
    """Whether an export's puma.json records the digest of this version's constants for its set."""
    from puma_onnx.runtime import approx

    try:
        meta = json.loads(meta_file.read_text())
        return meta["approx_digest"] == approx.lookup(meta["approx"]).digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def cache_root() -> Path:
    """Where `run NAME` keeps registry exports: $PUMA_ONNX_CACHE, else ~/.cache/puma-onnx."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "puma-onnx")


def cached_export(name: str, warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The export folder of registry model `name`, exported (rewritten, calibrated) on first use.

    The export is written to a temporary folder beside the cache entry and renamed into place, so an
    interrupted or concurrent export never leaves a half-written entry.
    """
    folder = cache_root() / name
    if (folder / REWRITTEN_FILE).exists() and (folder / METADATA_FILE).exists():
        if _current_approximations(folder / METADATA_FILE):
            warn(f"puma-onnx: using the export of {name} cached in {folder}")
            return folder
        warn(f"puma-onnx: the export of {name} cached in {folder} has other approximations than this version's: "
             "exporting it again")
    else:
        warn(f"puma-onnx: exporting {name} into {folder} (once: later runs reuse it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        export(name, staging, warn=warn)  # (a synthetic registry entry stays synthetic)
        prepare(staging, warn=warn)
        try:
            staging.rename(folder)
        except OSError:  # another run finished first, or a stale entry: keep one that is current
            if not (folder / REWRITTEN_FILE).exists() or not _current_approximations(folder / METADATA_FILE):
                shutil.rmtree(folder, ignore_errors=True)
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
