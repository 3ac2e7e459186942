"""Checking one call's arguments: the single path every front goes through.

``Call`` reads only ``.shape`` and ``.dtype`` (a numpy dtype) of what it is given, so the same
checks run on numpy arrays (api.py), device arrays (cuda_dispatch.py), and on shapes alone where
a framework traces a function before any data exists (the fake tensors of ``torch.compile``,
the tracers of ``jax.jit``). Every bad argument is a ``LossError`` naming the loss and the argument.
"""
import numpy as np

from .errors import ArgumentError, DomainError
from .lower import in_domain

REDUCTIONS = ("mean", "sum", "none")
NO_IGNORE = np.iinfo(np.int64).min          # the kernel's "no ignore_index" sentinel
SPECIALIZED_EXPONENTS = (0, 1, 2, 3, 4)     # param values compiled into a kernel of their own


def check_reduction(loss, reduction):
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"loss '{loss.name}': reduction must be one of {', '.join(REDUCTIONS)}, "
                            f"got {reduction!r}")


def param_values(loss, params):
    """The values of ``loss``'s params in declaration order (defaults filled in) as floats, after
    their checks: known names, numbers, inside their domains."""
    known = {p.name: p for p in loss._params}
    for k in params:
        if k not in known:
            raise ArgumentError(f"loss '{loss.name}' has no param '{k}'"
                                + (f" (params: {', '.join(known)})" if known else " (it has no params)"))
    values = []
    for p in loss._params:
        v = params.get(p.name, p.default)
        try:
            v = float(v)
        except (TypeError, ValueError, RuntimeError):    # RuntimeError: a tensor of several elements
            raise ArgumentError(f"loss '{loss.name}': param '{p.name}' must be a number, got {v!r}") from None
        if not in_domain(v, p.domain.name):
            raise DomainError(f"loss '{loss.name}': param '{p.name}' = {v:g} is outside its domain "
                              f"'{p.domain}'")
        values.append(v)
    return values


_CACHE_LIMIT = 512      # signatures remembered per loss (a training loop has a handful)


def checked(loss, arrays, reduction="mean", weight=None, ignore_index=None, params=None):
    """``Call(...)``, remembered per signature: a Call depends only on the shapes, dtypes and
    options, so a training loop pays for the checks once (a small batch's call is a few µs)."""
    try:
        key = (*[(a.shape, a.dtype) for a in arrays], reduction,
               None if weight is None else (weight.shape, weight.dtype), ignore_index,
               tuple(sorted(params.items())) if params else ())
        hit = loss._calls.get(key)
    except TypeError:               # an unhashable param value: no memo, the checks say what is wrong
        return Call(loss, arrays, reduction, weight, ignore_index, params)
    if hit is None:
        hit = Call(loss, arrays, reduction, weight, ignore_index, params)
        if len(loss._calls) >= _CACHE_LIMIT:
            loss._calls.clear()
        loss._calls[key] = hit
    return hit


def _is_integer(v):
    try:
        return not isinstance(v, bool) and int(v) == v
    except (TypeError, ValueError, OverflowError):
        return False


class Call:
    """One call's arguments after their checks: dtype, sample shape, axis sizes, param values."""

    def __init__(self, loss, args, reduction="mean", weight=None, ignore_index=None, params=None):
        self.loss = loss
        decls = loss._inputs + loss._targets
        self._check_call(args, reduction)
        ins = args[:len(loss._inputs)]
        self._check_inputs(ins)
        self._shapes(args, decls)
        for a, d in zip(args[len(ins):], loss._targets):
            self._check_target(a, d)
        self.input_shapes = [tuple(a.shape) for a in ins]
        self._params(params or {})
        self._check_weight(weight)
        self._check_ignore(ignore_index)
        self.reduction = reduction
        self.layouts = [self.layout(d) for d in decls]
        # what the kernels take the targets as: class indices int64, the rest in the inputs' dtype
        self.target_dtypes = [np.dtype(np.int64) if d.domain.name == "class" else self.dtype for d in loss._targets]
        self.elements = sum(int(np.prod(s, dtype=np.int64)) for s in self.input_shapes)

    # -- what the kernels and the bridges need to know -------------------------------------
    def layout(self, d):
        """The shape the kernel sees for declaration ``d``: (samples, axes...) or, for batch losses, (axes...)."""
        if self.loss._defn.batch:
            return tuple(self.axis_size[a] for a in d.axes) or (1,)
        return (self.n_samples,) + tuple(self.axis_size[a] for a in d.axes)

    @property
    def value_shape(self):
        return tuple(self.sample_shape) if self.reduction == "none" else ()

    def class_target_index(self):
        """Position among the targets of the per-sample class target (the one ignore_index reads)."""
        return next(i for i, d in enumerate(self.loss._targets) if d.domain.name == "class" and not d.axes)

    # -- the checks --------------------------------------------------------------------------
    def _check_call(self, args, reduction):
        loss = self.loss
        decls = loss._inputs + loss._targets
        check_reduction(loss, reduction)
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
        dtypes = {np.dtype(a.dtype) for a in ins}
        if len(dtypes) > 1:
            raise ArgumentError(f"loss '{loss.name}': inputs must share one dtype, got "
                                + ", ".join(f"{d.name}: {a.dtype}" for a, d in zip(ins, loss._inputs)))
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
        self.dtype_name = self.dtype.name       # the kernels' key (numpy computes .name on each read)

    def _check_target(self, a, d):
        kind = np.dtype(a.dtype).kind
        if d.domain.name == "class" and kind not in "iu":
            raise ArgumentError(f"loss '{self.loss.name}': target '{d.name}' is a class index and must be an "
                                f"integer array, got {a.dtype}")
        if kind not in "fiub":
            raise ArgumentError(f"loss '{self.loss.name}': target '{d.name}' must be numeric, got {a.dtype}")

    def _check_weight(self, w):
        loss = self.loss
        self.weighted = w is not None
        if w is None:
            return
        if loss._defn.batch:
            raise ArgumentError(f"loss '{loss.name}' couples its batch (axis {loss._defn.batch}) into one value: "
                                f"per-sample weight does not apply")
        if np.dtype(w.dtype).kind not in "fiub":
            raise ArgumentError(f"loss '{loss.name}': weight must be numeric, got {w.dtype}")
        if tuple(w.shape) != tuple(self.sample_shape):
            raise ArgumentError(f"loss '{loss.name}': weight must have the per-sample shape "
                                f"{self.sample_shape}, got {tuple(w.shape)}")

    def _check_ignore(self, ignore_index):
        loss = self.loss
        has_class = any(d.domain.name == "class" and not d.axes for d in loss._targets)
        if ignore_index is not None and not has_class:
            raise ArgumentError(f"loss '{loss.name}': ignore_index applies only to losses with a class target")
        self.ignore_given = ignore_index is not None
        if ignore_index is not None and not _is_integer(ignore_index):
            raise ArgumentError(f"loss '{loss.name}': ignore_index must be an integer, got {ignore_index!r}")
        self.ignore = np.int64(ignore_index if ignore_index is not None else NO_IGNORE)

    def _shapes(self, arrays, decls):
        """Bind axis sizes and the sample shape; everything must agree."""
        loss = self.loss
        name, sizes, lead = loss.name, {}, None
        batch = loss._defn.batch
        for a, d in zip(arrays, decls):
            shape, n_axes = tuple(a.shape), len(d.axes)
            if batch:
                here, tail = (), shape
                if len(tail) != n_axes:
                    raise ArgumentError(f"loss '{name}': '{d.name}' must have shape [{', '.join(d.axes)}], "
                                        f"got {shape}")
            elif n_axes:
                if len(shape) not in (n_axes, n_axes + 1):
                    raise ArgumentError(f"loss '{name}': '{d.name}' must have shape (N, {', '.join(d.axes)}) "
                                        f"or ({', '.join(d.axes)}), got {shape}")
                here, tail = shape[:len(shape) - n_axes], shape[len(shape) - n_axes:]
            else:
                here, tail = shape, ()
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
        for axis in loss._defn.axis_order():
            if axis not in sizes:
                raise ArgumentError(f"loss '{name}': no argument gives the size of axis {axis}")
            self.sizes.append(np.int64(sizes[axis][0]))
        self.axis_size = {a: int(s[0]) for a, s in sizes.items()}

    def _params(self, params):
        values = param_values(self.loss, params)
        self.param_values = [self.dtype.type(v) for v in values]
        # small integer exponents get a kernel of their own (a product, not a powf per element)
        self.fixed = tuple((p.name, int(v)) for p, v in zip(self.loss._params, values)
                           if p.name in self.loss.exponent_params and v in SPECIALIZED_EXPONENTS)

    def raise_bad_targets(self, targets):
        """The kernel counted bad targets: find the first in ``targets`` (host arrays, kernel
        layout) and say what was expected."""
        loss = self.loss
        for t, d in zip(targets, loss._targets):
            rows = t.reshape(t.shape[0], -1) if not loss._defn.batch else t.reshape(1, -1)
            if d.domain.name == "class":
                size = self.axis_size[d.domain.axis]
                ok = ((rows >= 0) & (rows < size)) | (rows == self.ignore)
                want = f"a class index in [0, {size})" + (" or ignore_index" if self.ignore_given else "")
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
