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


def test_vmap_and_half_precision():
    bce = lj.function("bce")
    batch = jnp.stack([Z, -Z])
    v = jax.vmap(lambda z: bce(z, Y_HARD))(batch)
    np.testing.assert_allclose(v, [optax.sigmoid_binary_cross_entropy(z, Y_HARD).mean() for z in batch], rtol=2e-6)
    vh, gh = jax.value_and_grad(lambda z: bce(z, Y_HARD))(Z.astype(jnp.bfloat16))
    assert vh.dtype == jnp.bfloat16 and gh.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(vh), float(optax.sigmoid_binary_cross_entropy(Z, Y_HARD).mean()), rtol=1e-2)


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
    """Values are only known inside the callback: jax re-raises, with the LossError's message."""
    f = lj.function("cross_entropy")
    with pytest.raises(Exception, match=r"loss 'cross_entropy': target 'y' must hold a class index in \[0, 7\)"):
        jax.block_until_ready(jax.jit(f)(LOGITS, LABELS + 7))
