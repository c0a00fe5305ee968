"""Translation check: a meta copy of the model is rewritten with the plan at local shapes, captured again, and
every op of every module not swapped is compared with the original (same ops, the planned local shapes)."""
from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from autotp.capture.export import Captured, capture, meta_copy
from autotp.errors import CaptureError, RewriteError
from autotp.plan import glob_regex, line_path
from autotp.planner.groups import Analysis
from autotp.planner.resolve import resolve
from autotp.planner.sites import op_name
from autotp.planner.slicing import inside
from autotp.runtime import collectives
from autotp.runtime.apply import apply_plan, global_modules


def verify(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> list[tuple[str | None, str, Any]]:
    """Rewrite a meta copy at local shapes, capture it again and compare it with ``c`` op by op: the same ops,
    the planned local shapes, the same plain numbers. Returns the problems: (module, what, the node of ``c``
    where it shows, or None)."""
    m = meta_copy(model)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # a failing candidate logs a traceback there
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return _verify(model, m, a, c, example_inputs)
    finally:
        quiet.setLevel(level)


def _verify(model: nn.Module, m: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> list:
    """Rank 0, and where the plan splits sizes unevenly also the last rank (rank 0 holds the most units of every
    uneven split and the last rank the fewest, so the two see every local size the plan gives any rank)."""
    tp = a.plan.tp
    ranks = [0, tp - 1] if tp > 1 and any(e.get("split") for e in a.plan.entries) else [0]
    for rank in ranks:
        copy = m if rank == ranks[-1] else meta_copy(model)
        try:  # layers of the meta copy get a group whose collectives do nothing: no process group is needed
            apply_plan(copy, a.plan, rank=rank, tp=tp, group=collectives.NO_COMM, example_inputs=example_inputs)
            c2 = capture(copy, example_inputs)
        except (CaptureError, RewriteError, RuntimeError, TypeError, ValueError) as e:
            return [(getattr(e, "module", None), str(e).splitlines()[0][:300]
                     + (f" (rank {rank} of an uneven split)" if rank else ""), None)]
        swapped = {s.module for s in a.sites.values()} | {lk.module for lk in a.lookups}
        sliced = [glob_regex(e.path) for e in a.plan.entries if e.style == "slice"]
        outer = global_modules(resolve(model, a.plan))  # run on DTensors: global shapes, DTensor's own rules
        problems = [p for p in _compare(c, c2, a.layouts, swapped, tp, sliced, rank)
                    if p[0] is None or not any(inside(p[0], g) for g in outer)]
        if problems:
            return problems
    return []


# ops a capture may drop when they do nothing at local shapes (e.g. contiguous() of one head)
_MAYBE_NOOP = {torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default,
               torch.ops.aten.detach.default}


def _compare(c: Captured, c2: Captured, layouts: dict, swapped: set[str], tp: int,
             sliced: list | None = None, rank: int = 0) -> list[tuple[str, str, Any]]:
    def seq(g: Captured) -> dict[str, list[fx.Node]]:
        out: dict[str, list[fx.Node]] = {}
        for n in g.graph.nodes:
            if n.op == "call_function" and g.shape(n) is not None and n.target not in _MAYBE_NOOP:
                o = g.owner(n)
                if o not in swapped:
                    out.setdefault(o, []).append(n)
        return out

    s1, s2, problems = seq(c), seq(c2), []
    for owner, nodes in s1.items():
        other = s2.get(owner, [])
        pairs = _match(nodes, other, any(rx.fullmatch(owner) for rx in sliced or ()))
        if pairs is None:
            problems.append((owner, f"module '{owner}' runs different ops after sharding", None))
            continue
        for n, m in pairs:
            want = list(c.shape(n))
            lay = layouts.get(n)
            if lay is not None and not isinstance(lay, list):
                want = lay.local(want, tp, rank)
            if list(c2.shape(m)) != want:
                problems.append((owner, f"{op_name(n)} in '{line_path(owner)}' (sizes {_sizes(n)}): local shape "
                                        f"{list(c2.shape(m))}, expected {want}", n))
                continue
            changed = _scalar_change(n, m)
            if changed:
                problems.append((owner, f"{op_name(n)} in '{line_path(owner)}' {changed} at local shapes: a Python "
                                        f"number the code computes from a size along a sharded dim", n))
    return problems


# ops whose integer arguments are sizes, offsets or counts: at local shapes they may change, and the shape
# check above proves them; every other op's numbers (a scale, an exponent, an epsilon) must stay what they were
aten = torch.ops.aten
_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.slice.Tensor, aten.narrow.default,
          aten.select.int, aten.unflatten.int, aten.chunk.default, aten.repeat.default,
          aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
          aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
          aten.arange.default, aten.arange.start, aten.arange.start_step, aten.tensor_split.sections,
          aten.repeat_interleave.self_int, aten.as_strided.default, aten.unbind.int,
          aten.index_select.default, aten._reshape_alias.default}
_SCALING = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def _sizes(n: fx.Node) -> list:
    """The plain arguments of ``n`` (a reshape's sizes), for messages."""
    return [a for a in n.args if not isinstance(a, fx.Node)]


def _scalar_change(n: fx.Node, m: fx.Node) -> str | None:
    """How the plain numbers among ``n``'s arguments changed in ``m`` (None: they did not)."""
    sized = n.target in _SIZED

    def walk(a: Any, b: Any) -> str | None:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return None
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) != len(b):
                return None if sized else f"has {len(b)} arguments where it had {len(a)}"
            return next((w for x, y in zip(a, b) if (w := walk(x, y))), None)
        if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, float) or isinstance(b, float):
            return None if a == b else f"multiplies by {b!r} where the unsharded model has {a!r}" if \
                n.target in _SCALING else f"takes {b!r} where the unsharded model takes {a!r}"
        if isinstance(a, int) and isinstance(b, int) and not sized and a != b:
            return f"takes {b} where the unsharded model takes {a}"
        return None

    return walk(list(n.args) + sorted(n.kwargs.items()), list(m.args) + sorted(m.kwargs.items()))




# data-movement ops that local code may skip when they become identities (repeat_kv with one copy per rank)
_LAYOUT_ONLY = {torch.ops.aten.expand.default, torch.ops.aten.reshape.default, torch.ops.aten.view.default,
                torch.ops.aten.unsqueeze.default, torch.ops.aten.slice.Tensor, torch.ops.aten._unsafe_view.default,
                torch.ops.aten.squeeze.dim}


# what slicing an argument on its way into a module adds to that module's ops ('slice' lines)
_SLICING = _LAYOUT_ONLY | {torch.ops.aten.narrow.default, torch.ops.aten.unflatten.int,
                           torch.ops.aten.flatten.using_ints}


def _match(a: list[fx.Node], b: list[fx.Node], sliced: bool = False) -> list[tuple[fx.Node, fx.Node]] | None:
    """Pair the ops of a module before and after sharding; only data-movement ops may go missing, and
    a module that slices an argument on its way in may run the ops that slice it."""
    ta, tb = [n.target for n in a], [n.target for n in b]
    if ta == tb:
        return list(zip(a, b))
    pairs = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=ta, b=tb, autojunk=False).get_opcodes():
        if tag == "equal":
            pairs += list(zip(a[i1:i2], b[j1:j2]))
        elif tag == "delete" and all(t in _LAYOUT_ONLY for t in ta[i1:i2]):
            continue
        elif tag == "insert" and sliced and all(t in _SLICING for t in tb[j1:j2]):
            continue  # an argument sliced on its way in (a 'slice' line)
        else:
            return None
    return pairs
