"""Exact products in Z_2^64 from int8 GEMMs: byte limbs through onnxruntime's MatMulInteger.

MatMulInteger multiplies uint8 by int8 into int32, which VNNI (VPDPBUSD) does at 10-20x the speed of a
float64 GEMM. The left operand is cut into its 8 unsigned bytes, a = sum_i a_i 2^(8i); the right one into
balanced digits b = sum_j d_j 2^(8j) mod 2^64, d_j in [-128, 127]: the bytes of b + C, C = 0x80..80, less
128 each (one add and one xor of the word). Then a b = sum_{s<8} 2^(8s) sum_{i+j=s} a_i d_j mod 2^64: 36
limb products (pairs with i + j >= 8 vanish), and fewer when b is small. A b in [-C_J, 2^(8J) - C_J)
(C_J the J low bytes of C; a weight on its owner, |W| 2^f < 2^23: J = 3) has zero digits from J on:
8 + 7 + ... pairs with j < J, 21 for J = 3.
Two layouts make the products 8 GEMM calls, one per s, with no combining of partial products in numpy:
  - the right operand's digits stacked along its inner axis, [D_0; D_1; ...; D_7] (k rows each): the prefix
    [D_0; ...; D_m] is a contiguous row block;
  - the left operand's limbs side by side in reverse, [A_7 | ... | A_0] (a byteswap before the limb
    transpose): the block [A_s | ... | A_{s-m}] meets that prefix so that one GEMM sums every pair i + j = s.
Exactness: each product |a_i d_j| <= 255 * 128, and a sum over at most 8 k terms stays below 2^31 for
k <= MAX_K = 8192; longer inner axes are cut into pieces summed in the ring. (Only the sums with s < 4
must be exact: a wrap by 2^32 at 2^(8s), s >= 4, vanishes mod 2^64. The bound keeps them all exact.)
A CPU whose MatMulInteger saturates (AVX2 without VNNI pairs products in int16) fails the probe in
`available`, and `ring.ring_matmul` then keeps its float64 limbs.
The byte transposes run as onnxruntime Transpose ops (4x numpy's strided copies).

Measured here (one thread, 2026-11-30), against ring.py's 6 float64 limb GEMMs, including the
preparation of both operands: 128x768x768 7.9 vs 20.1 ms; 128x768x3072 37 vs 91 ms; 128x3072x768 34 vs
80 ms.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

MAX_K = 8192
# matmul_bytes' pieces: 255 * 255 * 32768 < 2^31.
MAX_K_BYTES = 32768
_C = np.uint64(0x8080808080808080)
_SHIFTS = np.arange(8, dtype=np.uint64) * np.uint64(8)
# C_J: the J low bytes of C, J = 1..8.
_C_LOW = [int(0x80 * (256**j - 1) // 255) for j in range(9)]

_sessions: dict | None = None
_wide: dict[int, dict] = {}  # sessions of more threads, by thread count (`sessions`)
_exact: bool | None = None
_PROBE_LOCK = threading.Lock()


def _build(threads: int = 1) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(node, a_type, b_type, out_type):
        inputs = [helper.make_tensor_value_info("A", a_type, None)]
        if b_type is not None:
            inputs.append(helper.make_tensor_value_info("B", b_type, None))
        graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("C", out_type, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # one unless a rank computes while the others wait
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False  # an arena would keep the largest temporaries for the whole run
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    return {
        "gemm": session(helper.make_node("MatMulInteger", ["A", "B"], ["C"]), TensorProto.UINT8, TensorProto.INT8,
                        TensorProto.INT32),
        "gemm_u8": session(helper.make_node("MatMulInteger", ["A", "B"], ["C"]), TensorProto.UINT8, TensorProto.UINT8,
                           TensorProto.INT32),
        "transpose": session(helper.make_node("Transpose", ["A"], ["C"], perm=[0, 2, 1]), TensorProto.UINT8, None,
                             TensorProto.UINT8),
    }


def available() -> bool:
    """Whether onnxruntime is there and its MatMulInteger is exact at the worst limbs (probed once; the
    answer is published only after the probe, so ranks run as threads never see it half-way)."""
    global _sessions, _exact
    with _PROBE_LOCK:
        if _exact is None:
            _sessions, _exact = _probe()
    return _exact


def sessions(threads: int = 1) -> dict | None:
    """The kernels' sessions with `threads` intra-op threads (built once each), for a product one rank
    computes while the others wait (prepared.py's owner); None when byte limbs are unavailable."""
    if not available():
        return None
    if threads <= 1:
        return _sessions
    with _PROBE_LOCK:
        if threads not in _wide:
            _wide[threads] = _build(threads)
    return _wide[threads]


def _probe() -> tuple[dict | None, bool]:
    if sys.byteorder != "little":  # the limbs are read from the words' bytes in memory
        return None, False
    try:
        sessions = _build()
    except Exception:  # noqa: BLE001 - no onnxruntime, or one that cannot build these sessions: float64 limbs
        return None, False
    rng = np.random.default_rng(0)
    k = 64
    a = np.concatenate([np.full((2, k), 2**64 - 1, np.uint64), rng.integers(0, 2**64, (3, k), dtype=np.uint64)])
    # Digits -128 (b = -C) and 127 next to each other: the pairs VPMADDUBSW would saturate.
    b = np.array([[(-int(_C)) % 2**64, 0x7F7F7F7F7F7F7F7F, 0x7F807F807F807F80, 2**64 - 1, 0]], np.uint64)
    b = np.concatenate([np.repeat(b, k, axis=0), rng.integers(0, 2**64, (k, 2), dtype=np.uint64)], axis=1)
    small = np.full((2, k), 255, np.uint8)
    try:
        exact = np.array_equal(matmul(a, b, sessions), np.einsum("mk,kn->mn", a, b)) and np.array_equal(
            matmul_bytes(small, b, sessions), np.einsum("mk,kn->mn", small.astype(np.uint64), b))
    except Exception:  # noqa: BLE001 - a kernel that fails is as unusable as an inexact one
        return None, False
    return (sessions, True) if exact else (None, False)


def _transpose(x: np.ndarray, sessions: dict) -> np.ndarray:
    """x (b, r, c) uint8 -> (b, c, r), contiguous."""
    return sessions["transpose"].run(None, {"A": np.ascontiguousarray(x)})[0]


def digit_count(b: np.ndarray) -> int:
    """How many balanced byte digits b needs: the least J with every b (two's complement) in
    [-C_J, 2^(8J) - C_J); 8 for a random share."""
    if b.size == 0:
        return 1
    signed = b.view(np.int64)
    lo, hi = int(signed.min()), int(signed.max())
    return next((j for j in range(1, 8) if -_C_LOW[j] <= lo and hi < 256**j - _C_LOW[j]), 8)


def right_limbs(b: np.ndarray, digits: int = 8, sessions: dict | None = None) -> np.ndarray:
    """b (batch, k, n) uint64 -> (batch, digits k, n) int8: its balanced digits [D_0; ...; D_{digits-1}]."""
    batch, k, n = b.shape
    offset = np.empty(b.shape, np.uint64)  # C order whatever b's layout (a transposed weight)
    np.add(b, _C, out=offset)
    np.bitwise_xor(offset, _C, out=offset)
    limbs = _transpose(offset.view(np.uint8).reshape(batch, k * n, 8), sessions or _sessions)  # (batch, 8, k n)
    return limbs[:, :digits].view(np.int8).reshape(batch, digits * k, n)


def left_limbs(a: np.ndarray, sessions: dict | None = None) -> np.ndarray:
    """a (rows, k) uint64 -> (rows, 8 k) uint8: [A_7 | ... | A_0]."""
    rows, k = a.shape
    swapped = np.array(a, dtype=np.uint64, order="C")
    swapped.byteswap(inplace=True)
    return _transpose(swapped.view(np.uint8).reshape(rows, k, 8), sessions or _sessions).reshape(rows, 8 * k)


def _matmul_piece(a: np.ndarray, b: np.ndarray, digits: int, sessions: dict) -> np.ndarray:
    """a (batch, m, k) @ b (batch, k, n) mod 2^64 for k <= MAX_K, both uint64, b of `digits` digits."""
    batch, m, k = a.shape
    n = b.shape[-1]
    left = left_limbs(a.reshape(batch * m, k), sessions).reshape(batch, m, 8 * k)
    right = right_limbs(b, digits, sessions)
    out = np.zeros((batch, m, n), np.uint64)
    gemm = sessions["gemm"]
    for s in range(8):
        top = min(s, digits - 1)  # pairs (s - j, j), j = 0..top: A_s .. A_{s-top} against D_0 .. D_top
        c = gemm.run(None, {"A": np.ascontiguousarray(left[..., (7 - s) * k : (8 - s + top) * k]),
                            "B": right[:, : (top + 1) * k]})[0]
        out += c.astype(np.int64).view(np.uint64) << _SHIFTS[s]
    return out


def matmul(a: np.ndarray, b: np.ndarray, sessions: dict | None = None) -> np.ndarray:
    """Exact a @ b mod 2^64 for uint64 a (..., m, k) and b (k, n) or (..., k, n) (np.matmul broadcasting);
    needs `available()`."""
    sessions = sessions or _sessions
    k = a.shape[-1]
    if b.ndim == 2:
        lead = a.shape[:-1]
        a3, b3 = a.reshape(1, -1, k), b[None]
    else:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        lead = shape + a.shape[-2:-1]
        a3 = np.broadcast_to(a, shape + a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = np.broadcast_to(b, shape + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    digits = digit_count(b)
    out = np.zeros((a3.shape[0], a3.shape[1], b.shape[-1]), np.uint64)  # k = 0: the empty sum
    for lo in range(0, k, MAX_K):
        out += _matmul_piece(a3[..., lo : lo + MAX_K], b3[:, lo : lo + MAX_K], digits, sessions)
    return out.reshape(lead + (b.shape[-1],))


def matmul_bytes(a: np.ndarray, b: np.ndarray, sessions: dict | None = None) -> np.ndarray:
    """Exact a @ b mod 2^64 for a 2-D uint8 a (small integers: a one-hot's bits) and uint64 b (k, n);
    needs `available()`.

    No limbs to prepare: b's bytes as they lie in memory, a (k, 8 n) uint8 matrix whose column (c, i)
    is byte i of b[:, c], go straight into one uint8 x uint8 GEMM, and the 8 byte columns of each
    output combine at 2^(8i). Exact while 255 * 255 * k < 2^31: pieces of MAX_K_BYTES rows.
    """
    k, n = b.shape
    m = a.shape[0]
    columns = np.ascontiguousarray(b).view(np.uint8).reshape(k, 8 * n)
    out = np.zeros((m, n), np.uint64)
    gemm = (sessions or _sessions)["gemm_u8"]
    for lo in range(0, k, MAX_K_BYTES):
        c = gemm.run(None, {"A": np.ascontiguousarray(a[:, lo : lo + MAX_K_BYTES]), "B": columns[lo : lo + MAX_K_BYTES]})[0]
        out += (c.reshape(m, n, 8).astype(np.int64).view(np.uint64) << _SHIFTS).sum(axis=-1, dtype=np.uint64)
    return out
