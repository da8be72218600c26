import ctypes
import ctypes.util
import platform

import numpy as np
import pytest

from puma_onnx.runtime import launch


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_below_32_mb_come_back_from_the_heap():
    assert launch.keep_freed_memory()
    # With the heap kept, a freed 16 MB block is handed out again at the same address (glibc would
    # otherwise map a fresh region for it: a new address and its pages faulted and zeroed again).
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    first = libc.malloc(16 << 20)
    libc.free(first)
    second = libc.malloc(16 << 20)
    libc.free(second)
    assert first == second
    a = np.ones(2 << 20)  # numpy still works on the heap's blocks
    assert a.sum() == 2 << 20
