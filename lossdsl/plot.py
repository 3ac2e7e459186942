"""``lossdsl plot``: loss and gradient against one input, one curve per parameter value.

The numbers come from the compiled kernels (``value_and_grad(..., reduction="none")``), so a
plot shows what training sees.  One input element varies (the target's logit for row losses);
the other inputs are +1, -1, ... in their first element, targets are a hard positive (y = 1, class 0, p one-hot).  With
``x = "p_t"`` the axis is the probability the model gives the target, σ(z) or softmax(z)[y]
(logits computed from it), as in the focal loss paper's Figure 1.
"""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np

from .errors import LossError

SIZE = 10                               # every axis (K, D, L) in a plot
PROB_INPUTS = ("unit", "binary", "class", "simplex")   # targets whose input is a logit

# per-loss defaults: `lossdsl plot focal` is Figure 1 of Lin et al. (2017): no α weighting
DEFAULTS = {
    "focal": dict(params={"gamma": [0, 0.5, 1, 2, 5], "alpha": [1]}, x="p_t", range=(0.0, 1.0), ylim=(0, 5)),
    "cross_entropy": dict(params={"label_smoothing": [0, 0.1, 0.3]}),
    "bce": dict(params={"pos_weight": [1, 2]}),
    "huber": dict(params={"delta": [0.5, 1, 2]}),
    "smooth_l1": dict(params={"beta": [0.5, 1, 2]}),
}


class Curves:
    """x values and, per parameter setting, the loss and the gradient at each x."""

    def __init__(self, loss, wrt, xname, xs, settings, values, grads, note):
        self.loss, self.wrt, self.xname, self.xs = loss, wrt, xname, xs
        self.settings, self.values, self.grads, self.note = settings, values, grads, note

    def label(self, setting, varying=True):
        """``γ = 2``: the params that vary between curves (or those that do not)."""
        from .printing import GREEK
        keys = [k for k in setting if (len({s[k] for s in self.settings}) > 1) == varying]
        return ", ".join(f"{GREEK.get(k, k)} = {setting[k]:g}" for k in keys)

    def write_csv(self, path):
        names = list(self.settings[0]) if self.settings else []
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names + [self.xname, "loss", f"d loss / d {self.wrt}"])
            for setting, v, g in zip(self.settings, self.values, self.grads):
                for x, vi, gi in zip(self.xs, v, g):
                    w.writerow([repr(float(setting[n])) for n in names] + [repr(float(x)), repr(float(vi)), repr(float(gi))])

    def write_png(self, path, dpi=100):
        ylim = DEFAULTS.get(self.loss.name, {}).get("ylim") if self.xname == "p_t" else None
        try:
            import matplotlib
        except ImportError:
            raise LossError('lossdsl plot -o FILE.png needs matplotlib: pip install "lossdsl[plot]" '
                            "(--csv FILE works without it)") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for setting, v, g in zip(self.settings, self.values, self.grads):
            a.plot(self.xs, v, label=self.label(setting) or self.loss.name)
            b.plot(self.xs, g, label=self.label(setting) or self.loss.name)
        xlabel = "probability of the target class $p_t$" if self.xname == "p_t" else self.xname
        a.set(xlabel=xlabel, ylabel="loss", title=f"{self.loss.name}: loss")
        b.set(xlabel=xlabel, ylabel=f"d loss / d {self.wrt}", title=f"{self.loss.name}: gradient")
        if ylim:
            a.set_ylim(*ylim)
        for ax in (a, b):
            ax.grid(alpha=0.3)
            ax.legend()
        fixed = self.label(self.settings[0], varying=False)
        note = "; ".join(t for t in (self.note, fixed) if t)
        if note:
            fig.text(0.5, 0.01, note, ha="center", fontsize=8)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(path, dpi=dpi)
        plt.close(fig)


def parse_params(items, loss):
    """``["gamma=0,0.5,1", "alpha=1"]`` -> {"gamma": [0, 0.5, 1], "alpha": [1]}."""
    out = {}
    for item in items or ():
        name, sep, values = item.partition("=")
        name = name.strip()
        if not sep or not values.strip():
            raise LossError(f"--param takes NAME=V1,V2,...: got {item!r}")
        if name not in loss.params:
            known = ", ".join(loss.params) or "none"
            raise LossError(f"loss '{loss.name}' has no param '{name}' (params: {known})")
        try:
            out[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise LossError(f"--param {name}: not a list of numbers: {values!r}") from None
    return out


def parse_range(text):
    lo, sep, hi = (text or "").partition(":")
    try:
        lo, hi = float(lo), float(hi)
    except ValueError:
        raise LossError(f"--range takes LO:HI, e.g. -4:4: got {text!r}") from None
    if not sep or not lo < hi:
        raise LossError(f"--range takes LO:HI with LO < HI: got {text!r}")
    return lo, hi


def _logit(p):
    return np.log(p) - np.log1p(-p)


def curves(loss, wrt=None, params=None, xrange=None, x=None, points=201):
    """Loss and gradient of ``loss`` along one element of input ``wrt``, per parameter setting."""
    if loss._defn.batch:
        raise LossError(f"loss '{loss.name}' couples the samples of a batch (batch {loss._defn.batch}); "
                        "plot handles per-sample losses")
    wrt = wrt or loss.inputs[0]
    if wrt not in loss.inputs:
        raise LossError(f"loss '{loss.name}' has no input '{wrt}' (inputs: {', '.join(loss.inputs)})")
    default = DEFAULTS.get(loss.name, {})
    given = dict(params or {})
    settings_in = {**default.get("params", {}), **given}
    settings = [dict(zip(settings_in, combo)) for combo in itertools.product(*settings_in.values())] or [{}]
    target_domains = [t.domain.name for t in loss._targets]
    logit_input = any(d in PROB_INPUTS for d in target_domains) and wrt == loss.inputs[0]
    x = x or (default.get("x") if wrt == loss.inputs[0] else None) or "value"
    if x == "p_t" and not logit_input:
        raise LossError(f"p_t needs a loss on logits with a probability or class target; {loss.name} has none")
    lo, hi = xrange or default.get("range") or ((0.0, 1.0) if x == "p_t" else (-4.0, 4.0))
    if x == "p_t":
        lo, hi = max(lo, 1e-3), min(hi, 1 - 1e-3)
    xs = np.linspace(lo, hi, points)

    sizes = {}
    decl_in = {d.name: d for d in loss._inputs}
    n = len(xs)
    rows = bool(decl_in[wrt].axes)
    for d in loss._inputs + loss._targets:
        for a in d.axes + ((d.domain.axis,) if d.domain.axis else ()):
            sizes.setdefault(a, SIZE)

    if x == "p_t":
        p = xs
        # σ(z) = p for a scalar logit; softmax(z)[0] = p with the other K - 1 logits at 0
        t = _logit(p) + (math.log(sizes[decl_in[wrt].axes[0]] - 1) if rows else 0.0)
    else:
        t = xs
    args, others = [], []
    for d in loss._inputs:
        shape = (n,) + tuple(sizes[a] for a in d.axes)
        arr = np.zeros(shape)
        first = (slice(None),) + (0,) * len(d.axes)
        if d.name == wrt:
            arr[first] = t
        else:                               # the other inputs at +1, -1, ... (a triplet's p and n)
            arr[first] = (-1.0) ** len(others)
            others.append(f"{d.name}{'[0]' if d.axes else ''} = {arr[first][0]:g}")
        args.append(arr)
    for d in loss._targets:
        shape = (n,) + tuple(sizes[a] for a in d.axes)
        dom = d.domain.name
        if dom == "class":
            arr = np.zeros(shape, np.int64)
        elif dom == "simplex":
            arr = np.zeros(shape)
            arr[(slice(None),) + (0,) * len(d.axes)] = 1.0
        elif dom in ("unit", "binary", "sign", "positive"):
            arr = np.ones(shape)
        else:
            arr = np.zeros(shape)
        args.append(arr)

    values, grads = [], []
    k = loss.inputs.index(wrt)
    for setting in settings:
        v, g = loss.value_and_grad(*args, reduction="none", **setting)
        g = g[k]
        if rows:
            g = g[(slice(None),) + (0,) * (g.ndim - 1)]
        values.append(np.asarray(v, np.float64).reshape(n))
        grads.append(np.asarray(g, np.float64).reshape(n))
    what = f"{wrt}[0]" if rows else wrt
    targets = ", ".join(f"{d.name} = {'class 0' if d.domain.name == 'class' else 'one-hot' if d.domain.name == 'simplex' else _target_value(d)}"
                        for d in loss._targets)
    note = (f"varying {what}" + (f" (p_t = σ({what}))" if x == "p_t" and not rows else
                                 f" (p_t = softmax({wrt})[0], other logits 0)" if x == "p_t" else "")
            + (f"; {targets}" if targets else "") + (f"; {', '.join(others)}" if others else "")
            + (f"; {', '.join(f'{a} = {s}' for a, s in sizes.items())}" if sizes else ""))
    return Curves(loss, what, "p_t" if x == "p_t" else what, xs, settings, values, grads, note)


def _target_value(d):
    return "1" if d.domain.name in ("unit", "binary", "sign", "positive") else "0"
