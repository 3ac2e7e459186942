"""GPU check of the CUDA back end: run on a machine with an NVIDIA GPU (under 5 minutes).

    python benchmarks/gpu_check.py            # needs numba-cuda (pip install 'lossdsl[cuda]'); torch optional

1. every library loss on the GPU against its CPU kernels, float32 and float64: value and every
   gradient, reductions none (weighted) and mean, plus long rows (cross_entropy, K = 50 000)
   and torch CUDA tensors passed straight in (when torch is installed); lossdsl.torch on CUDA
   tensors against the CPU bridge, on a side stream and in float16;
2. accuracy: every library loss's kernels on the accuracy audit's points (lossdsl.audit: bit
   patterns, realistic values, adversarial points), against exact arithmetic, on the GPU and on
   the CPU: the GPU's error in bits, per sampler and output, no worse than the CPU's (mean
   within 0.25 bits, p99 within 1 bit, no more non-finite results);
3. timings, forward + backward, median of 5 after a warm-up: cross_entropy 65536 x 32000 float32
   and bce over 2^28 float32 elements, against torch CUDA where installed and a device-to-device
   copy of the input (the bandwidth floor);
4. one table. Exit status 1 if any comparison fails.
"""
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lossdsl  # noqa: E402
from lossdsl.audit import audit  # noqa: E402
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


def check_all():
    ok = True
    for name in lossdsl.names():
        f = lossdsl.load(name)
        for dtype in (np.float32, np.float64):
            t = time.perf_counter()
            arrays, sample = make_args(f, dtype)
            err, good = compare(f, arrays, dtype, sample)
            ok &= good
            row("agree", f"{name} {np.dtype(dtype).name}", "ok" if good else "MISMATCH",
                f"max rel err {err:.1e} ({time.perf_counter() - t:.1f} s incl. compile)")
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
                      [float((a.grad.float().cpu() - b.grad.float()).abs().max()) for a, b in zip(gpu, cpu)])
            good = v.is_cuda and all(a.grad.is_cuda and a.grad.dtype == dt for a in gpu[:n_in]) and err < tol
            ok &= good
            row("torch", f"lossdsl.torch {name} {where}", "ok" if good else "MISMATCH", f"vs CPU bridge {err:.1e}")
    return ok


# --------------------------------------------------------------------------------------
# 2. accuracy: the GPU against exact arithmetic, no worse than the CPU
# --------------------------------------------------------------------------------------

def check_accuracy(points=12, batch_points=2, seed=20240604):
    """Both audits draw the same points (same seed); the truth is lossdsl.exact's."""
    import warnings
    ok = True
    for name in lossdsl.names():
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

@cuda.jit
def _fill(a, scale, shift, seed):
    """Pseudo-random values in [shift, shift + scale) in a 1-D array, without a host array."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        h = (i * 2654435761 + seed) % 4294967296
        h = (h ^ (h >> 16)) * 73244475 % 4294967296
        a[i] = shift + scale * ((h % 1000003) / 1000003.0)


@cuda.jit
def _fill_int(a, k, seed):
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        a[i] = (i * 2654435761 + seed) % 4294967296 % k


def timed(fn, reps=5):
    fn()
    cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def bench():
    n, k = 65536, 32000
    z = cuda.device_array((n, k), np.float32)
    _fill[1024, 256](z.reshape(n * k), np.float32(8.0), np.float32(-4.0), 1)
    y = cuda.device_array(n, np.int64)
    _fill_int[256, 256](y, k, 7)
    gb = z.nbytes / 1e9
    ce = lossdsl.load("cross_entropy")
    t = timed(lambda: ce.value_and_grad(z, y))
    row("time", f"cross_entropy {n}x{k} f32 fwd+bwd lossdsl", f"{t:.1f} ms", f"{2 * gb / t * 1e3:.0f} GB/s (read z + write grad)")
    copy = cuda.device_array_like(z)
    t = timed(lambda: copy.copy_to_device(z))
    row("time", f"cross_entropy {n}x{k} f32 d2d copy", f"{t:.1f} ms", f"{2 * gb / t * 1e3:.0f} GB/s")
    del copy
    if HAVE_TORCH:
        zt = torch.as_tensor(z, device="cuda")
        yt = torch.as_tensor(y, device="cuda")

        def torch_ce():
            zr = zt.detach().requires_grad_()
            torch.nn.functional.cross_entropy(zr, yt).backward()
        t = timed(torch_ce)
        row("time", f"cross_entropy {n}x{k} f32 fwd+bwd torch", f"{t:.1f} ms")
        import lossdsl.torch as lt
        f = lt.function("cross_entropy")

        def bridge_ce():
            zr = zt.detach().requires_grad_()
            f(zr, yt).backward()
        t = timed(bridge_ce)
        row("time", f"cross_entropy {n}x{k} f32 fwd+bwd lossdsl.torch", f"{t:.1f} ms")
        zs, ys = zt[:8, :10].contiguous(), yt[:8] % 10
        t = timed(lambda: [f(zs.detach().requires_grad_(), ys).backward() for _ in range(100)]) * 10
        row("time", "cross_entropy 8x10 lossdsl.torch per call", f"{t:.0f} us")
        t = timed(lambda: [torch.nn.functional.cross_entropy(zs.detach().requires_grad_(), ys).backward()
                           for _ in range(100)]) * 10
        row("time", "cross_entropy 8x10 torch per call", f"{t:.0f} us")
        del zt
        torch.cuda.empty_cache()
    del z
    m = 1 << 28
    zb = cuda.device_array(m, np.float32)
    yb = cuda.device_array(m, np.float32)
    _fill[1024, 256](zb, np.float32(20.0), np.float32(-10.0), 3)
    _fill[1024, 256](yb, np.float32(1.0), np.float32(0.0), 5)
    bce = lossdsl.load("bce")
    gb = zb.nbytes / 1e9
    t = timed(lambda: bce.value_and_grad(zb, yb))
    row("time", "bce 2^28 f32 fwd+bwd lossdsl", f"{t:.1f} ms", f"{3 * gb / t * 1e3:.0f} GB/s (read z, y + write grad)")
    copy = cuda.device_array_like(zb)
    t = timed(lambda: copy.copy_to_device(zb))
    row("time", "bce 2^28 f32 d2d copy", f"{t:.1f} ms", f"{2 * gb / t * 1e3:.0f} GB/s")
    if HAVE_TORCH:
        zt = torch.as_tensor(zb, device="cuda")
        yt = torch.as_tensor(yb, device="cuda")

        def torch_bce():
            zr = zt.detach().requires_grad_()
            torch.nn.functional.binary_cross_entropy_with_logits(zr, yt).backward()
        t = timed(torch_bce)
        row("time", "bce 2^28 f32 fwd+bwd torch", f"{t:.1f} ms")


def main():
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
    print(f"device: {name}, compute capability {dev.compute_capability}, "
          f"{dev.MULTIPROCESSOR_COUNT} SMs; torch CUDA: {HAVE_TORCH}", flush=True)
    t0 = time.perf_counter()
    ok = check_all()
    ok &= check_accuracy()
    bench()
    print(f"\n| section | what | result | detail |\n|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    print(f"\n{name}: {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
