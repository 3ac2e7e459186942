"""CPU speed of lossdsl's fused kernels against numpy and torch, measured in one run.

    python benchmarks/bench_cpu.py [--quick] [--out benchmarks/RESULTS.md]

Times forward + backward (value and gradient of the mean loss) for
  cross_entropy 16384 x 1000 float32, bce 2^24 float32         (issue: core compiler)
  ntxent N=1024 D=128 float32, triplet N=65536 D=128 float32    (issue: embedding losses)
against a numpy implementation (vectorized, stable formulas; matrix products for ntxent), torch
CPU autograd with the same thread count (where installed), and a plain copy of the input (the
memory floor). Also the first compile of a library loss and a cached load, each in a fresh
process. Each timing is the best of several runs after a warm-up.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time

import numba
import numpy as np

import lossdsl

try:
    import torch
except ImportError:
    torch = None


def best(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# --- numpy references (value and gradient of the mean) ------------------------------------------
def np_cross_entropy(z, y):
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    n = len(y)
    loss = np.mean(np.log(s[:, 0]) + m[:, 0] - z[np.arange(n), y])
    g = e / s
    g[np.arange(n), y] -= 1
    return loss, g / n


def np_bce(z, y):
    e = np.exp(-np.abs(z))
    loss = np.mean(np.maximum(z, 0) - z * y + np.log1p(e))
    sig = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return loss, (sig - y) / z.size


def np_ntxent(z, pos, tau=0.5):
    nrm = np.linalg.norm(z, axis=1, keepdims=True)
    u = z / nrm
    s = u @ u.T / tau
    n = len(z)
    np.fill_diagonal(s, -np.inf)
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    lse = np.log(e.sum(axis=1)) + m[:, 0]
    loss = np.mean(lse - s[np.arange(n), pos])
    ds = e / e.sum(axis=1, keepdims=True)
    ds[np.arange(n), pos] -= 1
    ds /= n
    du = (ds + ds.T) @ u / tau
    g = du / nrm - u * np.sum(du * u, axis=1, keepdims=True) / nrm
    return loss, g


def np_triplet(a, p, n, margin=1.0):
    dp = ((a - p) ** 2).sum(1)
    dn = ((a - n) ** 2).sum(1)
    h = dp - dn + margin
    active = (h > 0)[:, None] / len(a)
    return np.mean(np.maximum(h, 0)), (2 * (n - p) * active, -2 * (a - p) * active, 2 * (a - n) * active)


# --- torch ---------------------------------------------------------------------------------------
def torch_case(name, arrays):
    F = torch.nn.functional
    ts = [torch.from_numpy(a) for a in arrays]
    for t in ts:
        if t.dtype.is_floating_point:
            t.requires_grad_(True)

    def run():
        for t in ts:
            t.grad = None
        if name == "cross_entropy":
            loss = F.cross_entropy(ts[0], ts[1])
        elif name == "bce":
            loss = F.binary_cross_entropy_with_logits(ts[0], ts[1])
        elif name == "triplet":
            a, p, n = ts
            loss = torch.clamp(((a - p) ** 2).sum(1) - ((a - n) ** 2).sum(1) + 1.0, min=0).mean()
        else:
            z, pos = ts
            u = F.normalize(z, dim=1)
            s = u @ u.T / 0.5
            s = s.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
            loss = (torch.logsumexp(s, 1) - s[torch.arange(len(z)), pos]).mean()
        loss.backward()
    return run


def cases(quick):
    rng = np.random.default_rng(0)
    scale = 8 if quick else 1
    z = rng.normal(size=(16384 // scale, 1000)).astype(np.float32)
    yield "cross_entropy", (z, rng.integers(0, 1000, len(z))), np_cross_entropy
    zb = (3 * rng.normal(size=2 ** 24 // scale)).astype(np.float32)
    yield "bce", (zb, (rng.uniform(size=zb.size) > 0.5).astype(np.float32)), np_bce
    n = 1024 // (2 if quick else 1)
    zn = rng.normal(size=(n, 128)).astype(np.float32)
    yield "ntxent", (zn, np.arange(n) ^ 1), np_ntxent
    m = 65536 // scale
    yield "triplet", tuple(rng.normal(size=(m, 128)).astype(np.float32) for _ in range(3)), np_triplet


def compile_times():
    """(import, first compile, cached load) of focal: fresh processes sharing one empty cache dir."""
    script = textwrap.dedent("""
        import time, numpy as np
        t = time.perf_counter()
        import lossdsl
        t1 = time.perf_counter()
        f = lossdsl.load("focal")
        f.value_and_grad(np.zeros(4, np.float32), np.ones(4, np.float32))
        print(t1 - t, time.perf_counter() - t1)
    """)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, LOSSDSL_CACHE_DIR=cache)
        runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                               check=True).stdout.split()[-2:] for _ in range(2)]
    return float(runs[1][0]), float(runs[0][1]), float(runs[1][1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    rows = []
    for name, arrays, ref in cases(args.quick):
        f = lossdsl.load(name)
        t_ours = best(lambda: f.value_and_grad(*arrays), args.repeat)
        t_np = best(lambda: ref(*arrays), args.repeat)
        t_copy = best(lambda: [a.copy() for a in arrays if a.dtype.kind == "f"], args.repeat)
        t_torch = best(torch_case(name, arrays), args.repeat) if torch is not None else None
        v_ours = float(f.value_and_grad(*arrays)[0])
        v_np = float(ref(*arrays)[0])
        shape = " x ".join(map(str, arrays[0].shape))
        rows.append((name, shape, t_ours, t_np, t_torch, t_copy, abs(v_ours - v_np) / max(abs(v_np), 1e-30)))
        print(json.dumps(dict(zip(["loss", "shape", "lossdsl", "numpy", "torch", "copy", "rel_diff"], rows[-1]))),
              flush=True)
    imported, first, cached = compile_times()
    lines = [
        "# CPU benchmark results", "",
        f"Produced by `python benchmarks/bench_cpu.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}.", "",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores ({platform.processor() or 'cpu'}), "
        f"{threads} threads for numba and torch",
        f"- python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"torch {torch.__version__ if torch else 'not installed'}",
        "- forward + backward of the mean loss, float32, best of "
        f"{args.repeat} after a warm-up; ratio = other / lossdsl (above 1: lossdsl is faster)", "",
        "| loss | shape | lossdsl ms | numpy ms | torch ms | copy ms (floor) | vs numpy | vs torch | value rel. diff |",
        "|---|---|---|---|---|---|---|---|---|"]
    for name, shape, o, n, t, c, d in rows:
        tt = f"{t * 1e3:.1f}" if t else "-"
        rt = f"{t / o:.2f}x" if t else "-"
        lines.append(f"| {name} | {shape} | {o * 1e3:.1f} | {n * 1e3:.1f} | {tt} | {c * 1e3:.1f} | "
                     f"{n / o:.2f}x | {rt} | {d:.1e} |")
    lines += ["", f"`import lossdsl`: {imported:.2f} s. Then `focal`, float32, value and gradient: first compile "
                  f"(empty cache: sympy pipeline and numba) {first:.2f} s; in a second process, loaded from "
                  f"the cache (no sympy, no numba compile) {cached:.2f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
