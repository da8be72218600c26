"""Test helpers: run a program on the three thread ranks and read its results in the clear."""

from __future__ import annotations

import numpy as np

from puma_onnx.runtime import arith
from puma_onnx.runtime.comm import run_parties


def share_fx(party, values: np.ndarray, owner: int = 0):
    """Fixed-point share of a float array known to the test (every rank sees `values`, only the owner uses it)."""
    return arith.share(party, party.fxp.encode(values) if party.rank == owner else None, owner, np.shape(values))


def share_ring(party, values: np.ndarray, owner: int = 0):
    return arith.share(party, values if party.rank == owner else None, owner, np.shape(values))


def open_fx(party, x) -> np.ndarray:
    return party.fxp.decode(arith.reveal(party, x))


def on_rank0(fn, *args, **setup):
    """fn's result on rank 0 (the others must agree for revealed values; callers check what they need)."""
    return run_parties(fn, *args, **setup)[0]


def cost_of(party, fn):
    """(result, Cost) of fn() on this rank."""
    before = party.comm.stats.snapshot()
    out = fn()
    return out, party.comm.stats.snapshot() - before
