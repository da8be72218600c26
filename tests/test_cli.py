"""`puma-onnx rewrite` and `puma-onnx inspect` on an exported model."""

from __future__ import annotations

import subprocess
import sys

import onnx

PUMA = [sys.executable, "-m", "puma_onnx"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(PUMA + list(args), capture_output=True, text=True, timeout=300)


def test_rewrite_writes_a_model_with_puma_functions(exported, tmp_path):
    out = tmp_path / "bert.puma.onnx"
    result = cli("rewrite", str(exported("bert-base") / "model.onnx"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 gelu_erf" in result.stdout and "2 softmax_masked" in result.stdout
    model = onnx.load(str(out), load_external_data=False)
    assert {f.name for f in model.functions} >= {"Gelu", "Softmax", "LayerNorm", "Embedding"}


def test_inspect_prints_matches_secret_ops_and_counts(exported):
    result = cli("inspect", str(exported("gpt2") / "model.onnx"))
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "gelu_tanh" in table and "softmax_masked_guarded" in table
    assert "puma.Gelu" in table and "values:" in table and "public" in table and "secret" in table


def test_inspect_lists_ops_without_a_secure_kernel(unsupported_model, tmp_path):
    result = cli("inspect", str(unsupported_model))
    assert result.returncode != 0
    assert "bad_exp" in result.stdout and "Exp" in result.stdout
    rewrite = cli("rewrite", str(unsupported_model), "-o", str(tmp_path / "out.onnx"))
    assert rewrite.returncode != 0 and "bad_exp" in rewrite.stderr
