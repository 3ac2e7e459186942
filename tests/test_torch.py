"""The PyTorch bridge (LANGUAGE.md §6): lossdsl.torch against torch's own autograd and functions.

Skipped as a whole, with the reason, where torch is not installed (pip install 'lossdsl[torch]').
References are independent of the code under test: torch.autograd.gradcheck (finite differences),
torch.nn.functional, and formulas written out in torch and differentiated by torch's autograd.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'lossdsl[torch]')")
F = torch.nn.functional

import lossdsl                      # noqa: E402
import lossdsl.torch as lt          # noqa: E402
import references as R              # noqa: E402

def _case(name, dtype=np.float64, seed=0, params=None):
    """(inputs, targets) as numpy arrays for any library loss, away from kinks."""
    rng = np.random.default_rng(seed)
    if name in R.SIGNATURES:
        inputs, targets, _ = R.make_case(name, dtype, seed, params)
        return list(inputs), list(targets)
    if name == "triplet":
        while True:
            a, p, n = rng.normal(0, 0.7, (3, 5, 3))
            h = ((a - p) ** 2).sum(-1) - ((a - n) ** 2).sum(-1) + 1.0
            if np.all(np.abs(h) > 0.05):
                return [x.astype(dtype) for x in (a, p, n)], []
    if name == "contrastive":
        while True:
            z1, z2 = rng.normal(0, 0.8, (2, 6, 3))
            d = np.sqrt(((z1 - z2) ** 2).sum(-1))
            if np.all(np.abs(1.0 - d) > 0.05) and np.all(d > 0.05):
                return [z1.astype(dtype), z2.astype(dtype)], [(np.arange(6) % 2).astype(dtype)]
    if name == "vae_elbo":
        xhat, mu, logvar = rng.normal(0, 2, (5, 4)), rng.normal(0, 1, (5, 2)), rng.uniform(-1.5, 1.5, (5, 2))
        return [xhat.astype(dtype), mu.astype(dtype), logvar.astype(dtype)], [rng.uniform(0, 1, (5, 4)).astype(dtype)]
    if name == "ntxent":
        return [rng.normal(0, 1, (6, 4)).astype(dtype)], [(np.arange(6) + 3) % 6]
    raise KeyError(name)


def _tensors(inputs, targets, grad=True):
    """Torch tensors; integer targets as int64, which torch's class-index functions require."""
    ins = [torch.tensor(a, requires_grad=grad) for a in inputs]
    return ins, [torch.tensor(t.astype(np.int64) if t.dtype.kind in "iu" else t) for t in targets]


# --------------------------------------------------------------------------------------
# gradcheck: every library loss, every reduction, float64
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", lossdsl.names())
def test_gradcheck_every_library_loss(name, reduction):
    f = lt.function(name)
    inputs, targets = _case(name)
    ins, tgts = _tensors(inputs, targets)
    assert torch.autograd.gradcheck(lambda *x: f(*x, *tgts, reduction=reduction), tuple(ins),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_weighted_and_ignored_rows():
    f = lt.function("cross_entropy")
    inputs, targets = _case("cross_entropy", params={"ignore_index": 2})
    (z,), (y,) = _tensors(inputs, targets)
    w = torch.rand(y.shape, dtype=torch.float64) + 0.5
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda z: f(z, y, reduction=reduction, weight=w, ignore_index=2, label_smoothing=0.2), (z,))


def test_gradcheck_user_loss():
    text = """
loss poly1 "Poly-1 (Leng et al., 2022): cross-entropy plus eps * (1 - p_t)"
  input  z[K]
  target y : class(K)
  param  eps = 1 : real
  loss = cross_entropy(z, y) + eps * (1 - exp(z[y] - logsumexp[k] z[k]))
"""
    f = lt.function(lossdsl.compile(text)["poly1"])
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.autograd.gradcheck(lambda z: f(z, y, eps=2.0, reduction="none"), (z,))


# --------------------------------------------------------------------------------------
# Against torch.nn.functional in float32, with a non-unit upstream gradient
# --------------------------------------------------------------------------------------

TORCH_CASES = [
    ("cross_entropy", {"label_smoothing": 0.1}),
    ("cross_entropy", {"label_smoothing": 0.1, "ignore_index": 2}),
    ("bce", {"pos_weight": 2.5}),
    ("huber", {"delta": 0.7}),
    ("smooth_l1", {"beta": 0.4}),
    ("mse", {}),
    ("mae", {}),
    ("kl_div", {}),
]


@pytest.mark.parametrize("name,params", TORCH_CASES, ids=[f"{n}-{'-'.join(p)}" for n, p in TORCH_CASES])
def test_matches_torch_functional_float32(name, params):
    inputs, targets = _case(name, np.float32, seed=3, params=params)
    full, ignore_index = R._split_params(name, params)
    ours, tgts = _tensors(inputs, targets)
    theirs = [torch.tensor(a, requires_grad=True) for a in inputs]
    kw = {k: v for k, v in params.items() if k != "ignore_index"}
    mine = lt.function(name)(*ours, *tgts, reduction="none", ignore_index=ignore_index, **kw)
    ref = R._torch_per_sample(torch, name, theirs, tgts, full, ignore_index)
    w = torch.rand(ref.shape) * 3 - 1                # upstream gradient: one value per sample, any sign
    (mine * w).sum().backward()
    (ref * w).sum().backward()
    assert mine.dtype == torch.float32 and mine.shape == ref.shape
    torch.testing.assert_close(mine, ref.detach(), rtol=2e-6, atol=2e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=2e-6)
    # the reduced forms too: mean over kept samples, sum
    for reduction in ("mean", "sum"):
        v = lt.function(name)(*[a.detach() for a in ours], *tgts, reduction=reduction,
                              ignore_index=ignore_index, **kw)
        kept = ref if ignore_index is None else ref[tgts[0] != ignore_index]
        want = kept.sum() if reduction == "sum" else kept.sum() / kept.numel()
        torch.testing.assert_close(v, want.detach(), rtol=2e-6, atol=2e-6)


def test_triplet_matches_torch_autograd_formula():
    (a, p, n), _ = _case("triplet", np.float32, seed=5)
    ours = [torch.tensor(x, requires_grad=True) for x in (a, p, n)]
    theirs = [torch.tensor(x, requires_grad=True) for x in (a, p, n)]
    mine = lt.function("triplet")(*ours, reduction="none", margin=1.0)
    ta, tp, tn = theirs
    ref = torch.clamp(((ta - tp) ** 2).sum(-1) - ((ta - tn) ** 2).sum(-1) + 1.0, min=0)
    w = torch.linspace(-2, 3, ref.numel())
    (mine * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(mine, ref.detach(), rtol=2e-6, atol=2e-6)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.grad, y.grad, rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------------------
# dtypes, memory, modules, params
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(dtype):
    z = torch.randn(16, 5).to(dtype).requires_grad_()
    y = torch.randint(0, 5, (16,))
    v = lt.function("cross_entropy")(z, y)
    v.backward()
    z32 = z.detach().float().requires_grad_()
    ref = F.cross_entropy(z32, y)
    ref.backward()
    assert v.dtype == dtype and z.grad.dtype == dtype
    torch.testing.assert_close(v.float(), ref.detach(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.grad.float(), z32.grad, rtol=1e-2, atol=1e-3)


def test_a_half_input_after_a_float32_one_is_computed_in_float32():
    """Only the first input decides nothing: a float16 input anywhere goes through float32 and gets
    its gradient back in float16, the others in float32 (the fast path is for all-float32 calls)."""
    a, p, n = (torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ph = p.half()
    ins = [a.clone().requires_grad_(), ph.clone().requires_grad_(), n.clone().requires_grad_()]
    lt.function("triplet")(*ins).backward()
    ref = [a.clone().requires_grad_(), ph.float().requires_grad_(), n.clone().requires_grad_()]
    ta, tp, tn = ref         # the library's triplet: squared distances, margin 1 (as in the test above)
    torch.clamp(((ta - tp) ** 2).sum(-1) - ((ta - tn) ** 2).sum(-1) + 1.0, min=0).mean().backward()
    assert [t.grad.dtype for t in ins] == [torch.float32, torch.float16, torch.float32]
    for got, want in zip(ins, ref):
        torch.testing.assert_close(got.grad.float(), want.grad, rtol=1e-3, atol=1e-3)


def test_cpu_tensors_are_shared_not_copied():
    z = torch.randn(8, 3)
    assert np.shares_memory(lt._kernel_array(z), z.numpy())


def test_non_contiguous_tensors():
    z = torch.randn(5, 8, dtype=torch.float64).t().requires_grad_()     # (8, 5), strided
    y = torch.randint(0, 5, (8,))
    lt.function("cross_entropy")(z, y, reduction="sum").backward()
    z2 = z.detach().contiguous().requires_grad_()
    F.cross_entropy(z2, y, reduction="sum").backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_params_may_be_0d_tensors_and_get_no_gradient():
    z = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(10) > 0.5).double()
    gamma = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    f = lt.function("focal")
    v = f(z, y, gamma=gamma)
    v.backward()
    assert gamma.grad is None and z.grad is not None
    torch.testing.assert_close(v, f(z.detach(), y, gamma=1.5))


def test_loss_module():
    crit = lt.LossModule("cross_entropy", label_smoothing=0.1)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss = crit(model(x), y)
    loss.backward()
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y, label_smoothing=0.1))
    assert "cross_entropy" in repr(crit) and "label_smoothing=0.1" in repr(crit)
    assert list(crit.state_dict()) == []
    with pytest.raises(lossdsl.DomainError, match="label_smoothing"):
        lt.LossModule("cross_entropy", label_smoothing=3.0)
    with pytest.raises(lossdsl.ArgumentError, match="reduction must be one of"):
        lt.LossModule("cross_entropy", reduction="batchmean")


def test_no_gradient_wanted_runs_without_graph():
    z, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with torch.no_grad():
        v = lt.function("cross_entropy")(z, y)
    assert v.grad_fn is None
    torch.testing.assert_close(v, F.cross_entropy(z, y))


def test_backward_twice_with_retained_graph():
    """The saved gradients may be handed over as .grad (upstream 1): a retained graph must still
    give the same gradient again, whatever was done to .grad in between."""
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    v = lt.function("cross_entropy")(z, y)
    v.backward(retain_graph=True)
    first = z.grad.clone()
    z.grad.mul_(0.0)
    v.backward(retain_graph=True)
    torch.testing.assert_close(z.grad, first)
    v.backward()
    torch.testing.assert_close(z.grad, 2 * first)


def test_backward_adopts_the_kernels_gradient_without_a_copy(monkeypatch):
    """loss.backward(): the gradient the kernel wrote is .grad itself (a copy is a second pass over
    the data: it doubled the bridge's time on large batches when something else still held it)."""
    call, written = lt._call, []

    def spy(*args):
        value, grads = call(*args)
        written.extend(t.data_ptr() for t in grads)
        return value, grads
    monkeypatch.setattr(lt, "_call", spy)
    z = torch.randn(64, 10, requires_grad=True)
    lt.function("cross_entropy")(z, torch.randint(0, 10, (64,))).backward()
    assert written and z.grad.data_ptr() == written[0]


def _large_step(f, z, y):
    """One training step's loss and backward on a batch whose gradient is leased (buffers.LARGE)."""
    f(z, y).backward()
    return z.grad


def test_released_gradient_memory_is_reused_and_held_memory_is_not():
    """Large gradients go into memory released by the step before (no fresh pages to fault in and
    zero), never into memory something can still see: a kept .grad, a view of it, a numpy view."""
    f, rng = lt.function("cross_entropy"), np.random.default_rng(3)
    z = torch.from_numpy(rng.standard_normal((2048, 1000)).astype(np.float32)).requires_grad_()
    y = torch.from_numpy(rng.integers(0, 1000, 2048))
    z_ref = z.detach().clone().requires_grad_()
    F.cross_entropy(z_ref, y).backward()

    first = _large_step(f, z, y)
    held = {"tensor": first, "view": first[7:9], "numpy": first.numpy()[3]}
    for name, kept in held.items():
        before = kept.clone() if isinstance(kept, torch.Tensor) else kept.copy()
        z.grad = None
        z.data.mul_(-1.0)       # a different gradient: overwriting the kept memory would show
        second = _large_step(f, z, y)
        z.data.mul_(-1.0)
        assert second.data_ptr() != first.data_ptr(), name
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(before), err_msg=name)
        del second
    ptr = first.data_ptr()
    z.grad = None
    del held, kept, first       # the last references to the first gradient go
    third = _large_step(f, z, y)
    assert third.data_ptr() == ptr
    torch.testing.assert_close(third, z_ref.grad)


def test_second_derivatives_are_a_clear_error():
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = torch.rand(5, dtype=torch.float64)
    g, = torch.autograd.grad(lt.function("bce")(z, y), z, create_graph=True)
    with pytest.raises(lossdsl.LossError, match="loss 'bce': second derivatives"):
        g.sum().backward()


# --------------------------------------------------------------------------------------
# Bad input: the same LossError as with numpy arrays
# --------------------------------------------------------------------------------------

BAD = [
    ("integer logits", "cross_entropy", lambda: (np.ones((4, 3), np.int64), np.zeros(4, np.int64)), {}),
    ("mismatched shapes", "cross_entropy", lambda: (np.ones((4, 3), np.float32), np.zeros(5, np.int64)), {}),
    ("class out of range", "cross_entropy", lambda: (np.ones((4, 3), np.float32), np.array([0, 1, 7, 2])), {}),
    ("param outside domain", "focal", lambda: (np.ones(4, np.float32), np.ones(4, np.float32)), {"gamma": -1.0}),
    ("unknown param", "mse", lambda: (np.ones(4, np.float32), np.ones(4, np.float32)), {"delta": 1.0}),
    ("target outside domain", "bce", lambda: (np.ones(4, np.float32), np.array([0, 1, 2, 0], np.float32)), {}),
]


@pytest.mark.parametrize("what,name,arrays,params", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_the_numpy_error(what, name, arrays, params):
    with pytest.raises(lossdsl.LossError) as want:
        lossdsl.load(name)(*arrays(), **params)
    with pytest.raises(type(want.value)) as got:
        lt.function(name)(*[torch.from_numpy(a) for a in arrays()], **params)
    assert str(got.value) == str(want.value)


def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "lossdsl.torch")
    with pytest.raises(ImportError, match=r"lossdsl\[torch\]"):
        importlib.import_module("lossdsl.torch")


# --------------------------------------------------------------------------------------
# Training: the same trajectory as F.cross_entropy; torch.compile gives the eager results
# --------------------------------------------------------------------------------------

def _train(loss_fn, steps=50):
    torch.manual_seed(0)
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return np.array(out)


def test_training_follows_torch_trajectory():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the digits data set)")
    ours = _train(lt.LossModule("cross_entropy"))
    theirs = _train(F.cross_entropy)
    assert ours[-1] < 0.5 * ours[0]                  # it trained
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)


def test_example_trains_digits():
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (the digits data set)")
    path = Path(__file__).resolve().parent.parent / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(epochs=4) > 0.9


def test_torch_compile_matches_eager_without_graph_break():
    f = lt.function("cross_entropy")
    torch.manual_seed(1)
    model = torch.nn.Linear(12, 5)

    def step(x, y, w):
        return (f(model(x), y, reduction="none", label_smoothing=0.1) * w).sum()

    compiled = torch.compile(step, fullgraph=True)   # fullgraph: a graph break would raise
    for n in (16, 9):                                # a second batch size: dynamic shapes
        x, y, w = torch.randn(n, 12), torch.randint(0, 5, (n,)), torch.rand(n)
        model.zero_grad()
        v_c = compiled(x, y, w)
        v_c.backward()
        g_c = model.weight.grad.clone()
        model.zero_grad()
        v_e = step(x, y, w)
        v_e.backward()
        torch.testing.assert_close(v_c, v_e)
        torch.testing.assert_close(g_c, model.weight.grad)


# --------------------------------------------------------------------------------------
# CUDA tensors (a real GPU only; the device plumbing is tested under the simulator in test_cuda.py)
# --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("name", ["cross_entropy", "bce", "huber"])
def test_cuda_tensors_stay_on_device(name):
    inputs, targets = _case(name, np.float32, seed=2)
    cpu_ins, cpu_t = _tensors(inputs, targets)
    gpu_ins = [a.detach().cuda().requires_grad_() for a in cpu_ins]
    gpu_t = [t.cuda() for t in cpu_t]
    f = lt.function(name)
    v = f(*gpu_ins, *gpu_t, reduction="none")
    w = torch.rand(v.shape, device="cuda")
    (v * w).sum().backward()
    assert v.is_cuda and all(a.grad.is_cuda for a in gpu_ins)
    vc = f(*cpu_ins, *cpu_t, reduction="none")
    (vc * w.cpu()).sum().backward()
    torch.testing.assert_close(v.cpu(), vc.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(gpu_ins, cpu_ins):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-4, atol=1e-6)
