"""Shared fixtures: registry models exported once per test session."""

from __future__ import annotations

import pytest

TEST_LAYERS = 2


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name) -> folder with model.onnx of registry model `name` at 2 layers (cached)."""
    from puma_onnx.export import export

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            export(name, out, layers=TEST_LAYERS, warn=lambda msg: None)
            cache[name] = out
        return cache[name]

    return get
