"""The secrecy analysis and the check that every op on secret data has a secure kernel."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from puma_onnx.passes import PUBLIC_INPUTS, SECURE_OPS, UnsupportedSecretOps, analyze, rewrite

from .graphs import FLOAT, INT64, const, model, weight

XY = [("x", FLOAT, [2, 4]), ("y", FLOAT, [2, 4])]
OUT = [("out", FLOAT, None)]


def node(op, inputs, output="out", **attrs):
    return helper.make_node(op, inputs, [output], name=f"the_{op.lower()}", **attrs)


def test_inputs_weights_and_constants_get_their_levels():
    nodes = [const("c", [1.0, 2.0]), node("Identity", ["w"], "wi")]
    inputs = [
        ("input_ids", INT64, [2]),
        ("token_type_ids", INT64, [2]),
        ("attention_mask", INT64, [2]),
        ("position_ids", INT64, [2]),
    ]
    inits = [
        weight("w", np.ones((2, 2), np.float32)),
        weight("s", np.float32(3.0)),
        weight("q", np.ones((2, 2), np.int8)),
        weight("i", np.ones(4, np.int64)),
    ]
    levels = analyze(model(nodes, inputs, [("wi", FLOAT, [2, 2])], inits))
    assert PUBLIC_INPUTS == {"attention_mask", "position_ids"}
    # A learned scalar and quantized int8 weights are weights too.
    secret = ("input_ids", "token_type_ids", "w", "wi", "s", "q")
    assert {k: levels[k] for k in secret} == dict.fromkeys(secret, "secret")
    assert {
        k: levels[k] for k in ("attention_mask", "position_ids", "i", "c")
    } == dict.fromkeys(("attention_mask", "position_ids", "i", "c"), "public")


def test_shape_of_a_secret_is_public_and_so_is_arithmetic_on_it():
    nodes = [
        node("Shape", ["x"], "shape"),
        const("two", 2, np.int64),
        node("Mul", ["shape", "two"], "out"),
    ]
    levels = analyze(model(nodes, XY[:1], [("out", INT64, [2])]))
    assert levels["shape"] == "public" and levels["out"] == "public"


def test_everything_computed_from_a_secret_is_secret():
    nodes = [node("Cast", ["attention_mask"], "m", to=FLOAT), node("Add", ["x", "m"])]
    levels = analyze(model(nodes, [("x", FLOAT, [2]), ("attention_mask", INT64, [2])], OUT))
    assert levels["m"] == "public" and levels["out"] == "secret"


def test_product_of_two_secrets_is_supported():
    rewrite(model([node("Mul", ["x", "y"])], XY, OUT))


@pytest.mark.parametrize(
    "nodes, reason",
    [
        ([node("Div", ["x", "y"])], r"the_div \(Div\): input 1 \(y\) is secret"),
        (
            [node("Cast", ["x"], "ids", to=INT64), node("Gather", ["w", "ids"])],
            r"the_cast \(Cast\): casts a secret FLOAT to INT64",
        ),
        (
            [node("Less", ["x", "y"], "c"), node("Where", ["c", "x", "y"])],
            r"the_less \(Less\): no secure kernel",
        ),
        ([node("Exp", ["x"])], r"the_exp \(Exp\): no secure kernel"),
    ],
)
def test_op_on_secret_data_without_kernel_is_named_with_its_reason(nodes, reason):
    m = model(nodes, XY, OUT, [weight("w", np.ones((3, 4), np.float32))])
    with pytest.raises(UnsupportedSecretOps, match=reason):
        rewrite(m)


def test_where_with_secret_condition_is_reported():
    nodes = [node("Cast", ["x"], "c", to=2), node("Where", ["c", "x", "y"])]
    with pytest.raises(UnsupportedSecretOps) as error:
        rewrite(model(nodes, XY, OUT))
    assert "the_where (Where): input 0 (c) is secret but must be public" in str(error.value)


def test_gather_of_secret_indices_outside_an_embedding_is_reported():
    nodes = [node("Cast", ["x"], "ids", to=INT64), node("Gather", ["y", "ids"])]
    with pytest.raises(
        UnsupportedSecretOps, match=r"the_gather \(Gather\): input 1 \(ids\) is secret"
    ):
        rewrite(model(nodes, XY, OUT))


def test_unencodable_constant_on_secret_data_is_reported():
    nodes = [const("huge", -3.4e38), node("Add", ["x", "huge"])]
    with pytest.raises(
        UnsupportedSecretOps, match=r"the_add \(Add\): constant input 1 \(huge\).*2\^44"
    ):
        rewrite(model(nodes, XY[:1], OUT))


def test_every_problem_is_listed_before_anything_runs():
    nodes = [node("Exp", ["x"], "e"), node("Tanh", ["e"], "out")]
    with pytest.raises(UnsupportedSecretOps) as error:
        rewrite(model(nodes, XY[:1], OUT))
    assert isinstance(error.value, ValueError)
    assert "the_exp (Exp)" in str(error.value) and "the_tanh (Tanh)" in str(error.value)
    assert error.value.report.secret_ops == {"Exp": 1, "Tanh": 1}


def test_secure_ops_cover_the_listed_kernels():
    assert ("", "MatMul") in SECURE_OPS and ("puma", "Embedding") in SECURE_OPS
    assert ("", "Exp") not in SECURE_OPS
