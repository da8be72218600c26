import numpy as np
import pytest

from puma_onnx.runtime import byte_limbs, ring
from puma_onnx.runtime.ring import ring_matmul

rng = np.random.default_rng(12)

needs_exact_gemm = pytest.mark.skipif(
    not byte_limbs.available(), reason="onnxruntime's MatMulInteger is not exact on this CPU (no VNNI)"
)


def rand_u64(*shape):
    return rng.integers(0, 2**64, shape, dtype=np.uint64)


@needs_exact_gemm
@pytest.mark.parametrize(
    "sa, sb",
    [((1, 1), (1, 1)), ((13, 7), (7, 5)), ((3, 20, 9), (9, 4)), ((2, 3, 17, 6), (3, 6, 5)), ((1, 4, 30, 8), (4, 8, 30)),
     ((40, 3), (2, 3, 2))],
)
def test_byte_limb_products_equal_numpys_uint64_matmul(sa, sb):
    a, b = rand_u64(*sa), rand_u64(*sb)
    assert np.array_equal(byte_limbs.matmul(a, b), np.matmul(a, b))


@needs_exact_gemm
def test_transposed_operands_are_read_as_their_values():
    # A weight read through a Transpose and a transposed share are strided views, not C-order arrays.
    a, b = rand_u64(11, 30), rand_u64(20, 30)
    assert np.array_equal(byte_limbs.matmul(a, b.T), a @ b.T)
    c = rand_u64(30, 11)
    assert np.array_equal(byte_limbs.matmul(c.T, b.T), c.T @ b.T)
    assert np.array_equal(byte_limbs.matmul(c.T[:, ::2], b.T[::2]), c.T[:, ::2] @ b.T[::2])


ALL_DIGITS_MIN = 0x7F7F7F7F7F7F7F80  # -C mod 2^64: every balanced digit -128
ALL_DIGITS_MAX = 0x7F7F7F7F7F7F7F7F  # every digit 127


@needs_exact_gemm
@pytest.mark.parametrize("b_word", [ALL_DIGITS_MIN, ALL_DIGITS_MAX, 0x7F807F807F807F80, 0, 2**64 - 1])
def test_exact_at_the_int32_edge_of_the_longest_piece(b_word):
    # Bytes 0xff against digits -128: a sum of 8 MAX_K products of -255 * 128 is -2^31 + 8 Mi, the most
    # negative any int32 accumulator sees; against digits 127 the largest positive one.
    k = byte_limbs.MAX_K
    a = np.full((3, k), 2**64 - 1, dtype=np.uint64)
    b = np.full((k, 2), b_word, dtype=np.uint64)
    assert np.array_equal(byte_limbs.matmul(a, b), np.einsum("mk,kn->mn", a, b))


@pytest.mark.parametrize("digits", range(1, 8))
def test_digit_count_at_the_ends_of_each_range(digits):
    c = int(0x80 * (256**digits - 1) // 255)  # the J low bytes of 0x80..80
    lo, hi = -c, 256**digits - c - 1
    words = lambda *v: np.array(v, dtype=np.int64).view(np.uint64)  # noqa: E731
    assert byte_limbs.digit_count(words(lo, hi)) == digits
    assert byte_limbs.digit_count(words(lo - 1, 0)) == digits + 1
    assert byte_limbs.digit_count(words(0, hi + 1)) == digits + 1


@needs_exact_gemm
@pytest.mark.parametrize("digits", [1, 2, 3, 5, 7])
def test_small_right_operands_use_fewer_digits_and_stay_exact(digits, monkeypatch):
    c = int(0x80 * (256**digits - 1) // 255)
    b = rng.integers(-c, 256**digits - c, size=(40, 9), dtype=np.int64)
    b[0, :2] = -c, 256**digits - c - 1  # both ends
    b = b.view(np.uint64)
    a = np.full((5, 40), 2**64 - 1, dtype=np.uint64)
    a[1:] = rand_u64(4, 40)
    used = []
    real = byte_limbs.right_limbs
    monkeypatch.setattr(byte_limbs, "right_limbs", lambda x, d=8, s=None: used.append(d) or real(x, d, s))
    assert np.array_equal(byte_limbs.matmul(a, b), np.einsum("mk,kn->mn", a, b))
    assert used == [digits]


@needs_exact_gemm
def test_an_inner_axis_past_one_piece_is_summed_over_pieces():
    a, b = rand_u64(4, byte_limbs.MAX_K + 5), rand_u64(byte_limbs.MAX_K + 5, 3)
    assert np.array_equal(byte_limbs.matmul(a, b), np.einsum("mk,kn->mn", a, b))
    a = np.full((2, byte_limbs.MAX_K + 1), 2**64 - 1, dtype=np.uint64)
    b = np.full((byte_limbs.MAX_K + 1, 1), ALL_DIGITS_MIN, dtype=np.uint64)
    assert np.array_equal(byte_limbs.matmul(a, b), np.einsum("mk,kn->mn", a, b))


@needs_exact_gemm
def test_ring_matmul_takes_the_byte_limbs_where_they_are_exact(monkeypatch):
    calls = []
    real = byte_limbs.matmul
    monkeypatch.setattr(byte_limbs, "matmul", lambda a, b, s=None: calls.append((a.shape, s)) or real(a, b, s))
    a, b = rand_u64(ring.DIRECT_ROWS_BYTES + 1, 9), rand_u64(9, 4)
    assert np.array_equal(ring_matmul(a, b), a @ b)
    assert np.array_equal(ring_matmul(a, b, threads=2), a @ b)
    # One thread: the probed sessions; more: sessions of their own, built once.
    assert calls == [(a.shape, byte_limbs._sessions), (a.shape, byte_limbs.sessions(2))]
    assert byte_limbs.sessions(2) is not byte_limbs._sessions and byte_limbs.sessions(2) is byte_limbs.sessions(2)


class _SaturatingGemm:
    """MatMulInteger as AVX2 without VNNI computes it: adjacent u8 x s8 products summed in int16, saturating."""

    def run(self, _outputs, feeds):
        a = feeds["A"].astype(np.int64)
        b = feeds["B"].astype(np.int64)
        k = a.shape[-1]
        prod = a[..., :, :, None] * b[..., None, :, :]  # (..., m, k, n)
        prod = prod.reshape(prod.shape[:-3] + (prod.shape[-3], k // 2, 2, prod.shape[-1])).sum(axis=-2)
        return [np.clip(prod, -(2**15), 2**15 - 1).sum(axis=-2).astype(np.int32)]


def _reprobe(monkeypatch, build=None, gemm=None) -> None:
    """Forget the probe's answer, and build the sessions with `build`, or the real ones with `gemm` instead."""
    if gemm is not None:
        real_build = byte_limbs._build
        build = lambda threads=1: {**real_build(threads), "gemm": gemm}  # noqa: E731
    monkeypatch.setattr(byte_limbs, "_build", build)
    monkeypatch.setattr(byte_limbs, "_exact", None)
    monkeypatch.setattr(byte_limbs, "_sessions", None)
    monkeypatch.setattr(byte_limbs, "_wide", {})


def test_a_saturating_gemm_fails_the_probe_and_ring_matmul_keeps_float64_limbs(monkeypatch):
    _reprobe(monkeypatch, gemm=_SaturatingGemm())
    assert byte_limbs.available() is False
    a = np.full((ring.DIRECT_ROWS + 1, 64), 2**64 - 1, dtype=np.uint64)
    b = np.zeros((64, 3), dtype=np.uint64)
    assert np.array_equal(ring_matmul(a, b), a @ b)


def test_without_onnxruntime_ring_matmul_keeps_float64_limbs(monkeypatch):
    def missing():
        raise ImportError("No module named 'onnxruntime'")

    _reprobe(monkeypatch, build=missing)
    assert byte_limbs.available() is False
    a, b = rand_u64(ring.DIRECT_ROWS + 1, 20), rand_u64(20, 3)
    assert np.array_equal(ring_matmul(a, b), a @ b)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


@pytest.mark.skipif(not {"avx512_vnni", "avx_vnni"} & _cpu_flags(), reason="no VNNI on this CPU")
def test_with_vnni_the_byte_limbs_are_exact_and_taken():
    # A fault in the byte path fails the probe and quietly costs 2-2.5x in every matmul; here that is an error.
    assert byte_limbs.available()


class _FailingGemm:
    def run(self, _outputs, _feeds):
        raise RuntimeError("MatMulInteger: no kernel for this CPU")


def test_a_gemm_that_fails_is_as_unusable_as_an_inexact_one(monkeypatch):
    _reprobe(monkeypatch, gemm=_FailingGemm())
    assert byte_limbs.available() is False
    a, b = rand_u64(ring.DIRECT_ROWS + 1, 20), rand_u64(20, 3)
    assert np.array_equal(ring_matmul(a, b), a @ b)


def test_ranks_run_as_threads_see_the_probes_answer_only_when_it_is_done(monkeypatch):
    import threading
    import time

    class SlowSaturating(_SaturatingGemm):
        def run(self, outputs, feeds):
            time.sleep(0.05)
            return super().run(outputs, feeds)

    _reprobe(monkeypatch, gemm=SlowSaturating())
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(byte_limbs.available())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [False, False, False]


@pytest.mark.parametrize("shapes", [((5, 0), (0, 3)), ((40, 0), (0, 2)), ((2, 20, 0), (2, 0, 4))])
def test_an_empty_inner_axis_gives_zeros(shapes):
    a, b = np.zeros(shapes[0], np.uint64), np.zeros(shapes[1], np.uint64)
    assert np.array_equal(ring_matmul(a, b), np.matmul(a, b))
