"""What every generated CPU module imports (render_cpu): the thread-count intrinsics of its kernel
and a batch kernel's parallel helpers. Compiled once per process and signature, not once per
module (a batch kernel spent 3 of its 10 s of compile on its own copies of _dot and _symadd);
a generated module names this file's hash, so a kernel cached with older helpers is not reused."""
import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# numba.set_num_threads inside a kernel holds a ctypes function as a global, and numba does not
# cache such kernels; the threading layer's C functions, called by name as numba's own parallel
# loops do, keep the kernel cacheable. numba.get_num_threads() at import registers those names.
def _get_threads(builder):
    get = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(cgutils.intp_t, []),
                                         "get_num_threads")     # declared as numba's parfors do
    return builder.call(get, [])


@intrinsic
def _swap_threads(typingctx, n):
    def codegen(context, builder, sig, args):
        old = _get_threads(builder)
        put = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [
            llvm_ir.IntType(32)]), "set_num_threads")              # C: void set_num_threads(int)
        builder.call(put, [builder.trunc(args[0], llvm_ir.IntType(32))])
        return old
    return types.int64(types.int64), codegen


@intrinsic
def _num_threads(typingctx):
    return types.int64(), lambda context, builder, sig, args: _get_threads(builder)


numba.get_num_threads()


# A + Aᵀ of a square matrix, in place: the left operand of a product that merge_transposed made
# of two (ntxent's adjoint of u, d_s·u + d_sᵀ·u: one gemm, not two). Tiles (I, J) and (J, I) are
# read before either is written, the mirror through a tile-sized scratch (row-wise reads and
# writes of the big matrix; 2.8x faster than pairs a[i, j], a[j, i] element by element); tile
# rows I and t-1-I go to one thread, so the triangle's work splits evenly.
@numba.njit(parallel=True, error_model="numpy", nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _symadd(a):
    n = a.shape[0]
    t = (n + 63) // 64
    for q in numba.prange((t + 1) // 2):
        tile = np.empty((64, 64), a.dtype)
        for h in range(2):
            I = np.int64(q) if h == 0 else t - 1 - np.int64(q)
            if h == 1 and I == q:
                continue
            i0 = I * 64
            ni = min(64, n - i0)
            for J in range(I, t):
                j0 = J * 64
                nj = min(64, n - j0)
                for jj in range(nj):
                    for ii in range(ni):
                        tile[ii, jj] = a[j0 + jj, i0 + ii]
                for ii in range(ni):
                    for jj in range(nj):
                        v = a[i0 + ii, j0 + jj] + tile[ii, jj]
                        a[i0 + ii, j0 + jj] = v
                        tile[ii, jj] = v
                for jj in range(nj):
                    for ii in range(ni):
                        a[j0 + jj, i0 + ii] = tile[ii, jj]


@numba.njit(error_model="numpy", nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _divide(m, d):
    # m/d in place (a block just multiplied, still in cache), as the division pass it replaces; x/1 is x
    if d != 1:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                m[i, j] = m[i, j] / d


# A·B/d over the cores: each of numba's threads multiplies a block of A's rows on one BLAS thread
# (blas.py: OpenBLAS's own threads next to numba's spinning workers ran slower) and divides it (a
# product over a param, ntxent's (d_s + d_sᵀ)·u/τ: no pass of its own). Row blocks of a
# C-contiguous A and of the result stay contiguous, so BLAS takes them without a copy: ntxent
# 1024 x 128 float64 on 2 cores, u·uᵀ 4.35 -> 2.04 ms and d_s·u 4.48 -> 2.36 ms. A transposed A
# (an F-contiguous operand) has no contiguous row blocks: np.dot takes it whole.
@numba.njit(parallel=True, error_model="numpy", nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _dot(a, b, d):
    n = a.shape[0]
    out = np.empty((n, b.shape[1]), a.dtype)
    t = _num_threads()
    step = (n + t - 1) // t
    for c in numba.prange(t):
        r0 = c * step
        r1 = min(n, r0 + step)
        if r0 < r1:
            np.dot(a[r0:r1], b, out[r0:r1])
            _divide(out[r0:r1], d)
    return out


# A·Aᵀ/d (a Gram matrix: ntxent's u·uᵀ/τ) from half the products: each block of 128 rows is
# multiplied by the rows up to its own last one into a scratch panel, whose lower triangle is divided
# as it is copied to its place (a pass of _divide first took 0.4 ms more) and, transposed, to the
# mirror place: exactly symmetric (np.dot's need not be). Block rows I and t-1-I go to one thread (equal areas). ntxent 1024 x 128 float64:
# u·uᵀ 1.9 -> 1.64 ms. Float32 takes _dot's full product: there the copies cost more than half
# the product saves.
@numba.njit(parallel=True, error_model="numpy", nogil=True, no_cpython_wrapper=True, no_cfunc_wrapper=True)
def _gram(a, d):
    if a.itemsize < 8:
        return _dot(a, a.T, d)
    n = a.shape[0]
    out = np.empty((n, n), a.dtype)
    t = (n + 127) // 128
    for q in numba.prange((t + 1) // 2):
        for h in range(2):
            I = np.int64(q) if h == 0 else t - 1 - np.int64(q)
            if h == 1 and I == q:
                continue
            r0 = I * 128
            r1 = min(n, r0 + 128)
            panel = np.empty((r1 - r0, r1), a.dtype)
            np.dot(a[r0:r1], a[:r1].T, panel)
            for i in range(r1 - r0):
                for j in range(r0 + i + 1):
                    v = panel[i, j] / d
                    out[r0 + i, j] = v
                    panel[i, j] = v
            for j in range(r1):
                for i in range(max(0, j - r0 + 1), r1 - r0):
                    out[j, r0 + i] = panel[i, j]
    return out
