"""Every protocol's view, from every rank: independent of the secret (`views.leaks`), and the view
test itself rejecting each deliberately leaky variant in `leaky.MUTANTS`."""

from __future__ import annotations

import numpy as np
import pytest

from puma_onnx.runtime import arith, chain, compare, convert, prepared
from puma_onnx.runtime.parallel import parallel
from puma_onnx.runtime import embedding as lookup  # by module: the leaky fixtures patch its function
from puma_onnx.runtime.session import CLIENT, reveal_outputs
from puma_onnx.runtime.weights import matmul_part, share_weights

from .leaky import MUTANTS
from .views import leaks, replicated

N = 6  # secret elements: the view of every protocol stays a few KB
rng = np.random.default_rng(11)
OWN = {o: (rng.integers(0, 2**64, N, dtype=np.uint64), rng.integers(0, 2**64, N, dtype=np.uint64)) for o in range(3)}
ENC = 2.0**18


def fx(values) -> np.ndarray:
    return np.rint(np.asarray(values) * ENC).astype(np.int64).view(np.uint64)


# Two secrets that differ in every bit that matters: signs, magnitudes, zeros at other places.
SECRETS = (fx([0.5, 1.25, 0.0, 3.0, 2.0, 0.0]), fx([-7.0, 0.0, -2.5, -0.125, 0.0, -1.0]))
WEIGHT = np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2)


def _weights(p):
    return share_weights(p, [("w", WEIGHT.shape)], lambda name: WEIGHT)["w"]


def _prepared_products(p, x, w):
    """x (2 x 3) @ w from prepared masks, truncated (its truncation prepared too: c_1 in the setup) and (another
    mask) unscaled: setup and online."""
    products = [prepared.Product("t", "x", w), prepared.Product("u", "y", w)]
    ready = prepared.prepare(p, products, {"x": 2, "y": 2}, shifts={"x": 18})
    return [prepared.products(p, x, group, [m], ready, bits)[0] for group, m, bits in (("x", products[0], 18),
                                                                                         ("y", products[1], None))]


def _times_bit(p, x):
    """A held chain's answer times the bit [x < 0]; the rank's own knowledge of the bit (b_0 xor b_1 on rank 0,
    b_2 on ranks 1 and 2) joins its view as 64-bit words, so that a word of the protocol that reveals the other
    half differs from it by the bit itself."""
    bit = compare.ltz(p, x)
    held = chain.products(p, arith.mul_local(x, x), 18, [], dealer=0, held=True)
    return [chain.times_bit(p, bit, held), convert._bit_words(p, bit, x.shape)]


# name -> protocol(party, its AShare x of the secret); dealer-based ones run once per dealer.
ON_SHARES = {
    "mul": lambda p, x: arith.mul(p, x, x),
    "matmul": lambda p, x: arith.matmul(p, x.reshape(2, 3), x.reshape(3, 2)),
    "mul_fx": lambda p, x: [arith.mul_fx(p, x, x) for _ in range(3)],
    "matmul_fx": lambda p, x: [arith.matmul_fx(p, x.reshape(2, 3), x.reshape(3, 2)) for _ in range(3)],
    "truncate": lambda p, x: arith.truncate(p, x, 18),
    "truncate_from_two": lambda p, x: [
        arith.truncate_from_two(p, d, arith.two_parts(p, [x], d), 18, x.shape) for d in range(3)
    ],
    "truncate_parts": lambda p, x: [arith.truncate_parts(p, [x.first], 18) for _ in range(3)],
    "matmul_part": lambda p, x: [
        arith.truncate_parts(p, [matmul_part(x.reshape(2, 3), w)], 18) for w in [_weights(p)] for _ in range(3)
    ],
    "prepared_products": lambda p, x: _prepared_products(p, x.reshape(2, 3), _weights(p)),
    # The input as a truncation leaves it before its reshare: held 2-of-2 by ranks 1 and 2.
    "prepared_products_held": lambda p, x: _prepared_products(
        p, arith.HeldByTwo(0, arith.two_parts(p, [x]), (2, 3)), _weights(p)
    ),
    # Products on a truncation's held answer, one chain per dealer: (x + x^2)^2, then its square.
    "chain": lambda p, x: [
        chain.products(p, arith.mul_local(x, x), 18, [chain.Step(x, 1, x, 1, 18), chain.Step(None, 1, None, 1, 18)])
        for _ in range(3)
    ],
    # The same chain's answer held (rank 0 deals), times a bit of the secret (exp's clip).
    "chain_times_bit": lambda p, x: _times_bit(p, x),
    "parallel": lambda p, x: parallel(p, lambda q: arith.mul(q, x, x), lambda q: arith.mul_fx(q, x, x)),
    "msb": lambda p, x: convert.msb(p, x),
    "less_than_public": lambda p, x: compare.less_than_public(p, x, [fx(0.25), fx(-1.0)]),
    "equal": lambda p, x: compare.equal(p, x, arith.add_public(p, arith.sub(x, x), fx(2.0))),
    "equal_zero": lambda p, x: compare.equal(p, x, arith.sub(x, x)),
    "b2a": lambda p, x: convert.b2a(p, compare.ltz(p, x)),
    "mul_bit": lambda p, x: convert.mul_bit(p, compare.ltz(p, x), x),
    "select": lambda p, x: convert.select(
        p, [(compare.ltz(p, x), arith.mul_public(x, 1 << 20))], 20, [(compare.ltz(p, x), x)]
    ),
    "max": lambda p, x: compare.max(p, x.reshape(2, 3)),
    "max_of_four": lambda p, x: compare.max(p, x.reshape(1, 6), quads=True),
    "argmax": lambda p, x: compare.argmax(p, x),
    "mul_public_fx": lambda p, x: arith.mul_public_fx(p, x, np.linspace(-2, 2, N)),
    "reshare_parts": lambda p, x: arith.reshare_parts(p, [x.first * x.second]),
    "reveal_to_client": lambda p, x: arith.reveal(p, x, to=CLIENT),
    "reveal_outputs": lambda p, x: reveal_outputs(p, {"y": x}),
}
# Protocols whose output goes to one rank: that rank learns the secret by design.
RECEIVER = {"reveal_to_client": CLIENT, "reveal_outputs": CLIENT}


def on_shares(name, observer):
    protocol = ON_SHARES[name]
    return lambda p, secret: protocol(p, replicated(secret, observer, OWN[observer])[p.rank])


@pytest.mark.parametrize(
    "name, observer", [(n, o) for n in ON_SHARES for o in range(3) if RECEIVER.get(n) != o]  # a receiver learns it
)
def test_the_view_of_a_protocol_on_shares_does_not_depend_on_the_secret(monkeypatch, name, observer):
    verdict = leaks(monkeypatch, on_shares(name, observer), SECRETS, observer)
    # A rank that is not the receiver of an opening receives nothing at all; every other view has words.
    assert (verdict.bits == 0) == (name in RECEIVER), verdict
    # Not even one bit of the view (its received words and the shares it ends with) tells the secrets
    # apart: so no rank can compute a share it lacks, which would make its view a function of the secret.
    assert not verdict.leaks and not verdict.split, verdict


# Protocols on an owner's plaintext input (the secret): name -> (owner, protocol(party, secret)).
TABLE = np.arange(8 * 3, dtype=np.uint64).reshape(8, 3) * np.uint64(2**40 + 12345)
IDS = (np.array([[1, 5, 5, 0]]), np.array([[7, 2, 3, 7]]))


def _table_share(p):
    return arith.share(p, TABLE if p.rank == 0 else None, 0, TABLE.shape)


FROM_OWNER = {
    "share_by_0": (0, lambda p, s: arith.share(p, s if p.rank == 0 else None, 0, s.shape)),
    "share_by_2": (2, lambda p, s: arith.share(p, s if p.rank == 2 else None, 2, s.shape)),
    "share_weights": (0, lambda p, s: share_weights(p, [("w", (N,))], lambda name: s.view(np.int64) / ENC)),
    "prepared_weights": (0, lambda p, s: _prepared_products(
        p, arith.share(p, fx(np.ones((2, 3))) if p.rank == 1 else None, 1, (2, 3)),
        share_weights(p, [("w", (3, 2))], lambda name: s.view(np.int64).reshape(3, 2) / ENC)["w"],
    )),
    "embedding_ids": (CLIENT, lambda p, ids: lookup.embedding(p, _table_share(p), ids if p.rank == CLIENT else None, CLIENT, ids.shape)),
}
OWNER_SECRETS = {
    "share_by_0": SECRETS,
    "share_by_2": SECRETS,
    "share_weights": SECRETS,
    "prepared_weights": SECRETS,
    "embedding_ids": IDS,
}


@pytest.mark.parametrize(
    "name, observer", [(n, o) for n in FROM_OWNER for o in range(3) if FROM_OWNER[n][0] != o]  # the owner knows it
)
def test_the_view_of_an_owners_input_does_not_depend_on_it(monkeypatch, name, observer):
    _, protocol = FROM_OWNER[name]
    verdict = leaks(monkeypatch, protocol, OWNER_SECRETS[name], observer)
    assert not verdict.leaks, verdict


TABLE_B = TABLE[::-1] * np.uint64(3) + np.uint64(1)
OWN_TABLE = [rng.integers(0, 2**64, TABLE.shape, dtype=np.uint64) for _ in range(2)]


def embedding_of_table(observer):
    """The embedding as a protocol on the secret table, shared with the observer's components fixed; the
    client's ids fixed."""

    def protocol(p, table):
        share = replicated(table, observer, OWN_TABLE)[p.rank]
        return lookup.embedding(p, share, IDS[0] if p.rank == CLIENT else None, CLIENT, IDS[0].shape)

    return protocol


@pytest.mark.parametrize("observer", [0, 1, 2])
def test_the_view_of_an_embedding_does_not_depend_on_the_table(monkeypatch, observer):
    verdict = leaks(monkeypatch, embedding_of_table(observer), (TABLE, TABLE_B), observer)
    assert not verdict.leaks, verdict


# Each leaky variant, the protocol that shows it, and the rank that can unmask a share.
CAUGHT = {
    "truncation_mask_from_common_key": (on_shares("truncate", 1), SECRETS, 1),
    "product_truncation_mask_from_common_key": (on_shares("mul_fx", 1), SECRETS, 1),
    "reshare_without_zero_sharing": (on_shares("mul", 0), SECRETS, 0),
    "embedding_mask_from_common_key": (FROM_OWNER["embedding_ids"][1], IDS, (CLIENT + 2) % 3),
    "embedding_product_mask_from_common_key": (embedding_of_table(CLIENT), (TABLE, TABLE_B), CLIENT),
    "weight_mask_from_common_key": (FROM_OWNER["share_weights"][1], SECRETS, 1),
    "product_mask_from_common_key": (on_shares("prepared_products", 0), SECRETS, 0),
    "held_input_mask_from_common_key": (on_shares("prepared_products_held", 0), SECRETS, 0),
    "parallel_keys_from_common_key": (on_shares("parallel", 0), SECRETS, 0),
    "chain_mask_from_common_key": (on_shares("chain", 0), SECRETS, 0),
    "clip_mask_from_common_key": (on_shares("chain_times_bit", 1), SECRETS, 1),
}
# Mutants whose protocol truncates: floor or floor + 1.
TRUNCATING = {
    "truncation_mask_from_common_key", "product_truncation_mask_from_common_key", "product_mask_from_common_key",
    "held_input_mask_from_common_key", "chain_mask_from_common_key", "clip_mask_from_common_key",
}


@pytest.mark.parametrize("name", MUTANTS)
def test_the_view_test_rejects_each_leaky_variant(monkeypatch, name):
    protocol, secrets, observer = CAUGHT[name]
    assert not leaks(monkeypatch, protocol, secrets, observer).leaks  # the real protocol passes first
    MUTANTS[name].apply(monkeypatch)
    verdict = leaks(monkeypatch, protocol, secrets, observer)
    # The unmasked share makes the view a function of the secret: it determines which one ran.
    assert verdict.leaks and verdict.split, verdict


@pytest.mark.parametrize("name", MUTANTS)
def test_each_leaky_variant_stays_correct(monkeypatch, name):
    """The mutants leak without breaking results, so only a view test can find them."""
    MUTANTS[name].apply(monkeypatch)
    protocol, secrets, observer = CAUGHT[name]
    from puma_onnx.runtime.comm import run_parties

    out = run_parties(lambda p: protocol(p, secrets[0]))
    opened = run_parties(lambda p: arith.reveal(p, _first_share(out[p.rank])))[0]
    expected = {
        "truncation_mask_from_common_key": lambda s: s.view(np.int64) >> 18,
        "product_truncation_mask_from_common_key": lambda s: (s.view(np.int64) ** 2) >> 18,
        "reshare_without_zero_sharing": lambda s: s * s,
        "embedding_mask_from_common_key": lambda s: TABLE[s],
        "embedding_product_mask_from_common_key": lambda s: s[IDS[0]],
        "weight_mask_from_common_key": lambda s: s,
        "product_mask_from_common_key": lambda s: (s.view(np.int64).reshape(2, 3) @ fx(WEIGHT).view(np.int64)) >> 18,
        "held_input_mask_from_common_key": lambda s: (s.view(np.int64).reshape(2, 3) @ fx(WEIGHT).view(np.int64)) >> 18,
        "parallel_keys_from_common_key": lambda s: s * s,
        # SECRETS are multiples of 2^-2: both products before the last divide their shift exactly.
        "chain_mask_from_common_key": lambda s: (((s.view(np.int64) + (s.view(np.int64) ** 2 >> 18)) ** 2 >> 18) ** 2) >> 18,
        "clip_mask_from_common_key": lambda s: (s.view(np.int64) < 0) * (s.view(np.int64) ** 2 >> 18),
    }[name](secrets[0])
    got, want = opened.reshape(-1).view(np.int64), np.asarray(expected).reshape(-1).view(np.int64)
    # The truncation is floor or floor + 1; everything else is exact.
    assert np.all(np.abs(got - want) <= (name in TRUNCATING))


def _first_share(out):
    if isinstance(out, list):
        out = out[0]
    if isinstance(out, dict):
        (out,) = out.values()
    if hasattr(out, "materialize"):
        return out.materialize()
    return out


def test_the_view_test_catches_a_mask_used_for_two_messages(monkeypatch):
    """A toy protocol: rank 0 sends rank 1 x_0 + m and, a round later, 3 x_0 + m with the same mask m from a
    key rank 1 lacks. Each message alone is uniform; their difference 2 x_0 gives rank 1 the secret."""

    def reused_mask(p, secret):
        x = replicated(secret, 1, OWN[1])[p.rank]
        if p.rank == 0:
            m = p.prg_own.words(N)
            p.comm.exchange({1: x.first + m}, {})
            p.comm.exchange({1: np.uint64(3) * x.first + m}, {})
        elif p.rank == 1:
            for _ in range(2):
                p.comm.exchange({}, {0: ((N,), np.uint64)})
        else:
            p.comm.exchange({}, {})
            p.comm.exchange({}, {})

    verdict = leaks(monkeypatch, reused_mask, SECRETS, 1)
    assert verdict.leaks and verdict.split, verdict
