"""The Python API: compile text into ``Loss`` objects and call their fused kernels.

A ``Loss`` checks its arguments (count, dtypes, shapes, axis sizes, params and their domains),
runs the kernel for the inputs' dtype, and reduces: ``none`` / ``sum`` / ``mean``.
"""
import difflib
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import ir, jit, printing, render_cpu, render_cuda
from .compiler import compile_definition
from .derive import fresh_indices
from .errors import ArgumentError, CompileError, DomainError, LossError, LossTypeError
from .lower import in_domain, parse
from .to_sympy import axis_order
from .paths import LIBRARY

REDUCTIONS = ("mean", "sum", "none")


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
            out[name] = Loss(d, lookup, compile_definition(d, lookup))
        except LossError:
            raise
        except (RecursionError, ValueError, TypeError, ZeroDivisionError, NotImplementedError) as e:
            raise d.span.error(LossTypeError, f"cannot compile loss '{name}': {type(e).__name__}: {e}") from None
    return out


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
    for name in sorted(_called(defn)):
        out += _texts(lookup(name), lookup, seen)
    return out


def _called(node):
    if isinstance(node, ir.Call):
        yield node.fn
    children = vars(node).values() if hasattr(node, "__dict__") else ()
    for v in children:
        for item in (v if isinstance(v, (list, tuple)) else v.values() if isinstance(v, dict) else [v]):
            if isinstance(item, tuple):
                item = item[0]
            if isinstance(item, (ir.Expr, ir.Stmt)):
                yield from _called(item)


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

    @property
    def _c(self):
        """The symbolic pipeline's result, computed on first use: a cached kernel needs none of it."""
        if self._compiled is None:
            self._compiled = compile_definition(self._defn, self._lookup, self._stable)
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
            return render_cpu.render(self._c, dtype)
        if target == "cuda":
            return render_cuda.render(self._c, dtype)
        raise LossError(f"unknown target '{target}': expected cpu or cuda")

    def __str__(self):
        return f"{self.name} = {printing.to_text(self.expr)}"

    # --- numeric side ----------------------------------------------------------------------
    def kernel(self, dtype):
        if dtype not in self._kernels:
            key = ("cpu", dtype, self._stable, *_texts(self._defn, self._lookup))
            module = jit.load_indexed(key)
            if module is None:
                module = jit.load_module(render_cpu.render(self._c, dtype), key)
            self._kernels[dtype] = module.kernel
        return self._kernels[dtype]

    def __call__(self, *args, reduction="mean", weight=None, ignore_index=None, **params):
        return self._run(args, reduction, weight, ignore_index, params, grad=False)[0]

    def value_and_grad(self, *args, reduction="mean", weight=None, ignore_index=None, **params):
        return self._run(args, reduction, weight, ignore_index, params, grad=True)

    def _run(self, args, reduction, weight, ignore_index, params, grad):
        if cuda_dispatch.on_device(args, weight):
            return cuda_dispatch.run(self, args, reduction, weight, ignore_index, params, grad)
        call = _Call(self, args, reduction, weight, ignore_index, params)
        k = self.kernel(call.dtype.name)
        empty = np.empty(0, call.dtype)
        grads = [np.empty_like(a) if grad else np.empty((0,) * a.ndim, call.dtype) for a in call.inputs]
        out = np.empty(call.n_samples, call.dtype)
        weight = call.weight if call.weight is not None else empty
        scale = call.dtype.type(1.0 / call.denominator if reduction == "mean" and call.denominator else 1.0)
        bad = k(*call.inputs, *call.targets, *call.param_values, *call.sizes, weight, out,
                *grads, scale, np.int64(call.ignore), call.weight is not None, grad)
        total = out.sum(dtype=np.float64) if reduction != "none" else 0.0
        if bad:
            call.raise_bad_targets()
        if reduction == "none":
            value = out.reshape(call.sample_shape)
        elif reduction == "sum":
            value = call.dtype.type(total)
        else:
            value = call.dtype.type(total / call.denominator if call.denominator else np.nan)
        if not grad:
            return value, None
        return value, tuple(g.reshape(s) for g, s in zip(grads, call.input_shapes))


class _Call:
    """One call's arguments, checked and laid out for the kernel."""

    def __init__(self, loss, args, reduction, weight, ignore_index, params):
        self.loss = loss
        self._check_call(args, reduction)
        arrays = [np.asarray(a) for a in args]
        ins = arrays[:len(loss._inputs)]
        self._check_inputs(ins)
        self._shapes(arrays, loss._inputs + loss._targets, loss)
        self.inputs = [np.ascontiguousarray(a.reshape(self._layout(d))) for a, d in zip(ins, loss._inputs)]
        self.input_shapes = [a.shape for a in ins]
        self.targets = []
        for a, d in zip(arrays[len(ins):], loss._targets):
            self._check_target(a, d)
            a = a.astype(np.int64 if d.domain.name == "class" else self.dtype, copy=False)
            self.targets.append(np.ascontiguousarray(a.reshape(self._layout(d))))
        self._params(params, loss)
        w = self._check_weight(None if weight is None else np.asarray(weight))
        self.weight = None if w is None else \
            np.ascontiguousarray(w.astype(self.dtype, copy=False).reshape(self.n_samples))
        self._check_ignore(ignore_index)
        self.denominator = self.n_samples
        if ignore_index is not None:
            cls = next(t for t, d in zip(self.targets, loss._targets) if d.domain.name == "class" and not d.axes)
            self.denominator = int(np.count_nonzero(cls != self.ignore))

    # The checks, shared with the device path (cuda_dispatch._DeviceCall) -----------------------
    def _check_call(self, args, reduction):
        loss = self.loss
        decls = loss._inputs + loss._targets
        if reduction not in REDUCTIONS:
            raise ArgumentError(f"loss '{loss.name}': reduction must be one of {', '.join(REDUCTIONS)}, "
                                f"got {reduction!r}")
        if len(args) != len(decls):
            raise ArgumentError(f"loss '{loss.name}' takes {len(decls)} arrays "
                                f"({', '.join(d.name for d in decls)}), got {len(args)}")

    def _check_inputs(self, ins):
        """Inputs are float32 or float64, all of one dtype, which the kernel computes in."""
        loss = self.loss
        for a, d in zip(ins, loss._inputs):
            if a.dtype not in (np.float32, np.float64):
                raise ArgumentError(f"loss '{loss.name}': input '{d.name}' must be float32 or float64, "
                                    f"got {a.dtype}")
        dtypes = {a.dtype for a in ins}
        if len(dtypes) > 1:
            raise ArgumentError(f"loss '{loss.name}': inputs must share one dtype, got "
                                + ", ".join(f"{d.name}: {a.dtype}" for a, d in zip(ins, loss._inputs)))
        self.dtype = np.dtype(dtypes.pop()) if dtypes else np.dtype(np.float64)

    def _check_target(self, a, d):
        if d.domain.name == "class" and a.dtype.kind not in "iu":
            raise ArgumentError(f"loss '{self.loss.name}': target '{d.name}' is a class index and must be an "
                                f"integer array, got {a.dtype}")
        if a.dtype.kind not in "fiub":
            raise ArgumentError(f"loss '{self.loss.name}': target '{d.name}' must be numeric, got {a.dtype}")

    def _check_weight(self, w):
        """The weight array (host or device) after its checks, or None."""
        loss = self.loss
        if w is None:
            return None
        if loss._defn.batch:
            raise ArgumentError(f"loss '{loss.name}' couples its batch (axis {loss._defn.batch}) into one value: "
                                f"per-sample weight does not apply")
        if w.dtype.kind not in "fiub":
            raise ArgumentError(f"loss '{loss.name}': weight must be numeric, got {w.dtype}")
        if tuple(w.shape) != tuple(self.sample_shape):
            raise ArgumentError(f"loss '{loss.name}': weight must have the per-sample shape "
                                f"{self.sample_shape}, got {w.shape}")
        return w

    def _check_ignore(self, ignore_index):
        loss = self.loss
        has_class = any(d.domain.name == "class" and not d.axes for d in loss._targets)
        if ignore_index is not None and not has_class:
            raise ArgumentError(f"loss '{loss.name}': ignore_index applies only to losses with a class target")
        self.ignore = int(ignore_index) if ignore_index is not None else np.iinfo(np.int64).min

    def _shapes(self, arrays, decls, loss):
        """Bind axis sizes and the sample shape; everything must agree."""
        name, sizes, lead = loss.name, {}, None
        batch = loss._defn.batch
        for a, d in zip(arrays, decls):
            n_axes = len(d.axes)
            if batch:
                here, tail = (), a.shape
                if len(tail) != n_axes:
                    raise ArgumentError(f"loss '{name}': '{d.name}' must have shape [{', '.join(d.axes)}], "
                                        f"got {a.shape}")
            elif n_axes:
                if a.ndim not in (n_axes, n_axes + 1):
                    raise ArgumentError(f"loss '{name}': '{d.name}' must have shape (N, {', '.join(d.axes)}) "
                                        f"or ({', '.join(d.axes)}), got {a.shape}")
                here, tail = a.shape[:a.ndim - n_axes], a.shape[a.ndim - n_axes:]
            else:
                here, tail = a.shape, ()
            for axis, size in zip(d.axes, tail):
                if sizes.setdefault(axis, (size, d.name))[0] != size:
                    raise ArgumentError(f"loss '{name}': axis {axis} is {sizes[axis][0]} for "
                                        f"'{sizes[axis][1]}' but {size} for '{d.name}'")
            if lead is None:
                lead = (here, d.name)
            elif here != lead[0]:
                raise ArgumentError(f"loss '{name}': '{d.name}' has sample shape {here}, but '{lead[1]}' has "
                                    f"{lead[0]}: they must match")
        self.sample_shape = lead[0] if lead else ()
        self.n_samples = 1 if batch else int(np.prod(self.sample_shape, dtype=np.int64))
        self.sizes = []
        for axis in axis_order(loss._defn):
            if axis not in sizes:
                raise ArgumentError(f"loss '{name}': no argument gives the size of axis {axis}")
            self.sizes.append(np.int64(sizes[axis][0]))
        self.axis_size = {a: int(s[0]) for a, s in sizes.items()}

    def _layout(self, d):
        if self.loss._defn.batch:
            return tuple(self.axis_size[a] for a in d.axes) or (1,)
        return (self.n_samples,) + tuple(self.axis_size[a] for a in d.axes)

    def _params(self, params, loss):
        known = {p.name: p for p in loss._params}
        for k in params:
            if k not in known:
                raise ArgumentError(f"loss '{loss.name}' has no param '{k}'"
                                    + (f" (params: {', '.join(known)})" if known else " (it has no params)"))
        self.param_values = []
        for p in loss._params:
            v = params.get(p.name, p.default)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ArgumentError(f"loss '{loss.name}': param '{p.name}' must be a number, got {v!r}") from None
            if not in_domain(v, p.domain.name):
                raise DomainError(f"loss '{loss.name}': param '{p.name}' = {v:g} is outside its domain "
                                  f"'{p.domain}'")
            self.param_values.append(self.dtype.type(v))

    def raise_bad_targets(self):
        """The kernel counted bad targets: find the first and say what was expected."""
        loss = self.loss
        for t, d in zip(self.targets, loss._targets):
            rows = t.reshape(t.shape[0], -1) if not loss._defn.batch else t.reshape(1, -1)
            if d.domain.name == "class":
                size = self.axis_size[d.domain.axis]
                ok = ((rows >= 0) & (rows < size)) | (rows == self.ignore)
                want = f"a class index in [0, {size})" + (" or ignore_index" if self.ignore > -2**62 else "")
            else:
                check = {"unit": lambda v: (v >= 0) & (v <= 1), "binary": lambda v: (v == 0) | (v == 1),
                         "sign": lambda v: (v == 1) | (v == -1), "positive": lambda v: v > 0,
                         "nonnegative": lambda v: v >= 0, "simplex": lambda v: v >= 0}.get(d.domain.name)
                if check is None:
                    continue
                ok = check(rows)
                want = f"values in its domain '{d.domain}'"
            bad = np.argwhere(~ok)
            if len(bad):
                n, k = bad[0]
                where = f"sample {n}" + (f", element {k}" if rows.shape[1] > 1 else "")
                raise DomainError(f"loss '{loss.name}': target '{d.name}' must hold {want}; "
                                  f"got {rows[n, k]!r} at {where}")
        raise DomainError(f"loss '{loss.name}': a target is outside its domain")


from . import cuda_dispatch  # noqa: E402  (it builds on _Call above)
