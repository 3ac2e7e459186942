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
    assert sum(b.nbytes for b in buffers._free) <= buffers.KEEP_BYTES


def test_a_released_block_over_the_byte_bound_is_not_kept(monkeypatch):
    monkeypatch.setattr(buffers, "KEEP_BYTES", 3 * buffers.LARGE)
    kept = [buffers.empty((N,), np.float32) for _ in range(2)]
    big = buffers.empty((2 * N,), np.float32)
    del kept, big                                   # 4 LARGE released: the oldest goes
    assert sum(b.nbytes for b in buffers._free) <= 3 * buffers.LARGE


def test_the_numpy_api_reuses_the_memory_of_dropped_gradients():
    import lossdsl
    mse = lossdsl.load("mse")
    x, y = np.ones(N, np.float32), np.zeros(N, np.float32)
    _, (g,) = mse.value_and_grad(x, y)
    ptr, held = g.ctypes.data, g
    del g
    _, (g2,) = mse.value_and_grad(x, y)             # the first gradient is still held: new memory
    assert g2.ctypes.data != ptr and np.all(held == 2.0 / N)
    released = {ptr, g2.ctypes.data}
    del held, g2
    _, (g3,) = mse.value_and_grad(x, y)              # both released: one of them is taken
    assert g3.ctypes.data in released
    base = g3
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, buffers._Lease)         # from buffers.empty, not np.empty's malloc
    np.testing.assert_allclose(g3, 2.0 / N)


def test_small_calls_hand_out_new_results_each_time():
    """A signature's kernel arguments are decided once (api._Host, shared size-0 placeholders for
    what a call does not want); the results a call returns are still its own arrays."""
    import lossdsl
    ce = lossdsl.load("cross_entropy")
    z = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    y = np.array([0, 2, 1, 2])
    v1 = ce(z, y, reduction="none")                  # value only, then value and gradient
    v2, (g2,) = ce.value_and_grad(z, y, reduction="none")
    v3, (g3,) = ce.value_and_grad(z * 2, y, reduction="none")
    assert not np.shares_memory(v1, v2) and not np.shares_memory(v2, v3) and not np.shares_memory(g2, g3)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))        # numpy reference, after the later calls
    np.testing.assert_allclose(v1, -logp[np.arange(4), y], rtol=1e-6)
    np.testing.assert_allclose(v2, v1, rtol=0)
    np.testing.assert_allclose(g2, np.exp(logp) - np.eye(3)[y], rtol=1e-5, atol=1e-7)
    mean, (gm,) = ce.value_and_grad(z, y)             # the mean's scale, decided once, is 1/4
    np.testing.assert_allclose(mean, v1.mean(), rtol=1e-6)
    np.testing.assert_allclose(gm, g2 / 4, rtol=1e-6)


def test_the_mean_over_kept_rows_is_not_decided_once():
    """With ignore_index the mean's denominator depends on the targets: two calls of one signature
    with different numbers of ignored rows each divide by their own count."""
    import lossdsl
    ce = lossdsl.load("cross_entropy")
    z = np.linspace(-1, 1, 12).reshape(4, 3)
    per = ce(z, np.array([0, 1, 2, 0]), reduction="none")
    for y, kept in ((np.array([0, 1, 2, -1]), [0, 1, 2]), (np.array([0, -1, -1, 0]), [0, 3])):
        value, (g,) = ce.value_and_grad(z, y, ignore_index=-1)
        np.testing.assert_allclose(value, per[kept].mean(), rtol=1e-12)
        assert np.all(g[y == -1] == 0)
