"""Test helpers: share test data from one rank, open results, measure one operation's cost."""

from __future__ import annotations

import numpy as np

from puma_onnx.runtime import arith


def encoded(x, f: int = 18) -> np.ndarray:
    """What the protocols receive: x rounded to f fractional bits (float64). Products of encodings are
    exact in the ring, so a fixed-point result errs by its own truncations only."""
    return np.rint(np.asarray(x, dtype=np.float64) * 2.0**f) / 2.0**f


def share_fx(party, values: np.ndarray, owner: int = 0):
    """Fixed-point share of a float array known to the test (every rank sees `values`, only the owner uses it)."""
    return arith.share(party, party.fxp.encode(values) if party.rank == owner else None, owner, np.shape(values))


def share_ring(party, values: np.ndarray, owner: int = 0):
    return arith.share(party, values if party.rank == owner else None, owner, np.shape(values))


def open_fx(party, x) -> np.ndarray:
    return party.fxp.decode(arith.reveal(party, x))


def cost_of(party, fn):
    """(result, Cost) of fn() on this rank."""
    before = party.comm.stats.snapshot()
    out = fn()
    return out, party.comm.stats.snapshot() - before
