"""Exact products in Z_2^64 from int8 GEMMs: byte limbs through onnxruntime's MatMulInteger.

A word is the sum of its bytes, a = sum_i a_i 2^(8i), so a b mod 2^64 = sum_{s<8} 2^(8s) sum_{i+j=s} a_i b_j:
36 byte-limb products (pairs with i + j >= 8 vanish). MatMulInteger multiplies uint8 by int8 into int32,
which VNNI (VPDPBUSD) does at 10-20x the speed of a float64 GEMM. Two layouts make the 36 products
8 GEMM calls with no combining of partial products in numpy:
  - the right operand's limbs stacked along its inner axis, [B_0; B_1; ...; B_7] (k rows each), made
    signed as b_j - 128 (one xor of the word with 0x80..80): the prefix [B_0; ...; B_s] is a contiguous
    row block;
  - the left operand's limbs side by side in reverse, [A_7 | ... | A_0] (a byteswap before the limb
    transpose): the suffix [A_s | ... | A_0] meets that prefix so that one GEMM sums every pair i + j = s.
  - the signed offset comes back as 128 sum_{i<=s} rowsum(A_i) per output row (one small vector).
Exactness: each product |a_i (b_j - 128)| <= 255 * 128, and a sum over (s + 1) k <= 8 k terms stays below
2^31 for k <= MAX_K = 8192; longer inner axes are cut into pieces summed in the ring. (Only the sums with
s < 4 must be exact: a wrap by 2^32 at 2^(8s), s >= 4, vanishes mod 2^64. The bound keeps them all exact.) A CPU whose
MatMulInteger saturates (AVX2 without VNNI pairs products in int16) fails the probe in `available`, and
`ring.ring_matmul` then keeps its float64 limbs.
The byte transposes run as onnxruntime Transpose ops (4x numpy's strided copies).

Measured here (one thread, 2026-11-30), against ring.py's 6 float64 limb GEMMs, including the
preparation of both operands: 128x768x768 7.9 vs 20.1 ms; 128x768x3072 37 vs 91 ms; 128x3072x768 34 vs
80 ms.
"""

from __future__ import annotations

import numpy as np

MAX_K = 8192
_SIGN = np.uint64(0x8080808080808080)
_SHIFTS = np.arange(8, dtype=np.uint64) * np.uint64(8)

_sessions: dict | None = None
_exact: bool | None = None


def _build() -> dict:
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
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # three ranks share the cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_cpu_mem_arena = False  # an arena would keep the largest temporaries for the whole run
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    return {
        "gemm": session(helper.make_node("MatMulInteger", ["A", "B"], ["C"]), TensorProto.UINT8, TensorProto.INT8,
                        TensorProto.INT32),
        "transpose": session(helper.make_node("Transpose", ["A"], ["C"], perm=[0, 2, 1]), TensorProto.UINT8, None,
                             TensorProto.UINT8),
    }


def available() -> bool:
    """Whether onnxruntime is there and its MatMulInteger is exact at the worst limbs (probed once)."""
    global _sessions, _exact
    if _exact is None:
        try:
            _sessions = _build()
        except ImportError:
            _exact = False
            return False
        _exact = True  # let the probe run through matmul
        rng = np.random.default_rng(0)
        k = 64
        a = np.concatenate([np.full((2, k), 2**64 - 1, np.uint64), rng.integers(0, 2**64, (3, k), dtype=np.uint64)])
        # Bytes 0x00 (b - 128 = -128) next to 0xff: the pairs VPMADDUBSW would saturate.
        b = np.concatenate([np.zeros((k, 1), np.uint64), np.full((k, 1), 2**64 - 1, np.uint64),
                            np.full((k, 1), 0x00FF00FF00FF00FF, np.uint64), rng.integers(0, 2**64, (k, 2), dtype=np.uint64)],
                           axis=1)
        _exact = bool(np.array_equal(matmul(a, b), np.einsum("mk,kn->mn", a, b)))
    return _exact


def _transpose(x: np.ndarray) -> np.ndarray:
    """x (b, r, c) uint8 -> (b, c, r), contiguous."""
    return _sessions["transpose"].run(None, {"A": np.ascontiguousarray(x)})[0]


def right_limbs(b: np.ndarray) -> np.ndarray:
    """b (batch, k, n) uint64 -> (batch, 8 k, n) int8: [B_0; ...; B_7], each limb minus 128."""
    batch, k, n = b.shape
    signed = np.empty(b.shape, np.uint64)  # C order whatever b's layout (a transposed weight)
    np.bitwise_xor(b, _SIGN, out=signed)
    limbs = _transpose(signed.view(np.uint8).reshape(batch, k * n, 8))  # (batch, 8, k n)
    return limbs.view(np.int8).reshape(batch, 8 * k, n)


def left_limbs(a: np.ndarray) -> np.ndarray:
    """a (rows, k) uint64 -> (rows, 8 k) uint8: [A_7 | ... | A_0]."""
    rows, k = a.shape
    swapped = np.array(a, dtype=np.uint64, order="C")
    swapped.byteswap(inplace=True)
    return _transpose(swapped.view(np.uint8).reshape(rows, k, 8)).reshape(rows, 8 * k)


def _matmul_piece(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (batch, m, k) @ b (batch, k, n) mod 2^64 for k <= MAX_K, both uint64."""
    batch, m, k = a.shape
    n = b.shape[-1]
    left = left_limbs(a.reshape(batch * m, k)).reshape(batch, m, 8 * k)
    right = right_limbs(b)
    # Row sums of A_i, i = 7..0, then the offset 128 sum_{i<=s} rowsum(A_i) at 2^(8s), summed over s.
    sums = left.reshape(batch, m, 8, k).sum(axis=-1, dtype=np.uint64)[..., ::-1]
    offset = (np.cumsum(sums, axis=-1, dtype=np.uint64) * np.uint64(128) << _SHIFTS).sum(
        axis=-1, dtype=np.uint64)
    out = np.empty((batch, m, n), np.uint64)
    out[...] = offset[..., None]
    gemm = _sessions["gemm"]
    for s in range(8):
        c = gemm.run(None, {"A": np.ascontiguousarray(left[..., (7 - s) * k :]), "B": right[:, : (s + 1) * k]})[0]
        out += c.astype(np.int64).view(np.uint64) << _SHIFTS[s]
    return out


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact a @ b mod 2^64 for uint64 a (..., m, k) and b (k, n) or (..., k, n) (np.matmul broadcasting);
    needs `available()`."""
    k = a.shape[-1]
    if b.ndim == 2:
        lead = a.shape[:-1]
        a3, b3 = a.reshape(1, -1, k), b[None]
    else:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        lead = shape + a.shape[-2:-1]
        a3 = np.broadcast_to(a, shape + a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = np.broadcast_to(b, shape + b.shape[-2:]).reshape(-1, *b.shape[-2:])
    out = None
    for lo in range(0, k, MAX_K):
        part = _matmul_piece(a3[..., lo : lo + MAX_K], b3[:, lo : lo + MAX_K])
        out = part if out is None else out + part
    return out.reshape(lead + (b.shape[-1],))
