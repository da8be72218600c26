"""Every attribute at a value other than its default, end to end: the ONNX graph through the rewrite passes
and the secure executor on three thread ranks, against onnxruntime on the original graph (exact ops).

Each input is chosen so that the default value of the attribute would give a visibly different result:
an epsilon of 0.1 on rows of variance ~0.01, beta = 2 on a secret C, transposes of non-square matrices."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import UnsupportedSecretOps, rewrite
from puma_onnx.runtime import kernels
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.executor import Executor
from puma_onnx.runtime.weights import share_weights

from ..passes.graphs import FLOAT, model, op_types, run, weight
from ..passes.test_layer_norm import decomposed
from ..passes.test_rms_norm import llama_rms_norm
from .helpers import open_fx, share_fx

RNG = np.random.default_rng(14)
# Secure against exact: fixed point (2^-18) through a norm's rsqrt or a softmax's exp (the refit exp errs
# 4.5e-6, the softmax 4e-4 on rows of 128). The default epsilon instead of 0.1 changes these outputs by > 1.
TOLERANCE = 1e-3


def secure(m, feeds: dict, weights: dict | None = None) -> np.ndarray:
    """The rewritten m run by the executor; `feeds` are secret inputs shared by rank 0, `weights` initializers
    shared as the owner's secret weights; the first output, opened."""
    rewritten, _ = rewrite(m)
    weights = weights or {}

    def program(party):
        owner = party.rank == 0
        shared = share_weights(party, [(n, list(w.shape)) for n, w in weights.items()], lambda n: weights[n] if owner else None)
        out = Executor(party, rewritten, shared).run({n: share_fx(party, v) for n, v in feeds.items()})
        return open_fx(party, kernels.Context(party).secret(next(iter(out.values()))))

    return run_parties(program)[0]


def low_variance_rows(shape):
    """Rows of standard deviation 0.03 to 0.3 around means up to 2: an epsilon of 0.1 dominates most of them."""
    return RNG.normal(0, 1, shape) * np.geomspace(0.03, 0.3, shape[-2])[:, None] + RNG.uniform(-2, 2, shape[:-1] + (1,))


SHAPE = [2, 3, 8]
X = low_variance_rows((2, 3, 8)).astype(np.float32)
SCALE = RNG.normal(1, 0.3, 8).astype(np.float32)
BIAS = RNG.normal(0, 0.3, 8).astype(np.float32)
NORM_PARAMS = [weight("scale", SCALE), weight("bias", BIAS)]
IO = ([("x", FLOAT, SHAPE)], [("y", FLOAT, SHAPE)])


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_layer_norm_epsilon(form):
    eps = 0.1
    if form == "op":
        nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, epsilon=eps)]
        m = model(nodes, *IO, NORM_PARAMS)
    else:
        m = model(decomposed(eps=eps), *IO, NORM_PARAMS, opset=14)
    assert np.abs(secure(m, {"x": X}) - run(m, x=X)[0]).max() <= TOLERANCE


def test_rms_norm_epsilon():
    m = model(llama_rms_norm(eps=0.1), *IO, [weight("scale", SCALE)])
    x = X - X.mean(-1, keepdims=True)  # mean squares ~0.001 to 0.1
    assert np.abs(secure(m, {"x": x}) - run(m, x=x)[0]).max() <= TOLERANCE


@pytest.mark.parametrize("b_kind", ["secret input", "weight"])
def test_gemm_alpha_beta_trans_with_a_secret_c(b_kind):
    a, b, c = RNG.normal(size=(4, 3)), RNG.normal(size=(5, 4)), RNG.normal(size=(3, 5))
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], alpha=0.5, beta=2.0, transA=1, transB=1)
    inputs = [("a", FLOAT, [4, 3]), ("c", FLOAT, [3, 5])]
    feeds = {"a": a, "c": c}
    if b_kind == "weight":
        m = model([node], inputs, [("y", FLOAT, [3, 5])], [weight("b", b.astype(np.float32))])
        got = secure(m, feeds, {"b": b.astype(np.float32)})
    else:
        m = model([node], inputs + [("b", FLOAT, [5, 4])], [("y", FLOAT, [3, 5])])
        got = secure(m, {**feeds, "b": b})
    assert np.abs(got - (0.5 * a.T @ b.T + 2.0 * c)).max() <= 1e-4  # a few ulp through a product of 4 terms


def test_transpose_perm_and_softmax_over_the_last_axis_named_by_its_index():
    x = RNG.normal(0, 2, (2, 3, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0]),
        helper.make_node("Softmax", ["t"], ["y"], axis=2),
    ]
    m = model(nodes, [("x", FLOAT, [2, 3, 8])], [("y", FLOAT, [3, 8, 2])])
    assert op_types(rewrite(m)[0])[-1] == "puma.Softmax"
    assert np.abs(secure(m, {"x": x}) - run(m, x=x)[0]).max() <= TOLERANCE


@pytest.mark.parametrize(
    "node",
    [
        helper.make_node("Softmax", ["x"], ["y"], axis=-2),
        helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-2),
    ],
    ids=["Softmax", "LayerNormalization"],
)
def test_a_negative_axis_other_than_the_last_is_left_and_reported(node):
    params = [weight("scale", np.ones((3, 8), np.float32)), weight("bias", np.zeros((3, 8), np.float32))]
    with pytest.raises(UnsupportedSecretOps, match=node.op_type):
        rewrite(model([node], *IO, params if node.op_type != "Softmax" else []))


def test_the_softmax_kernel_refuses_an_axis_other_than_the_last():
    def program(party):
        node = kernels.Node("s", "Softmax", "puma", ["x"], ["y"], {"axis": 0})
        with pytest.raises(kernels.KernelError, match="axis 0"):
            kernels.softmax(kernels.Context(party), node, share_fx(party, X))
        return True

    assert run_parties(program) == [True] * 3
