"""The Python API: compile text into ``Loss`` objects and call their fused kernels.

The symbolic pipeline (sympy, compiler.py and the renderers) is imported on first use: a kernel
found in the cache needs none of it, so ``import lossdsl`` and a cached load stay fast.

A ``Loss`` checks its arguments (count, dtypes, shapes, axis sizes, params and their domains),
runs the kernel for the inputs' dtype, and reduces: ``none`` / ``sum`` / ``mean``.
"""
import difflib
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import blas, buffers, cuda_dispatch, ir, jit
from .call import checked
from .errors import ArgumentError, LossError, LossTypeError
from .lower import parse
from .paths import LIBRARY

def names():
    """Sorted names of the library's losses."""
    return sorted(p.stem for p in LIBRARY.glob("*.loss"))


@lru_cache(maxsize=None)
def _library_definition(name):
    path = LIBRARY / f"{name}.loss"
    if not path.is_file():
        return None
    defs = {d.name: d for d in parse(path.read_text(), str(path))}
    return defs.get(name)


def load(name):
    """The compiled library loss ``name``."""
    if _library_definition(name) is None:
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LossError(f"no loss '{name}' in the library{hint} (lossdsl.names() lists them)")
    return _load_cached(name)


def as_loss(name_or_loss, who):
    """A front's loss argument: a library name or a ``Loss`` (compiled from the user's text)."""
    if isinstance(name_or_loss, Loss):
        return name_or_loss
    if isinstance(name_or_loss, str):
        return load(name_or_loss)
    raise ArgumentError(f"{who} takes a library loss name or a Loss, got {name_or_loss!r}")


@lru_cache(maxsize=None)
def _load_cached(name):
    return Loss(_library_definition(name), _library_definition)


def compile(text, file="<string>"):  # noqa: A001 - the API name of LANGUAGE.md
    """{name: Loss} for every definition in ``text``; other losses are looked up in the text, then the library."""
    defs = {d.name: d for d in parse(text, file)}

    def lookup(name):
        return defs.get(name) or _library_definition(name)

    out = {}
    for name, d in defs.items():
        try:
            out[name] = Loss(d, lookup, _compile(d, lookup))
        except LossError:
            raise
        except (RecursionError, ValueError, TypeError, ZeroDivisionError, NotImplementedError) as e:
            raise d.span.error(LossTypeError, f"cannot compile loss '{name}': {type(e).__name__}: {e}") from None
    return out


def _compile(defn, lookup, stable=True, fixed=()):
    from .compiler import compile_definition
    return compile_definition(defn, lookup, stable, fixed)


def _exponent_params(defn):
    """The definition's params that appear in an exponent (``(1 - p_t)^gamma``): a call with a
    small integer value for one gets a kernel with that value compiled in (call.Call.fixed)."""
    params = {d.name for d in defn.of_kind("param")}
    return tuple(sorted({n.id for e in ir.walk(defn) if isinstance(e, ir.Binary) and e.op == "^"
                         for n in ir.walk(e.b) if isinstance(n, ir.Name) and n.id in params}))


def compile_file(path):
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LossError(f"cannot read {path}: {e}") from None
    return compile(text, str(path))


def _texts(defn, lookup, seen=None):
    """The texts a compiled definition depends on: its own and those of the losses it calls."""
    seen = set() if seen is None else seen
    if defn is None or defn.name in seen:
        return []
    seen.add(defn.name)
    out = [defn.text]
    for name in sorted({e.fn for e in ir.walk(defn) if isinstance(e, ir.Call)}):
        out += _texts(lookup(name), lookup, seen)
    return out


class Loss:
    """A compiled loss: call it for the value, ``value_and_grad`` for value and gradients."""

    def __init__(self, defn, lookup, compiled=None, stable=True):
        self._defn, self._lookup, self._compiled, self._stable = defn, lookup, compiled, stable
        d = defn
        self.name, self.doc, self.definition = d.name, d.doc, d.text
        self._inputs = d.of_kind("input")
        self._targets = d.of_kind("target")
        self._params = d.of_kind("param")
        self.inputs = tuple(x.name for x in self._inputs)
        self.targets = tuple(x.name for x in self._targets)
        self.params = {p.name: p.default for p in self._params}
        self.shapes = {x.name: x.axes for x in self._inputs + self._targets}
        self._kernels = {}
        self._calls = {}            # checked call signatures (call.checked)
        self._specialized = {}      # fixed params -> the symbolic pipeline's result for them
        self.exponent_params = _exponent_params(d)

    @property
    def _c(self):
        """The symbolic pipeline's result, computed on first use: a cached kernel needs none of it."""
        if self._compiled is None:
            self._compiled = _compile(self._defn, self._lookup, self._stable)
        return self._compiled

    @property
    def rules(self):
        return self._c.fired

    def naive(self):
        """The same definition lowered the textbook way: no rules, naive primitives."""
        return Loss(self._defn, self._lookup, stable=False)

    def __repr__(self):
        return f"<Loss {self.name}({', '.join(self.inputs + self.targets)})>"

    # --- symbolic side ---------------------------------------------------------------------
    @property
    def expr(self):
        return self._c.expr

    def gradient(self, name):
        if name not in self._c.grads:
            raise LossError(f"loss '{self.name}' has no input '{name}' (inputs: {', '.join(self.inputs)})")
        return self._c.grads[name][0]

    def gradient_index(self, name):
        """The index symbols of ``gradient(name)`` (empty for a scalar input)."""
        self.gradient(name)
        return self._c.grads[name][1]

    def source(self, target="cpu", dtype="float32"):
        if target == "cpu":
            from . import render_cpu
            return render_cpu.render(self._c, dtype)
        if target == "cuda":
            from . import render_cuda
            return render_cuda.render(self._c, dtype)
        raise LossError(f"unknown target '{target}': expected cpu or cuda")

    def __str__(self):
        from . import printing
        return f"{self.name} = {printing.to_text(self.expr)}"

    # --- numeric side ----------------------------------------------------------------------
    def kernel(self, dtype, fixed=()):
        """The CPU kernel for ``dtype``; with ``fixed`` ((param, value) pairs), the one with those
        values compiled in."""
        if (dtype, fixed) not in self._kernels:
            key = ("cpu", dtype, self._stable, *_texts(self._defn, self._lookup)) + ((fixed,) if fixed else ())
            module = jit.load_indexed(key)
            if module is None:
                from . import render_cpu
                module = jit.load_module(render_cpu.render(self._compiled_for(fixed), dtype), key)
            self._kernels[dtype, fixed] = blas.one_thread(module.kernel) if module.MATRIX_PRODUCTS else module.kernel
        return self._kernels[dtype, fixed]

    def _compiled_for(self, fixed):
        if not fixed:
            return self._c
        if fixed not in self._specialized:
            self._specialized[fixed] = _compile(self._defn, self._lookup, self._stable, fixed)
        return self._specialized[fixed]

    def __call__(self, *args, reduction="mean", weight=None, ignore_index=None, **params):
        return self._run(args, reduction, weight, ignore_index, params, grad=False)[0]

    def value_and_grad(self, *args, reduction="mean", weight=None, ignore_index=None, **params):
        return self._run(args, reduction, weight, ignore_index, params, grad=True)

    def _run(self, args, reduction, weight, ignore_index, params, grad, stream=None):
        """The one call path: device arrays go to the CUDA kernels (on ``stream``), the rest to the CPU's."""
        if not _all_numpy(args, weight):        # numpy arrays (the common case) need neither test
            if cuda_dispatch.on_device(args, weight):
                return cuda_dispatch.run(self, args, reduction, weight, ignore_index, params, grad, stream)
            args = [np.asarray(a) for a in args]
            weight = None if weight is None else np.asarray(weight)
        call = checked(self, args, reduction, weight, ignore_index, params)
        return _run_host(self, call, args, weight, grad)


def _all_numpy(args, weight):
    if weight is not None and type(weight) is not np.ndarray:
        return False
    for a in args:
        if type(a) is not np.ndarray:
            return False
    return True


SERIAL_BELOW = 1 << 15      # elements under which one thread beats waking the others


class _Host:
    """What the CPU kernel's arguments are for one checked Call, decided once per signature
    (a small batch's call is a few µs, so per-call dtype and shape arithmetic shows)."""

    def __init__(self, call, n_in):
        dtype = call.dtype
        self.in_layouts, self.target_layouts = call.layouts[:n_in], call.layouts[n_in:]
        self.targets = list(zip(call.target_dtypes, self.target_layouts))
        # gradients are made in the kernel's layout and handed back in the inputs' shapes
        self.grad_shapes = None if self.in_layouts == call.input_shapes else call.input_shapes
        self.empty = buffers.empty if call.elements * dtype.itemsize >= buffers.LARGE else np.empty
        # size 0: the kernel never touches them, calls can share them; two arrays, not one: LLVM's
        # vector loop checks at run time that what it writes (out) is apart from what it reads (w),
        # and one placeholder for both failed that check (bce 2^24: the scalar loop, 5x slower)
        self.no_weight, self.no_out = np.empty(0, dtype), np.empty(0, dtype)
        self.no_grads = [np.empty((0,) * len(s), dtype) for s in self.in_layouts]
        self.middle = (*call.param_values, *call.sizes)
        self.want_out = call.reduction == "none"
        self.mean = call.reduction == "mean"
        self.serial = call.elements < SERIAL_BELOW
        # the scale of the mean: known now unless ignore_index makes the denominator data-dependent
        self.scale = None if call.ignore_given else self.scale_for(dtype, call.n_samples)
        self.dtype = dtype

    def scale_for(self, dtype, denominator):
        return dtype.type(1.0 / denominator if self.mean and denominator else 1.0)


def _host(call, n_in):
    h = call.__dict__.get("_host")
    if h is None:
        h = call._host = _Host(call, n_in)
    return h


def _run_host(loss, call, arrays, weight, grad, results=None):
    """Lay the checked arrays out for the CPU kernel (contiguous, one copy at most), run it, reduce.

    ``results``: (value, *gradients) C-contiguous arrays of the results' shapes and dtype (a
    framework's result buffers) that the kernel writes into, in place of new arrays; large new
    arrays take the memory of results released before (buffers.py: no page faults)."""
    n_in = len(loss._inputs)
    h = _host(call, n_in)
    dtype = h.dtype
    inputs = [np.ascontiguousarray(a if a.shape == s else a.reshape(s)) for a, s in zip(arrays, h.in_layouts)]
    targets = [a if a.dtype == t and a.shape == s and a.flags.c_contiguous else
               np.ascontiguousarray(a.astype(t, copy=False).reshape(s)) for a, (t, s) in zip(arrays[n_in:], h.targets)]
    w = h.no_weight if weight is None else \
        np.ascontiguousarray(weight.astype(dtype, copy=False).reshape(call.n_samples))
    scale, denominator = h.scale, call.n_samples
    if scale is None:
        denominator = int(np.count_nonzero(targets[call.class_target_index()] != call.ignore))
        scale = h.scale_for(dtype, denominator)
    k = loss.kernel(call.dtype_name, call.fixed)
    want_out = h.want_out
    if results is None:
        grads = [h.empty(a.shape, dtype) for a in inputs] if grad else h.no_grads
        out = buffers.empty(call.n_samples, dtype) if want_out else h.no_out
    else:       # reshapes of C-contiguous arrays: views, the kernel writes into the buffers given
        grads = [g.reshape(a.shape) for g, a in zip(results[1:], inputs)] if grad else h.no_grads
        out = results[0].reshape(call.n_samples) if want_out else h.no_out
    # Small calls run on the calling thread: a parallel launch costs tens of microseconds.
    bad, total = k(*inputs, *targets, *h.middle, w, out, *grads, scale,
                   call.ignore, weight is not None, grad, want_out, h.serial)
    if bad:
        call.raise_bad_targets(targets)
    if want_out:
        value = out.reshape(call.sample_shape)
    else:
        if h.mean:
            total = total / denominator if denominator else np.nan
        value = dtype.type(total)
        if results is not None:
            results[0][()] = value
    if not grad:
        return value, None
    if h.grad_shapes is None:
        return value, tuple(grads)
    return value, tuple([g.reshape(s) for g, s in zip(grads, h.grad_shapes)])
