"""Plaintext references in onnxruntime: what the secure commands compute, without the secrecy.

For tests and benchmarks (and users who want to compare): `generate` runs the same greedy or
Gumbel-max loop as `puma-onnx generate`, with the same cache handling, on any export (the original
`model.onnx` for the exact model, `model.puma.onnx` for the approximations alone).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from puma_onnx.runtime.generation import gumbel
from puma_onnx.runtime.session import PAST_PREFIX, PRESENT_PREFIX, model_feeds, past_inputs


def generate(
    path: str | Path, prompt: np.ndarray, steps: int, temperature: float | None = None, seed: int | None = None,
    times: list | None = None, eos: set[int] = frozenset(),
) -> tuple[list[int], list[np.ndarray]]:
    """(new ids, last-position logits per step) of onnxruntime's generation loop on `path`, stopping after
    `steps` tokens or at a token of `eos`; `times`, if given, receives each step's seconds. The noise is
    drawn as the secure helper draws it (`gumbel`, seeded alike)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    outputs = [o.name for o in session.get_outputs()]
    feeds = model_feeds(names, prompt, past=past_inputs((i.name, i.shape) for i in inputs))
    rng = np.random.default_rng(seed)
    context, tokens, logits = prompt.shape[1], [], []
    for _ in range(steps):
        began = time.perf_counter()
        out = dict(zip(outputs, session.run(None, feeds)))
        last = out["logits"][0, -1].astype(np.float64)
        scores = last if temperature is None else last / temperature + gumbel(rng, last.size)
        tokens.append(int(np.argmax(scores)))
        if times is not None:
            times.append(time.perf_counter() - began)
        logits.append(last)
        if tokens[-1] in eos:
            break
        step = {
            "input_ids": np.array([[tokens[-1]]]),
            "attention_mask": np.ones((1, context + 1), np.int64),
            "position_ids": np.array([[context]]),
        }
        step.update({n: out[PRESENT_PREFIX + n[len(PAST_PREFIX) :]] for n in names if n.startswith(PAST_PREFIX)})
        feeds = {n: step[n] for n in names}
        context += 1
    return tokens, logits
