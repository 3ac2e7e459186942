"""Large result arrays whose memory is reused once released.

A fresh large array costs a page fault per page, and the OS zeroes every page before the kernel
writes it: 25-30% of a large loss call (cross_entropy 16384 x 1000 float32: 24.8 ms into fresh
arrays, 18.6 ms into arrays used before; bce 2^24 0.82x, triplet 65536 x 128 0.70x; measured on 2
cores). A training loop releases each step's gradient (``optimizer.zero_grad()``, ``.grad = None``)
before the next step makes one of the same size, so that step can write into the same memory;
so does a loop over ``Loss.value_and_grad`` that drops the last step's arrays (every CPU call's
large results come from here: api._run_host).

``empty(shape, dtype)`` is ``np.empty`` whose memory, for arrays of ``LARGE`` bytes and more, is
leased: the array's base is a ``_Lease``, and views, tensors (``torch.from_numpy``) and arrays
made from them all keep the lease alive. Only when the last of them is gone does ``__del__`` put
the memory back for the next ``empty`` of that size, so nothing is reused while anything can
still see it.
"""
import math
import threading

import numpy as np

LARGE = 1 << 22     # bytes: smaller arrays come from malloc's own free lists, already reused
KEEP = 8            # released blocks kept (the oldest goes back to the system): a step's results
KEEP_BYTES = 1 << 30    # and at most this much memory held for reuse (one huge call is not kept)

_free = []          # released blocks (uint8 arrays), most recent last
_lock = threading.RLock()   # reentrant: a lease may be collected while empty() holds it


class _Lease:
    """The base of a leased array: hands its block back when the last array on it is gone."""

    def __init__(self, block, shape, dtype):
        self._block = block
        self.__array_interface__ = {"data": (block.ctypes.data, False), "shape": shape,
                                    "typestr": dtype.str, "version": 3}

    def __del__(self, free=_free, lock=_lock):     # bound now: module globals may be gone at exit
        with lock:
            free.append(self._block)
            del free[:-KEEP]
            while sum(b.nbytes for b in free) > KEEP_BYTES:
                del free[0]


def empty(shape, dtype):
    """An uninitialized C-contiguous array, in released memory of the same size when there is some."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else shape
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size < LARGE:            # first and cheap: small calls are the ones where a microsecond shows
        return np.empty(shape, dtype)
    shape = tuple(int(n) for n in shape)
    with _lock:
        i = next((i for i in range(len(_free) - 1, -1, -1) if _free[i].nbytes == size), None)
        block = None if i is None else _free.pop(i)
    if block is None:
        block = np.empty(size, np.uint8)
    return np.asarray(_Lease(block, shape, dtype))
