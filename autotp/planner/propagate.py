"""The propagation engine: one for planning and for checking a given plan.

A value's layout is ``None`` (replicated) or ``Shard(dim)``; each op's rule (``planner.rules``) maps its inputs'
layouts to its output's. The planner grows tentative groups with it; the checker pushes a plan's own choices
through it; both read the same layouts, fused segments and sizes baked into reshapes from it.
"""
from __future__ import annotations

import heapq
from dataclasses import replace
from typing import Any

import torch.fx as fx

from autotp.capture.export import Captured
from autotp.plan import line_path
from autotp.planner.grads import activation_grads
from autotp.planner.layouts import Need, NoRule, Shard
from autotp.planner.rules import rule_for
from autotp.planner.sites import Site, experts_boundary, op_name
from autotp.planner.slicing import inside


class Propagation:
    """Layouts pushed through the rule table: the rules' context (``layouts.Ctx``) and the two ways to drive it.

    ``grow(cols)`` (planning) propagates one tentative group from its column projections, on top of the
    committed layouts, until row projections close it; ``seed`` + ``apply`` in graph order (checking a given
    plan) push the plan's own choices through every node. Either way a node's layout comes from ``apply``:
    its rule, or ``NoRule`` when the op has none.
    """

    def __init__(self, c: Captured, sites: dict[fx.Node, Site], committed: dict, roles: dict, tp: int,
                 reps: dict[str, int] | None = None, entering: dict | None = None, new: list | None = None,
                 parts: tuple[int, ...] | None = None):
        self.c, self.sites, self.committed, self.roles, self.base_tp = c, sites, committed, roles, tp
        # an uneven group (``parts``: units per rank): its values are cut into sum(parts) units, and the rules,
        # which read ``tp``, check every size against that count while they run on its values
        self.parts = parts
        self.tp = sum(parts) if parts else tp
        # shape constants of uneven groups: (node, position, global value) -> every rank's value
        self.const_parts: dict[tuple[fx.Node, int, int], tuple[int, ...]] = {}
        self._pending: list[int] = []
        self.const_split: dict[fx.Node, tuple[int, ...]] = {}  # their nodes -> the group's split
        self.reps = reps or {}
        # replicated values each rank slices as they enter a module: node -> [(module, layout inside it)]
        self.entering: dict[fx.Node, list[tuple[str, Shard]]] = {k: list(v) for k, v in (entering or {}).items()}
        self.new = list(new or [])  # this group's own Entering slices
        for s in self.new:
            self.entering.setdefault(s.node, []).append((s.module, s.layout))
        self.cur: fx.Node | None = None  # the node whose rule is running (entering layouts depend on it)
        self.tent: dict[fx.Node, Any] = {}
        self.segs: dict[str, list[int]] = {}
        self.cuts: dict[str, list[tuple[list[int], bool, fx.Node]]] = {}
        self.consts: list[tuple[fx.Node, int, int, int]] = []
        self.seeded: dict[str, Shard] = {}  # column node name -> its output's layout

    # --- the Ctx the rules see
    def layout(self, n: Any):
        if not isinstance(n, fx.Node):
            return None
        if n in self.tent:
            return self.tent[n]
        lay = self.committed.get(n)
        if lay is None and n in self.entering and self.cur is not None:
            return next((s for m, s in self.entering[n] if inside(self.c.owner(self.cur), m)), None)
        return lay

    def shape(self, n: Any):
        return self.c.shape(n)

    def segments(self, root: str, sizes: list[int], node: fx.Node) -> None:
        """A split of a fused projection's whole output into ``sizes`` (each piece is sharded)."""
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.cuts.setdefault(root, []).append((bounds, True, node))

    def piece(self, root: str, total: int, start: int, end: int, node: fx.Node) -> None:
        """A slice [start, end) of a fused projection's whole output: it must be one whole piece."""
        self.cuts.setdefault(root, []).append(([0, start, end, total], False, node))

    def settle_segments(self) -> None:
        for root, uses in self.cuts.items():
            bounds = sorted({b for bs, _, _ in uses for b in bs})
            sizes = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
            for bs, whole, node in uses:
                if whole and sorted(set(bs)) != bounds:
                    raise at_node(node, NoRule(f"{node.name} splits a fused projection at {bs}, elsewhere at {bounds}"))
                if not whole and bounds.index(bs[2]) - bounds.index(bs[1]) != 1:
                    raise at_node(node, NoRule(f"{node.name} slices [{bs[1]}:{bs[2]}] of a fused projection cut at "
                                           f"{bounds}: not one whole piece"))
            units = self.units(self.seeded.get(root))
            bad = [x for x in sizes if x % units]
            if bad:
                raise at_node(uses[0][2], NoRule(f"fused segment of size {bad[0]} not divisible by "
                                                 f"{'tp=' if units == self.base_tp else ''}{units}"
                                                 f"{'' if units == self.base_tp else ' units'}", sizes=(bad[0],)))
            self.segs[root] = sizes

    def shape_const(self, node: fx.Node, pos: int, global_: int, local: int) -> None:
        """A size baked in at ``node``; ``local`` is rank 0's (for an uneven split the rules computed one unit's:
        ``apply`` sets every rank's from the output's layout once the rule has returned it)."""
        if self._now is not None:
            self._pending.append(len(self.consts))
        self.consts.append((node, pos, global_, local))

    def _uneven_consts(self, n: fx.Node, out: Any) -> None:
        """The shape constants the rule just recorded at ``n``, each rank's value from ``out``'s layout."""
        lay = out[0] if isinstance(out, list) else out
        shape = self.c.shape(n)
        for i in self._pending:
            node, pos, g, _ = self.consts[i]
            flat = shape is not None and not isinstance(shape[0], (list, tuple))
            if lay is not None and lay.rep == 1:  # a size or an offset: one unit's, times the rank's units
                each = tuple(self.consts[i][3] * p for p in lay.parts)
            elif lay is not None and flat and pos < len(shape) and shape[pos] == g:  # KV heads held by several
                each = tuple(lay.local(shape, self.tp, r)[pos] for r in range(len(lay.parts)))  # ranks: its blocks
            else:
                raise NoRule(f"{n.name} ({n.target}): a size baked in where a group split unevenly meets it")
            self.consts[i] = (node, pos, g, each[0])
            self.const_parts[node, pos, g] = each
            self.const_split[node] = lay.parts
        self._pending = []

    _now: tuple[int, ...] | None = None  # the split of the values the running rule reads

    def units(self, lay: Shard | None) -> int:
        """How many pieces a value of layout ``lay`` is cut into: its split's units, else tp."""
        return sum(lay.parts) if lay is not None and lay.parts else self.base_tp

    # --- propagation
    def seed(self, s: Site, rep: int = 1, parts: tuple[int, ...] | None = None) -> Shard:
        """The layout of a column projection's output: sharded along its features (``parts``: unevenly)."""
        lay = Shard(len(self.c.shape(s.node)) - 1, root=s.node.name, rep=rep, parts=parts or self.parts)
        self.tent[s.node] = self.seeded[s.node.name] = lay
        return lay

    def apply(self, n: fx.Node) -> Any:
        """``n``'s output layout from its rule; raises NoRule (no rule, or the rule refuses), Need or Rep.

        The rule sees ``tp`` as the unit count of the split its sharded inputs carry (the group's), and its
        output carries that split on."""
        rule = rule_for(n.target)
        if rule is None:
            raise NoRule(f"no sharding rule for {op_name(n)} (at {n.name}); the value must be replicated")
        ins: list = []
        fx.node.map_arg((n.args, n.kwargs), ins.append)
        lays = [x for lay in map(self.layout, ins) for x in (lay if isinstance(lay, list) else [lay])]
        splits = {lay.parts for lay in lays if lay is not None}
        if len(splits) > 1:
            raise NoRule(f"{n.name} ({n.target}) combines values split among ranks in different ways "
                         f"({' and '.join(','.join(map(str, p)) if p else 'evenly' for p in splits)})")
        parts = next(iter(splits), None)
        saved = self.tp, self._now
        self.tp, self._now = (sum(parts) if parts else self.base_tp), parts
        try:
            out = rule(self, n)
        except Need as e:
            e.layout = replace(e.layout, parts=parts)
            raise
        finally:
            self.tp, self._now = saved
        if out is not None:
            self._whole_gradients(n)
            out = [replace(o, parts=parts) if o is not None else o for o in out] if isinstance(out, list) \
                else replace(out, parts=parts)
        if self._pending:
            self._uneven_consts(n, out)
        return out

    def _whole_gradients(self, n: fx.Node) -> None:
        """Refuse a sharded output computed with a replicated operand that needs its gradient (``grads``)."""
        need = activation_grads(self.c)
        ins: list = []
        fx.node.map_arg((n.args, n.kwargs), ins.append)
        for a in ins:
            if isinstance(a, fx.Node) and a in need and self.layout(a) is None:
                raise NoRule(f"{n.name} ({n.target}) combines a sharded value with a replicated one that needs its "
                             f"gradient ({op_name(a)} in '{line_path(self.c.owner(a))}'): each rank would "
                             f"back-propagate only part of that gradient")

    def grow(self, cols: list[Site]) -> list[Site]:
        order = self.c.order
        heap: list[tuple[int, fx.Node]] = []
        rows: list[Site] = []
        colnodes = {s.node for s in cols}
        for s in cols:
            self.seed(s, self.reps.get(s.node.name, 1))
            for u in s.node.users:
                heapq.heappush(heap, (order[u], u))
        for s in self.new:
            for u in s.node.users:
                if u.op != "output" and inside(self.c.owner(u), s.module):
                    heapq.heappush(heap, (order[u], u))
        done = set()
        while heap:
            _, n = heapq.heappop(heap)
            if n in done:
                continue
            done.add(n)
            self.cur = n
            ins = []
            fx.node.map_arg((n.args, n.kwargs), ins.append)
            if not any(self.layout(a) is not None for a in ins):
                continue
            if n.op == "output":
                raise at_node(n, NoRule(f"the model's output would be sharded (at {n.name})"))
            if n in colnodes or n in self.committed:
                raise at_node(n, NoRule(f"{n.name} would both open the group and read its sharded value"))
            site = self.sites.get(n)
            if site is not None and self._closes(site):
                rows.append(site)
                self.tent[n] = None
                continue
            try:
                out = self.apply(n)
            except (NoRule, Need) as e:
                raise at_node(n, e)
            self.tent[n] = out
            if out is not None:
                for u in n.users:
                    heapq.heappush(heap, (order[u], u))
        self.settle_segments()
        if any(x.experts for x in cols + rows):
            self._check_experts(cols, rows)
        return rows

    def _check_experts(self, cols: list[Site], rows: list[Site]) -> None:
        """An experts module is sharded in place: its group must live inside it and end at its output."""
        mod = cols[0].module
        if len(rows) != 1 or any(x.module != mod or not x.experts for x in cols + rows):
            raise at_node(cols[0].node, NoRule(f"the group of experts module '{mod}' mixes it with other layers"))
        leaks = [n for n, lay in self.tent.items() if lay is not None and not inside(self.c.owner(n), mod)]
        if leaks:
            raise at_node(leaks[0], NoRule(f"a sharded value leaves experts module '{mod}' before its down projection"))
        why = experts_boundary(self.c, cols, rows[0])
        if why is not None:
            raise at_node(rows[0].node, NoRule(why))

    def _closes(self, s: Site) -> bool:
        lay = self.layout(s.x)
        return (lay is not None and lay.dim == len(self.c.shape(s.x)) - 1 and lay.rep == 1 and s.blocker is None
                and not s.tied and s.node not in self.roles and s.in_features % self.units(lay) == 0)


def at_node(n: fx.Node, e: Exception) -> Exception:
    """``e`` with the node it happened at (kept if it already names one)."""
    e.node = getattr(e, "node", n)
    return e


def producers(c: Captured, sites: dict[fx.Node, Site], v: fx.Node) -> list[Site]:
    """Linear-like nodes reached walking back from ``v`` without crossing another one."""
    out, seen, stack = [], set(), [v]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n in sites:
            out.append(sites[n])
            continue
        fx.node.map_arg((n.args, n.kwargs), stack.append)
    return sorted(out, key=lambda s: c.order[s.node])
