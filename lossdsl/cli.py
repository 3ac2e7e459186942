"""The ``lossdsl`` command line (LANGUAGE.md section 5).

    lossdsl list                           the library, one aligned line per loss
    lossdsl show NAME [--latex|--ascii] [--exact]   definition, loss, gradients, rules
    lossdsl grad NAME [--wrt Z] [--latex|--ascii] [--exact]   the gradients alone
    lossdsl plot NAME [--wrt Z] [--param gamma=0,0.5,1,2,5] [--range LO:HI] [-o FILE.png] [--csv FILE]
    lossdsl docs [-o DIR] [--no-plots] [--no-accuracy]   Markdown catalog of the library (docs/)
    lossdsl source NAME [--target cpu|cuda]
    lossdsl compile FILE.loss              parse, check and compile a user's file
    lossdsl check NAME|--all [--dtype float32|float64] [--points N]   accuracy audit
    lossdsl bench NAME|--all [--dtype float32|float64] [--size small|full] [--repeat N] [--out FILE.md]
                                           speed against numpy, torch, torch.compile, jax.jit
    lossdsl cache [--info|--clear|--prune] the kernel cache: where, how much; empty it; drop old kernels

NAME is a library loss or ``FILE.loss:NAME`` (``FILE.loss`` alone when the file
defines a single loss).  Every ``lossdsl.LossError`` is printed on stderr and
gives exit status 1, never a traceback; compile errors keep their three-line
``FILE:LINE:COL: error: ...`` form with the caret.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import textwrap
from pathlib import Path

import lossdsl

INDENT = "    "


class UsageError(Exception):
    """A mistake on the command line: unknown loss or input, unreadable file."""


# --------------------------------------------------------------------------- helpers

def _unknown(what: str, name: str, choices, hint: str = "") -> UsageError:
    """An error for an unknown NAME, naming the close matches (difflib)."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    msg = f"unknown {what} {name!r}"
    if close:
        msg += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    elif hint:
        msg += f" ({hint})"
    elif choices:
        msg += " (known: " + ", ".join(choices) + ")"
    return UsageError(msg)


def _compile_file(path: str) -> dict:
    try:
        return lossdsl.compile_file(path)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror or e}") from None


def _resolve(spec: str):
    """A library name, FILE.loss:NAME, or FILE.loss holding a single loss -> Loss."""
    path, sep, name = spec.rpartition(":")
    if sep and path.endswith(".loss"):
        defs = _compile_file(path)
        if name not in defs:
            raise _unknown(f"loss in {path}:", name, defs)
        return defs[name]
    if spec.endswith(".loss"):
        defs = _compile_file(spec)
        if len(defs) == 1:
            return next(iter(defs.values()))
        raise UsageError(f"{spec} defines {len(defs)} losses ({', '.join(defs)}); "
                         f"choose one with {spec}:NAME")
    names = lossdsl.names()
    if spec not in names:
        raise _unknown("loss", spec, names, "run 'lossdsl list' to see the library")
    return lossdsl.load(spec)


def _arg(loss, name: str) -> str:
    """``z[K]`` for a vector input, ``y`` for a scalar."""
    axes = tuple(loss.shapes.get(name, ()))
    return f"{name}[{', '.join(axes)}]" if axes else name


def _num(value) -> str:
    try:
        return format(float(value), "g")
    except (TypeError, ValueError):
        return str(value)


def _row(loss) -> tuple[str, ...]:
    return (
        loss.name,
        ", ".join(_arg(loss, n) for n in loss.inputs),
        ", ".join(_arg(loss, n) for n in loss.targets),
        ", ".join(f"{k}={_num(v)}" for k, v in loss.params.items()),
        loss.doc or "",
    )


def _table(losses) -> str:
    """One aligned line per loss: name, inputs, targets, params, description."""
    rows = [_row(f) for f in losses]
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[4]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _style(args) -> str:
    """How show/grad print: "latex", "ascii" or "unicode" (as on paper), or "exact"."""
    if getattr(args, "exact", False):
        return "exact-latex" if args.latex else "exact"
    return "latex" if args.latex else "ascii" if getattr(args, "ascii", False) else "unicode"


def _render(expr, latex: bool) -> str:
    from lossdsl import printing
    return printing.to_latex(expr) if latex else printing.to_text(expr)


def _formula_lines(loss, label, expr, style, noun="the gradient") -> list[str]:
    """``label = expr``: the kernel's form with --exact, else as on paper (cases, edge cases)."""
    from lossdsl import printing
    if style.startswith("exact"):
        return [f"{label} = {_render(expr, style == 'exact-latex')}"]
    try:
        return printing.paper_lines(label, expr, loss, style, noun)
    except Exception as e:  # noqa: BLE001 - a display shortcut failed: show what the kernel computes
        exact = _formula_lines(loss, label, expr, "exact-latex" if style == "latex" else "exact")
        return exact + [f"  (the kernel's form: the paper form failed: {type(e).__name__}: {e})"]


def _gradient_lines(loss, wrt, style) -> list[str]:
    names = list(loss.inputs)
    if wrt is not None:
        if wrt not in names:
            if wrt in loss.targets or wrt in loss.params:
                kind = "a target" if wrt in loss.targets else "a param"
                raise UsageError(f"{wrt!r} is {kind} of {loss.name}, not an input; "
                                 f"gradients exist for: {', '.join(names)}")
            raise _unknown(f"input of {loss.name}:", wrt, names)
        names = [wrt]
    latex = style in ("latex", "exact-latex")
    lines = []
    for n in names:
        idx = _element_index(loss, n)
        if latex:
            sym = (n if len(n) == 1 else r"\mathrm{%s}" % n.replace("_", r"\_")) + (f"_{{{', '.join(idx)}}}" if idx else "")
            label = rf"\frac{{\partial \ell}}{{\partial {sym}}}"
        else:
            label = f"d loss / d {n}" + (f"[{', '.join(idx)}]" if idx else "")
        lines.extend(_formula_lines(loss, label, loss.gradient(n), style))
    adjoints = getattr(loss._c, "adjoints", ()) if hasattr(loss, "_c") else ()
    if adjoints:   # batch losses: gradients through their indexed locals, d_u = d loss / d u
        lines.append(r"\mathrm{where}" if latex else "where")
        for name, adj, at, _axes, expr in reversed(adjoints):
            idx = ", ".join(str(i) for i in at)
            label = rf"\mathrm{{d\_{name}}}_{{{idx}}}" if latex else f"{adj.__name__}[{idx}]"
            lines.extend("  " + line for line in _formula_lines(loss, label, expr, style))
    return lines


def _element_index(loss, name) -> tuple[str, ...]:
    """The index names the gradient of a vector input is written in (``j`` in z[j])."""
    axes = tuple(loss.shapes.get(name, ()))
    get = getattr(loss, "gradient_index", None)  # optional: falls back to the axis names
    if axes and get is not None:
        idx = tuple(str(i) for i in get(name))
        if idx:
            return idx
    return axes


def _block(title: str, text: str) -> str:
    body = textwrap.indent(textwrap.dedent(text).strip("\n"), INDENT)
    return f"{title}\n{body}"


def _write(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------- commands

def cmd_list(args) -> int:
    _write(_table(lossdsl.load(n) for n in lossdsl.names()))
    return 0


def cmd_show(args) -> int:
    f = _resolve(args.name)
    style = _style(args)
    label = r"\ell" if args.latex else "loss"
    parts = [
        f"{f.name}: {f.doc}" if f.doc else f.name,
        _block("definition:", f.definition),
        _block("loss (stabilized, per sample):" if style.startswith("exact") else "loss (per sample):",
               "\n".join(_formula_lines(f, label, f.expr, style, "the loss"))),
        _block("gradients:", "\n".join(_gradient_lines(f, None, style))),
        _block("rules:", "\n".join(f.rules) if f.rules else "(none)"),
    ]
    _write("\n\n".join(parts))
    return 0


def cmd_grad(args) -> int:
    f = _resolve(args.name)
    _write("\n".join(_gradient_lines(f, args.wrt, _style(args))))
    return 0


def cmd_source(args) -> int:
    _write(_resolve(args.name).source(args.target))
    return 0


def cmd_compile(args) -> int:
    defs = _compile_file(args.file)
    for f in defs.values():
        f.source("cpu")  # lower all the way to kernel text: codegen errors surface here
    _write(f"{args.file}: compiled {len(defs)} loss{'' if len(defs) == 1 else 'es'}")
    if defs:
        _write(_table(defs.values()))
    return 0


def cmd_check(args) -> int:
    """Accuracy audit: bits of error against exact arithmetic, lossdsl vs the naive lowering, and
    the verdict against the library's bounds (lossdsl/inherent.py); exit status 1 if over them."""
    from lossdsl.audit import audit
    from lossdsl.inherent import bounds, exclusion, violations
    if args.all == bool(args.name):
        raise UsageError("check takes a NAME or --all")
    losses = [lossdsl.load(n) for n in lossdsl.names()] if args.all else [_resolve(args.name)]
    over = 0
    for i, loss in enumerate(losses):
        exclude = exclusion(loss)
        rep = audit(loss, args.dtype, points=args.points, seed=args.seed, exclude=exclude)
        print(("\n" if i else "") + rep.format())
        excluded = sum(s.excluded for s in rep.overall.values())
        if exclude is not None:
            print(f"  ({excluded} entries left out: cancellation inherent in the data, lossdsl/inherent.py)")
        mean_b, p99_b = bounds(rep, loss)
        bad = violations(rep, loss, worst=False)       # the table above names the worst inputs
        over += bool(bad)
        print(f"  bounds (mean <= {mean_b:g}, p99 <= {p99_b:g} bits, no non-finite where the truth is finite): "
              + ("within" if not bad else "OVER\n    " + "\n    ".join(bad)))
    return 1 if over else 0


def cmd_cache(args) -> int:
    """The kernel cache: where it is and what it holds, or remove lossdsl's files from it."""
    from lossdsl import cache, jit
    if args.clear or args.prune:
        files, size = (cache.clear if args.clear else cache.prune)()
        _write(f"{jit.cache_dir()}: removed {files} files ({size} bytes)")
        return 0
    i = cache.info()
    state = "" if i["exists"] else " (not a directory)" if i["path"].exists() else " (not created yet)"
    _write(f"{i['path']}{state}\n"
           f"kernels: {i['kernels']}\n"
           f"files:   {i['files']} ({i['bytes']} bytes)\n"
           f"index:   {i['entries']} entries, {i['stale']} from other compilers ('--prune' drops them)")
    return 0


def cmd_plot(args) -> int:
    """Loss and gradient curves from the compiled kernels, as a PNG and/or a CSV."""
    from lossdsl import plot
    f = _resolve(args.name)
    params = plot.parse_params(args.param, f)
    xrange = plot.parse_range(args.range) if args.range else None
    c = plot.curves(f, args.wrt, params, xrange, args.x)
    out = args.output or (None if args.csv else f"{f.name}.png")
    if args.csv:
        c.write_csv(args.csv)
        print(f"wrote {args.csv}")
    if out:
        c.write_png(out)
        print(f"wrote {out}")
    return 0


def cmd_docs(args) -> int:
    """The Markdown catalog of the library (and its plots, with matplotlib) under DIR."""
    from lossdsl import docs
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print('lossdsl docs: matplotlib is not installed (pip install "lossdsl[plot]"): '
                  "writing the Markdown without the plots", file=sys.stderr)
            plots = False
    written = docs.write(args.output, plots=plots, accuracy=not args.no_accuracy)
    print(f"wrote {len(written)} files to {args.output}")
    return 0


def cmd_bench(args) -> int:
    """Speed of the fused forward + backward against numpy and the installed frameworks."""
    from lossdsl import bench
    if args.all == bool(args.name):
        raise UsageError("bench takes a NAME or --all")
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    if args.all:
        work = bench.workloads()
    else:
        names = lossdsl.names()
        if args.name not in names:
            raise _unknown("loss", args.name, names, "bench runs the library's losses")
        work = bench.workloads(args.name)
    peers = bench.available_peers()
    bench.enable_float64(args.dtype)
    threads = bench.setup_threads()
    log = lambda msg: print(f"lossdsl bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for w in work:
        log(f"{w.label} ...")
        rows.append(bench.run_workload(w, args.size, args.dtype, args.repeat, peers, log))
    compiled = bench.compile_times() if args.out else None
    command = "lossdsl bench " + ("--all" if args.all else args.name) + \
        "".join(f" --{k} {v}" for k, v in (("dtype", args.dtype), ("size", args.size), ("repeat", args.repeat))
                if v != {"dtype": "float32", "size": "full", "repeat": 5}[k])
    text = bench.report(rows, peers, threads, command + (f" --out {args.out}" if args.out else ""),
                        args.dtype, args.repeat, compiled)
    _write(text)
    if args.out:
        try:
            old = Path(args.out).read_text() if Path(args.out).is_file() else ""
            with open(args.out, "w") as fh:
                fh.write(bench.joined(text, bench.sections(old)[1]))
        except OSError as e:
            raise UsageError(f"{args.out}: {e.strerror or e}") from None
    bad = bench.mismatches(rows, args.dtype)
    for label, peer, diff in bad:
        log(f"{label}: {peer}'s value differs from lossdsl's by {diff:.1e} (relative)")
    return 1 if bad else 0


# --------------------------------------------------------------------------- parser

def _print_options(s) -> None:
    s.add_argument("--latex", action="store_true", help="render expressions as LaTeX")
    s.add_argument("--ascii", action="store_true", help="plain ASCII instead of Unicode math (σ, Σ, ·, ²)")
    s.add_argument("--exact", action="store_true",
                   help="the full form the kernel computes, edge-case branches included")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lossdsl",
        description="Symbolic loss compiler: math-like losses to stable kernels "
                    "with readable gradients.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    name_help = "a library loss, or FILE.loss:NAME"

    s = sub.add_parser("list", help="the library, one line per loss")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="definition, loss and gradients as on paper, rules")
    s.add_argument("name", metavar="NAME", help=name_help)
    _print_options(s)
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("grad", help="the gradient of each input, as on paper")
    s.add_argument("name", metavar="NAME", help=name_help)
    s.add_argument("--wrt", metavar="Z", help="only the gradient with respect to input Z")
    _print_options(s)
    s.set_defaults(func=cmd_grad)

    s = sub.add_parser("plot", help="loss and gradient against one input, one curve per param value")
    s.add_argument("name", metavar="NAME", help=name_help)
    s.add_argument("--wrt", metavar="INPUT", help="the input to vary (default: the first)")
    s.add_argument("--param", action="append", metavar="NAME=V1,V2,...",
                   help="one curve per value (repeatable); e.g. gamma=0,0.5,1,2,5")
    s.add_argument("--range", metavar="LO:HI", help="the x range (default -4:4, or 0:1 for p_t); "
                                                   "write --range=-2:2 when LO is negative")
    s.add_argument("--x", choices=("value", "p_t"),
                   help="x axis: the input's value, or p_t, the probability of the target "
                        "(losses on logits; focal's default, as in its paper)")
    s.add_argument("-o", "--output", metavar="FILE.png",
                   help="write the figure (needs matplotlib: pip install 'lossdsl[plot]'); "
                        "default NAME.png unless --csv is given")
    s.add_argument("--csv", metavar="FILE", help="write the numbers (no matplotlib needed)")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("docs", help="a Markdown catalog of the library, one page per loss")
    s.add_argument("-o", "--output", metavar="DIR", default="docs", help="where to write it (default docs/)")
    s.add_argument("--no-plots", action="store_true", help="the Markdown alone, no PNG plots")
    s.add_argument("--no-accuracy", action="store_true",
                   help="leave out the audit's accuracy figures (they take about a minute)")
    s.set_defaults(func=cmd_docs)

    s = sub.add_parser("source", help="the generated kernel source")
    s.add_argument("name", metavar="NAME", help=name_help)
    s.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    s.set_defaults(func=cmd_source)

    s = sub.add_parser("compile", help="parse, check and compile a .loss file")
    s.add_argument("file", metavar="FILE.loss")
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("check", help="accuracy audit: bits of error against exact arithmetic, "
                                     "lossdsl vs the naive lowering; exit status 1 if over the bounds")
    s.add_argument("name", metavar="NAME", nargs="?", help=name_help)
    s.add_argument("--all", action="store_true", help="every library loss")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    s.add_argument("--points", type=int, default=200, metavar="N", help="points per sampler (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("cache", help="the kernel cache: where it is and what it holds; --clear, --prune")
    one = s.add_mutually_exclusive_group()
    one.add_argument("--info", action="store_true", help="where it is, how many kernels and bytes (default)")
    one.add_argument("--clear", action="store_true", help="remove every file lossdsl wrote there")
    one.add_argument("--prune", action="store_true",
                     help="remove kernels indexed by other (older) versions of the compiler")
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("bench", help="speed of forward + backward against numpy and, where installed, "
                                     "torch, torch.compile and jax.jit")
    s.add_argument("name", metavar="NAME", nargs="?", help="a library loss")
    s.add_argument("--all", action="store_true", help="every library loss")
    s.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    s.add_argument("--size", choices=("small", "full"), default="full",
                   help="full: the workloads of benchmarks/RESULTS.md; small: batch / 64 (a quick run)")
    s.add_argument("--repeat", type=int, default=5, metavar="N", help="timed runs after a warm-up; best kept")
    s.add_argument("--out", metavar="FILE.md", help="also write the report (machine, date, table) here")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except lossdsl.CompileError as e:  # already FILE:LINE:COL: error: ... + caret
        print(e, file=sys.stderr)
    except lossdsl.LossError as e:
        print(f"lossdsl: error: {e}", file=sys.stderr)
    except UsageError as e:
        print(f"lossdsl: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
