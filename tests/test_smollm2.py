"""The real SmolLM2-135M-Instruct, all 30 layers: its outlier activations (|x| near 25,000 at the
norms, mean squares near 1e6) run securely, and the secure logits follow the plaintext model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from .test_run_mpi import MPIEXEC, mpirun, ort_outputs, plain_feeds

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little dragon who",
    "def add(a, b):\n    return",
]

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(MPIEXEC).exists(), reason="mpiexec not installed")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """`puma-onnx export smollm2`: the real model, rewritten, its ranges recorded."""
    from puma_onnx.export import export, prepare

    folder = tmp_path_factory.mktemp("smollm2")
    export("smollm2", folder, warn=lambda msg: None)
    prepare(folder, warn=lambda msg: None)
    return folder


def test_the_tokenizer_adds_no_bos_and_ends_at_im_end(smollm2):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    assert tokenizer.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and tokenizer.token_to_id("<|im_end|>") == 2


def test_the_export_matches_pytorch(smollm2):
    import torch

    from puma_onnx.export import build_torch_model

    from .test_run_mpi import ort_outputs

    ids = np.array([[504, 3575, 282, 4649, 314]], dtype=np.int64)
    with torch.no_grad():
        want = build_torch_model("smollm2")(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = ort_outputs(smollm2 / "model.onnx", plain_feeds(ids))["logits"]
    assert np.abs(got - want).max() <= 1e-3
    assert want[0, -1].argmax() == 7042  # " Paris"


def test_the_ranges_record_the_outliers(smollm2):
    nodes = json.loads((smollm2 / "puma.json").read_text())["ranges"]["nodes"]
    norms = [v for name, v in nodes.items() if name.endswith("puma.RMSNorm")]
    assert len(norms) == 61
    assert max(v["x_max"] for v in norms) > 2.0**14 and max(v["var_max"] for v in norms) > 5e5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_secure_logits_follow_the_plaintext_model_at_every_position(smollm2, tmp_path, prompt):
    from tokenizers import Tokenizer

    ids = np.array([Tokenizer.from_file(str(smollm2 / "tokenizer.json")).encode(prompt).ids], dtype=np.int64)
    out, report = tmp_path / "out.npz", tmp_path / "report.json"
    proc = mpirun(str(smollm2), "--text", prompt, "--output", str(out), "--report", str(report), "--all-logits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    secure = np.load(out)["logits"][0]
    rewritten = ort_outputs(smollm2 / "model.puma.onnx", plain_feeds(ids))["logits"][0]
    original = ort_outputs(smollm2 / "model.onnx", plain_feeds(ids))["logits"][0]
    error = np.abs(secure - rewritten).max(axis=-1)
    print(f"smollm2 {prompt!r}: secure vs rewritten {error.max():.3g}, rewritten vs original "
          f"{np.abs(rewritten - original).max():.3g}")
    assert secure.shape == (ids.shape[1], 49152)
    assert error.max() <= 0.1, f"per position {error}"
    top2 = np.sort(original, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5
    assert np.array_equal(secure.argmax(-1)[clear], original.argmax(-1)[clear])
    assert json.loads(report.read_text())["ranges"] == "recorded"


def test_secure_chat_answers_what_the_exact_model_answers(smollm2, tmp_path):
    """The README's example: --chat, greedy, the secret cache, against the exact model in onnxruntime."""
    import subprocess
    import sys

    from puma_onnx.plaintext import generate as plaintext_generation

    out, report = tmp_path / "answer.json", tmp_path / "report.json"
    proc = subprocess.run(
        [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "generate", str(smollm2), "--chat", "--text",
         "What is the capital of France?", "--max-new-tokens", "12", "--output", str(out), "--report", str(report)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(out.read_text())
    prompt = np.array([answer["prompt_ids"]])
    assert answer["prompt_ids"][:3] == [1, 9690, 198]  # <|im_start|>system\n: the chat template
    want, logits = plaintext_generation(smollm2 / "model.onnx", prompt, 12, eos={2})
    margins = [float(np.diff(np.sort(step)[-2:])[0]) for step in logits]
    print(f"smollm2 answer {answer['text']!r}; exact-model top-two margins {np.round(margins, 2).tolist()}")
    assert answer["new_ids"] == want, f"flipped where the exact model's top-two margins are {margins}"
    assert answer["text"] == "The capital of France is Paris." and answer["new_ids"][-1] == 2
    assert answer["text"] in proc.stdout  # streamed by the client as it came
    steps = json.loads(report.read_text())["steps"]
    assert steps[0]["tokens_in_context"] == prompt.shape[1] and len(steps) == len(want)
