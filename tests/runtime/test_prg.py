import numpy as np
import pytest

from puma_onnx.runtime import prg
from puma_onnx.runtime.prg import PRG, new_seed


def test_same_seed_gives_same_stream():
    s = new_seed()
    a, b = PRG(s), PRG(s)
    assert np.array_equal(a.words((3, 4)), b.words((3, 4)))
    assert np.array_equal(a.words(5, np.uint8), b.words(5, np.uint8))


def test_stream_advances_and_seeds_differ():
    p = PRG(new_seed())
    assert not np.array_equal(p.words(8), p.words(8))
    assert not np.array_equal(PRG(new_seed()).words(8), PRG(new_seed()).words(8))


def test_output_bits_are_balanced():
    words = PRG(new_seed()).words(1 << 16)
    ones = np.unpackbits(words.view(np.uint8)).mean()
    # 2^22 bits: the mean's standard deviation is 2.4e-4; 0.005 is 20 sigma.
    assert abs(ones - 0.5) < 0.005


def test_a_draw_across_pieces_is_the_same_stream_as_small_draws():
    # The key stream is made in pieces of prg._PIECE bytes: a piece boundary must not skip or repeat a block.
    seed = new_seed()
    big = PRG(seed).words(prg._PIECE * 2 + 13, np.uint8)
    small = PRG(seed)
    parts = [small.words(n, np.uint8) for n in (7, prg._PIECE - 7, prg._PIECE + 1, 12)]
    assert np.array_equal(big, np.concatenate(parts))
    # ... and it is AES-CTR's key stream itself (the encryption of zeros), not merely self-consistent.
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    assert np.array_equal(big, np.frombuffer(enc.update(bytes(big.size)), np.uint8))
    assert big.flags.writeable


@pytest.mark.parametrize("width", [1, 3, 4, 7])
def test_rows_drawn_alone_are_those_of_the_whole_stream(width):
    seed = new_seed()
    whole = PRG(seed, stream=5).words((40, width))
    rows = np.array([0, 39, 17, 17, 2, 1])
    assert np.array_equal(prg.words_at(seed, 5, rows, width), whole[rows])
    assert not np.array_equal(prg.words_at(seed, 6, rows, width), whole[rows])  # the stream number counts
