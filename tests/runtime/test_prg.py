import numpy as np

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
