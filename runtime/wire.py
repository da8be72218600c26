"""Setup messages between ranks: bytes, JSON and arrays of a size the receiver does not know.

Protocols know every shape in advance and call `Communicator.exchange` directly;
the executor's setup (the graph skeleton, the input's shape, error statuses,
the final report) does not, so each message here is a length round followed by
a payload round. Nothing is pickled: a rank never runs code another rank sent.
"""

from __future__ import annotations

import json

import numpy as np

from .comm import PARTIES, Communicator


def broadcast_bytes(comm: Communicator, payload: bytes | None, root: int) -> bytes:
    """`root` sends `payload` to the two other ranks; every rank returns it. 2 rounds."""
    others = [r for r in range(PARTIES) if r != root]
    if comm.rank == root:
        data = np.frombuffer(payload, dtype=np.uint8)
        size = np.array([data.size], dtype=np.int64)
        comm.exchange({r: size for r in others}, {})
        comm.exchange({r: data for r in others}, {})
        return payload
    (size,) = comm.exchange({}, {root: ((1,), np.int64)})[root]
    return comm.exchange({}, {root: ((int(size),), np.uint8)})[root].tobytes()


def broadcast_json(comm: Communicator, obj, root: int):
    """`root`'s JSON-able object on every rank."""
    payload = json.dumps(obj).encode() if comm.rank == root else None
    return json.loads(broadcast_bytes(comm, payload, root))


def gather_json(comm: Communicator, obj, root: int) -> list | None:
    """Every rank's object, as a list by rank at `root` (None elsewhere). 2 rounds."""
    others = [r for r in range(PARTIES) if r != root]
    if comm.rank != root:
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        comm.exchange({root: np.array([data.size], dtype=np.int64)}, {})
        comm.exchange({root: data}, {})
        return None
    sizes = comm.exchange({}, {r: ((1,), np.int64) for r in others})
    got = comm.exchange({}, {r: ((int(sizes[r][0]),), np.uint8) for r in others})
    return [obj if r == root else json.loads(got[r].tobytes()) for r in range(PARTIES)]


def broadcast_flag(comm: Communicator, flag: bool, root: int) -> bool:
    """`root`'s yes/no on every rank. 1 round, 1 byte to each other rank."""
    others = [r for r in range(PARTIES) if r != root]
    if comm.rank == root:
        comm.exchange({r: np.array([flag], np.uint8) for r in others}, {})
        return bool(flag)
    return bool(comm.exchange({}, {root: ((1,), np.uint8)})[root][0])


def barrier(comm: Communicator) -> None:
    """Return once every rank has called it: where the setup ends, so that no rank's online time holds
    another's setup work. 1 round, 1 byte to each other rank."""
    others = [r for r in range(PARTIES) if r != comm.rank]
    comm.exchange({r: np.ones(1, np.uint8) for r in others}, {r: ((1,), np.uint8) for r in others})


def allgather_json(comm: Communicator, obj) -> list:
    """Every rank's JSON-able object, as a list by rank, on every rank. 2 rounds."""
    others = [r for r in range(PARTIES) if r != comm.rank]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    sizes = comm.exchange({r: np.array([data.size], dtype=np.int64) for r in others}, {r: ((1,), np.int64) for r in others})
    got = comm.exchange({r: data for r in others}, {r: ((int(sizes[r][0]),), np.uint8) for r in others})
    return [obj if r == comm.rank else json.loads(got[r].tobytes()) for r in range(PARTIES)]
