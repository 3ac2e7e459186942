"""The CUDA back end (render_cuda.py, cuda_dispatch.py), with no GPU.

Two halves:

* Under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, which must be set before
  ``numba.cuda`` is first imported, so the normal test process runs this file again in a child
  process with it set): every library loss's CUDA kernels agree with its CPU kernels, value and
  every gradient, float32 and float64, reductions none / mean / sum, ``weight``,
  ``ignore_index``, rows longer than one block (32 threads here), ``-inf`` masked and extreme
  logits; bad input on the device path raises ``LossError`` subclasses. And accuracy: every
  library loss's CUDA kernels on a small sample of the accuracy audit's points (all three
  samplers), against the exact evaluator, with the bounds of test_accuracy.py.
* In the normal process: every generated kernel compiles to PTX with ``numba.cuda.compile_ptx``
  (NVIDIA's NVVM, from the ``nvidia-nvvm`` wheel, no driver needed) for float32 and float64,
  and float32 kernels do no float64 arithmetic besides the float64 batch total. Skipped with the
  reason where numba-cuda or NVVM is not installed.
"""
import importlib.util
import os
import re
import subprocess
import sys
import types as pytypes

import numpy as np
import pytest

import lossdsl

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if SIM:
    # The simulator runs a block as one Python thread per CUDA thread while the launching thread
    # polls them; at the default 5 ms GIL switch interval every barrier waits for switches. At
    # 0.2 ms the simulated kernels run 2.5-3x faster (wall and CPU time, measured).
    sys.setswitchinterval(2e-4)

    def _serialize_shared_arrays():
        """The simulator hands a block's threads one shared array by looking it up by the calling
        line and inserting it when missing, with no lock (numba-cuda 0.x FakeCUDAShared.array):
        two threads switched out between the lookup and the insert get different arrays, and a
        block reduction then reads np.empty garbage (cross_entropy float64 counted a bad target
        in 1 run of 6 at this switch interval). Same lookup, under a lock; the frame is read
        directly instead of through traceback.extract_stack."""
        import threading
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
        from numba.cuda import types
        from numba.cuda.np import numpy_support
        lock, original = threading.Lock(), FakeCUDAShared.array

        def array(self, shape, dtype, alignment=None):
            if shape == 0 or alignment is not None:         # dynamic shared memory: no lookup
                return original(self, shape, dtype, alignment)
            caller = sys._getframe(1)
            key = (caller.f_code.co_filename, caller.f_lineno)
            with lock:
                res = self._allocations.get(key)
                if res is None:
                    dt = numpy_support.as_dtype(dtype) if isinstance(dtype, types.Type) else dtype
                    res = self._allocations[key] = np.empty(shape, dt)
            return res
        FakeCUDAShared.array = array
    _serialize_shared_arrays()
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_sim = pytest.mark.skipif(not SIM, reason="runs inside the simulator child process (test_simulator_suite)")
needs_parent = pytest.mark.skipif(SIM, reason="runs in the normal test process")

_LOSSES = {}

# What the library's kernels leave out of the printer's entries and helpers (min, min[k], cosh,
# sinh, log, a real power): compiled to PTX with them.
EVERY = "every_primitive"
EVERY_TEXT = f'''
loss {EVERY} "the primitives no library loss uses"
  input z[K], u
  param q = 0.7 : positive
  loss = cosh(u) + sinh(u) + min(u, 1) + abs(u)^q + log(abs(u) + 2) - min[k] z[k]
'''


def load(name):
    if name not in _LOSSES:
        _LOSSES[name] = lossdsl.compile(EVERY_TEXT)[EVERY] if name == EVERY else lossdsl.load(name)
    return _LOSSES[name]


# --------------------------------------------------------------------------------------
# The normal process: launch the simulator half, compile to PTX
# --------------------------------------------------------------------------------------

@needs_parent
def test_simulator_suite():
    """Run this file under the simulator in a child process; its report is the failure message."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed (pip install 'lossdsl[cuda]')")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.setdefault("LOSSDSL_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "lossdsl"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
                           "ignore::RuntimeWarning", os.path.abspath(__file__)],
                          env=env, capture_output=True, text=True, timeout=1800)
    report = (proc.stdout + proc.stderr)[-12000:]
    assert proc.returncode == 0, "simulator suite failed:\n" + report
    assert re.search(r"\d+ passed", report), report
    print(report.strip().splitlines()[-1])


def _ptx_setup(monkeypatch):
    """numba.cuda without the simulator and a way to compile to PTX, or a skip with the reason."""
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed (pip install 'lossdsl[cuda]')")
    from numba import cuda, types
    import numba.cuda.dispatcher as dispatcher
    # Calling a @cuda.jit(device=True) function from a kernel asks the current device for its
    # compute capability even in compile_ptx, which needs no device otherwise (numba PR 8387
    # fixed this for kernels only): answer for the device we compile for.
    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: pytypes.SimpleNamespace(compute_capability=(8, 0)))

    def probe(x):
        x[0] = 1.0
    try:
        cuda.compile_ptx(probe, (types.float32[::1],), cc=(8, 0))
    except Exception as e:  # NVVM missing: the wheels are nvidia-nvvm / numba-cuda[cu13]
        pytest.skip(f"compile_ptx cannot run here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                    f"install numba-cuda[cu13] for NVVM")
    return cuda, types


def _signature(loss, dtype, types):
    """Argument types of the kernel of ``loss`` (arrays not wanted are passed empty: one signature)."""
    from lossdsl import render_cuda
    from lossdsl.render_cpu import Signature
    sig = Signature(loss._c)
    F = types.float32 if dtype == "float32" else types.float64
    lead = 0 if sig.batch else 1

    def arr(t, d):
        return types.Array(t, max(1, len(d.axes) + lead), "C")
    out = [arr(F, d) for d in sig.inputs]
    out += [arr(types.int64 if d.domain.name == "class" else F, d) for d in sig.targets]
    out += [F] * len(sig.params) + [types.int64] * len(sig.sizes)
    out += [types.Array(F, 1, "C")] * 2 + [arr(F, d) for d in sig.inputs]
    out += [types.Array(F, len(axes), "C") for _, _, axes in render_cuda.buffers(loss._c)]
    out += [types.Array(types.float64, 1, "C"), types.Array(F, 1, "C"), types.int64, types.int64]
    out += [types.boolean] * 3 + ([types.int64] if sig.batch else [])
    return tuple(out)


# float64 work a float32 kernel may do: the float64 batch total (load, add, atomic add, compare)
# and, once, in the last block, the mean (div)
F64_ALLOWED = {"add", "sub", "cvt", "mov", "ld", "st", "atom", "setp", "selp", "neg", "abs", "div"}


@needs_parent
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", lossdsl.names() + [EVERY])
def test_kernels_compile_to_ptx(name, dtype, monkeypatch):
    cuda, types = _ptx_setup(monkeypatch)
    from lossdsl import jit
    loss = load(name)
    mod = jit.load_module(loss.source("cuda", dtype))
    ptx, _ = cuda.compile_ptx(mod.kernel.py_func, _signature(loss, dtype, types), cc=(8, 0))
    assert ".entry" in ptx
    if dtype == "float32":
        ops = {m.group(1) for m in re.finditer(r"\b([a-z]+)(?:\.[a-z0-9]+)*\.f64\b", ptx)}
        assert ops <= F64_ALLOWED, f"float64 arithmetic in a float32 kernel: {sorted(ops - F64_ALLOWED)}"
    f64 = types.Array(types.float64, 1, "C")
    if hasattr(mod, "count_kept"):
        cuda.compile_ptx(mod.count_kept.py_func, (types.Array(types.int64, 1, "C"), types.int64, f64), cc=(8, 0))


@needs_parent
def test_cuda_source_is_written_through_the_cache(tmp_path, monkeypatch):
    from lossdsl import jit
    monkeypatch.setenv("LOSSDSL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(jit, "_loaded", {})          # other tests may have imported it already
    src = load("cross_entropy").source("cuda", "float32")
    assert "@cuda.jit" in src and "range(tid, " in src and "_bsum(" in src
    assert "_expdiff(" in src and "_bargmax(" in src          # the CPU's softmax forms (emit.gradient_plan)
    assert "F = np.float32" in src and "cuda.atomic.add(res, 0, total)" in src
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    mod = jit.load_module(src)
    files = list(tmp_path.glob("k_*.py"))
    assert len(files) == 1 and files[0].read_text() == src and hasattr(mod, "kernel")


@needs_parent
def test_host_device_mixing_without_numba_cuda_import():
    """A device-looking argument among host arrays is a clear ArgumentError on any machine."""
    class Fake:
        __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}
        shape, dtype = (4,), np.dtype(np.float32)
    if not HAVE_NUMBA_CUDA:
        pytest.skip("numba-cuda is not installed")
    with pytest.raises(lossdsl.ArgumentError, match="host array"):
        load("mse")(Fake(), np.zeros(4, np.float32))


# --------------------------------------------------------------------------------------
# The simulator half
# --------------------------------------------------------------------------------------

ROWS, K, ELEMS = 4, 40, (4, 25)      # K > 32 threads: rows longer than one block; 3 blocks < ROWS


def _target(rng, decl, shape, axis_size):
    dom = decl.domain.name
    if dom == "class":
        return rng.integers(0, axis_size[decl.domain.axis], size=shape)
    if dom == "unit":
        return rng.random(shape)
    if dom == "binary":
        return (rng.random(shape) > 0.5).astype(np.float64)
    if dom == "sign":
        return np.where(rng.random(shape) > 0.5, 1.0, -1.0)
    if dom == "simplex":
        e = np.exp(rng.standard_normal(shape))
        e[..., 0] = 0.0                        # a zero probability (xlogy at 0)
        return e / e.sum(axis=-1, keepdims=True)
    if dom in ("positive", "nonnegative"):
        return rng.random(shape) + 0.1
    return rng.standard_normal(shape)


def make_args(name, dtype, seed=0):
    """Host arrays for ``name``: (inputs + targets, sample shape)."""
    f = load(name)
    rng = np.random.default_rng(seed)
    batch = f._c.definition.batch
    sizes = {}
    for d in f._inputs + f._targets:
        for a in d.axes:
            sizes.setdefault(a, 6 if batch else (K if not sizes else 7))
    lead = () if batch else ((ROWS,) if any(d.axes for d in f._inputs + f._targets) else ELEMS)
    arrays = []
    for d in f._inputs:
        arrays.append((3 * rng.standard_normal(lead + tuple(sizes[a] for a in d.axes))).astype(dtype))
    for d in f._targets:
        t = _target(rng, d, lead + tuple(sizes[a] for a in d.axes), sizes)
        if batch and d.domain.name == "class":
            t = np.arange(sizes[d.axes[0]]) ^ 1            # SimCLR pairs (0, 1), (2, 3), ...
        arrays.append(t if d.domain.name == "class" else t.astype(dtype))
    return arrays, (() if batch else lead)


def dev(a):
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    rtol, atol = (3e-5, 3e-6) if np.dtype(dtype) == np.float32 else (1e-10, 1e-12)
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what, equal_nan=True)


def agree(name, arrays, dtype, reduction="mean", weight=None, grad=True, **kw):
    """The device result equals the CPU kernels' result, value and every gradient."""
    f = load(name)
    kw = dict(kw, reduction=reduction)
    if weight is not None:
        kw["weight"] = weight
    if grad:
        want, want_g = f.value_and_grad(*arrays, **kw)
    else:
        want, want_g = f(*arrays, **kw), ()
    if weight is not None:
        kw["weight"] = dev(weight)
    dargs = [dev(a) for a in arrays]
    if grad:
        got, got_g = f.value_and_grad(*dargs, **kw)
    else:
        got, got_g = f(*dargs, **kw), ()
    assert hasattr(got, "copy_to_host"), f"{name}: the value is not a device array: {type(got)}"
    close(host(got), want, dtype, f"{name} value ({reduction})")
    for n, g, w in zip(f.inputs, got_g, want_g):
        assert hasattr(g, "copy_to_host") and g.dtype == np.dtype(dtype)
        close(host(g), w, dtype, f"{name} d/d{n} ({reduction})")


# every library loss; params and ignore_index where they apply
SIM_CASES = [(n, {}) for n in lossdsl.names()] + [
    ("bce", {"pos_weight": 2.5}), ("cross_entropy", {"label_smoothing": 0.1, "ignore_index": 2}),
    ("multiclass_hinge", {"margin": 0.5, "ignore_index": 1}), ("focal", {"gamma": 0.5, "alpha": 0.6}),
    ("huber", {"delta": 0.3}), ("ntxent", {"tau": 0.2}), ("vae_elbo", {"beta": 0.5}),
]


def _sim_id(case):
    return case[0] + "".join(f"-{k}={v}" for k, v in case[1].items())


# every loss in both dtypes; the params' variants in float64 alone (a param reaches the device
# the same way in either dtype, and each simulated case costs seconds)
SIM_RUNS = [(c, dt) for c in SIM_CASES for dt in ((np.float64, np.float32) if not c[1] else (np.float64,))]


@needs_sim
@pytest.mark.parametrize("case,dtype", SIM_RUNS,
                         ids=[f"{_sim_id(c)}-{'f64' if dt == np.float64 else 'f32'}" for c, dt in SIM_RUNS])
def test_device_matches_cpu(case, dtype):
    name, params = case
    arrays, sample = make_args(name, dtype, seed=len(name))
    if "ignore_index" in params:                  # make sure some rows are ignored
        cls = next(i for i, d in enumerate(load(name)._inputs + load(name)._targets) if d.domain.name == "class")
        arrays[cls][::2] = params["ignore_index"]
    w = np.linspace(0.5, 2.0, int(np.prod(sample))).reshape(sample).astype(dtype) if sample else None
    agree(name, arrays, dtype, "none", weight=w, **params)
    agree(name, arrays, dtype, "mean", **params)
    agree(name, arrays, dtype, "sum", weight=w, grad=False, **params)   # its gradients are "none"'s


@needs_sim
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_batch_stages_share_the_grid(dtype):
    # ntxent's "map" stages spread over the grid (3 blocks of 32 under the simulator): N = 23 rows
    # of D = 9 give 529 and 207 elements to the flattened (row, column) loops, several per thread
    rng = np.random.default_rng(11)
    z = rng.standard_normal((23, 9)).astype(dtype)
    pos = (np.arange(23) + 5) % 23
    agree("ntxent", [z, pos], dtype, "mean", tau=0.3)


@needs_sim
@pytest.mark.parametrize("name", ["bce", "ntxent"])
def test_results_take_the_array_type_of_the_callers_first_argument(name, monkeypatch):
    # a torch tensor in gives torch tensors out (_like): it must see the caller's first array
    from lossdsl import cuda_dispatch
    seen = []
    monkeypatch.setattr(cuda_dispatch, "_like", lambda x, template: seen.append(template) or x)
    arrays, _ = make_args(name, np.float32)
    first = dev(arrays[0])
    load(name).value_and_grad(first, *[dev(a) for a in arrays[1:]])
    assert len(seen) == 2 and all(t is first for t in seen)


def _logit_rows(dtype):
    """cross-entropy style rows: -inf masks, a row whose only finite logit is the target,
    huge and tiny logits, a NaN; longer than one block."""
    rng = np.random.default_rng(7)
    big = 1e4 if dtype == np.float64 else 1e4
    z = rng.standard_normal((6, K)).astype(dtype)
    y = np.array([3, 0, 39, 5, 7, 1])
    z[0, ::3] = -np.inf                       # masked classes ...
    z[0, 3] = 0.5
    z[1, 1:] = -np.inf                        # every other logit -inf: loss 0, gradient 0
    z[2] *= big                               # extreme logits
    z[3, 10] = big
    z[3, 11] = -big
    z[4] = 1e-30                              # ties everywhere
    z[5, 20] = np.nan                         # NaN gives NaN
    return z, y


@needs_sim
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["cross_entropy", "multiclass_hinge"])
def test_masked_and_extreme_logits(name, dtype):
    z, y = _logit_rows(dtype)
    agree(name, [z, y], dtype, "none")
    v, (g,) = load(name).value_and_grad(dev(z), dev(y), reduction="none")
    v, g = host(v), host(g)
    assert np.isnan(v[5]) and np.all(np.isfinite(v[:5]))
    if name == "cross_entropy":
        assert v[1] == 0 and np.all(g[1] == 0) and np.all(g[0, 6::3] == 0)


@needs_sim
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["soft_cross_entropy", "kl_div", "multilabel_bce"])
def test_masked_and_extreme_rows_with_vector_targets(name, dtype):
    z, _ = _logit_rows(dtype)
    z = z[:5]
    p = np.random.default_rng(3).random(z.shape)
    p[:, 4::4] = 0.0
    if name != "multilabel_bce":
        p[np.isinf(z)] = 0.0                   # no probability on masked classes
        p /= p.sum(axis=1, keepdims=True)
    agree(name, [z, p.astype(dtype)], dtype, "none")


@needs_sim
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_elementwise_extremes(dtype):
    z = np.array([-1e4, -100, -20, -1e-3, 0.0, 1e-3, 20, 100, 1e4, np.inf, -np.inf, np.nan], dtype)
    y = np.array([0, 1, 0, 1, 0.5, 1, 0, 1, 0, 1, 0, 1], dtype)
    agree("bce", [z, y], dtype, "none")
    agree("focal", [z, y], dtype, "none", gamma=0.5)
    agree("log_cosh", [z[:9], (y[:9] * 1e-4).astype(dtype)], dtype, "none")
    agree("gaussian_nll", [z[1:9], z[1:9][::-1].copy(), y[1:9]], dtype, "none")


@needs_sim
def test_empty_batch():
    z = np.zeros((0, K), np.float32)
    y = np.zeros(0, np.int64)
    v = load("cross_entropy")(dev(z), dev(y))
    assert np.isnan(host(v))
    assert host(load("cross_entropy")(dev(z), dev(y), reduction="sum")) == 0
    assert host(load("mse")(dev(np.zeros(0, np.float32)), dev(np.zeros(0, np.float32)))).shape == ()


@needs_sim
def test_integer_and_bool_targets_are_converted_on_the_device():
    z = np.linspace(-3, 3, 50).astype(np.float32)
    for y in (np.arange(50) % 2, (np.arange(50) % 2).astype(bool), (np.arange(50) % 2).astype(np.uint8)):
        agree("bce", [z, y], np.float32, "none")


@needs_sim
@pytest.mark.parametrize("name", ["cross_entropy", "bce", "ntxent"])
def test_launches_on_a_given_stream(name):
    """The torch bridge passes torch's current stream: every launch and copy of a call uses it,
    and the results equal the CPU kernels'."""
    from numba import cuda
    f = load(name)
    arrays, _ = make_args(name, np.float64, seed=3)
    want, want_g = f.value_and_grad(*arrays, reduction="sum")
    stream = cuda.stream()
    got, got_g = f._run([dev(a) for a in arrays], "sum", None, None, {}, True, stream)
    stream.synchronize()
    close(host(got), want, np.float64, f"{name} value on a stream")
    for g, w in zip(got_g, want_g):
        close(host(g), w, np.float64, f"{name} gradient on a stream")


@needs_sim
def test_bad_targets_on_a_given_stream():
    from numba import cuda
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(lossdsl.DomainError, match=r"class index in \[0, 3\); got .*7.* at sample 2"):
        load("cross_entropy")._run([dev(z), dev(np.array([0, 1, 7, 2]))], "mean", None, None, {}, True,
                                   cuda.stream())


# --- accuracy against exact arithmetic (the audit of test_accuracy.py, on the device) ----------

ACC_POINTS = 8                          # per sampler: a sample (the CPU test takes 60-150)
# Left out: triplet, whose value cancels in Σ (n - p)(2a - n - p): on a GPU its float32 terms stay
# float32 (the CPU forms them in float64), and where they overflow the result depends on FMA
# contraction (LLVM and NVVM contract a·b + c, the simulator's numpy does not); ntxent, a batch loss
# (a point costs 5-8 s here) and test_accuracy's expected failure on the CPU too.
ACC_CASES = [n for n in lossdsl.names() if n not in ("ntxent", "triplet")]


@needs_sim
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ACC_CASES)
def test_device_accuracy(name, dtype):
    """The CUDA kernels on a sample of the audit's points (bit patterns, values, adversarial: ±inf,
    huge equal and masked logits, soft labels) against the exact evaluator, within the bounds of
    test_accuracy.py. The softmax losses failed this before the CUDA back end rendered emit's
    gradient plan (the argmax split of the softmax, e^(z - m) with its rounding error put back):
    cross_entropy z p99 15 bits on values (float32), kl_div 59 bits at equal 1e30 logits."""
    import warnings
    from lossdsl.audit import audit
    from lossdsl.inherent import exclusion, violations
    from test_accuracy import SEED, SIZE
    loss = load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rep = audit(loss, dtype, points=ACC_POINTS, seed=SEED, naive=False, size=SIZE, exclude=exclusion(loss),
                    device=True)
    bad = violations(rep, loss)
    assert not bad, f"{name} {dtype}:\n  " + "\n  ".join(bad)


# --- bad input on the device path ----------------------------------------------------------

@needs_sim
def test_class_target_out_of_range_is_caught_on_the_device():
    z = np.random.default_rng(0).standard_normal((ROWS, K)).astype(np.float32)
    for bad in (K, K + 1000, -1):
        y = np.array([1, 2, bad, 3])
        for name in ("cross_entropy", "multiclass_hinge"):
            with pytest.raises(lossdsl.DomainError, match=rf"loss '{name}': target 'y'.*sample 2"):
                load(name).value_and_grad(dev(z), dev(y))
    # an ignored row is not bad, whatever its value
    y = np.array([1, 2, -100, 3])
    load("cross_entropy")(dev(z), dev(y), ignore_index=-100)
    pos = np.array([1, 0, 3, 9, 5, 4])                      # ntxent: a partner outside [0, N)
    zz = np.random.default_rng(1).standard_normal((6, 4))
    with pytest.raises(lossdsl.DomainError, match="loss 'ntxent': target 'pos'"):
        load("ntxent")(dev(zz), dev(pos))


@needs_sim
def test_target_outside_its_domain_on_the_device():
    z = np.zeros(10, np.float32)
    with pytest.raises(lossdsl.DomainError, match="loss 'bce': target 'y'"):
        load("bce")(dev(z), dev(np.full(10, 1.5, np.float32)))
    with pytest.raises(lossdsl.DomainError, match="loss 'hinge': target 'y'"):
        load("hinge")(dev(z), dev(np.zeros(10, np.float32)))
    zz = np.zeros((3, K), np.float32)
    p = np.full((3, K), 1.0 / K, np.float32)
    p[1, 37] = -0.1
    with pytest.raises(lossdsl.DomainError, match="loss 'soft_cross_entropy': target 'p'.*sample 1, element 37"):
        load("soft_cross_entropy")(dev(zz), dev(p))


@needs_sim
def test_shape_and_dtype_errors_on_the_device():
    ce, mse = load("cross_entropy"), load("mse")
    z = np.zeros((ROWS, K), np.float32)
    y = np.zeros(ROWS, np.int64)
    with pytest.raises(lossdsl.ArgumentError, match="sample shape"):
        ce(dev(z), dev(np.zeros(ROWS + 1, np.int64)))
    with pytest.raises(lossdsl.ArgumentError, match="integer"):
        ce(dev(z), dev(y.astype(np.float32)))
    with pytest.raises(lossdsl.ArgumentError, match="float32 or float64"):
        ce(dev(z.astype(np.int32)), dev(y))
    with pytest.raises(lossdsl.ArgumentError, match="share one dtype"):
        load("gaussian_nll")(dev(np.zeros(3, np.float32)), dev(np.zeros(3)), dev(np.zeros(3, np.float32)))
    with pytest.raises(lossdsl.ArgumentError, match="axis D"):
        load("triplet")(dev(np.zeros((2, 3))), dev(np.zeros((2, 3))), dev(np.zeros((2, 4))))
    with pytest.raises(lossdsl.ArgumentError, match="weight must have the per-sample shape"):
        mse(dev(np.zeros(5)), dev(np.zeros(5)), weight=dev(np.ones(4)))
    with pytest.raises(lossdsl.ArgumentError, match="reduction"):
        mse(dev(np.zeros(5)), dev(np.zeros(5)), reduction="max")
    with pytest.raises(lossdsl.ArgumentError, match="takes 2 arrays"):
        mse(dev(np.zeros(5)))
    with pytest.raises(lossdsl.DomainError, match="param 'delta'"):
        load("huber")(dev(np.zeros(5)), dev(np.zeros(5)), delta=-1.0)
    with pytest.raises(lossdsl.ArgumentError, match="no param 'gamma'"):
        mse(dev(np.zeros(5)), dev(np.zeros(5)), gamma=1.0)
    with pytest.raises(lossdsl.ArgumentError, match="ignore_index applies only"):
        mse(dev(np.zeros(5)), dev(np.zeros(5)), ignore_index=0)


@needs_sim
def test_host_and_device_arrays_do_not_mix():
    mse = load("mse")
    a = np.zeros(5, np.float32)
    with pytest.raises(lossdsl.ArgumentError, match=r"'y' is a host array but 'yhat' is on the device"):
        mse(dev(a), a)
    with pytest.raises(lossdsl.ArgumentError, match=r"'yhat' is a host array"):
        mse(a, dev(a))
    with pytest.raises(lossdsl.ArgumentError, match=r"'weight' is a host array"):
        mse(dev(a), dev(a), weight=np.ones(5, np.float32))
    with pytest.raises(lossdsl.ArgumentError, match=r"'yhat', 'y' are host arrays but 'weight'"):
        mse(a, a, weight=dev(np.ones(5, np.float32)))
    assert issubclass(lossdsl.ArgumentError, lossdsl.LossError)


def test_numpy_without_row_stack_gets_the_alias_numba_cuda_needs(monkeypatch):
    # numpy 2.5 removed np.row_stack; numba-cuda 0.30 overloads it when it compiles its first kernel
    from lossdsl import cuda_dispatch
    monkeypatch.delattr(np, "row_stack", raising=False)
    cuda_dispatch.numpy_row_stack()
    assert np.row_stack is np.vstack


class _Warp:
    """32 lanes as threads, in lockstep at each shuffle: what the simulator lacks, for the warp
    folds (cuda_prelude.WFOLD and _warg*), which the simulator replaces by the block's folds."""

    def __init__(self):
        import threading
        self.barrier, self.slots, self.local = threading.Barrier(32), [None] * 32, threading.local()
        self.jit = lambda **kw: (lambda f: f)

    def shfl_xor_sync(self, mask, value, o):
        assert mask == 0xFFFFFFFF
        self.slots[self.local.lane] = value
        self.barrier.wait()
        got = self.slots[self.local.lane ^ o]
        self.barrier.wait()
        return got

    def run(self, fn, *per_lane):
        """fn(lane's values..., shared scratch) in each lane: a scratch array per value (unused)."""
        import threading
        out = [None] * 32

        def lane(i):
            self.local.lane = i
            out[i] = fn(*(v[i] for v in per_lane), *[None] * len(per_lane))
        threads = [threading.Thread(target=lane, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


@needs_parent
def test_warp_folds_give_every_lane_the_block_folds_result():
    from lossdsl import cuda_prelude as rc
    warp = _Warp()
    scope = {"cuda": warp, "F": np.float32, "MAXT": rc.MAXT}
    exec(rc.BLOCK + rc.ARG.format(kind="max", op=">") + rc.ARG.format(kind="min", op="<"), scope)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(32) * 10.0 ** rng.integers(-3, 4, 32)).astype(np.float32)
    sums = warp.run(scope["_wsum"], x)
    assert len({s.tobytes() for s in sums}) == 1          # bitwise the same in every lane
    assert abs(float(sums[0]) - float(np.sum(x.astype(np.float64)))) <= 1e-5 * float(np.abs(x).sum())
    assert warp.run(scope["_wor"], [0] * 31 + [1]) == [1] * 32
    with_nan = x.copy()
    with_nan[9] = np.nan
    assert all(np.isnan(m) for m in warp.run(scope["_wmax"], with_nan))
    assert warp.run(scope["_wmax"], x) == [x.max()] * 32
    # argmax: ties go to the first index, NaN wins (the last one), -1 (no element yet) never wins
    ties = np.array([1, 5, 2, 5, 0, 5] + [0] * 26, np.float32)
    idx = list(range(32))
    assert {(float(v), i) for v, i in warp.run(scope["_wargmax"], ties, idx)} == {(5.0, 1)}
    assert {(float(v), i) for v, i in warp.run(scope["_wargmin"], -ties, idx)} == {(-5.0, 1)}
    nans = ties.copy()
    nans[[3, 20]] = np.nan
    assert {i for _, i in warp.run(scope["_wargmax"], nans, idx)} == {20}
    none_yet = [-1] * 31 + [31]
    assert {(float(v), i) for v, i in warp.run(scope["_wargmax"], ties, none_yet)} == {(0.0, 31)}


@needs_sim
def test_batch_loss_with_no_target_to_check():
    # no stage 0 (the target checks): the stages start with the buffer
    f = lossdsl.compile(GRAM)["gram_lse"]
    z = np.random.default_rng(3).standard_normal((9, 4))
    want, (want_g,) = f.value_and_grad(z)
    got, (got_g,) = f.value_and_grad(dev(z))
    close(host(got), want, np.float64, "gram_lse value")
    close(host(got_g), want_g, np.float64, "gram_lse gradient")


GRAM = '''
loss gram_lse "a batch loss with no target"
  batch  N
  input  z[N, D]
  g[i, j] = sum[d] z[i, d] * z[j, d] / D
  loss = mean[i] logsumexp[j] g[i, j]
'''
