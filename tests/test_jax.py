"""The JAX bridge (LANGUAGE.md §6): lossdsl.jax under jax.jit / jax.grad against optax.

Skipped as a whole, with the reason, where jax or optax is not installed (pip install 'lossdsl[jax]').
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'lossdsl[jax]')")
optax = pytest.importorskip("optax", reason="optax is not installed (the reference losses)")
jnp = jax.numpy

import lossdsl                      # noqa: E402
import lossdsl.jax as lj            # noqa: E402

RNG = np.random.default_rng(7)
Z = jnp.asarray(RNG.normal(0, 3, 64).astype(np.float32))
Y_SOFT = jnp.asarray(RNG.uniform(0, 1, 64).astype(np.float32))
Y_HARD = jnp.asarray((RNG.uniform(0, 1, 64) > 0.5).astype(np.float32))
LOGITS = jnp.asarray(RNG.normal(0, 2, (16, 7)).astype(np.float32))
LABELS = jnp.asarray(RNG.integers(0, 7, 16))
UPSTREAM = jnp.asarray(RNG.uniform(-1, 2, 16).astype(np.float32))


def both(ours, theirs, *args):
    """value_and_grad of both under jax.jit; they must agree in float32."""
    v, g = jax.jit(jax.value_and_grad(ours))(*args)
    rv, rg = jax.jit(jax.value_and_grad(theirs))(*args)
    np.testing.assert_allclose(v, rv, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(g, rg, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("y", [Y_SOFT, Y_HARD], ids=["soft", "hard"])
def test_bce_matches_optax(y):
    bce = lj.function("bce")
    both(lambda z: bce(z, y), lambda z: optax.sigmoid_binary_cross_entropy(z, y).mean(), Z)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.5, 0.6)])
def test_focal_matches_optax(gamma, alpha):
    focal = lj.function("focal")
    both(lambda z: focal(z, Y_HARD, gamma=gamma, alpha=alpha, reduction="sum"),
         lambda z: optax.sigmoid_focal_loss(z, Y_HARD, alpha=alpha, gamma=gamma).sum(), Z)


def test_cross_entropy_matches_optax_with_upstream_weights():
    ce = lj.function("cross_entropy")
    both(lambda z: (ce(z, LABELS, reduction="none") * UPSTREAM).sum(),
         lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, LABELS) * UPSTREAM).sum(), LOGITS)


def test_huber_matches_optax():
    huber = lj.function("huber")
    t = jnp.asarray(RNG.normal(0, 1, 64).astype(np.float32))
    both(lambda p: huber(p, t, delta=1.5), lambda p: optax.huber_loss(p, t, delta=1.5).mean(), Z)


def test_params_may_be_traced():
    huber = lj.function("huber")
    t = jnp.zeros(64, jnp.float32)
    v = jax.jit(lambda p, d: huber(p, t, delta=d))(Z, 0.5)
    np.testing.assert_allclose(v, optax.huber_loss(Z, t, delta=0.5).mean(), rtol=2e-6)


def test_float64_under_x64_with_a_traced_param():
    """A traced param is passed in the inputs' dtype: a float32 delta would be off by 1e-8."""
    huber = lj.function("huber")
    with jax.enable_x64(True):
        p, t = jnp.asarray(np.asarray(Z, np.float64) / 3), jnp.zeros(64)
        v, g = jax.jit(jax.value_and_grad(lambda p, d: huber(p, t, delta=d, reduction="sum")))(p, 0.7)
        rv, rg = jax.value_and_grad(lambda p: optax.huber_loss(p, t, delta=0.7).sum())(p)
        assert v.dtype == jnp.float64
        np.testing.assert_allclose(v, rv, rtol=1e-12)
        np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-15)


def test_vmap_and_half_precision():
    bce = lj.function("bce")
    batch = jnp.stack([Z, -Z])
    v = jax.vmap(lambda z: bce(z, Y_HARD))(batch)
    np.testing.assert_allclose(v, [optax.sigmoid_binary_cross_entropy(z, Y_HARD).mean() for z in batch], rtol=2e-6)
    w = jnp.linspace(0, 2, 64, dtype=jnp.bfloat16)      # half-precision weights and targets too
    vh, gh = jax.value_and_grad(lambda z: bce(z, Y_HARD.astype(jnp.float16), weight=w))(Z.astype(jnp.bfloat16))
    assert vh.dtype == jnp.bfloat16 and gh.dtype == jnp.bfloat16
    want = (optax.sigmoid_binary_cross_entropy(Z, Y_HARD) * w.astype(jnp.float32)).mean()
    np.testing.assert_allclose(float(vh), float(want), rtol=1e-2)


BAD = [
    ("integer logits", "cross_entropy", (np.ones((4, 3), np.int32), np.zeros(4, np.int32)), {}),
    ("mismatched shapes", "cross_entropy", (np.ones((4, 3), np.float32), np.zeros(5, np.int32)), {}),
    ("param outside domain", "focal", (np.ones(4, np.float32), np.ones(4, np.float32)), {"gamma": -1.0}),
    ("unknown param", "mse", (np.ones(4, np.float32), np.ones(4, np.float32)), {"delta": 1.0}),
]


@pytest.mark.parametrize("what,name,arrays,params", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_the_numpy_error_at_trace_time(what, name, arrays, params):
    with pytest.raises(lossdsl.LossError) as want:
        lossdsl.load(name)(*arrays, **params)
    f = lj.function(name)
    with pytest.raises(type(want.value)) as got:
        jax.jit(lambda *a: f(*a, **params))(*[jnp.asarray(a) for a in arrays])
    assert str(got.value) == str(want.value)


def test_bad_target_values_are_reported_when_the_kernel_runs():
    """Values are only known when the kernel runs: jax raises, with the LossError's message."""
    f = lj.function("cross_entropy")
    with pytest.raises(Exception, match=r"loss 'cross_entropy': target 'y' must hold a class index in \[0, 7\)"):
        jax.block_until_ready(jax.jit(f)(LOGITS, LABELS + 7))


# --------------------------------------------------------------------------------------
# The CPU path: an XLA FFI custom call on XLA's own buffers (lossdsl/xla_ffi.py)
# --------------------------------------------------------------------------------------

def test_kernel_reads_and_writes_xlas_buffers(monkeypatch):
    """No copy either way: the kernel reads the logits where XLA holds them, and the gradient
    jax returns is the buffer the kernel wrote."""
    seen = []
    run_host = lossdsl.api._run_host

    def spy(loss, call, arrays, weight, grad, results=None):
        seen.append((arrays[0].ctypes.data, [r.ctypes.data for r in results]))
        return run_host(loss, call, arrays, weight, grad, results)
    monkeypatch.setattr(lossdsl.api, "_run_host", spy)
    ce = lj.function("cross_entropy")
    v, g = jax.jit(jax.value_and_grad(lambda z: ce(z, LABELS)))(LOGITS)
    (z_in, (_, g_out)), = seen
    assert z_in == LOGITS.unsafe_buffer_pointer() and g_out == g.unsafe_buffer_pointer()
    np.testing.assert_allclose(g, (jax.nn.softmax(LOGITS) - jax.nn.one_hot(LABELS, 7)) / 16, rtol=2e-5, atol=1e-7)


def _optax_ce(z, y, reduction, w, ignore):
    """torch's semantics written with optax: ignored samples count 0 and leave the mean."""
    keep = y != ignore
    per = optax.softmax_cross_entropy_with_integer_labels(z, jnp.where(keep, y, 0)) * keep * w
    return {"none": per, "sum": per.sum(), "mean": per.sum() / keep.sum()}[reduction]


@pytest.mark.parametrize("reduction,shape", [("mean", (16, 7)), ("none", (1, 7)), ("sum", (7,))])
def test_reductions_weight_and_ignore_index_match_optax(reduction, shape):
    ce = lj.function("cross_entropy")
    z = jnp.asarray(RNG.normal(0, 2, shape).astype(np.float32))
    y = jnp.asarray(RNG.integers(0, 7, shape[:-1]))
    if len(shape) == 2 and shape[0] > 1:
        y = y.at[0].set(-1)         # an ignored sample (one sample ignored would leave 0 / 0)
    w = jnp.asarray(RNG.uniform(0, 2, shape[:-1]).astype(np.float32))
    up = jnp.asarray(RNG.uniform(-1, 2, shape[:-1]).astype(np.float32))
    ours = jax.jit(lambda z: ce(z, y, reduction=reduction, weight=w, ignore_index=-1))(z)
    np.testing.assert_allclose(ours, _optax_ce(z, y, reduction, w, -1), rtol=2e-6, atol=1e-6)
    scalar = (lambda v: (v * up).sum()) if reduction == "none" else (lambda v: 3.0 * v)
    both(lambda z: scalar(ce(z, y, reduction=reduction, weight=w, ignore_index=-1)),
         lambda z: scalar(_optax_ce(z, y, reduction, w, -1)), z)


def test_vmap_of_grad_runs_the_kernel_per_batch_element():
    huber = lj.function("huber")
    t = jnp.asarray(RNG.normal(0, 1, 64).astype(np.float32))
    batch = jnp.stack([Z, 0.5 * Z, -Z])
    g = jax.jit(jax.vmap(jax.grad(lambda p: huber(p, t, delta=1.5, reduction="sum"))))(batch)
    rg = jax.jit(jax.vmap(jax.grad(lambda p: optax.huber_loss(p, t, delta=1.5).sum())))(batch)
    np.testing.assert_allclose(g, rg, rtol=2e-6, atol=1e-7)


def test_user_loss_compiled_from_text():
    from test_user_losses import QUANTILE
    f = lj.function(lossdsl.compile(QUANTILE)["quantile"])
    y = jnp.asarray(RNG.normal(0, 1, (4, 3)).astype(np.float32))
    yhat = jnp.asarray(RNG.normal(0, 1, (4, 3)).astype(np.float32))
    v, g = jax.jit(jax.value_and_grad(lambda a, q: f(a, y, q=q, reduction="sum")))(yhat, 0.7)
    r = np.asarray(y, np.float64) - np.asarray(yhat)
    np.testing.assert_allclose(v, np.maximum(0.7 * r, -0.3 * r).sum(), rtol=1e-6)
    np.testing.assert_allclose(g, np.where(r > 0, -0.7, 0.3), rtol=1e-6)


def test_errors_raised_inside_the_kernel_call_are_jax_runtime_errors():
    focal = lj.function("focal")
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"loss 'focal': param 'gamma' = -1 is outside its domain"):
        jax.block_until_ready(jax.jit(lambda z, g: focal(z, Y_HARD, gamma=g))(Z, -1.0))


def test_an_unexpected_exception_in_a_handler_is_an_error_not_a_crash():
    from lossdsl import xla_ffi

    def broken(args, rets):
        raise ZeroDivisionError("on purpose")
    xla_ffi.register("lossdsl_test_broken", broken)
    call = jax.ffi.ffi_call("lossdsl_test_broken", jax.ShapeDtypeStruct((), jnp.float32))
    want = "INTERNAL: lossdsl_test_broken: ZeroDivisionError: on purpose"
    with pytest.raises(jax.errors.JaxRuntimeError, match=want):
        jax.block_until_ready(jax.jit(call)(Z))


def test_calls_from_several_threads():
    """XLA may call the handler on any thread: the parallel kernel (above the serial threshold)
    must neither deadlock nor mix up buffers when two threads call at once."""
    from concurrent.futures import ThreadPoolExecutor
    bce = lj.function("bce")
    zs = [jnp.asarray(RNG.normal(0, 3, 40000).astype(np.float32)) for _ in range(4)]
    y = jnp.asarray((RNG.uniform(0, 1, 40000) > 0.5).astype(np.float32))
    vg = jax.jit(jax.value_and_grad(lambda z: bce(z, y)))
    rvg = jax.jit(jax.value_and_grad(lambda z: optax.sigmoid_binary_cross_entropy(z, y).mean()))
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda z: [vg(z) for _ in range(5)][-1], zs))
    for z, (v, g) in zip(zs, got):
        rv, rg = rvg(z)
        np.testing.assert_allclose(v, rv, rtol=2e-6)
        np.testing.assert_allclose(g, rg, rtol=2e-5, atol=1e-10)


def test_other_platforms_take_the_callback(monkeypatch):
    """Where the FFI target is not registered (a GPU), a pure_callback runs the same kernel."""
    monkeypatch.setattr(lj, "IN_PLACE", ())
    ce = lj.function("cross_entropy")
    fn = jax.jit(jax.value_and_grad(lambda z: (ce(z, LABELS, reduction="none") * UPSTREAM).sum()))
    assert "lossdsl_" not in fn.lower(LOGITS).as_text()
    v, g = fn(LOGITS)
    rv, rg = jax.value_and_grad(
        lambda z: (optax.softmax_cross_entropy_with_integer_labels(z, LABELS) * UPSTREAM).sum())(LOGITS)
    np.testing.assert_allclose(v, rv, rtol=2e-6)
    np.testing.assert_allclose(g, rg, rtol=2e-5, atol=1e-7)
