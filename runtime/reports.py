"""What the client writes and prints at the end of `run` and `generate`: files, summary, profile."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def write_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")


def finish_run(report: dict, opts) -> None:
    """`run`: the client's files and summary."""
    outputs = report.pop("outputs")
    if opts.output:
        with open(opts.output, "wb") as f:  # a file object: numpy adds no ".npz" to the name given
            np.savez(f, **outputs)
    write_json(opts.report, report)
    # Only names and shapes: mpirun forwards stdout to wherever it was started.
    for name, value in outputs.items():
        saved = f" (in {opts.output})" if opts.output else " (not saved: use --output)"
        print(f"{name}: shape {tuple(value.shape)}{saved}")
    gb = report["bytes_sent_total"] / 1e9
    print(
        f"{report['model']}: online {report['online_s']:.2f} s, setup {report['setup_s']:.2f} s, "
        f"wall {report['wall_s']:.2f} s; sent {gb:.3f} GB in all, rounds {max(report['rounds'])}, "
        f"peak RSS {max(report['peak_rss_mb']):.0f} MB"
    )
    if opts.profile:
        print(profile_table(report["per_op"]))


def finish_generate(report: dict, opts) -> None:
    """`generate`: the client's files and summary (the text itself was streamed as it came)."""
    answer = report.pop("outputs")
    write_json(opts.output, answer)
    write_json(opts.report, report)
    steps = report["steps"]
    later = steps[1:]
    per_token = sum(s["time_s"] for s in later) / len(later) if later else 0.0
    gb = report["bytes_sent_total"] / 1e9
    print(
        f"{report['model']}: {len(answer['new_ids'])} new tokens; prompt step {steps[0]['time_s']:.2f} s, "
        f"then {per_token:.2f} s per token; online {report['online_s']:.2f} s, setup {report['setup_s']:.2f} s; "
        f"sent {gb:.3f} GB in all, rounds {max(report['rounds'])}, peak RSS {max(report['peak_rss_mb']):.0f} MB",
        file=sys.stderr,
    )
    if opts.profile:
        for phase in ("prompt", "generation"):
            rows = [r for r in report["per_op"] if r["phase"] == phase]
            if rows:
                print(f"{phase} step{'s' if phase == 'generation' else ''}:\n{profile_table(rows)}", file=sys.stderr)


def profile_table(rows: list[dict]) -> str:
    """Per-op costs summed by op type and by layer, biggest time first."""
    lines = []
    for key, title in (("op_type", "op type"), ("layer", "layer")):
        sums = defaultdict(lambda: [0.0, 0, 0, 0])
        for row in rows:
            s = sums["-" if row[key] is None else row[key]]
            s[0] += row["time_s"]
            s[1] += row["bytes"]
            s[2] += row["rounds"]
            s[3] += 1
        lines.append(f"{title:<16} {'time_s':>9} {'MB':>10} {'rounds':>7} {'nodes':>6}")
        for name, (t, b, rd, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"{str(name):<16} {t:>9.3f} {b / 1e6:>10.2f} {rd:>7d} {n:>6d}")
        lines.append("")
    return "\n".join(lines)
