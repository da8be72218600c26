"""Weights shared once by the owner and regenerated from PRG keys when used."""

import numpy as np

from puma_onnx.runtime import arith
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.weights import share_weights

W = {"a": np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4), "b": np.float32([0.5, -0.25])}
MANIFEST = [("a", [3, 4]), ("b", [2])]


def share_and_open(party):
    before = party.comm.stats.snapshot()
    weights = share_weights(party, MANIFEST, lambda name: W[name] if party.rank == 0 else None)
    cost = party.comm.stats.snapshot() - before
    opened = {n: party.fxp.decode(arith.reveal(party, w.materialize())) for n, w in weights.items()}
    return weights, cost, opened


def test_materialized_shares_open_to_the_weights():
    for weights, _, opened in run_parties(share_and_open):
        for name, value in W.items():
            assert np.abs(opened[name] - value).max() <= 2.0**-19


def test_sharing_costs_one_round_per_group_and_eight_bytes_per_weight_from_the_owner(monkeypatch):
    results = run_parties(share_and_open)
    assert results[0][1].bytes == 8 * (12 + 2) and results[0][1].rounds == 1
    assert results[1][1].bytes == 0 and results[2][1].bytes == 0

    def in_groups(party, groups):
        before = party.comm.stats.snapshot()
        shared = share_weights(party, MANIFEST, lambda name: W[name] if party.rank == 0 else None, groups)
        return party.comm.stats.snapshot() - before, {n: party.fxp.decode(arith.reveal(party, w.materialize())) for n, w in shared.items()}

    cost, opened = run_parties(in_groups, [[0], [1]])[0]
    assert cost.rounds == 2 and cost.bytes == 8 * 14 and set(opened) == {"a", "b"}
    monkeypatch.setattr("puma_onnx.runtime.weights.MESSAGE_WORDS", 10)  # the 12-word weight goes alone
    cost, opened = run_parties(in_groups, None)[0]
    assert cost.rounds == 2 and cost.bytes == 8 * 14
    for name, value in W.items():
        assert np.abs(opened[name] - value).max() <= 2.0**-19


def test_rank_two_keeps_nothing_and_the_owner_keeps_floats():
    results = run_parties(share_and_open)
    assert all(w.kept is None for w in results[2][0].values())
    assert all(w.kept.dtype == np.float32 for w in results[0][0].values())
    assert all(w.kept.dtype == np.uint64 for w in results[1][0].values())


def test_regenerated_components_match_between_their_holders():
    r0, r1, r2 = (res[0]["a"].materialize() for res in run_parties(share_and_open))
    # rank i holds (x_i, x_{i+1}): each component is held by two ranks and must agree.
    assert np.array_equal(r0.first, r2.second) and np.array_equal(r0.second, r1.first)
    assert np.array_equal(r1.second, r2.first)


def test_two_sharings_of_the_same_weights_give_fresh_words_to_rank_one():
    first = run_parties(share_and_open)[1][0]["a"].kept
    second = run_parties(share_and_open)[1][0]["a"].kept
    assert not np.array_equal(first, second)


def test_the_owner_rebuilds_its_component_in_chunks(monkeypatch):
    from puma_onnx.runtime import weights

    whole = run_parties(share_and_open)
    monkeypatch.setattr(weights, "CHUNK", 5)
    chunked = run_parties(share_and_open)
    assert whole[0][2].keys() == chunked[0][2].keys() == W.keys()
    for name, value in W.items():
        assert np.abs(chunked[0][2][name] - value).max() <= 2.0**-19
        assert np.array_equal(chunked[0][2][name], whole[0][2][name])  # the same encoding, chunked or not


def test_matmul_with_a_weight_takes_one_ring_product_per_rank():
    from puma_onnx.runtime import kernels

    from .helpers import open_fx, share_fx

    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    w = {"w": rng.normal(size=(3, 5)).astype(np.float32), "wt": rng.normal(size=(5, 3)).astype(np.float32)}

    def program(party):
        shared = share_weights(party, [("w", [3, 5]), ("wt", [5, 3])], lambda n: w[n] if party.rank == 0 else None)
        ctx = kernels.Context(party)
        xs = share_fx(party, x)
        before = party.comm.stats.snapshot()
        (plain,) = kernels.matmul(ctx, kernels.Node("mm", "MatMul", "", [], [], {}), xs, shared["w"])
        cost = party.comm.stats.snapshot() - before
        (gemm,) = kernels.gemm(ctx, kernels.Node("g", "Gemm", "", [], [], {"transB": 1}), xs, shared["wt"])
        return open_fx(party, plain), open_fx(party, gemm), cost

    for plain, gemm, cost in run_parties(program):
        assert np.abs(plain - x @ w["w"]).max() <= 1e-4
        assert np.abs(gemm - x @ w["wt"].T).max() <= 1e-4
        assert cost.rounds == 2  # the truncation's two rounds, nothing else


def test_a_transposed_weight_reads_the_same_components_transposed_and_shares_its_cache():
    from puma_onnx.runtime.shares import AShare
    from puma_onnx.runtime.weights import matmul_part

    x = np.float32([[1.0, -2.0, 0.5, 3.0], [0.25, 0.0, -1.0, 2.0]])

    def program(party):
        weights = share_weights(party, MANIFEST, lambda name: W[name] if party.rank == 0 else None)
        a = weights["a"]
        a.resident = True
        t = a.transpose()
        assert t.value_shape == (4, 3) and a.value_shape == (3, 4) and t.shape == a.shape
        xs = arith.share(party, party.fxp.encode(x) if party.rank == 0 else None, 0, x.shape)
        opened_t = party.fxp.decode(arith.reveal(party, t.materialize()))
        product = arith.truncate_parts(party, [matmul_part(AShare(xs.first, xs.second), t)], 18)[0]
        assert t._cache is a._cache and set(a._cache) == {"share", "operand"}
        return opened_t, party.fxp.decode(arith.reveal(party, product))

    opened_t, product = run_parties(program)[0]
    assert np.abs(opened_t - W["a"].T).max() <= 2.0**-19
    # t stands for W^T (4 x 3): x (2 x 4) @ t, from W's own operand read transposed.
    assert np.abs(product - x @ W["a"].T).max() <= 2.0**-16


def test_a_weight_that_outlives_its_group_is_copied_out_of_the_message_on_rank_one():
    def prog(party):
        shared = share_weights(party, MANIFEST, lambda name: W[name] if party.rank == 0 else None, alone={0})
        return shared["a"].kept, shared["b"].kept

    a, b = run_parties(prog)[1]
    # "b" is a view of the received message; "a", read in later layers, must not keep the message alive.
    assert b.base is not None and a.base is None and not np.shares_memory(a, b.base)


def test_a_component_or_a_row_sum_alone_equals_the_materialized_share_on_every_rank():
    rows = np.array([2, 0, 2])
    for resident in (False, True):
        for weights, _, _ in run_parties(share_and_open):
            w = weights["a"]
            w.resident = resident
            share = w.materialize()
            assert np.array_equal(w.component(0), share.first) and np.array_equal(w.component(1), share.second)
            assert np.array_equal(w.row_sum(rows), share.first[rows] + share.second[rows])


def test_the_owners_first_component_and_row_sum_skip_its_second(monkeypatch):
    """x_1 = encode(W) - x_0 - x_2 over the whole table is what a one-pass embedding must not pay for."""
    weights = run_parties(share_and_open)[0][0]
    monkeypatch.setattr("puma_onnx.runtime.weights._encode_minus_streams", None)  # any call fails
    assert weights["a"].component(0).shape == (3, 4)
    assert weights["a"].row_sum(np.array([1])).shape == (1, 4)


def test_a_component_product_in_stream_pieces_equals_the_whole_product(monkeypatch):
    monkeypatch.setattr("puma_onnx.runtime.weights.STREAM_ROWS", 2)  # the 3-row weight in pieces of 2 rows
    left = np.random.default_rng(3).integers(0, 2, (20, 3), dtype=np.uint8)  # past DIRECT_ROWS_BYTES
    for weights, _, _ in run_parties(share_and_open):
        w = weights["a"]
        for which in (0, 1):
            want = left.astype(np.uint64) @ w.component(which)
            assert np.array_equal(w.component_product(which, left), want)
