"""The protocol checks under MPI: run as `mpiexec -n 3 python -m mpi4py tests/runtime/mpi_checks.py`.

Every rank builds the same test data from a fixed seed, runs each protocol over MPIComm and
checks the opened result against float64 numpy; rank 0 prints one line per check.
(`python -m mpi4py` aborts the whole job when a rank raises, so a failure cannot hang.)
"""

from __future__ import annotations

import numpy as np

from puma_onnx.runtime import arith, compare, convert
from puma_onnx.runtime.boolean import reveal_bits
from puma_onnx.runtime.comm import MPIComm
from puma_onnx.runtime.party import Party


def checks(party: Party) -> dict[str, bool]:
    fxp = party.fxp
    rng = np.random.default_rng(2024)
    x, y = rng.uniform(-8, 8, (2, 16, 24))
    w = rng.uniform(-1, 1, (24, 10))

    def shared(v, owner):
        return arith.share(party, fxp.encode(v) if party.rank == owner else None, owner, v.shape)

    def opened(s):
        return fxp.decode(arith.reveal(party, s))

    # Half of z equals x, half y: equality must say which.
    z = np.where(rng.random(x.shape) < 0.5, x, y)
    a, b, m, c = shared(x, 0), shared(y, 1), shared(w, 2), shared(z, 2)
    ulp = 2.0**-18
    # Products of encodings are exact in the ring: a fixed-point product errs by its one truncation only.
    xe, ye, we = (fxp.decode(fxp.encode(v)) for v in (x, y, w))
    return {
        "reveal": np.abs(opened(a) - x).max() <= ulp,
        "mul_fx": np.abs(opened(arith.mul_fx(party, a, b)) - xe * ye).max() < ulp,
        "matmul_fx": np.abs(opened(arith.matmul_fx(party, a, m)) - xe @ we).max() < ulp,
        "mul_public_fx": np.abs(opened(arith.mul_public_fx(party, a, 0.25)) - xe / 4).max() < ulp,
        "less_than": np.array_equal(reveal_bits(party, compare.less_than(party, a, b)), x < y),
        "b2a": np.array_equal(arith.reveal(party, convert.b2a(party, compare.ltz(party, a))), (x < 0).astype(np.uint64)),
        "mul_bit": np.abs(opened(convert.mul_bit(party, compare.ltz(party, a), b)) - (x < 0) * y).max() <= ulp,
        "equal": np.array_equal(reveal_bits(party, compare.equal(party, a, c)), x == z),
        "max": np.abs(opened(compare.max(party, a)) - x.max(-1, keepdims=True)).max() <= ulp,
    }


def main() -> None:
    party = Party.setup(MPIComm())
    results = checks(party)
    for name, ok in results.items():
        if not ok:
            raise AssertionError(f"rank {party.rank}: {name} failed under MPI")
    if party.rank == 0:
        for name in results:
            print(f"mpi ok {name}")


if __name__ == "__main__":
    main()
