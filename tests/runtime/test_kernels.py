"""Every ONNX kernel on a secret input against onnx's reference implementation of the op."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

from puma_onnx.runtime import approx, arith, kernels
from puma_onnx.runtime.comm import run_parties

from .helpers import encoded, open_fx, share_fx

RNG = np.random.default_rng(11)
X = RNG.normal(size=(2, 3, 4))
I64 = np.int64

# (op, attributes, the inputs after the secret x: public arrays, or "secret" for a second secret)
CASES = [
    ("Reshape", {}, [np.array([0, -1], I64)]),
    ("Transpose", {"perm": [2, 0, 1]}, []),
    ("Unsqueeze", {}, [np.array([-1, 0], I64)]),
    ("Squeeze", {}, [np.array([0], I64)]),
    ("Flatten", {"axis": -1}, []),
    ("Flatten", {"axis": 0}, []),
    ("Expand", {}, [np.array([2, 2, 3, 4], I64)]),
    ("Slice", {}, [np.array([0, -1], I64), np.array([2, -4], I64), np.array([1, 2], I64), np.array([1, -1], I64)]),
    ("Gather", {"axis": 1}, [np.array([[-1, 0]], I64)]),
    ("CumSum", {"exclusive": 1, "reverse": 1}, [np.array(2, I64)]),
    ("Concat", {"axis": 1}, [RNG.normal(size=(2, 1, 4))]),
    ("Split", {"axis": 1, "num_outputs": 2}, []),  # 3 = 2 + 1: the last part is smaller
    ("Split", {"axis": 1}, [np.array([1, 2], I64)]),
    ("Where", {}, []),  # condition first: see below
    ("ReduceSum", {"keepdims": 0}, [np.array([1], I64)]),
    ("ReduceMean", {"keepdims": 1}, [np.array([0, 2], I64)]),
    ("Add", {}, [RNG.normal(size=(4,))]),
    ("Sub", {}, ["secret"]),
    ("Mul", {}, [RNG.normal(size=(3, 1))]),
    ("Mul", {}, ["secret"]),
    ("Div", {}, [np.array([2.5])]),
    ("Neg", {}, []),
    ("MatMul", {}, [RNG.normal(size=(4, 5))]),
    ("MatMul", {}, ["secret_t"]),
    ("Identity", {}, []),
    ("Cast", {"to": onnx.TensorProto.FLOAT}, []),
]


def plaintext(op, attrs, inputs, n_out):
    node = helper.make_node(op, [f"i{k}" for k in range(len(inputs))], [f"o{k}" for k in range(n_out)], **attrs)
    evaluator = ReferenceEvaluator(node, opsets={"": 18})
    return evaluator.run(None, {f"i{k}": v for k, v in enumerate(inputs)})


def secure(party, op, attrs, inputs, secret_at, n_out):
    node = kernels.Node(op, op, "", [f"i{k}" for k in range(len(inputs))], [f"o{k}" for k in range(n_out)], attrs)
    ctx = kernels.Context(party)
    values = [share_fx(party, v) if k in secret_at else v for k, v in enumerate(inputs)]
    return [open_fx(party, ctx.secret(o)) for o in kernels.KERNELS[("", op)](ctx, node, *values)]


@pytest.mark.parametrize("op, attrs, rest", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_matches_onnx_reference(op, attrs, rest):
    secret_at = {0}
    inputs = [X]
    if op == "Where":
        inputs = [X > 0, X, RNG.normal(size=(3, 1))]
        secret_at = {1}
    if op == "Squeeze":
        inputs = [X[:1]]
    for k, r in enumerate(rest, start=1):
        if isinstance(r, str):
            inputs.append(RNG.normal(size=X.shape) if r == "secret" else RNG.normal(size=(2, 4, 3)))
            secret_at.add(k)
        else:
            inputs.append(r)
    n_out = 2 if op == "Split" else 1
    want = plaintext(op, attrs, [np.asarray(v, np.float32) if v.dtype.kind == "f" else v for v in inputs], n_out)
    got = run_parties(secure, op, attrs, inputs, secret_at, n_out)[0]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(g - w).max() <= 1e-4


@pytest.mark.parametrize("attrs", [{"alpha": 0.5, "beta": 2.0, "transB": 1}, {"transA": 1}])
def test_gemm_matches_onnx_reference(attrs):
    a = RNG.normal(size=(4, 3)) if attrs.get("transA") else RNG.normal(size=(3, 4))
    b = RNG.normal(size=(5, 4)) if attrs.get("transB") else RNG.normal(size=(4, 5))
    c = RNG.normal(size=(5,))
    want = plaintext("Gemm", attrs, [a.astype(np.float32), b.astype(np.float32), c.astype(np.float32)], 1)[0]
    got = run_parties(secure, "Gemm", attrs, [a, b, c], {0, 1}, 1)[0][0]
    assert np.abs(got - want).max() <= 1e-4


SCORES = RNG.normal(0, 2, (2, 3, 16, 16))  # 2 x 3 heads, 16 queries over 16 keys


def _attention(party, v, y_max, mask=None):
    """Softmax then MatMul with v through the kernels, the MatMul planned with `y_max` (None: no range):
    (the answer, whether the row scaling ran after the product, the bytes this rank sent)."""
    ctx = kernels.Context(party, plan={} if y_max is None else {"av": {"y_max": y_max}})
    soft = kernels.Node("sm", "Softmax", "puma", ["s"] + (["m"] if mask is not None else []), ["p"], {"axis": -1})
    av = kernels.Node("av", "MatMul", "", ["p", "v"], ["o"], {})
    before = party.comm.stats.snapshot()
    (probs,) = kernels.softmax(ctx, soft, share_fx(party, SCORES), *([] if mask is None else [mask]))
    (out,) = kernels.matmul(ctx, av, probs, share_fx(party, v))
    sent = (party.comm.stats.snapshot() - before).bytes
    fused = any("softmax_matmul" in p.split("/") for p in party.comm.stats.by_path())
    return open_fx(party, ctx.secret(out)), fused, sent


@pytest.mark.parametrize(
    "case, v_width, y_max, mask, fused",
    [
        ("narrow v", 4, 10.0, None, True),  # 4 < 16 keys: the scaling after the product
        ("padding mask", 4, 10.0, "pad", True),  # 4 outputs < 12 kept keys per query
        ("no range", 4, None, None, False),  # nothing bounds e @ v
        ("range too wide", 4, 2.0**20, None, False),  # e @ v could pass 2^61
        ("wide v", 16, 10.0, None, False),  # 16 outputs per query, as many as the scores: no gain
        ("causal", 10, 10.0, "causal", False),  # 8.5 kept keys per query < 10 outputs
    ],
)
def test_softmax_then_matmul_scales_rows_after_the_product_where_that_is_cheaper(case, v_width, y_max, mask, fused):
    v = RNG.normal(0, 1, (2, 3, 16, v_width))
    keep = {None: None, "pad": np.arange(16) < 12, "causal": np.tril(np.ones((16, 16), dtype=bool))}[mask]
    scores = SCORES if keep is None else np.where(keep, SCORES, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    want = (e / e.sum(-1, keepdims=True)) @ v
    results = run_parties(_attention, v, y_max, keep)
    got, was_fused, _ = results[0]
    assert all(r[1] == fused for r in results)
    assert np.abs(got - want).max() <= 1e-3  # the refit exp's softmax: 4e-4 from the exact one
    if fused:  # 16 - v_width products per query fewer than the softmax's own last product (44 B each), and the
        # matmul's truncated answer multiplied before its reshare (runtime/chain.py: 12 B per output less)
        unfused = run_parties(_attention, v, None, keep)
        kept = 16 * (12 if mask == "pad" else 16)
        saved = sum(r[2] for r in unfused) - sum(r[2] for r in results)
        assert saved == 2 * 3 * ((kept - 16 * v_width) * 44 + 16 * v_width * 12)
        # Within the softmax's own 3 ulp per score (the kernel's definition, approx.softmax) carried through v,
        # plus 2 ulp for the two truncations: as accurate as the unfused path (tests/runtime/test_nonlinear.py).
        keep_all = np.ones(SCORES.shape, bool) if keep is None else np.broadcast_to(keep, SCORES.shape)
        definition = approx.softmax(encoded(SCORES), keep_all) @ encoded(v)
        bound = 3 * 2.0**-18 * np.abs(encoded(v)).sum(-2, keepdims=True) + 2 * 2.0**-18
        assert np.all(np.abs(got - definition) <= bound)


@pytest.mark.parametrize(
    "op, attrs, rest, stays_held",
    [
        ("Reshape", {}, [np.array([0, -1], I64)], True),
        ("Flatten", {"axis": 1}, [], True),
        ("Unsqueeze", {}, [np.array([0], I64)], True),
        ("Transpose", {"perm": [2, 0, 1]}, [], False),  # a new order: reshared first
    ],
)
def test_a_held_answer_stays_held_through_shape_ops_that_keep_the_order(op, attrs, rest, stays_held):
    """GPT-2's GeLU answer reaches its FFN product through a Reshape: held 2-of-2 by ranks 1 and 2
    (`kernels.Held`), it stays so through ops that keep the elements' order, and gives the op's answer."""
    want = plaintext(op, attrs, [X.astype(np.float32)] + rest, 1)[0]

    def prog(party):
        x = share_fx(party, X)
        held = kernels.Held(arith.HeldByTwo(0, arith.two_parts(party, [x]), X.shape))
        node = kernels.Node(op, op, "", ["x"] + [f"i{k}" for k in range(len(rest))], ["y"], attrs)
        (out,) = kernels.KERNELS[("", op)](kernels.Context(party), node, held, *rest)
        return isinstance(out, kernels.Held), open_fx(party, kernels.Context(party).secret(out))

    results = run_parties(prog)
    assert all(r[0] == stays_held for r in results)
    assert results[0][1].shape == want.shape and np.abs(results[0][1] - want).max() <= 1e-5


def test_a_held_answer_and_its_reshaped_forms_are_reshared_once_and_open_as_themselves():
    """A `Held` value and a Reshape of it, both needed replicated: one reshare (1 round, 8 B per element from
    ranks 1 and 2) serves both; as a graph output (`session.answer_share`) it opens to its value."""
    from puma_onnx.runtime.session import answer_share

    def prog(party):
        ctx = kernels.Context(party)
        x = share_fx(party, X)
        held = kernels.Held(arith.HeldByTwo(0, arith.two_parts(party, [x]), X.shape))
        node = kernels.Node("r", "Reshape", "", ["x", "s"], ["y"], {})
        (flat,) = kernels.KERNELS[("", "Reshape")](ctx, node, held, np.array([0, -1], I64))
        before = party.comm.stats.snapshot()
        opened = [open_fx(party, ctx.secret(v)) for v in (flat, held, flat)]
        cost = party.comm.stats.snapshot() - before
        answer, scale = answer_share(party, "y", kernels.Held(arith.HeldByTwo(0, arith.two_parts(party, [x]), X.shape)))
        return opened, cost, open_fx(party, answer)

    results = run_parties(prog)
    (flat, whole, again), _, answer = results[0]
    assert np.abs(whole - X).max() <= 1e-5 and np.array_equal(flat, whole.reshape(2, -1)) and np.array_equal(again, flat)
    assert np.abs(answer - X).max() <= 1e-5
    # The three openings take 3 rounds of their own; the reshare one, from ranks 1 and 2 only.
    assert [r[1].rounds for r in results] == [4, 4, 4]
    reveal = 3 * 8 * X.size
    assert [r[1].bytes - reveal for r in results] == [0, 8 * X.size, 8 * X.size]


def test_a_softmax_read_twice_is_normalised_once_and_answers_as_itself():
    from puma_onnx.runtime.session import answer_share

    def prog(party):
        ctx = kernels.Context(party)
        node = kernels.Node("sm", "Softmax", "puma", ["s"], ["p"], {"axis": -1})
        (probs,) = kernels.softmax(ctx, node, share_fx(party, SCORES))
        before = party.comm.stats.snapshot()
        first, second = ctx.secret(probs), ctx.secret(probs)
        cost = party.comm.stats.snapshot() - before
        (fresh,) = kernels.softmax(ctx, node, share_fx(party, SCORES))
        answer, _ = answer_share(party, "p", fresh)
        return isinstance(probs, kernels.Softmaxed), first is second, cost.rounds, open_fx(party, answer)

    results = run_parties(prog)
    e = np.exp(SCORES - SCORES.max(-1, keepdims=True))
    assert all(r[0] and r[1] and r[2] == 2 for r in results)  # one product (2 rounds) for both readers
    assert np.abs(results[0][3] - e / e.sum(-1, keepdims=True)).max() <= 1e-3
