"""``lossdsl bench``: speed of the fused forward + backward against the peers a user would pick.

For each library loss on its workload (``WORKLOADS``: one row of data per benchmark) it times the
value and gradient of the mean loss computed by

* lossdsl: ``Loss.value_and_grad`` (one fused kernel call);
* numpy: a vectorized reference with stable formulas and a hand-derived gradient
  (lossdsl/peers.py, like the torch and jax formulas);
* torch: eager autograd through ``torch.nn.functional`` where it has the loss;
* torch.compile: the same torch function compiled by inductor (compiled and warmed up before
  the timing; forward and backward graphs both compiled by AOTAutograd);
* jax.jit: ``jax.jit(jax.value_and_grad(f))`` with optax's loss where optax has one;
* memcpy: ``np.copyto`` of the same bytes (inputs, targets and gradients): the memory floor.

torch, jax and optax are imported only when a benchmark runs (``import lossdsl`` never
imports them), and a missing one only drops its column.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field

import numpy as np

from .peers import jax_peers, numpy_value_and_grad, torch_peers

#: relative difference of the values (peer against lossdsl) that counts as a mismatch
TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
#: --size small divides the leading (batch) dimension by this
SMALL = 64
PEERS = ("numpy", "torch", "torch.compile", "jax.jit")


# ------------------------------------------------------------------------------------- workloads

def _builder(kind):
    """(rng, shape, dtype) -> arrays in the loss's order (inputs, then targets)."""
    def normal(rng, shape, dtype, scale=1.0):
        return (scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    def binary(rng, shape, dtype):
        return (rng.random(shape, dtype=np.float32) > 0.5).astype(dtype)

    def build(rng, shape, dtype):
        if kind == "logits":          # z ~ 3 N(0,1), hard 0/1 labels (bce, focal)
            return normal(rng, shape, dtype, 3.0), binary(rng, shape, dtype)
        if kind == "regression":      # yhat, y ~ N(0,1)
            return normal(rng, shape, dtype), normal(rng, shape, dtype)
        if kind == "sign":            # f ~ N(0,1), y = ±1
            return normal(rng, shape, dtype), 2 * binary(rng, shape, dtype) - 1
        if kind == "gaussian":        # mu, logvar ~ U(-1.5, 1.5), y
            return (normal(rng, shape, dtype), rng.uniform(-1.5, 1.5, shape).astype(dtype),
                    normal(rng, shape, dtype))
        if kind == "weights":
            return (normal(rng, shape, dtype),)
        if kind == "classes":         # logits (N, K), class indices (N,)
            return normal(rng, shape, dtype, 2.0), rng.integers(0, shape[1], shape[0])
        if kind == "multilabel":      # logits (N, K), 0/1 labels (N, K)
            return normal(rng, shape, dtype, 3.0), binary(rng, shape, dtype)
        if kind == "probs":           # logits (N, K), rows of a softmax (N, K)
            p = np.exp(normal(rng, shape, np.float64))
            return normal(rng, shape, dtype, 2.0), (p / p.sum(1, keepdims=True)).astype(dtype)
        if kind == "triplet":         # anchors, positives, negatives (N, D)
            return tuple(normal(rng, shape, dtype) for _ in range(3))
        if kind == "pairs":           # z1, z2 (N, D) with z2 near z1 for half the rows, y = similar
            z1, z2 = normal(rng, shape, dtype), normal(rng, shape, dtype, 0.1)
            return z1, z2, binary(rng, shape[:1], dtype)
        if kind == "vae":             # xhat (N, D), mu (N, L), logvar (N, L), x in [0, 1] (N, D)
            n, d, l = shape
            return (normal(rng, (n, d), dtype, 2.0), normal(rng, (n, l), dtype),
                    rng.uniform(-1, 1, (n, l)).astype(dtype), rng.random((n, d)).astype(dtype))
        if kind == "ntxent":          # embeddings (N, D), pos = the other view (i ^ 1)
            return normal(rng, shape, dtype), np.arange(shape[0]) ^ 1
        raise KeyError(kind)
    return build


@dataclass(frozen=True)
class Workload:
    loss: str                    # library loss
    kind: str                    # shape builder (_builder)
    shape: tuple                 # full size; --size small divides shape[0] by SMALL
    params: dict = field(default_factory=dict)
    tiny: bool = False           # per-call overhead: same size at --size small, times in µs

    @property
    def label(self):
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.loss} ({extra})" if extra else self.loss

    def sized(self, size):
        if self.tiny or size == "full":
            return self.shape
        return (max(self.shape[0] // SMALL, 4),) + tuple(self.shape[1:])

    def shape_text(self, shape):
        if self.kind == "vae":
            return f"{shape[0]} x ({shape[1]} + {shape[2]})"
        if len(shape) == 1 and shape[0] & (shape[0] - 1) == 0:
            return f"2^{shape[0].bit_length() - 1}"
        return " x ".join(map(str, shape))

    def arrays(self, size, dtype, seed=0):
        shape = self.sized(size)
        return shape, _builder(self.kind)(np.random.default_rng(seed), shape, np.dtype(dtype))


_E, _R = 2 ** 24, (16384, 1000)
WORKLOADS = (
    Workload("cross_entropy", "classes", _R),
    Workload("cross_entropy", "classes", _R, {"label_smoothing": 0.1}),
    Workload("bce", "logits", (_E,)),
    Workload("focal", "logits", (_E,)),
    Workload("huber", "regression", (_E,)),
    Workload("mse", "regression", (_E,)),
    Workload("mae", "regression", (_E,)),
    Workload("smooth_l1", "regression", (_E,)),
    Workload("log_cosh", "regression", (_E,)),
    Workload("hinge", "sign", (_E,)),
    Workload("gaussian_nll", "gaussian", (_E // 2,)),
    Workload("kl_div", "probs", _R),
    Workload("soft_cross_entropy", "probs", _R),
    Workload("multilabel_bce", "multilabel", _R),
    Workload("multiclass_hinge", "classes", _R),
    Workload("triplet", "triplet", (65536, 128)),
    Workload("contrastive", "pairs", (65536, 128)),
    Workload("vae_elbo", "vae", (16384, 784, 32)),
    Workload("ntxent", "ntxent", (1024, 128)),
    Workload("l2_penalty", "weights", (_E,)),
    Workload("cross_entropy", "classes", (8, 10), tiny=True),
)


def workloads(name=None):
    """The workloads of one library loss (``None``: all of them)."""
    return [w for w in WORKLOADS if name is None or w.loss == name]


# ---------------------------------------------------------------------------------------- timing

def timeit(fn, repeat, budget=0.02, warmup=0.5, warmup_calls=6, settle=3.0):
    """(best seconds per call, first result): warm-up calls for ``warmup`` seconds and at least
    ``warmup_calls``, and on (for at most ``settle`` seconds) while the latest call is still 30%
    slower than the fastest so far (with torch imported, the first several large calls of a
    parallel numba kernel run 3x slower, then settle); then the best of ``repeat`` samples, each
    looping the call enough times to last ``budget`` seconds (fast calls are averaged)."""
    start = t = time.perf_counter()
    out = fn()
    once = fastest = last = time.perf_counter() - t
    calls = 1
    while (calls < warmup_calls or time.perf_counter() - start < warmup
           or (last > 1.3 * fastest and time.perf_counter() - start < settle)):
        t = time.perf_counter()
        fn()
        last = time.perf_counter() - t
        fastest = min(fastest, last)
        calls += 1
    inner = max(1, min(10000, int(budget / max(once, 1e-7))))
    times = []
    for _ in range(max(repeat, 1)):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return min(times), out


def _optional(module):
    try:
        return __import__(module)
    except ImportError:
        return None


def available_peers():
    """The peer columns this machine can fill (numpy always)."""
    have = ["numpy"]
    if _optional("torch") is not None:
        have += ["torch", "torch.compile"]
    if _optional("jax") is not None and _optional("optax") is not None:
        have.append("jax.jit")
    return have


def _numpy_callable(loss, arrays, params):
    return lambda: numpy_value_and_grad(loss.name, *arrays, **params)[0]


def torch_step(loss, arrays, call, device=None):
    """A call of ``call(tensors)`` on ``arrays`` as tensors sharing their memory (numpy arrays, or
    with ``device`` arrays on a GPU), then its backward into the inputs' gradients; returns the value."""
    import torch
    ts = [torch.as_tensor(a, device=device) for a in arrays]
    ins = [t.detach().requires_grad_() for t in ts[:len(loss.inputs)]]
    ts = ins + ts[len(loss.inputs):]

    def run():
        for t in ins:
            t.grad = None
        v = call(ts)
        v.backward()
        return v.detach()
    return run


def torch_callable(loss, arrays, params, compiled=False, device=None):
    """torch's formula for ``loss`` (eager, or compiled by inductor) as a torch_step."""
    import torch
    fn = torch_peers()[loss.name]
    if compiled:
        # the workloads share a few code objects (the lambdas above): let each keep its own graph
        # rather than fall back to eager after dynamo's default 8 recompilations
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
        fn = torch.compile(fn, dynamic=False)
    return torch_step(loss, arrays, lambda ts: fn(torch, *ts, **params), device)


def _jax_callable(loss, arrays, params):
    import jax
    import jax.numpy as jnp
    fn = jax_peers()[loss.name]
    xs = [jax.device_put(a.astype(np.int32) if a.dtype.kind in "iu" else a) for a in arrays]
    vg = jax.jit(jax.value_and_grad(lambda *a: fn(jnp, *a, **params), argnums=tuple(range(len(loss.inputs)))))

    def run():
        v, g = vg(*xs)
        jax.block_until_ready(g)
        return v
    return run


CALLABLES = {"numpy": _numpy_callable, "torch": torch_callable, "jax.jit": _jax_callable,
             "torch.compile": lambda *a: torch_callable(*a, compiled=True)}


@dataclass
class Row:
    label: str
    shape: str
    tiny: bool
    ours: float
    peers: dict          # peer -> seconds (None: failed)
    memcpy: float
    diffs: dict          # peer -> relative difference of the value against lossdsl's

    @property
    def best(self):
        done = {k: v for k, v in self.peers.items() if v is not None}
        return min(done.items(), key=lambda kv: kv[1]) if done else (None, None)


def run_workload(w, size="small", dtype="float32", repeat=5, peers=None, log=None):
    """Time one workload: lossdsl and each peer, and the memcpy floor; returns a Row."""
    import lossdsl
    peers = available_peers() if peers is None else peers
    loss = lossdsl.load(w.loss)
    shape, arrays = w.arrays(size, dtype)
    t_ours, (value, grads) = timeit(lambda: loss.value_and_grad(*arrays, **w.params), repeat)
    value = float(value)
    times, diffs = {}, {}
    for peer in peers:
        try:
            t, v = timeit(CALLABLES[peer](loss, arrays, w.params), repeat)
            times[peer], diffs[peer] = t, abs(float(v) - value) / max(abs(value), 1e-30)
        except Exception as e:  # a peer that fails drops its cell, not the benchmark
            times[peer] = diffs[peer] = None
            if log:
                log(f"{w.label}: {peer} failed: {type(e).__name__}: {e}")
    src = list(arrays) + [np.asarray(g) for g in grads]
    dst = [np.empty_like(a) for a in src]
    t_copy, _ = timeit(lambda: [np.copyto(d, s) for d, s in zip(dst, src)], repeat)
    return Row(w.label, w.shape_text(shape), w.tiny, t_ours, times, t_copy, diffs)


def setup_threads():
    """torch uses as many threads as numba (jax's XLA picks its own)."""
    import numba
    threads = numba.get_num_threads()
    torch = sys.modules.get("torch") or _optional("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


def enable_float64(dtype):
    if dtype == "float64" and _optional("jax") is not None:
        import jax
        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------------------------------- report

def _cell(seconds, tiny):
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.1f} µs" if tiny else f"{seconds * 1e3:.1f}"


def table(rows, peers, dtype="float32"):
    """The Markdown table: one line per row; ratio = best peer / lossdsl (above 1: lossdsl faster)."""
    tol = TOLERANCE[dtype]
    head = (["loss", "shape", "lossdsl ms"] + [f"{p} ms" for p in peers]
            + ["memcpy ms", "best peer / lossdsl", "value rel. diff"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name, t = r.best
        ratio = f"{t / r.ours:.2f}x ({name})" if name else "-"
        known = [d for d in r.diffs.values() if d is not None]
        worst = max(known) if known else None
        bad = [p for p, d in r.diffs.items() if d is not None and not d <= tol]
        diff = "-" if worst is None else f"{worst:.1e}" + (f" MISMATCH ({', '.join(bad)})" if bad else "")
        cells = ([r.label, r.shape, _cell(r.ours, r.tiny)] + [_cell(r.peers.get(p), r.tiny) for p in peers]
                 + [_cell(r.memcpy, r.tiny), ratio, diff])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mismatches(rows, dtype="float32"):
    tol = TOLERANCE[dtype]
    return [(r.label, p, d) for r in rows for p, d in r.diffs.items() if d is not None and not d <= tol]


def machine(threads):
    """One line per fact: platform, cores, threads, versions."""
    import numba
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}", f"numba {numba.__version__}"]
    for mod in ("torch", "jax", "optax"):
        m = sys.modules.get(mod)
        versions.append(f"{mod} {m.__version__}" if m is not None else f"{mod} not installed")
    cpu = platform.processor() or _cpu_model() or "cpu"
    return [f"- machine: {platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
            f"{threads} threads for numba and torch",
            "- " + ", ".join(versions)]


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def compile_times():
    """(import, first compile, cached load) seconds for focal, float32: fresh processes sharing
    one empty cache directory (the first compiles through sympy and numba, the second loads)."""
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


#: where benchmarks/gpu_check.py's section of RESULTS.md starts: measured on another machine, it
#: is kept when a CPU run rewrites the file, and the CPU part when gpu_check rewrites its section
GPU_SECTION = "## GPU\n"


def sections(text):
    """(CPU part, GPU section or "") of a RESULTS.md."""
    i = text.find("\n" + GPU_SECTION)
    return (text, "") if i < 0 else (text[:i + 1], text[i + 1:])


def joined(cpu, gpu):
    """A RESULTS.md from its two parts."""
    return cpu.rstrip("\n") + "\n\n" + gpu if gpu else cpu


def report(rows, peers, threads, command, dtype, repeat, compiled=None):
    """RESULTS.md: title, how it was produced, the machine, the table, the compile-time line."""
    lines = ["# CPU benchmark results", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", ""]
    lines += machine(threads)
    lines += [f"- forward + backward (value and gradient) of the mean loss, {dtype}, best of {repeat} "
              "after a warm-up (times in ms; the 8 x 10 row, per-call overhead, in µs); torch.compile and jax.jit compiled before the timing; memcpy: "
              "np.copyto of the inputs, targets and gradients (the memory floor); ratio = best peer / "
              "lossdsl (above 1: lossdsl is faster); value rel. diff: the largest relative difference "
              f"of a peer's value from lossdsl's (tolerance {TOLERANCE[dtype]:g}); lossdsl's large results "
              "take the memory of the previous call's dropped ones (lossdsl/buffers.py), the peers "
              "allocate theirs per call", "",
              table(rows, peers, dtype)]
    if compiled:
        imported, first, cached = compiled
        lines += ["", f"`import lossdsl`: {imported:.2f} s. Then `focal`, float32, value and gradient: "
                      f"first compile (empty cache: sympy pipeline and numba) {first:.2f} s; in a second "
                      f"process, loaded from the cache (no sympy, no numba compile) {cached:.2f} s."]
    return "\n".join(lines) + "\n"
