"""Sizes along sharded dims that the model's own code bakes in (``view(B, T, self.n_head, -1)``): the plan gets
a ``patch`` of integer attributes, found by value and proven by ``verify``, or a ``localize`` line."""
from __future__ import annotations

import itertools
from typing import Any

import torch.nn as nn

from autotp.capture.export import Captured
from autotp.plan import ROOT, Entry, compress, glob_of, glob_regex, line_path, varying_glob
from autotp.planner.groups import Analysis
from autotp.planner.resolve import patchable
from autotp.planner.slicing import inside
from autotp.runtime.verify import verify


class Unproven(Exception):
    """The plan's rewrite computes other numbers than the model: ``problems`` are (module or None, what, node)."""

    def __init__(self, problems: list[tuple[str | None, str, Any]]):
        super().__init__("; ".join(m for _, m, _ in problems[:3]))
        self.problems = problems


def fix_sizes(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> Analysis:
    """Prove ``a``'s plan on a meta copy rewritten at local shapes (``verify``: same ops, the planned local shapes,
    the same plain numbers). Sizes baked into reshapes outside the swapped layers get a ``patch`` of integer
    attributes that makes every local shape agree, else a ``localize`` line; a module whose code still computes
    other sizes or numbers (a head count of the root module, a scale from ``q.size(-1)``) gets a ``global`` line:
    it runs on DTensor activations, at global sizes. What still disagrees raises ``Unproven``, for the caller to
    replicate those groups."""
    if not a.groups:
        return a
    problems = verify(model, a, c, example_inputs)
    if not problems:
        return a
    swapped = {s.module for cols, rows in a.groups for s in cols + rows}
    owners = []
    for n, _, _, _ in a.shape_consts:
        o = Captured.owner(n)
        if o is not None and o not in swapped and o not in owners and not any(o.startswith(s) for s in _concrete(a)):
            owners.append(o)
    entries = list(a.entries)
    for pattern in dict.fromkeys(glob_of(o) for o in owners):
        mine = [o for o in owners if glob_of(o) == pattern]
        patch = _find_patch(model, a, c, example_inputs, entries, pattern, mine)
        if patch is not None:
            entries.append(patch)
            continue
        split = next((",".join(map(str, a.const_split[n])) for n, *_ in a.shape_consts
                      if n in a.const_split and Captured.owner(n) in mine), None)
        entries += [Entry(line_path(o), "localize", (("split", split),) if split else (),
                          "sizes along sharded dims are baked into its reshapes; its forward is rewritten to local "
                          "sizes") for o in mine]
    again = _set(model, a, c, example_inputs, entries) if owners else problems
    tried: set[str] = set()
    while again:  # the DTensor route, module by module where the problems show (outermost first)
        new = [o for o in dict.fromkeys(o for o, _, _ in again) if o is not None and o not in swapped
               and o not in tried and not any(inside(o, t) for t in tried)]
        if not new:
            break
        tried.update(new)
        why = again[0][1].split(" Fix:")[0].split(" at local shapes")[0][:200]
        entries = _with_global(entries, new, a, f"its code computes with sizes along sharded dims that no rewrite "
                                                f"keeps local ({why}): it runs on DTensor activations, at global sizes")
        if entries is None:
            break
        again = _set(model, a, c, example_inputs, entries)
    if again:
        raise Unproven(again)
    return a


def _set(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any, entries: list[Entry]) -> list:
    a.entries = entries
    a.plan = a.plan.with_entries(compress(entries, a.modules or None))
    return verify(model, a, c, example_inputs)


def _with_global(entries: list[Entry], modules: list[str], a: Analysis, why: str) -> list[Entry] | None:
    """``entries`` with ``global`` lines for ``modules`` (every block alike: the instances of their globs), and
    without the lines a global module replaces inside it (patch, localize, sum_grad: DTensor sums a partial
    gradient itself); None where a line inside cannot run on DTensors (an uneven split, heads held by several
    ranks, an argument sliced on entry)."""
    every = [n for n in (a.modules or []) if any(glob_of(n) == glob_of(m) for m in modules)] or modules
    outer = [m for m in dict.fromkeys(every) if not any(inside(m, o) for o in every if o != m)]

    def under(path: str) -> bool:
        if path == ROOT:
            return "" in outer
        rx = glob_regex(path)
        return any(inside(m, o) for o in outer for m in [path, *(n for n in a.modules or [] if rx.fullmatch(n))])

    kept = []
    for e in entries:
        if not under(e.path) or e.style in ("replicate", "global"):
            kept.append(e)
        elif e.style in ("patch", "localize", "sum_grad"):
            continue
        elif e.style == "slice" or e.get("split") or e.get("rep"):
            return None
        else:
            kept.append(e)
    kept = [e for e in kept if not (e.style == "global" and any(inside(e.path, o) and e.path != o for o in outer))]
    return kept + [Entry(line_path(o), "global", (), why) for o in outer]


def unproven_layers(a: Analysis, problems: list[tuple[str | None, str, Any]]) -> dict[str, str]:
    """The layers of every group whose sharded values reach a module the check found computing other numbers
    (all groups when the rewritten model did not run at all), each with the reason for its plan line."""
    out: dict[str, str] = {}
    for owner, msg, node in problems:
        where = f"'{line_path(glob_of(owner))}'" if owner is not None else "the model"
        said = msg.split(" Fix:")[0][:200].replace(f"'{owner}'", f"'{glob_of(owner)}'") if owner else msg[:200]
        why = f"sharding it changes what {where} computes ({said})"
        for (cols, rows), nodes in zip(a.groups, a.group_nodes):
            if owner is None or (node in nodes if node is not None else any(Captured.owner(n) == owner for n in nodes)):
                for s in cols + rows:
                    out.setdefault(s.module, why)
    return out


def _find_patch(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any, entries: list[Entry],
                pattern: str, owners: list[str]) -> Entry | None:
    """Integer attributes of the owner that, set to local values, make every shape agree.

    The search is by value, never by name: an attribute (of the module, or of an object it
    holds such as its config) is a candidate when it equals a size the planner found baked
    into a reshape/split/slice along a sharded dim, or is a factor of one whose cofactor is
    another attribute (``heads * head_dim``). Candidates are added greedily while they reduce
    the shape mismatches of this module; the result must remove them all.
    """
    # global size -> every rank's local sizes found for it (two options where sizes coincide: 3 KV heads and a
    # KV group of 3 queries, each with its own local values)
    ranks: dict[int, list[tuple[int, ...]]] = {}
    tp = a.plan.tp
    for n, pos, g, loc in a.shape_consts:
        if glob_of(Captured.owner(n)) == pattern:
            each = a.const_parts.get((n, pos, g), (loc,) * tp)
            if min(each) > 0 and each not in ranks.setdefault(g, []):
                ranks[g].append(each)
    mod = model.get_submodule(owners[0])
    ints = patchable(mod)
    values = set(ints.values())
    cands: list[tuple[str, tuple[int, ...]]] = []  # (attribute, its value on each rank)
    for k, v in ints.items():
        if v <= 1:
            continue
        opts = list(ranks.get(v, []))
        for g, each in ((g, e) for g in ranks for e in ranks[g]):  # a factor of a size whose cofactor is another
            if g != v and g % v == 0 and g // v in values and all((v * x) % g == 0 for x in each):  # attribute
                opts.append(tuple(v * x // g for x in each))
        cands += [(k, o) for o in dict.fromkeys(opts) if o != (v,) * tp]
    cands.sort(key=lambda kv: (ints[kv[0]] not in ranks, kv[0].count("."), kv[0]))
    path = line_path((varying_glob(owners) or pattern) if len(owners) > 1 else owners[0])  # names no other module

    def said(each: tuple[int, ...]) -> str:
        return str(each[0]) if len(set(each)) == 1 else ",".join(map(str, each))

    def entry(keys: list[tuple[str, tuple[int, ...]]]) -> Entry:
        return Entry(path, "patch", tuple((k, said(o)) for k, o in keys),
                     "sizes along sharded dims come from these attributes; set to local values")

    def problems(keys: list) -> int:
        a.plan = a.plan.with_entries(compress(entries + [entry(keys)], a.modules or None))
        return len([o for o, _, _ in verify(model, a, c, example_inputs) if o is None or glob_of(o) == pattern])

    cands, chosen = cands[:10], []
    best = problems(chosen) if cands else 0
    for kv in cands:  # greedy: keep what removes mismatches
        if any(k == kv[0] for k, _ in chosen):
            continue
        n = problems(chosen + [kv])
        if n < best:
            chosen, best = chosen + [kv], n
        if best == 0:
            return entry(chosen)
    for pair in itertools.combinations(cands, 2):  # sizes that only agree once two attributes change
        if pair[0][0] != pair[1][0] and problems(list(pair)) == 0:
            return entry(list(pair))
    return None


def _concrete(a: Analysis) -> set[str]:
    return {s.module + "." for s in a.sites.values()}


