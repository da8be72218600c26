"""Replicated secret shares and their communication-free shape operations.

AShare (Araki et al. 2016 / ABY3): x = x_0 + x_1 + x_2 mod 2^64, rank i holds
first = x_i and second = x_{i+1}. A public shape operation (reshape, slicing,
transpose, sum, ...) applied to both components of every rank is the same operation
on x, so all of these are local.

BShare: x = x_0 ^ x_1 ^ x_2, bit-sliced. `first`/`second` are uint8 arrays of shape
(rows, ceil(n / 8)): row j packs bit j of the n = prod(shape) elements, 8 elements
per byte, little-endian bit order. Bitwise gates then act on 8 elements per byte
op, and a message of `rows` bits per element takes exactly rows * n / 8 bytes
(plus at most one byte of padding per row).

Shares are never modified in place (several may be views of one buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AShare:
    first: np.ndarray
    second: np.ndarray

    def __post_init__(self):
        if self.first.shape != self.second.shape:
            raise ValueError(f"share components differ in shape: {self.first.shape} vs {self.second.shape}")

    def _map(self, f) -> AShare:
        return AShare(f(self.first), f(self.second))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.first.shape

    @property
    def ndim(self) -> int:
        return self.first.ndim

    @property
    def size(self) -> int:
        return self.first.size

    def __len__(self) -> int:
        return len(self.first)

    def reshape(self, *shape) -> AShare:
        return self._map(lambda a: a.reshape(*shape))

    def transpose(self, *axes) -> AShare:
        """As ndarray.transpose: no argument, a tuple of axes, or the axes as arguments."""
        return self._map(lambda a: a.transpose(*axes))

    def swapaxes(self, a1: int, a2: int) -> AShare:
        return self._map(lambda a: a.swapaxes(a1, a2))

    def moveaxis(self, source, destination) -> AShare:
        return self._map(lambda a: np.moveaxis(a, source, destination))

    def __getitem__(self, index) -> AShare:
        return self._map(lambda a: a[index])

    def broadcast_to(self, shape) -> AShare:
        return self._map(lambda a: np.broadcast_to(a, shape))

    def expand_dims(self, axis) -> AShare:
        return self._map(lambda a: np.expand_dims(a, axis))

    def squeeze(self, axis=None) -> AShare:
        return self._map(lambda a: np.squeeze(a, axis))

    def flatten(self) -> AShare:
        return self.reshape(-1)

    def sum(self, axis=None, keepdims: bool = False) -> AShare:
        # uint64 sums wrap mod 2^64, which is the ring sum.
        return self._map(lambda a: a.sum(axis=axis, keepdims=keepdims, dtype=np.uint64))


def concat(xs: list[AShare], axis: int = 0) -> AShare:
    return AShare(
        np.concatenate([x.first for x in xs], axis=axis), np.concatenate([x.second for x in xs], axis=axis)
    )


def stack(xs: list[AShare], axis: int = 0) -> AShare:
    return AShare(np.stack([x.first for x in xs], axis=axis), np.stack([x.second for x in xs], axis=axis))


def split(x: AShare, indices_or_sections, axis: int = 0) -> list[AShare]:
    firsts = np.split(x.first, indices_or_sections, axis=axis)
    seconds = np.split(x.second, indices_or_sections, axis=axis)
    return [AShare(a, b) for a, b in zip(firsts, seconds)]


def flat_concat(xs: list[AShare]) -> tuple[AShare, list[tuple[int, ...]]]:
    """All elements of xs in one flat share, and the shapes to undo it with `flat_split`."""
    return concat([x.reshape(-1) for x in xs]), [x.shape for x in xs]


def flat_split(x: AShare, shapes: list[tuple[int, ...]]) -> list[AShare]:
    out, at = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(AShare(x.first[at : at + n].reshape(s), x.second[at : at + n].reshape(s)))
        at += n
    return out


@dataclass(frozen=True)
class BShare:
    first: np.ndarray
    second: np.ndarray
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        return self.first.shape[0]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def row(self, index) -> BShare:
        """Rows by a slice or index list (keeps the 2-D layout)."""
        if isinstance(index, (int, np.integer)):
            index = slice(index, index + 1)
        return BShare(self.first[index], self.second[index], self.shape)


def vconcat(xs: list[BShare]) -> BShare:
    """Stack the rows of bit-sliced shares of the same elements."""
    return BShare(
        np.concatenate([x.first for x in xs], axis=0), np.concatenate([x.second for x in xs], axis=0), xs[0].shape
    )
