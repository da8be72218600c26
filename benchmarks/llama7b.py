"""LLaMA-7B, 8 tokens in, 1 out, on this machine: weights streamed layer by layer, synthetic weights.

    .venv/bin/python benchmarks/llama7b.py [--layers 2 4 32] [--out /tmp/llama7b] [--plaintext] [--half]

Exports `llama-7b` (LLaMA-7B's configuration, synthetic weights: the owner generates each
weight from the seed when it shares it, runtime/store.py) at each depth at full width, runs
`mpirun -n 3 puma-onnx run --weight-budget 0` on the same 8 token ids, and prints per depth:
online time, weight-sharing time, bytes and rounds, online bytes and rounds, peak RSS per rank,
disk used; then the per-layer figures from the 2- and 4-layer runs and, when 32 layers were not
run, their extrapolation to 32 (labelled). `--plaintext` also runs onnxruntime on each model with its
weights written out (deleted after): float32 up to 4 layers (2.7 and 4.3 GB); with `--half`, at every
depth, float16 weights cast to float32 at each use (synthetic weights are float16 numbers, so these
are the same weights; 13.5 GB at 32 layers, run without graph optimisations, which would fold the
casts into 27 GB). It prints the time, the ratio, and the secure logits' largest error against
onnxruntime's. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
PUMA_TABLE_5 = {"4 in, 1 out": (122.0, 0.907), "8 in, 1 out": (200.5, 1.794), "8 in, 2 out": (364.5, 3.857)}
IDS = np.array([[1, 450, 7483, 310, 3444, 338, 3681, 29889]])  # 8 ids (any: the weights are random)


def export(layers: int, out: Path) -> Path:
    folder = out / f"llama-7b-{layers}"
    if not (folder / "model.puma.onnx").exists():
        subprocess.run([sys.executable, "-m", "puma_onnx", "export", "llama-7b", "-o", str(folder), "--layers", str(layers)],
                       check=True)
    return folder


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def secure(folder: Path, out: Path) -> dict:
    np.save(out / "ids.npy", IDS)
    report, logits = out / f"{folder.name}.report.json", out / f"{folder.name}.logits.npz"
    started = time.perf_counter()
    subprocess.run(
        [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "run", str(folder), "--input-ids", str(out / "ids.npy"),
         "--weight-budget", "0", "--timeout", "1800", "--report", str(report), "--output", str(logits)],
        check=True,
    )
    r = json.loads(report.read_text())
    return {
        "layers": None,
        "wall_s": round(time.perf_counter() - started, 1),
        "online_s": r["online_s"],
        "weights_s": r["weights"]["time_s"],
        "weights_gb": r["weights"]["bytes_sent"] / 1e9,
        "weights_rounds": r["weights"]["rounds"],
        "online_gb": r["bytes_sent_total"] / 1e9,
        "rounds": max(r["rounds"]),
        "peak_rss_gb": [round(m / 1024, 2) for m in r["peak_rss_mb"]],
        "disk_mb": disk_bytes(folder) / 1e6,
        "synthetic": r["weights"]["synthetic"],
        "lan_s": next(iter(r["network_estimates"].values())) if r.get("network_estimates") else None,  # LAN first
    }


def plaintext(folder: Path, out: Path, half: bool) -> tuple[float, np.ndarray]:
    """onnxruntime on the model with its weights written out (float16 behind casts with `half`): the
    median of 3 runs after a warm-up, and the last position's logits."""
    import onnxruntime as ort

    from puma_onnx.runtime.session import model_feeds, past_inputs
    from puma_onnx.synthetic import materialize

    path = out / f"{folder.name}.materialized.onnx"
    materialize(folder / "model.puma.onnx", path, half=half)
    try:
        options = ort.SessionOptions()
        if half:  # graph optimisations would fold the casts into float32 copies of every weight
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = session.get_inputs()
        feeds = model_feeds([i.name for i in inputs], IDS, past=past_inputs((i.name, i.shape) for i in inputs))
        logits = session.run(["logits"], feeds)[0][:, -1:]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            session.run(["logits"], feeds)
            times.append(time.perf_counter() - start)
        del session
    finally:
        path.unlink(missing_ok=True)
        Path(str(path) + ".data").unlink(missing_ok=True)
    return float(np.median(times)), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 32])
    parser.add_argument("--out", type=Path, default=Path("/tmp/llama7b"))
    parser.add_argument("--plaintext", action="store_true")
    parser.add_argument("--half", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for layers in args.layers:
        folder = export(layers, args.out)
        rows[layers] = {**secure(folder, args.out), "layers": layers}
        secure_logits = np.load(args.out / f"{folder.name}.logits.npz")["logits"]
        for half in ([False] if layers <= 4 else []) + ([True] if args.half else []):
            if not args.plaintext:
                break
            seconds, logits = plaintext(folder, args.out, half)
            key = "plaintext_half" if half else "plaintext"
            rows[layers][f"{key}_s"] = seconds
            rows[layers][f"{key}_ratio"] = round(rows[layers]["online_s"] / seconds, 1)
            rows[layers][f"{key}_max_abs_err"] = float(np.abs(secure_logits - logits).max())
            rows[layers]["max_abs_logit"] = float(np.abs(logits).max())
        print(json.dumps(rows[layers]), flush=True)
    keys = ["online_s", "weights_s", "weights_gb", "online_gb", "rounds", "lan_s", "plaintext_s", "plaintext_half_s"]
    if 2 in rows and 4 in rows:
        per_layer = {k: (rows[4][k] - rows[2][k]) / 2 for k in keys if rows[4].get(k) is not None and rows[2].get(k) is not None}
        print("per layer (from 2 and 4 layers):", json.dumps({k: round(v, 4) for k, v in per_layer.items()}))
        if 32 not in rows:
            guess = {k: round(rows[2][k] + 30 * v, 3) for k, v in per_layer.items()}
            print("32 layers, EXTRAPOLATED from 2 and 4 layers:", json.dumps(guess))
    print(f"{'layers':>6} {'online s':>9} {'weights s':>9} {'weights GB':>10} {'online GB':>9} {'rounds':>7} "
          f"{'LAN s':>7} {'peak RSS GB per rank':>22} {'disk MB':>8}")
    for layers, r in rows.items():
        lan = f"{r['lan_s']:7.1f}" if r["lan_s"] is not None else f"{'':>7}"
        print(f"{layers:>6} {r['online_s']:9.1f} {r['weights_s']:9.1f} {r['weights_gb']:10.2f} {r['online_gb']:9.3f} "
              f"{r['rounds']:7d} {lan} {str(r['peak_rss_gb']):>22} {r['disk_mb']:8.2f}")
    for setting, (seconds, gb) in PUMA_TABLE_5.items():
        print(f"PUMA table 5, {setting}: {seconds} s, {gb} GB (3 x 128 threads, 1 TB RAM each)")
    saved = args.out / "llama7b.json"  # rows of earlier runs at other depths are kept
    earlier = {int(k): v for k, v in json.loads(saved.read_text()).items()} if saved.exists() else {}
    saved.write_text(json.dumps({**earlier, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
