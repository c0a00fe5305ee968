"""Rewrite: the only place that mutates a model. Swaps planned modules for sharded layers."""
from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch.nn as nn

from . import collectives
from .errors import PlanMismatchError, ShardingError
from .layers import ColumnParallelLinear, ExpertsShard, InputSlice, RowParallelLinear, VocabShard
from .plan import Entry, Plan
from .trace import positional_names

log = logging.getLogger(__name__)
_LAYERS = {"colwise": ColumnParallelLinear, "rowwise": RowParallelLinear}


def resolve(model: nn.Module, plan: Plan) -> dict[str, Entry]:
    """Concrete module path -> entry, checking every planned module against the model."""
    modules = dict(model.named_modules())
    resolved = plan.resolve(modules.keys(), type(model).__name__)
    resolve_slices(model, plan)
    for path, e in resolved.items():
        if e.style in ("colwise", "rowwise", "replicate") and e.get("w"):
            _check_shapes(path, modules[path], e, plan.tp)
        if e.get("rows"):
            _check_table(path, modules[path], e, plan.tp)
        if e.style == "experts":
            _check_experts(path, modules[path], e, plan.tp)
    return resolved


def resolve_slices(model: nn.Module, plan: Plan) -> dict[str, Entry]:
    """``path:arg`` -> its 'slice' line (checked: the argument is one the module's forward takes)."""
    out = plan.resolve(dict(model.named_modules()).keys(), type(model).__name__, slices=True)
    for key, e in out.items():
        path = key.rpartition(":")[0]
        mod, arg = model.get_submodule(path), e.get("arg") or ""
        try:
            params = inspect.signature(mod.forward).parameters
        except (TypeError, ValueError):
            continue
        takes_any = any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values())
        if not arg.isdigit() and arg not in params and not takes_any:
            raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' slice): {type(mod).__name__}.forward "
                                    f"takes no argument '{arg}' (it takes {positional_names(mod) or list(params)}); "
                                    f"fix or drop the line")
    return out


def slice_inputs(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any) -> None:
    """Each 'slice' line: the module's argument is sliced to this rank's part as it enters."""
    for key, e in resolve_slices(model, plan).items():
        InputSlice(model.get_submodule(key.rpartition(":")[0]), arg=e.get("arg"), dim=int(e.get("dim")), size=int(e.get("size")),
                   rank=rank, tp=tp, group=group, merged=e.get("merged") == "1")


def _check_experts(path: str, mod: nn.Module, e: Entry, tp: int) -> None:
    """Every named weight is a 3-D [n, ., .] parameter and tp divides what is sliced (per segment)."""
    n, in_out, seg = int(e.get("n") or 0), e.get("w") == "in_out", e.ints("seg")
    for key, dim in (("col", 2 if in_out else 1), ("row", 1 if in_out else 2)):
        for name in (e.get(key) or "").split(","):
            w = getattr(mod, name, None) if name else None
            if not isinstance(w, nn.Parameter) or w.dim() != 3 or w.shape[0] != n:
                raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' experts): module '{path}' "
                                        f"({type(mod).__name__}) has no 3-D parameter '{name}' with {n} experts "
                                        f"(found {list(getattr(w, 'shape', [])) or None}). Regenerate the plan "
                                        f"with autotp.make_plan for this model.")
            sizes = seg if key == "col" and seg else [w.shape[dim]]
            if sum(sizes) != w.shape[dim] or any(s % tp for s in sizes):
                raise ShardingError(f"module '{path}': {name} dim {dim} of size {w.shape[dim]} (segments {sizes}) "
                                    f"is not divisible by tp={tp}; or make the line 'replicate'")


def _check_table(path: str, mod: nn.Module, e: Entry, tp: int) -> None:
    w = getattr(mod, "weight", None)
    want = [int(e.get("rows")), int(e.get("dim"))]
    if not isinstance(w, nn.Parameter) or list(w.shape) != want:
        raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' {e.style}): module '{path}' "
                                f"({type(mod).__name__}) has no 'weight' table of shape {want} (found "
                                f"{list(getattr(w, 'shape', [])) or None}). The plan was made for another model; "
                                f"regenerate it with autotp.make_plan.")
    if e.style == "vocab" and want[0] % tp:
        ok = [t for t in range(1, want[0] + 1) if want[0] % t == 0]
        raise ShardingError(f"module '{path}': {want[0]} rows are not divisible by tp={tp}; tp values that work: "
                            f"{ok[:12]}; or make the line 'replicate'")


def _check_shapes(path: str, mod: nn.Module, e: Entry, tp: int) -> None:
    w = getattr(mod, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 2:
        raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' {e.style}): module '{path}' "
                                f"({type(mod).__name__}) has no 2-D 'weight' parameter. Fix: point the line at "
                                f"a linear layer, or regenerate the plan for this model.")
    i, o = int(e.get("in")), int(e.get("out"))
    want = (i, o) if e.get("w") == "in_out" else (o, i)
    if tuple(w.shape) != want:
        raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}'): module '{path}' weight is "
                                f"{list(w.shape)}, the plan expects {list(want)} (in={i}, out={o}, w={e.get('w')}). "
                                f"The plan was made for another model; regenerate it with autotp.make_plan.")
    b = getattr(mod, "bias", None)
    if b is not None and (not isinstance(b, nn.Parameter) or tuple(b.shape) != (o,)):
        raise PlanMismatchError(f"module '{path}': bias shape {list(getattr(b, 'shape', []))} != [{o}]")
    seg = e.ints("seg") or [o]
    r = int(e.get("rep", "1"))
    if e.get("gather") == "1" and (e.get("seg") or r > 1):
        raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}'): gather=1 cannot be combined with seg= or "
                                f"rep=; drop one of them")
    if tp % r:
        raise ShardingError(f"module '{path}': rep={r} does not divide tp={tp}")
    if e.style == "colwise" and any(s % (tp // r) for s in seg):
        ok = [t for t in range(1, max(seg) + 1) if all(s % t == 0 for s in seg)]
        raise ShardingError(f"module '{path}': colwise output sizes {seg} are not divisible by tp={tp}; "
                            f"tp values that work: {ok}")
    if e.style == "rowwise" and i % tp:
        ok = [t for t in range(1, i + 1) if i % t == 0]
        raise ShardingError(f"module '{path}': rowwise input features {i} not divisible by tp={tp}; "
                            f"tp values that work: {ok}")


def swap_layers(model: nn.Module, resolved: dict[str, Entry], *, rank: int, tp: int, group: Any) -> list[str]:
    """Replace each colwise/rowwise module by its sharded layer (weights sliced, dense ones dropped)."""
    swapped = []
    tied: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # dense parameter id -> (dense, its local slice)

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
            VocabShard(mod, rank=rank, tp=tp, group=group, weight=tied.get(id(dense), (None, None))[1])
            once(dense, mod.weight)
            swapped.append(path)
            continue
        cls = _LAYERS.get(e.style)
        if cls is None:
            continue
        kw = {"rep": int(e.get("rep"))} if e.get("rep") else {}
        layer = cls.from_dense(mod.weight, getattr(mod, "bias", None), in_out=e.get("w") == "in_out",
                               rank=rank, tp=tp, group=group, segments=e.ints("seg"), **kw)
        layer.weight = once(mod.weight, layer.weight)
        if e.style == "colwise":
            layer.bias = once(getattr(mod, "bias", None), layer.bias)
            layer.gather = e.get("gather") == "1"
        layer.train(mod.training)
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


def set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def apply_patches(model: nn.Module, resolved: dict[str, Entry]) -> None:
    """Set the integer attributes named by ``patch`` lines (checked to exist and be integers)."""
    for path, e in resolved.items():
        if e.style != "patch":
            continue
        mod = model.get_submodule(path)
        for k, v in e.params:
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
            setattr(obj, leaf, int(v))


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
