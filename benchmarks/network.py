"""The network model against a simulated network: MiniLM and BERT-base (128 tokens) on three MPI ranks.

    .venv/bin/python benchmarks/network.py [--models minilm bert-base] [--links 1Gbit,2ms 2Gbit,5ms] [--out DIR]

For each model: one run on this machine's loopback, whose report predicts the online time at each link
(`network_estimates`, runtime/network.py); then one run per link with `--simulate-network`, where every
round sleeps the link's transfer time and round trip. Prints predicted against simulated online time.
Not a test: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from end_to_end import CASES, MPIEXEC, ROOT, prepared
from puma_onnx.runtime.network import parse_link


def secure_run(folder: Path, ids_path: Path, report: Path, extra: list[str]) -> dict:
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "run", str(folder),
           "--input-ids", str(ids_path), "--report", str(report), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        raise SystemExit(f"{folder.name}: secure run failed")
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=sorted(CASES))
    parser.add_argument("--links", nargs="+", default=["1Gbit,2ms", "2Gbit,5ms"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        folder, _, ids_path = prepared(name, args.out)
        flags = [f for link in args.links for f in ("--network", link)]
        base = secure_run(folder, ids_path, args.out / f"{name}.net.json", flags)
        for link in args.links:
            predicted = base["network_estimates"][parse_link(link).label()]
            simulated = secure_run(folder, ids_path, args.out / f"{name}.sim.json", ["--simulate-network", link])
            rows.append(
                f"| {name} | {link} | {base['online_s']:.1f} | {predicted:.1f} | {simulated['online_s']:.1f} | "
                f"{predicted / simulated['online_s']:.2f} | {max(base['rounds'])} | {max(base['bytes_sent']) / 1e9:.2f} |"
            )
        lan, wan = (base["network_estimates"][k] for k in list(base["network_estimates"])[:2])
        rows.append(f"| {name} | LAN / WAN estimates | | {lan:.1f} / {wan:.1f} | | | | |")
    print("| model | link | loopback online s | predicted s | simulated s | predicted / simulated | rounds | "
          "GB sent by the busiest rank |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
