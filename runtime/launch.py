"""`puma-onnx run` on one MPI rank: checks, error handling, and the client's output files.

Three ranks share the machine's cores, so each rank's BLAS gets one thread
unless the user set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS: more threads per rank
oversubscribe the cores. The variables must be set before numpy loads.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from .session import CLIENT, RunOptions, UserError, run  # noqa: E402

RANKS = 3


def error(message: str) -> None:
    """One line in a single write, so that the ranks' lines do not interleave."""
    sys.stderr.flush()
    os.write(2, f"puma-onnx: error: {message}\n".encode())


def launch(opts: RunOptions, command: str = "run") -> int:
    """Run this rank's part of `command` (run or generate); returns the exit code. An unexpected error
    aborts the whole MPI job."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_size() != RANKS:
        error(
            f"puma-onnx {command} needs exactly {RANKS} MPI ranks (mpirun -n {RANKS} puma-onnx {command} ...), "
            f"got {world.Get_size()}"
        )
        return 1
    from .comm import MPIComm

    if command == "generate":
        from .generation import finish as done
        from .generation import generate as program
    else:
        program, done = run, finish
    comm = MPIComm(world)
    try:
        report = program(comm, opts)
    except UserError as e:
        error(str(e))
        return 1
    except BaseException as e:  # noqa: BLE001 - any other failure must end all ranks, not hang them
        error(f"rank {world.Get_rank()} failed: {type(e).__name__}: {e}")
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        world.Abort(1)
        return 1
    if world.Get_rank() == CLIENT:
        done(report, opts)
    return 0


def finish(report: dict, opts: RunOptions) -> None:
    """The client's files and summary."""
    outputs = report.pop("outputs")
    if opts.output:
        np.savez(opts.output, **outputs)
    if opts.report:
        with open(opts.report, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
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
