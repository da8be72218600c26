"""Weight products from masks prepared before the input: values, single use, and cost against the docstring."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime import arith, prepared
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.weights import share_weights

from .helpers import cost_of, encoded, open_fx, share_fx

RNG = np.random.default_rng(23)
F = 18
ULP = 2.0**-F
# Two products read one input (x @ A, x @ B^T with B stored as (m, k)); C reads another, prepared for more rows.
A = RNG.normal(scale=0.5, size=(24, 40)).astype(np.float32)
B = RNG.normal(scale=0.5, size=(16, 24)).astype(np.float32)
C = RNG.normal(scale=0.5, size=(40, 8)).astype(np.float32)
WEIGHTS = {"a": A, "b": B, "c": C}
X = RNG.normal(scale=4.0, size=(2, 3, 24))  # 6 rows
Z = RNG.normal(scale=4.0, size=(5, 40))


def _shared(p):
    return share_weights(p, [(n, w.shape) for n, w in WEIGHTS.items()], lambda n: WEIGHTS[n])


def _plan(w):
    products = [prepared.Product("a", "x", w["a"]), prepared.Product("b", "x", w["b"], transpose=True),
                prepared.Product("c", "z", w["c"])]
    return products, {"x": 6, "z": 9}


def _exact(x, w, transpose=False):
    """x @ w on the encodings, in float64: what the ring computes before the truncation."""
    w = encoded(w.astype(np.float64))
    return encoded(x) @ (w.T if transpose else w)


@pytest.mark.parametrize("shifts", [None, {"x": F, "z": F}], ids=["online-truncation", "prepared-truncation"])
@pytest.mark.parametrize("rows", [6, 4])  # all prepared rows, and fewer: the first rows of R serve
def test_prepared_products_match_the_exact_product_within_one_ulp(rows, shifts):
    x = X.reshape(6, 24)[:rows]

    def prog(p):
        w = _shared(p)
        products, n = _plan(w)
        ready = prepared.prepare(p, products, n, shifts=shifts)
        xs, zs = share_fx(p, x), share_fx(p, Z)
        ab = prepared.products(p, xs, "x", products[:2], ready, F)
        (c,) = prepared.products(p, zs, "z", products[2:], ready, F)
        return [open_fx(p, v) for v in (*ab, c)]

    got_a, got_b, got_c = run_parties(prog)[0]
    assert got_a.shape == (rows, 40) and got_b.shape == (rows, 16) and got_c.shape == (5, 8)
    # floor or floor + 1 of the exact product at scale 2f: within one ulp (and 2^-2f of the encoding).
    assert np.abs(got_a - _exact(x, A)).max() <= ULP * 1.001
    assert np.abs(got_b - _exact(x, B, transpose=True)).max() <= ULP * 1.001
    assert np.abs(got_c - _exact(Z, C)).max() <= ULP * 1.001


def test_unscaled_products_are_the_exact_ring_product():
    """bits=None: the reshared product at scale 2f, exact (an answer the client rescales)."""

    def prog(p):
        w = _shared(p)
        products, n = _plan(w)
        ready = prepared.prepare(p, products, n)
        (c,) = prepared.products(p, share_fx(p, Z), "z", products[2:], ready, None)
        return arith.reveal(p, c)

    got = run_parties(prog)[0].view(np.int64).astype(np.float64) / 2.0 ** (2 * F)
    assert np.array_equal(got, _exact(Z, C))


@pytest.mark.parametrize("bits", [None, F - 1], ids=["unscaled", "another-shift"])
def test_a_truncation_prepared_for_one_shift_serves_another_request_online(bits):
    """A group prepared for a truncation by f that is asked for its unscaled product, or another shift, takes
    the plain path (rank 1 still holds Q), and the prepared words are dropped with the masks."""

    def prog(p):
        w = _shared(p)
        products, n = _plan(w)
        ready = prepared.prepare(p, products, n, shifts={"z": F})
        (c,) = prepared.products(p, share_fx(p, Z), "z", products[2:], ready, bits)
        return arith.reveal(p, c), (len(ready.c1), len(ready.dealt))

    (got, left), *others = run_parties(prog)
    assert left == (0, 0) and all(o[1] == (0, 0) for o in others)
    ring = got.view(np.int64).astype(np.float64)
    if bits is None:
        assert np.array_equal(ring / 2.0 ** (2 * F), _exact(Z, C))
    else:
        assert np.abs(ring / 2.0 ** (2 * F - bits) - _exact(Z, C)).max() <= 2.0 ** -(2 * F - bits) * 1.001


def test_a_truncation_shift_beyond_31_bits_is_not_prepared():
    def prog(p):
        w = _shared(p)
        products, n = _plan(w)
        prepared.prepare(p, products, n, shifts={"z": 32})

    with pytest.raises(ValueError, match="1..31 bits"):
        run_parties(prog)


def test_a_prepared_mask_serves_one_input_only():
    def prog(p):
        w = _shared(p)
        products, n = _plan(w)
        ready = prepared.prepare(p, products, n)
        ab = ["a", "b"]
        before = (ready.covers("x", 6, 24, ab), ready.covers("x", 7, 24, ab), ready.covers("x", 6, 25, ab),
                  ready.covers("x", 6, 24, ["a"]), ready.covers("x", 6, 24, ["b", "a"]))
        prepared.products(p, share_fx(p, X), "x", products[:2], ready, F)
        return before, ready.covers("x", 6, 24, ab), ready.covers("z", 9, 40, ["c"])

    before, after, other = run_parties(prog)[0]
    # More rows, another width, or other products than prepared (the walk grouped them otherwise): not covered.
    assert before == (True, False, False, False, False)
    assert not after and other
    with pytest.raises(KeyError):
        run_parties(lambda p: prepared.Prepared(None, None).take("x"))


def test_two_products_of_one_key_are_refused():
    """Each product needs an M of its own: two under one key (two nodes of one name) would share it, and
    rank 1 would learn R W_0 - R' W_0'."""

    def prog(p):
        w = _shared(p)
        prepared.prepare(p, [prepared.Product("a", "x", w["a"]), prepared.Product("a", "y", w["c"])],
                         {"x": 6, "y": 6})

    with pytest.raises(ValueError, match="share a key"):
        run_parties(prog)


def test_cost_online_three_rounds_and_setup_one_round():
    """Online: 8 B per input element from rank 2, then truncate_from_two with rank 2 dealing (12 B per output
    element) and ranks 0 and 1 16 each. Setup: 8 B per prepared output element from rank 2 to rank 1."""
    n, k, m = 6, 24, 40 + 16

    def prog(p):
        w = _shared(p)
        products, rows = _plan(w)
        ready, setup = cost_of(p, lambda: prepared.prepare(p, products, rows))
        xs = share_fx(p, X)
        _, online = cost_of(p, lambda: prepared.products(p, xs, "x", products[:2], ready, F))
        return setup, online

    (s0, o0), (s1, o1), (s2, o2) = run_parties(prog)
    assert [s.rounds for s in (s0, s1, s2)] == [1, 1, 1]
    assert (s0.bytes, s1.bytes, s2.bytes) == (0, 0, 8 * (6 * 40 + 6 * 16 + 9 * 8))
    assert [o.rounds for o in (o0, o1, o2)] == [3, 3, 3]
    assert (o0.bytes, o1.bytes, o2.bytes) == (16 * n * m, 16 * n * m, 8 * n * k + 12 * n * m)


def test_cost_of_a_prepared_truncation_online_and_in_the_setup():
    """Online: 8 B per input element from rank 2; the owner sends rank 1 c_0 and the two reshare (24 B per
    output element over the ranks, rank 2 none). Setup: rank 2 deals the owner rc and rb (12 B per output
    element of a prepared truncation) beside R W_0 - M to rank 1, and in a second round rank 1 sends the owner
    c_1 (8 B)."""
    n, k, m = 6, 24, 40 + 16

    def prog(p):
        w = _shared(p)
        products, rows = _plan(w)
        ready, setup = cost_of(p, lambda: prepared.prepare(p, products, rows, shifts={"x": F}))
        xs = share_fx(p, X)
        _, online = cost_of(p, lambda: prepared.products(p, xs, "x", products[:2], ready, F))
        return setup, online

    (s0, o0), (s1, o1), (s2, o2) = run_parties(prog)
    outputs = 6 * 40 + 6 * 16  # group x; group z (9 x 8) prepares its mask only
    assert [s.rounds for s in (s0, s1, s2)] == [2, 2, 2]
    assert (s0.bytes, s1.bytes, s2.bytes) == (0, 8 * outputs, 8 * (outputs + 9 * 8) + 12 * outputs)
    assert [o.rounds for o in (o0, o1, o2)] == [3, 3, 3]
    assert (o0.bytes, o1.bytes, o2.bytes) == (16 * n * m, 8 * n * m, 8 * n * k)


def _held(p, x):
    """x (replicated) held 2-of-2 by ranks 1 and 2 as a truncation leaves it before its reshare: x_1 + x_2 and
    x_0, plus a zero-sharing so that neither part is one of the replicated components."""
    part = arith.two_parts(p, [x])
    if part is not None:
        pad = p.prg_next.words(part.size) if p.rank == 1 else p.prg_prev.words(part.size)
        part = part + pad if p.rank == 1 else part - pad
    return arith.HeldByTwo(0, part, x.shape)


@pytest.mark.parametrize("shifts", [None, {"x": F}], ids=["online-truncation", "prepared-truncation"])
def test_prepared_products_take_an_input_held_by_ranks_1_and_2(shifts):
    """The same answer as from the replicated input, and the cost: ranks 1 and 2 each send the owner 8 B per
    input element in the first round (masked by R and m, and by m), instead of the 16 B per element a reshare
    would take in a round of its own before rank 2's x_2 - R."""
    n, k, m = 6, 24, 40 + 16

    def prog(p):
        w = _shared(p)
        products, rows = _plan(w)
        ready = prepared.prepare(p, products, rows, shifts=shifts)
        xs = share_fx(p, X)
        held = _held(p, xs)
        outs, online = cost_of(p, lambda: prepared.products(p, held, "x", products[:2], ready, F))
        return [open_fx(p, o) for o in outs], online

    results = run_parties(prog)
    (got_a, got_b), _ = results[0]
    x = X.reshape(6, 24)
    assert np.abs(got_a.reshape(6, 40) - _exact(x, A)).max() <= ULP * 1.001
    assert np.abs(got_b.reshape(6, 16) - _exact(x, B, transpose=True)).max() <= ULP * 1.001
    o0, o1, o2 = (r[1] for r in results)
    assert [o.rounds for o in (o0, o1, o2)] == [3, 3, 3]
    if shifts:  # as test_cost_of_a_prepared_truncation_online_and_in_the_setup, rank 1 sending x_A - m too
        assert (o0.bytes, o1.bytes, o2.bytes) == (16 * n * m, 8 * n * m + 8 * n * k, 8 * n * k)
    else:
        assert (o0.bytes, o1.bytes, o2.bytes) == (16 * n * m, 16 * n * m + 8 * n * k, 8 * n * k + 12 * n * m)


def test_prepared_products_refuse_an_input_held_by_other_ranks():
    def prog(p):
        w = _shared(p)
        products, rows = _plan(w)
        ready = prepared.prepare(p, products, rows)
        with pytest.raises(ValueError, match="held by ranks 1 and 2"):
            prepared.products(p, arith.HeldByTwo(1, None, (6, 24)), "x", products[:2], ready, F)
        return True

    assert run_parties(prog) == [True] * 3


def test_products_that_read_one_input_form_one_group():
    from puma_onnx.runtime.executor import product_groups
    from puma_onnx.runtime.kernels import Node

    nodes = [
        Node("q", "MatMul", "", ["h", "wq"], ["q"], {}),
        Node("act", "Relu", "", ["h"], ["a"], {}),
        Node("k", "Gemm", "", ["h", "wk", "b"], ["k"], {"transB": 1, "alpha": 1.0}),
        Node("v", "MatMul", "", ["h", "wv"], ["v"], {}),
        Node("scaled", "Gemm", "", ["h", "wv"], ["s"], {"alpha": 0.5}),  # scaled after the product: alone
        Node("trans_a", "Gemm", "", ["h", "wv"], ["t"], {"transA": 1}),  # reads h transposed
        Node("o", "MatMul", "", ["a", "wo"], ["o"], {}),
        Node("secret", "MatMul", "", ["h", "q"], ["x"], {}),  # no weight
        Node("head", "MatMul", "", ["h", "wh"], ["logits"], {}),  # an answer: reshared, not truncated
    ]
    final = [False] * 8 + [True]
    assert product_groups(nodes, {"wq", "wk", "wv", "wo", "wh"}, final) == {0: [0, 2, 3], 6: [6], 8: [8]}


def test_nodes_of_one_name_get_names_of_their_own():
    """Per-node state (prepared masks, products computed ahead) is keyed by name; ONNX allows repeats."""
    from onnx import helper

    from puma_onnx.runtime.executor import parse_nodes

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["a"], name="mm"), helper.make_node("MatMul", ["h", "v"], ["b"], name="mm"),
         helper.make_node("Relu", ["a"], ["c"])], "g", [], [],
    )
    assert [n.name for n in parse_nodes(graph)] == ["mm", "mm#1", "Relu_2"]


def test_only_products_of_2d_weights_are_prepared():
    """A 3-D weight's product (and the group it is in) multiplies online; the masks count the others only."""
    import onnx
    from onnx import TensorProto, helper

    from puma_onnx.runtime.executor import Executor

    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["a"], name="two"),
         helper.make_node("MatMul", ["g", "w3"], ["b"], name="three"),
         helper.make_node("Transpose", ["w2"], ["w2t"], name="t"),
         helper.make_node("MatMul", ["a", "w2t"], ["c"], name="tied")],
        "g",
        [helper.make_tensor_value_info("h", f32, [5, 4]), helper.make_tensor_value_info("g", f32, [2, 5, 4])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("b", "c")],
    )
    executor = Executor(None, helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), {})
    shapes = {"w2": (4, 3), "w3": (2, 4, 6)}
    # "two": 5 rows x 3, truncated (the owner keeps c_1 and the dealt words, 20 bytes; rank 2 builds those 12
    # too); "tied" reads w2 transposed (3 x 4): 5 rows x 4, an answer left unscaled but still prepared. Rank 1
    # keeps Q of both, 8 bytes, twice that while preparing; rank 2 holds its products beside its message.
    cut, every = 5 * 3, 5 * 3 + 5 * 4
    assert executor.mask_bytes(5, 1, shapes) == [20 * cut, 16 * every, 16 * every + 12 * cut]
