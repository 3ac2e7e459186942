"""Accuracy of lossdsl against torch, optax and Keras formulas: writes benchmarks/ACCURACY.md.

    python benchmarks/accuracy_table.py [--points N] [--seed S]

Same points for every library (lossdsl.audit's three samplers: float bit patterns, realistic
values, adversarial points), the same correctly rounded truth (lossdsl.exact), the same measure:
bits of error = log2(ulps + 1), NaN/inf against a finite truth = all bits (64 or 32).

* torch: the library's own function (torch.nn.functional / torchvision's focal formula), value
  and autograd gradient, in the dtype of the inputs.
* optax, Keras: their formulas transcribed op for op (from optax.losses and keras.losses /
  tf.nn as of 2024) into torch operations, so that the gradient is what their autodiff computes.
  Where torch is not installed, those columns are left out.
"""
import argparse
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lossdsl  # noqa: E402
from lossdsl.audit import SAMPLERS, _param_sets, _Sampler, bits_error  # noqa: E402
from lossdsl.exact import Evaluator  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

LOSSES = ("bce", "focal", "log_cosh", "cross_entropy", "kl_div", "huber")
SIZE = 4


# --- the competitors' formulas (torch tensors in, per-sample loss out) --------------------------------
def _bce_torch(z, y):
    return F.binary_cross_entropy_with_logits(z, y, reduction="none")


def _bce_optax(z, y):       # optax.sigmoid_binary_cross_entropy
    return -y * F.logsigmoid(z) - (1 - y) * F.logsigmoid(-z)


def _bce_keras(z, y):       # tf.nn.sigmoid_cross_entropy_with_logits (Keras from_logits=True)
    return torch.clamp(z, min=0) - z * y + torch.log1p(torch.exp(-torch.abs(z)))


def _focal(bce):
    def f(z, y, gamma=2.0, alpha=0.25):
        p = torch.sigmoid(z)
        ce = bce(z, y)
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** gamma
        return (alpha * y + (1 - alpha) * (1 - y)) * loss
    return f


def _logcosh_torch(yhat, y):   # torch has no log-cosh: the usual recipe
    return torch.log(torch.cosh(yhat - y))


def _logcosh_optax(yhat, y):   # optax.log_cosh
    e = yhat - y
    return torch.logaddexp(e, -e) - math.log(2.0)


def _logcosh_keras(yhat, y):   # keras.losses.log_cosh
    x = yhat - y
    return x + F.softplus(-2.0 * x) - math.log(2.0)


def _ce_torch(z, y, label_smoothing=0.0):
    return F.cross_entropy(z, y, reduction="none", label_smoothing=label_smoothing)


def _ce_optax(z, y, label_smoothing=0.0):   # optax.softmax_cross_entropy_with_integer_labels
    lse = torch.logsumexp(z, -1)
    return lse - z.gather(-1, y[:, None])[:, 0]


def _ce_keras(z, y, label_smoothing=0.0):   # tf.nn.sparse_softmax_cross_entropy_with_logits
    shifted = z - z.max(-1, keepdim=True).values
    logp = shifted - torch.log(torch.exp(shifted).sum(-1, keepdim=True))
    return -logp.gather(-1, y[:, None])[:, 0]


def _kl_torch(z, p):
    return F.kl_div(torch.log_softmax(z, -1), p, reduction="none").sum(-1)


def _kl_optax(z, p):       # optax.kl_divergence(log_softmax(z), p)
    logq = torch.log_softmax(z, -1)
    return (p * (torch.where(p == 0, torch.zeros_like(p), torch.log(p)) - logq)).sum(-1)


def _kl_keras(z, p):       # keras.losses.kl_divergence on probabilities, clipped at 1e-7
    q = torch.softmax(z, -1)
    pt, qt = torch.clamp(p, 1e-7, 1), torch.clamp(q, 1e-7, 1)
    return (pt * torch.log(pt / qt)).sum(-1)


def _huber_torch(yhat, y, delta=1.0):
    return F.huber_loss(yhat, y, reduction="none", delta=delta)


def _huber_optax(yhat, y, delta=1.0):      # optax.huber_loss
    err = torch.abs(yhat - y)
    quad = torch.clamp(err, max=delta)
    return 0.5 * quad ** 2 + delta * (err - quad)


def _huber_keras(yhat, y, delta=1.0):      # keras.losses.huber
    err = y - yhat
    a = torch.abs(err)
    return torch.where(a <= delta, 0.5 * err ** 2, delta * a - 0.5 * delta ** 2)


COMPETITORS = {
    "bce": {"torch": _bce_torch, "optax": _bce_optax, "keras": _bce_keras},
    "focal": {"torch": _focal(_bce_torch), "optax": _focal(_bce_optax), "keras": _focal(_bce_keras)},
    "log_cosh": {"torch (log cosh)": _logcosh_torch, "optax": _logcosh_optax, "keras": _logcosh_keras},
    "cross_entropy": {"torch": _ce_torch, "optax": _ce_optax, "keras": _ce_keras},
    "kl_div": {"torch": _kl_torch, "optax": _kl_optax, "keras": _kl_keras},
    "huber": {"torch": _huber_torch, "optax": _huber_optax, "keras": _huber_keras},
}


def _run_competitor(fn, loss, args, params, dtype):
    """(per-sample values, gradient of the first input) through torch autograd."""
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    tensors = []
    for name, a in zip(loss.inputs + loss.targets, args):
        if np.asarray(a).dtype.kind in "iu":
            tensors.append(torch.tensor(a, dtype=torch.int64))
        else:
            tensors.append(torch.tensor(np.asarray(a), dtype=tdt, requires_grad=name in loss.inputs))
    accepted = inspect.signature(fn).parameters
    out = fn(*tensors, **{k: v for k, v in params.items() if k in accepted})
    out.sum().backward()
    g = tensors[0].grad
    return out.detach().numpy().astype(dtype), g.numpy().astype(dtype)


def measure(name, dtype, points, seed):
    dtype = np.dtype(dtype)
    loss = lossdsl.load(name)
    rng = np.random.default_rng(seed)
    axes = sorted({a for d in loss._inputs + loss._targets for a in d.axes}
                  | {d.domain.axis for d in loss._targets if d.domain.axis})
    sizes = {a: SIZE for a in axes}
    sampler = _Sampler(loss, dtype, sizes, rng)
    ev, eg = Evaluator(loss.expr), Evaluator(loss.gradient(loss.inputs[0]))
    gidx = [s.name for s in loss.gradient_index(loss.inputs[0])]
    gshape = tuple(sizes[a] for a in loss.shapes[loss.inputs[0]])
    # defaults, and for focal (γ = 0.5) and huber one alternate: the transcriptions take those params
    psets = _param_sets(loss, dtype)[:2] if name in ("focal", "huber") else [dict(loss.params)]
    libs = {"lossdsl": None}
    if torch is not None:
        libs.update(COMPETITORS[name])
    rec = {lib: {"value": [], "grad": []} for lib in libs}
    truths = {"value": [], "grad": []}
    for kind in SAMPLERS:
        arrays = sampler.points(kind, points)
        for g, params in enumerate(psets):
            sel = np.arange(points)[g::len(psets)]
            args = [arrays[n][sel] for n in loss.inputs + loss.targets]
            pvals = {k: float(dtype.type(v)) for k, v in params.items()}
            for i in range(len(sel)):
                vals = dict({n: a[i] for n, a in zip(loss.inputs + loss.targets, args)}, **pvals, **sizes)
                nan_in = any(np.isnan(np.asarray(vals[n], dtype=np.float64)).any() for n in loss.inputs)
                t = ev.at(vals, dtype)
                truths["value"].append(math.nan if nan_in else t)
                gt = [eg.at(vals, dtype, dict(zip(gidx, ix))) for ix in np.ndindex(*gshape)] if gshape \
                    else [eg.at(vals, dtype)]
                truths["grad"].append(gt)
            for lib, fn in libs.items():
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    if fn is None:
                        v, grads = loss.value_and_grad(*args, reduction="none", **params)
                        gr = grads[0]
                    else:
                        v, gr = _run_competitor(fn, loss, args, params, dtype)
                rec[lib]["value"] += list(np.asarray(v, dtype=dtype))
                rec[lib]["grad"] += [np.asarray(x, dtype=dtype).ravel() for x in gr]
    rows = {}
    tv = np.array([np.nan if t is None else t for t in truths["value"]])
    okv = np.array([t is not None for t in truths["value"]])
    tg = np.array([[np.nan if t is None else t for t in ts] for ts in truths["grad"]]).ravel()
    okg = np.array([[t is not None for t in ts] for ts in truths["grad"]]).ravel()
    for lib in libs:
        cv = np.array(rec[lib]["value"], dtype=dtype)
        cg = np.concatenate([np.atleast_1d(x) for x in rec[lib]["grad"]]).astype(dtype)
        bv, bg = bits_error(cv[okv], tv[okv], dtype), bits_error(cg[okg], tg[okg], dtype)
        nfv = int(np.count_nonzero(np.isfinite(tv[okv]) & ~np.isfinite(cv[okv])))
        nfg = int(np.count_nonzero(np.isfinite(tg[okg]) & ~np.isfinite(cg[okg])))
        rows[lib] = (bv.mean(), bv.max(), nfv, bg.mean(), bg.max(), nfg)
    return rows, int(okv.sum()), int(okg.sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=120, help="points per sampler (default 120)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("ACCURACY.md")))
    a = ap.parse_args(argv)
    t0 = time.time()
    lines = ["# Accuracy: lossdsl vs torch, optax and Keras formulas", "",
             "Written by `python benchmarks/accuracy_table.py --points %d --seed %d`." % (a.points, a.seed),
             "Bits of error against the correctly rounded truth (mpmath interval arithmetic, `lossdsl.exact`): "
             "log2(ulps + 1); NaN or inf where the truth is finite counts all bits (64 / 32). "
             "Points: %d per sampler (float bit patterns, realistic values, adversarial points: ±0, ±inf, NaN, "
             "subnormals, exp's overflow edges, near ties, masked classes, zero probabilities), the default "
             "params and one alternate set; vector losses with K = %d. 'non-finite' counts NaN/inf where the "
             "truth is finite. Gradients are with respect to the first input, through each library's autodiff "
             "(optax and Keras formulas transcribed op for op into torch, so torch autograd plays JAX/TF). "
             "Nothing is excluded here: the cancellation of σ(z) - y next to a soft label counts against "
             "every library alike (tests/test_accuracy.py excludes it for lossdsl, and says why)."
             % (a.points, SIZE), ""]
    if torch is None:
        lines.append("torch is not installed here: only lossdsl is measured.\n")
    else:
        lines.append(f"torch {torch.__version__}, numpy {np.__version__}, lossdsl {lossdsl.__version__}.\n")
    for name in LOSSES:
        for dtype in ("float64", "float32"):
            rows, nv, ng = measure(name, dtype, a.points, a.seed)
            lines.append(f"## {name}, {dtype}  ({nv} values, {ng} gradient entries with a ground truth)\n")
            lines.append("| library | value mean | value max | value non-finite | grad mean | grad max | grad non-finite |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|")
            for lib, (vm, vx, vn, gm, gx, gn) in rows.items():
                lines.append(f"| {lib} | {vm:.2f} | {vx:.1f} | {vn} | {gm:.2f} | {gx:.1f} | {gn} |")
            lines.append("")
            print(f"{name} {dtype} done ({time.time() - t0:.0f} s)", file=sys.stderr)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
