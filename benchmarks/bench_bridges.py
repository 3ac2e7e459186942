"""Cost of the framework bridges (lossdsl.torch, lossdsl.jax) over calling the kernel directly.

    python benchmarks/bench_bridges.py [--quick | --repeat N] [--only torch|jax] [--out benchmarks/BRIDGES.md]

1. Per-call overhead on a tiny batch (cross_entropy 8 x 10, float32), forward + backward:
   lossdsl.torch against F.cross_entropy, and the direct numpy call (Loss.value_and_grad);
   lossdsl.jax (jit of value_and_grad) against optax's loss under the same jit.
   Target: lossdsl.torch within 2x of torch's own.
2. Throughput on the large shapes of benchmarks/RESULTS.md: the bridge's forward + backward
   against the direct kernel call on the same data. Target: within 5%.
Each timing is the best (and the median) of several runs after a warm-up; everything is measured
in one run, the direct call and the bridges taking turns (a machine shared with other work slows
them alike; on a busy machine compare the best times, and the ratios within one run only).
``--only`` measures one bridge (with the direct call), leaving the other out of the report.
"""
import argparse
import os
import platform
import time

import numba
import numpy as np

import lossdsl

try:
    import torch
    import torch.nn.functional as F
    import lossdsl.torch as lt
except ImportError:
    torch = None
try:
    import jax
    import optax
    import lossdsl.jax as lj
except ImportError:
    jax = None


WHY = """Where the time goes (2-core machine shared with other work, 2026-11-30; process CPU time
and page faults from getrusage, per-phase timers, cProfile):

- Tiny batch, direct call. What remains around the kernel's own call (about 2.5 µs, most of it
  numba unboxing 13 arguments) is one dict look-up of the checked signature (call.checked) and the
  per-signature layout decisions made once (api._Host): 11.5 -> 7.3 µs of CPU per call.
- Tiny batch, lossdsl.torch. It now costs what the bare torch.autograd.Function around the direct
  call costs (the row above it): Function.apply and the autograd engine's backward, 27-65 µs of
  CPU per call on this machine depending on its load, are torch's, paid by any Python
  autograd.Function (torch's own
  F.cross_entropy runs two C++ nodes). Our part is the direct call plus numpy views of the tensors.
  On a busy machine torch's own F.cross_entropy is erratic with 2 threads (it waits for a
  descheduled OpenMP worker: 0.2-2.8 ms per call seen, in a process that never imported lossdsl
  too), hence the rows on one torch thread, where it takes its quiet-machine 50 µs.
- Large shapes, lossdsl.torch. Within the noise of the direct call: process CPU time per call
  cross_entropy 40.1 vs 40.2 ms, bce 76.7 vs 77.8, triplet 45.0 vs 42.6 (best of 9), no page
  faults; the bare autograd.Function column gives the same figures. Both lease their large
  results (buffers.py): the gradient released by the step before (zero_grad, .grad = None) takes
  no fresh pages. torch's and numba's work share one OpenMP pool and the calling thread.
- Large shapes, lossdsl.jax: the kernel writes XLA's result buffers, which glibc maps fresh for
  every call (blocks over 32 MiB are always mmap'd, its M_MMAP_THRESHOLD cannot go higher), so
  each call pays page faults and the zeroing of every result page: per call 671 faults and
  +12 ms of CPU on cross_entropy (52.3 vs 40.0 ms), 544 and +12 ms on bce, 1584 and +14 ms on
  triplet, with the huge-page advice xla_ffi gives result buffers (without it: 16001-24579
  faults, +24-42 ms). The kernel on jax's own input buffers with a leased result (last column's
  reference) is within 1-3% of the direct call; outside the kernel a large call spends about 1 ms
  (jit dispatch, the FFI handler, unmapping the last call's results; 8 x 10: 35 µs in all, 8 of
  them XLA's own dispatch and 8 the ctypes handler): the result memory is the gap. Run with
  GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296 (malloc never
  maps, never trims: memory is reused, a process-wide choice the library must not make) the
  faults go to 0 and the ratio drops to 1.11 / 1.20 / 1.16 (CPU time), the rest being 4 KiB
  pages under XLA's heap buffers (TLB misses) where numpy's arrays get 2 MiB pages. Every jax op
  that makes a large array pays the same; jax's own way to reuse memory is buffer donation
  (jax.jit(..., donate_argnums)), which a loss's gradient output cannot use for its inputs."""


class Timing(float):
    """The best time of a call (a float, what ratios use), with the median beside it."""

    def __new__(cls, times):
        t = super().__new__(cls, min(times))
        t.median = sorted(times)[len(times) // 2]
        return t


def interleaved(fns, repeat, inner=1):
    """The Timing of each of ``fns``, measured in turns after one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            ts.append((time.perf_counter() - t) / inner)
    return [Timing(ts) for ts in times]


def tiny(repeat):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 10)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    ce = lossdsl.load("cross_entropy")

    def direct():
        ce.value_and_grad(z, y)
    rows = []
    if torch is not None:
        zt, yt = torch.from_numpy(z).requires_grad_(), torch.from_numpy(y)
        f = lt.function("cross_entropy")
        bare = _bare_function(ce)

        def ours():
            zt.grad = None
            f(zt, yt).backward()

        def theirs():
            zt.grad = None
            F.cross_entropy(zt, yt).backward()

        def floor():
            zt.grad = None
            bare(zt, yt).backward()
        compiled = torch.compile(lambda z, y: f(z, y))

        def ours_compiled():
            zt.grad = None
            compiled(zt, yt).backward()
        t_direct, t_ours, t_theirs, t_floor = interleaved([direct, ours, theirs, floor], repeat, 2000)
        # again on one torch thread: an 8 x 10 batch gains nothing from a second one, and torch's
        # own call waits for a descheduled worker when the machine is busy (a noisy comparison)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t_ours1, t_theirs1 = interleaved([ours, theirs], repeat, 2000)
        finally:
            torch.set_num_threads(threads)
        rows += [("lossdsl direct (numpy)", t_direct), ("lossdsl.torch", t_ours), ("torch F.cross_entropy", t_theirs),
                 ("a bare torch.autograd.Function around the direct call", t_floor),
                 ("lossdsl.torch, torch on 1 thread", t_ours1), ("torch F.cross_entropy, torch on 1 thread", t_theirs1),
                 ("lossdsl.torch under torch.compile (the custom op)", interleaved([ours_compiled], repeat, 500)[0])]
    else:
        rows.append(("lossdsl direct (numpy)", interleaved([direct], repeat, 2000)[0]))
    if jax is not None:
        zj, yj = jax.numpy.asarray(z), jax.numpy.asarray(y)
        fj = lj.function("cross_entropy")
        ours_j = jax.jit(jax.value_and_grad(lambda z: fj(z, yj)))
        theirs_j = jax.jit(jax.value_and_grad(
            lambda z: optax.softmax_cross_entropy_with_integer_labels(z, yj).mean()))
        t_direct, ours, theirs = interleaved([direct, lambda: jax.block_until_ready(ours_j(zj)),
                                              lambda: jax.block_until_ready(theirs_j(zj))], repeat, 2000)
        rows += [("lossdsl direct (numpy), in turns with the jax calls", t_direct),
                 ("lossdsl.jax (jit)", ours), ("optax (jit)", theirs)]
    return rows


def _bare_function(loss):
    """The least an autograd.Function around the direct call does (numpy views in, the value and
    the saved gradients out, handed back as they are): what lossdsl.torch costs at best, the rest
    being torch's own."""
    n_targets = len(loss.targets)

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *tensors):
            value, grads = loss.value_and_grad(*[t.numpy(force=True) for t in tensors])
            ctx.save_for_backward(*[torch.from_numpy(g) for g in grads])
            return torch.from_numpy(np.asarray(value))

        @staticmethod
        def backward(ctx, upstream):
            return (*ctx.saved_tensors, *(None,) * n_targets)
    return Bare.apply


def large_cases():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((16384, 1000)).astype(np.float32)
    yield "cross_entropy", "16384 x 1000", [z, rng.integers(0, 1000, 16384)]
    del z
    yield "bce", "16777216", [rng.standard_normal(1 << 24).astype(np.float32),
                              (rng.random(1 << 24) > 0.5).astype(np.float32)]
    yield "triplet", "65536 x 128", [rng.standard_normal((65536, 128)).astype(np.float32) for _ in range(3)]


def large(repeat):
    rows = []
    for name, shape, arrays in large_cases():
        loss = lossdsl.load(name)
        n_in = len(loss.inputs)
        fns = [lambda: loss.value_and_grad(*arrays)]
        if torch is not None:
            ts = [torch.from_numpy(a) for a in arrays]
            ins = [t.requires_grad_() for t in ts[:n_in]]
            f, bare = lt.function(name), _bare_function(loss)

            def bridge():
                for t in ins:
                    t.grad = None
                f(*ts).backward()

            def floor():
                for t in ins:
                    t.grad = None
                bare(*ts).backward()
            fns += [bridge, floor]
        if jax is not None:
            js = [jax.numpy.asarray(a) for a in arrays]
            fj = lj.function(name)
            # targets as arguments, as a training step's batch (closed over, they are constants of the executable)
            vg = jax.jit(jax.value_and_grad(fj, argnums=tuple(range(n_in))))
            fns.append(lambda: jax.block_until_ready(vg(*js)))
            views = [np.asarray(j) for j in js]         # jax's own buffers, no copy
            fns.append(lambda: loss.value_and_grad(*views))
        rows.append([name, shape, *interleaved(fns, repeat)])
    return rows


def report(tiny_rows, large_rows, flags="", load=()):
    ms = lambda s: f"{s * 1e3:.1f} ({s.median * 1e3:.1f})"            # noqa: E731
    us = lambda s: f"{s * 1e6:.1f} ({s.median * 1e6:.1f})"            # noqa: E731
    ratio = lambda a, b: f"{a / b:.3f} ({a.median / b.median:.3f})"   # noqa: E731
    out = ["# Framework bridges: overhead and throughput", "",
           f"Produced by `python benchmarks/bench_bridges.py{flags}` on {time.strftime('%Y-%m-%d')}.", "",
           f"- machine: {platform.machine()}, {numba.config.NUMBA_NUM_THREADS} cores, "
           f"{numba.get_num_threads()} threads for numba" + (f" and {torch.get_num_threads()} for torch" if torch else ""),
           f"- python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
           + (f", torch {torch.__version__}" if torch else ", torch not measured")
           + (f", jax {jax.__version__}, optax {optax.__version__}" if jax else ", jax not measured"),
           "- forward + backward of the mean loss, float32, best (median) of several runs after a warm-up, "
           "the calls of a table taking turns",
           "- load average (1 minute) before and after: " + ", ".join(f"{x:.1f}" for x in load), "",
           "## Per-call overhead: cross_entropy 8 x 10", "", "| call | µs per forward + backward |", "|---|---|"]
    out += [f"| {name} | {us(t)} |" for name, t in tiny_rows]
    t = dict(tiny_rows)
    if "lossdsl.torch" in t:
        one = ", torch on 1 thread"
        out += ["", f"lossdsl.torch / torch: {ratio(t['lossdsl.torch'], t['torch F.cross_entropy'])}; "
                    f"on 1 thread: {ratio(t['lossdsl.torch' + one], t['torch F.cross_entropy' + one])} "
                    f"(target: at most 2x)."]
    head = ["loss", "shape", "direct ms"] \
        + (["lossdsl.torch ms", "torch / direct", "bare Function / direct"] if torch else []) \
        + (["lossdsl.jax ms", "jax / direct", "jax / direct on jax's arrays"] if jax else [])
    out += ["", "## Throughput on the large shapes of RESULTS.md", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, shape, direct, *rest in large_rows:
        cells = [name, shape, ms(direct)]
        if torch:
            bridge, floor, *rest = rest
            cells += [ms(bridge), ratio(bridge, direct), ratio(floor, direct)]
        if jax:
            bridge, on_jax = rest
            cells += [ms(bridge), ratio(bridge, direct), ratio(bridge, on_jax)]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Target: each bridge within 5% of the direct call (ratio at most 1.05)."]
    out += ["", WHY]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--repeat", type=int, help="runs of each call (default 7, 3 with --quick)")
    ap.add_argument("--only", choices=("torch", "jax"), help="measure this bridge alone")
    ap.add_argument("--out", help="write the Markdown report here")
    args = ap.parse_args()
    global torch, jax
    if args.only == "torch":
        jax = None
    elif args.only == "jax":
        torch = None
    repeat = args.repeat or (3 if args.quick else 7)
    flags = (" --quick" if args.quick else "") + (f" --repeat {args.repeat}" if args.repeat else "") \
        + (f" --only {args.only}" if args.only else "")
    load = [os.getloadavg()[0]]
    tiny_rows, large_rows = tiny(repeat), large(repeat)
    text = report(tiny_rows, large_rows, flags, load + [os.getloadavg()[0]])
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
