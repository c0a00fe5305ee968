"""Capture: model -> fx graph (ATen level) for analysis only.

The model is copied onto the meta device (no weight is copied or touched) and
captured with ``torch.export`` (non-strict). Each call node carries its module path
(``owner``), each parameter placeholder its parameter name. The user's eager model is
what runs afterwards; this graph is never executed.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from autotp.capture import source
from autotp.errors import CaptureError


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for mod in model.modules():  # process-group handles are shared, never copied
        g = getattr(mod, "group", None)
        if g is not None and not isinstance(g, (torch.Tensor, nn.Module)):
            memo[id(g)] = g
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(model, memo)


def to_meta(x: Any) -> Any:
    """Map every tensor in a (nested) structure to an empty meta tensor of the same shape/dtype."""
    return tree_map_only(torch.Tensor, lambda t: torch.empty_like(t, device="meta"), x)


@dataclass(frozen=True)
class Call:
    """Positional and keyword arguments together: the inputs of a module's call, as a parent passed them."""

    args: tuple
    kwargs: dict


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` is a tuple of positional args, a dict of kwargs, one tensor, or a ``Call``."""
    if isinstance(example_inputs, Call):
        return tuple(example_inputs.args), dict(example_inputs.kwargs)
    if example_inputs is None:
        raise CaptureError("no example_inputs: pass example_inputs=(x,) (a tuple of positional args) "
                           "or a dict of keyword args, with the shapes the model is called with")
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(f"example_inputs is {type(example_inputs).__name__} {str(example_inputs)[:60]!r}. Fix: pass "
                           f"a tuple of positional args, e.g. example_inputs=(x,), a dict of keyword args, or one tensor")
    return tuple(example_inputs), {}


@dataclass
class Captured:
    """An ATen-level graph plus the names needed to map it back to the model."""

    graph: fx.Graph
    params: dict[str, str]  # placeholder name -> parameter name
    buffers: dict[str, str]  # placeholder name -> buffer/constant name
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # parameter name -> every name of it
    user_inputs: set[str] = field(default_factory=set)  # placeholders of the model's own inputs
    order: dict[fx.Node, int] = field(default_factory=dict)
    # module path -> its first call's tensor arguments: (parameter name, or position if it has none; shape)
    module_args: dict[str, list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}

    def param_name(self, node: Any) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.params.get(node.name)
        return None

    def alias_in(self, name: str | None, module: str) -> str | None:
        """The name under which ``module`` itself holds parameter ``name`` (tied weights have several)."""
        for a in self.aliases.get(name, (name,)) if name else ():
            if a.rpartition(".")[0] == module:
                return a
        return None

    @staticmethod
    def owner(node: fx.Node) -> str:
        """Path of the innermost module the node was computed in ('' for the root)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        return list(stack.values())[-1][0]

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        try:
            return tuple(int(s) for s in val.shape)
        except Exception:  # noqa: BLE001 - a size known only when the model runs (data-dependent)
            return None


class _ModuleTracker:
    """Remembers which module was executing when capture failed, to name it in the error, and the
    tensor arguments of each module's first call (by parameter name where the signature has one)."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.deepest: list[str] = []
        self.args: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._push(name), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._pop))

    def _push(self, name: str):
        def hook(mod, args, kwargs):
            self.stack.append(name or "<root>")
            self.deepest = list(self.stack)
            if name not in self.args:
                self.args[name] = _tensor_args(mod, args, kwargs)
        return hook

    def _pop(self, mod, args, out):
        if self.stack:
            self.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tensor_args(mod: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, tuple[int, ...]]]:
    names = positional_names(mod)
    out = [(names[i] if i < len(names) else str(i), _sizes(a))
           for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    return out + [(k, _sizes(v)) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]


def _sizes(t: torch.Tensor) -> tuple[int, ...]:
    """The sizes of ``t``, -1 for one known only when the model runs (data-dependent)."""
    out = []
    for s in t.shape:
        try:
            out.append(int(s))
        except Exception:  # noqa: BLE001 - data-dependent
            out.append(-1)
    return tuple(out)


def positional_names(mod: nn.Module) -> list[str]:
    """The names of ``mod.forward``'s positional parameters, in order ([] if it takes ``*args``)."""
    import inspect

    try:
        ps = list(inspect.signature(mod.forward).parameters.values())
    except (TypeError, ValueError):
        return []
    out = []
    for p in ps:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        out.append(p.name)
    return out


def capture(model: nn.Module, example_inputs: Any) -> Captured:
    """Capture ``model`` at the shapes of ``example_inputs`` (on a meta copy).

    >>> g = capture(nn.Sequential(nn.Linear(4, 8)), (torch.randn(2, 4),))
    >>> [n.target for n in g.graph.nodes if n.op == "call_function"]
    [<OpOverload(op='aten.linear', overload='default')>]
    """
    args, kwargs = split_inputs(example_inputs)
    meta = model if _is_all_meta(model) else meta_copy(model)
    args, kwargs = to_meta(args), to_meta(kwargs)
    tracker = _ModuleTracker(meta)
    try:
        ep = _export(meta, args, kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        where = tracker.stack[-1] if tracker.stack else (tracker.deepest[-1] if tracker.deepest else "<root>")
        msg = str(e).strip().splitlines()
        head = msg[0] if msg else type(e).__name__
        err = CaptureError(
            f"cannot capture {type(model).__name__}: torch.export failed in module '{where}'"
            f"{source.at(source.of_exception(e))} ({type(e).__name__}: {head[:300]}). Fix: make that module "
            f"traceable, pass example_inputs "
            f"that match its forward, or write a plan file (autotp.make_plan on a traceable copy, or by hand) "
            f"and call parallelize(model, plan=...), which skips capture.")
        err.where = None if where == "<root>" else where  # the module export failed in
        raise err from e
    finally:
        tracker.remove()
    sig = ep.graph_signature
    consts = dict(sig.inputs_to_buffers)
    consts.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    names: dict[int, list[str]] = {}
    for k, p in meta.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(k)
    aliases = {ns[0]: tuple(ns) for ns in names.values()}
    aliases.update({k: tuple(ns) for ns in names.values() for k in ns})
    return Captured(ep.graph, dict(sig.inputs_to_parameters), consts, aliases, set(sig.user_inputs),
                    module_args=tracker.args)


def _export(meta: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``torch.export`` of the meta model, quietly: tensors the forward creates without a device land on meta too
    (not on the CPU beside meta weights); outputs torch cannot flatten (a cache object returned even with
    ``use_cache=False``) are left out, since only tensors matter to the plan; what export prints on a failure (a
    graph dump) is dropped for the one-line CaptureError, and printed as usual on success."""
    quiet = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level, printed = quiet.level, io.StringIO()
    quiet.setLevel(logging.ERROR)
    ok = False
    try:
        with torch.device("meta"), contextlib.redirect_stderr(printed), contextlib.redirect_stdout(printed):
            try:
                ep = torch.export.export(meta, args, kwargs, strict=False)
            except RuntimeError as e:
                if "in output, which is not a known type" not in str(e):
                    raise
                ep = torch.export.export(_TensorOutputs(meta), args, kwargs, strict=False)
        ok = True
        return ep
    finally:
        quiet.setLevel(level)
        if ok and printed.getvalue():
            sys.stderr.write(printed.getvalue())


class _TensorOutputs(nn.Module):
    """``model`` whose outputs keep only tensors (and containers of them): what a plan needs to see. Its
    submodules keep their paths (``model``'s own are reached through ``__dict__``, not as a child)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._parameters, self._buffers, self._modules = model._parameters, model._buffers, model._modules
        self.__dict__["inner"] = model
        self.forward = functools.wraps(model.forward)(lambda *a, **k: _tensors(model.forward(*a, **k)))


def _tensors(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        kept = {k: _tensors(v) for k, v in out.items()}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(out, (tuple, list)):
        kept = [_tensors(v) for v in out]
        return tuple(v for v in kept if v is not None)
    return None


def _is_all_meta(model: nn.Module) -> bool:
    ts = list(model.parameters()) + list(model.buffers())
    return bool(ts) and all(t.device.type == "meta" for t in ts)
