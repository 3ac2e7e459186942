"""Kernels specialized for the param values a call passes (issue 9): a param that appears in an
exponent, called with a small integer value, gets a kernel with that value compiled in (focal at
γ = 2: a product instead of a powf per element, about 5x faster). The specialized kernel must
compute what the general one computes."""
import copy
import re

import numpy as np
import pytest

import lossdsl
from lossdsl import api
from lossdsl.call import checked


def _both(loss, arrays, **params):
    """(specialized, general) results of one call: value and gradients, reduction none."""
    call = checked(loss, arrays, "none", None, None, params)
    general = copy.copy(call)
    general.fixed = ()
    return call, api._run_host(loss, call, arrays, None, True), api._run_host(loss, general, arrays, None, True)


def test_exponent_params_are_found_in_the_ir():
    assert lossdsl.load("focal").exponent_params == ("gamma",)
    assert lossdsl.load("bce").exponent_params == ()
    text = 'loss lp "L^p"\n  input yhat\n  target y\n  param p = 2 : positive\n  loss = abs(y - yhat)^p\n'
    assert lossdsl.compile(text)["lp"].exponent_params == ("p",)


@pytest.mark.parametrize("gamma", [2.0, 3.0])
def test_specialized_focal_equals_the_general_kernel(gamma):
    rng = np.random.default_rng(int(gamma))
    z = np.concatenate([rng.normal(0, 3, 200), [-30.0, -1e-3, 0.0, 1e-3, 30.0]])
    y = np.concatenate([(rng.random(200) > 0.5) * 1.0, [1.0, 0.0, 1.0, 1.0, 0.0]])
    f = lossdsl.load("focal")
    call, (v1, (g1,)), (v2, (g2,)) = _both(f, [z, y], gamma=gamma, alpha=0.3)
    assert call.fixed == (("gamma", int(gamma)),)
    np.testing.assert_allclose(v1, v2, rtol=1e-13, atol=0)
    np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-300)


def test_other_values_use_the_general_kernel():
    f = lossdsl.load("focal")
    z, y = np.zeros(3), np.ones(3)
    assert checked(f, [z, y], "mean", None, None, {"gamma": 2.5}).fixed == ()
    assert checked(f, [z, y], "mean", None, None, {"gamma": 7.0}).fixed == ()


def test_specialized_source_has_no_runtime_power():
    f = lossdsl.load("focal")
    from lossdsl import render_cpu
    general = render_cpu.render(f._compiled_for(()), "float64")
    special = render_cpu.render(f._compiled_for((("gamma", 2),)), "float64")
    # the general kernel's power is the runtime u ** p0, or inside _xpow(c, u, p0) (rules.scaled_power)
    assert re.search(r"\*\* p0|_xpow\([^\n]*, p0\)", general)
    assert "** p0" not in special and not re.search(r"_xpow\([^\n]*p0\)", special) and "p0" in special   # still an argument
