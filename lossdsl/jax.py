"""The JAX bridge (LANGUAGE.md §6): compiled losses as differentiable jax functions.

    import lossdsl.jax as lj
    f = lj.function("focal")                  # or a Loss, e.g. lossdsl.compile(text)["mine"]
    v, g = jax.jit(jax.value_and_grad(lambda z: f(z, y, gamma=2.0)))(z)

A ``jax.custom_vjp`` whose forward runs the fused CPU kernel once (value and gradients declared
as ``ShapeDtypeStruct``s, so it traces under ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``
and ``jax.vmap``, which runs the kernel once per batch element), and whose backward only scales
the saved gradients by the cotangent (under ``jit`` XLA drops the scaling by a constant 1).

- On the CPU the kernel is an XLA FFI custom call (xla_ffi.py): it reads XLA's operand buffers
  and writes the value and the gradients into XLA's result buffers (inputs and gradients are
  never copied).
- Arguments are checked while tracing (shapes, dtypes, params given as numbers): a bad call
  raises the same ``LossError`` as with numpy arrays. Targets are checked by the kernel when it
  runs; jax raises that error as its runtime error (``JaxRuntimeError``), with the
  ``LossError``'s message. Params may also be jax scalars (traced), checked when the kernel runs.
- float16 / bfloat16 are computed in float32; value and gradients come back in the input's dtype.
- Arrays on a GPU take a host round trip: a ``jax.pure_callback`` copies them to the host, runs
  the CPU kernel and copies the results back (the CUDA kernels are reached through
  ``lossdsl.torch`` or device arrays, not through jax).
- Second derivatives are not available: differentiating the backward again gives the wrong
  (zero) curvature, so ``jax.hessian`` of a lossdsl function is not supported.
"""
import functools
import itertools

try:
    import jax
    import jax.numpy as jnp
except ImportError as e:        # pragma: no cover - depends on the installation
    raise ImportError("lossdsl.jax needs JAX: pip install 'lossdsl[jax]'") from e

import numpy as np

from . import api, xla_ffi
from .call import Call, checked, param_values

__all__ = ["function"]

_HALF = (jnp.float16, jnp.bfloat16)
IN_PLACE = ("cpu",)     # platforms whose buffers the kernel reads and writes in place (an FFI target)
_targets = itertools.count()        # FFI target names: one per configuration (_vjp)


def _computed(a):
    """Half-precision floats are computed in float32."""
    return a.astype(jnp.float32) if a.dtype in _HALF else a


def _is_traced(v):
    return isinstance(v, jax.Array) or isinstance(v, jax.core.Tracer)


@functools.lru_cache(maxsize=None)
def _vjp(loss, reduction, ignore_index, weighted, static, traced):
    """The custom_vjp for one configuration: operands are (inputs, targets, [weight], traced params)."""
    n_in, n_arrays = len(loss.inputs), len(loss.inputs) + len(loss.targets)

    static_params = dict(static)

    def host(operands, with_grad, results=None):
        """The kernel on host arrays, writing into ``results`` (value, gradients) when given."""
        arrays = operands[:n_arrays]
        weight = operands[n_arrays] if weighted else None
        params = dict(static, **{k: float(v) for k, v in zip(traced, operands[n_arrays + weighted:])}) \
            if traced else static_params
        call = checked(loss, arrays, reduction, weight, ignore_index, params)
        value, grads = api._run_host(loss, call, arrays, weight, with_grad, results)
        if results is None:         # (written into the results given: nothing to hand back)
            return (np.asarray(value),) + (grads or ())

    # on the CPU, XLA's own buffers: operands read in place, value and gradients written in place
    target = f"lossdsl_{next(_targets)}_{loss.name}"
    xla_ffi.register(target, lambda args, rets: host(args, len(rets) > 1, rets))

    def run(operands, with_grad):
        """The kernel: value, and the inputs' gradients when ``with_grad``."""
        call = Call(loss, operands[:n_arrays], reduction, operands[n_arrays] if weighted else None,
                    ignore_index, dict(static))
        shapes = (jax.ShapeDtypeStruct(call.value_shape, call.dtype),)
        if with_grad:
            shapes += tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in operands[:n_in])
        in_place = jax.ffi.ffi_call(target, shapes, vmap_method="sequential")

        def elsewhere(*ops):    # other platforms (a GPU): a callback copies to the host and back
            return jax.pure_callback(lambda *a: host([np.asarray(x) for x in a], with_grad), shapes, *ops,
                                     vmap_method="sequential")
        value, *grads = jax.lax.platform_dependent(*operands, default=elsewhere, **dict.fromkeys(IN_PLACE, in_place))
        return value, tuple(grads)

    @jax.custom_vjp
    def f(*operands):               # not differentiated: the value alone
        return run(operands, False)[0]

    def forward(*operands):
        return run(operands, True)

    def bwd(grads, ct):
        scaled = tuple(g * ct.reshape(ct.shape + (1,) * (g.ndim - ct.ndim)) for g in grads)
        return scaled + (None,) * (n_arrays - n_in + weighted + len(traced))

    f.defvjp(forward, bwd)
    return f


def function(name_or_loss):
    """A jax function for a library loss name or a ``Loss``: ``f(*inputs_and_targets,
    reduction="mean", weight=None, ignore_index=None, **params)``, differentiable in its inputs."""
    loss = api.as_loss(name_or_loss, "lossdsl.jax.function")
    n_in = len(loss.inputs)

    def f(*args, reduction="mean", weight=None, ignore_index=None, **params):
        arrays = [jnp.asarray(a) for a in args]
        traced = tuple(sorted(k for k, v in params.items() if _is_traced(v)))
        # names, and the values known now, checked while tracing; traced values when the kernel runs
        values = param_values(loss, {k: (loss.params.get(k) if k in traced else v) for k, v in params.items()})
        static = tuple((p, v) for p, v in zip(loss.params, values) if p not in traced)
        operands = [_computed(a) for a in arrays]
        if weight is not None:
            operands.append(_computed(jnp.asarray(weight)))
        # traced params in the dtype the kernel computes in (float64 ones stay float64 under x64)
        computed = operands[0].dtype if n_in and jnp.issubdtype(operands[0].dtype, jnp.floating) else jnp.float32
        operands += [jnp.asarray(params[k], computed) for k in traced]
        fn = _vjp(loss, reduction, ignore_index, weight is not None, static, traced)
        value = fn(*operands)
        return value.astype(arrays[0].dtype) if n_in and arrays[0].dtype in _HALF else value

    f.__name__ = loss.name
    f.__doc__ = f"{loss.doc or loss.name} (lossdsl.jax; differentiable in {', '.join(loss.inputs)})"
    f.loss = loss
    return f
