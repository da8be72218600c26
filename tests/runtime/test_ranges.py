"""Kernel domains against recorded activation ranges: the variant each secure op gets, or a refusal."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime.kernels import Node
from puma_onnx.runtime.nonlinear import NormDomain
from puma_onnx.runtime.ranges import MARGIN, RangeError, plan_kernels

F, MSB = 18, 48
SCALES = {"ln.w": np.full(768, 1.5), "rms.w": np.full(576, 3.0)}

GELU = Node("layer.0/act/puma.Gelu", "Gelu", "puma", ["h"], ["g"], {})
SOFTMAX = Node("layer.0/attn/puma.Softmax", "Softmax", "puma", ["s", "mask"], ["p"], {})
LAYER_NORM = Node("layer.0/ln/puma.LayerNorm", "LayerNorm", "puma", ["x", "ln.w", "ln.b"], ["y"], {"epsilon": 1e-12})
RMS_NORM = Node("layer.0/rms/puma.RMSNorm", "RMSNorm", "puma", ["x", "rms.w"], ["y"], {"epsilon": 1e-5})
MATMUL = Node("layer.0/attn/MatMul", "MatMul", "", ["q", "k"], ["s"], {})
SCALE_BY_CONSTANT = Node("layer.0/Mul", "Mul", "", ["h", "c"], ["m"], {})
NODES = [GELU, SOFTMAX, LAYER_NORM, RMS_NORM, MATMUL, SCALE_BY_CONSTANT]


def plan(ranges, nodes=NODES):
    public = {"mask", "c"}
    return plan_kernels(nodes, lambda name: name not in public, ranges, F, MSB, SCALES.__getitem__)


def test_unrecorded_nodes_get_the_default_variants():
    got = plan(None)
    assert got[GELU.name] == {"cmp_bits": MSB} and got[SOFTMAX.name] == {"cmp_bits": MSB}
    # The norms' default domain, with |scale| rounded up to a power of two (1.5 -> 2, 3 -> 4).
    x_max, var_lo, var_hi, scale_max = got[LAYER_NORM.name]["domain"]
    assert (x_max, var_lo, var_hi) == (NormDomain().x_max, NormDomain().var_lo, NormDomain().var_hi)
    assert scale_max == 2.0 and got[RMS_NORM.name]["domain"][3] == 4.0
    # Products are checked only against a record; a product with a public constant is a scaling.
    assert got[MATMUL.name] == {} and SCALE_BY_CONSTANT.name not in got


def test_recorded_ranges_are_widened_by_the_margin():
    ranges = {RMS_NORM.name: {"x_max": 24926.0, "var_min": 0.007, "var_max": 1.09e6}}
    x_max, var_lo, var_hi, _ = plan(ranges)[RMS_NORM.name]["domain"]
    assert (x_max, var_lo, var_hi) == (MARGIN * 24926.0, 0.007 / MARGIN**2, 1.09e6 * MARGIN**2)


@pytest.mark.parametrize("node, spread", [(GELU, lambda m: MARGIN * m + 8), (SOFTMAX, lambda m: 2 * MARGIN * m + 32)],
                         ids=["gelu", "softmax"])
@pytest.mark.parametrize("x_max", [0.5, 5.0, 100.0, 3000.0, 2.0**20])
def test_a_recorded_range_takes_the_narrowest_comparison_that_holds_it(node, spread, x_max):
    bits = plan({node.name: {"x_max": x_max}})[node.name]["cmp_bits"]
    held = spread(x_max) * 2.0**F  # the values' spread (margin included) in units of the last place
    assert held <= 2.0 ** (bits - 2)  # held with a bit to spare ...
    assert held > 2.0 ** (bits - 3 - 2)  # ... and one 3-bit group fewer would not hold it
    assert (bits - 1) % 3 == 0 and bits <= MSB


@pytest.mark.parametrize("node", [GELU, SOFTMAX], ids=["gelu", "softmax"])
def test_a_range_beyond_48_bit_comparisons_takes_64_bit_ones(node):
    # 4 x 2^26 at 2^18 is 2^46: past what a 48-bit comparison holds with a bit to spare.
    assert plan({node.name: {"x_max": 2.0**26}})[node.name] == {"cmp_bits": 64}


def test_a_range_no_comparison_holds_is_refused_in_one_line_naming_the_node():
    with pytest.raises(RangeError) as e:
        plan({GELU.name: {"x_max": 2.0**44}})
    message = str(e.value)
    assert GELU.name in message and "puma.Gelu" in message and "64-bit" in message and "\n" not in message


def test_a_norm_range_no_variant_covers_is_refused_naming_node_bound_and_domain():
    ranges = {LAYER_NORM.name: {"x_max": 2.0**20, "var_min": 1e-9, "var_max": 2.0**38}}
    with pytest.raises(RangeError) as e:
        plan(ranges)
    message = str(e.value)
    assert LAYER_NORM.name in message and "|x| <= 4.194e+06" in message and "beyond every variant" in message


def test_a_product_beyond_the_fixed_point_range_is_refused():
    assert plan({MATMUL.name: {"y_max": 1e6}})[MATMUL.name] == {"y_max": MARGIN * 1e6}  # 4e6 < 2^25
    with pytest.raises(RangeError, match="MatMul.*exceed the fixed-point product's range"):
        plan({MATMUL.name: {"y_max": 1e7}})


def test_a_record_without_the_key_its_kernel_needs_is_one_line_naming_the_node():
    with pytest.raises(RangeError, match=f"{RMS_NORM.name}.*lacks 'var_min'"):
        plan({RMS_NORM.name: {"x_max": 3.0, "var_max": 2.0}})
