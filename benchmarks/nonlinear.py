"""Micro-benchmarks of the nonlinear kernels and the embedding, on three MPI ranks of this machine.

    OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 3 .venv/bin/python -m mpi4py benchmarks/nonlinear.py [--quick]

(One BLAS thread per rank, as for benchmarks/protocols.py: three ranks share two cores.)

Prints, from rank 0, one line per kernel at BERT-base sizes: wall time (best of
--repeat runs, all ranks started together), rounds, bytes sent per rank (mean and
max over the ranks), bytes per element, and the max abs error of the revealed
result against approx.py's float64 definition (table[ids] for the embedding).
Times are wall clock on a shared 2-core machine with loopback MPI; model a WAN
from the bytes and rounds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from puma_onnx.runtime import approx, arith, nonlinear
from puma_onnx.runtime.comm import MPIComm
from puma_onnx.runtime.embedding import embedding
from puma_onnx.runtime.party import Party

OWNER, CLIENT = 0, 1


def sync(party: Party) -> None:
    """A barrier through the communicator, so waiting ranks sleep instead of spinning."""
    with party.comm.tag("bench_sync"):
        for step in (1, 2):
            to, frm = (party.rank + step) % 3, (party.rank - step) % 3
            party.comm.exchange({to: np.zeros(1, np.uint8)}, {frm: ((1,), np.uint8)})


def bytes_of_all(party: Party, nbytes: int) -> list[int] | None:
    """Every rank's byte count, at rank 0."""
    with party.comm.tag("bench_sync"):
        mine = np.array([nbytes], dtype=np.int64)
        if party.rank == 0:
            got = party.comm.exchange({}, {1: ((1,), np.int64), 2: ((1,), np.int64)})
            return [nbytes, int(got[1][0]), int(got[2][0])]
        party.comm.exchange({0: mine}, {})
        return None


def shared(party: Party, rng, shape, owner: int, lo: float, hi: float):
    """(AShare, the encoded values in the clear for the error column); every rank draws the same values."""
    v = party.fxp.decode(party.fxp.encode(rng.uniform(lo, hi, shape)))
    return arith.share(party, party.fxp.encode(v) if party.rank == owner else None, owner, shape), v


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a quarter of the sizes, one run")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    party = Party.setup(MPIComm())
    rng = np.random.default_rng(7)
    seq, vocab = (32, 30522 // 4) if args.quick else (128, 30522)
    repeat = 1 if args.quick else args.repeat

    hidden, hidden_v = shared(party, rng, (seq, 3072), OWNER, -6, 6)
    scores, scores_v = shared(party, rng, (12, seq, seq), OWNER, -8, 8)
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    x, x_v = shared(party, rng, (seq, 768), OWNER, -4, 4)
    gamma, gamma_v = shared(party, rng, (768,), OWNER, 0.5, 1.5)
    beta, beta_v = shared(party, rng, (768,), OWNER, -0.5, 0.5)
    table, table_v = shared(party, rng, (vocab, 768), OWNER, -0.1, 0.1)
    ids = rng.integers(0, vocab, seq)

    cases = [
        (f"gelu {seq}x3072", lambda: nonlinear.gelu(party, hidden), lambda: approx.gelu(hidden_v)),
        (f"softmax 12x{seq}x{seq}", lambda: nonlinear.softmax(party, scores), lambda: approx.softmax(scores_v)),
        (f"softmax 12x{seq}x{seq} causal", lambda: nonlinear.softmax(party, scores, causal),
         lambda: approx.softmax(scores_v, causal)),
        (f"layer_norm {seq}x768", lambda: nonlinear.layer_norm(party, x, gamma, beta, 1e-12),
         lambda: approx.layer_norm(x_v, gamma_v, beta_v, 1e-12)),
        (f"embedding {seq} ids, {vocab}x768",
         lambda: embedding(party, table, ids if party.rank == CLIENT else None, CLIENT, ids.shape),
         lambda: table_v[ids]),
    ]
    if party.rank == 0:
        print(f"== nonlinear kernels on 3 MPI ranks (time: best of {repeat}; bytes sent per rank) ==")
        print(f"{'kernel':36s} {'time ms':>9s} {'rounds':>7s} {'MB/rank':>9s} {'max MB':>8s} "
              f"{'B/elem':>8s} {'max err':>9s}")
    for name, fn, reference in cases:
        best, cost = None, None
        for _ in range(repeat):
            sync(party)
            before = party.comm.stats.snapshot()
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            cost = party.comm.stats.snapshot() - before
            best = elapsed if best is None else min(best, elapsed)
        nbytes = bytes_of_all(party, cost.bytes)
        with party.comm.tag("bench_check"):
            opened = arith.reveal(party, out, to=0)
        if party.rank == 0:
            err = np.abs(party.fxp.decode(opened) - reference()).max()
            print(f"{name:36s} {best * 1e3:9.1f} {cost.rounds:7d} {np.mean(nbytes) / 1e6:9.3f} "
                  f"{max(nbytes) / 1e6:8.3f} {np.mean(nbytes) / out.size:8.1f} {err:9.2e}")


if __name__ == "__main__":
    main()
