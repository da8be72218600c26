"""The model owner's weights as replicated shares that two ranks can regenerate instead of storing.

Sharing (owner o = 0, like `arith.share`): x_0 comes from a key the owner shares
with rank 2, x_2 from a key common to all ranks, and the owner sends
x_1 = W - x_0 - x_2 to rank 1. Unlike `arith.share`, each weight draws its PRG
words from its own AES-CTR stream (nonce = the weight's index), so x_0 and x_2
can be drawn again at any time. Rank 1 keeps x_1 (8 bytes per weight), the
owner keeps its float32 weights (4 bytes) and recomputes x_1 = W - x_0 - x_2,
rank 2 keeps nothing: 12 bytes per weight over the three ranks instead of 48
for stored shares. Each use pays one AES pass per regenerated component (GB/s
with AES-NI) and, on the owner, one encoding.

Security is that of `arith.share`: rank 1 sees x_1, masked by x_0 whose key it
lacks; rank 2 sees x_0 and x_2, both independent of W.
Cost: 8 bytes per weight from the owner, once (or once per walk when streamed), in
one round per group of weights shared together (`share_weights`, `WeightStream`).

Products with a weight (`matmul_part`) use that the owner knows W: with x shared
as (x_0, x_1, x_2), x W = (x_0 + x_1) W + x_2 (W_1 + W_2) + x_2 W_0, one ring
matmul per rank (rank 0 the first term, rank 1 the second, rank 2 the third)
instead of the two of a product of two shares: half the work, no extra bytes.
The three additive parts then go through the truncation, which masks them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from .comm import PARTIES, Cost
from .party import Party
from .prg import PRG, SEED_BYTES, words_at
from .ring import FixedPoint, ring_matmul, ring_matmul_bytes
from .shares import AShare

OWNER = 0


# A component product draws a stream this many rows at a time (8192 x 768 words: 50 MB).
STREAM_ROWS = 8192

# The owner rebuilds x_1 in pieces of this many words, so a 50257 x 768 table needs
# no full-size temporaries beyond the share itself.
CHUNK = 1 << 20


def _stream(seed: bytes, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The first words of weight `index`'s own stream under `seed`."""
    return PRG(seed, stream=index).words(shape)


def _encode_minus_streams(
    fxp: FixedPoint, plain: np.ndarray, seeds: list[bytes], index: int, checked: bool = False, out=None
) -> np.ndarray:
    """encode(plain) - stream(seed_1) - stream(seed_2) - ..., built CHUNK words at a time (into `out`, a
    flat uint64 array, when given); `checked` skips the range test (the weight was checked before it
    was shared). A uint64 `plain` is already encoded."""
    flat = plain.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint64) if out is None else out
    streams = [PRG(seed, stream=index) for seed in seeds]
    for lo in range(0, flat.size, CHUNK):
        piece = out[lo : lo + CHUNK]
        chunk = flat[lo : lo + CHUNK]
        piece[...] = chunk if chunk.dtype == np.uint64 else fxp.encode(chunk, checked=checked)
        for prg in streams:
            piece -= prg.words(piece.size)
    return out.reshape(plain.shape)


@dataclass
class WeightShare:
    """One rank's share of one weight: what it keeps, and seeds for the regenerable components.

    With `resident` set (`keep_resident`), the share and the matmul operand, once computed, are kept
    for later uses: a generation step reuses every weight, and regenerating them per step costs more
    than the step's own products (16 more bytes per weight and rank).
    """

    index: int
    shape: tuple[int, ...]
    rank: int
    kept: np.ndarray | None  # the owner's weights (float32, or encoded: uint64), x_1 on rank 1, None on rank 2
    seed_0: bytes | None  # key of x_0 (ranks 0 and 2)
    seed_2: bytes  # key of x_2 (all ranks)
    fxp: FixedPoint
    resident: bool = False
    transposed: bool = False  # a 2-D weight read through a Transpose: W^T, from the same components
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def value_shape(self) -> tuple[int, ...]:
        """The shape of the value this share stands for (`shape` is the stored weight's)."""
        return tuple(reversed(self.shape)) if self.transposed else self.shape

    def transpose(self) -> WeightShare:
        """W^T, lazily: the same components (and cache), read transposed."""
        if len(self.shape) != 2:
            raise ValueError(f"only a 2-D weight transposes lazily, got shape {self.shape}")
        return replace(self, transposed=not self.transposed, _cache=self._cache)

    def _x0(self) -> np.ndarray:
        return _stream(self.seed_0, self.index, self.shape)

    def _x2(self) -> np.ndarray:
        return _stream(self.seed_2, self.index, self.shape)

    def _kept(self, key: str, make):
        if not self.resident:
            return make()
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def materialize(self) -> AShare:
        share = self._kept("share", self._materialize)
        return share.transpose() if self.transposed else share

    def _materialize(self) -> AShare:
        if self.rank == OWNER:
            x1 = _encode_minus_streams(self.fxp, self.kept, [self.seed_0, self.seed_2], self.index, checked=True)
            return AShare(self._x0(), x1)
        if self.rank == 1:
            return AShare(self.kept, self._x2())
        return AShare(self._x2(), self._x0())

    def component(self, which: int) -> np.ndarray:
        """This rank's first (0) or second (1) component alone. Streams are only drawn: the owner computes
        x_1 = encode(W) - x_0 - x_2 only for its second component (a one-pass embedding table needs its x_0)."""
        if self.transposed:
            raise ValueError("a transposed weight has no components of its own; materialize it")
        seed = self._stream_seed(which)
        if self.resident:
            share = self.materialize()
            return share.first if which == 0 else share.second
        if seed is not None:
            return _stream(seed, self.index, self.shape)
        if self.rank == 1:
            return self.kept
        # The owner's x_1, without keeping the x_0 that materialize() would also build.
        x1 = _encode_minus_streams(self.fxp, self.kept, [self.seed_0, self.seed_2], self.index, checked=True)
        return x1.reshape(self.shape)

    def component_product(self, which: int, left: np.ndarray) -> np.ndarray:
        """left (uint8, n x V) @ this rank's component `which` of a 2-D weight (`ring.ring_matmul_bytes`).
        A component that is a plain PRG stream is drawn and multiplied STREAM_ROWS rows at a time, so a
        GPT-2 table (50257 x 768, 309 MB a component) never lies whole in memory."""
        seed = self._stream_seed(which)
        if seed is None or self.resident or len(self.shape) != 2:
            return ring_matmul_bytes(left, self.component(which))
        rows, width = self.shape
        prg = PRG(seed, stream=self.index)
        out = np.zeros((left.shape[0], width), dtype=np.uint64)
        for lo in range(0, rows, STREAM_ROWS):
            piece = prg.words((min(STREAM_ROWS, rows - lo), width))
            out += ring_matmul_bytes(left[:, lo : lo + piece.shape[0]], piece)
        return out

    def _stream_seed(self, which: int) -> bytes | None:
        """The key of component `which` when it is a plain stream on this rank (None for x_1)."""
        if self.transposed:
            return None
        if self.rank == OWNER:
            return self.seed_0 if which == 0 else None
        if self.rank == 1:
            return None if which == 0 else self.seed_2
        return self.seed_2 if which == 0 else self.seed_0

    def row_sum(self, rows: np.ndarray) -> np.ndarray:
        """(first + second)[rows] of a 2-D weight, drawing only those rows of each stream (`prg.words_at`)."""
        if self.transposed or len(self.shape) != 2:
            raise ValueError("row_sum reads rows of a 2-D weight as it was shared")
        if self.resident:
            share = self.materialize()
            return share.first[rows] + share.second[rows]
        return self._component_rows(0, rows) + self._component_rows(1, rows)

    def _component_rows(self, which: int, rows: np.ndarray) -> np.ndarray:
        width = self.shape[1]
        seed = self._stream_seed(which)
        if seed is not None:
            return words_at(seed, self.index, rows, width)
        if self.rank == 1:
            return self.kept[rows]
        plain = self.kept[rows]  # the owner's x_1 = encode(W) - x_0 - x_2 at those rows
        encoded = plain if plain.dtype == np.uint64 else self.fxp.encode(plain, checked=True)
        return encoded - words_at(self.seed_0, self.index, rows, width) - words_at(self.seed_2, self.index, rows, width)

    def operand(self) -> np.ndarray:
        """This rank's right operand of `matmul_part`: W on the owner, x_1 + x_2 on rank 1, x_0 on rank 2."""
        return self._kept("operand", self._operand)

    def _operand(self) -> np.ndarray:
        if self.rank == OWNER:  # checked when it was shared
            return self.kept if self.kept.dtype == np.uint64 else self.fxp.encode(self.kept, checked=True)
        if self.rank == 1:
            return self.kept + self._x2()
        return self._x0()


# Weights kept resident for generation while they take at most this many bytes per rank (GPT-2 base and
# SmolLM2-135M: about 2 GB; larger models regenerate their components per step, as one pass does);
# `--weight-budget` sets it.
RESIDENT_BYTES = 4 << 30


# What `keep_resident` caches per weight and rank: a weight is read as a share, 16 bytes, or as a matmul
# operand, 8 (a tied embedding as both).
CACHED_BYTES = 24


def caches_fit(count: int, budget: int = RESIDENT_BYTES) -> bool:
    """Whether `keep_resident` keeps `count` weights' forms within `budget` bytes per rank."""
    return CACHED_BYTES * count <= budget


def keep_resident(weights: dict[str, WeightShare], budget: int = RESIDENT_BYTES) -> bool:
    """Mark every weight resident when its kept forms fit the budget (`caches_fit`); all ranks decide
    alike from the public shapes. Returns whether they were marked."""
    if not caches_fit(sum(int(np.prod(w.shape)) for w in weights.values()), budget):
        return False
    for w in weights.values():
        w.resident = True
    return True


def matmul_part(x: AShare, w: WeightShare, transpose: bool = False) -> np.ndarray:
    """This rank's additive part of x @ W (x @ W^T with transpose), in the ring; see the module doc."""
    left = x.first + x.second if w.rank == OWNER else (x.second if w.rank == 1 else x.first)
    right = w.operand()
    return ring_matmul(left, right.T if transpose != w.transposed else right)


def weight_seeds(party: Party) -> tuple[bytes | None, bytes]:
    """Fresh weight keys from the setup keys: (k for x_0 on ranks 0 and 2, common k for x_2)."""
    seed_2 = party.prg_all.words(SEED_BYTES, np.uint8).tobytes()
    if party.rank == OWNER:
        return party.prg_prev.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    if party.rank == (OWNER - 1) % PARTIES:
        return party.prg_next.words(SEED_BYTES, np.uint8).tobytes(), seed_2
    return None, seed_2


# A group's x_1 goes to rank 1 in messages of at most this many words (1 GiB), well under MPI's 2^31 count.
MESSAGE_WORDS = 1 << 27


def share_weights(
    party: Party, manifest: list, values, groups: list[list[int]] | None = None, seeds=None, alone=frozenset(),
    encoded: bool = False,
) -> dict[str, WeightShare]:
    """Share the (name, shape) entries of the manifest; `values(name)` gives the owner its float array.

    `groups` lists manifest indices shared together (default: all of them): the owner sends a
    group's x_1 to rank 1 in one message (or a few of MESSAGE_WORDS), and rank 1 keeps views into
    it, except for the manifest indices in `alone`, which it copies out (a weight that outlives its
    group would otherwise keep the whole message alive). `seeds` (from `weight_seeds`) lets a
    stream share its groups one at a time under the same keys, so every group's shares are those
    of one sharing of the whole model. With `encoded`, the owner keeps its weights encoded (8 bytes
    a weight instead of 4): a streamed weight is read once, and encoding it again in its product
    would put that work in the online phase.
    Cost: 8 bytes per weight from the owner, one round per group (per MESSAGE_WORDS words).
    """
    seed_0, seed_2 = seeds or weight_seeds(party)
    comm, r = party.comm, party.rank
    groups = [list(range(len(manifest)))] if groups is None else groups
    out = {}
    with comm.tag("share_weights"):
        for group in groups:
            for part in _messages([(i, tuple(manifest[i][1])) for i in group]):
                sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in part]
                kept_floats = {}
                if r == OWNER:
                    buffer = np.empty(sum(sizes), np.uint64)
                    at = 0
                    for (index, shape), size in zip(part, sizes):
                        name = manifest[index][0]
                        kept_floats[index] = np.asarray(values(name), dtype=np.float32).reshape(shape)
                        if encoded:  # (checked before any share moved, in load_model)
                            kept_floats[index] = party.fxp.encode(kept_floats[index], checked=True)
                        _encode_minus_streams(
                            party.fxp, kept_floats[index], [seed_0, seed_2], index, out=buffer[at : at + size]
                        )
                        at += size
                    comm.exchange({1: buffer}, {})
                    del buffer
                elif r == 1:
                    buffer = comm.exchange({}, {OWNER: ((sum(sizes),), np.uint64)})[OWNER]
                else:
                    comm.exchange({}, {})
                at = 0
                for (index, shape), size in zip(part, sizes):
                    kept = None
                    if r == OWNER:
                        kept = kept_floats.get(index)
                    elif r == 1:
                        kept = buffer[at : at + size].reshape(shape)
                        kept = kept.copy() if index in alone else kept
                    at += size
                    out[manifest[index][0]] = WeightShare(index, shape, r, kept, seed_0, seed_2, party.fxp)
    return out


def _messages(entries: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """The group's entries in runs of at most MESSAGE_WORDS words (a larger weight goes alone)."""
    out, run, words = [], [], 0
    for index, shape in entries:
        size = int(np.prod(shape, dtype=np.int64))
        if run and words + size > MESSAGE_WORDS:
            out.append(run)
            run, words = [], 0
        run.append((index, shape))
        words += size
    if run:
        out.append(run)
    return out


def layer_groups(manifest: list, first_use: dict[str, int], layer_of_node) -> tuple[list[list[int]], list[int]]:
    """Manifest indices grouped by the transformer layer of their first reader (weights read first
    outside any layer form one group per reading node), and each group's first node index, in walk
    order. Weights no node reads (a graph output that is a weight) come first, before node 0.
    `layer_of_node(i)` is node i's layer or None."""
    by_key: dict[object, list[int]] = {}
    starts: dict[object, int] = {}
    for index, (name, _) in enumerate(manifest):
        node = first_use.get(name)
        if node is None:
            key, node = ("unread",), 0
        else:
            layer = layer_of_node(node)
            key = ("layer", layer) if layer is not None else ("node", node)
        by_key.setdefault(key, []).append(index)
        starts[key] = min(starts.get(key, node), node)
    keys = sorted(by_key, key=lambda k: starts[k])
    return [by_key[k] for k in keys], [starts[k] for k in keys]


@dataclass
class WeightStream:
    """Weights shared layer by layer during the walk, instead of all before it.

    Before the walk reaches the first node of a group (`arrive`), the owner reads that group's
    weights (one at a time from its `TensorStore`) and shares them; the executor forgets each
    weight after its last reader, so a rank holds about one layer's weights at a time. Each walk
    (a generation step) shares again under the same keys: the same shares, 8 bytes per weight
    from the owner again. `cost` and `time_s` add up what the sharing took (`comm.untraced`: the
    network trace is the online protocol's).
    """

    party: Party
    manifest: list
    values: object  # name -> float array, on the owner
    groups: list[list[int]]
    starts: list[int]
    last_use: dict[str, int] = field(default_factory=dict)  # name -> index of its last reader
    seeds: tuple | None = None
    time_s: float = 0.0
    cost: Cost = field(default_factory=Cost)

    def __post_init__(self):
        self.seeds = self.seeds or weight_seeds(self.party)
        self._at = {}
        self._alone = set()  # weights still read after the next group arrives: copied out on rank 1
        for k, (group, start) in enumerate(zip(self.groups, self.starts)):
            self._at.setdefault(start, []).append(group)
            ends = self.starts[k + 1] if k + 1 < len(self.starts) else None
            for i in group:
                last = self.last_use.get(self.manifest[i][0], start)
                if ends is not None and last >= ends:
                    self._alone.add(i)

    def arrive(self, node_index: int, env: dict) -> None:
        """Share the groups whose first reader is node `node_index` into `env`."""
        groups = self._at.get(node_index)
        if not groups:
            return
        comm = self.party.comm
        start, before = time.perf_counter(), comm.stats.snapshot()
        with comm.untraced():
            env.update(
                share_weights(self.party, self.manifest, self.values, groups, self.seeds, self._alone, encoded=True)
            )
        self.cost += comm.stats.snapshot() - before
        self.time_s += time.perf_counter() - start
