"""The ring Z_2^64 as numpy uint64, fixed-point encoding, and exact ring matmul.

numpy wraps uint64 arithmetic modulo 2^64, so +, -, * and << on uint64 arrays
are already ring operations. What numpy lacks is a fast matmul: its uint64
matmul is a plain loop without BLAS. `ring_matmul` gets the exact product from int8
GEMMs of byte limbs (`byte_limbs`, onnxruntime's MatMulInteger on VNNI) where they are
exact, else from float64 BLAS by splitting both operands into small limbs whose dot
products stay below 2^53, where float64 integers are exact.
"""

from __future__ import annotations

import numpy as np

from . import byte_limbs

RING_BITS = 64


def to_signed(x: np.ndarray) -> np.ndarray:
    """The two's-complement reading of ring elements (a view, no copy)."""
    return np.asarray(x, dtype=np.uint64).view(np.int64)


class FixedPoint:
    """Real numbers as round(x * 2^frac_bits) in Z_2^64, read as two's complement.

    encode accepts |x| < 2^(63 - frac_bits); a product of two encodings before
    truncation carries 2*frac_bits fractional bits and must stay below 2^62 in
    magnitude for `arith.truncate`, so factors should satisfy |x*y| < 2^(62 - 2 f).
    """

    def __init__(self, frac_bits: int = 18):
        if not 0 <= frac_bits <= 31:
            raise ValueError(f"frac_bits must be in [0, 31], got {frac_bits}")
        self.frac_bits = frac_bits
        self.scale = float(2**frac_bits)
        self.bound = float(2 ** (63 - frac_bits))

    def encode(self, x, checked: bool = False) -> np.ndarray:
        """round(x 2^f) in the ring. `checked`: the caller has already verified |x| < bound (the owner's
        weights, at load time), so the range test is skipped. float32 arrays stay float32: scaling by a
        power of two and rounding to an integer are exact there, and half the memory traffic."""
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float64)
        if not checked:
            # "not <" also catches NaN.
            bad = ~(np.abs(x) < self.bound)
            if bad.any():
                worst = x[bad].flat[0]
                raise ValueError(
                    f"value {worst!r} cannot be encoded: fixed point with {self.frac_bits} fractional bits "
                    f"holds |x| < 2^{63 - self.frac_bits} = {self.bound:.6g}"
                )
        return np.rint(x * x.dtype.type(self.scale)).astype(np.int64).view(np.uint64)

    def decode(self, x: np.ndarray) -> np.ndarray:
        return to_signed(x).astype(np.float64) / self.scale

    def __repr__(self) -> str:
        return f"FixedPoint(frac_bits={self.frac_bits})"


# Three unsigned limbs of 22, 22 and 20 bits: a limb product is below 2^44, so a dot
# product over up to 2^9 terms stays below 2^53, where float64 integers are exact; longer
# inner dimensions are cut into pieces of 2^9. Limb pairs with p + q >= 3 sit at 2^66 and
# vanish mod 2^64, so 6 limb products remain.
#
# Measured on this machine kind (one BLAS thread, quiet machine; benchmarks/protocols.py):
#                      numpy uint64   16-bit limbs (10 products)   22-bit limbs (6 products)
#   128x768x768          100-121 ms     45-49 ms                     27-28 ms
#   128x3072x768         856-940 ms    160-180 ms                   102-118 ms
# (the 6 limb products are ~80% of the time: BLAS is now the floor.)
# Balanced signed 21-bit limbs (8 products + a parity product, k <= 2^12) were slower than
# 16-bit limbs (74 vs 48 ms under load): the signed split costs more elementwise passes.
_LIMB_BITS = (22, 22, 20)
_MAX_K = 2**9
# Column blocks of the right operand keep its float64 limbs below this many elements.
_MAX_B_ELEMENTS = 2**22
# Left operands of at most this many rows multiply in uint64 directly, by einsum. Measured here, one BLAS
# thread, einsum against limbs, right operand 768 x 2304: 1 row 0.7 / 8 ms, 4 rows 2.9 / 15, 32 rows
# 19 / 25, 48 rows 28 / 31, 56 rows 32 / 34, 64 rows 40 / 38, 128 rows 80 / 63 ms (576 x 1536, 1536 x 576,
# 768 x 768 and 3072 x 768 cross between 56 and 64 rows too).
DIRECT_ROWS = 48
# ... and against byte limbs (768 x 2304, both operands' limbs made per call): einsum / byte limbs 4 rows
# 2.3 / 6.4 ms, 8 rows 4.6 / 6.7, 12 rows 6.9 / 7.5, 16 rows 9.1 / 8.0, 32 rows 17.9 / 11.2 (2026-11-30).
DIRECT_ROWS_BYTES = 12
# Off: float64 limbs even where byte limbs are exact (tests compare the two).
BYTE_LIMBS = True


def _limbs(x: np.ndarray) -> np.ndarray:
    """The limbs of x as float64 side by side along the last axis: [l_0 | l_1 | l_2]."""
    n = x.shape[-1]
    out = np.empty(x.shape[:-1] + (3 * n,), dtype=np.float64)
    # One scratch buffer and writes into `out`: fresh temporaries per limb were 8x slower.
    scratch = np.empty(x.shape, dtype=np.uint64)
    shift = 0
    for p, width in enumerate(_LIMB_BITS):
        np.right_shift(x, np.uint64(shift), out=scratch)
        np.bitwise_and(scratch, np.uint64((1 << width) - 1), out=scratch)
        out[..., p * n : (p + 1) * n] = scratch
        shift += width
    return out


def _matmul_limbs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """6 limb products grouped as a_p @ [b_0 .. b_{2-p}]: 3 BLAS calls."""
    k, n = a.shape[-1], b.shape[-1]
    alimbs, blimbs = _limbs(a), _limbs(b)
    out = scratch = None
    for p in range(3):
        c = np.matmul(alimbs[..., p * k : (p + 1) * k], blimbs[..., : (3 - p) * n])
        if out is None:
            out = np.zeros(c.shape[:-1] + (n,), dtype=np.uint64)
            scratch = np.empty_like(out)
        for q in range(3 - p):
            np.copyto(scratch, c[..., q * n : (q + 1) * n], casting="unsafe")
            # Limb p starts at bit 22 p (p <= 2), so the pair (p, q) sits at 2^(22 (p + q)).
            np.left_shift(scratch, np.uint64(22 * (p + q)), out=scratch)
            out += scratch
    return out


def _chunked(kernel, max_k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Split the inner dimension so that each piece stays exact, and add the pieces in the ring."""
    k = a.shape[-1]
    if k <= max_k:
        return kernel(a, b)
    out = None
    for lo in range(0, k, max_k):
        part = kernel(a[..., lo : lo + max_k], b[..., lo : lo + max_k, :])
        if out is None:
            out = part
        else:
            out += part
    return out


def ring_matmul(a: np.ndarray, b: np.ndarray, threads: int = 1) -> np.ndarray:
    """Exact a @ b mod 2^64 for uint64 operands, with np.matmul's broadcasting and 1-D rules.

    Byte limbs through int8 GEMMs (`byte_limbs`) where onnxruntime's MatMulInteger is exact, else
    22-bit limbs (6 limb products in 3 float64 BLAS calls) on pieces of the inner dimension short enough
    to be exact, summed in the ring; numpy's uint64 einsum for few rows (DIRECT_ROWS_BYTES, DIRECT_ROWS).
    `threads` > 1 gives the int8 GEMMs that many threads (for a rank that computes while the others wait).
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    if a.ndim == 1 and b.ndim == 1:
        return ring_matmul(a[None, :], b[:, None], threads)[0, 0]
    if a.ndim == 1:
        return ring_matmul(a[None, :], b, threads)[..., 0, :]
    if b.ndim == 1:
        return ring_matmul(a, b[:, None], threads)[..., 0]
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"ring_matmul: inner dimensions differ, {a.shape} @ {b.shape}")
    if a.shape[-1] == 0:  # the empty sum
        return np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), np.uint64)
    bytes_ = BYTE_LIMBS and byte_limbs.available()
    if a.shape[-2] <= (DIRECT_ROWS_BYTES if bytes_ else DIRECT_ROWS):
        # Few rows (a generation step's one token, a short prompt): splitting b into limbs costs more than
        # numpy's einsum loop on uint64, which wraps mod 2^64 exactly (np.matmul's is 3-20x slower still).
        return np.einsum("...mk,...kn->...mn", a, b)
    if bytes_:
        sessions = byte_limbs.sessions(threads)
        kernel = lambda x, y: byte_limbs.matmul(x, y, sessions)  # noqa: E731
    else:
        kernel = lambda x, y: _chunked(_matmul_limbs, _MAX_K, x, y)  # noqa: E731
    n = b.shape[-1]
    step = max(1, _MAX_B_ELEMENTS // min(b.shape[-2], byte_limbs.MAX_K if bytes_ else _MAX_K))
    if n <= step:
        return kernel(a, b)
    # A wide right operand (GPT-2's 768 x 50257 output projection) goes in column blocks,
    # so its limbs never take more than a few tens of MB.
    return np.concatenate([kernel(a, b[..., lo : lo + step]) for lo in range(0, n, step)], axis=-1)


def ring_matmul_bytes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact a @ b mod 2^64 for a 2-D uint8 a (small integers: bits) and a 2-D uint64 b: one uint8 GEMM
    against b's bytes (`byte_limbs.matmul_bytes`) where byte limbs are exact, else ring_matmul."""
    if BYTE_LIMBS and a.shape[0] > DIRECT_ROWS_BYTES and byte_limbs.available():
        return byte_limbs.matmul_bytes(a, b)
    return ring_matmul(a.astype(np.uint64), b)
