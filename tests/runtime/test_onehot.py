"""The outside client's shares of its one-hot ids: correct, uniform to every rank, and the secure
embedding that multiplies them by the secret table (padding rows, several queries, cost)."""

import numpy as np
import pytest

from puma_onnx.runtime import arith, onehot
from puma_onnx.runtime.comm import run_parties
from puma_onnx.runtime.embedding import shared_embedding
from puma_onnx.runtime.onehot import OneHotShare, Piece, check_piece, split
from puma_onnx.runtime.weights import share_weights

from .helpers import cost_of, share_fx
from .leaky import CLIENT_MUTANTS
from .views import bit_counts, compare

rng = np.random.default_rng(2024)
VOCAB, HIDDEN = 50, 6
TABLE = rng.normal(0, 1, (VOCAB, HIDDEN))


def expanded(piece: Piece, rows: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The two components a rank holds, as full matrices."""
    blocks = list(OneHotShare(piece, rows, vocab).blocks(3))  # blocks of 3 rows: the streams continue
    return np.concatenate([b.first for _, b in blocks]), np.concatenate([b.second for _, b in blocks])


def test_the_three_components_sum_to_the_one_hot_rows():
    ids = np.array([[0, VOCAB - 1, 7, 7], [3, 0, 0, 1]])
    pieces = split(ids, VOCAB)
    parts = [expanded(p, ids.size, VOCAB) for p in pieces]
    for r in range(3):  # replicated: rank r's second component is rank r+1's first
        assert np.array_equal(parts[r][1], parts[(r + 1) % 3][0])
    total = parts[0][0] + parts[1][0] + parts[2][0]
    assert np.array_equal(total, np.eye(VOCAB, dtype=np.uint64)[ids.reshape(-1)])


def test_rank_0_gets_two_seeds_and_ranks_1_and_2_the_dense_component():
    pieces = split(np.array([1, 2, 3]), VOCAB)
    assert sorted(pieces[0].seeds) == [0, 1] and pieces[0].dense is None
    assert sorted(pieces[1].seeds) == [1] and pieces[1].dense.shape == (3, VOCAB)
    assert sorted(pieces[2].seeds) == [0] and pieces[2].dense is pieces[1].dense
    assert pieces[0].seeds[0] != pieces[0].seeds[1]


def test_ids_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        split(np.array([0, VOCAB]), VOCAB)
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        split(np.array([-1]), VOCAB)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: Piece(1, {}, p.dense), r"seeds for components \[1\]"),
        (lambda p: Piece(1, {1: b"short"}, p.dense), "16 bytes"),
        (lambda p: Piece(1, p.seeds, p.dense[:1]), "2 x 50 uint64 words"),
        (lambda p: Piece(1, p.seeds, None), "2 x 50 uint64 words"),
    ],
)
def test_a_malformed_piece_is_named(edit, message):
    piece = split(np.array([4, 5]), VOCAB)[1]
    with pytest.raises(ValueError, match=message):
        check_piece(edit(piece), 2, VOCAB)
    with pytest.raises(ValueError, match="takes no dense share"):
        check_piece(Piece(0, split(np.array([4, 5]), VOCAB)[0].seeds, piece.dense), 2, VOCAB)


IDS = (np.array([0, 0, 1]), np.array([VOCAB - 1, 5, 1]))


@pytest.mark.parametrize("observer", [0, 1, 2])
def test_every_rank_sees_words_independent_of_the_ids(observer):
    small = VOCAB // 10  # a narrow vocabulary keeps the pairwise derived words few
    a, b = (ids % small for ids in IDS)

    def view(ids):
        return lambda: list(expanded(split(ids, small)[observer], ids.size, small))

    verdict = compare(bit_counts(view(a)), bit_counts(view(b)))
    assert not verdict.leaks, verdict


def test_the_view_test_catches_a_client_that_uses_one_seed_twice(monkeypatch):
    """Mutant: X0 = X1 (one seed for both): still correct, but X2 = E - 2 X1 shows E's low bit to ranks 1, 2."""
    small = VOCAB // 10
    a, b = (ids % small for ids in IDS)
    CLIENT_MUTANTS["onehot_one_seed_twice"].apply(monkeypatch)
    pieces = onehot.split(a, small)
    parts = [expanded(p, a.size, small) for p in pieces]
    assert np.array_equal(parts[0][0] + parts[1][0] + parts[2][0], np.eye(small, dtype=np.uint64)[a])  # correct

    def view(ids, observer):
        return lambda: list(expanded(onehot.split(ids, small)[observer], ids.size, small))

    for observer in (1, 2):
        verdict = compare(bit_counts(view(a, observer)), bit_counts(view(b, observer)))
        assert verdict.leaks and verdict.split, (observer, verdict)


def _embed(queries, rows, table_owner=0, weight=False):
    """Each rank's (opened rows, cost) of shared_embedding over `queries` [(ids, flat positions)], with the
    table an AShare from `table_owner` or (`weight`) a WeightShare as the owner shares model weights."""
    pieces = [split(ids, VOCAB) for ids, _ in queries]

    def prog(p):
        if weight:
            table = share_weights(p, [("table", TABLE.shape)], lambda name: TABLE.astype(np.float32))["table"]
        else:
            table = share_fx(p, TABLE, table_owner)
        sources = [(OneHotShare(pc[p.rank], ids.size, VOCAB), pos) for (ids, pos), pc in zip(queries, pieces)]
        out, cost = cost_of(p, lambda: shared_embedding(p, table, sources, rows))
        return p.fxp.decode(arith.reveal(p, out)), cost

    return run_parties(prog)


@pytest.mark.parametrize("weight", [False, True])
def test_shared_embedding_places_each_query_and_leaves_padding_zero(weight):
    first = np.array([3, VOCAB - 1, 0])
    second = np.array([7, 7])
    rows = 8
    queries = [(first, np.array([0, 1, 2])), (second, np.array([5, 6]))]  # rows 3, 4, 7: padding
    want = np.zeros((rows, HIDDEN))
    want[[0, 1, 2]] = TABLE[first]
    want[[5, 6]] = TABLE[second]
    want = np.rint(want.astype(np.float32).astype(np.float64) * 2**18) / 2**18 if weight else np.rint(want * 2**18) / 2**18
    for got, cost in _embed(queries, rows, table_owner=2, weight=weight):
        assert np.array_equal(got, want)
        assert cost.rounds == 1
        assert cost.bytes == rows * HIDDEN * 8  # the reshare only: the client's pieces came from outside


def test_shared_embedding_runs_in_blocks(monkeypatch):
    from puma_onnx.runtime import embedding

    monkeypatch.setattr(embedding, "SHARED_BLOCK_ROWS", 2)
    ids = rng.integers(0, VOCAB, 7)
    for got, _ in _embed([(ids, np.arange(7))], 7):
        assert np.array_equal(got, np.rint(TABLE[ids] * 2**18) / 2**18)
