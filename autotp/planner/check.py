"""Check a plan that the planner did not just make (edited by hand, imported from transformers).

The plan's own choices are pushed through the rule table, in graph order: a colwise line's output
is ``Shard(-1)``, a rowwise line must receive exactly that and gives a replicated output, every
other op takes the layout its rule gives or refuses it. Any line that would make the sharded model
compute other numbers than the unsharded one is refused with the reason and the fix: a module kept
whole that reads a sharded value, a rowwise layer fed a replicated one, a sharded value reaching a
norm or the model's output, fused segments (``seg=``) that differ from the splits the model makes,
a missing or extra ``sum_grad``, and sizes baked into reshapes that no ``patch``/``localize`` fixes.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from autotp.capture.export import Captured
from autotp.errors import ShardingError
from autotp.plan import Entry, Plan, glob_of, line_path
from autotp.planner.explain import at_source, describe
from autotp.planner.groups import Analysis
from autotp.planner.layouts import Need, NoRule, Rep, Shard
from autotp.planner.propagate import Propagation, producers
from autotp.planner.sites import Lookup, Site, experts_boundary, find_lookups, find_sites, op_name, partial_grads
from autotp.planner.slicing import inside
from autotp.split import parts_of, split_of


def check_graph(c: Captured, plan: Plan, resolved: dict[str, Entry], slices: dict[str, Entry]) -> tuple[Analysis, list[str]]:
    """Push the plan's own choices through the rule table over the captured graph ``c``.

    Returns the analysis (layouts per node) and the problems found, one sentence each with its fix; pure.
    """
    checker = _Checker(c, plan, resolved, slices)
    a = checker.run()
    return a, checker.problems


def needs_translation_check(plan: Plan) -> bool:
    """Whether applying ``plan`` changes anything the rewritten meta copy must be compared for (every plan
    that shards, slices, patches or localizes: sizes and plain numbers the code computes may change)."""
    return any(e.style not in ("replicate",) for e in plan.entries)


def _role(s: Site, e: Entry | None) -> str:
    """colwise, rowwise or replicate: what the plan line does to this site (an experts line names its weights)."""
    if e is None:
        return "replicate"
    if e.style == "experts" and s.experts:
        leaf = s.weight.rpartition(".")[2]
        return "colwise" if leaf in e.get("col", "").split(",") else \
            "rowwise" if leaf in e.get("row", "").split(",") else "replicate"
    return e.style if e.style in ("colwise", "rowwise") and not s.experts else "replicate"


def _which(e: Entry | None, module: str) -> str:
    """How a message names the plan line that decides ``module`` (or that none does)."""
    if e is None:
        return f"'{glob_of(module)}' (no plan line: kept whole)"
    head = f"line {e.line} " if e.line else ""
    return f"{head}('{e.path}' {e.style}{' gather=1' if e.get('gather') == '1' else ''})"


class _Checker:
    """One pass over the graph with the plan's layouts; problems are collected, not raised one by one."""

    def __init__(self, c: Captured, plan: Plan, resolved: dict[str, Entry], slices: dict[str, Entry] | None = None):
        self.c, self.plan, self.resolved = c, plan, resolved
        self.sites = find_sites(c)
        self.lookups = find_lookups(c, self.sites)
        self.g = Propagation(c, self.sites, {}, {}, plan.tp)  # the same engine the planner grows groups with
        self.origin: dict[fx.Node, set[str]] = {}  # node -> the colwise modules whose shards reach it
        self.problems: list[str] = []
        self.broken: set[fx.Node] = set()  # nodes at or after an op that refused a sharded input
        self.experts: set[str] = set()  # experts modules whose grouped weights are sharded in place
        self.entered: dict[fx.Node, str] = {}  # a replicated value -> the 'slice' line's module slicing it
        self.slices = slices or {}
        self._slice_lines()

    def _slice_lines(self) -> None:
        """Each 'slice' line's argument, found as the one value of its shape that enters the module."""
        own = self.c.owner
        for key, e in self.slices.items():
            path = key.rpartition(":")[0]
            shape = dict(self.c.module_args.get(path, ())).get(e.get("arg"))
            d, size = int(e.get("dim")), int(e.get("size"))
            found = [n for n in self.c.graph.nodes if shape is not None and self.c.shape(n) == shape
                     and not inside(own(n), path) and any(inside(own(u), path) for u in n.users)]
            merged = e.get("merged") == "1"
            if shape is None or len(found) != 1 or d >= len(shape) or (shape[d] % size if merged else shape[d] != size):
                seen = dict(self.c.module_args.get(path, ()))
                self.add(f"{_which(e, path)}: module '{glob_of(path)}' receives no tensor argument "
                         f"'{e.get('arg')}' with {size} along dim {d} (its tensor arguments: {seen or 'none'}). "
                         f"Fix: correct or drop the line")
                continue
            self.g.entering.setdefault(found[0], []).append((path, Shard(d, outer=shape[d] // size if merged else None)))
            self.entered[found[0]] = path

    def add(self, text: str) -> None:
        self.problems.append(text)

    def entry(self, module: str) -> Entry | None:
        return self.resolved.get(module)

    def run(self) -> Analysis:
        by_lookup = {lk.node: lk for lk in self.lookups}
        for n in self.c.graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                continue
            ins: list = []
            fx.node.map_arg((n.args, n.kwargs), ins.append)
            self.g.cur = n  # a value a 'slice' line slices is sharded only inside its module
            self.origin[n] = set().union(*((self.origin.get(a) or {self.entered[a]} if a in self.entered else
                                            self.origin.get(a, set())) for a in ins if self.g.layout(a) is not None))
            if any(a in self.broken for a in ins):
                self.broken.add(n)  # downstream of a refused op: its problem is already reported
            elif n in self.sites:
                self.g.tent[n] = self._site(self.sites[n])
            elif n in by_lookup:
                self._lookup(by_lookup[n])
            elif self.origin[n] and n.op == "output":
                self.add(f"{self._from(n)} reaches the model's output, which would be sharded. Fix: add gather=1 "
                         f"to that line (a head whose output is all-gathered), or close its group with a rowwise line")
            elif self.origin[n] and not self._leaves_experts(n):
                self.g.tent[n] = self._rule(n)
        self._vocab_lines(by_lookup.values())
        self._segments()
        self._tied()
        self._global_lines()
        if not self.problems:  # a wrong group also makes gradients partial: report the cause only
            self._sum_grads()
        return Analysis(self.plan, self.g.tent, self.sites, self.g.consts, lookups=self.lookups)

    def _tied(self) -> None:
        """A parameter several modules hold (a tied head and table) is one tensor: the line that shards it shards
        it for every module computing with it, so each of them must be planned to receive that slice."""
        for ph in self.c.graph.find_nodes(op="placeholder"):
            name = self.c.params.get(ph.name)
            names = self.c.aliases.get(name, ()) if name else ()
            splits = {n: split_of(self.entry(n.rpartition(".")[0]), n.rpartition(".")[2], self.plan.tp) for n in names}
            by, split = next(((n, s) for n, s in splits.items() if s.dim is not None), (None, None))
            if len(names) < 2 or by is None:
                continue
            for m in dict.fromkeys(Captured.owner(u) for u in ph.users):
                mine = self.c.alias_in(name, m)
                if splits.get(mine) != split:
                    e = self.entry(m)
                    line = "no plan line" if e is None else f"line {e.line}: {e.style}"
                    holder = _which(self.entry(by.rpartition(".")[0]), by)
                    self.add(f"module '{line_path(m)}' ({line}) computes with "
                             f"'{mine or name}', which is tied to '{by}': {holder} "
                             f"shards that tensor (dim {split.dim}) for every module holding it, so '{line_path(m)}' "
                             f"would see this rank's slice only. Fix: give it the matching line (a tied head: "
                             f"'colwise ... gather=1', as autotp.make_plan writes), or replicate both")

    def _from(self, n: fx.Node) -> str:
        """The plan lines whose sharded outputs reach ``n`` (one mention per line, not per layer)."""
        mods = sorted(self.origin.get(n, ()), key=lambda m: ((self.entry(m) or Entry(m, "")).line, m))
        lines = ", ".join(dict.fromkeys(_which(self.entry(m), m) for m in mods))
        return f"the output of {lines}" if lines else "a sharded value"

    def _site(self, s: Site) -> Shard | None:
        e = self.entry(s.module)
        style = _role(s, e)
        lay = self.g.layout(s.x)
        if style != "replicate" and s.blocker:
            self.add(f"{_which(e, s.module)}: '{glob_of(s.module)}' cannot be swapped for a sharded layer: "
                     f"{s.blocker}. Fix: make the line 'replicate'")
            return None
        if style != "replicate" and e.get("w") and (e.get("w") == "in_out") != s.in_out:
            self.add(f"{_which(e, s.module)}: the line says w={e.get('w')}, but the model multiplies by "
                     f"'{glob_of(s.module)}' weight as {'[in, out]' if s.in_out else '[out, in]'}: the wrong dim "
                     f"would be sharded. Fix: write w={'in_out' if s.in_out else 'out_in'}")
            return None
        if style == "rowwise":
            self._row(s, e, lay)
            if s.experts and lay is not None:
                cols = [x for x in self.sites.values() if x.module == s.module and _role(x, e) == "colwise"]
                why = experts_boundary(self.c, cols, s)
                if why:
                    self.add(f"{_which(e, s.module)}: {why}. Fix: make the line 'replicate'")
            return None
        if lay is not None:
            head = f"{_which(e, s.module)}: '{glob_of(s.module)}' is {'colwise' if style == 'colwise' else 'kept whole'}" \
                if e is not None else f"'{glob_of(s.module)}' has no plan line (kept whole)"
            self.add(f"{head} but reads {self._from(s.node)}{at_source(s.node)}. Fix: make it rowwise to close that "
                     f"group, or replicate "
                     f"the lines of that group")
            return None
        if style == "replicate" or e.get("gather") == "1":
            return None
        if s.experts:
            self.experts.add(s.module)
        self.origin[s.node] = {s.module}
        return self.g.seed(s, int(e.get("rep", "1")), parts_of(e))

    def _leaves_experts(self, n: fx.Node) -> bool:
        """A sharded value of an experts module used outside it: its shards must stay inside until the down
        projection, whose partial sums the module's output all-reduce makes whole."""
        out = [m for m in self.origin[n] & self.experts if not inside(self.c.owner(n), m)]
        if out:
            self.add(f"{_which(self.entry(out[0]), out[0])}: a sharded value leaves experts module "
                     f"'{glob_of(out[0])}' before its down projection (at {op_name(n)} in "
                     f"'{glob_of(self.c.owner(n))}'). Fix: make the line 'replicate'")
            self.broken.add(n)
        return bool(out)

    def _row(self, s: Site, e: Entry, lay: Shard | None) -> None:
        if lay is None:
            makers = ", ".join(dict.fromkeys(f"'{glob_of(p.module)}'" for p in producers(self.c, self.sites, s.x)))
            self.add(f"{_which(e, s.module)}: its input is replicated (nothing sharded reaches it), so each rank "
                     f"would add a partial sum of the whole input. Fix: make the layers that produce its input "
                     f"({makers or 'none found'}) colwise, or make this line 'replicate'")
        elif s.tied:
            self.add(f"{_which(e, s.module)}: its weight is also an embedding table, which can only be sharded by "
                     f"rows: make it colwise or replicate")
        elif lay.parts != parts_of(e) and lay.dim == len(self.c.shape(s.x)) - 1:
            said = lambda p: f"split={','.join(map(str, p))}" if p else "an even split"  # noqa: E731
            self.add(f"{_which(e, s.module)}: its input from {self._from(s.x)} is divided among ranks by "
                     f"{said(lay.parts)}, the line says {said(parts_of(e))}: each rank would multiply other "
                     f"features than it holds. Fix: give every line of the group the same split= "
                     f"({said(lay.parts)})")
        elif lay.dim != len(self.c.shape(s.x)) - 1 or lay.rep != 1 or lay.spread is not None:
            held = ", heads held by several ranks" if lay.rep > 1 else ""
            self.add(f"{_which(e, s.module)}: its input from {self._from(s.x)} is not sharded along its features "
                     f"(dim {lay.dim} of {list(self.c.shape(s.x))}{held}). Fix: replicate this group")

    def _lookup(self, lk: Lookup) -> None:
        e = self.entry(lk.module)
        if e is not None and e.style == "vocab" and lk.blocker:
            self.add(f"{_which(e, lk.module)}: the table cannot be sharded by rows: {lk.blocker}. Fix: make the "
                     f"line 'replicate'")

    def _vocab_lines(self, lookups) -> None:
        looked_up = {lk.module for lk in lookups}
        for path, e in self.resolved.items():
            if e.style == "vocab" and path not in looked_up:
                self.add(f"{_which(e, path)}: '{glob_of(path)}' does no embedding lookup in the model's forward, so "
                         f"sharding its rows is not exact. Fix: make the line 'replicate' or drop it")

    def _rule(self, n: fx.Node) -> Any:
        self.broken.add(n)
        try:
            out = self.g.apply(n)
            self.broken.discard(n)
            return out
        except Need as e:
            others = ", ".join(dict.fromkeys(f"'{glob_of(p.module)}'" for p in producers(self.c, self.sites, e.value)))
            self.add(f"{self._from(n)} meets a replicated value at {op_name(n)} in '{glob_of(self.c.owner(n))}'"
                     f"{at_source(n)}, which needs both sharded alike. Fix: "
                     + (f"make {others} colwise too, or " if others else "") + "replicate the lines of that group")
        except Rep as e:
            site = next((s for s in self.sites.values() if s.node.name == e.root), None)
            m = site.module if site else e.root
            self.add(f"{_which(self.entry(m), m)}: its output has fewer heads than tp={self.plan.tp} ranks at "
                     f"{op_name(n)} in '{glob_of(self.c.owner(n))}'{at_source(n)}. Fix: add rep={e.rep} (each head "
                     f"held by {e.rep} ranks), or replicate that group")
        except NoRule as e:
            e.node = n
            self.add(f"{self._from(n)} cannot go on sharded: {describe(self.c, e, source=True)}. Fix: close the "
                     f"group before it with a rowwise line, or replicate the lines of that group")
        return None

    def _segments(self) -> None:
        try:
            self.g.settle_segments()
        except NoRule as e:
            self.add(f"{self._from(e.node)}: {describe(self.c, e, source=True)}. Fix: replicate that group")
            return
        for s in self.sites.values():
            e = self.entry(s.module)
            if _role(s, e) != "colwise" or e.get("gather") == "1" or s.blocker or \
                    s.experts and len(e.get("col").split(",")) > 1:
                continue
            want = self.g.segs.get(s.node.name)
            want = want if want and len(want) > 1 else None
            have = e.ints("seg")
            have = have if have and len(have) > 1 else None
            if want != have:
                fix = f"write seg={','.join(map(str, want))}" if want else "drop seg="
                self.add(f"{_which(e, s.module)}: " + (f"the model splits its output into {want}" if want else
                         "the model never splits its output into pieces") + f", the line says seg={have or 'none'}: "
                         f"ranks would hold other slices than the layers after it expect. Fix: {fix}")

    def _globals(self) -> list[str]:
        return [p for p, e in self.resolved.items() if e.style == "global"]

    def _global_lines(self) -> None:
        """Inside a 'global' module the code sees global sizes and DTensor sums partial gradients: a line that
        rewrites sizes or sums a gradient there would do it twice; a split or a sliced argument has no DTensor."""
        outer = self._globals()
        for path, e in self.resolved.items():
            mine = [g for g in outer if inside(path, g) and (e.style != "global" or g != path)]
            if not mine:
                continue
            g = line_path(glob_of(mine[0]))
            if e.style in ("patch", "localize", "sum_grad", "global"):
                self.add(f"{_which(e, path)}: '{line_path(glob_of(path))}' {e.style} lies inside '{g}', a global "
                         f"module, whose code sees global sizes and whose gradients DTensor sums. Fix: drop the line")
            elif e.get("split") or e.get("rep"):
                self.add(f"{_which(e, path)}: '{glob_of(path)}' inside the global module '{g}' is split unevenly or "
                         f"held by several ranks, which DTensor cannot express. Fix: drop the 'global' line, or "
                         f"replicate the group")
        for key in self.slices:
            if any(inside(key.rpartition(":")[0], g) for g in outer):
                self.add(f"'{key}' slice lies inside a global module, whose code sees global sizes. Fix: drop it")

    def _sum_grads(self) -> None:
        sharded = set()
        for s in self.sites.values():
            if _role(s, self.entry(s.module)) != "replicate" and not s.blocker:
                sharded |= {p for w in (s.weight, s.bias) if w for p in self.c.aliases.get(w, (w,))}
        for lk in self.lookups:
            e = self.entry(lk.module)
            if e is not None and e.style == "vocab":
                sharded |= set(self.c.aliases.get(lk.weight, (lk.weight,)))
        try:
            need = partial_grads(self.c, self.g.tent, sharded)
        except ShardingError as err:
            self.add(str(err))
            return
        have: dict[str, tuple[Entry, set[str]]] = {}
        for path, e in self.resolved.items():
            if e.style == "sum_grad":
                have[path] = (e, set(e.get("p", "").split(",")))
        outer = self._globals()
        need = {m: v for m, v in need.items() if not any(inside(m, g) for g in outer)}  # DTensor sums those
        have = {m: v for m, v in have.items() if not any(inside(m, g) for g in outer)}  # (reported above)
        for mod, names in need.items():
            missing = [p for p in names if p not in have.get(mod, (None, set()))[1]]
            if missing:
                self.add(f"'{glob_of(mod)}' ({', '.join(missing)}) scales sharded values, so each rank's gradient "
                         f"of it is partial. Fix: add the line '{glob_of(mod)}  sum_grad p={','.join(names)}'")
        for path, (e, names) in have.items():
            extra = sorted(names - set(need.get(path, ())))
            if extra:
                self.add(f"{_which(e, path)}: '{glob_of(path)}' ({', '.join(extra)}) never meets a sharded value: "
                         f"its gradient is already whole, and summing it over ranks would multiply it by tp. Fix: drop "
                         f"{'the line' if extra == sorted(names) else 'p=' + ','.join(extra)}")
