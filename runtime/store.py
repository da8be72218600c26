"""The owner's weights, read one initializer at a time: embedded, from external data, or synthetic.

A model past protobuf's 2 GB limit keeps its initializers in external data files
(`onnx.save(..., save_as_external_data=True)`): the owner loads the graph without
them (`onnx.load(..., load_external_data=False)`) and reads each weight from its
file when it is shared, so it never holds the whole model.

A *synthetic* weight (`puma-onnx export --synthetic-weights`, for models such as
LLaMA-7B whose 27 GB of fp32 random weights would not fit this machine's disk and
memory) has no data at all: its external-data entry names the location
`puma-synthetic` and a recipe, a constant (`puma_fill`) or normal values
(`puma_std`, drawn from numpy's PCG64 seeded with `puma_seed` and the CRC-32 of the
weight's name, then rounded to float16, so that a half-precision copy of the model holds
exactly the same weights; `synthetic.materialize`). The owner generates it when it is
shared, the same values every time. Such weights are random and public in distribution; the secure protocol
treats them exactly like real ones, and the report flags the run as synthetic.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

SYNTHETIC = "puma-synthetic"


class StoreError(Exception):
    """A weight that cannot be read (missing or truncated external data); one line for the user."""


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def is_synthetic(tensor: onnx.TensorProto) -> bool:
    return is_external(tensor) and _entries(tensor).get("location") == SYNTHETIC


def synthetic_recipe(tensor: onnx.TensorProto, seed: int, values: np.ndarray) -> None:
    """Turn `tensor` into a synthetic weight that stands for `values`: a constant when they all
    are one, else normal values with their standard deviation (the mean of random init is 0)."""
    flat = values.reshape(-1)
    recipe = {"location": SYNTHETIC, "puma_seed": str(seed)}
    if flat.size and np.all(flat == flat[0]):
        recipe["puma_fill"] = repr(float(flat[0]))
    else:
        recipe["puma_std"] = repr(float(np.std(flat, dtype=np.float64)))
    tensor.ClearField("raw_data")
    for field in ("float_data", "double_data", "int32_data", "int64_data"):
        tensor.ClearField(field)
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in recipe.items():
        tensor.external_data.add(key=key, value=value)


def generate(tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a synthetic weight (float32), the same on every call."""
    recipe = _entries(tensor)
    shape = tuple(tensor.dims)
    if "puma_fill" in recipe:
        return np.full(shape, float(recipe["puma_fill"]), np.float32)
    rng = np.random.default_rng([int(recipe["puma_seed"]), zlib.crc32(tensor.name.encode())])
    out = rng.standard_normal(shape, dtype=np.float32)
    out *= np.float32(float(recipe["puma_std"]))
    return out.astype(np.float16).astype(np.float32)  # float16 values: a half-precision copy is exact


def _check_recipe(tensor: onnx.TensorProto) -> None:
    recipe = _entries(tensor)
    try:
        int(recipe["puma_seed"])
        float(recipe["puma_fill"] if "puma_fill" in recipe else recipe["puma_std"])
    except (KeyError, ValueError):
        raise StoreError(f"synthetic weight {tensor.name!r} has a malformed recipe: {recipe}") from None


def synthetic_bound(tensor: onnx.TensorProto) -> float:
    """A bound on |value| of a synthetic weight (normal values: 10 standard deviations, which float32
    PCG64 draws never pass)."""
    recipe = _entries(tensor)
    return abs(float(recipe["puma_fill"])) if "puma_fill" in recipe else 10 * float(recipe["puma_std"])


class TensorStore:
    """The initializers of a model loaded without its external data, read on demand."""

    def __init__(self, model: onnx.ModelProto, folder: Path):
        self.tensors = {t.name: t for t in model.graph.initializer}
        self.folder = Path(folder)

    def synthetic(self, name: str) -> bool:
        return is_synthetic(self.tensors[name])

    @property
    def any_synthetic(self) -> bool:
        return any(is_synthetic(t) for t in self.tensors.values())

    def check(self) -> None:
        """Every external data entry is well formed and its file exists and holds its tensor's bytes
        (StoreError naming the weight and the file)."""
        for tensor in self.tensors.values():
            if not is_external(tensor):
                continue
            if is_synthetic(tensor):
                _check_recipe(tensor)
                continue
            path, offset, length = self._where(tensor)
            if not path.is_file():
                raise StoreError(f"weight {tensor.name!r}: its external data file {str(path)!r} is missing")
            size = path.stat().st_size
            if offset + length > size:
                raise StoreError(
                    f"weight {tensor.name!r}: its external data file {str(path)!r} is truncated "
                    f"({size} bytes, the weight needs bytes {offset} to {offset + length})"
                )

    def _where(self, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
        """(file, offset, length) of an external tensor, checked: a relative location inside the model's
        folder (symbolic links in it may point anywhere), integer offset and length, the length the
        tensor's shape and type need."""
        entries = _entries(tensor)
        location = entries.get("location", "")
        parts = Path(location).parts
        if not location or Path(location).is_absolute() or ".." in parts:
            raise StoreError(f"weight {tensor.name!r} names external data outside the model's folder: {location!r}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        needed = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
        try:
            offset, length = int(entries.get("offset", 0)), int(entries.get("length", needed))
        except ValueError:
            raise StoreError(f"weight {tensor.name!r}: its external data offset or length is not an integer") from None
        if offset < 0 or length != needed:
            raise StoreError(
                f"weight {tensor.name!r}: external data at offset {offset}, {length} bytes; its shape needs {needed}"
            )
        return self.folder / location, offset, length

    def read(self, name: str) -> np.ndarray:
        """Weight `name`'s values, freshly read (the caller owns the array; nothing is cached)."""
        tensor = self.tensors[name]
        if is_synthetic(tensor):
            return generate(tensor)
        if not is_external(tensor):
            return numpy_helper.to_array(tensor)
        path, offset, _ = self._where(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        with open(path, "rb") as f:
            f.seek(offset)
            out = np.fromfile(f, dtype=dtype, count=count)
        if out.size != count:
            raise StoreError(f"weight {tensor.name!r}: its external data file {str(path)!r} is truncated")
        return out.reshape(tuple(tensor.dims))

    def bound(self, name: str) -> float:
        """max |value| of weight `name` (read once, or the synthetic recipe's bound)."""
        tensor = self.tensors[name]
        if is_synthetic(tensor):
            return synthetic_bound(tensor)
        return float(np.abs(self.read(name)).max(initial=0.0))

    def embedded(self, name: str) -> onnx.TensorProto:
        """Weight `name` as a tensor that carries its data (for the public initializers others receive)."""
        tensor = self.tensors[name]
        return numpy_helper.from_array(self.read(name), name) if is_external(tensor) else tensor
