"""The registry of shipped model recipes.

Each recipe is a JSON file in `configs/`: either a Hugging Face config (exported
with random weights, since nothing may be downloaded) or a pointer to a PyPI
package that ships a real model: a model folder (all-MiniLM-L6-v2) or a GGUF
file (SmolLM2-135M-Instruct). `texts/` holds the shipped calibration texts.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    description: str
    task: str
    config: dict = field(default_factory=dict)
    tokenizer: str | None = None
    library: str = "transformers"
    package: str | None = None
    package_dir: str | None = None
    # A GGUF file in the package, read by transformers (needs the `gguf` package), and the fixes its
    # converted tokenizer needs (the end-of-sequence token; no beginning-of-sequence token added).
    gguf_file: str | None = None
    eos_token: str | None = None
    add_bos_token: bool | None = None

    @property
    def has_weights(self) -> bool:
        """True when the recipe points at a real model folder, not just a config."""
        return self.package is not None

    def local_dir(self) -> Path:
        """The folder of a packaged model; raises if its package is not installed."""
        spec = importlib.util.find_spec(self.package) if self.package else None
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model {self.name!r} needs the Python package {self.package!r}; "
                "install it as the README's setup command does"
            )
        return Path(spec.origin).parent / (self.package_dir or "")


def _load(path: Path) -> ModelSpec:
    data = json.loads(path.read_text())
    return ModelSpec(name=path.stem, **data)


REGISTRY: dict[str, ModelSpec] = {p.stem: _load(p) for p in sorted(CONFIG_DIR.glob("*.json"))}


def lookup(name: str) -> ModelSpec:
    """The registry entry for `name`, or a KeyError that lists the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None
