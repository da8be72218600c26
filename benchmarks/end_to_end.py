"""End-to-end benchmark: BERT-base (12 layers, 128 tokens) and GPT-2 (12 layers, 32 tokens)
on three MPI ranks, next to SPU's PUMA measured on this machine kind and PUMA's paper.

    .venv/bin/python benchmarks/end_to_end.py [--models bert-base gpt2] [--out benchmarks/results]

Exports each model once (random weights, seeded; with `puma-onnx export`, so the
activation ranges are recorded), runs `mpirun -n 3 puma-onnx run --report`, measures
the max abs error against exact plaintext and the time of onnxruntime plaintext in the
same run (this machine's speed drifts 2-3x between hours: compare the ratio), and
prints one table, with the report's predicted online time at PUMA's LAN (5 Gbit/s, 1 ms) and a WAN
(100 Mbit/s, 40 ms) (runtime/network.py). Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")

# (tokens, SPU 0.9.5 PUMA here: online s, GB sent by 3 ranks, max abs err; PUMA paper: s, GB)
CASES = {
    "bert-base": (128, 78.0, 7.21, 0.100, 33.9, 10.77),
    "gpt2": (32, 42.0, 1.59, 0.061, 15.5, 3.77),
    "minilm": (128, 31.0, 2.27, 0.051, None, None),
}


def export(name: str, out: Path) -> Path:
    folder = out / name
    if not (folder / "model.puma.onnx").exists():
        subprocess.run([sys.executable, "-m", "puma_onnx", "export", name, "-o", str(folder)], check=True)
    return folder


def plaintext(folder: Path, ids: np.ndarray) -> tuple[dict, float]:
    """onnxruntime on the original export: its outputs, and its time (median of 5 runs after a warm-up)."""
    import time

    import onnxruntime as ort

    from puma_onnx.runtime.session import PRESENT_PREFIX, model_feeds, past_inputs

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    feeds = model_feeds([i.name for i in inputs], ids, past=past_inputs((i.name, i.shape) for i in inputs))
    outputs = session.run(None, feeds)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    named = {o.name: v for o, v in zip(session.get_outputs(), outputs) if not o.name.startswith(PRESENT_PREFIX)}
    if "logits" in named:  # a decoder's secure run opens the last position (PUMA's "1 token out")
        named["logits"] = named["logits"][:, -1:]
    return named, float(np.median(times))


def prepared(name: str, out: Path) -> tuple[Path, np.ndarray, Path]:
    """The export folder, the benchmark's seeded ids (CASES' token count) and the .npy they are saved in."""
    folder = export(name, out)
    meta = json.loads((folder / "puma.json").read_text())
    ids = np.random.default_rng(0).integers(0, meta["vocab_size"], size=(1, CASES[name][0]), dtype=np.int64)
    np.save(out / f"{name}.ids.npy", ids)
    return folder, ids, out / f"{name}.ids.npy"


def bench(name: str, out: Path) -> dict:
    folder, ids, _ = prepared(name, out)
    report_path, result_path = out / f"{name}.report.json", out / f"{name}.out.npz"
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "run", str(folder),
           "--input-ids", str(out / f"{name}.ids.npy"), "--report", str(report_path),
           "--output", str(result_path), "--profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"{name}: secure run failed")
    report = json.loads(report_path.read_text())
    secure = dict(np.load(result_path))
    plain, plain_s = plaintext(folder, ids)
    report["max_abs_err"] = max(float(np.abs(secure[k] - plain[k]).max()) for k in plain)
    report["plaintext_s"] = plain_s
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert-base", "gpt2"], choices=sorted(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        r = bench(name, args.out)
        tokens, spu_s, spu_gb, spu_err, paper_s, paper_gb = CASES[name]
        rows.append(
            f"| {name} | {tokens} | {r['wall_s']:.1f} | {r['setup_s']:.1f} | {r['online_s']:.1f} | "
            f"{r['online_s'] / r['plaintext_s']:.0f}x | "
            f"{r['bytes_sent_total'] / 1e9:.2f} | {max(r['rounds'])} | {max(r['peak_rss_mb']):.0f} | "
            f"{r['max_abs_err']:.3f} | "
            + " / ".join(f"{v:.1f}" for v in list(r["network_estimates"].values())[:2])
            + f" | {spu_s:.0f} s / {spu_gb} GB / {spu_err} | "
            f"{'-' if paper_s is None else f'{paper_s} s / {paper_gb} GB'} |"
        )
    print("| model | tokens | wall s | setup s | online s | online / onnxruntime plaintext | GB sent (3 ranks) | "
          "rounds | peak RSS MB/rank | max abs err | estimated s at LAN / WAN | SPU PUMA here (online / GB / err) | "
          "PUMA paper (5 Gbit/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
