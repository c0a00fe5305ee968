"""Sizes along sharded dims that the model's own code bakes in (``view(B, T, self.n_head, -1)``): the plan gets
a ``patch`` of integer attributes, found by value and proven by ``verify``, or a ``localize`` line."""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn

from autotp.capture.export import Captured
from autotp.errors import RewriteError
from autotp.plan import Entry, compress, glob_of
from autotp.planner.groups import Analysis
from autotp.runtime.verify import verify


def fix_sizes(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> Analysis:
    """Sizes baked into reshapes outside the swapped layers: find a ``patch`` of integer attributes that makes
    every local shape agree, else ``localize`` the module; the result is verified again."""
    swapped = {e.path for e in a.plan.entries if e.style in ("colwise", "rowwise")}
    owners = []
    for n, _, _, _ in a.shape_consts:
        o = Captured.owner(n)
        if o and glob_of(o) not in swapped and o not in owners and not any(o.startswith(s) for s in _concrete(a)):
            owners.append(o)
    if not owners or not verify(model, a, c, example_inputs):
        return a
    entries = list(a.entries)
    for pattern in dict.fromkeys(glob_of(o) for o in owners):
        mine = [o for o in owners if glob_of(o) == pattern]
        patch = _find_patch(model, a, c, example_inputs, entries, pattern, mine)
        if patch is not None:
            entries.append(patch)
            continue
        entries += [Entry(o, "localize", (), "sizes along sharded dims are baked into its reshapes; "
                          "its forward is rewritten to local sizes") for o in mine]
    a.entries = entries
    a.plan = a.plan.with_entries(compress(entries))
    again = verify(model, a, c, example_inputs)
    if again:
        raise RewriteError("the sharded model does not agree with the plan after patching/localizing "
                           f"{owners}: {[m for _, m in again[:3]]}. Please report this with the plan file.")
    return a



def _find_patch(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any, entries: list[Entry],
                pattern: str, owners: list[str]) -> Entry | None:
    """Integer attributes of the owner that, set to local values, make every shape agree.

    The search is by value, never by name: an attribute (of the module, or of an object it
    holds such as its config) is a candidate when it equals a size the planner found baked
    into a reshape/split/slice along a sharded dim, or is a factor of one whose cofactor is
    another attribute (``heads * head_dim``). Candidates are added greedily while they reduce
    the shape mismatches of this module; the result must remove them all.
    """
    lits: dict[int, int] = {}  # global size -> local size
    for n, _, g, loc in a.shape_consts:
        if glob_of(Captured.owner(n)) == pattern:
            lits[g] = loc if lits.get(g, loc) == loc else -1
    mod = model.get_submodule(owners[0])
    ints = _int_attrs(mod)
    values = set(ints.values())
    local: dict[str, int] = {}
    for k, v in ints.items():
        if v > 1 and lits.get(v, -1) > 0:
            local[k] = lits[v]
        elif v > 1:  # a factor of a size, the cofactor being another attribute (heads * head_dim)
            got = [v * lits[g] // g for g in lits if lits[g] > 0 and g % v == 0 and g // v in values
                   and (v * lits[g]) % g == 0]
            if got:
                local[k] = got[0]
    cands = [k for k in local if local[k] != ints[k]]
    cands.sort(key=lambda k: (ints[k] not in lits, k.count("."), k))
    path = pattern if len(owners) > 1 else owners[0]

    def problems(keys: list[str]) -> int:
        e = Entry(path, "patch", tuple((k, str(local[k])) for k in keys),
                  "sizes along sharded dims come from these attributes; set to local values")
        a.plan = a.plan.with_entries(compress(entries + [e]))
        return len([o for o, _ in verify(model, a, c, example_inputs) if o is None or glob_of(o) == pattern])

    def entry(keys: list[str]) -> Entry:
        return Entry(path, "patch", tuple((k, str(local[k])) for k in keys),
                     "sizes along sharded dims come from these attributes; set to local values")

    cands, chosen = cands[:8], []
    best = problems(chosen) if cands else 0
    for k in cands:  # greedy: keep what removes mismatches
        n = problems(chosen + [k])
        if n < best:
            chosen, best = chosen + [k], n
        if best == 0:
            return entry(chosen)
    for pair in itertools.combinations(cands, 2):  # sizes that only agree once two attributes change
        if problems(list(pair)) == 0:
            return entry(list(pair))
    return None


def _int_attrs(mod: nn.Module) -> dict[str, int]:
    """Integer attributes of a module and of plain objects it holds (e.g. ``config.num_attention_heads``)."""
    out = {}
    for k, v in vars(mod).items():
        if type(v) is int:
            out[k] = v
        elif not k.startswith("_") and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, torch.Tensor, type)):
            out.update({f"{k}.{j}": w for j, w in vars(v).items() if type(w) is int and not j.startswith("_")})
    return out


def _concrete(a: Analysis) -> set[str]:
    return {s.module + "." for s in a.sites.values()}


