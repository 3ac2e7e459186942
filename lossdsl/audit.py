"""The accuracy audit: bits of error of a compiled loss against exact arithmetic (the Herbie way).

    report = audit(lossdsl.load("focal"), "float32", points=200, seed=0)
    print(report.format())

For each output (the per-sample value and the gradient of each input) and each sampler, the
kernel's result is compared with the correctly rounded truth from ``lossdsl.exact``:

    bits = log2(ulps between computed and truth + 1)

where NaN (or an infinity) against a finite truth counts as the maximum (64 bits for float64,
32 for float32), and points without a ground truth are left out (and counted). The same points
go through ``loss.naive()`` (the textbook lowering of the same definition, no rules), so the
report shows what the stabilizing rules bought.

Samplers (each respects the domains of the targets and params):
  ``bits``         uniform over the float bit patterns of the dtype (NaN and inf included),
  ``values``       uniform over realistic values (logits in ±50, residuals in ±1e3),
  ``adversarial``  ±0, ±inf, NaN, subnormals, exp's overflow/underflow edges (±709.78, -745.13,
                   float32's ±88.7 and -103.9), the softplus thresholds, near ties, huge equal
                   logits, -inf masked classes, zero probabilities, labels at 0 and 1.
"""
import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import sympy as sp
from sympy.core.function import AppliedUndef

from .errors import LossError
from .exact import Evaluator
from .primitives import Reduce, substitute

SAMPLERS = ("bits", "values", "adversarial")
_MAXBITS = {"float64": 64, "float32": 32}
_UINT = {"float64": np.uint64, "float32": np.uint32}
_SINT = {"float64": np.int64, "float32": np.int32}
_LOGIT_DOMAINS = {"unit", "binary", "class", "simplex", "sign"}


# --- bits of error ------------------------------------------------------------------------------
def ordinal(x, dtype):
    """Floats as integers in their order (-0 and +0 both 0): adjacent floats differ by 1."""
    dtype = np.dtype(dtype)
    a = np.asarray(x, dtype=dtype)
    i = a.view(_SINT[dtype.name]).astype(np.int64)
    mask = np.int64(np.iinfo(_SINT[dtype.name]).max)
    return np.where(i < 0, -(i & mask), i)


def bits_error(computed, truth, dtype):
    """log2(ulps + 1) elementwise; NaN or inf against a finite truth (and anything but NaN against
    a NaN truth) is the maximum. ``truth`` holds floats (NaN for a NaN truth)."""
    dtype = np.dtype(dtype)
    c = np.asarray(computed, dtype=dtype)
    t = np.asarray(truth, dtype=np.float64).astype(dtype)
    top = _MAXBITS[dtype.name]
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(ordinal(np.nan_to_num(c, nan=0.0), dtype) - ordinal(np.nan_to_num(t, nan=0.0), dtype))
        out = np.minimum(np.log2(d.astype(np.float64) + 1.0), top)
    tn, cn = np.isnan(t), np.isnan(c)
    out = np.where(tn, np.where(cn, 0.0, top), out)
    out = np.where(~tn & cn, top, out)
    out = np.where(np.isfinite(t) & np.isinf(c), top, out)
    return out


# --- the report ---------------------------------------------------------------------------------
@dataclass
class Stats:
    """Bits of error of one output over one set of points."""
    n: int = 0                   # entries with a ground truth
    no_truth: int = 0            # entries without one (left out)
    excluded: int = 0            # entries a caller excluded (inherent cancellation)
    mean: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    nonfinite: int = 0           # computed NaN/inf where the truth is finite
    worst: Optional[dict] = None  # {"point": {...}, "index": ..., "computed": x, "truth": t, "bits": b}

    def line(self):
        return (f"mean {self.mean:5.2f}  p99 {self.p99:5.2f}  max {self.max:5.2f}  "
                f"non-finite {self.nonfinite}  (n={self.n}, no truth {self.no_truth})")


@dataclass
class Report:
    loss: str
    dtype: str
    points: int                  # per sampler
    seed: int
    sizes: dict
    rules: tuple
    outputs: tuple               # ("value", "z", ...)
    by_sampler: dict = field(default_factory=dict)        # sampler -> {output: Stats}
    naive_by_sampler: dict = field(default_factory=dict)  # same for loss.naive(), or {}
    overall: dict = field(default_factory=dict)           # output -> Stats over all samplers
    naive_overall: dict = field(default_factory=dict)

    def format(self):
        lines = [f"{self.loss} ({self.dtype}, {self.points} points per sampler, seed {self.seed}"
                 + (", " + ", ".join(f"{k}={v}" for k, v in self.sizes.items()) if self.sizes else "") + ")",
                 "  rules fired: " + (", ".join(self.rules) if self.rules else "none")]
        head = f"  {'output':<10} {'sampler':<12} {'':>8} {'mean':>6} {'p99':>6} {'max':>6} {'nonfin':>6}  worst input"
        lines.append(head)
        for out in self.outputs:
            for sampler in list(self.by_sampler) + ["all"]:
                s = self.overall[out] if sampler == "all" else self.by_sampler[sampler][out]
                nv = (self.naive_overall.get(out) if sampler == "all"
                      else self.naive_by_sampler.get(sampler, {}).get(out))
                label = out if sampler == list(self.by_sampler)[0] else ""
                lines.append(f"  {label:<10} {sampler:<12} {'lossdsl':>8} {s.mean:6.2f} {s.p99:6.2f} {s.max:6.2f} "
                             f"{s.nonfinite:6d}  {_describe(s.worst)}")
                if nv is not None:
                    lines.append(f"  {'':<10} {'':<12} {'naive':>8} {nv.mean:6.2f} {nv.p99:6.2f} {nv.max:6.2f} "
                                 f"{nv.nonfinite:6d}  {_describe(nv.worst)}")
        missing = sum(s.no_truth for s in self.overall.values())
        if missing:
            lines.append(f"  ({missing} entries had no ground truth at the precision cap and were left out)")
        return "\n".join(lines)


def _describe(w):
    if not w or w["bits"] == 0:
        return ""
    pt = ", ".join(f"{k}={_fmt(v)}" for k, v in w["point"].items())
    at = f"[{', '.join(map(str, w['index']))}]" if w["index"] else ""
    return f"{pt} -> {at}{_fmt(w['computed'])} vs {_fmt(w['truth'])}"


def _fmt(v):
    if isinstance(v, np.ndarray):
        return "[" + " ".join(_fmt(x) for x in v.ravel().tolist()) + "]"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    return str(v)


# --- samplers -------------------------------------------------------------------------------------
def _specials(dtype):
    f = np.finfo(dtype)
    tiny_sub = float(np.nextafter(dtype.type(0), dtype.type(1)))
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, tiny_sub, -tiny_sub, float(f.tiny), -float(f.tiny),
            float(f.tiny) / 3, float(f.max), -float(f.max), 1.0, -1.0, 0.5, float(1 + f.eps), float(1 - f.epsneg),
            709.78, -709.78, 709.79, -745.13, -745.14, 88.72, -88.72, 88.73, -103.97, -103.28, -87.33,
            -37.0, 18.0, 33.3, -33.3, -18.0, 37.0, 8.0, 16.6, -16.6, 20.0, -20.0, 40.0, -40.0, 800.0, -800.0,
            1e-4, -1e-4, 1e-3, -1e-8, 1e-8, 1e-20, -1e-20, 1e-300, 1e4, -1e4, 1e20, -1e30, 1e300, -1e300]
    with np.errstate(over="ignore"):
        return np.array(vals, dtype=np.float64).astype(dtype)


def _bit_patterns(rng, shape, dtype):
    u = rng.integers(0, np.iinfo(_UINT[dtype.name]).max, size=shape, dtype=_UINT[dtype.name], endpoint=True)
    return u.view(dtype)


def _unit_bits(rng, shape, dtype):
    """Uniform over the bit patterns of the floats in [0, 1] (0 and 1 included)."""
    top = int(ordinal(1.0, dtype))
    o = rng.integers(0, top, size=shape, endpoint=True)
    return o.astype(_SINT[dtype.name]).view(dtype)


def _positive_bits(rng, shape, dtype, zero=False):
    top = int(ordinal(np.finfo(dtype).max, dtype))
    o = rng.integers(0 if zero else 1, top, size=shape, endpoint=True)
    return o.astype(_SINT[dtype.name]).view(dtype)


class _Sampler:
    """Points for one loss: arrays of shape (n,) + axes per input and target."""

    def __init__(self, loss, dtype, sizes, rng):
        self.loss, self.dtype, self.sizes, self.rng = loss, dtype, sizes, rng
        self.ins = loss._inputs
        self.tgts = loss._targets
        self.logit_like = any(t.domain.name in _LOGIT_DOMAINS for t in self.tgts)
        self.scale = 50.0 if self.logit_like else 1e3

    def shape(self, decl, n):
        return (n,) + tuple(self.sizes[a] for a in decl.axes)

    def cast(self, a):
        with np.errstate(over="ignore"):
            return np.asarray(a, dtype=np.float64).astype(self.dtype)

    # one array per declaration ----------------------------------------------------------------
    def real(self, kind, shape):
        rng, dt = self.rng, self.dtype
        if kind == "bits":
            return _bit_patterns(rng, shape, dt)
        if kind == "values":
            return self.cast(rng.uniform(-self.scale, self.scale, shape))
        sp = _specials(dt)
        out = sp[rng.integers(0, len(sp), shape)]
        mix = rng.random(shape) < 0.3          # some ordinary values among the specials
        return np.where(mix, self.cast(rng.uniform(-self.scale, self.scale, shape)), out)

    def target(self, decl, kind, shape, inputs):
        rng, dt, name = self.rng, self.dtype, decl.domain.name
        if name == "real":
            return self.real(kind, shape)
        if name == "binary":
            return rng.integers(0, 2, shape).astype(dt)
        if name == "sign":
            return (2 * rng.integers(0, 2, shape) - 1).astype(dt)
        if name == "class":
            return rng.integers(0, self.sizes[decl.domain.axis], shape).astype(np.int64)
        if name in ("positive", "nonnegative"):
            if kind == "bits":
                return _positive_bits(rng, shape, dt, zero=name == "nonnegative")
            if kind == "values":
                return self.cast(rng.uniform(0, self.scale, shape))
            sp = np.abs(_specials(dt))
            sp = sp[np.isfinite(sp) & ((sp > 0) | (name == "nonnegative"))]
            return sp[rng.integers(0, len(sp), shape)]
        if name == "unit":
            if kind == "bits":
                return _unit_bits(rng, shape, dt)
            if kind == "values":
                hard = rng.random(shape) < 0.5
                return np.where(hard, rng.integers(0, 2, shape), rng.random(shape)).astype(dt)
            eps = float(np.finfo(dt).eps)
            sp = self.cast([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 0.75, eps, 1 - eps / 2, 1e-8, 1 - 1e-7, 0.1,
                            float(np.nextafter(dt.type(0), dt.type(1)))])
            out = sp[rng.integers(0, len(sp), shape)]
            z = inputs.get("_first_real")
            if z is not None and z.shape == shape:
                # soft labels at sigmoid(z): the gradient σ(z) - y cancels (inherent in the data)
                with np.errstate(over="ignore", invalid="ignore"):
                    s = self.cast(1 / (1 + np.exp(-np.clip(z.astype(np.float64), -700, 700))))
                pick = (rng.random(shape) < 0.1) & np.isfinite(s)
                out = np.where(pick, s, out)
            return out
        if name == "simplex":
            k = shape[-1]
            if kind == "bits":
                raw = _unit_bits(rng, shape, dt).astype(np.float64)
            elif kind == "values":
                raw = rng.dirichlet(np.ones(k), shape[:-1])
                raw = np.where(rng.random(shape) < 0.2, 0.0, raw)
            else:
                choice = rng.integers(0, 4, shape[:-1] + (1,))
                onehot = (np.arange(k) == rng.integers(0, k, shape[:-1] + (1,))).astype(np.float64)
                tiny = np.where(onehot > 0, 1.0, float(np.nextafter(dt.type(0), dt.type(1))))
                zeros = np.where(rng.random(shape) < 0.5, 0.0, rng.random(shape))
                raw = np.select([choice == 0, choice == 1, choice == 2], [onehot, tiny, np.full(shape, 1.0 / k)],
                                zeros)
            s = raw.sum(axis=-1, keepdims=True)
            onehot = (np.arange(k) == 0).astype(np.float64)
            raw = np.where(s > 0, raw / np.where(s > 0, s, 1.0), onehot)
            return raw.astype(dt)
        raise LossError(f"audit: no sampler for domain '{decl.domain}'")

    def vector_rows(self, z, kind, classes):
        """Adversarial structure for a logit row: masks, huge equal logits, near ties."""
        if kind != "adversarial" or z.ndim != 2:
            return z
        rng, dt = self.rng, self.dtype
        n, k = z.shape
        z = z.copy()
        fmax = float(np.finfo(dt).max)
        for i in range(n):
            r = rng.integers(0, 9)
            y = int(classes[i]) if classes is not None else int(rng.integers(0, k))
            if r == 0:      # huge equal logits
                with np.errstate(over="ignore"):
                    z[i] = dt.type(rng.choice([1e30, -1e30, 1e300, fmax, 88.7, 1000.0]))
            elif r == 1:    # -inf masked classes (not the target)
                base = self.cast(rng.uniform(-self.scale, self.scale, k))
                m = rng.random(k) < 0.5
                m[y] = False
                z[i] = np.where(m, -np.inf, base)
            elif r == 2:    # every other class masked
                z[i] = -np.inf
                z[i, y] = self.cast(rng.uniform(-self.scale, self.scale))
            elif r == 3:    # near ties with the target
                v = self.cast(rng.uniform(-self.scale, self.scale))
                z[i] = [np.nextafter(v, dt.type(rng.choice([-np.inf, np.inf]))) if rng.random() < 0.5 else v
                        for _ in range(k)]
            elif r == 4:    # one dominating class
                z[i] = self.cast(rng.uniform(-5, 5, k))
                z[i, rng.integers(0, k)] = dt.type(rng.choice([40.0, 800.0, 1e4, 88.0]))
            # else: the elementwise specials
        return z

    def points(self, kind, n):
        arrays, aux = {}, {}
        for d in self.ins:
            arrays[d.name] = self.real(kind, self.shape(d, n))
            aux.setdefault("_first_real", arrays[d.name])
        classes = None
        for d in self.tgts:
            arrays[d.name] = self.target(d, kind, self.shape(d, n), aux)
            if d.domain.name == "class" and not d.axes:
                classes = arrays[d.name]
        for d in self.ins:
            arrays[d.name] = self.vector_rows(arrays[d.name], kind, classes)
        if kind == "adversarial":
            self.near_ties(arrays, n)
        return arrays

    def near_ties(self, arrays, n):
        """Scalar residual losses: target at or next to the prediction, or at the kink."""
        ins = [d for d in self.ins if not d.axes]
        tgts = [d for d in self.tgts if not d.axes and d.domain.name == "real"]
        if not ins or not tgts:
            return
        a, b = arrays[ins[0].name], arrays[tgts[0].name]
        rng, dt = self.rng, self.dtype
        r = rng.integers(0, 6, n)
        fin = np.isfinite(a)
        with np.errstate(over="ignore"):
            step = np.nextafter(a, dt.type(np.inf))
        tiny = self.cast(a.astype(np.float64) + rng.choice([1e-4, -1e-4, 1e-8, 1.0, -1.0, 1e-3], n))
        b[:] = np.where(fin & (r == 0), a, np.where(fin & (r == 1), step, np.where(fin & (r == 2), tiny, b)))


def _param_sets(loss, dtype):
    """Defaults first, then alternates from each param's domain (γ < 1, zero weights, ...)."""
    alt = {"nonnegative": [0.5, 0.0, 3.0], "unit": [0.1, 0.0, 1.0], "positive": [0.5, 1e-3, 10.0],
           "real": [-1.0, 0.0, 2.0]}
    sets = [dict(loss.params)]
    for i in range(3):
        s = {}
        for p in loss._params:
            choices = alt.get(p.domain.name)
            s[p.name] = choices[i % len(choices)] if choices else p.default
        if s and s not in sets:
            sets.append(s)
    return sets


# --- the audit ----------------------------------------------------------------------------------------
def audit(loss, dtype="float64", points=200, seed=0, naive=True, samplers=SAMPLERS, size=4, exclude=None,
          device=False):
    """Bits of error of ``loss`` (a ``lossdsl.Loss``) in ``dtype``, ``points`` per sampler.

    ``naive``: also measure ``loss.naive()`` on the same points. ``size``: the size of every axis
    (K, D). ``exclude(output, point, index, truth)``: True leaves an entry out of the figures
    (for cancellation inherent in the data; the count is reported). ``device``: measure the CUDA
    kernels (a GPU, or numba's simulator), the arrays copied to the device and back; the points
    are the same as the CPU's for the same seed. Returns a ``Report``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise LossError(f"audit: dtype must be float32 or float64, got {dtype}")
    batch = bool(loss._c.definition.batch)
    rng = np.random.default_rng(seed)
    axes = sorted({a for d in loss._inputs + loss._targets for a in d.axes}
                  | {d.domain.axis for d in loss._targets if d.domain.axis})
    sizes = {a: size for a in axes}
    sampler = _Sampler(loss, dtype, sizes, rng)
    outputs = ("value",) + loss.inputs
    inline = _inliner(loss._c) if batch else (lambda e: e)
    evals = {"value": Evaluator(inline(loss.expr))}
    for name in loss.inputs:
        evals[name] = Evaluator(inline(loss.gradient(name)))
    index_names = {name: [s.name for s in loss.gradient_index(name)] for name in loss.inputs}
    naive_loss = loss.naive() if naive else None
    psets = _param_sets(loss, dtype)

    rep = Report(loss.name, dtype.name, points, seed, sizes, tuple(loss.rules), outputs)
    allrec = {o: [] for o in outputs}
    allnaive = {o: [] for o in outputs}
    for kind in samplers:
        arrays = sampler.points(kind, points)
        # half the points at the defaults, the rest spread over the alternate params
        group = np.where(rng.random(points) < 0.5, 0, rng.integers(0, len(psets), points)) if len(psets) > 1 \
            else np.zeros(points, dtype=int)
        rec = {o: [] for o in outputs}
        nrec = {o: [] for o in outputs}
        for g, params in enumerate(psets):
            sel = np.nonzero(group == g)[0]
            if not len(sel):
                continue
            args = [arrays[n][sel] for n in loss.inputs + loss.targets]
            run = _run_batches if batch else _run
            got = run(loss, args, params, device)
            ngot = run(naive_loss, args, params, device) if naive else None
            pvals = {k: float(dtype.type(v)) for k, v in params.items()}
            for j, i in enumerate(sel):
                point = {n: arrays[n][i] for n in loss.inputs + loss.targets}
                values = dict(point, **pvals, **sizes)
                any_nan = any(np.isnan(np.asarray(point[n]).astype(np.float64)).any() for n in loss.inputs)
                for o in outputs:
                    ev = evals[o]
                    if o == "value":
                        entries = [((), None)]
                    else:
                        shape = tuple(sizes[a] for a in loss.shapes[o])
                        entries = [(ix, dict(zip(index_names[o], ix))) for ix in np.ndindex(*shape)] \
                            if shape else [((), None)]
                    for ix, binding in entries:
                        truth = ev.at(values, dtype, binding)
                        if o == "value" and any_nan:
                            truth = math.nan
                        excluded = exclude is not None and truth is not None and exclude(o, values, ix, truth)
                        comp = got[o][j][ix] if ix else got[o][j]
                        entry = (truth, comp, excluded, point, ix, dict(params))
                        rec[o].append(entry)
                        if naive:
                            ncomp = ngot[o][j][ix] if ix else ngot[o][j]
                            nrec[o].append((truth, ncomp, excluded, point, ix, dict(params)))
        rep.by_sampler[kind] = {o: _stats(rec[o], dtype) for o in outputs}
        if naive:
            rep.naive_by_sampler[kind] = {o: _stats(nrec[o], dtype) for o in outputs}
        for o in outputs:
            allrec[o] += rec[o]
            allnaive[o] += nrec[o]
    rep.overall = {o: _stats(allrec[o], dtype) for o in outputs}
    if naive:
        rep.naive_overall = {o: _stats(allnaive[o], dtype) for o in outputs}
    return rep


def _run(loss, args, params, device=False):
    if device:
        from numba import cuda
        args = [cuda.to_device(np.ascontiguousarray(a)) for a in args]
    with np.errstate(all="ignore"):
        v, grads = loss.value_and_grad(*args, reduction="none", **params)
    out = {"value": _host(v)}
    for name, g in zip(loss.inputs, grads):
        out[name] = _host(g)
    return out


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _run_batches(loss, args, params, device=False):
    """A batch loss: each point is one batch, one call (its value is one number)."""
    runs = [_run(loss, [a[i] for a in args], params, device) for i in range(len(args[0]))]
    return {o: np.stack([r[o] for r in runs]) for o in runs[0]}


def _inliner(compiled):
    """Batch losses keep indexed locals (and their adjoints) as arrays computed once: for the exact
    evaluator, each element is written out as its definition (bound indices renamed apart)."""
    counter = itertools.count()

    def rename(e):
        def fresh(r):
            k = sp.Symbol(f"_b{next(counter)}", integer=True)
            return r.func(k, r.size, substitute(r.body, {r.index: k}), substitute(r.cond, {r.index: k}))
        return e.replace(lambda x: isinstance(x, Reduce), fresh)

    defs = {fn: (idx, rename(body)) for _, fn, idx, _, body in compiled.locals}
    defs.update({fn: (idx, rename(body)) for _, fn, idx, _, body in compiled.adjoints})

    def inline(e):
        while any(a.func in defs for a in e.atoms(AppliedUndef)):
            e = e.replace(lambda x: isinstance(x, AppliedUndef) and x.func in defs,
                          lambda x: substitute(defs[x.func][1], dict(zip(defs[x.func][0], x.args))))
        return e
    return inline


def _stats(records, dtype):
    s = Stats()
    s.no_truth = sum(1 for r in records if r[0] is None)
    s.excluded = sum(1 for r in records if r[0] is not None and r[2])
    kept = [r for r in records if r[0] is not None and not r[2]]
    s.n = len(kept)
    if not kept:
        return s
    truth = np.array([r[0] for r in kept], dtype=np.float64)
    comp = np.array([r[1] for r in kept], dtype=dtype)
    bits = bits_error(comp, truth, dtype)
    s.mean = float(bits.mean())
    s.p99 = float(np.percentile(bits, 99))
    s.max = float(bits.max())
    s.nonfinite = int(np.count_nonzero(np.isfinite(truth) & ~np.isfinite(comp)))
    w = int(np.argmax(bits))
    t, c, _, point, ix, params = kept[w]
    s.worst = {"point": dict(point, **params), "index": ix, "computed": float(c), "truth": float(t),
               "bits": float(bits[w])}
    return s
