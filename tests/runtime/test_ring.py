import numpy as np
import pytest

from puma_onnx.runtime import ring
from puma_onnx.runtime.ring import FixedPoint, ring_matmul

rng = np.random.default_rng(11)


def rand_u64(*shape):
    return rng.integers(0, 2**64, shape, dtype=np.uint64)


@pytest.fixture(params=["byte limbs", "float64 limbs"])
def kernel(request, monkeypatch):
    """ring_matmul's tests run on both kernels: int8 GEMMs of byte limbs, and float64 GEMMs of 22-bit limbs."""
    if request.param == "byte limbs" and not ring.byte_limbs.available():
        pytest.skip("onnxruntime's MatMulInteger is not exact on this CPU (no VNNI): float64 limbs only")
    monkeypatch.setattr(ring, "BYTE_LIMBS", request.param == "byte limbs")
    return request.param


def test_encode_decode_within_half_ulp():
    fxp = FixedPoint(18)
    x = rng.uniform(-1e6, 1e6, 10_000)
    # Rounding to nearest: at most half of 2^-18.
    assert np.abs(fxp.decode(fxp.encode(x)) - x).max() <= 2.0**-19


def test_frac_bits_configurable():
    fxp = FixedPoint(12)
    assert fxp.encode(np.array([1.0]))[0] == 2**12
    assert fxp.decode(np.array([2**12], dtype=np.uint64))[0] == 1.0


def test_encode_out_of_range_names_allowed_range():
    with pytest.raises(ValueError, match=r"\|x\| < 2\^45"):
        FixedPoint(18).encode(np.array([0.0, 2.0**46]))
    with pytest.raises(ValueError, match="cannot be encoded"):
        FixedPoint(18).encode(np.array([np.nan]))


def test_negative_values_wrap_as_twos_complement():
    assert FixedPoint(0).encode(np.array([-1.0]))[0] == np.uint64(2**64 - 1)


@pytest.mark.parametrize(
    "sa, sb",
    [((7, 13), (13, 5)), ((3, 1, 4), (4, 2)), ((2, 3, 4, 6), (3, 6, 5)), ((9,), (9, 4)), ((4, 9), (9,)), ((6,), (6,))],
)
def test_ring_matmul_equals_numpy_uint64_matmul(sa, sb, kernel):
    a, b = rand_u64(*sa), rand_u64(*sb)
    assert np.array_equal(ring_matmul(a, b), np.matmul(a, b))


def test_ring_matmul_exact_at_largest_limbs(kernel):
    # All-ones words maximise every limb product and partial sum.
    a = np.full((ring.DIRECT_ROWS + 2, 700), 2**64 - 1, dtype=np.uint64)
    b = np.full((700, 2), 2**64 - 1, dtype=np.uint64)
    assert np.array_equal(ring_matmul(a, b), a @ b)


def test_ring_matmul_splits_inner_dimension_beyond_exact_limit(monkeypatch, kernel):
    monkeypatch.setattr(ring, "_MAX_K", 16)
    monkeypatch.setattr(ring.byte_limbs, "MAX_K", 16)
    a, b = rand_u64(ring.DIRECT_ROWS + 5, 50), rand_u64(50, 3)
    assert np.array_equal(ring_matmul(a, b), a @ b)


def test_ring_matmul_in_column_blocks_for_a_wide_right_operand(monkeypatch, kernel):
    monkeypatch.setattr(ring, "_MAX_B_ELEMENTS", 64)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2**64, size=(ring.DIRECT_ROWS + 5, 40), dtype=np.uint64)
    b = rng.integers(0, 2**64, size=(40, 23), dtype=np.uint64)
    assert np.array_equal(ring_matmul(a, b), a @ b)


@pytest.mark.parametrize("rows", [1, 2, ring.DIRECT_ROWS_BYTES, ring.DIRECT_ROWS_BYTES + 1, ring.DIRECT_ROWS,
                                  ring.DIRECT_ROWS + 1])
def test_ring_matmul_with_few_rows_agrees_with_the_limb_products(monkeypatch, rows, kernel):
    a, b = rand_u64(rows, 600), rand_u64(600, 7)
    direct = ring_matmul(a, b)
    monkeypatch.setattr(ring, "DIRECT_ROWS", 0)
    monkeypatch.setattr(ring, "DIRECT_ROWS_BYTES", 0)
    assert np.array_equal(direct, ring_matmul(a, b)) and np.array_equal(direct, a @ b)


def test_float32_encoding_equals_the_float64_one_including_ties():
    fxp = FixedPoint(18)
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(0, 3, 10000), [0.5 / 2**18, 1.5 / 2**18, -2.5 / 2**18, 1000.25]]).astype(np.float32)
    assert np.array_equal(fxp.encode(x), fxp.encode(x.astype(np.float64)))
    assert np.array_equal(fxp.encode(x, checked=True), fxp.encode(x))
