"""Running a Loss on device arrays (LANGUAGE.md §4).

Arguments exposing ``__cuda_array_interface__`` (numba device arrays, CuPy arrays, torch CUDA
tensors; the simulator's fake device arrays under ``NUMBA_ENABLE_CUDASIM=1``) run the CUDA
kernels of render_cuda.py with no copy to the host. Results are device arrays: a torch tensor
or a CuPy array when the first argument is one, else a numba device array; a reduced value is
a 0-d device array.

Checks are the CPU path's (``call.Call``: shapes, axis sizes, dtypes, params); mixing host and
device arrays is an ``ArgumentError``. Targets are checked on the device by the kernel, which
never reads through a bad class index; it counts bad rows, and only then (the error path)
are the targets copied to the host to say which one is wrong.

Per call the host sees one copy of 4 float64s from the device (the counters: bad rows and the
total), needed to raise on bad targets. Kernels run on the stream given (the torch bridge passes
torch's current stream), else numba's default stream.
"""
import functools
import os

import numpy as np

from . import jit
from .call import Call
from .errors import ArgumentError, LossError

THREADS = int(os.environ.get("LOSSDSL_CUDA_THREADS", "0"))   # 0: 32 under the simulator, else 256


def is_device(a):
    """Does ``a`` live on the GPU (or the simulator's fake GPU)?"""
    if a is None:
        return False
    return hasattr(a, "__cuda_array_interface__") or type(a).__module__.startswith("numba.cuda.simulator")


def on_device(args, weight=None):
    return any(is_device(a) for a in args) or is_device(weight)


@functools.cache
def _cuda():
    try:
        from numba import cuda
    except ImportError as e:    # pragma: no cover - depends on the installation
        raise LossError("device arrays need the CUDA back end: pip install 'lossdsl[cuda]' "
                        f"(numba-cuda); importing numba.cuda failed: {e}") from None
    numpy_row_stack()
    return cuda


def numpy_row_stack():
    """numba-cuda 0.30 registers an overload of ``np.row_stack`` when it compiles its first
    kernel, and numpy 2.5 removed that name (an alias of ``np.vstack``), so no kernel compiles
    (NVIDIA/numba-cuda#907, closed unfixed: numba-cuda is in maintenance mode). Put the alias back."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def _simulator():
    from numba import config
    return bool(config.ENABLE_CUDASIM)


def _as_device(a, sync=True):
    """A numba device array viewing ``a``'s memory (no copy). ``sync=False`` when the launches
    go on the stream that produced ``a`` (torch's current stream): ordering is then the stream's,
    and a host-side wait on it would only stall."""
    if type(a).__module__.startswith("numba.cuda"):
        return a
    return _cuda().as_cuda_array(a, sync=sync)


def module(loss, dtype):
    """The loss's CUDA module for ``dtype``, through the same on-disk cache as the CPU kernels."""
    key = ("cuda", dtype)
    if key not in loss._kernels:
        loss._kernels[key] = jit.load_module(loss.source("cuda", dtype))
    return loss._kernels[key]


def _check_placement(loss, args, weight):
    """All arrays on the device, or none: a mix would need hidden copies."""
    decls = loss._inputs + loss._targets
    named = list(zip(args, (d.name for d in decls))) + ([(weight, "weight")] if weight is not None else [])
    where = [n for a, n in named if is_device(a)]
    host = [n for a, n in named if not is_device(a)]
    if host:
        raise ArgumentError(f"loss '{loss.name}': {', '.join(repr(h) for h in host)} "
                            f"{'is a host array' if len(host) == 1 else 'are host arrays'} but "
                            f"{', '.join(repr(h) for h in where)} {'is' if len(where) == 1 else 'are'} on the "
                            f"device: pass all arrays on the device, or all on the host")


def _to_host(a, stream):
    """``a`` on the host, copied in order on ``stream``: numba's copy on a given stream is
    asynchronous, so wait for it before the host reads (None or 0: the default stream, on which
    the copy is synchronous)."""
    if not stream:
        return a.copy_to_host()
    host = a.copy_to_host(stream=stream)
    stream.synchronize()
    return host


def _contiguous(a, loss, what):
    if a.size and not a.is_c_contiguous():
        raise ArgumentError(f"loss '{loss}': device array '{what}' must be C-contiguous, got strides {a.strides}")


def _launch(cuda, kind, call):
    """(blocks, threads): a power of two threads per block; grid-stride loops cover the rest.
    Row kernels take a warp per row; under the simulator a block is one warp (it has no shuffles:
    cuda_prelude.WFOLD)."""
    sim = _simulator()
    threads = THREADS or (32 if sim else 256)
    from .cuda_prelude import MAXT
    threads = min(MAXT, 1 << max(5, (threads - 1).bit_length()))
    if sim:
        cap = 3
    else:
        try:
            cap = 32 * cuda.get_current_device().MULTIPROCESSOR_COUNT
        except Exception:   # pragma: no cover
            cap = 4096
    if kind == "elementwise":
        return max(1, min(cap, -(-call.n_samples // threads))), threads
    if kind == "row":
        threads = 32 if sim else threads
        return max(1, min(cap, -(-call.n_samples // (threads // 32)))), threads
    return cap, threads             # a batch loss's "map" stages: the grid shares the outer index


def _block_threads(threads, call):
    """Threads of a batch loss's one-block stages: no more than its widest axis needs."""
    widest = max([int(s) for s in call.sizes] or [1])
    return min(threads, max(32, 1 << (widest - 1).bit_length()))


def _like(x, template):
    """Return ``x`` as the array type of ``template`` (torch / CuPy), else as is."""
    mod = type(template).__module__.split(".")[0]
    if mod == "torch":
        import torch
        return torch.as_tensor(x, device=template.device)
    if mod == "cupy":
        import cupy
        return cupy.asarray(x)
    return x


@functools.cache
def _empty(dtype, ndim):
    """An empty device array: what a kernel gets for an array it must not write (an allocation
    costs 45 µs on an H200 host, more than a small batch's kernel)."""
    return _cuda().device_array((0,) * ndim, dtype)


def run(loss, args, reduction, weight, ignore_index, params, grad, stream=None):
    """``Loss._run`` for device arrays: (value, gradients or None), all on the device, every launch
    and copy on ``stream`` (a numba stream; None: the default stream, with the inputs synchronized
    as their producers ask; 0: the default stream, already in order with them)."""
    cuda = _cuda()
    if len(args) == len(loss._inputs) + len(loss._targets):
        _check_placement(loss, args, weight)
    arrays = [_as_device(a, sync=stream is None) for a in args]
    weight = None if weight is None else _as_device(weight, sync=stream is None)
    call = Call(loss, arrays, reduction, weight, ignore_index, params)
    decls = loss._inputs + loss._targets
    for a, d in zip(arrays, decls):
        _contiguous(a, loss.name, d.name)
    if weight is not None:
        _contiguous(weight, loss.name, "weight")
    n_in, dtype, s = len(loss._inputs), call.dtype, stream or 0
    inputs = [a.reshape(call.layout(d)) for a, d in zip(arrays, loss._inputs)]
    targets = [a.reshape(call.layout(d)) for a, d in zip(arrays[n_in:], loss._targets)]   # converted on load
    mod = module(loss, call.dtype_name)
    from . import render_cuda       # the device path needs the compiled forms anyway
    kind = render_cuda.form(loss._c)
    n_locals = len(getattr(loss._c, "locals", ()))
    blocks, threads = _launch(cuda, kind, call)
    res = cuda.to_device(np.array([0.0, 0.0, 0.0 if call.ignore_given else float(call.n_samples), 0.0]), stream=s)
    if call.ignore_given:
        cls = targets[call.class_target_index()]
        mod.count_kept[max(1, min(blocks, -(-call.n_samples // threads))), threads, s](cls, call.ignore, res)
    # arrays not wanted are passed empty (flags say so): one compiled signature per dtype
    grads = [cuda.device_array(a.shape, dtype, stream=s) if grad else _empty(dtype, a.ndim) for a in inputs]
    out = cuda.device_array(call.n_samples, dtype, stream=s) if reduction == "none" else _empty(dtype, 1)
    w = weight.reshape(call.n_samples) if weight is not None else _empty(dtype, 1)
    scratch = [cuda.device_array(shape, dtype, stream=s) if grad or i < n_locals else _empty(dtype, len(shape))
               for i, shape in enumerate(render_cuda.sizes_of(loss._c, call.axis_size))]
    mode = np.int64(1 if reduction == "mean" else 0)
    v = _empty(dtype, 1) if reduction == "none" else cuda.device_array(1, dtype, stream=s)
    operands = (*inputs, *targets, *call.param_values, *call.sizes, w, out, *grads, *scratch, res, v, mode,
                call.ignore, weight is not None, reduction == "none", bool(grad))
    if kind == "batch":
        for i, (stage, for_grad) in enumerate(mod.STAGES):
            if for_grad and not grad:
                break               # the gradient's stages come last
            grid = (blocks, threads) if stage == "map" else (1, _block_threads(threads, call))
            mod.kernel[grid[0], grid[1], s](*operands, np.int64(i))
    else:
        mod.kernel[blocks, threads, s](*operands)
    value = out.reshape(call.sample_shape) if reduction == "none" else v.reshape(())
    if _to_host(res, stream)[1]:            # the one host read of a call
        call.raise_bad_targets([_to_host(t, stream) for t in targets])
    first = args[0]
    value = _like(value, first)
    if not grad:
        return value, None
    return value, tuple(_like(g.reshape(shape), first) for g, shape in zip(grads, call.input_shapes))
