"""The service through its clients: latency, throughput and cost per input against the batch size.

    .venv/bin/python benchmarks/service.py [--models minilm bert-base] [--batches 1 4 16] [--tokens 128]
                                           [--repeats 2] [--out benchmarks/results]

For each model: exports it (as benchmarks/end_to_end.py does), starts `mpirun -n 3 puma-onnx serve`
on loopback, reads the start-up weight sharing (paid once) from the service's model card, then sends
`--repeats` queries of B inputs of `--tokens` random ids for each B, one after the other, from a client
outside the ranks (puma_onnx.Client), and finally B = max(batches) queries of one input at once from as
many threads (queries that wait while a batch runs go together into the next one; `--window` sets
the service's --batch-window, 0 by default). Prints one table: client latency, inputs
per minute, the batch's online seconds, bytes and rounds per input, what the client uploads, and the
online time as a ratio to onnxruntime plaintext on the same batch, measured in the same run (this
machine's speed drifts 2-3x between hours), and the time per input the network model predicts at
PUMA's LAN and a WAN (runtime/network.py: measured compute, bytes / bandwidth, rounds x RTT). Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import MPIEXEC, ROOT, export, plaintext  # noqa: E402

PORT = 8700


def start_service(folder: Path, max_batch: int, window: float) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "serve", str(folder), "--listen", f"127.0.0.1:{PORT}",
         "--max-batch", str(max_batch), "--batch-window", str(window)],
        stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 1800
    while sum(" serves " in line for line in lines) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the service did not start:\n" + "".join(lines))
        time.sleep(0.2)
    return proc, lines


def row(name: str, label: str, inputs: int, latency: float, batch: dict, upload: int, plain: float) -> dict:
    return {
        "model": name, "queries": label, "inputs": inputs, "latency_s": round(latency, 3),
        "inputs_per_min": round(60 * inputs / latency, 1), "online_s": batch["online_s"],
        "online_s_per_input": round(batch["online_s"] / batch["inputs"], 3),
        "mb_per_input": round(batch["bytes"] / batch["inputs"] / 1e6, 1), "rounds": batch["rounds"],
        "upload_mb_per_input": round(upload / inputs / 1e6, 1), "plaintext_s": round(plain, 4),
        "online_over_plaintext": round(batch["online_s"] / plain, 1),
        # network.estimates: PUMA's LAN first, then the WAN
        "lan_s_per_input": round(list(batch["network_estimates"].values())[0] / batch["inputs"], 3),
        "wan_s_per_input": round(list(batch["network_estimates"].values())[1] / batch["inputs"], 3),
    }


def bench(name: str, out: Path, batches: list[int], tokens: int, repeats: int, window: float) -> tuple[dict, list[dict]]:
    from puma_onnx import Client

    folder = export(name, out)
    vocab = json.loads((folder / "puma.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    proc, lines = start_service(folder, max(batches), window)
    rows = []
    try:
        with Client(f"127.0.0.1:{PORT}") as client:
            shared = client.model["weights_shared"]
            for b in batches:
                ids = rng.integers(0, vocab, (b, tokens))
                upload = 16 * ids.size * vocab
                plain = plaintext(folder, ids)[1]
                for _ in range(repeats):
                    began = time.perf_counter()
                    answer = client.query({"input_ids": ids})
                    rows.append(row(name, f"1 x {b}", b, time.perf_counter() - began, answer.batch, upload, plain))
                    print(json.dumps(rows[-1]), flush=True)
            b = max(batches)
            ids = rng.integers(0, vocab, (b, tokens))
            plain = plaintext(folder, ids)[1]
            began = time.perf_counter()
            with ThreadPoolExecutor(b) as pool:
                answers = list(pool.map(lambda i: client.query({"input_ids": ids[i : i + 1]}), range(b)))
            wall = time.perf_counter() - began
            runs = {json.dumps(a.batch, sort_keys=True) for a in answers}  # each batch's own figures
            batch = {k: sum(json.loads(r)[k] for r in runs) for k in ("online_s", "bytes", "inputs", "rounds")}
            links = json.loads(next(iter(runs)))["network_estimates"]
            batch["network_estimates"] = {link: sum(json.loads(r)["network_estimates"][link] for r in runs) for link in links}
            label = f"{b} x 1 at once ({len(runs)} batches)"
            rows.append(row(name, label, b, wall, batch, 16 * ids.size * vocab, plain))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return shared, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--window", type=float, default=0.0, help="the service's --batch-window")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = []
    for name in args.models:
        shared, rows = bench(name, args.out, args.batches, args.tokens, args.repeats, args.window)
        print(f"{name}: weights shared once at start-up: {shared['seconds']} s, {shared['bytes'] / 1e6:.0f} MB, "
              f"{shared['rounds']} rounds")
        table += rows
    (args.out / "service.json").write_text(json.dumps(table, indent=1))
    print("| model | queries x inputs | latency s | inputs/min | online s | online s/input | MB/input (3 ranks) | "
          "rounds | client upload MB/input | online / onnxruntime plaintext | s/input at LAN / WAN (model) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['queries']} | {r['latency_s']:.2f} | {r['inputs_per_min']:.0f} | {r['online_s']:.2f} | "
              f"{r['online_s_per_input']:.2f} | {r['mb_per_input']:.0f} | {r['rounds']} | {r['upload_mb_per_input']:.0f} | "
              f"{r['online_over_plaintext']:.0f}x | {r['lan_s_per_input']:.2f} / {r['wan_s_per_input']:.2f} |")


if __name__ == "__main__":
    main()
