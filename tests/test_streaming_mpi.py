"""Streamed weights under `mpirun`: a rank's peak memory follows one layer, not the model.

GPT-2 at full width with synthetic weights, 2 and 12 layers. Its layers hold 7.08 M weights each, so
keeping the 10 extra layers would add 567 MB to rank 1 (x_1, 8 bytes a weight) and 283 MB to the
owner (float32). Measured 2026-11-30: streamed, each rank's peak RSS at 12 layers is within 10 MB of
2 layers' (884/1021/721 MB against 894/1026/726 MB); resident, the 12-layer model peaks at
1244/1680/726 MB.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from puma_onnx.export import export, prepare
from puma_onnx.runtime.session import REWRITTEN_FILE
from puma_onnx.synthetic import materialize
from tests.test_run_mpi import MPIEXEC, PUMA, TIMEOUT_S, ort_outputs

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(MPIEXEC).exists(), reason="mpiexec not installed")

IDS = np.array([[464, 3139, 286, 4881]])
LAYER_WEIGHTS = 12 * 768 * 768  # the matrices (random init's biases and norms are constants: one tensor for all layers)
EXTRA = 10 * LAYER_WEIGHTS * 8  # bytes rank 1 would keep for 10 more layers: 566 MB


def run(folder, tmp_path, budget: str) -> dict:
    np.save(tmp_path / "ids.npy", IDS)
    out, report = tmp_path / f"{folder.name}-{budget}.npz", tmp_path / f"{folder.name}-{budget}.json"
    proc = subprocess.run(
        [MPIEXEC, "-n", "3", *PUMA, "run", str(folder), "--input-ids", str(tmp_path / "ids.npy"),
         "--weight-budget", budget, "--output", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(report.read_text()), "outputs": dict(np.load(out))}


def test_streamed_weights_keep_each_ranks_memory_to_one_layer(tmp_path_factory):
    folders = {}
    for layers in (2, 12):
        folders[layers] = tmp_path_factory.mktemp(f"gpt2-{layers}")
        export("gpt2", folders[layers], layers=layers, synthetic=True, warn=lambda msg: None)
        prepare(folders[layers], warn=lambda msg: None)
    tmp = tmp_path_factory.mktemp("runs")
    short, deep = run(folders[2], tmp, "0"), run(folders[12], tmp, "0")
    assert short["weights"]["mode"] == deep["weights"]["mode"] == "streamed"
    assert deep["weights"]["count"] - short["weights"]["count"] == 10 * LAYER_WEIGHTS
    growth = np.array(deep["peak_rss_mb"]) - np.array(short["peak_rss_mb"])
    assert (np.abs(growth) * 2**20 < EXTRA / 3).all(), growth  # 189 MB
    # The measurement can see the difference: the same model with its weights resident.
    kept = run(folders[12], tmp, "4G")
    assert kept["weights"]["mode"] == "resident"
    assert (kept["peak_rss_mb"][1] - deep["peak_rss_mb"][1]) * 2**20 > 2 * EXTRA / 3, (kept["peak_rss_mb"], deep["peak_rss_mb"])
    # And the answers are onnxruntime's on the same weights, written out.
    materialize(folders[12] / REWRITTEN_FILE, tmp / "materialized.onnx")
    want = ort_outputs(tmp / "materialized.onnx", {"input_ids": IDS, "attention_mask": np.ones_like(IDS),
                                                    "position_ids": np.arange(IDS.shape[1])[None]})["logits"][:, -1:]
    for report in (deep, kept):
        assert np.abs(report["outputs"]["logits"] - want).max() <= 0.05 * max(1.0, float(np.abs(want).max()))
