"""Slicing on entry: a replicated value a module receives as an argument, sliced to each rank's heads.

Bloom and MPT compute ALiBi once, MPNet and T5 a relative position bias, and pass it into every block,
where it meets the block's sharded heads. Rather than replicate the attention, each rank slices the
argument as it enters the block (a 'slice' plan line, applied by ``layers.InputSlice``). The planner
asks here when a rule needs a replicated value sharded and no column projection produces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from autotp.capture.export import Captured
from autotp.plan import Entry
from autotp.planner.layouts import Shard
from autotp.planner.rules import elementwise, rule_for, unary
from autotp.planner.sites import op_name

aten = torch.ops.aten


@dataclass(frozen=True)
class Entering:
    """A replicated value (``node``) that ``module`` receives as its argument ``arg`` and that each rank
    slices along ``dim`` (``size`` long) on the way in: a per-head bias (ALiBi) meeting sharded heads."""

    node: fx.Node
    module: str
    arg: str
    dim: int
    size: int  # of the sliced dim, or with ``outer`` of its sharded part
    outer: int | None = None  # the dim is (outer, size) merged (Bloom's ALiBi: batch * heads)
    op: str = field(default="", compare=False)  # where it meets the heads

    @property
    def layout(self) -> Shard:
        return Shard(self.dim, outer=self.outer)

    def entry(self) -> Entry:
        merged = (("merged", "1"),) if self.outer is not None else ()
        what = f"dim {self.dim}" if self.outer is None else f"each block of {self.size} along dim {self.dim}"
        return Entry(self.module, "slice", (("arg", self.arg), ("dim", str(self.dim)), ("size", str(self.size)))
                     + merged, f"its input '{self.arg}' is replicated and meets sharded heads ({self.op}): each rank "
                     f"takes its 1/tp of {what} as it enters")


def inside(owner: str, module: str) -> bool:
    return owner == module or owner.startswith(module + ".") or module == ""


def _back(c: Captured, n: fx.Node, dim: int) -> fx.Node | None:
    """The one input of ``n`` that carries its values along ``dim`` unchanged in position: the input of a
    copy or of a slice on another dim, or the operand of a pointwise op that the others broadcast along
    ``dim`` (T5 adds the mask to its position bias). None if there is no such input."""
    if n.op != "call_function" or c.shape(n) is None:
        return None
    nd, rule = len(c.shape(n)), rule_for(n.target)
    if rule is unary or n.target is aten.slice.Tensor:  # a copy or cast; a slice, unless along ``dim``
        if n.target is aten.slice.Tensor and (n.args[1] if len(n.args) > 1 else 0) % nd == dim:
            return None
        return n.args[0] if isinstance(n.args[0], fx.Node) and len(c.shape(n.args[0]) or ()) == nd else None
    if rule is not elementwise:
        return None
    full = [a for a in n.all_input_nodes if c.shape(a) is not None and 0 <= dim - (nd - len(c.shape(a)))
            and c.shape(a)[dim - (nd - len(c.shape(a)))] != 1]
    return full[0] if len(full) == 1 and len(c.shape(full[0])) == nd else None


def entering(c: Captured, v: fx.Node, lay: Shard, consumer: fx.Node, tp: int) -> Entering | None:
    """If ``v`` (replicated, needed sharded as ``lay`` by ``consumer``) is an argument of a module that
    ``consumer`` runs in, seen back through ``_back``: that argument, to slice on entry."""
    dim = lay.dim
    stack = [path for path, _ in (consumer.meta.get("nn_module_stack") or {}).values() if path]
    shape, cur = c.shape(v), v
    for _ in range(16):
        o = c.owner(cur) if cur.op != "placeholder" else ""
        outside = [m for m in stack if not inside(o, m)]
        if outside:
            module = outside[0]  # the outermost module that receives the value from outside
            break
        cur = _back(c, cur, dim)
        if cur is None:
            return None
    else:
        return None
    s = c.shape(cur)
    size = s[dim] // (lay.outer or 1) if s is not None and len(s) == len(shape) else 0
    if not size or s[dim] != shape[dim] or size % tp or s[dim] % size:
        return None
    args = [k for k, a in c.module_args.get(module, ()) if a == s]
    if len(args) != 1:
        return None  # not received as one argument of that shape: nowhere to slice it
    return Entering(cur, module, args[0], dim, size, lay.outer, op_name(consumer))
