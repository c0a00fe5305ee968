"""Make a module's forward use local sizes along sharded dims.

Some code bakes global sizes into reshapes: nanoGPT's ``y.view(B, T, C)`` takes ``C``
from the (replicated) input, and ``view(B, T, self.n_head, ...)`` a literal head count.
After its projections are sharded, such a module is traced with torch.fx (children are
leaves), run twice on meta tensors — dense and sharded — and every view/reshape/split/
expand whose size along the sharded dim is still the global one is rewritten to the
local one (literal ``n`` -> ``n // tp``; a computed size -> ``size // tp``; an uneven split, this rank
holding ``parts[r]`` of ``sum(parts)`` units: ``n * parts[r] // sum(parts)``). The new forward is bound
to the same module object, so its class and attributes stay.
"""
from __future__ import annotations

import operator
import types
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from autotp.errors import RewriteError
from autotp.planner.layouts import NoRule
from autotp.planner.rules.shapes import map_reshape

_RESHAPES = {"view", "reshape", torch.reshape}
_SPLITS = {"split", torch.split}
_EXPANDS = {"expand"}


_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "rand", "randn", "eye", "tril_indices", "triu_indices")


class _ChildrenAreLeaves(fx.Tracer):
    """fx tracing with every child module a leaf, and tensors made in forward from traced sizes
    (``torch.ones(T, T)``, ``torch.arange(T)``) or buffers sliced by them recorded as calls instead of failing on
    the proxies."""

    proxy_buffer_attributes = True  # a buffer sliced by traced sizes (``self.bias[:, :, :T, :T]``) is a node too

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        originals = {name: getattr(torch, name) for name in _FACTORIES}

        def recorded(fn):
            def call(*args, **kwargs):
                leaves = [*args, *kwargs.values()] + [x for a in args if isinstance(a, (tuple, list)) for x in a]
                if any(isinstance(x, fx.Proxy) for x in leaves):
                    return self.create_proxy("call_function", fn, args, kwargs)
                return fn(*args, **kwargs)
            return call

        try:
            for name, fn in originals.items():
                setattr(torch, name, recorded(fn))
            return super().trace(root, concrete_args)
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)


def _kind(n: fx.Node) -> str | None:
    if n.op not in ("call_method", "call_function"):
        return None
    for name, group in (("reshape", _RESHAPES), ("split", _SPLITS), ("expand", _EXPANDS)):
        if n.target in group:
            return name
    return None


class _Run(fx.Interpreter):
    """Runs the graph, remembering every node's value; ``fix`` edits shape args before each call."""

    def __init__(self, gm: fx.GraphModule, fix=None):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}
        self.fix = fix

    def run_node(self, n: fx.Node) -> Any:
        if self.fix is not None and _kind(n):
            self.fix(n, self)
        out = super().run_node(n)
        self.values[n] = out
        return out


def _sharded_dim(local: torch.Tensor, glob: torch.Tensor, share: tuple[int, int]) -> int | None:
    diff = [d for d, (a, b) in enumerate(zip(local.shape, glob.shape)) if a != b]
    if not diff:
        return None
    num, den = share
    if len(diff) != 1 or local.shape[diff[0]] * den != glob.shape[diff[0]] * num:
        raise RewriteError(f"local shape {list(local.shape)} vs global {list(glob.shape)}: not a "
                           + (f"tp={den} shard" if num == 1 else f"shard of {num}/{den}"))
    return diff[0]


def _sizes(n: fx.Node) -> tuple[list[Any], bool]:
    """The size arguments of a reshape/expand call, and whether they were passed as one tuple."""
    rest = list(n.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0]), True
    return rest, False


def _set_sizes(n: fx.Node, sizes: list[Any], packed: bool) -> None:
    n.args = (n.args[0], tuple(sizes)) if packed else (n.args[0], *sizes)


def _localize_value(graph: fx.Graph, n: fx.Node, v: Any, share: tuple[int, int], run: "_Run") -> Any:
    num, den = share
    if isinstance(v, int):
        if v * num % den:
            raise RewriteError(f"cannot localize {n.format_node()}: size {v} is not divisible into a {num}/{den} share")
        return v * num // den
    with graph.inserting_before(n):
        new = graph.call_function(operator.mul, (v, num)) if num != 1 else v
        new = graph.call_function(operator.floordiv, (new, den))
    run.env[new] = run.env[v] * num // den  # the interpreter has passed this point already
    return new


def trace_localized(module: nn.Module, dense: nn.Module, local: nn.Module, args: tuple, kwargs: dict,
                    share: int | tuple[int, int]) -> tuple[fx.Graph, int]:
    """Trace ``module`` and rewrite its shape args; ``dense``/``local`` are meta copies to run on. ``share``: this
    rank's part of every sharded size, (numerator, denominator): ``(1, tp)`` (or ``tp``) for an even split,
    ``(parts[rank], sum(parts))`` for an uneven one."""
    share = (1, share) if isinstance(share, int) else tuple(share)
    graph = _ChildrenAreLeaves().trace(module)
    glob = _Run(fx.GraphModule(dense, graph))
    with torch.device("meta"):  # tensors the forward makes join the meta copies they meet
        glob.run(*_flat_inputs(graph, args, kwargs))
    edits = [0]

    def fix(n: fx.Node, run: _Run) -> None:
        x = run.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
        xg = glob.values.get(n.args[0])
        if not isinstance(x, torch.Tensor) or not isinstance(xg, torch.Tensor):
            return
        d = _sharded_dim(x, xg, share)
        if d is None:
            return
        kind = _kind(n)
        if kind == "split":
            size = n.args[1] if len(n.args) > 1 else n.kwargs["split_size_or_sections"]
            dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
            if dim % x.dim() != d:
                return
            val = run.env[size] if isinstance(size, fx.Node) else size
            gsz = [int(t.shape[d]) for t in glob.values[n]]
            if (val if isinstance(val, int) else list(val)[0]) == gsz[0]:
                new = _localize_value(graph, n, size, share, run) if not isinstance(size, (list, tuple)) else \
                    [_localize_value(graph, n, s, share, run) for s in size]
                n.args = (n.args[0], new, *n.args[2:])
                edits[0] += 1
            return
        sizes, packed = _sizes(n)
        gout = tuple(glob.values[n].shape)
        if kind == "reshape":
            try:
                j = map_reshape(tuple(xg.shape), gout, d)
            except NoRule as e:
                raise RewriteError(f"cannot localize {n.format_node()}: {e}") from e
        else:
            j = d + len(gout) - xg.dim()
        val = run.env[sizes[j]] if isinstance(sizes[j], fx.Node) else sizes[j]
        if val == gout[j] and val != -1:
            sizes[j] = _localize_value(graph, n, sizes[j], share, run)
            _set_sizes(n, sizes, packed)
            edits[0] += 1

    with torch.device("meta"):
        _Run(fx.GraphModule(local, graph), fix).run(*_flat_inputs(graph, args, kwargs))
    graph.lint()
    return graph, edits[0]


def _flat_inputs(graph: fx.Graph, args: tuple, kwargs: dict) -> list[Any]:
    out, it = [], iter(args)
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        if n.target.startswith("*"):
            out.extend(it)
            continue
        name = n.target.lstrip("*")
        nxt = next(it, _MISSING)
        if nxt is not _MISSING:
            out.append(nxt)
        elif name in kwargs:
            out.append(kwargs[name])
        else:
            out.append(n.args[0] if n.args else None)
    return out


_MISSING = object()


def install(module: nn.Module, graphs: dict[bool, fx.Graph]) -> None:
    """Bind forwards generated from ``graphs`` (keyed by training mode) to ``module`` itself."""
    fns = {}
    for mode, g in graphs.items():
        code = g.python_code(root_module="self")
        ns = dict(code.globals)
        exec(compile(code.src, f"<autotp localized {type(module).__name__}>", "exec"), ns)  # noqa: S102
        fns[mode] = ns["forward"]

    def forward(self, *args, **kwargs):
        return fns[self.training](self, *args, **kwargs)

    module.forward = types.MethodType(forward, module)
    module._autotp_localized = True
