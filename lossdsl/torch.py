"""The PyTorch bridge (LANGUAGE.md §6): compiled losses as differentiable torch functions.

    import lossdsl.torch as lt
    f = lt.function("focal")                  # or a Loss, e.g. lossdsl.compile(text)["mine"]
    v = f(z, y, gamma=2.0)                    # same arguments as Loss.__call__
    v.backward()

The forward runs the fused kernel once through ``Loss._run`` (the one path that checks arguments
and picks the CPU or CUDA kernels), which gives the value and every input's gradient; the
backward only scales those saved gradients by the upstream gradient. Eagerly this is a
``torch.autograd.Function``; under ``torch.compile`` the same call is a registered custom op,
``lossdsl::value_and_grad``, with a fake (shape-only) implementation, so the loss sits in the
graph without a break.

- CPU tensors are viewed as numpy arrays (no copy; a non-contiguous one is copied once); large
  results are written into memory released by earlier calls (buffers.py: the previous step's
  gradient, freed by ``zero_grad``), not into fresh pages that the OS must fault in and zero;
  CUDA tensors go to the CUDA kernels through ``__cuda_array_interface__`` on torch's current
  stream, and the results stay on that device.
- float16 / bfloat16 are computed in float32; value and gradients come back in the input's dtype.
- Params are Python numbers or 0-d tensors; targets, weights and params get no gradient.
- Second derivatives are not available: differentiating the backward raises a ``LossError``
  that names the loss.
"""
import numpy as np

try:
    import torch
except ImportError as e:        # pragma: no cover - depends on the installation
    raise ImportError("lossdsl.torch needs PyTorch: pip install 'lossdsl[torch]'") from e

from . import api
from .call import Call, check_reduction, param_values
from .errors import LossError

__all__ = ["function", "LossModule"]

_HALF = (torch.float16, torch.bfloat16)
_LOSSES = {}                    # op key -> Loss: the op's arguments name a loss by a string


def _key(loss):
    """A string naming ``loss`` inside the op (library losses by name, others by identity)."""
    key = loss.name if loss is _library(loss.name) else f"{loss.name}@{id(loss):x}"
    _LOSSES[key] = loss
    return key


def _library(name):
    try:
        return api.load(name)
    except LossError:
        return None


def _compute_dtype(t):
    return torch.float32 if t.dtype in _HALF else t.dtype


def _kernel_array(t):
    """The tensor as the kernels take it: a numpy view on the CPU, the tensor itself on CUDA."""
    if t.dtype in _HALF:
        t = t.detach().float()
    return t.numpy(force=True) if t.is_cpu else t.detach()     # force: no grad, conj/neg resolved


def _numba_stream(device):
    """torch's current stream for numba: 0 for the legacy default stream, which numba launches on
    by default (an external stream object costs 20 µs to make and 28 µs per launch, measured on
    an H200 host), else that stream wrapped."""
    handle = torch.cuda.current_stream(device).cuda_stream
    if handle == 0:
        return 0
    from numba import cuda
    return cuda.external_stream(handle)


# torch dtype -> numpy dtype, built once outside any fake mode (fake tensors have no .numpy())
_NUMPY_DTYPES = {d: torch.empty(0, dtype=d).numpy().dtype for d in (
    torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}


class _Spec:
    """Shape and numpy dtype of a tensor: what ``Call`` reads, for the shape-only checks."""

    def __init__(self, t):
        self.shape = tuple(t.shape)
        self.dtype = _NUMPY_DTYPES.get(_compute_dtype(t), np.dtype(object))


def _run(key, arrays, weight, params, reduction, ignore_index, with_grad):
    """[value, gradient of each input] from one kernel call (gradients empty unless ``with_grad``)."""
    loss = _LOSSES[key]
    value, grads = _call(loss, arrays, weight, dict(zip(loss.params, params)), reduction, ignore_index, with_grad)
    if not with_grad:
        return [value] + [arrays[0].new_empty(0) for _ in loss.inputs]
    return [value, *grads]


def _call(loss, arrays, weight, params, reduction, ignore_index, with_grad):
    """The value and (when ``with_grad``) the inputs' gradients as tensors, from ``Loss._run``."""
    first = arrays[0]
    if not first.is_cpu or _any_half(arrays):
        stream = _numba_stream(first.device) if first.is_cuda else None
        value, grads = loss._run([_kernel_array(a) for a in arrays], reduction,
                                 None if weight is None else _kernel_array(weight), ignore_index,
                                 params, with_grad, stream)
        return _tensor(value, first), (grads and [_tensor(g, a) for g, a in zip(grads, arrays)])
    # CPU tensors in float32/float64 (or not floats: the checks say so): numpy views both ways
    # (a tensor elsewhere is passed as it is: Loss._run refuses to mix host and device arrays)
    value, grads = loss._run([a.numpy(force=True) if a.is_cpu else a for a in arrays], reduction,
                             None if weight is None else _kernel_array(weight), ignore_index,
                             params, with_grad)
    value = torch.from_numpy(value if type(value) is np.ndarray else np.asarray(value))
    return value, (grads and [torch.from_numpy(g) for g in grads])


def _any_half(tensors):
    for t in tensors:           # a loop, not any(generator): this runs on every small call
        if t.dtype in _HALF:
            return True
    return False


def _tensor(x, like):
    """A kernel result as a tensor on ``like``'s device, in its dtype (no copy on the CPU)."""
    if type(x) is np.ndarray:
        t = torch.from_numpy(x)
    elif isinstance(x, np.generic):         # a reduced value: a numpy scalar
        t = torch.from_numpy(np.asarray(x))
    else:
        t = torch.as_tensor(x, device=like.device)
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _scaled(saved, upstream, n_targets, eager=False):
    """The inputs' gradients (None for the targets): the saved ones times the upstream gradient,
    one value per sample for reduction="none". Eagerly, an upstream of exactly 1 on the CPU
    (``loss.backward()``) hands the saved gradients over as they are, unless the graph is kept for
    another backward (which would see them again after ``.grad`` changed): a multiply is a second
    pass over the data."""
    if upstream is None:
        return [None] * (len(saved) + n_targets)
    if eager and upstream.numel() == 1 and upstream.is_cpu and not _keep_graph() and upstream.item() == 1.0:
        scaled = list(saved)
    else:
        scaled = [g * upstream.reshape(upstream.shape + (1,) * (g.ndim - upstream.ndim)) for g in saved]
    return scaled + [None] * n_targets


_KEEP_GRAPH = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _keep_graph():
    """Will this backward's graph be used again (retain_graph=True)? Unknown counts as yes."""
    return True if _KEEP_GRAPH is None else _KEEP_GRAPH()


def _no_second_derivatives(name):
    return LossError(f"loss '{name}': second derivatives are not available through "
                     f"lossdsl.torch (its backward scales the saved first derivatives)")


class _Eager(torch.autograd.Function):
    """The eager form of the op below (same kernel call, same scaling) without the dispatcher's
    per-call cost, which is several times a small batch's kernel time."""

    @staticmethod
    def forward(ctx, options, *arrays):
        # the options in one tuple: Function.apply costs per argument (weight gets no gradient)
        loss, weight, params, reduction, ignore_index = options
        value, grads = _call(loss, arrays, weight, params, reduction, ignore_index, True)
        ctx.name, ctx.n_in, ctx.n_targets = loss.name, len(grads), len(arrays) - len(grads)
        # saved, not kept on ctx: autograd frees saved tensors once a backward is done with them
        # (unless the graph is retained), so a gradient handed over as it is becomes .grad
        # without a copy; a reference on ctx would make autograd copy it (2x on large batches)
        ctx.save_for_backward(*grads, *arrays[:len(grads)])
        return value

    @staticmethod
    def backward(ctx, upstream):
        saved = ctx.saved_tensors
        grads, inputs = saved[:ctx.n_in], saved[ctx.n_in:]
        scaled = _scaled(grads, upstream, ctx.n_targets, eager=True)
        if torch.is_grad_enabled():         # create_graph=True: differentiating these again is refused
            scaled = list(_FirstOrderOnly.apply(ctx.name, len(inputs), *inputs, *scaled))
        return (None, *scaled)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through; their own derivative is a clear error, not a silent zero. The
    loss's inputs come along so that the outputs are part of the graph that reaches them."""

    @staticmethod
    def forward(ctx, name, n_inputs, *tensors):
        ctx.name = name
        return tuple(None if g is None else g.clone() for g in tensors[n_inputs:])

    @staticmethod
    def backward(ctx, *_):
        raise _no_second_derivatives(ctx.name)


@torch.library.custom_op("lossdsl::value_and_grad", mutates_args=())
def _value_and_grad(key: str, arrays: list[torch.Tensor], weight: torch.Tensor | None, params: list[float],
                    reduction: str, ignore_index: int | None, with_grad: bool) -> list[torch.Tensor]:
    """The loss as one opaque node of a torch.compile graph: ``_run`` behind the dispatcher."""
    return _run(key, arrays, weight, params, reduction, ignore_index, with_grad)


@_value_and_grad.register_fake
def _(key, arrays, weight, params, reduction, ignore_index, with_grad):
    """Shapes only, for torch.compile's tracing. With static shapes the arguments are checked here
    too, so a bad call fails at trace time; symbolic sizes are left to the kernel call's checks."""
    loss = _LOSSES[key]
    if all(isinstance(n, int) for a in arrays for n in a.shape):
        Call(loss, [_Spec(a) for a in arrays], reduction, None if weight is None else _Spec(weight),
             ignore_index, dict(zip(loss.params, params)))
    first = arrays[0]
    n_axes = len(loss._inputs[0].axes)
    batch = loss._defn.batch or reduction != "none"
    value = first.new_empty(() if batch else first.shape[:first.dim() - n_axes])
    if not with_grad:
        return [value] + [first.new_empty(0) for _ in loss.inputs]
    return [value] + [torch.empty_like(a) for a in arrays[:len(loss.inputs)]]


def _setup_context(ctx, inputs, output):
    key, arrays = inputs[0], inputs[1]
    ctx.key, ctx.n_targets = key, len(arrays) - len(_LOSSES[key].inputs)
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)      # unused outputs (the gradients) get no upstream tensor


def _backward(ctx, grads):
    if any(g is not None for g in grads[1:]):   # something differentiates the saved gradients
        raise _no_second_derivatives(_LOSSES[ctx.key].name)
    return None, _scaled(ctx.saved_tensors, grads[0], ctx.n_targets), None, None, None, None, None


_value_and_grad.register_autograd(_backward, setup_context=_setup_context)


def _scalar(v):
    """A 0-d (or one-element) tensor param as a Python number; anything else is left to the checks."""
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def function(name_or_loss):
    """A torch function for a library loss name or a ``Loss``: ``f(*inputs_and_targets,
    reduction="mean", weight=None, ignore_index=None, **params)``, differentiable in its inputs."""
    loss = api.as_loss(name_or_loss, "lossdsl.torch.function")
    key = _key(loss)
    n_in = len(loss.inputs)
    defaults = param_values(loss, {})

    def f(*args, reduction="mean", weight=None, ignore_index=None, **params):
        tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        if weight is not None and not isinstance(weight, torch.Tensor):
            weight = torch.as_tensor(weight)
        if torch.compiler.is_compiling():
            values = param_values(loss, {k: _scalar(v) for k, v in params.items()}) if params else defaults
            with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors[:n_in])
            return _value_and_grad(key, tensors, weight, values, reduction, ignore_index, with_grad)[0]
        # eagerly the kernel call checks the params (their defaults filled in by Call)
        params = {k: _scalar(v) for k, v in params.items()} if params else params
        if torch.is_grad_enabled():
            for t in tensors[:n_in]:
                if t.requires_grad:
                    return _Eager.apply((loss, weight, params, reduction, ignore_index), *tensors)
        return _call(loss, tensors, weight, params, reduction, ignore_index, False)[0]

    f.__name__ = loss.name
    f.__doc__ = f"{loss.doc or loss.name} (lossdsl.torch; differentiable in {', '.join(loss.inputs)})"
    f.loss = loss
    return f


class LossModule(torch.nn.Module):
    """``nn.Module`` form: ``LossModule("cross_entropy", label_smoothing=0.1)(logits, labels)``."""

    def __init__(self, name_or_loss, reduction="mean", ignore_index=None, **params):
        super().__init__()
        self.fn = function(name_or_loss)
        check_reduction(self.fn.loss, reduction)                    # fail here, not mid-training
        param_values(self.fn.loss, {k: _scalar(v) for k, v in params.items()})
        self.reduction, self.ignore_index, self.params = reduction, ignore_index, params

    def forward(self, *args, weight=None):
        return self.fn(*args, reduction=self.reduction, weight=weight, ignore_index=self.ignore_index,
                       **self.params)

    def extra_repr(self):
        opts = [f"reduction={self.reduction!r}"] + [f"{k}={v!r}" for k, v in self.params.items()]
        if self.ignore_index is not None:
            opts.append(f"ignore_index={self.ignore_index}")
        return f"{self.fn.loss.name}, " + ", ".join(opts)
