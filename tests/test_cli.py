"""`puma-onnx rewrite` and `puma-onnx inspect` on an exported model."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

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


def test_rewrite_with_pumas_approximations_records_the_set(exported, tmp_path):
    import numpy as np

    from puma_onnx.passes.functions import APPROX_KEY
    from puma_onnx.runtime import approx

    from .passes.graphs import run

    out = tmp_path / "llama.puma.onnx"
    result = cli("rewrite", str(exported("llama-tiny") / "model.onnx"), "-o", str(out), "--approx", "puma")
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out), load_external_data=False)
    assert {p.key: p.value for p in model.metadata_props}[APPROX_KEY] == "puma"
    # The SiLU function is PUMA's: evaluate it alone.
    silu = next(f for f in model.functions if f.name == "SiLU")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("SiLU", ["x"], ["y"], domain="puma")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
    )
    one = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), functions=[silu], ir_version=10)
    x = np.linspace(-9, 9, 721).astype(np.float32) + np.float32(0.0013)
    assert np.abs(run(one, x=x)[0] - approx.PUMA.silu(x)).max() < 1e-5


def test_rewrite_and_inspect_of_a_file_that_is_not_onnx_are_one_line(tmp_path):
    junk = tmp_path / "notes.onnx"
    junk.write_bytes(b"\x00\xffthis is not a protobuf\n" * 10)
    for args in (["inspect", str(junk)], ["rewrite", str(junk), "-o", str(tmp_path / "out.onnx")]):
        result = cli(*args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("puma-onnx: error: cannot "), result.stderr
        assert str(junk) in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_usage_error_is_one_line_naming_the_help(tmp_path):
    result = cli("run", str(tmp_path), "--frac-bits", "40")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "puma-onnx: error: Invalid value for '--frac-bits': 40 is not in the range 16<=x<=20. (see puma-onnx run --help)"
    ]
    assert cli().stderr.startswith("Usage: puma-onnx ")  # a bare `puma-onnx` still shows the help


@pytest.mark.parametrize("option", ["--network", "--simulate-network"])
def test_a_link_without_units_is_a_usage_error(tmp_path, option):
    result = cli("generate", str(tmp_path), option, "5,1ms")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"puma-onnx: error: Invalid value for '{option}': '5,1ms' is not BANDWIDTH,RTT with units "
        "(e.g. 1Gbit,2ms, 100Mbps,40ms or 1GB/s,1ms) (see puma-onnx generate --help)"
    ]
