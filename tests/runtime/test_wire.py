"""The small collectives of `wire`, on three thread ranks."""

from __future__ import annotations

import time

from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.wire import barrier

LATE = 0.3


def test_a_barrier_returns_on_no_rank_before_the_last_rank_has_called_it():
    """Where the setup ends: a rank that returned early would start its online clock while the owner still
    works. Costs 1 round and 1 byte to each other rank."""

    def program(party):
        if party.rank == 0:
            time.sleep(LATE)
        before = party.comm.stats.snapshot()
        called = time.perf_counter()
        barrier(party.comm)
        cost = party.comm.stats.snapshot() - before
        return called, time.perf_counter(), cost

    results = run_parties(program)
    last_call = max(called for called, _, _ in results)
    assert all(returned >= last_call for _, returned, _ in results)
    assert all(cost.rounds == 1 and cost.bytes == 2 for _, _, cost in results)
