"""CUDA back end: one self-contained numba-cuda module per (loss, dtype).

The same stabilized, CSE'd expressions as the CPU back end (``Emitter`` from emit.py), laid
out for the GPU:

* elementwise losses (no axes): a grid-stride loop in which each thread first loads the inputs
  of UNROLL elements (a stride apart) and then computes them: UNROLL loads in flight per thread
  instead of one, which a memory-bound loop needs (mse over 2^28 float32 on an H200: 1.33 ->
  0.99 ms, 2.4 -> 3.2 TB/s). Each block sums its threads' weighted losses in shared memory and
  adds the sum to the device total with one atomic;
* row losses (inputs with axes): one warp per row (grid-stride over rows). Every reduction loop
  at row level is shared by the warp's lanes (``for k in range(tid, K, nt)``, nt = 32) and then
  combined by shuffles (max with NaN propagation, first-index argmax, sum), with no shared
  memory and no barrier; loops nested inside such a loop (and the gradient's own per-element
  reductions) stay serial in their lane. (A block per row, as before, paid two barriers per
  reduction: cross_entropy 262144 x 1000 float32 took 8.7 ms on an H200, a warp per row 2.6.)
* batch losses (``batch N``): one launch per stage (``_batch_stages``): the target checks and
  the value in one block, each buffer (indexed locals and their adjoints, scratch arrays passed
  in by the caller) and each gradient a map over the whole grid. (The whole batch in one block,
  as before, ran ntxent N = 4096 in 2.8 s on an H200.)

Targets are checked before anything is read through them, as on the CPU; a count of bad rows
goes to ``res[1]`` and the caller raises. Float32 kernels compute in float32 (``F(...)`` literals,
targets and weights converted on load); only the batch total and the counters are float64.

    kernel(inputs..., targets..., params..., sizes..., w, out, grads..., [buffers...,] res, value, mode,
           ignore, has_w, has_out, want_grad)
        arrays not wanted are passed empty and the flags say so (one compiled signature per dtype)
        res[0] += Σ w·loss, res[1] += bad rows; res[2] is the mean's denominator (read, never written);
        res[3] counts the blocks done: the last one writes value[0] = res[0] (sum) or res[0]/res[2]
        (mean; NaN if empty), unless value is empty (reduction "none"). No second launch.
        mode 1 = "mean" (gradients scaled by 1/res[2]), 0 = "sum"/"none"
    count_kept(classes, ignore, res)   res[2] += #(classes != ignore)   (losses with a class target)

Under ``NUMBA_ENABLE_CUDASIM=1`` the module runs as Python: ``math`` is then swapped for
``cuda_prelude.SIM_MATH`` (numpy functions), so overflow gives inf and log(0) gives -inf, as on the device,
instead of Python's exceptions, and float32 stays float32.
"""
import copy
import re

from .cuda_prelude import ARG, BLOCK, COUNT, HEAD, LIBM, MAXT, SIM_WARP, TAIL
from .emit import Emitter, computable, gradient_plan
from .helpers import DOMAIN_CHECKS, HELPERS
from .primitives import LogSumExp, Max, Min
from .render_cpu import Signature

UNROLL = 4          # elements per thread per step of an elementwise kernel's loop


def form(compiled):
    """'elementwise' (no axes), 'row' (a warp per sample) or 'batch' (the batch in stages)."""
    sig = Signature(compiled)
    if sig.batch:
        return "batch"
    return "row" if any(d.axes for d in sig.inputs + sig.targets) else "elementwise"


def buffers(compiled):
    """Batch losses: (kernel argument, name, axes) of each scratch buffer, in argument order."""
    out = [(f"L{i}", name, axes) for i, (name, _, _, axes, _) in enumerate(getattr(compiled, "locals", ()))]
    out += [(f"D{i}", name, axes) for i, (name, _, _, axes, _) in enumerate(getattr(compiled, "adjoints", ()))]
    return out


def kernel_args(compiled):
    sig = Signature(compiled)
    names = [sig.array_of[d.name] for d in sig.inputs + sig.targets]
    names += [f"p{i}" for i in range(len(sig.params))] + [f"K{i}" for i in range(len(sig.sizes))]
    names += ["w", "out"] + [sig.grad_of[d.name] for d in sig.inputs] + [b for b, _, _ in buffers(compiled)]
    names += ["res", "value", "mode", "ignore", "has_w", "has_out", "want_grad"]
    return names + ["stage"] if sig.batch else names


class BlockEmitter(Emitter):
    """An Emitter whose outermost reduction passes are shared by the threads of a group (a warp:
    ``fold`` "w", or a block: "b"): each thread takes every ``nt``-th element, then the group
    combines the partial results (``_w...`` by shuffles, ``_b...`` in shared memory). Loops inside such a loop (``open_loops`` > 0) are ordinary serial loops. A softmax's
    numerators are recomputed by the gradient pass (an exp is cheap on the GPU, memory traffic is
    not: cross_entropy reads a row three times and writes it once, not five times and twice)."""
    store_softmax = False

    def __init__(self, names, element, element_code, cooperative, fold="b"):
        super().__init__(names, element, element_code)
        self.cooperative = cooperative
        self.fold = fold

    def shared(self):
        return self.cooperative and not self.open_loops

    def loop_range(self, size):
        return f"range(tid, {self.index_code(size)}, nt)" if self.shared() else super().loop_range(size)

    def after_pass(self, kind, group, state):
        if not self.shared():
            return
        for r in group:
            if kind == "sum":
                self.line(f"{state[r]} = _{self.fold}sum({state[r]}, shf)")
            elif isinstance(r, (Max, Min, LogSumExp)):     # a logsumexp's shift keeps its argmax too
                a = self.argvar[r]
                kind = "min" if isinstance(r, Min) else "max"
                self.line(f"{state[r]}, {a} = _{self.fold}arg{kind}({state[r]}, {a}, shf, shi)")
            else:                         # the shift of a norm: NaN-propagating max
                self.line(f"{state[r]} = _{self.fold}max({state[r]}, shf)")


def render(compiled, dtype):
    """The CUDA module source for one dtype ('float32' or 'float64')."""
    sig = Signature(compiled)
    low = compiled.lowered
    kind = form(compiled)
    coop = kind != "elementwise"
    row = "0" if sig.batch else "n"
    lead = "" if sig.batch else "n, "
    names, scalar_vars, fn_array, size_var = sig.bindings()
    # targets arrive in their own dtype (no host-side copy): real-valued ones are converted on load
    cast = {sig.array_of[d.name] for d in sig.targets if d.domain.name != "class"}
    bufs = {}
    for (var, _, _), (_, fn, *_) in zip(buffers(compiled), list(getattr(compiled, "locals", ()))
                                         + list(getattr(compiled, "adjoints", ()))):
        bufs[fn] = var

    def element(fn, idx):
        if fn in bufs:
            return f"{bufs[fn]}[{', '.join(idx)}]"
        arr = fn_array[fn]
        text = f"{arr}[{lead}{', '.join(idx)}]"
        return f"F({text})" if arr in cast else text

    em = BlockEmitter(names, element, lambda arr, k: f"{arr}[{lead}{k}]", coop, "w" if kind == "row" else "b")
    em.depth = {"elementwise": 3, "row": 2, "batch": 1}[kind]     # inside the unrolled loop / row loop
    loads = []                      # (variable, its read with the sample's index as {})
    for d in sig.inputs + sig.targets:
        if not d.axes:
            arr, var = sig.array_of[d.name], scalar_vars[d.name]
            loads.append((var, f"F({arr}[{{}}])" if arr in cast else f"{arr}[{{}}]"))
            em.line(_unrolled(var) if kind == "elementwise" else f"{var} = {loads[-1][1].format(row)}")
    if sig.batch:
        stages = _batch_stages(em, compiled, sig, low, scalar_vars, size_var, cast)
    else:
        _checks(em, sig, low, scalar_vars, size_var, coop, cast)
        _sample_body(em, compiled, sig, low, fn_array, size_var, coop)
        stages = None
    return _module(compiled, sig, dtype, kind, em.lines, loads, stages)


def _unrolled(var):
    """``var`` of the element u of an elementwise kernel's unrolled step: ``var_0`` ... ``var_{UNROLL-1}``."""
    pick = f"{var}_{UNROLL - 1}"
    for u in reversed(range(UNROLL - 1)):
        pick = f"{var}_{u} if u == {u} else {pick}"
    return f"{var} = {pick}"


def _own(coop):
    """The guard of a write that one thread of the block does for all."""
    return "tid == 0" if coop else "True"


def _once(em, coop, lines):
    """Lines that one thread of the block runs for all (every thread, in elementwise kernels)."""
    if coop:
        em.line("if tid == 0:")
    for ln in lines:
        em.line(("    " if coop else "") + ln)


def _sample_body(em, compiled, sig, low, fn_array, size_var, coop):
    hoisted, maps = gradient_plan(em, compiled, sig, fn_array)
    em.scope([("val", compiled.expr)] + hoisted, set())
    em.line("wn = F(w[n]) if has_w else F(1.0)")
    _once(em, coop, ["total += T(wn * val)", "if has_out:", "    out[n] = wn * val"])
    if not sig.inputs:
        return
    em.line("if want_grad:")
    em.depth += 1
    em.line("c = wn * scale")
    for d in sig.inputs:
        if not d.axes:
            _once(em, coop, [f"{sig.grad_of[d.name]}[n] = c * d_{sig.grad_of[d.name]}"])
    for d, g, idx in maps:
        _map_loop(em, f"{sig.grad_of[d.name]}[n, {{}}]", "c * ", g, idx, d.axes, size_var, low, coop)
    em.depth -= 1


# what an emitter learns in one stage of a batch kernel (reductions computed, their argmax and
# stored rows): the next stage is another launch and must not read those variables
_STAGE_STATE = ("known", "reduction_symbol", "argvar", "parts", "peaks", "stored_rows", "exp_store",
                "last_terms", "loop_vars")


def _batch_stages(em, compiled, sig, low, scalar_vars, size_var, cast):
    """A batch loss as launches of one kernel, one per ``stage`` argument; returns the plan, a
    (kind, for the gradient only) pair per stage, which the module exports as STAGES. "block"
    stages run in one block whose threads fold the top-level reductions: the target checks
    (stage 0, where a target has a domain: a bad target stops the later stages) and the value. "map" stages run on the whole
    grid, each thread a share of the outer index: every buffer (the locals, then the adjoints) and
    each input's gradient (a single block used one of an H200's 132 multiprocessors for all of
    them: ntxent N = 4096 took 2.8 s). Stages share only buffers."""
    start = {a: copy.copy(getattr(em, a)) for a in _STAGE_STATE}
    stages = []

    def stage(kind, grad=False):
        for a, v in start.items():
            setattr(em, a, copy.copy(v))
        em.depth = 1
        em.line(f"if stage == {len(stages)}:")
        em.depth = 2
        em.line("tid = cuda.grid(1)" if kind == "map" else "tid = cuda.threadIdx.x")
        em.line("nt = cuda.gridsize(1)" if kind == "map" else "nt = cuda.blockDim.x")
        stages.append((kind, grad))

    mark = len(em.lines)
    stage("block")
    em.line("for n in range(1):")           # the checks leave a bad sample with `continue`
    em.depth = 3
    checks = len(em.lines)
    _checks(em, sig, low, scalar_vars, size_var, True, cast)
    if len(em.lines) == checks:             # no target to check: no stage 0
        del em.lines[mark:]
        stages.pop()
    else:
        em.depth = 2
        em.line("if tid == 0:")
        em.line("    cuda.atomic.add(res, 1, T(bad))")
    em.depth = 1
    em.line("if res[1] > 0:")               # the host raises; stage 0 zeroed the outputs
    em.line("    return")
    for fn_var, (name, fn, idx, axes, body) in zip([b for b, _, _ in buffers(compiled)],
                                                    getattr(compiled, "locals", ())):
        stage("map")
        _map_loop(em, f"{fn_var}[{{}}]", "", body, idx, axes, size_var, low, True)
    stage("block")
    em.scope([("val", compiled.expr)], set())
    em.line("if tid == 0:")
    em.line("    cuda.atomic.add(res, 0, T(val))")
    em.line("    if has_out:")
    em.line("        out[0] = val")
    em.line("    _finish(res, mode, value)")
    n_locals = len(getattr(compiled, "locals", ()))
    adj_vars = [b for b, _, _ in buffers(compiled)][n_locals:]
    for fn_var, (name, fn, idx, axes, expr) in zip(adj_vars, getattr(compiled, "adjoints", ())):
        stage("map", True)
        _map_loop(em, f"{fn_var}[{{}}]", "", expr, idx, axes, size_var, low, True)
    scalar_grads = [(f"d_{sig.grad_of[d.name]}", compiled.grads[d.name][0]) for d in sig.inputs if not d.axes]
    if scalar_grads:
        stage("block", True)
        em.scope(scalar_grads, set())
        for var, _ in scalar_grads:
            em.line("if tid == 0:")
            em.line(f"    {var[2:]}[0] = scale * {var}")
    for d in sig.inputs:
        g, idx = compiled.grads[d.name]
        if d.axes:
            stage("map", True)
            _map_loop(em, f"{sig.grad_of[d.name]}[{{}}]", "scale * ", g, idx, d.axes, size_var, low, True)
    return tuple(stages)


def _map_loop(em, target, factor, g, idx, axes, size_var, low, coop):
    """for idx...: target[idx] = factor * g(idx), the outer loop shared by the block's threads.
    Reductions inside are serial per thread, computed at the outermost level that binds their
    indices. Where nothing is computed per value of the outer index, the outer two indices are
    one shared loop (ntxent's s = u·uᵀ/τ: N² elements to share, not N rows)."""
    saved = dict(em.known), dict(em.reduction_symbol)
    loops, bound = [], set()
    em.open_loops += 1
    pair = coop and len(idx) > 1 and not computable([g], {idx[0]}, em)
    flat, opened = em.fresh("f") if pair else None, 0
    for level, (s, axis) in enumerate(zip(idx, axes)):
        var = em.fresh("j")
        em.loop_vars[s] = var
        size = size_var[low.sizes[axis]]
        if pair and level == 1:
            em.line(f"{var} = {flat} - {loops[0]} * {size}")
        elif pair and level == 0:
            inner = size_var[low.sizes[axes[1]]]
            em.line(f"for {flat} in range(tid, {size} * {inner}, nt):")
            em.line(f"    {var} = {flat} // {inner}")
        else:
            em.line(f"for {var} in range(tid, {size}, nt):" if coop and level == 0 else f"for {var} in range({size}):")
        if not (pair and level == 1):
            em.depth += 1
            opened += 1
        loops.append(var)
        bound.add(s)
        if level < len(idx) - 1 and not (pair and level == 0):
            em.reductions([g], bound)
    gv = em.fresh("gv")
    em.scope([(gv, g)], bound)
    em.line(f"{target.format(', '.join(loops))} = {factor}{gv}")
    em.depth -= opened
    em.open_loops -= 1
    em.known, em.reduction_symbol = saved


def _checks(em, sig, low, scalar_vars, size_var, coop, cast):
    """Count bad targets before reading through them; skip ignored samples. A vector target is
    checked by the whole block, each thread a share of it, then the block agrees."""
    lead = "" if sig.batch else "n, "
    whole = any(d.axes or d.domain.name == "class" for d in sig.targets)
    if whole:
        em.line("bad_row = 0")
    for d in sig.targets:
        if d.domain.name == "class" and not d.axes:
            v, size = scalar_vars[d.name], size_var[low.sizes[d.domain.axis]]
            em.line(f"if {v} == ignore:")
            _zero_sample(em, sig, low, size_var, coop)
            em.line("    continue")
            em.line(f"if {v} < 0 or {v} >= {size}:")
            em.line("    bad_row = 1")
            continue
        if d.domain.name == "class":
            cond = "({v} >= 0 and {v} < %s)" % size_var[low.sizes[d.domain.axis]]
        else:
            cond = DOMAIN_CHECKS.get(d.domain.name)
        if cond is None:
            continue
        if not d.axes:
            em.line(f"bad += 0 if {cond.format(v=scalar_vars[d.name])} else 1")
            continue
        arr = sig.array_of[d.name]
        idx = ", ".join(f"q{i}" for i in range(len(d.axes)))
        for i, a in enumerate(d.axes):
            k = f"K{sig.sizes.index(a)}"
            em.line("    " * i + (f"for q{i} in range(tid, {k}, nt):" if i == 0 else f"for q{i} in range({k}):"))
        value = f"{arr}[{lead}{idx}]"
        em.line("    " * len(d.axes) + f"if not {cond.format(v=value)}:")
        em.line("    " * len(d.axes) + "    bad_row = 1")
    if whole:
        em.line(f"bad_row = _{em.fold}or(bad_row, shi)")
        em.line("if bad_row:")
        em.line("    bad += 1")
        _zero_sample(em, sig, low, size_var, coop)
        em.line("    continue")


def _zero_sample(em, sig, low, size_var, coop):
    row = "0" if sig.batch else "n"
    lead = "" if sig.batch else "n, "
    em.line(f"    if has_out and {_own(coop)}:")
    em.line(f"        out[{row}] = F(0.0)")
    if not sig.inputs:
        return
    em.line("    if want_grad:")
    for d in sig.inputs:
        g = sig.grad_of[d.name]
        if not d.axes:
            em.line(f"        if {_own(coop)}:")
            em.line(f"            {g}[{row}] = F(0.0)")
            continue
        idx = ", ".join(f"z{i}" for i in range(len(d.axes)))
        for i, a in enumerate(d.axes):
            k = size_var[low.sizes[a]]
            em.line("    " * (2 + i) + (f"for z{i} in range(tid, {k}, nt):" if i == 0 else f"for z{i} in range({k}):"))
        em.line("    " * (2 + len(d.axes)) + f"{g}[{lead}{idx}] = F(0.0)")


def _module(compiled, sig, dtype, kind, body, loads, stages):
    args = ", ".join(kernel_args(compiled))
    helpers = HELPERS.replace("@HELPER", '@cuda.jit(device=True, inline="always")')
    assert "numba.njit" not in helpers, "helpers.HELPERS changed its decorator"
    lines = [HEAD.format(name=compiled.definition.name, dtype=dtype, form=kind, maxt=MAXT, scratch=MAXT + 32), LIBM,
             helpers, BLOCK,
             ARG.format(kind="max", op=">"), ARG.format(kind="min", op="<"), SIM_WARP, TAIL]
    if any(d.domain.name == "class" and not d.axes for d in sig.targets):
        lines.append(COUNT)
    first = f"{sig.array_of[(sig.inputs + sig.targets)[0].name]}.shape[0]"
    if stages is not None:
        lines += ["", f"STAGES = {stages!r}   # (kind, for the gradient only) of each stage: _batch_stages"]
    lines += ["", "@cuda.jit", f"def kernel({args}):"]
    scale = "scale = F(1.0) if mode != 1 or res[2] <= 0 else F(1.0) / F(res[2])"
    if kind == "elementwise":
        # the loads of UNROLL elements first, into scalars (registers, whether or not NVVM unrolls
        # the loop after them: a local array indexed by u went to local memory in focal's), then
        # the body for each element (_unrolled picks its values)
        pre = ["sht = cuda.shared.array(SCRATCH, T)", "tid = cuda.threadIdx.x", scale, "total = T(0.0)", "bad = 0",
               f"N = {first}", "stride = cuda.gridsize(1)", f"for n0 in range(cuda.grid(1), N, {UNROLL} * stride):"]
        for u in range(1, UNROLL):
            pre.append(f"    n{u} = n0 + {u} * stride")
        for u in range(UNROLL):
            pre += [f"    {var}_{u} = {read.format(f'n{u}')}" + (f" if n{u} < N else F(0.0)" if u else "")
                    for var, read in loads]
        pre += [f"    for u in range({UNROLL}):", "        n = n0 + u * stride", "        if n >= N:",
                "            break"]
        post = ["total = _bsum(total, sht)", "nbad = _bsum(T(bad), sht)"]
    elif kind == "row":             # a warp per row: tid is the lane; lane 0 holds the warp's sums
        pre = ["sht = cuda.shared.array(SCRATCH, T)", "shf = cuda.shared.array(SCRATCH, F)",
               "shi = cuda.shared.array(SCRATCH, np.int64)", "tid = cuda.threadIdx.x & 31", "nt = 32", scale,
               "total = T(0.0)", "bad = 0", f"N = {first}", "for n in range(cuda.grid(1) >> 5, N, cuda.gridsize(1) >> 5):"]
        post = ["total = _bsum(total if tid == 0 else T(0.0), sht)",
                "nbad = _bsum(T(bad) if tid == 0 else T(0.0), sht)"]
    else:                           # batch: each stage sets tid and nt, and writes res itself
        pre = ["shf = cuda.shared.array(SCRATCH, F)", "shi = cuda.shared.array(SCRATCH, np.int64)", scale, "bad = 0"]
        post = []
    if stages is None:
        post += ["if cuda.threadIdx.x == 0:", "    cuda.atomic.add(res, 0, total)", "    cuda.atomic.add(res, 1, nbad)",
                 "    _finish(res, mode, value)"]
    # arrays not wanted arrive empty: every write must be guarded by a flag, never by `is None`
    assert not any("is None" in ln or "is not None" in ln for ln in body), "a None check in a CUDA kernel"
    lines += ["    " + ln for ln in pre] + body + ["    " + ln for ln in post] + [""]
    text = "\n".join(lines)
    missing = set(re.findall(r"\b(_[a-z][a-z0-9_]*)\(", text)) - set(re.findall(r"^def (\w+)\(", text, re.M))
    if missing:
        raise NotImplementedError(f"the CUDA back end has no device function {', '.join(sorted(missing))}")
    return text


def sizes_of(compiled, axis_size):
    """Shapes of a batch loss's scratch buffers, given the call's axis sizes."""
    return [tuple(axis_size[a] for a in axes) for _, _, axes in buffers(compiled)]


