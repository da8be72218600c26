"""Micro-benchmarks of the protocol layer, on three MPI ranks of this machine.

    OPENBLAS_NUM_THREADS=1 .venv/bin/mpiexec -n 3 .venv/bin/python -m mpi4py benchmarks/protocols.py [--quick]

(One BLAS thread per rank: three ranks with OpenBLAS's default of one thread per core
oversubscribe the two cores, and OpenBLAS's spinning threads then slow matmul 5-7x.)

Prints, from rank 0: local ring_matmul against numpy's uint64 matmul, AES-CTR
throughput, the MPI wait backoff (round latency and how much a waiting rank slows a
computing one), and a table of protocols with wall time, bytes sent per rank (mean and
max over the ranks) and rounds. Times are wall clock on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from puma_onnx.runtime import arith, chain, compare, convert
from puma_onnx.runtime.comm import MPIComm
from puma_onnx.runtime.party import Party
from puma_onnx.runtime.prg import PRG, new_seed
from puma_onnx.runtime.ring import ring_matmul


def best_of(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sync(party: Party) -> None:
    """A barrier through the communicator itself, so waiting ranks sleep instead of spinning."""
    with party.comm.tag("bench_sync"):
        for peer_step in (1, 2):
            to, frm = (party.rank + peer_step) % 3, (party.rank - peer_step) % 3
            party.comm.exchange({to: np.zeros(1, np.uint8)}, {frm: ((1,), np.uint8)})


def local_section(party: Party, repeat: int) -> None:
    """ring_matmul and the PRG on rank 0 while the other ranks sleep in `sync`."""
    if party.rank == 0:
        rng = np.random.default_rng(0)
        print("== local, rank 0 alone (the other ranks wait) ==")
        for m, k, n in ((128, 768, 768), (128, 3072, 768)):
            a = rng.integers(0, 2**64, (m, k), dtype=np.uint64)
            b = rng.integers(0, 2**64, (k, n), dtype=np.uint64)
            assert np.array_equal(ring_matmul(a, b), a @ b)
            t_ring = best_of(lambda: ring_matmul(a, b), repeat)
            t_np = best_of(lambda: a @ b, max(1, repeat // 2))
            print(f"ring_matmul {m}x{k}x{n}: {t_ring * 1e3:7.1f} ms   numpy uint64: {t_np * 1e3:7.1f} ms   "
                  f"speed-up {t_np / t_ring:4.1f}x")
        prg = PRG(new_seed())
        for nbytes in (1 << 16, 1 << 20, 1 << 24):
            t = best_of(lambda: prg.words(nbytes // 8), repeat)
            print(f"AES-CTR PRG, {nbytes:>9} bytes per draw: {nbytes / t / 1e9:5.2f} GB/s")
    sync(party)


def backoff_section(party: Party, rounds: int) -> None:
    """Round latency and the slow-down of a computing rank for several wait policies (best of 3)."""
    comm = party.comm
    keep = (comm.spin, comm.yields, comm.min_sleep, comm.max_sleep)
    policies = {
        "busy Testall": (10**9, 0, 0.0, 0.0),
        "sleep 1 ms": (0, 0, 1e-3, 1e-3),
        "sleep 50us..1ms": (50, 0, 5e-5, 1e-3),
        "yield only": (50, 10**9, 0.0, 0.0),
        "200 yields, sleep 50us..1ms (chosen)": (50, 200, 5e-5, 1e-3),
    }
    work = np.random.default_rng(1).random((128, 768)), np.random.default_rng(2).random((768, 3072))
    if party.rank == 0:
        print("== MPI wait policy: latency of a 3-party round, and rank 0 computing while 1, 2 wait ==")
    for name, policy in policies.items():
        comm.spin, comm.yields, comm.min_sleep, comm.max_sleep = policy
        sync(party)
        start = time.perf_counter()
        for _ in range(rounds):
            comm.exchange({party.next: np.zeros(1, np.uint64)}, {party.prev: ((1,), np.uint64)})
        latency = (time.perf_counter() - start) / rounds
        busy = []
        for _ in range(3):
            sync(party)
            start = time.perf_counter()
            if party.rank == 0:
                for _ in range(30):
                    np.matmul(*work)
                comm.exchange({1: np.zeros(1, np.uint8), 2: np.zeros(1, np.uint8)}, {})
            else:
                comm.exchange({}, {0: ((1,), np.uint8)})
            busy.append(time.perf_counter() - start)
        busy = min(busy)
        if party.rank == 0:
            print(f"{name:38s} round {latency * 1e6:7.1f} us   30 matmuls on rank 0: {busy * 1e3:7.1f} ms")
    comm.spin, comm.yields, comm.min_sleep, comm.max_sleep = keep
    sync(party)


def protocol_section(party: Party, quick: bool, repeat: int) -> None:
    fxp = party.fxp
    rng = np.random.default_rng(3)
    n_rows = 32 if quick else 128

    def shared(shape, owner=0, scale=4.0):
        v = rng.uniform(-scale, scale, shape)
        return arith.share(party, fxp.encode(v) if party.rank == owner else None, owner, shape)

    x, y = shared((n_rows, 768)), shared((n_rows, 768), 1)
    w1, w2 = shared((768, 768), 2, 0.05), shared((3072, 768), 2, 0.05)
    h = shared((n_rows, 3072))
    scores = shared((n_rows, n_rows))
    bit = convert.msb(party, x)
    cases = {
        f"mul_fx {n_rows}x768": lambda: arith.mul_fx(party, x, y),
        f"truncate {n_rows}x768": lambda: arith.truncate(party, x, 18),
        f"matmul {n_rows}x768x768 (ring)": lambda: arith.matmul(party, x, w1),
        f"matmul_fx {n_rows}x768x768": lambda: arith.matmul_fx(party, x, w1),
        f"matmul_fx {n_rows}x3072x768": lambda: arith.matmul_fx(party, h, w2),
        f"msb {n_rows}x768 (L={party.msb_bits})": lambda: convert.msb(party, x),
        f"b2a {n_rows}x768": lambda: convert.b2a(party, bit),
        f"mul_bit {n_rows}x768": lambda: convert.mul_bit(party, bit, y),
        f"x^8 as 3 mul_fx {n_rows}x768": lambda: arith.mul_fx(
            party, *[arith.mul_fx(party, *[arith.mul_fx(party, x, x)] * 2)] * 2
        ),
        f"x^8 as a chain {n_rows}x768": lambda: chain.products(
            party, arith.mul_local(x, x), fxp.frac_bits, [chain.Step(None, 1, None, 1, fxp.frac_bits)] * 2
        ),
        f"equal {n_rows}x768": lambda: compare.equal(party, x, y),
        f"max {n_rows}x{n_rows} rows": lambda: compare.max(party, scores),
    }
    if party.rank == 0:
        print("== protocols on 3 MPI ranks (best-of time on rank 0; bytes per rank: mean and max over ranks) ==")
        print(f"{'protocol':34s} {'time ms':>9s} {'rounds':>7s} {'MB/rank':>9s} {'max MB':>8s} {'B/elem':>8s}")
    for name, fn in cases.items():
        elapsed = []
        for _ in range(repeat):
            sync(party)
            before = party.comm.stats.snapshot()
            start = time.perf_counter()
            out = fn()
            elapsed.append(time.perf_counter() - start)
            cost = party.comm.stats.snapshot() - before
        elapsed = min(elapsed)
        with party.comm.tag("bench_sync"):
            mine = np.array([cost.bytes], dtype=np.int64)
            if party.rank == 0:
                got = party.comm.exchange({}, {1: ((1,), np.int64), 2: ((1,), np.int64)})
            else:
                party.comm.exchange({0: mine}, {})
        if party.rank == 0:
            nbytes = [cost.bytes, int(got[1][0]), int(got[2][0])]
            elems = out.size if hasattr(out, "size") else out.shape[0]
            print(f"{name:34s} {elapsed * 1e3:9.1f} {cost.rounds:7d} {np.mean(nbytes) / 1e6:9.3f} "
                  f"{max(nbytes) / 1e6:8.3f} {np.mean(nbytes) / elems:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    party = Party.setup(MPIComm())
    local_section(party, repeat=2 if args.quick else 5)
    backoff_section(party, rounds=100 if args.quick else 1000)
    protocol_section(party, args.quick, repeat=1 if args.quick else 3)


if __name__ == "__main__":
    main()
