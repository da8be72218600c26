"""AES-128-CTR pseudo-random generator for correlated randomness.

Two ranks holding the same seed draw the same stream, so a protocol gets shared
random words without communication, as long as both holders draw the same sizes
in the same order (every protocol here is deterministic in its draws).
Encrypting a zero buffer with OpenSSL's AES-NI CTR mode runs at GB/s (measured in
benchmarks/protocols.py), far above what numpy's own generators give for uint64.
"""

from __future__ import annotations

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
        shape = (int(shape),) if np.isscalar(shape) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        return self._stream(count * dtype.itemsize).view(dtype).reshape(shape)
