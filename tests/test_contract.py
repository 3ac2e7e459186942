"""Contractions lowered to matrix products (contract.py): Σ_k P(p, k)·Q(k, q) in a batch loss, in
its forward and in the adjoints reverse mode derives, becomes a BLAS product in the CPU kernel
(row blocks over the cores, _dot, or np.dot whole).

The recognizer is checked on sympy forms; the kernels that take the path (ntxent, a user's
InfoNCE of N queries against M keys, so non-square products) against numpy references with
gradients derived by hand, on shapes down to N = 1 and D = 1, in float32 and float64; and a
kernel calling np.dot loads from the disk cache in a later process without compiling.
"""
import sys

import numpy as np
import pytest
import sympy as sp

import lossdsl
from lossdsl import api, jit
from lossdsl.contract import merge_transposed, products
from lossdsl.primitives import Sum
from test_embedding_losses import ref_ntxent

i, j, d, m = (sp.Symbol(n, integer=True) for n in "ijdm")
N, D = sp.Symbol("N", integer=True, positive=True), sp.Symbol("D", integer=True, positive=True)
u, ds, a, b = (sp.Function(n, real=True) for n in ("u", "ds", "a", "b"))
tau = sp.Symbol("tau", positive=True)


def found(e, order=()):
    return [(p.p, p.q, p.left, p.right) for p in products(e, lambda s: s.is_integer and s not in (N, D), order)]


def test_recognizes_products_and_their_adjoint_forms():
    # s[i, j] = Σ_d u[i, d]·u[j, d]/τ: the 1/τ is outside the sum, the product u·uᵀ inside
    assert found(Sum(d, D, u(i, d) * u(j, d), sp.true) / tau, (i, j)) == [(i, j, u(i, d), u(j, d))]
    # the adjoint Σ_i d_s[i, m]·u[i, d] (d_sᵀ·u), rows in the order of the map's indices
    assert found(Sum(i, N, ds(i, m) * u(i, d), sp.true), (m, d)) == [(m, d, ds(i, m), u(i, d))]
    # elementwise factors of one side stay with that side: (a[i, d] - 1)·b[j, d]²
    assert found(Sum(d, D, (a(i, d) - 1) * b(j, d) ** 2, sp.true), (i, j)) == [(i, j, a(i, d) - 1, b(j, d) ** 2)]


def test_merges_a_product_and_its_transpose():
    # Σ_i ds[i, m]·u[i, d] + Σ_j ds[m, j]·u[j, d] = Σ_j (ds[m, j] + ds[j, m])·u[j, d]
    e = merge_transposed(Sum(i, N, ds(i, m) * u(i, d), sp.true) + Sum(j, N, ds(m, j) * u(j, d), sp.true))
    assert e == Sum(i, N, (ds(m, i) + ds(i, m)) * u(i, d), sp.true)
    assert found(e, (m, d)) == [(m, d, ds(m, i) + ds(i, m), u(i, d))]
    # other right factors, sizes or a factor of one index pair only: left as they are
    for e in (Sum(i, N, ds(i, m) * u(i, d), sp.true) + Sum(j, N, ds(m, j) * a(j, d), sp.true),
              Sum(i, N, ds(i, m) * u(i, d), sp.true) + Sum(j, D, ds(m, j) * u(j, d), sp.true),
              Sum(i, N, ds(i, m) * u(i, d), sp.true) + Sum(j, N, b(m, j) * u(j, d), sp.true)):
        assert merge_transposed(e) == e


@pytest.mark.parametrize("e", [
    Sum(d, D, a(i, d) * b(i, d), sp.true),                      # one free index: a row reduction
    Sum(d, D, a(i, j, d) * b(j, d), sp.true),                   # a factor of both free indices
    Sum(d, D, a(i, d) * b(j, d), sp.Ne(d, i)),                  # a filtered sum
    Sum(d, D, a(i, d) + b(j, d), sp.true),                      # not a product
], ids=["row", "coupled", "filtered", "sum"])
def test_rejects_what_is_not_a_matrix_product(e):
    assert found(e) == []


CROSS_NCE = """
loss cross_nce "InfoNCE of N queries against M keys"
  batch  N
  input  q[N, D], k[M, D]
  target pos[N] : class(M)
  param  tau = 0.2 : positive
  s[i, j] = sum[d] q[i, d] * k[j, d] / tau
  loss = mean[i] (logsumexp[j] s[i, j] - s[i, pos[i]])
"""


def ref_cross_nce(q, k, pos, tau=0.2):
    """mean_i (logsumexp_j s_ij - s_i,pos_i), s = q·kᵀ/τ; dL/ds = (softmax - onehot)/N by hand."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = q.shape[0]
    s = q @ k.T / tau
    mx = s.max(1, keepdims=True)
    e = np.exp(s - mx)
    loss = np.mean(mx[:, 0] + np.log(e.sum(1)) - s[np.arange(n), pos])
    g = e / e.sum(1, keepdims=True)
    g[np.arange(n), pos] -= 1
    g /= n
    return loss, (g @ k / tau, g.T @ q / tau)


@pytest.fixture(scope="module")
def cross_nce():
    return lossdsl.compile(CROSS_NCE)["cross_nce"]


def close(got, want, dtype):
    rtol, atol = (2e-5, 1e-6) if dtype == np.float32 else (1e-12, 1e-14)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def test_kernels_take_the_gemm_path(cross_nce):
    # forward s = q·kᵀ, adjoints d_s·k and d_sᵀ·q: no triple loop left; row blocks over the
    # cores (_dot) where the left operand is C-contiguous, d_sᵀ·q whole (np.dot). ntxent: u·uᵀ/τ
    # (a Gram product), and its adjoint (d_sᵀ·u + d_s·u)/τ as one product (d_s + d_sᵀ)·u, d_s
    # symmetrized in place; each divided by τ in its helper's blocks, not by a pass of its own
    src = cross_nce.source(dtype="float64").split("def kernel")[1]
    assert src.count(" _dot(") == 2 and src.count("np.dot(") == 1 and "_symadd(" not in src, src
    src = lossdsl.load("ntxent").source(dtype="float64").split("def kernel")[1]
    assert src.count(" _gram(") == 1 and src.count(" _dot(") == 1 and "np.dot(" not in src, src
    assert " = _gram(L0, p0)" in src and " = _dot(D0, L0, p0)" in src and "/(p0))" not in src, src  # Σ/τ divided
    assert src.count("_symadd(D") == 1, src


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [63, 64, 65, 130, 200])
def test_ntxent_over_many_tiles_matches_numpy(dtype, n):
    # u·uᵀ by blocks of 128 rows (_gram), d_s + d_sᵀ by pairs of 64 x 64 tiles (_symadd): batches
    # across the edges of both, positives in other tiles and on the row itself
    rng = np.random.default_rng(n)
    z = rng.normal(size=(n, 16)).astype(dtype)
    pos = (np.arange(n) + rng.integers(1, n, n)) % n
    pos[::7] = np.arange(n)[::7]
    v, (g,) = lossdsl.load("ntxent").value_and_grad(z, pos, tau=0.3)
    want, (wg,) = ref_ntxent(z, pos, tau=0.3)
    close(v, want, dtype)
    close(g, wg, dtype)


def test_the_gradient_reads_a_local_where_the_chain_rule_wrote_it_out():
    # ntxent's gradient of z holds u = z/‖z‖ written out (unit(z(m, d), ‖z(m)‖, ...)) 3 times per element;
    # the kernel reads u's buffer there: unit(z...) is computed once, in the forward pass that stores u
    # (the reference tests of ntxent check the gradient's values)
    from lossdsl.contract import read_locals
    c = lossdsl.load("ntxent")._compiled_for(())
    _, u_fn, _, _, body = c.locals[0]
    z_fn = body.args[0].func            # u = unit(z(i, d), ...)
    g = c.grads["z"][0]
    assert any(a.args[0].func == z_fn for a in g.atoms(type(body))) and not g.has(u_fn)
    read = read_locals(g, c.locals)
    assert read.has(u_fn) and not any(a.args[0].func == z_fn for a in read.atoms(type(body)))
    src = lossdsl.load("ntxent").source(dtype="float64").split("def kernel")[1]
    assert src.count("_unit(a0[") == 1, src


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_a_gram_matrix_takes_half_the_products(dtype):
    # _gram(a, d) = a·aᵀ/d (float64: from the block-lower triangle and its mirror, exactly symmetric;
    # float32: _dot's full product), each element within the rounding bound of a dot product
    # (dim·ε·|a_i|·|a_j|) and then divided, with edge blocks (n not a multiple of 128) and a single row
    import numba
    from lossdsl.cpu_runtime import _gram

    @numba.njit
    def gram(a, d):
        return _gram(a, d)
    rng = np.random.default_rng(3)
    for n, dim in [(1, 3), (127, 5), (128, 16), (129, 2), (300, 64), (1000, 7)]:
        a = rng.normal(size=(n, dim)).astype(dtype)
        g = gram(a, dtype(1.0))
        assert g.dtype == dtype and (dtype == np.float32 or np.array_equal(g, g.T))
        a64 = a.astype(np.float64)
        bound = dim * np.finfo(dtype).eps * (np.abs(a64) @ np.abs(a64).T)
        assert np.all(np.abs(g - a64 @ a64.T) <= bound), (n, dim)
        assert np.array_equal(gram(a, dtype(0.3)), g / dtype(0.3))      # divided as it is copied


def test_matrix_products_run_on_one_blas_thread_and_the_count_is_put_back():
    # OpenBLAS's threads next to numba's spinning workers: ntxent 15.8 ms -> 6.3 ms on 2 cores
    from lossdsl import blas
    libs = blas._libraries()
    assert libs, "no BLAS library found: numba's np.dot would run unlimited"
    before = [lib.get_num_threads() for lib in libs]
    seen = blas.one_thread(lambda: [lib.get_num_threads() for lib in libs])()
    assert seen == [1] * len(libs) and [lib.get_num_threads() for lib in libs] == before
    with pytest.raises(ZeroDivisionError):                # put back when the kernel raises, too
        blas.one_thread(lambda: 1 / 0)()
    assert [lib.get_num_threads() for lib in libs] == before
    from numba.core.dispatcher import Dispatcher                # the wrapper only where np.dot is
    assert isinstance(lossdsl.load("ntxent").kernel("float32").__wrapped__, Dispatcher)
    assert isinstance(lossdsl.load("mse").kernel("float32"), Dispatcher)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,mk,dim", [(1, 1, 1), (1, 3, 2), (4, 2, 1), (5, 7, 3), (9, 4, 6), (3, 37, 2)])
def test_cross_nce_matches_numpy(cross_nce, dtype, n, mk, dim):
    rng = np.random.default_rng(n * 100 + mk * 10 + dim)
    q, k = rng.normal(size=(n, dim)).astype(dtype), rng.normal(size=(mk, dim)).astype(dtype)
    pos = rng.integers(0, mk, n)
    v, (gq, gk) = cross_nce.value_and_grad(q, k, pos, tau=0.7)
    want, (wq, wk) = ref_cross_nce(q, k, pos, tau=0.7)
    assert gq.dtype == dtype and gk.shape == k.shape
    close(v, want, dtype)
    close(gq, wq, dtype)
    close(gk, wk, dtype)


def test_cross_nce_ties_and_nan(cross_nce):
    """The row logsumexps run in 16 lanes (emit.lane_loops): equal maxima spread over lanes and a
    row longer than the lanes give the reference; a NaN input gives a NaN value."""
    rng = np.random.default_rng(5)
    q, k = rng.normal(size=(3, 2)), np.tile(rng.normal(size=(1, 2)), (41, 1))
    k[[3, 20, 35]] = 2 * k[0]                  # three equal maxima (or minima) in lanes 3, 4 and 3
    pos = np.array([0, 20, 40])
    v, (gq, gk) = cross_nce.value_and_grad(q, k, pos)
    want, (wq, wk) = ref_cross_nce(q, k, pos)
    close(v, want, np.float64)
    close(gq, wq, np.float64)
    close(gk, wk, np.float64)
    q[1, 0] = np.nan
    assert np.isnan(cross_nce(q, k, pos))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n,dim", [(2, 1), (2, 3), (3, 1), (7, 5), (16, 3), (35, 2), (64, 3), (130, 4), (257, 2)])
def test_ntxent_matches_numpy(dtype, n, dim):
    rng = np.random.default_rng(n * 10 + dim)
    z = rng.normal(size=(n, dim)).astype(dtype)
    pos = (np.arange(n) + rng.integers(1, n, n)) % n
    v, (g,) = lossdsl.load("ntxent").value_and_grad(z, pos, tau=0.3)
    want, (wg,) = ref_ntxent(z, pos, tau=0.3)
    close(v, want, dtype)
    close(g, wg, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_ntxent_positive_on_the_diagonal(dtype):
    """d_s's points (render_cpu._points), written after the loop of its generic e^(s - lse)/N: the
    diagonal l = m and the positive l = pos(m), here the same element on some rows."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(70, 3)).astype(dtype)
    pos = (np.arange(70) + 1) % 70
    pos[::3] = np.arange(70)[::3]
    v, (g,) = lossdsl.load("ntxent").value_and_grad(z, pos)
    want, (wg,) = ref_ntxent(z, pos)
    close(v, want, dtype)
    close(g, wg, dtype)


def test_kernel_calling_np_dot_loads_from_the_disk_cache(cross_nce):
    """A kernel calling BLAS through np.dot is cached by numba like any other: after this process
    forgets it, the next call loads it from disk and compiles nothing."""
    q, k, pos = np.ones((2, 3)), np.eye(4, 3), np.array([1, 3])
    f = cross_nce
    for _ in range(2):
        v, _ = f.value_and_grad(q, k, pos)
        close(v, ref_cross_nce(q, k, pos)[0], np.float64)
        jit._loaded.clear()
        api._load_cached.cache_clear()
        for name in [m for m in sys.modules if m.startswith("lossdsl_kernels.")]:
            del sys.modules[name]
        f = lossdsl.compile(CROSS_NCE)["cross_nce"]
    f.value_and_grad(q, k, pos)
    stats = f.kernel("float64").__wrapped__.stats         # the dispatcher under blas.one_thread
    assert (sum(stats.cache_hits.values()), sum(stats.cache_misses.values())) == (1, 0)
