"""Which module each plan line names, checked against the model's own modules (pure: reads, never mutates).

``resolve`` maps every concrete module path to its plan line and refuses a line whose module is not
what the line says (another model's plan, a weight of another shape, a size tp does not divide).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from autotp.capture.export import positional_names
from autotp.errors import PlanMismatchError, ShardingError
from autotp.plan import Entry, Plan
from autotp.split import balanced


def resolve(model: nn.Module, plan: Plan) -> dict[str, Entry]:
    """Concrete module path -> entry, checking every planned module against the model."""
    modules = dict(model.named_modules())
    resolved = plan.resolve(modules.keys(), type(model).__name__)
    resolve_slices(model, plan)
    for path, e in resolved.items():
        _check_split(path, e, plan.tp)
        if e.style in ("colwise", "rowwise") and e.get("w") or e.style == "replicate" and e.get("w") and \
                _weight_2d(modules[path]):  # a replicate line of a module without one changes nothing to check
            _check_shapes(path, modules[path], e, plan.tp)
        if e.get("rows"):
            _check_table(path, modules[path], e, plan.tp)
        if e.style == "experts":
            _check_experts(path, modules[path], e, plan.tp)
        if e.style == "patch":
            _check_patch(path, modules[path], e, plan.tp)
    return resolved


def patchable(mod: nn.Module) -> dict[str, int]:
    """The integer attributes a ``patch`` line may set, with their values: the module instance's own (not its
    class's), and the public ones of plain objects it holds (``config.num_attention_heads``, a copy of which the
    module then gets)."""
    out = {}
    for k, v in vars(mod).items():
        if type(v) is int:
            out[k] = v
        elif not k.startswith("_") and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type)):
            out.update({f"{k}.{j}": w for j, w in vars(v).items() if type(w) is int and not j.startswith("_")})
    return out


def _check_patch(path: str, mod: nn.Module, e: Entry, tp: int) -> None:
    """A patch sets what the planner could have set: an attribute of ``patchable`` to a local size of its value
    (a global size divided by tp, or by a divisor of tp where ranks share blocks), nothing else."""
    ints = patchable(mod)
    for k, v in e.params:
        if k not in ints:
            raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' patch {k}={v}): module '{path}' "
                                    f"({type(mod).__name__}) has no integer attribute '{k}' of its own or of an "
                                    f"object it holds (patchable: {sorted(ints)[:8]}); a patch sets a size the "
                                    f"module's code computes with, nothing else. Fix or drop the line")
        old = ints[k]
        if "," in v:  # one value per rank: this rank's part of a size split unevenly
            vals = [int(x) for x in v.split(",")]
            if len(vals) != tp or min(vals) < 1 or max(vals) > old:
                raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' patch {k}={v}): module '{path}' "
                                        f"({type(mod).__name__}) has {k}={old}; {k}={v} gives {len(vals)} values, "
                                        f"a per-rank patch needs one per rank of tp={tp}, each this rank's part "
                                        f"(1 to {old}). Fix or drop the line (autotp.make_plan writes the patches "
                                        f"a model needs)")
            continue
        new = int(v)
        if not (0 < new < old and old % new == 0 and tp % (old // new) == 0):
            raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' patch {k}={v}): module '{path}' has "
                                    f"{k}={old}; a patch only sets a size to this rank's part of it ({old} divided "
                                    f"by tp={tp} or a divisor of it), which {new} is not. Fix or drop the line "
                                    f"(autotp.make_plan writes the patches a model needs)")


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


def _weight_2d(mod: nn.Module) -> bool:
    w = getattr(mod, "weight", None)
    return isinstance(w, nn.Parameter) and w.dim() == 2


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
    if e.style == "vocab" and want[0] % _units(e, tp):
        raise ShardingError(f"module '{path}': {want[0]} rows are not divisible by {_by(e, tp)}; write "
                            f"split={','.join(map(str, balanced(want[0], tp)))} (rows per rank), or make the line "
                            f"'replicate'")


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
    if r > 1 and e.get("split"):
        if _units(e, tp) % r:
            raise ShardingError(f"module '{path}': rep={r} does not divide the {_units(e, tp)} units of "
                                f"split={e.get('split')}")
    elif tp % r:
        raise ShardingError(f"module '{path}': rep={r} does not divide tp={tp}")
    units = _units(e, tp) // r
    if e.style == "colwise" and any(s % units for s in seg):
        ok = [t for t in range(1, max(seg) + 1) if all(s % t == 0 for s in seg)]
        raise ShardingError(f"module '{path}': colwise output sizes {seg} are not divisible by {_by(e, tp)}; "
                            f"tp values that divide them: {ok[:12]}" + ("" if e.get("split") else
                            "; or split them unevenly (autotp.make_plan writes split= where whole units allow it)"))
    if e.style == "rowwise" and i % units:
        ok = [t for t in range(1, i + 1) if i % t == 0]
        raise ShardingError(f"module '{path}': rowwise input features {i} not divisible by {_by(e, tp)}; "
                            f"tp values that divide them: {ok[:12]}")


def _units(e: Entry, tp: int) -> int:
    """How many pieces the line cuts its sizes into: its split's units, else tp."""
    p = e.ints("split")
    return sum(p) if p else tp


def _by(e: Entry, tp: int) -> str:
    p = e.ints("split")
    return f"the {sum(p)} units of split={e.get('split')}" if p else f"tp={tp}"


def _check_split(path: str, e: Entry, tp: int) -> None:
    """A split names one count of units per rank (every rank holds at least one)."""
    p = e.ints("split")
    if p and len(p) != tp:
        raise PlanMismatchError(f"plan line {e.line or '?'} ('{e.path}' {e.style} split={e.get('split')}): module "
                                f"'{path}': the split names {len(p)} ranks, the plan is for tp={tp}. Fix: one count "
                                f"of units per rank (autotp.make_plan writes it), e.g. "
                                f"split={','.join(map(str, balanced(sum(p), tp)))}" if sum(p) >= tp else
                                f"plan line {e.line or '?'} ('{e.path}'): split={e.get('split')} has {len(p)} "
                                f"entries, the plan is for tp={tp}")


