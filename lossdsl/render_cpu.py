"""CPU back end: one self-contained numba module per (loss, dtype).

The kernel is fused: one parallel loop over samples computes each sample's reductions, its
loss and the gradient of every input. The samples go in blocks of BLOCK; each block sums its
weighted losses in float64 (_acc; elementwise, runs of RUN samples summed in the dtype first:
_radd; these reassociable adds let LLVM split the running sums into vector lanes) into one
partial, and the partials are summed pairwise (_pairsum): for a mean or sum nothing per sample
goes through memory. With want_out the per-sample losses are written to ``out`` too (reduction
"none"). Targets are checked inside the same loop *before* anything is read through them (a class
target indexes the logits), and a count of bad samples (of runs with one, elementwise) is
returned so the caller can raise a clear error.

    kernel(inputs..., targets..., params..., sizes..., w, out, grads..., scale, ignore,
           has_w, want_grad, want_out, serial) -> (bad, total)

``serial`` runs the call on the calling thread: waking the pool costs more than a small batch's
work, and switching inside the kernel is free where numba.set_num_threads from Python is not.

Arrays not wanted are passed empty and the flags say so: one compiled signature per dtype
(numba would compile one per combination of None arguments).
"""
import hashlib
from collections import namedtuple
from pathlib import Path

import sympy as sp
from sympy.core.function import AppliedUndef

from .contract import index_sizes, merge_transposed, products, read_locals
from .emit import CALLS, Emitter, gradient_plan, row_key
from .helpers import DOMAIN_CHECKS, HELPERS
from .primitives import IsArg, Min, Norm, Reduce, Sum, expm1, substitute
from .vector_math import EXP32, EXP64

# Samples per block of the kernel's loop: a block's sum has BLOCK/RUN terms in a row, then blocks
# go pairwise (like numpy's pairwise sum, whose leaves are 128 wide).
BLOCK = 256
# An elementwise block's samples go in runs of RUN, each summed in the dtype and then added to
# the block's float64 sum, its bad targets a flag: a float64 sum or an int64 count per sample made
# LLVM vectorize float32 code 4 lanes wide where it can go 8 (2^24 float32, 2 threads: focal
# 54 -> 39 ms, bce 38 -> 33, hinge 9.1 -> 7.3). A run's float32 sum has 8 terms per lane: its
# rounding is a few ulp of the run's sum.
RUN = 64
# A sample's code longer than SPLIT_BODY characters goes into a function of its own (_module):
# numba's parallel passes (copy propagation over every variable of a parallel loop's body) then
# see a small loop, which compiles 2-3x faster for a big body (js_divergence: 13.1 -> 5.3 s). The
# library's bodies (up to 2.9k) stay in the parallel loop: there LLVM's code was faster
# (multiclass_hinge 16384 x 1000: 23 vs 31 ms apart; numba's parallel loop tells LLVM its arrays
# do not overlap, a function call cannot).
SPLIT_BODY = 3000
# The calls of that function per thread of a parallel kernel: enough to even out uneven blocks,
# few enough that the calls' atomic reference counts on the shared arrays do not contend (one
# call per row: contrastive 65536 x 128 5.5 -> 9.1 ms). A serial kernel (a small call) makes one.
CALLS_PER_THREAD = 16

SUMS = '''
@numba.njit(error_model="numpy", fastmath={'reassoc'})
def _acc(s, x):
    # s + x in float64. reassoc is on this add alone (numba's fast-math flags are per instruction
    # and survive inlining): LLVM may split the running sum into lanes, but the compensation terms
    # of _exp, _log1p and _expdiff keep their order
    return s + np.float64(x)


@numba.njit(error_model="numpy", fastmath={'reassoc'})
def _radd(s, x):
    # a row reduction's step s + x, reassociable like _acc (in the row's own precision)
    return s + x


def _llvm_binary(name):
    # a float (a, b) -> float function as the LLVM intrinsic ``name``
    @intrinsic
    def call(typingctx, a, b):
        t = typingctx.unify_types(a, b)
        if not isinstance(t, types.Float):
            return None

        def codegen(context, builder, sig, args):
            x, y = (context.cast(builder, v, ty, sig.return_type) for v, ty in zip(args, sig.args))
            fn = builder.module.declare_intrinsic(name, [x.type], llvm_ir.FunctionType(x.type, [x.type, x.type]))
            return builder.call(fn, [x, y])
        return t(a, b), codegen
    return call


# NaN-propagating max and min (IEEE maximum/minimum): LLVM vectorizes them as reductions
_vmax = _llvm_binary("llvm.maximum")
_vmin = _llvm_binary("llvm.minimum")


@numba.njit(error_model="numpy")
def _pairsum(a):
    # pairwise sum of the block partials, in place: slot i is written after slots 2i, 2i+1 are read
    m = a.size
    while m > 1:
        h = m // 2
        for i in range(h):
            a[i] = a[2 * i] + a[2 * i + 1]
        if m % 2:
            a[h] = a[m - 1]
            h += 1
        m = h
    return a[0] if a.size else 0.0
'''

# The shared helpers' source, named in every generated module: numba's cache of a module's kernel
# holds the helpers' code and checks only the module's own file, so new helpers need a new module.
RUNTIME_HASH = hashlib.sha256((Path(__file__).parent / "cpu_runtime.py").read_bytes()).hexdigest()[:16]

# Helpers are separate numba functions: LLVM inlines them into the kernel all the same (so the
# loops still vectorize), and numba compiles twice as fast as with inline="always". Those too
# big for LLVM's inlining threshold (_tanh, _sinh, _logcosh: a call in the loop, which then
# stays scalar) are marked forceinline (LLVM's alwaysinline; numba compiles them as before):
# vae_elbo's 32-wide KL loop, two _xexpm1 calls per element, took a fifth of its time.
HELPER_DECORATOR = '@numba.njit(error_model="numpy")'
INLINED_HELPERS = ("_logcosh", "_xexp", "_sqexp", "_xpow", "_xexpm1", "_halfshift", "_wshift", "_addshift")


# A vector input's gradient written by the value's sum pass over its axis: ``target`` (code with {}
# for the index) gets c·expr, expr read at ``index``. The row is read once, and what the loss and
# the gradient share is computed once (bce's e^-|z| serves its log1p and its sigmoid): vae_elbo and
# multilabel_bce 1.3x faster.
Rider = namedtuple("Rider", "target expr index")
# A vector target's domain check in the value's first sum pass over its axis (``cond``: code with
# {v} for the element), where its gradients ride too: the row is read from memory once, by work
# heavy enough to hide the compare (multilabel_bce 16384 x 1000 float32: 39 -> 26 ms), not by a
# loop of its own first. Where no gradient rides, the loop stays first: kl_div's sums with the
# check took 1.3x longer in float64. Only for targets nothing is read through.
CheckRider = namedtuple("CheckRider", "cond expr index")


class VectorEmitter(Emitter):
    """An Emitter whose row reductions LLVM vectorizes: sums step through the reassociable _radd;
    an unmasked peak is a NaN-propagating max (_vmax), and its argmax, the first index at the
    peak, an integer min in a second pass (one loop updating both under a compare stays scalar:
    5x slower on 1000-wide rows). ``riders``: axis size -> [Rider] for the next sum pass over it
    in the sample scope."""
    add = "{acc} = _radd({acc}, {x})"
    calls = {**CALLS, sp.log: "_log", expm1: "_expm1"}

    def __init__(self, *args):
        super().__init__(*args)
        self.riders = {}

    def loop(self, kvar, size, group, bodies, conds, bound, step, state):
        riders = self.riders.pop(size, []) if step == self.accumulate and not self.open_loops else []
        if riders:     # their expressions CSE'd with the sums' bodies, at the same element
            k = next(s for s in bound if self.loop_vars.get(s) == kvar)
            bodies = {**bodies, **{r: substitute(r.expr, {r.index: k}) for r in riders}}
            conds = {**conds, **dict.fromkeys(riders, sp.true)}
        super().loop(kvar, size, list(group) + riders, bodies, conds, bound, step, state)

    def peak_pass(self, kvar, size, group, bodies, conds, bound, peak):
        if any(conds[r] is not sp.true for r in group):
            # a masked peak (max over j != y) measured faster as the one scalar loop
            return super().peak_pass(kvar, size, group, bodies, conds, bound, peak)
        self.loop(kvar, size, group, bodies, conds, bound, self.step_peak, peak)
        args = [r for r in group if r in self.argvar]
        if not args:
            return
        end = self.index_code(size)
        for r in args:
            self.line(f"{self.argvar[r]} = {end}")
        self.loop(kvar, size, args, bodies, conds, bound, self.step_arg, (peak, end))
        for r in args:          # nothing counted (an empty row, all masked): -1, as track_peak leaves it
            self.line(f"if {self.argvar[r]} == {end}:")
            self.line(f"    {self.argvar[r]} = -1")

    def step_of(self, r, step):
        return self.ride if isinstance(r, Rider) else self.check if isinstance(r, CheckRider) else step

    def check(self, r, b, kvar, state):
        self.line(f"bad_row |= not {r.cond.format(v=b)}")

    def ride(self, r, b, kvar, state):
        # a rider's step in the sum pass: its gradient entry, c·expr at this element
        self.line("if want_grad:")
        self.line(f"    {r.target.format(kvar)} = c * {b}")

    def step_peak(self, r, b, kvar, peak):
        m = peak[r]
        if isinstance(r, Min):
            self.line(f"{m} = _vmin({m}, {b})")
        else:
            self.line(f"{m} = _vmax({m}, {'abs(%s)' % b if isinstance(r, Norm) else b})")

    def step_arg(self, r, b, kvar, state):
        # the first index at the peak; at a NaN peak, the first NaN
        peak, end = state
        a = self.argvar[r]
        self.line(f"{a} = min({a}, {kvar} if {b} == {peak[r]} or {b} != {b} else {end})")


class Signature:
    """The kernel's arguments, and how sympy atoms map onto them."""

    def __init__(self, compiled):
        self.compiled = compiled
        defn = compiled.definition
        low = compiled.lowered
        self.inputs = [d for d in defn.of_kind("input")]
        self.targets = [d for d in defn.of_kind("target")]
        self.params = [d for d in defn.of_kind("param")]
        self.sizes = list(low.sizes)                       # axis names, in order
        self.batch = defn.batch
        self.array_of = {d.name: f"a{i}" for i, d in enumerate(self.inputs + self.targets)}
        self.grad_of = {d.name: f"g{i}" for i, d in enumerate(self.inputs)}
        self.has_class = any(d.domain.name == "class" for d in self.targets)
        # one number per sample in and out: the kernel's loop goes over runs of samples (_module)
        self.elementwise = not self.batch and not any(d.axes for d in self.inputs + self.targets)

    def bindings(self):
        """How the sympy atoms print: params p0.., sizes F(K0).., this sample's scalars v_a0..;
        the arrays of the vector inputs and targets; and the size variable of each axis."""
        low = self.compiled.lowered
        names = {low.scalars[d.name]: f"p{i}" for i, d in enumerate(self.params)}
        names.update({low.sizes[a]: f"F(K{i})" for i, a in enumerate(self.sizes)})
        scalar_vars = {d.name: "v_" + self.array_of[d.name] for d in self.inputs + self.targets if not d.axes}
        names.update({low.scalars[n]: v for n, v in scalar_vars.items()})
        fn_array = {low.arrays[d.name][0]: self.array_of[d.name] for d in self.inputs + self.targets if d.axes}
        size_var = {low.sizes[a]: f"K{i}" for i, a in enumerate(self.sizes)}
        return names, scalar_vars, fn_array, size_var

    def args(self):
        names = [self.array_of[d.name] for d in self.inputs + self.targets]
        names += [f"p{i}" for i in range(len(self.params))]
        names += [f"K{i}" for i in range(len(self.sizes))]
        names += ["w", "out"] + [self.grad_of[d.name] for d in self.inputs] + ["scale", "ignore"]
        names += ["has_w", "want_grad", "want_out", "serial"]
        return names


def render(compiled, dtype):
    """The module source for one dtype ('float32' or 'float64')."""
    sig = Signature(compiled)
    low = compiled.lowered
    lead = "" if sig.batch else "n, "
    names, scalar_vars, fn_array, size_var = sig.bindings()
    buffers = {fn: f"L{i}" for i, (_, fn, *_) in enumerate(compiled.locals)}
    buffers.update({fn: f"D{i}" for i, (_, fn, *_) in enumerate(compiled.adjoints)})

    def element(fn, idx):
        if fn in buffers:              # batch buffers carry no sample axis
            return f"{buffers[fn]}[{', '.join(idx)}]"
        return f"{fn_array[fn]}[{lead}{', '.join(idx)}]"

    em = VectorEmitter(names, element, lambda arr, k: f"{arr}[{lead}{k}]")
    em.depth = 2 if sig.batch else 3
    for d in sig.inputs + sig.targets:          # scalars of this sample
        if not d.axes:
            em.line(f"{scalar_vars[d.name]} = {sig.array_of[d.name]}[{'0' if sig.batch else 'n'}]")
    if sig.batch:
        _checks(em, sig, low, scalar_vars, size_var)
        _batch_body(em, compiled, sig, low, fn_array, size_var, buffers)
    else:
        _sample_body(em, compiled, sig, low, fn_array, size_var, scalar_vars)
    return _module(sig, dtype, em.lines, compiled)


def _sample_body(em, compiled, sig, low, fn_array, size_var, scalar_vars):
    """The checks, then one sample: reductions and value, then each gradient (vector ones as loops
    over their axes, or written by the value's sum pass over the same axis: ``Rider``)."""
    ready = set(em.names)         # params, sizes, this sample's scalars
    hoisted, maps = gradient_plan(em, compiled, sig, fn_array)
    # the maps' loop invariants of those alone (1/K of a mean, β/2) before the sums, so gradients
    # that read them can ride (the rest stay in the value's scope: CSE shares work with it)
    read = set().union(*(g.free_symbols for _, g, _ in maps))
    early = [(var, e) for var, e in hoisted
             if sp.Symbol("_" + var, real=True) in read and not e.atoms(Reduce) and e.free_symbols <= ready]
    ready |= {sp.Symbol("_" + var, real=True) for var, _ in early}
    # a gradient of the element alone: no reduction, nothing computed after the value's passes
    rideable = [(i, d, g, idx) for i, (d, g, idx) in enumerate(maps)
                if len(idx) == 1 and not g.atoms(Reduce) and g.free_symbols <= ready | {idx[0]}]
    late = _checks(em, sig, low, scalar_vars, size_var, {low.sizes[d.axes[0]] for _, d, _, _ in rideable})
    # the weight before the sums only where gradients may ride them: an elementwise kernel read
    # it after the value before riders existed, and LLVM's vector code is faster so (bce 2^24
    # float32 into reused memory: 43 ms with the weight first, 37 ms after the value)
    weight = ["wn = w[n] if has_w else F(1.0)", "c = wn * scale"]
    for line in weight if maps else ():
        em.line(line)
    em.scope(early, set())
    hoisted = [h for h in hoisted if h not in early]
    riders = {}         # Rider -> its map's position
    for i, d, g, idx in rideable:
        r = Rider(f"{sig.grad_of[d.name]}[n, {{}}]", g, idx[0])
        riders[r] = i
        em.riders.setdefault(low.sizes[d.axes[0]], []).append(r)
    em.scope([("val", compiled.expr)] + hoisted, set())
    left = {r for rs in em.riders.values() for r in rs}       # no sum pass over their axis
    em.riders.clear()
    rode = {i for r, i in riders.items() if r not in left}
    _late_checks(em, sig, late, left)
    if not maps:
        em.line(weight[0])
    em.line("lv = wn * val")
    em.line("if want_out:")
    em.line("    out[n] = lv")
    em.line("run_acc = _radd(run_acc, lv)" if sig.elementwise else "acc = _acc(acc, lv)")
    if any(not d.axes for d in sig.inputs) or len(rode) < len(maps):
        em.line("if want_grad:")
        em.depth += 1
        if not maps:
            em.line(weight[1])
        for d in sig.inputs:
            if not d.axes:
                em.line(f"{sig.grad_of[d.name]}[n] = c * d_{sig.grad_of[d.name]}")
        for i, (d, g, idx) in enumerate(maps):
            if i not in rode:
                _map_loop(em, f"{sig.grad_of[d.name]}[n, {{}}]", "c * ", g, idx, d.axes, size_var, low, False)
        em.depth -= 1


def _batch_body(em, compiled, sig, low, fn_array, size_var, buffers):
    """A batch loss: locals into buffers, the value, then adjoints in reverse, each a parallel map.
    Contractions are matrix products (_Products); a row reduction that two of these stages read is
    stored by a pass of its own before the first (_shared_rows, Emitter.store_row)."""
    def shape(axes):
        return "(" + "".join(f"{size_var[low.sizes[a]]}, " for a in axes) + ")"

    gemm = _Products(em, compiled, sig, fn_array, size_var, buffers)
    adjoints = [(*a[:4], read_locals(a[4], compiled.locals)) for a in compiled.adjoints]
    grads = {name: (read_locals(g, compiled.locals), idx) for name, (g, idx) in compiled.grads.items()}
    vector_grads = [(sig.grad_of[d.name], *grads[d.name], d.axes) for d in sig.inputs if d.axes]
    stages = [(body, idx, axes) for _, _, idx, axes, body in compiled.locals] + [(compiled.expr, (), ())]
    stages += [(e, idx, axes) for *_, idx, axes, e in adjoints] + [g[1:] for g in vector_grads]
    stages += [(grads[d.name][0], (), ()) for d in sig.inputs if not d.axes]
    shared = _shared_rows(em, low, stages)

    def lower(n, e, idx=(), axes=()):
        later = [s[0] for s in stages[n + 1:]]
        for r, row, size in shared.get(n, ()):
            em.store_row(gemm.lower(r, later=later), row, size)
        return gemm.lower(e, idx, axes, later)

    def store(fn, e, idx, axes, label, into=None):
        """fn's buffer = e over idx: a product itself (its helper divided it already) as it is, else
        a parallel map into ``into``, the buffer of the product e reads, or a new one."""
        if isinstance(e, AppliedUndef) and e.func in gemm.products and e.args == tuple(idx):
            em.line(f"{buffers[fn]} = {buffers[e.func]}    # {label}")
            return
        em.line(f"{buffers[fn]} = {into or gemm.reusable(e, idx) or f'np.empty({shape(axes)}, F)'}    # {label}")
        _map_loop(em, f"{buffers[fn]}[{{}}]", "", e, idx, axes, size_var, low, True)

    for n, (name, fn, idx, axes, body) in enumerate(compiled.locals):
        store(fn, lower(n, body, idx, axes), idx, axes, name)
    n = len(compiled.locals)
    em.scope([("val", lower(n, compiled.expr))], set())
    em.line("total = np.float64(val)")
    em.line("if want_out:")
    em.line("    out[0] = val")
    if not sig.inputs:
        return
    em.line("if want_grad:")
    em.depth += 1
    forward = {name: fn for name, fn, *_ in compiled.locals}
    later = [e for *_, e in adjoints] + [g for g, _ in grads.values()]
    for i, (name, fn, idx, axes, expr) in enumerate(adjoints):
        n += 1
        overwrite = _overwritable(forward[name], expr, idx, later[i + 1:])
        expr = lower(n, expr, idx, axes)
        if overwrite:
            store(fn, expr, idx, axes, f"d loss / d {name}, in place of {name}", buffers[forward[name]])
        else:
            store(fn, expr, idx, axes, f"d loss / d {name}")
    for grad, g, idx, axes in vector_grads:
        n += 1
        g = lower(n, g, idx, axes)
        _map_loop(em, f"{grad}[{{}}]", "scale * ", g, idx, axes, size_var, low, True)
    scalar_grads = [(f"d_{sig.grad_of[d.name]}", lower(n + 1 + k, grads[d.name][0]))
                    for k, d in enumerate(d for d in sig.inputs if not d.axes)]
    if scalar_grads:
        em.scope(scalar_grads, set())
    for d in sig.inputs:
        if not d.axes:
            em.line(f"{sig.grad_of[d.name]}[0] = scale * d_{sig.grad_of[d.name]}")
    em.depth -= 1


def _shared_rows(em, low, stages):
    """{stage number: [(r, row index, size)]}: the row reductions (one free index, and so any
    nested in them) that two stages or more read, to be stored by a pass of their own before the
    first of them, nested ones first: ntxent's logsumexp over each row of s, in the value and again
    in its adjoint; the norm of z(i)/max|z(i)|, in u and again in the gradient of z."""
    uses = {}
    for n, (e, idx, axes) in enumerate(stages):
        sizes = index_sizes(e, idx, [low.sizes[a] for a in axes])
        for r in sorted(e.atoms(Reduce), key=sp.default_sort_key):     # a set: same source every run
            row = em.row_index(r)
            if row is None or r.has(IsArg) or sizes.get(row) is None:
                continue
            uses.setdefault(row_key(r, row), {}).setdefault(n, (r, row, sizes[row]))
    out = {}
    for at in uses.values():
        if len(at) > 1:
            first = min(at)
            out.setdefault(first, []).append(at[first])
    return {n: sorted(rows, key=lambda x: len(x[0].atoms(Reduce))) for n, rows in out.items()}


class _Products:
    """The contractions of a batch kernel as matrix products (contract.py): _dot, _gram or np.dot,
    which numba hands to BLAS, each computed once before its first use and then read like a buffer;
    a product over a param (Σ/τ) is divided by _dot's and _gram's blocks as they are made."""

    def __init__(self, em, compiled, sig, fn_array, size_var, buffers):
        self.em, self.low, self.fn_array, self.size_var, self.buffers = em, compiled.lowered, fn_array, size_var, buffers
        # 2-D arrays of the kernel's float type, usable as BLAS operands as they are
        self.matrices = {fn for _, fn, _, axes, _ in compiled.locals + compiled.adjoints if len(axes) == 2}
        self.matrices |= {self.low.arrays[d.name][0] for d in sig.inputs if len(d.axes) == 2}
        self.axis_of = {size: a for a, size in self.low.sizes.items()}
        self.done = {}          # Sum -> the Function reading its product
        self.products = set()   # every Function reading a product

    def lower(self, e, idx=(), axes=(), later=()):
        """``e`` (a map over ``idx``) with its contractions read from products computed here.
        ``later``: the stages after it, which may still read a buffer that an operand would
        overwrite."""
        e = merge_transposed(e)
        sizes = index_sizes(e, idx, [self.low.sizes[a] for a in axes])
        found = {}
        for prod in products(e, lambda s: s not in self.em.names, tuple(idx)):
            readers = [e.xreplace({prod.total: sp.Integer(0)}), *later]
            # e = Σ/c, c free of the indices (s = u·uᵀ/τ): the product's helper divides its blocks
            q = e / prod.total
            c = q.base if q.is_Pow and q.exp == -1 and not q.free_symbols & set(idx) else None
            fn = self.done.get(prod.total)
            if fn is None:
                fn, folded = self._emit(prod, sizes, readers, c)
                if folded:
                    return fn(prod.p, prod.q)
            if fn is not None:
                found[prod.total] = fn(prod.p, prod.q)
        return e.xreplace(found)

    def reusable(self, e, idx):
        """The product a map over ``idx`` may be written over (it reads only one, only at its own
        element: s[i, j] = T[i, j]/τ), or None. The product is not reused after that."""
        reads = [a for a in e.atoms(AppliedUndef) if a.func in self.done.values()]
        if len({a.func for a in reads}) != 1 or any(a.args != tuple(idx) for a in reads):
            return None
        fn = reads[0].func
        self.done = {r: f for r, f in self.done.items() if f != fn}
        return self.buffers[fn]

    def _emit(self, prod, sizes, readers, divisor=None):
        """(the Function reading the product, or None; whether it is the product over ``divisor``)"""
        k = prod.total.index
        axes = {prod.p: self.axis_of.get(sizes.get(prod.p)), prod.q: self.axis_of.get(sizes.get(prod.q)),
                k: self.axis_of.get(prod.total.size)}
        if None in axes.values():
            return None, False
        left = self._operand(prod.left, prod.p, k, axes, readers)
        right = self._operand(prod.right, k, prod.q, axes, readers)
        name = self.em.fresh("T")
        folded = divisor is not None and not left.endswith(".T")
        d = self.em.code(divisor) if folded else "F(1.0)"
        if right == left + ".T":
            self.em.line(f"{name} = _gram({left}, {d})")
        elif left.endswith(".T"):
            self.em.line(f"{name} = np.dot({left}, {right})")
        else:
            self.em.line(f"{name} = _dot({left}, {right}, {d})")
        fn = sp.Function("_" + name, real=True)
        self.buffers[fn] = name
        self.products.add(fn)
        if not folded:
            self.done[prod.total] = fn
        return fn, folded

    def _operand(self, f, rows, cols, axes, readers):
        """Code for the matrix f[rows, cols]: an array as it is (or transposed); A + Aᵀ by _symadd,
        over A's own buffer where nothing in ``readers`` reads A again (else over a copy); else a
        buffer filled by a parallel map, laid out as f's arrays are read (their last index innermost)."""
        if isinstance(f, AppliedUndef) and f.func in self.matrices and set(f.args) == {rows, cols}:
            name = self.buffers.get(f.func) or self.fn_array[f.func]
            return name if f.args == (rows, cols) else name + ".T"
        a = f.args[0] if f.is_Add and len(f.args) == 2 else None
        if (isinstance(a, AppliedUndef) and a.func in self.matrices and set(a.args) == {rows, cols}
                and f == a + a.func(*a.args[::-1])):
            name = self.buffers.get(a.func)
            if name is None or any(r.has(a.func) for r in readers):
                name = self.em.fresh("P")
                self.em.line(f"{name} = {self.buffers.get(a.func) or self.fn_array[a.func]}.copy()")
            self.em.line(f"_symadd({name})")
            return name
        last = [a.args[-1] for a in f.atoms(AppliedUndef) if a.args and a.args[-1] in (rows, cols)]
        order = (cols, rows) if last and last[0] == rows else (rows, cols)
        name = self.em.fresh("P")
        self.em.line(f"{name} = np.empty(({', '.join(self.size_var[self.low.sizes[axes[s]]] for s in order)}), F)")
        _map_loop(self.em, f"{name}[{{}}]", "", f, order, [axes[s] for s in order], self.size_var, self.low, True)
        return name if order == (rows, cols) else name + ".T"


def _checks(em, sig, low, scalar_vars, size_var, ridden=()):
    """Count bad targets before reading through them; skip ignored samples. A row loss's vector
    target of values over an axis whose gradients ride the value's pass (``ridden``: axis sizes) is
    checked by that pass instead: the (target, CheckRider) pairs left for _late_checks."""
    if any(d.axes or d.domain.name == "class" for d in sig.targets):
        em.line("bad_row = False")
    early, late = False, []         # early: a check here sets bad_row
    for d in sig.targets:
        if d.domain.name == "class" and not d.axes:
            v, size = scalar_vars[d.name], size_var[low.sizes[d.domain.axis]]
            em.line(f"if {v} == ignore:")
            _zero_sample(em, sig)
            em.line("    continue")
            em.line(f"if {v} < 0 or {v} >= {size}:")
            em.line("    bad_row = True")
            early = True
            continue
        if d.domain.name == "class":
            size = size_var[low.sizes[d.domain.axis]]
            cond = "({v} >= 0 and {v} < %s)" % size
        else:
            cond = DOMAIN_CHECKS.get(d.domain.name)
        if cond is None:
            continue
        if not d.axes:
            # without a branch, so elementwise loops stay vectorizable (a flag per run there, see
            # _module); the caller raises
            ok = cond.format(v=scalar_vars[d.name])
            em.line(f"run_bad |= not {ok}" if sig.elementwise else f"bad += 0 if {ok} else 1")
        elif d.domain.name != "class" and len(d.axes) == 1 and low.sizes[d.axes[0]] in ridden:
            k = sp.Symbol("_check", integer=True)
            late.append((d, CheckRider(cond, low.arrays[d.name][0](k), k)))
            em.riders.setdefault(low.sizes[d.axes[0]], []).append(late[-1][1])
        else:
            _check_loop(em, sig, d, cond)
            early = True
    if early:
        _skip_bad(em, sig)
    return late


def _check_loop(em, sig, d, cond):
    lead = "" if sig.batch else "n, "
    idx = ", ".join(f"q{i}" for i in range(len(d.axes)))
    for i, a in enumerate(d.axes):
        em.line("    " * i + f"for q{i} in range(K{sig.sizes.index(a)}):")
    # a flag or-ed in, not set under an if: LLVM vectorizes the loop (vae_elbo's 784-wide
    # target check took a quarter of its time as a scalar loop)
    em.line("    " * len(d.axes) + f"bad_row |= not {cond.format(v=f'{sig.array_of[d.name]}[{lead}{idx}]')}")


def _skip_bad(em, sig):
    em.line("if bad_row:")
    em.line("    bad += 1")
    _zero_sample(em, sig)
    em.line("    continue")


def _late_checks(em, sig, late, left):
    """After the value's passes: the ``late`` checks no pass took (``left``: a loop each), then skip
    a bad sample. Nothing was read through these targets, so computing with a bad one was harmless."""
    for d, r in late:
        if r in left:
            _check_loop(em, sig, d, r.cond)
    if late:
        _skip_bad(em, sig)


def _zero_sample(em, sig):
    row = "0" if sig.batch else "n"
    em.line("    if want_out:")
    em.line(f"        out[{row}] = F(0.0)")
    if sig.inputs:
        em.line("    if want_grad:")
        for d in sig.inputs:
            em.line(f"        {sig.grad_of[d.name]}[{':' if sig.batch else 'n'}] = F(0.0)")


def _overwritable(fn, expr, idx, later):
    """Can the adjoint of local ``fn`` be written over ``fn``'s own buffer?

    Yes if no later stage reads ``fn`` and the adjoint at idx = (a, ...) reads ``fn`` only at
    idx itself or through reductions over row a alone (computed, at the row level of the parallel
    loop, before the row is overwritten). Then ntxent keeps one N x N buffer, not two.
    """
    if any(e.has(fn) for e in later):
        return False
    row = idx[0]

    def reads_ok(e, inside_row_reduction):
        if getattr(e, "func", None) == fn:
            return tuple(e.args) == tuple(idx) or (inside_row_reduction and e.args[0] == row)
        if isinstance(e, Reduce):
            free = {s for s in e.free_symbols if s in idx}
            inside_row_reduction = free <= {row}
            if not inside_row_reduction and e.has(fn):
                return False
        return all(reads_ok(a, inside_row_reduction) for a in e.args)
    return reads_ok(expr, False)


def _map_loop(em, target, factor, g, idx, axes, size_var, low, parallel):
    """for idx...: target[idx] = factor * g(idx); reductions computed at the outermost loop
    level where their indices are bound (a row's norm once per row, not once per element).
    A parallel map's innermost loop computes g at a generic index, and the points where g
    differs (_points) are written after it, computed before it (the map may overwrite what g reads)."""
    saved = dict(em.known), dict(em.reduction_symbol)
    loops = [em.fresh("j") for _ in idx]
    bound = set()
    generic, points = _points(g, idx[-1]) if parallel and idx else (g, [])
    fixed = []
    for level, (s, axis) in enumerate(zip(idx, axes)):
        size = size_var[low.sizes[axis]]
        if level == len(idx) - 1:
            fixed = [_at_point(em, g, s, c, size, bound) for c in points]
        em.loop_vars[s] = loops[level]
        loop = "numba.prange" if parallel and level == 0 else "range"
        em.line(f"for {loops[level]} in {loop}({size}):")
        em.depth += 1
        bound.add(s)
        if level < len(idx) - 1:
            em.reductions([generic], bound)
        if level == len(idx) - 2:
            _row_sums(em, generic, idx[-1], loops[-1], size_var[low.sizes[axes[-1]]], bound)
    gv = em.fresh("gv")
    em.scope([(gv, generic)], bound)
    em.line(f"{target.format(', '.join(loops))} = {factor}{gv}")
    em.depth -= 1
    for at, inside, value in fixed:
        em.line(f"if {inside}:")
        em.line(f"    {target.format(', '.join(loops[:-1] + [at]))} = {factor}{value}")
    em.depth -= len(idx) - 1
    em.known, em.reduction_symbol = saved


def _points(g, l):
    """(g at a generic l, the points c where it differs): [l = c] is 0 and a piecewise on l ≠ c
    (or l = c) takes its branch but at l = c, for c free of l. ntxent's d_s/N is
    e^(s - lse)·[l ≠ m] - [l = pos(m)]: the loop's exp vectorizes with no index compares left in it
    (1.13 -> 0.65 ms at 1024 x 1024, one thread), and rows m, pos(m) are written after it."""
    found = []

    def point(c):
        ok = l not in c.free_symbols and not c.atoms(Reduce)
        if ok and c not in found:
            found.append(c)
        return ok

    def generic(e):
        if isinstance(e, sp.KroneckerDelta) and l in e.args and point(e.args[e.args[0] == l]):
            return sp.Integer(0)
        if isinstance(e, sp.Piecewise) and len(e.args) == 2 and e.args[1].cond is sp.true:
            cond = e.args[0].cond
            if isinstance(cond, (sp.Ne, sp.Eq)) and l in cond.args and point(cond.args[cond.args[0] == l]):
                return e.args[0].expr if isinstance(cond, sp.Ne) else e.args[1].expr
        return e
    return g.replace(lambda e: isinstance(e, (sp.KroneckerDelta, sp.Piecewise)), generic), found


def _at_point(em, g, l, c, size, bound):
    """g at l = c, computed in the scope where l is not bound yet: (c's variable, the condition
    that c is inside l's range, the variable of the value)."""
    at, value = em.fresh("p"), em.fresh("fx")
    sym = sp.Symbol("_" + at, integer=True)
    em.line(f"{at} = {em.index_code(c)}")
    inside = f"{at} >= 0 and {at} < {size}"
    em.line(f"{value} = F(0.0)")
    em.line(f"if {inside}:")
    em.depth += 1
    em.loop_vars[sym] = at
    saved = dict(em.known), dict(em.reduction_symbol)
    em.scope([(value, substitute(g, {l: sym}))], bound | {sym})
    em.known, em.reduction_symbol = saved
    em.depth -= 1
    return at, inside, value


def _row_sums(em, g, last, last_var, last_size, bound):
    """Sums over k that depend on the innermost map index l, reading l only as the last index of
    its arrays, become one vector of accumulators per row: for k: for l: acc[l] += b(k, l).
    The inner loop has no reduction, so it vectorizes without reassociation, and it walks memory
    in order (d loss/d u[m, l] = Σ_i d_s[i, m]·u[i, l] reads u by rows, not by columns)."""
    for r in list(g.atoms(Sum)):
        if r in em.known or last not in r.free_symbols or r.body.atoms(Reduce):
            continue
        if not all(s in em.names or s in bound or s == last for s in r.free_symbols):
            continue
        uses = [a for a in r.body.atoms(AppliedUndef) if last in a.free_symbols]
        if not all(a.args[-1] == last and all(last not in x.free_symbols for x in a.args[:-1]) for a in uses):
            continue
        acc, kvar, lvar = em.fresh("acc"), em.fresh("k"), em.fresh("l")
        k, l_sym = sp.Symbol("_" + kvar, integer=True), sp.Symbol("_" + lvar, integer=True)
        em.loop_vars[k], em.loop_vars[l_sym] = kvar, lvar
        body = substitute(r.body, {r.index: k, last: l_sym})
        cond = substitute(r.cond, {r.index: k, last: l_sym})
        em.line(f"{acc} = np.zeros({last_size}, F)")
        em.line(f"for {kvar} in range({em.index_code(r.size)}):")
        em.line(f"    for {lvar} in range({last_size}):")
        em.depth += 2
        b = em.fresh("b")
        em.scope([(b, body if cond is sp.true else sp.Piecewise((body, cond), (0, True)))], bound | {k, l_sym})
        em.line(f"{acc}[{lvar}] += {b}")
        em.depth -= 2
        sym = sp.Symbol("_" + acc, real=True)
        em.names[sym] = f"{acc}[{last_var}]"
        em.known[r] = f"{acc}[{last_var}]"
        em.reduction_symbol[r] = sym


def _cpu_helpers():
    text = HELPERS
    for name in INLINED_HELPERS:
        text = text.replace(f"@HELPER\ndef {name}(", f"@numba.njit(error_model='numpy', forceinline=True)\ndef {name}(")
    # the vectorizable _log and _expm1, not libm's (HELPERS is shared with the CUDA back end)
    return text.replace("@HELPER", HELPER_DECORATOR).replace("math.log(", "_log(").replace("math.expm1(", "_expm1(")


def _no_wrappers(text):
    """``text`` with its numba functions built without the Python and C entry points numba makes
    for every function: only the kernel calls them (bce float64: 2.2 -> 1.7 s to compile)."""
    return text.replace("@numba.njit(", "@numba.njit(no_cpython_wrapper=True, no_cfunc_wrapper=True, ")


# no nnan/ninf: NaN checks and -inf masks must keep working (DESIGN_NOTES); no reassoc: it would
# fold the compensation terms of _exp and _log1p away (only _acc and _radd have it)
FLAGS = "error_model='numpy', nogil=True, fastmath={'nsz', 'contract'}"


def _module(sig, dtype, body, compiled):
    args = sig.args()
    runtime = "_swap_threads, _num_threads" + (", _dot, _gram, _symadd" if sig.batch else "")
    head = [f"# Generated by lossdsl for loss '{compiled.definition.name}', {dtype}. Do not edit.",
            "import math", "import numba", "import numpy as np", "from llvmlite import ir as llvm_ir",
            "from numba import types", "from numba.core import cgutils", "from numba.extending import intrinsic",
            f"from lossdsl.cpu_runtime import {runtime}    # cpu_runtime.py {RUNTIME_HASH}",
            "", f"F = np.{dtype}",
            "W = np.float64    # the terms of sums that cancel (helpers._sqdist_fast)",
            # read by api.Loss.kernel: the products (_dot, np.dot) run on one BLAS thread each (blas.py)
            f"MATRIX_PRODUCTS = {any('dot(' in ln for ln in body)}",
            _no_wrappers("".join([EXP32 if dtype == "float32" else EXP64, SUMS, _cpu_helpers()])), ""]
    kernel = [f"@numba.njit(parallel=True, cache=True, {FLAGS})", f"def kernel({', '.join(args)}):",
              "    threads = _swap_threads(1) if serial else 0", "    bad = 0"]
    tail = ["    if serial:", "        _swap_threads(threads)", "    return bad, total", ""]
    if sig.batch:
        return "\n".join(head + kernel + ["    total = 0.0", "    for _once in range(1):"] + body + tail)
    # A row loss's sample is a row's worth of work: one per block, or few rows would leave threads
    # idle (256 rows of 50k logits would be one block).
    block = BLOCK if sig.elementwise else 1
    kernel += [f"    N = {sig.array_of[(sig.inputs + sig.targets)[0].name]}.shape[0]",
               f"    part = np.empty((N + {block} - 1) // {block}, np.float64)"]
    # an unsigned n: numba then indexes without the wraparound select, which LLVM cannot prove
    # dead here and would vectorize as gathers and scatters
    loop = ["        acc = 0.0"]
    if block == 1:
        loop += ["        for n in range(np.uint64(blk), np.uint64(blk + 1)):"] + body
    else:
        loop += [f"        for r0 in range(blk * {block}, min(N, blk * {block} + {block}), {RUN}):",
                 "            run_acc = F(0.0)", "            run_bad = False",
                 f"            for n in range(np.uint64(r0), np.uint64(min(N, r0 + {RUN}))):"]
        loop += ["    " + ln for ln in body]
        loop += ["            acc = _acc(acc, run_acc)", "            bad += run_bad"]
    loop += ["        part[blk] = acc"]
    if len("\n".join(body)) <= SPLIT_BODY:
        kernel += ["    for blk in numba.prange(part.size):"] + loop + ["    total = _pairsum(part)"]
        return "\n".join(head + kernel + tail)
    shared = ", ".join(a for a in args if a != "serial")
    samples = [_no_wrappers(f"@numba.njit({FLAGS})"), f"def _samples(b0, b1, N, part, {shared}):",
               "    bad = 0", "    for blk in range(b0, b1):"] + loop + ["    return bad", "", ""]
    kernel += [f"    run = max(1, part.size if serial else part.size // ({CALLS_PER_THREAD} * _num_threads()))",
               "    for q in numba.prange((part.size + run - 1) // run):",
               f"        bad += _samples(q * run, min(part.size, q * run + run), N, part, {shared})",
               "    total = _pairsum(part)"]
    return "\n".join(head + samples + kernel + tail)
