"""GPU check of the CUDA back end: run on a machine with an NVIDIA GPU.

    python benchmarks/gpu_check.py --jobs 8 --compile --results benchmarks/RESULTS.md

needs numba-cuda (pip install 'lossdsl[cuda13]'); torch optional.

1. agree: every library loss on the GPU against its CPU kernels, float32 and float64: value and
   every gradient, reductions none (weighted) and mean; extras: long rows (cross_entropy,
   K = 50 000, masked), a bad class target, torch CUDA tensors passed straight in, and
   lossdsl.torch on CUDA tensors against the CPU bridge, on a side stream and in float16;
2. accuracy: every library loss's kernels on the accuracy audit's points (lossdsl.audit: bit
   patterns, realistic values, adversarial points), against exact arithmetic, on the GPU and on
   the CPU: the GPU's error in bits, per sampler and output, no worse than the CPU's (mean
   within 0.25 bits, p99 within 1 bit, no more non-finite results);
3. time: every workload of ``lossdsl bench`` (float32, forward + backward of the mean loss, its
   batch x 16 so the GPU runs well past its launch overhead) for lossdsl on device arrays,
   lossdsl.torch, torch eager and (``--compile``) torch.compile, next to a device-to-device copy
   of the same bytes (the memory floor); and the per-call time of an 8 x 10 batch;
4. one report (``--out``; ``--results`` puts it in RESULTS.md as its '## GPU' section). Exit
   status 1 if any check fails or a peer's value differs from lossdsl's by more than 1e-4.

The checks compile every kernel, single-threaded: ``--jobs N`` spreads them over N processes.
"""
import math
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lossdsl  # noqa: E402
from lossdsl.audit import audit  # noqa: E402
from lossdsl.bench import (GPU_SECTION, WORKLOADS, _builder, joined, torch_callable,  # noqa: E402
                           torch_step)
from lossdsl.bench import sections as results_parts  # noqa: E402
from numba import cuda  # noqa: E402

try:
    import torch
    HAVE_TORCH = torch.cuda.is_available()
except ImportError:
    torch, HAVE_TORCH = None, False

ROWS = []          # (section, what, result, detail)


def row(section, what, result, detail=""):
    ROWS.append((section, what, result, detail))
    print(f"  {section:8s} {what:44s} {result:>12s}  {detail}", flush=True)


# --------------------------------------------------------------------------------------
# 1. GPU == CPU
# --------------------------------------------------------------------------------------

def target(rng, dom, shape, sizes, axis):
    if dom == "class":
        return rng.integers(0, sizes[axis], size=shape)
    if dom == "unit":
        return rng.random(shape)
    if dom == "binary":
        return (rng.random(shape) > 0.5).astype(np.float64)
    if dom == "sign":
        return np.where(rng.random(shape) > 0.5, 1.0, -1.0)
    if dom == "simplex":
        e = np.exp(rng.standard_normal(shape))
        return e / e.sum(axis=-1, keepdims=True)
    if dom in ("positive", "nonnegative"):
        return rng.random(shape) + 0.1
    return rng.standard_normal(shape)


def make_args(f, dtype, rows=64, k=1000, seed=0):
    rng = np.random.default_rng(seed)
    batch = f._c.definition.batch
    sizes = {}
    for d in f._inputs + f._targets:
        for a in d.axes:
            sizes.setdefault(a, 64 if batch else (k if not sizes else 37))
    lead = () if batch else ((rows,) if any(d.axes for d in f._inputs + f._targets) else (rows, 513))
    arrays = [(3 * rng.standard_normal(lead + tuple(sizes[a] for a in d.axes))).astype(dtype) for d in f._inputs]
    for d in f._targets:
        t = target(rng, d.domain.name, lead + tuple(sizes[a] for a in d.axes), sizes, d.domain.axis)
        if batch and d.domain.name == "class":
            t = np.arange(sizes[d.axes[0]]) ^ 1
        arrays.append(t if d.domain.name == "class" else t.astype(dtype))
    return arrays, (() if batch else lead)


def max_err(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    both_nan = np.isnan(got) & np.isnan(want)
    scale = max(1.0, float(np.max(np.abs(want[np.isfinite(want)]), initial=0.0)))
    diff = np.where(both_nan, 0.0, np.abs(got - want) / (np.abs(want) + scale * 1e-3))
    return float(np.max(diff, initial=0.0))


def compare(f, arrays, dtype, sample, **kw):
    tol = 1e-4 if dtype == np.float32 else 1e-9
    worst = 0.0
    w = np.linspace(0.5, 2.0, int(np.prod(sample))).reshape(sample).astype(dtype) if sample else None
    for reduction in ("none", "mean"):
        extra = dict(kw, reduction=reduction)
        if reduction == "none" and w is not None:
            extra["weight"] = w
        v0, g0 = f.value_and_grad(*arrays, **extra)
        if "weight" in extra:
            extra["weight"] = cuda.to_device(w)
        v1, g1 = f.value_and_grad(*[cuda.to_device(a) for a in arrays], **extra)
        worst = max(worst, max_err(v1.copy_to_host(), v0, dtype))
        for a, b in zip(g1, g0):
            worst = max(worst, max_err(a.copy_to_host(), b, dtype))
    return worst, worst <= tol


def check_loss(name):
    """One library loss on the GPU against its CPU kernels, float32 and float64."""
    ok = True
    f = lossdsl.load(name)
    for dtype in (np.float32, np.float64):
        t = time.perf_counter()
        arrays, sample = make_args(f, dtype)
        err, good = compare(f, arrays, dtype, sample)
        ok &= good
        row("agree", f"{name} {np.dtype(dtype).name}", "ok" if good else "MISMATCH",
            f"max rel err {err:.1e} ({time.perf_counter() - t:.1f} s incl. compile)")
    return ok


def check_extras():
    """Long masked rows, a bad target, torch CUDA tensors in and out, the torch bridge."""
    ok = True
    f = lossdsl.load("cross_entropy")
    for dtype in (np.float32, np.float64):
        arrays, sample = make_args(f, dtype, rows=8, k=50000)
        arrays[0][0, ::7] = -np.inf
        arrays[0][1] *= 1e3
        err, good = compare(f, arrays, dtype, sample, label_smoothing=0.1)
        ok &= good
        row("agree", f"cross_entropy K=50000 masked {np.dtype(dtype).name}", "ok" if good else "MISMATCH",
            f"max rel err {err:.1e}")
    y = cuda.to_device(np.array([0, 5, 50000, 3]))
    try:
        f(cuda.to_device(np.zeros((4, 50000), np.float32)), y)
        row("errors", "class target out of range", "NOT RAISED")
        ok = False
    except lossdsl.DomainError as e:
        row("errors", "class target out of range", "ok", str(e)[:70])
    if HAVE_TORCH:
        z = torch.randn(64, 1000, device="cuda")
        yt = torch.randint(0, 1000, (64,), device="cuda")
        v, (g,) = f.value_and_grad(z, yt)
        zr = z.clone().requires_grad_()
        ref = torch.nn.functional.cross_entropy(zr, yt)
        ref.backward()
        err = max(abs(float(v) - float(ref)), float((g - zr.grad).abs().max()))
        good = isinstance(g, torch.Tensor) and g.is_cuda and err < 1e-5
        ok &= good
        row("agree", "torch CUDA tensors in, torch tensors out", "ok" if good else "MISMATCH", f"vs torch {err:.1e}")
        ok &= check_torch_bridge()
    return ok


def check_torch_bridge():
    """lossdsl.torch on CUDA tensors: autograd against the CPU bridge, on the default stream and on
    a side stream (the kernels must run on torch's current stream), and with float16 inputs."""
    import lossdsl.torch as lt
    ok = True
    rng = np.random.default_rng(3)
    cases = {"cross_entropy": lambda: (rng.standard_normal((256, 1000)), rng.integers(0, 1000, 256)),
             "bce": lambda: (rng.standard_normal(100000) * 4, (rng.random(100000) > 0.5) * 1.0),
             "triplet": lambda: tuple(rng.standard_normal((512, 64)) for _ in range(3))}
    for name, make in cases.items():
        arrays = make()
        n_in = len(lossdsl.load(name).inputs)
        for where in ("default stream", "side stream", "float16"):
            dt = torch.float16 if where == "float16" else torch.float32
            cpu = [torch.tensor(a, dtype=dt if i < n_in else None) for i, a in enumerate(arrays)]
            cpu = [t.float() if t.dtype == torch.float64 else t for t in cpu]
            gpu = [t.cuda() for t in cpu]
            for t in cpu[:n_in] + gpu[:n_in]:
                t.requires_grad_()
            f = lt.function(name)
            stream = torch.cuda.Stream() if where == "side stream" else torch.cuda.current_stream()
            with torch.cuda.stream(stream):
                v = f(*gpu, reduction="none")
                w = torch.linspace(-1, 2, v.numel(), device="cuda").reshape(v.shape)
                (v.float() * w).sum().backward()
            torch.cuda.synchronize()
            vc = f(*cpu, reduction="none")
            (vc.float() * w.cpu()).sum().backward()
            tol = 2e-2 if dt == torch.float16 else 1e-4
            err = max([float((v.float().cpu() - vc.float()).abs().max())] +
                      [float((a.grad.float().cpu() - b.grad.float()).abs().max())
                       for a, b in zip(gpu[:n_in], cpu[:n_in])])
            good = v.is_cuda and all(a.grad.is_cuda and a.grad.dtype == dt for a in gpu[:n_in]) and err < tol
            ok &= good
            row("torch", f"lossdsl.torch {name} {where}", "ok" if good else "MISMATCH", f"vs CPU bridge {err:.1e}")
    return ok


# --------------------------------------------------------------------------------------
# 2. accuracy: the GPU against exact arithmetic, no worse than the CPU
# --------------------------------------------------------------------------------------

def check_accuracy(name, points=12, batch_points=2, seed=20240604):
    """Both audits draw the same points (same seed); the truth is lossdsl.exact's."""
    ok = True
    f = lossdsl.load(name)
    n = batch_points if f._c.definition.batch else points
    for dtype in ("float32", "float64"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gpu = audit(f, dtype, points=n, seed=seed, naive=False, device=True)
            cpu = audit(f, dtype, points=n, seed=seed, naive=False)
        worse, top = [], 0.0
        for sampler, per in gpu.by_sampler.items():
            for o, g in per.items():
                c = cpu.by_sampler[sampler][o]
                top = max(top, g.mean)
                if g.nonfinite > c.nonfinite or g.mean > c.mean + 0.25 or g.p99 > c.p99 + 1:
                    worse.append(f"{o}/{sampler} {g.mean:.2f}/{g.p99:.1f} vs CPU {c.mean:.2f}/{c.p99:.1f}")
        ok &= not worse
        row("accuracy", f"{name} {dtype}", "ok" if not worse else "WORSE",
            "; ".join(worse)[:200] or f"worst mean {top:.2f} bits ({n} points per sampler)")
    return ok


# --------------------------------------------------------------------------------------
# 3. timings
# --------------------------------------------------------------------------------------

#: the batch of each CPU workload is repeated this many times on the GPU (2^24 elements run in
#: tens of µs there, near the launch overhead); batch losses (one N x N problem) are drawn at 4 N
SCALE, BATCH_SCALE = 16, 4


def timed(fn, reps=7):
    """Median milliseconds of ``reps`` synchronized calls after a warm-up call (3 when a call
    takes over 0.2 s)."""
    fn()
    cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        cuda.synchronize()
        ts.append(time.perf_counter() - t)
        if ts[0] > 0.2 and len(ts) == 3:
            break
    return sorted(ts)[len(ts) // 2] * 1e3


def device_workload(w):
    """(shape, device arrays): the CPU benchmark's float32 data (lossdsl.bench.WORKLOADS) with its
    batch repeated SCALE times on the device, or drawn at BATCH_SCALE x N for a batch loss."""
    if lossdsl.load(w.loss)._c.definition.batch:
        shape = (w.shape[0] * BATCH_SCALE,) + w.shape[1:]
        arrays = _builder(w.kind)(np.random.default_rng(0), shape, np.dtype("float32"))
        return shape, [cuda.to_device(a) for a in arrays]
    shape, arrays = w.arrays("full", "float32")
    out = []
    for a in arrays:
        src, n = cuda.to_device(a), len(a)
        big = cuda.device_array((SCALE * n,) + a.shape[1:], a.dtype)
        for r in range(SCALE):
            big[r * n:(r + 1) * n].copy_to_device(src)
        out.append(big)
    return (SCALE * shape[0],) + shape[1:], out


def bench_workload(w, compiled):
    """One row: lossdsl on device arrays, lossdsl.torch, torch eager (torch.compile when
    ``compiled``), and a device-to-device copy of the bytes read and written (the floor)."""
    loss = lossdsl.load(w.loss)
    shape, arrays = device_workload(w)
    t_ours = timed(lambda: loss.value_and_grad(*arrays, **w.params))
    value, grads = loss.value_and_grad(*arrays, **w.params)
    value = float(value.copy_to_host())
    src = list(arrays) + list(grads)
    dst = [cuda.device_array_like(a) for a in src]
    t_copy = timed(lambda: [d.copy_to_device(a) for d, a in zip(dst, src)])
    moved = sum(a.nbytes for a in src)
    r = {"label": w.label, "shape": w.shape_text(shape), "lossdsl": t_ours, "copy": t_copy,
         "GB/s": moved / t_ours / 1e6, "diff": None}
    if HAVE_TORCH:
        import lossdsl.torch as lt
        bridge = lt.function(w.loss)
        r["lossdsl.torch"] = timed(torch_step(loss, arrays, lambda ts: bridge(*ts, **w.params), "cuda"))
        eager = torch_callable(loss, arrays, w.params, device="cuda")
        r["torch"] = timed(eager)
        r["diff"] = abs(float(eager()) - value) / max(abs(value), 1e-30)
        if compiled:
            run = torch_callable(loss, arrays, w.params, compiled=True, device="cuda")
            r["torch.compile"] = timed(run)     # its first call (in timed's warm-up) compiles
        torch.cuda.empty_cache()
    return r


def bench_tiny():
    """Per-call time of cross_entropy 8 x 10 (µs): the overhead a small batch sees."""
    ce = lossdsl.load("cross_entropy")
    rng = np.random.default_rng(0)
    z, y = cuda.to_device(rng.standard_normal((8, 10)).astype(np.float32)), cuda.to_device(rng.integers(0, 10, 8))
    r = {"label": "cross_entropy (per call, µs)", "shape": "8 x 10",
         "lossdsl": timed(lambda: [ce.value_and_grad(z, y) for _ in range(100)]) * 10}
    if HAVE_TORCH:
        import lossdsl.torch as lt
        bridge = lt.function("cross_entropy")
        for col, run in (("lossdsl.torch", torch_step(ce, (z, y), lambda ts: bridge(*ts), "cuda")),
                         ("torch", torch_callable(ce, (z, y), {}, device="cuda"))):
            r[col] = timed(lambda: [run() for _ in range(100)]) * 10
    return r


COLUMNS = ("lossdsl", "lossdsl.torch", "torch", "torch.compile", "copy")


def time_table(rows):
    """Markdown: ms per call (the tiny row: µs), ratios against torch's best."""
    head = ["loss", "shape"] + [f"{c} ms" for c in COLUMNS] + ["GB/s (lossdsl)", "best torch / lossdsl",
                                                              "value rel. diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peers = [r[c] for c in ("torch", "torch.compile") if r.get(c)]
        ratio = f"{min(peers) / r['lossdsl']:.2f}x" if peers else "-"
        diff = "-" if r.get("diff") is None else f"{r['diff']:.1e}" + (" MISMATCH" if r["diff"] > 1e-4 else "")
        cells = [r["label"], r["shape"]] + [f"{r[c]:.3g}" if r.get(c) else "-" for c in COLUMNS]
        cells += [f"{r['GB/s']:.0f}" if r.get("GB/s") else "-", ratio, diff]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench(compiled, deadline):
    rows = []
    for w in WORKLOADS:
        if w.tiny:
            continue
        if time.perf_counter() > deadline:
            print(f"  time     {w.label}: skipped (over the time budget)", flush=True)
            continue
        try:
            r = bench_workload(w, compiled and time.perf_counter() < deadline - 60)
        except Exception as e:     # one workload failing must not lose the others' rows
            row("time", w.label, "FAILED", f"{type(e).__name__}: {str(e)[:150]}")
            continue
        rows.append(r)
        print("  time     " + time_table([r]).splitlines()[-1], flush=True)
    rows.append(bench_tiny())
    return rows


# --------------------------------------------------------------------------------------
# 4. driver: the checks in parallel processes (compiling is single-threaded), then the timings
# --------------------------------------------------------------------------------------

def describe():
    import numba
    dev = cuda.get_current_device()
    name = getattr(dev, "name", "numba's CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else name
    versions = [f"numpy {np.__version__}", f"numba {numba.__version__}"]
    try:
        import numba_cuda
        versions.append(f"numba-cuda {numba_cuda.__version__}")
    except ImportError:
        pass
    versions.append(f"torch {torch.__version__}" if torch is not None else "torch not installed")
    return name, (f"{name}, compute capability {getattr(dev, 'compute_capability', '-')}, "
                  f"{getattr(dev, 'MULTIPROCESSOR_COUNT', '-')} SMs; "
                  f"python {sys.version.split()[0]}, " + ", ".join(versions))


def run_checks(sections, names):
    ok = True
    for name in names:
        for section, check in (("agree", check_loss), ("accuracy", check_accuracy)):
            if section in sections:
                try:
                    ok &= check(name)
                except Exception as e:
                    row(section, name, "FAILED", f"{type(e).__name__}: {str(e)[:150]}")
                    ok = False
    if "extras" in sections:
        try:
            ok &= check_extras()
        except Exception as e:
            row("extras", "extras", "FAILED", f"{type(e).__name__}: {str(e)[:150]}")
            ok = False
    return ok


def run_parallel(sections, names, jobs):
    """The checks split over ``jobs`` processes; their rows are merged in order."""
    import json
    import subprocess
    import tempfile
    parts = [names[i::jobs] for i in range(jobs)]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, part in enumerate(parts):
            only = [s for s in sections if s != "extras"] + (["extras"] if i == 0 and "extras" in sections else [])
            if not part and only == []:
                continue
            out = os.path.join(tmp, f"{i}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--only", ",".join(only) or "none",
                   "--losses", ",".join(part) or "none", "--rows", out]
            procs.append((subprocess.Popen(cmd), out))
        ok = True
        for p, out in procs:
            ok &= p.wait() == 0
            if os.path.exists(out):
                with open(out) as fh:
                    ROWS.extend(tuple(r) for r in json.load(fh))
    return ok


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="agree,accuracy,extras,time", help="sections to run")
    ap.add_argument("--losses", default="", help="comma-separated library losses (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for the checks")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) on the GPU")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: no new timing starts after it")
    ap.add_argument("--out", help="write the report (Markdown) to this file")
    ap.add_argument("--results", help="replace the '## GPU' section of this RESULTS.md with the report")
    ap.add_argument("--rows", help=argparse.SUPPRESS)      # a worker's rows, as JSON
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=RuntimeWarning)    # the simulator's inf - inf
    warnings.filterwarnings("ignore", message=".*Grid size")        # small test batches
    t0 = time.perf_counter()
    sections = args.only.split(",")
    names = [n for n in args.losses.split(",") if n and n != "none"] if args.losses else lossdsl.names()
    name, described = describe()
    if not args.rows:
        print(f"device: {described}; torch CUDA: {HAVE_TORCH}", flush=True)
    checks = [s for s in sections if s in ("agree", "accuracy", "extras")]
    if args.jobs > 1 and checks:
        ok = run_parallel(checks, names, args.jobs)
    else:
        ok = run_checks(checks, names)
    if args.rows:
        import json
        with open(args.rows, "w") as fh:
            json.dump(ROWS, fh)
        return 0 if ok else 1
    times = bench(args.compile, t0 + args.budget) if "time" in sections else []
    ok &= not any(r.get("diff") is not None and r["diff"] > 1e-4 for r in times)
    checked = "\n".join("| " + " | ".join(r) + " |" for r in ROWS)
    report = [GPU_SECTION.rstrip(), "", f"Produced by `python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` on "
              f"{time.strftime('%Y-%m-%d')}: {described}.", ""]
    if times:
        report += ["Forward + backward of the mean loss, float32, median of 7 synchronized calls after a "
                   f"warm-up; the CPU workloads' batch x {SCALE} (batch losses: N x {BATCH_SCALE}); "
                   "lossdsl: numba device arrays in and out; lossdsl.torch: the autograd bridge on CUDA "
                   "tensors; copy: device-to-device copies of the inputs, targets and gradients (the "
                   "memory floor); GB/s: those bytes read and written over lossdsl's time.", "",
                   time_table(times), ""]
    if ROWS:
        report += ["| section | what | result | detail |", "|---|---|---|---|", checked, ""]
    report += [f"{'All checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.0f} s."]
    text = "\n".join(report) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.results:
        with open(args.results) as fh:
            cpu = results_parts(fh.read())[0]
        with open(args.results, "w") as fh:
            fh.write(joined(cpu, text))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
