"""Apply a plan: the only place that mutates a model. Swaps planned modules for sharded layers, slices arguments
as they enter modules, patches integer attributes, sums partial gradients, localizes forwards, runs 'global'
modules on DTensor activations."""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from autotp.capture.export import capture, meta_copy
from autotp.errors import PlanMismatchError, RewriteError
from autotp.plan import Entry, Plan, line_path
from autotp.planner.resolve import resolve, resolve_slices
from autotp.planner.slicing import inside
from autotp.runtime import collectives
from autotp.runtime.fg import CopyCache
from autotp.runtime.globalview import GlobalView
from autotp.runtime.layers import ColumnParallelLinear, ExpertsShard, InputSlice, RowParallelLinear, VocabShard
from autotp.runtime.localize import install, trace_localized
from autotp.split import parts_of

log = logging.getLogger(__name__)
_LAYERS = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear}


def slice_inputs(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any) -> None:
    """Each 'slice' line: the module's argument is sliced to this rank's part as it enters."""
    for key, e in resolve_slices(model, plan).items():
        InputSlice(model.get_submodule(key.rpartition(":")[0]), arg=e.get("arg"), dim=int(e.get("dim")), size=int(e.get("size")),
                   rank=rank, tp=tp, group=group, merged=e.get("merged") == "1")


def swap_layers(model: nn.Module, resolved: dict[str, Entry], *, rank: int, tp: int, group: Any) -> list[str]:
    """Replace each colwise/rowwise module by its sharded layer (weights sliced, dense ones dropped)."""
    swapped = []
    tied: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # dense parameter id -> (dense, its local slice)
    copies = CopyCache()  # column layers of this model reading one tensor share its f

    def once(dense: nn.Parameter | None, local: nn.Parameter | None) -> nn.Parameter | None:
        """A parameter shared by several modules (tied embeddings) is sliced once and stays shared."""
        if dense is None:
            return local
        if id(dense) in tied:
            return tied[id(dense)][1]
        tied[id(dense)] = (dense, local)
        return local

    for path, e in resolved.items():
        mod = model.get_submodule(path)
        if e.style == "experts":
            ExpertsShard(mod, col=e.get("col").split(","), row=e.get("row").split(","), in_out=e.get("w") == "in_out",
                         segments=e.ints("seg"), rank=rank, tp=tp, group=group)
            swapped.append(path)
            continue
        if e.style == "vocab":
            dense = mod.weight
            VocabShard(mod, rank=rank, tp=tp, group=group, weight=tied.get(id(dense), (None, None))[1],
                       parts=parts_of(e))
            once(dense, mod.weight)
            swapped.append(path)
            continue
        cls = _LAYERS.get(e.style)
        if cls is None:
            continue
        kw = ({"rep": int(e.get("rep"))} if e.get("rep") else {}) | ({"parts": parts_of(e)} if parts_of(e) else {})
        layer = cls.from_dense(mod.weight, getattr(mod, "bias", None), in_out=e.get("w") == "in_out",
                               rank=rank, tp=tp, group=group, segments=e.ints("seg"), **kw)
        layer.weight = once(mod.weight, layer.weight)
        held = layer.weight.shape[1 if e.get("w") == "in_out" else 0]
        if e.style == "colwise" and layer.widths is not None and held != layer.widths[rank]:
            raise PlanMismatchError(f"plan line {e.line or '?'}: '{path}' colwise split={e.get('split')} gives rank "
                                    f"{rank} {layer.widths[rank]} outputs, but its weight is shared with a module "
                                    f"split otherwise, of which this rank holds {held}: give both lines one split=")
        layer.copies = copies
        if e.style == "colwise":
            layer.bias = once(getattr(mod, "bias", None), layer.bias)
            layer.gather = e.get("gather") == "1"
        layer.train(mod.training)
        layer.register_forward_pre_hook(_must_run)
        set_submodule(model, path, layer)
        swapped.append(path)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in tied and tied[id(p)][0] is p:  # another holder of a sliced parameter (HF's `shared`)
            path, _, leaf = name.rpartition(".")
            if path in resolved:
                raise PlanMismatchError(f"parameter '{name}' is shared with a module the plan shards, but plan "
                                        f"line {resolved[path].line or '?'} keeps '{path}' {resolved[path].style}: "
                                        f"tied parameters must be sharded the same way everywhere. Fix: give every "
                                        f"module holding it the same style (vocab / colwise), or replicate them all.")
            setattr(model.get_submodule(path) if path else model, leaf, tied[id(p)][1])
    return swapped


def _must_run(module: nn.Module, args: tuple) -> None:
    """A hook that does nothing, so that a parent's fused inference path never bypasses a sharded layer.

    torch's fused kernels (``nn.TransformerEncoderLayer`` without gradients runs
    ``torch._transformer_encoder_layer_fwd`` on its children's weights) are skipped whenever a submodule carries
    a hook, since they would bypass it; a sharded layer must run its own forward (its all-reduce), or the
    parent computes with this rank's slice alone. Measured: 1.5 us per call of a layer.
    """


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_patches(model: nn.Module, resolved: dict[str, Entry], *, rank: int = 0, tp: int = 1) -> None:
    """Set the integer attributes named by ``patch`` lines (checked to exist and be integers). A per-rank value
    (``n_head=6,3``: one number per rank, for an uneven split) sets this ``rank``'s number."""
    for path, e in resolved.items():
        if e.style != "patch":
            continue
        mod = model.get_submodule(path)
        for k, v in e.params:
            values = [int(x) for x in v.split(",")]
            if len(values) > 1 and len(values) != tp:
                raise PlanMismatchError(f"plan line {e.line or '?'}: module '{path}' ({type(mod).__name__}): patch "
                                        f"{k}={v} gives {len(values)} values, one per rank, but tp={tp}; give one "
                                        f"value, or {tp}")
            *holders, leaf = k.split(".")
            obj = mod
            for h in holders:  # an object the module holds (its config): this module gets its own copy
                sub = getattr(obj, h, None)
                if sub is None or isinstance(sub, nn.Module):
                    obj = None
                    break
                if id(sub) not in getattr(mod, "_autotp_own", ()):
                    sub = copy.copy(sub)
                    setattr(obj, h, sub)
                    mod.__dict__.setdefault("_autotp_own", set()).add(id(sub))
                obj = sub
            old = getattr(obj, leaf, None) if obj is not None else None
            if type(old) is not int:
                raise PlanMismatchError(f"plan line {e.line or '?'}: module '{path}' ({type(mod).__name__}) has no "
                                        f"integer attribute '{k}' to patch (found {old!r}); fix or drop the line")
            setattr(obj, leaf, values[rank] if len(values) > 1 else values[0])


def sum_grads(model: nn.Module, resolved: dict[str, Entry], group: Any) -> None:
    """All-reduce the gradients of the replicated parameters named by ``sum_grad`` lines (partial per rank)."""
    for path, e in resolved.items():
        if e.style != "sum_grad":
            continue
        mod = model.get_submodule(path)
        for name in e.get("p", "").split(","):
            p = getattr(mod, name, None)
            if not isinstance(p, nn.Parameter):
                raise PlanMismatchError(f"plan line {e.line or '?'}: module '{path}' ({type(mod).__name__}) has no "
                                        f"parameter '{name}'; fix or drop the line")
            if p.requires_grad and not getattr(p, "_autotp_sum_grad", False):
                p.register_hook(lambda g: collectives.all_reduce(g, group, "backward"))
                p._autotp_sum_grad = True


def apply_plan(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any, example_inputs: Any) -> nn.Module:
    """Shard ``model`` in place with ``plan`` (already checked): swap layers, slice arguments, patch, localize, and
    count its forwards on its group's ``collectives.Epoch``."""
    resolved = resolve(model, plan)
    local_paths = [p for p, e in resolved.items() if e.style == "localize"]
    inputs = {}
    if local_paths:
        if example_inputs is None:
            raise PlanMismatchError(f"the plan rewrites the forward of {local_paths} (localize), which needs "
                                    f"example_inputs: pass parallelize(..., example_inputs=(x,))")
        dense = meta_copy(model)
        inputs = _module_inputs(dense, local_paths, example_inputs)
    swap_layers(model, resolved, rank=rank, tp=tp, group=group)
    slice_inputs(model, plan, rank=rank, tp=tp, group=group)
    apply_patches(model, resolved, rank=rank, tp=tp)
    sum_grads(model, resolved, group)
    for p in local_paths:
        mod = model.get_submodule(p)
        local, share = meta_copy(mod), share_of(resolved[p], rank, tp)
        graphs = {}
        for mode in (True, False):
            was = mod.training
            for x in (mod, local, dense.get_submodule(p)):
                x.train(mode)
            try:
                graphs[mode], _ = trace_localized(mod, dense.get_submodule(p), local, *inputs[p], share)
            except Exception as e:  # noqa: BLE001 - named by module, for the plan check to replicate its groups
                err = e if isinstance(e, RewriteError) else RewriteError(
                    f"module '{line_path(p)}' ({type(mod).__name__}) cannot be localized: {type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                err.module = p
                raise err from e
            finally:
                for x in (mod, local, dense.get_submodule(p)):
                    x.train(was)
        install(mod, graphs)
    for p in global_modules(resolved):
        GlobalView(model.get_submodule(p), group=group, rank=rank, tp=tp)
    if group is not collectives.NO_COMM:  # its root forwards numbered: how the transport tells ranks out of step
        model.register_forward_pre_hook(collectives.epoch_of(group))
    return model


def global_modules(resolved: dict[str, Entry]) -> list[str]:
    """The modules of 'global' lines, outermost only (what a global module calls runs on DTensors already)."""
    paths = sorted(p for p, e in resolved.items() if e.style == "global")
    return [p for p in paths if not any(inside(p, q) for q in paths if q != p)]


def share_of(e: Entry, rank: int, tp: int) -> tuple[int, int]:
    """This rank's share of a localized module's sharded sizes, as (numerator, denominator): ``parts[rank]`` of
    ``sum(parts)`` for a line with ``split=``, else 1 of ``tp``."""
    parts = parts_of(e)
    if parts is None:
        return 1, tp
    if len(parts) != tp:
        raise PlanMismatchError(f"plan line {e.line or '?'}: '{e.path}' localize split={','.join(map(str, parts))} "
                                f"names {len(parts)} ranks, but tp={tp}")
    return parts[rank], sum(parts)


def _module_inputs(dense_meta: nn.Module, paths: list[str], example_inputs: Any) -> dict[str, tuple]:
    got: dict[str, tuple] = {}
    hooks = [dense_meta.get_submodule(p).register_forward_pre_hook(
        (lambda p: lambda m, a, k: got.setdefault(p, _concrete_meta((a, k))))(p), with_kwargs=True) for p in paths]
    try:  # inside a capture, so model code that branches on values sees a tracer, not a meta tensor
        capture(dense_meta, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p in paths if p not in got]
    if missing:
        raise RewriteError(f"modules {missing} were not called by the model's forward on example_inputs")
    return got


def _concrete_meta(x: Any) -> Any:
    """Tensors seen during a capture (fake) as plain meta tensors of the same shape."""
    return tree_map_only(torch.Tensor, lambda t: torch.empty(tuple(int(d) for d in t.shape), dtype=t.dtype,
                                                             device="meta"), x)


