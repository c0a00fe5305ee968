"""The numerical check: a plan's numbers tried for real before the model is sharded.

The proofs before it (the rule table, the gradient layouts, the translation check) reason about the graph
``torch.export`` captures; code the graph does not show — a custom ``autograd.Function`` whose backward mixes
features, a kernel with its own gradient — can still give other numbers. So ``parallelize`` runs one forward
and one backward on its capture inputs twice: on the model itself (the gradients taken with
``torch.autograd.grad``, so its ``.grad`` stay as they were) and on a copy sharded by the plan, over the real
process group. It compares the outputs and every parameter's gradient (each rank's slice against that slice of
the dense gradient), in eval mode (dropout would draw other masks), with a fixed random output gradient that
every rank draws alike.

Where they disagree, the group to blame is found from the modules each group ends at (a rowwise layer, a
gathered head, a vocabulary table, an experts module): the first whose forward output differs, else the last
(in forward order) whose parameters' gradients differ — gradients flow backwards, so every group before the
culprit receives a wrong gradient too. ``check`` returns that group's modules with the reason, for the caller
to replicate and plan again, or raises where the plan was given by the user.

Cost: one dense forward and backward, a copy of the model while it is sharded, and one sharded forward and
backward (``bench/check_cost.py`` measures it); ``parallelize(check=None)`` runs it when the model's parameters
are real and take at most ``CHECK_BYTES``.
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.capture.inputs import call
from autotp.plan import Entry, Plan, glob_of
from autotp.planner.resolve import resolve
from autotp.runtime import collectives
from autotp.runtime.apply import apply_plan
from autotp.split import split_of_names

log = logging.getLogger(__name__)

CHECK_BYTES = 512 << 20  # parallelize(check=None) checks models whose parameters take at most this much
_ENDS = ("rowwise", "vocab", "experts")  # styles whose modules give replicated outputs (and colwise gather=1)


def wanted(model: nn.Module, check: bool | None) -> bool:
    """Whether to run the check: ``check`` if given, else for a model with real parameters of at most
    ``CHECK_BYTES`` (a meta model has no numbers to compare)."""
    if check is not None:
        return bool(check)
    params = list(model.parameters())
    return bool(params) and all(p.device.type != "meta" for p in params) and \
        sum(p.numel() * p.element_size() for p in params) <= CHECK_BYTES


def tolerance(model: nn.Module) -> float:
    """Relative tolerance (of the reference's largest magnitude): fp32 sums in another order differ by ~1e-7
    relative; a wrong plan by 1e-3 or more."""
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters())
    return 2e-2 if low else 1e-4


class Mismatch(Exception):
    """The sharded copy computed other numbers: ``modules`` (concrete paths to replicate) and ``why``."""

    def __init__(self, modules: dict[str, str], why: str):
        super().__init__(why)
        self.modules, self.why = modules, why


def check(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any, example_inputs: Any) -> None:
    """Raise ``Mismatch`` if ``model`` sharded by ``plan`` computes other outputs or gradients than ``model``.
    Collective: every rank of ``group`` runs it, on the same inputs."""
    resolved = resolve(model, plan)
    ends = [p for p, e in resolved.items() if e.style in _ENDS or e.style == "colwise" and e.get("gather") == "1"]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        trial = copy.deepcopy(model)
        apply_plan(trial, plan, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
        ref = _run(model, example_inputs, ends)
        got = _run(trial, example_inputs, ends)
    finally:
        for m, was in modes.items():
            m.training = was
    tol = tolerance(model)
    names = list(ref.grads)
    # a gradient that is zero in exact arithmetic (a key bias under softmax) is noise: measured against this
    floor = 1e-3 * max((float(g.abs().max()) for g in ref.grads.values() if g.numel()), default=0.0)
    aliases: dict[int, list[str]] = {}  # a tensor under several names: its split is that of the line sharding it
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    every = {ns[0]: ns for ns in aliases.values()}
    local = [_rel(got.outputs, ref.outputs)] + [_rel(got.ends.get(p, []), ref.ends[p]) for p in ref.order] + \
        [_rel([got.grads[n]], [split_of_names(every.get(n, [n]), resolved, tp).take(ref.grads[n], rank)], floor)
         if n in got.grads else 0.0 for n in names]
    diffs = _worst_over_ranks(local, group, tp)  # every rank decides alike, whatever slice it holds
    out, ends_d = diffs[0], dict(zip(ref.order, diffs[1:1 + len(ref.order)]))
    grads = dict(zip(names, diffs[1 + len(ref.order):]))
    bad = {n: d for n, d in grads.items() if d > tol}
    if out <= tol and not bad:
        log.info("autotp: numerical check at tp=%d: outputs within %.1e, %d gradients within %.1e", tp, out,
                 len(grads), max(grads.values(), default=0.0))
        return
    what = f"outputs differ by {out:.1e} (relative)" if out > tol else \
        f"{len(bad)} gradients differ (e.g. '{next(iter(bad))}' by {next(iter(bad.values())):.1e} relative)"
    blame = _blame(ref.order, ends_d, {a for n in bad for a in every.get(n, [n])}, resolved, tol)
    if blame is None:
        raise Mismatch({}, f"numerical check: the sharded model's {what}, and no group could be blamed")
    end, how = blame
    why = (f"numerical check: the sharded {'output' if how == 'forward' else 'gradients'} of '{glob_of(end)}' "
           f"differ from the unsharded model's ({what} at tp={tp}); code the graph does not show (a custom "
           f"autograd.Function, an opaque kernel) computes across the sharded features")
    raise Mismatch({m: why for m in _members(resolved, end)}, why)


def _worst_over_ranks(local: list[float], group: Any, tp: int) -> list[float]:
    t = torch.tensor(local, dtype=torch.float64).nan_to_num(nan=float("inf"))
    if tp > 1 and group is not collectives.NO_COMM and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


class _Run:
    def __init__(self):
        self.outputs: list[torch.Tensor] = []
        self.ends: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []  # ends in the order they first ran
        self.grads: dict[str, torch.Tensor] = {}


def _run(model: nn.Module, inputs: Any, ends: list[str]) -> _Run:
    """One forward and backward: outputs, each end module's outputs, each parameter's gradient."""
    r = _Run()
    hooks = []
    for path in ends:
        def hook(_m, _a, out, path=path):
            t = _floats(out)
            if t:
                r.ends.setdefault(path, []).append(_plain(t[0]).detach().clone())
                if path not in r.order:
                    r.order.append(path)
        hooks.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        out = _floats(call(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    live = [t for t in out if t.requires_grad]
    r.outputs = [t.detach().clone() for t in out]
    if live and named:
        gen = torch.Generator().manual_seed(0)  # the same output gradient on every rank
        cot = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) for t in live]
        gs = torch.autograd.grad(live, [p for _, p in named], cot, allow_unused=True)
        r.grads = {n: g.detach() for (n, _), g in zip(named, gs) if g is not None}
    return r


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A layer's output as a plain tensor (inside a 'global' module it is a replicated DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _floats(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of an output (a tensor, a tuple, a dict or a ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in items for t in _floats(v)]


def _rel(got: list[torch.Tensor], ref: list[torch.Tensor], floor: float = 0.0) -> float:
    """The largest |difference| relative to the reference's largest magnitude, or to ``floor`` where that is
    smaller (inf where shapes differ)."""
    worst = 0.0
    if len(got) != len(ref):
        return float("inf")
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return float("inf")
        scale = max(float(b.abs().max()) if b.numel() else 0.0, floor, 1e-12)
        worst = max(worst, float((a.float() - b.float()).abs().max()) / scale if a.numel() else 0.0)
    return worst


def _blame(order: list[str], ends: dict[str, float], bad: set[str], resolved: dict[str, Entry],
           tol: float) -> tuple[str, str] | None:
    """(the end module of the group to blame, 'forward' or 'backward'): the first end whose output differs,
    else the last (in forward order) whose group's parameters' gradients differ."""
    for path in order:
        if ends[path] > tol:
            return path, "forward"
    worst = None
    for path in order:
        if any(n.startswith(m + ".") for n in bad for m in _members(resolved, path)):
            worst = path
    return (worst, "backward") if worst is not None else None


def _members(resolved: dict[str, Entry], end: str) -> list[str]:
    """The concrete modules of ``end``'s group (its group= name; the module alone without one)."""
    e = resolved[end]
    name = e.get("group")
    if not name:
        return [end]
    return [p for p, x in resolved.items() if x.get("group") == name and x.style in ("colwise", "rowwise")]
