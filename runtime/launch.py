"""`puma-onnx run`, `generate` and `serve` on one MPI rank: checks, error handling, the client's files (`reports`).

Three ranks share the machine's cores, so each rank's BLAS gets one thread
unless the user set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS: more threads per rank
oversubscribe the cores. The variables must be set before numpy loads.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from .comm import PeerEnded, PeerGone  # noqa: E402
from .kernels import KernelError  # noqa: E402
from .reports import finish_generate, finish_run  # noqa: E402
from .session import CLIENT, RunOptions, UserError, run  # noqa: E402

RANKS = 3


def say(line: str) -> None:
    """One line on stderr in a single write, so that the ranks' lines do not interleave."""
    sys.stderr.flush()
    os.write(2, f"puma-onnx: {line}\n".encode(errors="backslashreplace"))


def error(message: str) -> None:
    say(f"error: {message}")


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the kernel.

    The protocols allocate and free tens of MB per step; by default glibc maps each block over 128 KB
    afresh and unmaps it on free, so every temporary pays the kernel's page faults and zeroing again
    (0.4 ms per MB here). Blocks up to 32 MB (glibc's largest mmap threshold) now come from the heap,
    which is trimmed only beyond 256 MB of free space at its top. Returns whether glibc took both settings
    (False where mallopt is absent: nothing changes).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return mallopt(m_mmap_threshold, 32 << 20) == 1 and mallopt(m_trim_threshold, 256 << 20) == 1


def launch(opts: RunOptions, command: str = "run") -> int:
    """Run this rank's part of `command` (run, generate or serve); returns the exit code. An unexpected error
    aborts the whole MPI job."""
    keep_freed_memory()
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
    elif command == "serve":
        from .service import serve as program

        done = None
    else:
        program, done = run, finish_run
    comm = MPIComm(world, timeout=opts.timeout)
    rank = world.Get_rank()
    for number in STOP_SIGNALS:
        signal.signal(number, _stopped)
    signal.signal(signal.SIGUSR1, _peer_died)
    try:
        report = program(comm, opts)
    except UserError as e:  # raised alike on every rank, before any share moved
        _ignore_signals()
        error(str(e))
        return 1
    except PeerEnded as e:  # a peer ends the job and told us why: say so, tell it, let it abort
        _ignore_signals()
        error(str(e))
        comm.acknowledge(e.peer)
        return _abort(world, 1, grace=TOLD_GRACE_S)
    except BaseException as e:  # noqa: BLE001 - this rank ends the job: one line here, its reason to the peers
        _ignore_signals()
        ending = _ending(e, rank)
        error(ending.line)
        if ending.traceback and os.environ.get(TRACEBACK_ENV, "1") != "0":
            traceback.print_exc(file=sys.stderr)
        if not ending.tell:  # every survivor heard it too; a message towards the dead rank ends the job at once
            return _abort(world, ending.code, grace=ENDING_WAIT_S)
        comm.end_job(ending.notice, wait=ENDING_WAIT_S)
        return _abort(world, ending.code)
    _ignore_signals()  # the job is done: writing the client's files is not interrupted halfway
    if rank == CLIENT and done is not None:
        done(report, opts)
    return 0


@dataclass
class Ending:
    """How a rank that ends the job says why: its own line, the notice its peers print (public words
    only: never an exception's text, which could quote a value), the exit code."""

    line: str
    notice: str
    code: int = 1
    traceback: bool = False
    tell: bool = True  # send the notice (not when mpiexec told every rank at once)


def _ending(e: BaseException, rank: int) -> Ending:
    if isinstance(e, (KeyboardInterrupt, Stopped)):
        number = int(signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signal)
        said = f"rank {rank} stopped (signal {number})"
        return Ending(f"{said}; the job was aborted", said, 128 + number)
    if isinstance(e, PeerGone):  # silent or lost: the reason names ranks and seconds only
        return Ending(str(e), e.reason)
    if isinstance(e, PeerDied):
        said = f"rank {rank} heard from mpiexec that another rank died"
        return Ending(f"{said}; the job was aborted", said, tell=False)
    failed = f"rank {rank} failed (it printed why)"
    if isinstance(e, KernelError):  # a graph the checks let through: the node and its shapes
        return Ending(f"rank {rank} failed: {e}", failed)
    return Ending(f"rank {rank} failed: {type(e).__name__}: {e}", failed, traceback=True)


# Unexpected failures (bugs) print their traceback unless this is "0".
TRACEBACK_ENV = "PUMA_ONNX_TRACEBACK"


# Signals that stop a rank with one line on it and on its peers (SIGINT arrives as KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# A rank that ends the job waits at most this long for its peers to say so (each acknowledges its notice
# once it has; a peer busy in a long local step reads the notice at its next round), then aborts. A peer
# that was told aborts the job itself only if that abort has not come this long after.
ENDING_WAIT_S = 5.0
TOLD_GRACE_S = ENDING_WAIT_S + 5.0


class Stopped(Exception):
    """A termination signal reached this rank."""

    def __init__(self, number: int):
        self.signal = number
        super().__init__(f"signal {number}")


class PeerDied(Exception):
    """mpiexec's SIGUSR1: a rank died (sent when cleanup is left to the ranks, -disable-auto-cleanup;
    by default mpiexec kills every rank at once and prints its own banner)."""


def _stopped(number, frame) -> None:
    raise Stopped(number)


def _peer_died(number, frame) -> None:
    raise PeerDied()


def _ignore_signals() -> None:
    """While a rank says why the job ends, a second Ctrl-C must not raise a traceback into its line."""
    for number in (signal.SIGINT, *STOP_SIGNALS, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


def _abort(world, code: int, grace: float = 0.0) -> int:
    """End every rank after `grace` seconds. MPICH's own "Abort(code) on node ..." line would follow
    ours: stderr goes to /dev/null first."""
    time.sleep(grace)
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    world.Abort(code)
    return code
