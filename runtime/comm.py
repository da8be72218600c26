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

import math
import os
import queue
import threading
import time
from array import array
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
        # Per round: seconds computed since the previous round ended, and bytes sent (`network.predict`);
        # 16 bytes a round, so a long generation's millions of rounds stay small.
        self._computed, self._sent = array("d"), array("q")
        self._round_end = time.perf_counter()
        self.simulate = None  # a network.Link: each round then takes as long as over that link

    def begin_trace(self) -> None:
        """Start the per-round trace afresh (at the start of the online phase)."""
        self._computed, self._sent = array("d"), array("q")
        self._round_end = time.perf_counter()

    @contextmanager
    def untraced(self):
        """Rounds that are not the online protocol's (weights streamed into the walk): left out of
        the trace, with the time they took; compute before and after them stays counted."""
        rounds, pending = len(self._sent), time.perf_counter() - self._round_end
        try:
            yield
        finally:
            del self._computed[rounds:], self._sent[rounds:]
            self._round_end = time.perf_counter() - pending

    @property
    def trace(self) -> list[tuple[float, int]]:
        """(seconds computed before the round, bytes sent in it) for each round since `begin_trace`."""
        return list(zip(self._computed, self._sent))

    def tail(self) -> float:
        """Seconds computed since the last round ended."""
        return time.perf_counter() - self._round_end

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

    @contextmanager
    def busy(self):
        """A long local step (the owner loading the model): MPIComm tells the waiting peers that this
        rank is alive; here there is no liveness timeout to keep off."""
        yield

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
        empty = {frm: np.empty(shape, dtype) for frm, (shape, dtype) in recvs.items() if not math.prod(shape)}
        nbytes = sum(a.nbytes for a in sends.values())
        self.stats.record(self.path, nbytes, len(sends))
        self._computed.append(self.tail())
        self._sent.append(nbytes)
        if self.simulate is not None:  # this rank's card pushes its bytes
            time.sleep(8.0 * nbytes / self.simulate.bits_per_s)
        got = self._exchange(sends, {frm: r for frm, r in recvs.items() if frm not in empty})
        if self.simulate is not None:  # the crossing
            time.sleep(self.simulate.rtt_s)
        self._round_end = time.perf_counter()
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


def run_parties(fn, *args, frac_bits: int = 18, keys: dict[str, bytes] | None = None, **setup):
    """Run fn(party, *args) for the three ranks on threads; returns [result0, result1, result2].

    The first exception raised by any rank is re-raised here (the others are released).
    Extra keywords go to `Party.setup`; with `keys`, the parties take those keys instead of
    agreeing on fresh ones (`Party.from_keys`; no setup round).
    """
    # party.py sits above this module; importing it at call time keeps the layering.
    from .party import Party

    comms = ThreadComm.group()
    results: list = [None] * PARTIES
    errors: list = [None] * PARTIES

    def body(rank: int):
        try:
            if keys is None:
                party = Party.setup(comms[rank], frac_bits=frac_bits, **setup)
            else:
                party = Party.from_keys(comms[rank], keys, frac_bits, **setup)
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
        self, mpi_comm=None, spin: int = 50, yields: int = 200, min_sleep: float = 5e-5, max_sleep: float = 1e-3,
        timeout: float | None = None,
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
        self.timeout = timeout
        self._acks: list = []  # acknowledgements in flight (their buffers must outlive the sends)

    def _exchange(self, sends, recvs):
        got = {frm: np.empty(shape, dtype) for frm, (shape, dtype) in recvs.items()}
        try:
            self._peer_notice()  # once a round: a peer that ends the job is heard within a round
            reqs = [self._comm.Irecv(buf, source=frm, tag=DATA_TAG) for frm, buf in got.items()]
            reqs += [self._comm.Isend(arr, dest=to, tag=DATA_TAG) for to, arr in sends.items()]
            self._poll(reqs, [*got, *sends])
        except self._MPI.Exception:  # a peer died and MPI noticed (mpiexec -disable-auto-cleanup)
            raise PeerLost(self.rank, sorted({*got, *sends})) from None
        return got

    # -- liveness: a timeout on silent peers, heartbeats from a busy rank, notices when a rank ends the job

    @contextmanager
    def busy(self):
        """While this rank works alone (the owner loading, or exporting on first use, the model), a thread
        sends each peer a heartbeat every `timeout / 4` seconds, so that waiting peers do not time out."""
        if self.timeout is None:
            yield
            return
        stop = threading.Event()
        beat = np.zeros(1, dtype=np.uint8)

        def beats():
            sent = []
            while not stop.wait(self.timeout / 4):
                sent = [r for r in sent if not r.Test()]
                sent += [self._comm.Isend(beat, dest=p, tag=HEARTBEAT_TAG) for p in self._peers()]

        thread = threading.Thread(target=beats, name="heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def end_job(self, reason: str, wait: float) -> None:
        """Tell both peers why this rank ends the job (public words only) and wait, at most `wait` seconds,
        until each has said so in its own line (it acknowledges) before the caller aborts. A peer that
        ends the job at the same time (Ctrl-C reaches every rank) gets its acknowledgement here."""
        note = np.frombuffer(reason.encode(), dtype=np.uint8).copy()
        sent = {peer: self._send_quietly(note, peer, NOTICE_TAG) for peer in self._peers()}
        waiting = {peer for peer, request in sent.items() if request is not None}  # a dead peer cannot say
        deadline = time.monotonic() + wait
        while waiting and time.monotonic() < deadline:
            for peer in sorted(waiting):
                status = self._MPI.Status()
                try:  # probes by peer: one on ANY_SOURCE fails at once when any rank has died
                    if self._comm.Iprobe(source=peer, tag=ACK_TAG):
                        self._comm.Recv(np.empty(1, np.uint8), source=peer, tag=ACK_TAG)
                        waiting.discard(peer)
                    elif self._comm.Iprobe(source=peer, tag=NOTICE_TAG, status=status):
                        self._receive_notice(status)
                        self.acknowledge(peer)
                except self._MPI.Exception:  # that peer died meanwhile
                    waiting.discard(peer)
            time.sleep(1e-3)
        del sent

    def acknowledge(self, peer: int) -> None:
        """Tell `peer`, which ends the job, that this rank has said so."""
        self._acks.append(self._send_quietly(np.ones(1, np.uint8), peer, ACK_TAG))

    def _peers(self) -> list[int]:
        return [p for p in range(PARTIES) if p != self.rank]

    def _send_quietly(self, data: np.ndarray, peer: int, tag: int):
        try:
            return data, self._comm.Isend(data, dest=peer, tag=tag)
        except self._MPI.Exception:  # that peer is dead: nobody to tell
            return None

    def _receive_notice(self, status) -> str:
        note = np.empty(status.Get_count(self._MPI.BYTE), dtype=np.uint8)
        self._comm.Recv(note, source=status.Get_source(), tag=NOTICE_TAG)
        return note.tobytes().decode(errors="replace")

    def _peer_notice(self, waiting=lambda: []) -> None:
        """Raise PeerEnded if a peer's notice arrived (a cheap probe); `waiting()` lists the ranks this
        rank waits for."""
        status = self._MPI.Status()
        if self._comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=NOTICE_TAG, status=status):
            reason = self._receive_notice(status)
            raise PeerEnded(self.rank, status.Get_source(), reason, waiting())

    def _heartbeat(self) -> bool:
        """Whether a busy peer's heartbeats arrived (all of them are read)."""
        heard = False
        while self._comm.Iprobe(source=self._MPI.ANY_SOURCE, tag=HEARTBEAT_TAG):
            self._comm.Recv(np.empty(1, np.uint8), source=self._MPI.ANY_SOURCE, tag=HEARTBEAT_TAG)
            heard = True
        return heard

    def _poll(self, reqs, peers: list[int]) -> None:
        """Until every request completes; `peers[i]` is the rank of `reqs[i]`."""
        testall = self._MPI.Request.Testall
        for _ in range(self.spin):
            if testall(reqs):
                return
        for _ in range(self.yields):
            if testall(reqs):
                return
            os.sched_yield()
        def pending() -> list[int]:
            return sorted({peer for peer, req in zip(peers, reqs) if not req.Test()})

        delay, since = self.min_sleep, time.monotonic()
        while not testall(reqs):
            time.sleep(delay)
            delay = min(2 * delay, self.max_sleep)
            self._peer_notice(pending)
            if self._heartbeat():
                since = time.monotonic()
            if self.timeout is not None and time.monotonic() - since > self.timeout:
                raise PeerSilent(self.rank, pending() or self._peers(), self.timeout)


# MPI tags: protocol data; a rank's notice that it ends the job, a peer's acknowledgement of it; a busy
# rank's heartbeat.
DATA_TAG, NOTICE_TAG, ACK_TAG, HEARTBEAT_TAG = 0, 1, 2, 3


# How a silence reads; a rank told of one says whom it was waiting for itself.
HEARD_NOTHING = "heard nothing from"


class PeerGone(RuntimeError):
    """This rank cannot go on: the job must end (the message is the one line this rank prints)."""


class PeerSilent(PeerGone):
    """A rank waited longer than its liveness timeout for a peer's message (a stopped or stuck rank)."""

    def __init__(self, rank: int, silent: list[int], timeout: float):
        self.reason = f"rank {rank} {HEARD_NOTHING} {_names(silent)} for {timeout:g} s"
        super().__init__(f"{self.reason}; the job was aborted")


class PeerLost(PeerGone):
    """MPI failed a wait: a peer process died."""

    def __init__(self, rank: int, peers: list[int]):
        self.reason = f"rank {rank} lost {_names(peers)} (MPI failed its wait)"
        super().__init__(f"{self.reason}; the job was aborted")


class PeerEnded(PeerGone):
    """A peer told this rank why it ends the job. On a silence, `waiting` (the ranks this one was waiting
    for) tells who the silent one is when its silence made another rank time out on this one."""

    def __init__(self, rank: int, peer: int, reason: str, waiting: list[int]):
        self.peer = peer
        self.reason = reason
        waiting = [r for r in waiting if r != peer] if HEARD_NOTHING in reason else []
        itself = f" (rank {rank} was waiting for {_names(waiting)})" if waiting else ""
        super().__init__(f"rank {rank}: {reason}{itself}; the job was aborted")


def _names(ranks: list[int]) -> str:
    return " and ".join(f"rank {r}" for r in ranks)
