"""buffers.empty: large arrays reuse released memory, and only released memory."""
import numpy as np

from lossdsl import buffers

N = buffers.LARGE // 4      # float32 elements in the smallest leased array


def test_memory_comes_back_only_when_the_last_view_is_gone():
    a = buffers.empty((2, N), np.float32)
    a[:] = 1.0
    ptr, row = a.ctypes.data, a[1]
    del a
    b = buffers.empty((2, N), np.float32)           # a view of a still lives: new memory
    assert b.ctypes.data != ptr
    b[:] = 2.0
    assert np.all(row == 1.0)
    del row
    c = buffers.empty((N, 2), np.float32)           # same size, any shape
    assert c.ctypes.data == ptr and c.shape == (N, 2) and c.dtype == np.float32


def test_other_sizes_and_small_arrays_get_their_own_memory():
    a = buffers.empty((N,), np.float64)
    ptr = a.ctypes.data
    del a
    assert buffers.empty((N,), np.float32).ctypes.data != ptr        # half the size
    small = buffers.empty(10, np.float32)                            # an int shape, as np.empty's
    assert small.base is None and small.shape == (10,)                # plain np.empty
    assert buffers.empty(N, np.float32).shape == (N,)


def test_kept_blocks_are_bounded():
    leased = [buffers.empty((N + i,), np.float32) for i in range(buffers.KEEP + 3)]
    del leased
    assert len(buffers._free) <= buffers.KEEP
