"""Generation benchmark: `mpirun -n 3 puma-onnx generate` with its secret key/value cache, next to
onnxruntime's plaintext generation loop measured in the same run.

    .venv/bin/python benchmarks/generation.py [--cases gpt2 smollm2 llama-tiny] [--out benchmarks/results]

Cases (exported once into --out with `puma-onnx export`, full size):
  gpt2        12 layers, random weights: 32 tokens in, 32 out (the rows for 1 and 8 out are its first
              steps: greedy steps do not depend on how many follow);
  smollm2     the real SmolLM2-135M-Instruct: a real prompt, 32 out (fewer if it ends its answer);
  llama-tiny  4 layers, random weights: 32 in, 32 out.
Per case: the prompt step, the mean cost of a token after it, the total, GB sent by the three ranks,
rounds and peak RSS per rank; times also as a ratio to onnxruntime's plaintext loop (this machine's
speed drifts 2-3x between hours: compare ratios). Writes generation.json and generation.png (cost per
generated token against its position, next to the prompt pass that every token would cost without
the cache, as in PUMA's own generation). Not a test.
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
PROMPT = "The history of the city of Paris begins with a small settlement on an island in the river"
CASES = {"gpt2": 32, "smollm2": 32, "llama-tiny": 32}
TARGETS = "GPT-2 32 in, 1 out: online <= 8 s (SPU here 42 s); 32 in, 32 out: <= 60 s; after the prompt <= 1/10"


def export(name: str, out: Path) -> Path:
    folder = out / f"{name}-generate"
    if not (folder / "model.puma.onnx").exists():
        subprocess.run([sys.executable, "-m", "puma_onnx", "export", name, "-o", str(folder)], check=True)
    return folder


def prompt_ids(folder: Path, name: str) -> np.ndarray:
    if name == "smollm2":
        from tokenizers import Tokenizer

        return np.array([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids], np.int64)
    vocab = json.loads((folder / "puma.json").read_text())["vocab_size"]
    return np.random.default_rng(0).integers(3, vocab, size=(1, 32), dtype=np.int64)


def plaintext(folder: Path, ids: np.ndarray, steps: int) -> tuple[list[int], list[float]]:
    """onnxruntime's generation loop with its cache on the exact export: new ids and time per step."""
    from puma_onnx.plaintext import generate

    generate(folder / "model.onnx", ids, 2)  # warm-up
    times: list[float] = []
    tokens, _ = generate(folder / "model.onnx", ids, steps, times=times)
    return tokens, times


def secure(folder: Path, ids: np.ndarray, steps: int, out: Path, name: str) -> dict:
    np.save(out / f"{name}.prompt.npy", ids)
    report, answer = out / f"{name}.generate.json", out / f"{name}.answer.json"
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "puma_onnx", "generate", str(folder), "--input-ids",
           str(out / f"{name}.prompt.npy"), "--max-new-tokens", str(steps), "--report", str(report),
           "--output", str(answer)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: secure generation failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(report.read_text()), "answer": json.loads(answer.read_text())}


def row(label: str, steps: list[dict], plain: list[float], r: dict, tokens: int) -> str:
    used = steps[:tokens]
    prompt, later = used[0], used[1:]
    per_token = sum(s["time_s"] for s in later) / len(later) if later else 0.0
    total = sum(s["time_s"] for s in used)
    plain_total = sum(plain[:tokens])
    gb = sum(s["bytes"] for s in used) / 1e9
    return (
        f"| {label} | {len(used)} | {prompt['time_s']:.2f} | {per_token:.2f} | "
        f"{per_token / prompt['time_s'] if later else 0:.2f} | {total:.1f} | {total / plain_total:.0f}x | {gb:.3f} | "
        f"{sum(s['rounds'] for s in used)} | {max(r['peak_rss_mb']):.0f} |"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = r["steps"]
        at = [s["tokens_in_context"] for s in steps[1:]]
        line = left.plot(at, [s["time_s"] for s in steps[1:]], "o-", label=name)[0]
        # Without a cache each token costs a pass over the whole prefix: at least the prompt step.
        left.axhline(steps[0]["time_s"], color=line.get_color(), ls="--", lw=1, label=f"{name}: prompt pass")
        right.plot(at, [s["bytes"] / 1e6 for s in steps[1:]], "o-", color=line.get_color(), label=name)
        right.axhline(steps[0]["bytes"] / 1e6, color=line.get_color(), ls="--", lw=1, label=f"{name}: prompt pass")
    left.set(xlabel="tokens in context", ylabel="seconds per generated token", title="time per token (secret cache)",
             yscale="log")
    right.set(xlabel="tokens in context", ylabel="MB sent per generated token (3 ranks)", title="bytes per token",
              yscale="log")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.6, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results, lines = {}, []
    for name in args.cases:
        folder = export(name, args.out)
        ids = prompt_ids(folder, name)
        r = secure(folder, ids, CASES[name], args.out, name)
        steps = r["steps"]
        tokens, plain = plaintext(folder, ids, len(steps))
        r["plaintext_step_s"] = plain
        r["same_ids_as_exact_model"] = tokens == r["answer"]["new_ids"]
        results[name] = r
        counts = [1, 8, len(steps)] if name == "gpt2" else [len(steps)]
        for n in counts:
            lines.append(row(f"{name} {ids.shape[1]} in, {n} out", steps, plain, r, n))
        print(f"{name}: {r['answer']['text']!r} (same ids as the exact model: {r['same_ids_as_exact_model']})")
    plot({k: results[k] for k in results}, args.out / "generation.png")
    (args.out / "generation.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("| case | tokens out | prompt step s | s per token after | ratio | online s | vs onnxruntime | GB | rounds |"
          " peak RSS MB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"targets: {TARGETS}; plot: {args.out / 'generation.png'}")


if __name__ == "__main__":
    main()
