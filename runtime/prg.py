"""AES-128-CTR pseudo-random generator for correlated randomness.

Two ranks holding the same seed draw the same stream, so a protocol gets shared
random words without communication, as long as both holders draw the same sizes
in the same order (every protocol here is deterministic in its draws).
Encrypting a zero buffer with OpenSSL's AES-NI CTR mode runs at GB/s (measured in
benchmarks/protocols.py), far above what numpy's own generators give for uint64.
"""

from __future__ import annotations

import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 16
# Key stream is made this many bytes at a time from a shared, read-only buffer of zeros.
_PIECE = 1 << 20
_ZEROS = memoryview(bytes(_PIECE))


def new_seed() -> bytes:
    return os.urandom(SEED_BYTES)


class PRG:
    """A keyed AES-CTR stream; `words` returns the next chunk of it as numpy arrays."""

    def __init__(self, seed: bytes, stream: int = 0):
        """`stream` numbers independent streams under one key (the CTR nonce's high 64 bits)."""
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        nonce = stream.to_bytes(8, "big") + b"\0" * 8
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()

    def _stream(self, nbytes: int) -> np.ndarray:
        # The key stream is CTR's encryption of zeros: read them from one shared zero buffer, piece by
        # piece, into a fresh uninitialised array (a zeroed bytearray per call cost a pass of its own).
        # update_into wants a block of slack beyond each piece.
        out = np.empty(nbytes + 15, dtype=np.uint8)
        view = memoryview(out)
        for lo in range(0, nbytes, _PIECE):
            hi = min(lo + _PIECE, nbytes)
            self._enc.update_into(_ZEROS[: hi - lo], view[lo : hi + 15])
        return out[:nbytes]

    def words(self, shape, dtype=np.uint64) -> np.ndarray:
        """Uniform integers of an unsigned dtype, freshly drawn (a writable array)."""
        dtype = np.dtype(dtype)
        # (math.prod and isinstance: a protocol round draws a few of these, numpy's helpers cost more)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        return self._stream(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


def words_at(seed: bytes, stream: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows of PRG(seed, stream).words((R, width)) at the given row indices, without drawing the rest:
    CTR mode's block j is AES_k(counter + j), so each row starts its own cipher at its first block.
    Returns (len(rows), width) uint64; a row costs one cipher setup (microseconds)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((rows.size, width), dtype=np.uint64)
    for i, row in enumerate(rows.tolist()):
        first = row * width * 8  # the row's first byte in the stream
        block, skip = divmod(first, 16)
        counter = ((stream << 64) + block).to_bytes(16, "big")
        enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
        out[i] = np.frombuffer(enc.update(bytes(skip + 8 * width))[skip:], dtype=np.uint64)
    return out
