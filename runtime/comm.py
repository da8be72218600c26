"""Communicators between the three ranks, with cost counters.

A protocol round is one call to `exchange`: every send of the round goes out, then
every receive completes. All ranks call `exchange` once per round of a protocol,
even a rank with nothing to send or receive in it, so the round count is the same on
every rank and equals the protocol's latency.

Counters: every rank counts the bytes and messages it sends and the rounds it takes
part in, under the path of the open tags (`with comm.tag("softmax"):` inside which
`with comm.tag("msb"):` counts under "softmax/msb"). `Stats.by_protocol()` groups by
the innermost tag; `Stats.snapshot()` gives totals to diff around an operation.

Backends: ThreadComm (three ranks as threads of one process, for tests; see
`run_parties`) and MPIComm (mpi4py, one rank per process).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

PARTIES = 3
UNTAGGED = "untagged"


@dataclass(frozen=True)
class Cost:
    bytes: int = 0
    rounds: int = 0
    messages: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.rounds + other.rounds, self.messages + other.messages)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.bytes - other.bytes, self.rounds - other.rounds, self.messages - other.messages)


class Stats:
    """What one rank sent, by tag path."""

    def __init__(self):
        self._by_path: dict[str, Cost] = defaultdict(Cost)
        self._total = Cost()

    def record(self, path: str, nbytes: int, messages: int) -> None:
        cost = Cost(nbytes, 1, messages)
        self._by_path[path] = self._by_path[path] + cost
        # A running total: the executor takes a snapshot around every node.
        self._total = self._total + cost

    def snapshot(self) -> Cost:
        return self._total

    def by_path(self) -> dict[str, Cost]:
        return dict(self._by_path)

    def by_protocol(self) -> dict[str, Cost]:
        """Costs grouped by the innermost tag (what the protocol itself sent)."""
        out: dict[str, Cost] = defaultdict(Cost)
        for path, cost in self._by_path.items():
            out[path.rsplit("/", 1)[-1]] += cost
        return dict(out)


class Communicator:
    """Base class: tags, counters and argument checks; backends implement `_exchange`."""

    size = PARTIES

    def __init__(self, rank: int):
        if not 0 <= rank < PARTIES:
            raise ValueError(f"rank must be in [0, {PARTIES}), got {rank}")
        self.rank = rank
        self.stats = Stats()
        self._tags: list[str] = []

    @contextmanager
    def tag(self, name: str):
        self._tags.append(name)
        try:
            yield
        finally:
            self._tags.pop()

    @property
    def path(self) -> str:
        return "/".join(self._tags) or UNTAGGED

    def exchange(
        self, sends: dict[int, np.ndarray], recvs: dict[int, tuple[tuple[int, ...], np.dtype]]
    ) -> dict[int, np.ndarray]:
        """One round: send sends[to] to each `to`, then receive a (shape, dtype) array from each `frm`."""
        for peer in (*sends, *recvs):
            if peer == self.rank or not 0 <= peer < PARTIES:
                raise ValueError(f"rank {self.rank} cannot exchange with rank {peer}")
        # Empty arrays are never sent: both sides know the shapes, so both skip them.
        sends = {to: np.ascontiguousarray(arr) for to, arr in sends.items() if np.size(arr)}
        recvs = {frm: (tuple(shape), np.dtype(dtype)) for frm, (shape, dtype) in recvs.items()}
        empty = {frm: np.empty(shape, dtype) for frm, (shape, dtype) in recvs.items() if not np.prod(shape)}
        self.stats.record(self.path, sum(a.nbytes for a in sends.values()), len(sends))
        got = self._exchange(sends, {frm: r for frm, r in recvs.items() if frm not in empty})
        got.update(empty)
        for frm, (shape, dtype) in recvs.items():
            if got[frm].shape != shape or got[frm].dtype != dtype:
                raise RuntimeError(
                    f"rank {self.rank} expected {shape} {dtype} from rank {frm} under {self.path!r}, "
                    f"got {got[frm].shape} {got[frm].dtype}: the ranks disagree on the protocol"
                )
        return got

    def _exchange(self, sends, recvs):
        raise NotImplementedError


class ThreadComm(Communicator):
    """Three ranks as threads of one process, messages through per-pair queues."""

    # A protocol bug that leaves a rank waiting fails the test instead of hanging it.
    TIMEOUT_S = 120.0

    def __init__(self, rank: int, boxes: dict[tuple[int, int], queue.Queue], abort: threading.Event):
        super().__init__(rank)
        self._boxes = boxes
        self._abort = abort

    @staticmethod
    def group() -> list[ThreadComm]:
        boxes = {(i, j): queue.Queue() for i in range(PARTIES) for j in range(PARTIES) if i != j}
        abort = threading.Event()
        return [ThreadComm(r, boxes, abort) for r in range(PARTIES)]

    def _exchange(self, sends, recvs):
        for to, arr in sends.items():
            # A copy: the receiver must not see later in-place changes by the sender.
            self._boxes[(self.rank, to)].put(arr.copy())
        got = {}
        for frm in recvs:
            deadline = time.monotonic() + self.TIMEOUT_S
            while True:
                if self._abort.is_set():
                    raise RuntimeError(f"rank {self.rank}: another rank failed")
                try:
                    got[frm] = self._boxes[(frm, self.rank)].get(timeout=0.05)
                    break
                except queue.Empty:
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"rank {self.rank} waited {self.TIMEOUT_S} s for rank {frm} under {self.path!r}"
                        )
        return got


def run_parties(fn, *args, frac_bits: int = 18, **setup):
    """Run fn(party, *args) for the three ranks on threads; returns [result0, result1, result2].

    The first exception raised by any rank is re-raised here (the others are released).
    Extra keywords go to `Party.setup`.
    """
    # party.py sits above this module; importing it at call time keeps the layering.
    from .party import Party

    comms = ThreadComm.group()
    results: list = [None] * PARTIES
    errors: list = [None] * PARTIES

    def body(rank: int):
        try:
            party = Party.setup(comms[rank], frac_bits=frac_bits, **setup)
            results[rank] = fn(party, *args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = exc
            comms[rank]._abort.set()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(PARTIES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Prefer the original failure over the "another rank failed" it caused elsewhere.
    first = [e for e in errors if e is not None and "another rank failed" not in str(e)]
    first = first or [e for e in errors if e is not None]
    if first:
        raise first[0]
    return results


class MPIComm(Communicator):
    """One rank per MPI process; numpy buffers through Isend/Irecv, no pickling.

    MPICH's blocking Recv busy-waits, and with three ranks on two cores a spinning
    waiter steals the core of the rank that computes. So a waiting rank polls Testall:
    `spin` times back to back (a reply already on its way costs nothing), then `yields`
    times with sched_yield between polls (gives the core away when another rank needs it,
    yet stays within tens of microseconds), then sleeps, doubling from `min_sleep` up to
    `max_sleep` seconds.
    Measured here (benchmarks/protocols.py, one BLAS thread per rank, quiet machine):
                                    3-rank ring round   rank 0's 30 matmuls while 1, 2 wait
        busy Testall                  2700-2800 us        590-610 ms (1.5x)
        sleep 1 ms                      500-600 us        384-454 ms (the baseline)
        sleep 50 us doubling to 1 ms    155-220 us        380-650 ms
        sched_yield only                 73-103 us        530-1010 ms (1.4x-2.3x)
        50 spins, 200 yields, then
          sleep 50 us doubling to 1 ms   53-127 us        385-407 ms   <- chosen
    Yielding hands the core to a rank that computes, yet answers within tens of microseconds;
    the doubling sleep then keeps a long wait (another rank in a big matmul) almost free.
    """

    def __init__(
        self, mpi_comm=None, spin: int = 50, yields: int = 200, min_sleep: float = 5e-5, max_sleep: float = 1e-3
    ):
        from mpi4py import MPI  # imported here so that the thread backend never initialises MPI

        self._MPI = MPI
        self._comm = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        if self._comm.Get_size() != PARTIES:
            raise RuntimeError(f"puma-onnx runs on exactly {PARTIES} MPI ranks, got {self._comm.Get_size()}")
        super().__init__(self._comm.Get_rank())
        self.spin = spin
        self.yields = yields
        self.min_sleep = min_sleep
        self.max_sleep = max_sleep

    def _exchange(self, sends, recvs):
        got = {frm: np.empty(shape, dtype) for frm, (shape, dtype) in recvs.items()}
        reqs = [self._comm.Irecv(buf, source=frm) for frm, buf in got.items()]
        reqs += [self._comm.Isend(arr, dest=to) for to, arr in sends.items()]
        self._wait(reqs)
        return got

    def _wait(self, reqs) -> None:
        testall = self._MPI.Request.Testall
        for _ in range(self.spin):
            if testall(reqs):
                return
        for _ in range(self.yields):
            if testall(reqs):
                return
            os.sched_yield()
        delay = self.min_sleep
        while not testall(reqs):
            time.sleep(delay)
            delay = min(2 * delay, self.max_sleep)
