"""`puma-onnx run` and `generate` on one MPI rank: checks, error handling, the client's files (`reports`).

Three ranks share the machine's cores, so each rank's BLAS gets one thread
unless the user set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS: more threads per rank
oversubscribe the cores. The variables must be set before numpy loads.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402
import traceback  # noqa: E402

from .reports import finish_generate, finish_run  # noqa: E402
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
        from .generation import generate as program

        done = finish_generate
    else:
        program, done = run, finish_run
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
