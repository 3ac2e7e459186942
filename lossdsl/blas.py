"""Kernels with matrix products run them on one BLAS thread.

A batch kernel's matrix products (contract.py) are np.dot calls, which numba hands to scipy's
OpenBLAS. OpenBLAS's threads then compete for the cores with numba's OpenMP workers, which spin
for a while after each parallel loop: ntxent 1024 x 128 float32 on 2 cores took 15.8 ms with
both pools, 6.3 ms with OpenBLAS on one thread (7.1 ms with numba's workers sleeping at once,
OMP_WAIT_POLICY=PASSIVE; 6.9 ms with everything on one thread). The limit holds only during the
kernel call and is put back after it (about 4 µs); threadpoolctl finds the BLAS libraries
loaded in this process (numpy's and scipy's OpenBLAS), once.
"""
from functools import lru_cache, wraps


@lru_cache(maxsize=1)
def _libraries():
    import scipy.linalg.cython_blas  # noqa: F401 - numba's np.dot calls its OpenBLAS: loaded before the search
    from threadpoolctl import ThreadpoolController
    return ThreadpoolController().select(user_api="blas").lib_controllers


def one_thread(kernel):
    """``kernel`` with every BLAS library of the process limited to one thread while it runs."""
    @wraps(kernel)
    def run(*args):
        libs = _libraries()
        before = [lib.get_num_threads() for lib in libs]
        for lib in libs:
            lib.set_num_threads(1)
        try:
            return kernel(*args)
        finally:
            for lib, n in zip(libs, before):
                lib.set_num_threads(n)
    return run
