"""Planner: captured graph -> Plan. Pure: reads the graph, never touches weights or processes.

Greedy groups over the dataflow. Each linear-like node whose input is replicated may open
a column group; its sharded output is propagated through the rule table until row
projections close it (one all-reduce each). A rule that needs another operand sharded
(attention's k and v, a gated MLP's up) pulls that operand's projection into the group; a
rule that says "no" demotes the group to replicate, with the reason recorded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from autotp.capture.export import Captured
from autotp.plan import Entry, Plan, common_path, compress, glob_of, line_path, summarize
from autotp.planner.explain import describe, indivisible_error, where
from autotp.planner.layouts import Need, NoRule, Rep, Shard
from autotp.planner.lines import experts_entry, vocab_reason
from autotp.planner.propagate import Propagation, at_node, producers
from autotp.planner.sites import Lookup, Site, find_lookups, find_sites, op_name, partial_grads
from autotp.planner.slicing import entering
from autotp.split import aligned, balanced, grouped


@dataclass
class Analysis:
    """Everything the planner decided, for make_plan's checks and for tests."""

    plan: Plan
    layouts: dict[fx.Node, Any]
    sites: dict[fx.Node, Site]
    shape_consts: list[tuple[fx.Node, int, int, int]] = field(default_factory=list)  # node, dim, global, local
    groups: list[tuple[list[Site], list[Site]]] = field(default_factory=list)
    group_nodes: list[set[fx.Node]] = field(default_factory=list)  # per group: the values it shards
    modules: tuple[str, ...] = ()  # every module path of the model: globs in the plan name no others
    lookups: list[Lookup] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # one per concrete module, in graph order (before compress)
    # shape constants of uneven groups: (node, position, global value) -> every rank's value; node -> the split
    const_parts: dict[tuple[fx.Node, int, int], tuple[int, ...]] = field(default_factory=dict)
    const_split: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)


def plan_graph(c: Captured, tp: int, *, model: str = "", strict: bool = True,
               blocked: dict[str, str] | None = None, modules: Sequence[str] | None = None) -> Analysis:
    """Decide column/row/replicate for every linear-like node of a captured graph.

    ``strict``: a group that fails only because tp does not divide a size raises ShardingError
    (listing the tp values that work) instead of silently replicating.
    """
    sites = find_sites(c)
    for s in sites.values():  # layers whose groups the translation check refused: replicated with its reason
        if s.module in (blocked or {}) and s.blocker is None:
            s.blocker = blocked[s.module]
    lookups = find_lookups(c, sites)
    for lk in lookups:  # a tied head may shard its table only if every lookup of it can
        if lk.tied is not None and (lk.blocker or lk.rows < tp):
            lk.tied.blocker = lk.tied.blocker or f"its weight is the table of '{lk.module}', which stays replicated"
    roles: dict[fx.Node, str] = {}
    reasons: dict[fx.Node, str] = {}
    group_of: dict[fx.Node, str] = {}  # a sharded layer -> its group's name (group= on its line)
    taken: dict[str, int] = {}  # module holding groups -> how many so far
    committed: dict[fx.Node, Any] = {}
    analysis = Analysis(Plan(tp, ()), committed, sites, lookups=lookups)
    segments: dict[str, list[int]] = {}
    indivisible: list[tuple[list[Site], NoRule]] = []
    sized: set[fx.Node] = set()  # layers refused because tp does not divide a size
    all_reps: dict[str, int] = {}
    entered: dict[fx.Node, list[tuple[str, Shard]]] = {}  # committed Entering slices, as the grower reads them
    uneven: dict[fx.Node, tuple[tuple[int, ...], str]] = {}  # a group's first column -> (its split, why uneven)
    split_of_node: dict[fx.Node, tuple[tuple[int, ...], str]] = {}  # every layer of an uneven group -> the same
    slices: dict[str, Entry] = {}
    for s in sorted(sites.values(), key=lambda s: c.order[s.node]):
        if s.node in roles:
            continue
        if s.blocker is not None:
            roles[s.node], reasons[s.node] = "replicate", s.blocker
            continue
        if committed.get(s.x) is not None or tp == 1:
            continue
        g, cols, rows, err, reps, new = _grow(c, sites, committed, roles, tp, entered, s, None)
        if err is not None and err.sizes and not _gathers(c, s, cols, sites, tp) \
                and _structural_failure(c, sites, committed, roles, entered, cols, new, sized) is None:
            found = _uneven(c, sites, committed, roles, tp, entered, s, err)  # whole units, split unevenly
            if found is not None:
                uneven[s.node] = (found[0], getattr(err, "cause", None) or uneven_cause(c, err))
                g, cols, rows, err, reps, new = found[1]
        if err is None and not rows:
            err = NoRule("no row projection closes the group")
            err.node = cols[0].node
        if err is not None and _gathers(c, s, cols, sites, tp):
            roles[s.node], reasons[s.node] = "gather", ("a widening head (vocabulary logits) feeding the model's "
                                                        "output: its features sharded, all-gathered after it")
            if s.out_features % tp:
                split_of_node[s.node] = (balanced(s.out_features, tp), f"its {s.out_features} output features")
            continue
        if err is not None and err.sizes:  # tp does not divide a size: an error only if the group could close
            structural = _structural_failure(c, sites, committed, roles, entered, cols, new, sized)
            err = structural or err
        if err is not None:
            why = describe(c, err)
            if err.sizes:
                indivisible.append((cols, err))
                sized.update(x.node for x in cols)
            for x in cols:
                roles[x.node], reasons[x.node] = "replicate", f"sharding it would fail: {why}"
            continue
        committed.update(g.tent)
        if s.node in uneven:
            for x in cols + rows:
                split_of_node[x.node] = uneven[s.node]
            analysis.const_parts.update(g.const_parts)
            analysis.const_split.update(g.const_split)
        for ent in new:
            entered.setdefault(ent.node, []).append((ent.module, ent.layout))
            slices.setdefault(f"{ent.module}:{ent.arg}", ent.entry())
        analysis.shape_consts += g.consts
        all_reps.update(reps)
        analysis.groups.append((cols, rows))
        analysis.group_nodes.append({n for n, lay in g.tent.items() if lay is not None} | {x.node for x in cols})
        segments.update(g.segs)
        holder = common_path([x.module for x in cols + rows])
        gname = glob_of(holder)
        taken[holder] = taken.get(holder, 0) + 1  # several groups in one module: numbered in graph order
        gid = line_path(gname) + (f"#{taken[holder]}" if taken[holder] > 1 else "")
        for x in cols:
            roles[x.node], reasons[x.node] = "colwise", f"opens group {line_path(gname)}"
            group_of[x.node] = gid
        for x in rows:
            roles[x.node], reasons[x.node] = "rowwise", f"closes group {line_path(gname)}: one all-reduce"
            group_of[x.node] = gid
    if strict and indivisible:
        raise indivisible_error(indivisible, tp)
    vocab = {lk.node: vocab_reason(lk, roles, tp) for lk in lookups}
    sharded = [p for s in sites.values() if roles.get(s.node) in ("colwise", "rowwise", "gather")
               for p in (s.weight, s.bias) if p] + [lk.weight for lk in lookups if vocab[lk.node] is None]
    partial = partial_grads(c, committed, {a for p in sharded for a in c.aliases.get(p, (p,))})
    entries, seen = [], set()
    for s in sorted(sites.values(), key=lambda s: c.order[s.node]):
        if s.module in seen:
            continue
        seen.add(s.module)
        if s.experts:
            entries.append(experts_entry(s, sites, roles, reasons, segments, tp))
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
            reason += (f"; {tp // r} heads for {tp} ranks: each head on {r} ranks, its gradient summed among them"
                       if s.node not in split_of_node else "; fewer heads than ranks: each held by the ranks of its "
                       "query heads (several, where they share it), its gradient summed among them")
        if style in ("colwise", "rowwise") and s.node in group_of:
            params.append(("group", group_of[s.node]))
        if style in ("colwise", "rowwise") and s.node in split_of_node:
            parts, why = split_of_node[s.node]
            params.append(("split", ",".join(map(str, parts))))
            reason += f"; split unevenly: tp={tp} does not divide {why}, so {sum(parts)} whole units are held " \
                      f"{','.join(map(str, parts))} by the ranks"
        entries.append(Entry(s.module, style, tuple(params), reason))
    for lk in lookups:
        if lk.module not in seen and (lk.from_input or lk.tied):
            seen.add(lk.module)
            why = vocab[lk.node]
            uneven_rows = why is None and lk.rows % tp
            entries.append(Entry(lk.module, "vocab" if why is None else "replicate",
                                 (("rows", str(lk.rows)), ("dim", str(lk.dim)))
                                 + ((("split", ",".join(map(str, balanced(lk.rows, tp)))),) if uneven_rows else ()),
                                 why or "rows (vocabulary) sharded; each rank looks up its ids, one all-reduce"
                                 + (f"; {lk.rows} rows split unevenly" if uneven_rows else "")))
    entries += slices.values()
    for module, names in partial.items():
        entries.append(Entry(module, "sum_grad", (("p", ",".join(names)),),
                             "scales sharded values: each rank's gradient is a partial sum, all-reduced in backward"))
    n_gather = sum(1 for r in roles.values() if r == "gather")
    summary = summarize(len(analysis.groups), sum(len(r) for _, r in analysis.groups),
                        sum(1 for lk in lookups if vocab[lk.node] is None), n_gather,
                        sum(len(v) for v in partial.values()))
    analysis.entries = entries
    analysis.modules = tuple(modules or ())
    analysis.plan = Plan(tp, tuple(compress(entries, modules)), model, summary)
    return analysis


def _grow(c: Captured, sites: dict, committed: dict, roles: dict, tp: int, entered: dict, s: Site,
          parts: tuple[int, ...] | None):
    """Grow the group that ``s`` opens (evenly, or split into ``parts`` units per rank): the propagation, its
    columns and rows, the failure (or None), the heads held by several ranks, the arguments sliced on entry."""
    cols, err, reps, new, rows = [s], None, {}, [], []
    units = sum(parts) if parts else tp
    while True:
        g = Propagation(c, sites, committed, roles, tp, reps, entered, new, parts)
        try:
            if parts is None:
                _widths(cols, tp, units, reps, parts)
            rows = g.grow(cols)
            if parts is not None:  # after growing: heads held by several ranks show only there (rep)
                _widths(cols, tp, units, reps, parts)
                regroup = _regroup(parts, reps, tp)
                if regroup != parts:
                    if regroup is None:
                        raise at_node(cols[0].node, NoRule(f"KV groups of {set(reps.values())} heads cannot be "
                                                           f"kept whole on {tp} ranks"))
                    return _grow(c, sites, committed, roles, tp, entered, s, regroup)
        except Need as e:
            more = _pullable(c, sites, e.value, cols, roles, committed)
            if more:
                cols += more
                continue
            ent = entering(c, e.value, e.layout, e.node, tp) if parts is None else None
            if ent is not None and ent not in new:
                new.append(ent)
                continue
            err = _unproduced(c, e)
        except Rep as e:
            if e.root not in reps:
                reps[e.root] = e.rep
                continue
            err = NoRule(f"{e.root} needs {e.rep} ranks per head twice")
        except NoRule as e:
            err = e
        break
    return g, cols, rows, err, reps, new


def _unproduced(c: Captured, e: Need) -> NoRule:
    err = NoRule(f"{where(c, e.value)} would have to be sharded on dim {e.layout.dim} for {op_name(e.node)}, and no "
                 f"column projection produces it")
    err.node = e.node
    return err


def _widths(cols: list[Site], tp: int, units: int, reps: dict, parts) -> None:
    """Every column's output features cut into the group's units (a rep'd column's: into units // rep)."""
    bad = [x for x in cols if x.out_features % (units // reps.get(x.node.name, 1))]
    if bad:
        b = bad[0]
        small = b.out_features < units  # a gate of width 1 is replicated, not an error
        e = NoRule(f"out features {b.out_features} of '{b.module}' "
                   f"{'smaller than' if small else 'not divisible by'} "
                   + (f"tp={tp}" if parts is None else f"{units} units"), sizes=() if small else (b.out_features,))
        e.cause = f"the {b.out_features} output features of '{glob_of(b.module)}'"
        raise at_node(b.node, e)


def _regroup(parts: tuple[int, ...], reps: dict, tp: int) -> tuple[int, ...] | None:
    """``parts``, or a split of the same units that keeps each block of ``rep`` units (a KV head's query heads) on
    ranks of its own, where some heads are held by several ranks; None if none does."""
    rs = set(reps.values())
    if not rs:
        return parts
    if len(rs) > 1:
        return None
    rep = rs.pop()
    return parts if aligned(parts, rep) else grouped(sum(parts), rep, tp)


def _uneven(c: Captured, sites: dict, committed: dict, roles: dict, tp: int, entered: dict, s: Site,
            err: NoRule, tries: int = 6):
    """The group of ``s`` failed because tp does not divide a size: grow it again with every sharded size cut into
    U whole units (heads, KV groups, blocks of features), rank r holding ``balanced(U, tp)[r]`` of them. U divides
    every size that failed so far (9 query heads, then a 192-feature KV projection: U divides 3) and is above tp.
    (split, what _grow returned) for the first that closes, else None."""
    need, tried = err.sizes[0], set()
    for _ in range(tries):
        u = next((u for u in _unit_counts(need, tp) if u not in tried), None)
        if u is None:
            return None
        tried.add(u)
        err.tried = (*getattr(err, "tried", ()), u)  # for the error, if nothing works
        got = _grow(c, sites, committed, roles, tp, entered, s, balanced(u, tp))
        if got[3] is None and got[2]:  # parts regrouped where KV heads are held by several ranks
            rs, parts = set(got[4].values()), got[0].parts
            if len(rs) == 1 and all(p % min(rs) == 0 for p in parts):  # whole KV groups on every rank: the same
                fewer = tuple(p // min(rs) for p in parts)  # split in units of one group each, no head shared
                whole = _grow(c, sites, committed, roles, tp, entered, s, fewer)
                if whole[3] is None and whole[2] and not whole[4]:
                    return fewer, whole
            return parts, got
        if got[3] is not None and got[3].sizes:
            need = math.gcd(need, got[3].sizes[0])
            err.sizes = tuple(dict.fromkeys(err.sizes + got[3].sizes))  # for the error, if nothing works
    return None


def _unit_counts(size: int, tp: int) -> list[int]:
    """Unit counts U for a size tp does not divide: U divides it and U > tp. First those that spread evenly enough
    (the largest rank holds at most 15% more than the mean), among them units of a multiple of 64 features, then of
    8 (kernels stay fast), then the most units; then the rest, the most even first."""
    def imbalance(u: int) -> float:
        return -(-u // tp) * tp / u

    def grain(u: int) -> int:
        return 0 if (size // u) % 64 == 0 else 1 if (size // u) % 8 == 0 else 2

    divs = [u for u in range(tp + 1, size + 1) if size % u == 0 and u % tp]
    return sorted(divs, key=lambda u: (imbalance(u) > 1.15, grain(u), imbalance(u), -u))


def uneven_cause(c: Captured, err: NoRule) -> str:
    """The size tp does not divide and where it is: "9 (dim 2 of reshape (2, 8, 9, 8) at aten.view in 'h.*.attn')"."""
    why = describe(c, err).split(" is not divisible")[0]
    return f"{err.sizes[0]} ({re.sub(r' of size [0-9]+', '', why)[:160]})"


def _pullable(c: Captured, sites: dict, value: fx.Node, cols: list[Site], roles: dict, committed: dict) -> list[Site]:
    """The column projections producing ``value`` that a group may still take in (free, not blocked, reading a
    replicated input)."""
    return [x for x in producers(c, sites, value) if x not in cols and x.node not in roles
            and x.blocker is None and committed.get(x.x) is None]


def _structural_failure(c: Captured, sites: dict, committed: dict, roles: dict, entered: dict, cols: list[Site],
                        new: list, sized: set) -> NoRule | None:
    """Why the group of ``cols`` cannot be sharded at any tp (grown at tp=1, where every size divides), or None
    if only sizes may stand in its way (``sized``: layers already refused for a size). A classifier head whose
    output is the model's is then replicated for what it is, not reported as a tp that does not divide its classes."""
    cols = list(cols)
    while True:
        try:
            rows = Propagation(c, sites, committed, roles, 1, {}, entered, new).grow(cols)
        except Need as e:  # as the planner does: pull in the projections that produce the needed operand,
            more = _pullable(c, sites, e.value, cols, roles, committed)
            if more:
                cols += more
                continue
            ent = entering(c, e.value, e.layout, e.node, 1)  # or slice a replicated argument as it enters
            if ent is not None and ent not in new:
                new = [*new, ent]
                continue
            if any(x.node in sized for x in producers(c, sites, e.value)):
                return None  # its partner was refused for a size: so is this group
            return _unproduced(c, e)
        except NoRule as e:
            return None if e.sizes else e
        except Rep:
            return None
        break
    if rows:
        return None
    e = NoRule("no row projection closes the group")
    e.node = cols[0].node
    return e


def _gathers(c: Captured, s: Site, cols: list[Site], sites: dict, tp: int) -> bool:
    """A lone column projection that could not be closed, whose output flows to the model's output
    without meeting another projection (an LM head): all-gather its output rather than replicate it,
    when it widens (vocabulary-sized); a width tp does not divide is split unevenly, by whole features."""
    if cols != [s] or s.blocker is not None or s.experts or s.out_features <= s.in_features or s.out_features < tp:
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
