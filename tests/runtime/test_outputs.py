"""The answer's last product opens untruncated and the client rescales (`kernels.Unscaled`): no
probabilistic truncation's rounding, which the client could read from its own mask words, comes
between the answer and the client."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.runtime import kernels
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.executor import Executor
from puma_onnx.runtime.session import CLIENT, reveal_outputs
from puma_onnx.runtime.weights import share_weights

from ..passes.graphs import FLOAT, const, model, weight
from .helpers import encoded, share_fx
from .views import leaks, replicated

RNG = np.random.default_rng(21)
F = 18
X = RNG.normal(0, 1, (2, 3))
W = RNG.normal(0, 1, (3, 4))
B = RNG.normal(0, 1, 4)




def opened(m, feeds: dict, weights: dict) -> tuple[np.ndarray, set[str]]:
    """The client's opened first output of m, and the protocols every rank ran."""

    def program(party):
        owner = party.rank == 0
        shared = share_weights(party, [(n, list(w.shape)) for n, w in weights.items()], lambda n: weights[n] if owner else None)
        out = Executor(party, m, shared).run({n: share_fx(party, v) for n, v in feeds.items()})
        return reveal_outputs(party, out), set(party.comm.stats.by_protocol())

    results = run_parties(program)
    return next(iter(results[CLIENT][0].values())), set().union(*(r[1] for r in results))


def single(op, inputs, inits=(), nodes=(), **attrs):
    node = helper.make_node(op, inputs, ["y"], **attrs)
    secret_inputs = [("x", FLOAT, list(X.shape)), ("z", FLOAT, [3, 4]), ("zx", FLOAT, list(X.shape))]
    return model([*nodes, node], secret_inputs, [("y", FLOAT, None)], list(inits))


CASES = {
    # name: (model, secret weights, exact answer from the encoded operands)
    "matmul_weight": (single("MatMul", ["x", "w"], [weight("w", W.astype(np.float32))]), {"w": W}, lambda: encoded(X) @ encoded(W)),
    "matmul_secret": (single("MatMul", ["x", "z"]), {}, lambda: encoded(X) @ encoded(W)),
    "mul_secret": (single("Mul", ["x", "zx"], nodes=[]), {}, lambda: encoded(X) * encoded(X[::-1])),
    "matmul_public": (single("MatMul", ["x", "p"], nodes=[const("p", W)]), {}, lambda: encoded(X) @ encoded(W)),
    "gemm_secret_c": (
        single("Gemm", ["x", "wt", "c"], [weight("wt", W.T.astype(np.float32)), weight("c", B.astype(np.float32))], transB=1),
        {"wt": W.T, "c": B},
        lambda: encoded(X) @ encoded(W) + encoded(B),
    ),
    "gemm_public_c": (
        single("Gemm", ["x", "w", "c"], [weight("w", W.astype(np.float32))], nodes=[const("c", B)]),
        {"w": W},
        lambda: encoded(X) @ encoded(W) + encoded(B),
    ),
    # A scalar factor stays apart (`Scaled`) and the client applies it exactly; an array is encoded at f bits.
    "mul_public": (single("Mul", ["x", "k"], nodes=[const("k", 0.3)]), {}, lambda: encoded(X) * float(np.float32(0.3))),
    "mul_public_row": (
        single("Mul", ["x", "k"], nodes=[const("k", [0.3, -1.7, 2.2])]), {}, lambda: encoded(X) * encoded(np.float32([0.3, -1.7, 2.2]))
    ),
    "div_public": (single("Div", ["x", "k"], nodes=[const("k", 3.0)]), {}, lambda: encoded(X) * float(1 / np.float32(3.0))),
}


@pytest.mark.parametrize("name", CASES)
def test_an_answers_last_product_opens_exactly_without_a_truncation(name):
    m, weights, exact = CASES[name]
    feeds = {"x": X, "z": W, "zx": X[::-1]} if name in ("matmul_secret", "mul_secret") else {"x": X}
    got, protocols = opened(m, feeds, {n: np.asarray(w, dtype=np.float32) for n, w in weights.items()})
    want = exact()
    # Exact up to the float32 the answer is returned in; one truncation would err up to 2^-18 = 3.8e-6.
    assert np.abs(got - want).max() <= 2.0**-23 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert not any("trunc" in p or p.endswith("_fx") for p in protocols), protocols


def test_a_product_read_by_another_node_is_truncated_as_before():
    m = model(
        [const("b", B), helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [("x", FLOAT, list(X.shape))],
        [("y", FLOAT, None)],
        [weight("w", W.astype(np.float32))],
    )
    got, protocols = opened(m, {"x": X}, {"w": W.astype(np.float32)})
    assert "truncate_parts" in protocols
    assert np.abs(got - (encoded(X) @ encoded(W) + encoded(B))).max() <= 2 * 2.0**-F


def test_the_clients_view_of_the_last_step_shows_only_the_answer(monkeypatch):
    """Two secret inputs with the same answer (x W equal: W's first two rows are equal): the client's
    view of the final product and the opening (every word it receives, and what it opens) must not
    tell them apart. (The exactness test above is what tells the untruncated path from a truncated
    one: with equal products, a truncation's rounding would not differ either.)"""
    w = np.array([[1.0, -2.0], [1.0, -2.0], [0.5, 3.0]], dtype=np.float32)
    secrets = tuple(np.rint(np.array(v) * 2**F).astype(np.int64).view(np.uint64) for v in ([1.5, 0.25, 2.0], [0.25, 1.5, 2.0]))
    own = tuple(RNG.integers(0, 2**64, 3, dtype=np.uint64) for _ in range(2))
    node = kernels.Node("head", "MatMul", "", ["x", "w"], ["y"], {})

    def final_step(party, secret):
        (weights,) = share_weights(party, [("w", w.shape)], lambda n: w).values()
        ctx = kernels.Context(party)
        ctx.final = True
        (y,) = kernels.matmul(ctx, node, replicated(secret, CLIENT, own)[party.rank].reshape(1, 3), weights)
        return reveal_outputs(party, {"y": y})

    verdict = leaks(monkeypatch, final_step, secrets, CLIENT)
    assert not verdict.leaks and not verdict.split, verdict
