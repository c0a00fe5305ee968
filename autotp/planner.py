"""Planner: captured graph -> Plan. Pure: reads the graph, never touches weights or processes.

Greedy groups over the dataflow. Each linear-like node whose input is replicated may open
a column group; its sharded output is propagated through the rule table until row
projections close it (one all-reduce each). A rule that needs another operand sharded
(attention's k and v, a gated MLP's up) pulls that operand's projection into the group; a
rule that says "no" demotes the group to replicate, with the reason recorded.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .explain import describe, indivisible_error, where
from .plan import Entry, Plan, common_path, compress, glob_of, summarize
from .layouts import Need, NoRule, Rep, Shard
from .rules import rule_for
from .sites import Lookup, Site, experts_boundary, find_lookups, find_sites, op_name, partial_grads
from .slicing import entering, inside
from .trace import Captured


@dataclass
class Analysis:
    """Everything the planner decided, for make_plan's checks and for tests."""

    plan: Plan
    layouts: dict[fx.Node, Any]
    sites: dict[fx.Node, Site]
    shape_consts: list[tuple[fx.Node, int, int, int]] = field(default_factory=list)  # node, dim, global, local
    groups: list[tuple[list[Site], list[Site]]] = field(default_factory=list)
    lookups: list[Lookup] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # one per concrete module, in graph order (before compress)


class _Grower:
    """Propagates one tentative group's layouts on top of the committed ones."""

    def __init__(self, c: Captured, sites: dict[fx.Node, Site], committed: dict, roles: dict, tp: int,
                 reps: dict[str, int] | None = None, entering: dict | None = None, new: list | None = None):
        self.c, self.sites, self.committed, self.roles, self.tp = c, sites, committed, roles, tp
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

    def _settle_segments(self) -> None:
        for root, uses in self.cuts.items():
            bounds = sorted({b for bs, _, _ in uses for b in bs})
            sizes = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
            for bs, whole, node in uses:
                if whole and sorted(set(bs)) != bounds:
                    raise _at(node, NoRule(f"{node.name} splits a fused projection at {bs}, elsewhere at {bounds}"))
                if not whole and bounds.index(bs[2]) - bounds.index(bs[1]) != 1:
                    raise _at(node, NoRule(f"{node.name} slices [{bs[1]}:{bs[2]}] of a fused projection cut at "
                                           f"{bounds}: not one whole piece"))
            bad = [x for x in sizes if x % self.tp]
            if bad:
                raise _at(uses[0][2], NoRule(f"fused segment of size {bad[0]} not divisible by tp={self.tp}",
                                             sizes=(bad[0],)))
            self.segs[root] = sizes

    def shape_const(self, node: fx.Node, pos: int, global_: int, local: int) -> None:
        self.consts.append((node, pos, global_, local))

    # --- propagation
    def run(self, cols: list[Site]) -> list[Site]:
        order = self.c.order
        heap: list[tuple[int, fx.Node]] = []
        rows: list[Site] = []
        colnodes = {s.node for s in cols}
        for s in cols:
            self.tent[s.node] = Shard(len(self.c.shape(s.node)) - 1, root=s.node.name, rep=self.reps.get(s.node.name, 1))
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
                raise _at(n, NoRule(f"the model's output would be sharded (at {n.name})"))
            if n in colnodes or n in self.committed:
                raise _at(n, NoRule(f"{n.name} would both open the group and read its sharded value"))
            site = self.sites.get(n)
            if site is not None and self._closes(site):
                rows.append(site)
                self.tent[n] = None
                continue
            rule = rule_for(n.target)
            if rule is None:
                raise _at(n, NoRule(f"no sharding rule for {op_name(n)} (at {n.name}); the value must be replicated"))
            try:
                out = rule(self, n)
            except (NoRule, Need) as e:
                raise _at(n, e)
            self.tent[n] = out
            if out is not None:
                for u in n.users:
                    heapq.heappush(heap, (order[u], u))
        self._settle_segments()
        if any(x.experts for x in cols + rows):
            self._check_experts(cols, rows)
        return rows

    def _check_experts(self, cols: list[Site], rows: list[Site]) -> None:
        """An experts module is sharded in place: its group must live inside it and end at its output."""
        mod = cols[0].module
        if len(rows) != 1 or any(x.module != mod or not x.experts for x in cols + rows):
            raise _at(cols[0].node, NoRule(f"the group of experts module '{mod}' mixes it with other layers"))
        leaks = [n for n, lay in self.tent.items() if lay is not None and not inside(self.c.owner(n), mod)]
        if leaks:
            raise _at(leaks[0], NoRule(f"a sharded value leaves experts module '{mod}' before its down projection"))
        why = experts_boundary(self.c, cols, rows[0])
        if why is not None:
            raise _at(rows[0].node, NoRule(why))

    def _closes(self, s: Site) -> bool:
        lay = self.layout(s.x)
        return (lay is not None and lay.dim == len(self.c.shape(s.x)) - 1 and lay.rep == 1 and s.blocker is None
                and not s.tied and s.node not in self.roles and s.in_features % self.tp == 0)


def _at(n: fx.Node, e: Exception) -> Exception:
    e.node = getattr(e, "node", n)
    return e


def plan_graph(c: Captured, tp: int, *, model: str = "", strict: bool = True) -> Analysis:
    """Decide column/row/replicate for every linear-like node of a captured graph.

    ``strict``: a group that fails only because tp does not divide a size raises ShardingError
    (listing the tp values that work) instead of silently replicating.
    """
    sites = find_sites(c)
    lookups = find_lookups(c, sites)
    for lk in lookups:  # a tied head may shard its table only if every lookup of it can
        if lk.tied is not None and (lk.blocker or lk.rows % tp):
            lk.tied.blocker = lk.tied.blocker or f"its weight is the table of '{lk.module}', which stays replicated"
    roles: dict[fx.Node, str] = {}
    reasons: dict[fx.Node, str] = {}
    committed: dict[fx.Node, Any] = {}
    analysis = Analysis(Plan(tp, ()), committed, sites, lookups=lookups)
    segments: dict[str, list[int]] = {}
    indivisible: list[tuple[list[Site], NoRule]] = []
    all_reps: dict[str, int] = {}
    entered: dict[fx.Node, list[tuple[str, Shard]]] = {}  # committed Entering slices, as the grower reads them
    slices: dict[str, Entry] = {}
    for s in sorted(sites.values(), key=lambda s: c.order[s.node]):
        if s.node in roles:
            continue
        if s.blocker is not None:
            roles[s.node], reasons[s.node] = "replicate", s.blocker
            continue
        if committed.get(s.x) is not None or tp == 1:
            continue
        cols, err, reps, new = [s], None, {}, []
        while True:
            g = _Grower(c, sites, committed, roles, tp, reps, entered, new)
            try:
                bad = [x for x in cols if x.out_features % (tp // reps.get(x.node.name, 1))]
                if bad:
                    b = bad[0]
                    small = b.out_features < tp  # a gate of width 1 is replicated, not an error
                    raise _at(b.node, NoRule(f"out features {b.out_features} of '{b.module}' "
                                             f"{'smaller than' if small else 'not divisible by'} tp={tp}",
                                             sizes=() if small else (b.out_features,)))
                rows = g.run(cols)
            except Need as e:
                more = [x for x in _producers(c, sites, e.value) if x not in cols and x.node not in roles
                        and x.blocker is None and committed.get(x.x) is None]
                if more:
                    cols += more
                    continue
                ent = entering(c, e.value, e.layout, e.node, tp)
                if ent is not None and ent not in new:
                    new.append(ent)
                    continue
                err = NoRule(f"{where(c, e.value)} would have to be sharded on dim {e.layout.dim} for "
                             f"{op_name(e.node)}, and no column projection produces it")
                err.node = e.node
            except Rep as e:
                if e.root not in reps:
                    reps[e.root] = e.rep
                    continue
                err = NoRule(f"{e.root} needs {e.rep} ranks per head twice")
            except NoRule as e:
                err = e
            break
        if err is None and not rows:
            err = NoRule("no row projection closes the group")
            err.node = cols[0].node
        if err is not None and _gathers(c, s, cols, sites, tp):
            roles[s.node], reasons[s.node] = "gather", ("a widening head (vocabulary logits) feeding the model's "
                                                        "output: its features sharded, all-gathered after it")
            continue
        if err is not None:
            why = describe(c, err)
            if err.sizes:
                indivisible.append((cols, err))
            for x in cols:
                roles[x.node], reasons[x.node] = "replicate", f"sharding it would fail: {why}"
            continue
        committed.update(g.tent)
        for ent in new:
            entered.setdefault(ent.node, []).append((ent.module, ent.layout))
            slices.setdefault(f"{ent.module}:{ent.arg}", ent.entry())
        analysis.shape_consts += g.consts
        all_reps.update(reps)
        analysis.groups.append((cols, rows))
        segments.update(g.segs)
        gname = glob_of(common_path([x.module for x in cols + rows]))
        for x in cols:
            roles[x.node], reasons[x.node] = "colwise", f"opens group {gname or '<root>'}"
        for x in rows:
            roles[x.node], reasons[x.node] = "rowwise", f"closes group {gname or '<root>'}: one all-reduce"
    if strict and indivisible:
        raise indivisible_error(indivisible, tp)
    vocab = {lk.node: _vocab_reason(lk, roles, tp) for lk in lookups}
    sharded = [p for s in sites.values() if roles.get(s.node) in ("colwise", "rowwise", "gather")
               for p in (s.weight, s.bias) if p] + [lk.weight for lk in lookups if vocab[lk.node] is None]
    partial = partial_grads(c, committed, {a for p in sharded for a in c.aliases.get(p, (p,))})
    entries, seen = [], set()
    for s in sorted(sites.values(), key=lambda s: c.order[s.node]):
        if s.module in seen:
            continue
        seen.add(s.module)
        if s.experts:
            entries.append(_experts_entry(s, sites, roles, reasons, segments, tp))
            continue
        style = roles.get(s.node, "replicate")
        reason = reasons.get(s.node, "its input is already sharded" if tp > 1 else "tp=1")
        params = [("in", str(s.in_features)), ("out", str(s.out_features)), ("w", "in_out" if s.in_out else "out_in")]
        if style == "gather":
            style, params = "colwise", params + [("gather", "1")]
        seg = segments.get(s.node.name)
        if style == "colwise" and seg and len(seg) > 1:
            params.append(("seg", ",".join(map(str, seg))))
            reason += f"; fused output split into {len(seg)} segments, each sharded"
        r = all_reps.get(s.node.name, 1)
        if style == "colwise" and r > 1:
            params.append(("rep", str(r)))
            reason += f"; {tp // r} heads for {tp} ranks: each head on {r} ranks, its gradient summed among them"
        entries.append(Entry(s.module, style, tuple(params), reason))
    for lk in lookups:
        if lk.module not in seen and (lk.from_input or lk.tied):
            seen.add(lk.module)
            why = vocab[lk.node]
            entries.append(Entry(lk.module, "vocab" if why is None else "replicate",
                                 (("rows", str(lk.rows)), ("dim", str(lk.dim))),
                                 why or "rows (vocabulary) sharded; each rank looks up its ids, one all-reduce"))
    entries += slices.values()
    for module, names in partial.items():
        entries.append(Entry(module, "sum_grad", (("p", ",".join(names)),),
                             "scales sharded values: each rank's gradient is a partial sum, all-reduced in backward"))
    n_gather = sum(1 for r in roles.values() if r == "gather")
    summary = summarize(len(analysis.groups), sum(len(r) for _, r in analysis.groups),
                        sum(1 for lk in lookups if vocab[lk.node] is None), n_gather,
                        sum(len(v) for v in partial.values()))
    analysis.entries = entries
    analysis.plan = Plan(tp, tuple(compress(entries)), model, summary)
    return analysis


def _experts_entry(s: Site, sites: dict, roles: dict, reasons: dict, segments: dict, tp: int) -> Entry:
    """One line for an experts module: its grouped weights sliced in place (col: outputs, row: inputs)."""
    mine = [x for x in sorted(sites.values(), key=lambda x: x.node.name) if x.module == s.module]
    cols = [x for x in mine if roles.get(x.node) == "colwise"]
    rows = [x for x in mine if roles.get(x.node) == "rowwise"]
    if not cols or not rows:
        why = next((reasons[x.node] for x in mine if x.node in reasons), "its input is already sharded"
                   if tp > 1 else "tp=1")
        return Entry(s.module, "replicate", (), why)
    leaf = lambda x: x.weight.rpartition(".")[2]  # noqa: E731
    params = [("n", str(s.experts)), ("col", ",".join(map(leaf, cols))), ("row", ",".join(map(leaf, rows))),
              ("w", "in_out" if s.in_out else "out_in")]
    seg = segments.get(cols[0].node.name)
    if len(cols) == 1 and seg and len(seg) > 1:
        params.append(("seg", ",".join(map(str, seg))))
    return Entry(s.module, "experts", tuple(params),
                 f"{s.experts} experts, each one's hidden features sharded in place; inputs get f, "
                 f"the output one all-reduce")


def _gathers(c: Captured, s: Site, cols: list[Site], sites: dict, tp: int) -> bool:
    """A lone column projection that could not be closed, whose output flows to the model's output
    without meeting another projection (an LM head): all-gather its output rather than replicate it,
    when it widens (vocabulary-sized) and tp divides it."""
    if cols != [s] or s.blocker is not None or s.experts or s.out_features <= s.in_features or s.out_features % tp:
        return False
    stack, seen = list(s.node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in sites:
            return False
        stack.extend(n.users)
    return any(n.op == "output" for n in seen)


def _vocab_reason(lk: Lookup, roles: dict, tp: int) -> str | None:
    """None if the lookup's table is sharded by rows, else why it stays replicated."""
    if tp == 1:
        return "tp=1"
    if lk.blocker:
        return lk.blocker
    if lk.tied is not None and roles.get(lk.tied.node) not in ("colwise", "gather"):
        return f"its table is tied to '{lk.tied.module}', which is replicated"
    if not lk.from_input and lk.tied is None:
        return "its ids are computed (positions), not read from the model's inputs"
    if lk.rows % tp:
        return f"{lk.rows} rows are not divisible by tp={tp}"
    return None


def _producers(c: Captured, sites: dict[fx.Node, Site], v: fx.Node) -> list[Site]:
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
