"""Planning a model that cannot be captured whole, piece by piece.

``torch.export`` needs the whole forward to be traceable; one module with data-dependent control flow (MoE
routing that counts tokens per expert, a mask check that reads values) sinks the capture of everything around
it. Then the model runs once eagerly on its example inputs (its own weights; a meta model gets a CPU copy with
arbitrary values, up to ``PIECES_BYTES``) to record every module's first call, and the modules are planned
top-down: a module whose capture succeeds is planned as a whole (groups, proofs and the translation check
inside it, its inputs and outputs replicated); one that fails runs unsharded (its line in the plan says why)
and its children are planned. A single layer alone (no children) is not planned: with its input and output
whole it has nothing to pair with, so it stays replicated (its line says so). Modules of one class, plain
attributes and shapes are captured once. The code between the pieces runs unsharded on replicated values, so
the whole is exact where each piece is.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from autotp.capture import source
from autotp.capture.export import Call, meta_copy, split_inputs, to_meta
from autotp.errors import CaptureError
from autotp.plan import Entry, Plan, compress, summarize

log = logging.getLogger(__name__)

PIECES_BYTES = 1 << 30  # a meta model larger than this is not materialized to record its modules' inputs


def possible(model: nn.Module, error: CaptureError) -> bool:
    """Whether a model whose capture raised ``error`` can be planned by pieces: export failed inside it (not a
    missing input), and its modules' inputs can be recorded."""
    if not hasattr(error, "where"):
        return False
    params = list(model.parameters())
    meta = any(p.device.type == "meta" for p in params)
    return not meta or sum(p.numel() * p.element_size() for p in params) <= PIECES_BYTES


def plan_by_pieces(model: nn.Module, tp: int, example_inputs: Any, error: CaptureError, *,
                   reuse: Callable[[str], Any] | None, plan_one: Callable[[nn.Module, Any, str], Plan]) -> Plan:
    """The plan of ``model`` put together from plans of its capturable modules (``plan_one(module, inputs,
    path)``: ``make_plan``'s own planning of the module at ``path``)."""
    calls = _record(model, example_inputs)
    log.info("autotp: %s cannot be captured whole (%s); planning its modules one by one", type(model).__name__,
             str(error).split(" Fix:")[0][:200])
    memo: dict[tuple, tuple[tuple[Entry, ...], str | None]] = {}
    entries: list[Entry] = []
    opaque: list[str] = []

    first = str(error).split(" Fix:")[0]

    def visit(path: str, mod: nn.Module, parent_why: str) -> None:
        kids = [(f"{path}.{n}" if path else n, m) for n, m in mod.named_children()]
        if not kids:  # a module alone, its input and output whole, has nothing to pair its layer with
            if any(True for _ in mod.parameters(recurse=False)):
                entries.append(Entry(path, "replicate", (), f"kept whole: alone it has nothing to pair with, and "
                                                            f"its parent cannot be captured ({parent_why[:160]})"))
            return
        if path and path in calls and any(True for _ in mod.parameters()):
            key = (_signature(mod, calls[path]), path if reuse is None else reuse(path))
            if key not in memo:
                try:
                    memo[key] = (plan_one(mod, calls[path], path).entries, None)
                except CaptureError as e:
                    memo[key] = ((), str(e).split(" Fix:")[0])
            got, why = memo[key]
            if why is None:
                entries.extend(_under(path, e) for e in got)
                return
            opaque.append(path)
            entries.append(Entry(path, "replicate", (), f"its own code cannot be captured ({why[:200]}): it runs "
                                                         f"unsharded, its submodules are planned on their own"))
            parent_why = why
        for p, m in kids:
            visit(p, m, parent_why)

    visit("", model, first)
    modules = [n for n, _ in model.named_modules()]
    merged = compress(entries, modules)
    if opaque:
        log.info("autotp: %d modules run unsharded (not capturable): %s", len(opaque), opaque[:4])
    groups = len({e.get("group") for e in merged if e.get("group")})
    summary = summarize(groups, sum(1 for e in merged if e.style == "rowwise"),
                        sum(1 for e in merged if e.style == "vocab"),
                        sum(1 for e in merged if e.style == "colwise" and e.get("gather") == "1"),
                        sum(len(e.get("p").split(",")) for e in merged if e.style == "sum_grad"))
    return Plan(tp, tuple(merged), type(model).__name__,
                summary + (f"planned by pieces: the whole model cannot be captured ({first[:200]})",))


def _under(prefix: str, e: Entry) -> Entry:
    """``e`` (a line of a module's own plan) as a line of the model's: its path and group name under ``prefix``."""
    path = f"{prefix}.{e.path}" if e.path else prefix
    params = tuple((k, _group_under(prefix, v) if k == "group" else v) for k, v in e.params)
    return replace(e, path=path, params=params, reason=e.reason.replace("<root>", prefix))


def _group_under(prefix: str, name: str) -> str:
    """A group's name (the path of the module holding it, ``<root>`` for the module itself, ``#2`` for a second
    group there) under ``prefix``."""
    if name.startswith("<root>"):
        return prefix + name[len("<root>"):]
    return f"{prefix}.{name}"


def _signature(mod: nn.Module, inputs: Call) -> tuple:
    """Modules with one key compute alike: the same class, plain attributes (sizes, flags, a layer's index),
    parameter shapes and input shapes."""
    def shape(x: Any) -> Any:
        if isinstance(x, (tuple, list)):
            return tuple(shape(v) for v in x)
        if isinstance(x, dict):
            return tuple((k, shape(v)) for k, v in sorted(x.items()))
        return (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__ if x is not None \
            and not isinstance(x, (int, float, bool, str)) else x

    plain = tuple(sorted((k, v) for k, v in vars(mod).items() if type(v) in (int, float, bool, str)))
    return (type(mod), plain, tuple((n, tuple(p.shape)) for n, p in mod.named_parameters()),
            tuple(shape(a) for a in inputs.args), tuple((k, shape(v)) for k, v in sorted(inputs.kwargs.items())))


def _record(model: nn.Module, example_inputs: Any) -> dict[str, Call]:
    """Every module's first call during one eager forward (tensors as meta: only their shapes matter)."""
    meta = any(p.device.type == "meta" for p in model.parameters())
    runner = _materialized(model) if meta else model
    inputs = tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.device.type == "meta"
                           else t, example_inputs)
    calls: dict[str, Call] = {}

    def first_call(name: str):
        def hook(_m, args, kwargs):
            if name not in calls:  # later calls are not converted: only the first is kept
                calls[name] = Call(to_meta(args), to_meta(kwargs))
        return hook

    running: list[str] = []  # the modules in flight: where an exception leaves it, the one that failed

    def enter(name: str):
        def hook(_m, _args):
            running.append(name)
        return hook

    def leave(_m, _args, _out):
        running.pop()

    hooks = [m.register_forward_pre_hook(first_call(n), with_kwargs=True) for n, m in runner.named_modules()]
    hooks += [h for n, m in runner.named_modules()
              for h in (m.register_forward_pre_hook(enter(n)), m.register_forward_hook(leave))]
    modes = {m: m.training for m in runner.modules()}
    args, kwargs = split_inputs(inputs)
    try:
        runner.eval()
        with torch.no_grad():
            runner(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the model cannot even run eagerly
        where, line = (running[-1] if running else "") or "<root>", source.of_exception(e)
        raise CaptureError(f"cannot plan {type(model).__name__}: it cannot be captured whole, and it fails when run "
                           f"eagerly on example_inputs, in module '{where}'{source.at(line)} ({type(e).__name__}: "
                           f"{str(e)[:200]}). Fix: make the model run on example_inputs: pass inputs that match its "
                           f"forward (the shapes, dtypes and sizes its config expects), or correct "
                           f"{'that line' if line else 'that module'}.") from e
    finally:
        for h in hooks:
            h.remove()
        for m, was in modes.items():
            m.training = was
    return calls


def _materialized(model: nn.Module) -> nn.Module:
    """A CPU copy of a meta model with small random parameters (its buffers where they are real)."""
    copy = meta_copy(model).to_empty(device="cpu")
    real = dict(model.named_buffers())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, b in copy.named_buffers():
            src = real.get(n)
            if src is not None and src.device.type != "meta":
                b.copy_(src)
            else:
                b.zero_()
        for p in copy.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.zero_()
    return copy
