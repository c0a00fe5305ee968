"""A plan as a readable table, with the totals it implies: groups, collectives, per-rank parameters.

With the model, globs are resolved against its modules (counts are per forward of that model) and
parameter bytes come from its shapes; without it, only what the plan lines say on their own.
"""
from __future__ import annotations

import shutil
from collections import Counter

import torch.nn as nn

from autotp.plan import Entry, Plan, glob_regex

# parameters a style keeps a 1/tp slice of (colwise with rep=N: N/tp); every other parameter is replicated
SHARDED = {"colwise": {"weight", "bias"}, "rowwise": {"weight"}, "vocab": {"weight"}}


def communication(e: Entry) -> str:
    """What a plan line costs in collectives."""
    if e.style in ("rowwise", "vocab", "experts"):
        return "all-reduce"
    if e.style == "colwise" and e.get("gather") == "1":
        return "all-gather"
    if e.style == "sum_grad" or (e.style == "colwise" and int(e.get("rep", "1")) > 1):
        return "bwd all-reduce"
    return ""


def local_numel(e: Entry | None, leaf: str, numel: int, tp: int) -> int:
    """Elements of a parameter (``leaf`` of the module planned by ``e``) that one rank holds."""
    if e is not None and e.style == "experts":
        return numel // tp if leaf in f"{e.get('col')},{e.get('row')}".split(",") else numel
    if e is None or leaf not in SHARDED.get(e.style, ()):
        return numel
    return numel * int(e.get("rep", "1")) // tp


def param_bytes(model: nn.Module, resolved: dict[str, Entry], tp: int) -> tuple[int, int, int, int]:
    """(local bytes, total bytes, local elements, total elements); a tied tensor counts once, whole when
    any module holding it keeps it replicated."""
    held: dict[int, tuple] = {}
    for path, mod in model.named_modules():
        for leaf, p in mod.named_parameters(recurse=False):
            n = local_numel(resolved.get(path), leaf, p.numel(), tp)
            _, before = held.get(id(p), (p, 0))
            held[id(p)] = (p, max(before, n))
    local = sum(n * p.element_size() for p, n in held.values())
    total = sum(p.numel() * p.element_size() for p, _ in held.values())
    return local, total, sum(n for _, n in held.values()), sum(p.numel() for p, _ in held.values())


def group_of(e: Entry, path: str) -> str | None:
    """The group instance a colwise/rowwise module belongs to, from its line's ``group=G``.

    ``G`` is a glob of the module holding the group (``#k`` numbers several groups in one module); the
    instance is ``path``'s prefix it matches. A rowwise line without ``group=`` (written by hand) is a group
    of its own; a colwise one without it (a gathered head) belongs to none.
    """
    if e.style == "experts":
        return path
    if e.style not in ("colwise", "rowwise"):
        return None
    g = e.get("group")
    if g is None:
        return path if e.style == "rowwise" else None
    glob, _, k = g.partition("#")
    if glob == "<root>":
        return g
    prefix = ".".join(path.split(".")[: len(glob.split("."))])
    return (prefix if glob_regex(glob).fullmatch(prefix) else glob) + (f"#{k}" if k else "")


def table(plan: Plan, counts: list[int] | None = None, width: int | None = None) -> list[str]:
    """One row per plan line: module glob, style, modules matched (with a model), collective, reason."""
    width = width or shutil.get_terminal_size((140, 24)).columns
    mod_w = max([len("MODULE")] + [len(e.path) for e in plan.entries])
    head = ["MODULE".ljust(mod_w), "STYLE    ", *(["  N"] if counts else []), "COMM          "]
    room = max(40, width - len("  ".join(head)) - 2)
    rows = ["  ".join(head) + "  REASON"]
    for i, e in enumerate(plan.entries):
        reason = e.reason if len(e.reason) <= room else e.reason[: room - 3] + "..."
        cells = [e.path.ljust(mod_w), e.style.ljust(9), *([f"{counts[i]:3d}"] if counts else []),
                 (communication(e) or "-").ljust(14)]
        rows.append("  ".join(cells) + "  " + reason)
    return rows


def with_model(plan: Plan, model: nn.Module, resolved: dict[str, Entry], width: int | None = None) -> str:
    """The table and totals of ``plan`` resolved against ``model`` (``resolved``: module path -> line)."""
    index = {id(e): i for i, e in enumerate(plan.entries)}
    sliced = plan.resolve(dict(model.named_modules()).keys(), type(model).__name__, slices=True)
    per_line = Counter(index[id(e)] for e in list(resolved.values()) + list(sliced.values()))
    counts = [per_line[i] for i in range(len(plan.entries))]
    comm = Counter(communication(e) for e in resolved.values())
    styles = Counter(e.style for e in resolved.values())
    groups = {g for path, e in resolved.items() if (g := group_of(e, path))}
    local, total, n_local, n_total = param_bytes(model, resolved, plan.tp)
    lines = [f"plan for {plan.model or type(model).__name__} at tp={plan.tp}: {len(plan.entries)} lines, "
             f"{len(resolved)} modules", *table(plan, counts, width), "",
             f"groups: {len(groups)}",
             f"all-reduces per forward: {comm['all-reduce']}{_parts(styles)}",
             f"all-gathers per forward: {comm['all-gather']}",
             params_line(n_local, n_total, local, total)]
    return "\n".join(lines)


def plan_only(plan: Plan, width: int | None = None) -> str:
    """The table and what the plan says without a model: counts per matched module, not per forward."""
    by_style = Counter(e.style for e in plan.entries)
    patterns = sorted({g for e in plan.entries if (g := group_of(e, e.path))})
    comm = Counter(communication(e) for e in plan.entries)
    full = sum(_dense_numel(e) for e in plan.entries)
    local = sum(local_numel(e, "weight", _dense_numel(e), plan.tp) for e in plan.entries)
    lines = [f"plan for {plan.model or 'a model'} at tp={plan.tp}: {len(plan.entries)} lines "
             f"({', '.join(f'{n} {s}' for s, n in sorted(by_style.items()))})", *table(plan, None, width), "",
             f"group patterns: {len(patterns)} ({', '.join(patterns) or 'none'})",
             f"lines with a forward all-reduce: {comm['all-reduce']}, all-gather: {comm['all-gather']} "
             f"(each once per module it matches)",
             f"planned weights per rank, one module per line: {local:,} of {full:,} elements "
             f"({local / max(full, 1):.1%})",
             "pass --model MODEL to count per forward and per-rank parameter bytes"]
    return "\n".join(lines)


def _parts(styles: Counter) -> str:
    """Where the all-reduces come from, e.g. `` (4 after rowwise layers, 1 after vocabulary lookups)``."""
    whats = (("rowwise", "rowwise layers"), ("vocab", "vocabulary lookups"), ("experts", "experts modules"))
    parts = [f"{styles[s]} after {what}" for s, what in whats if styles[s]]
    return f" ({', '.join(parts)})" if parts else ""


def _dense_numel(e: Entry) -> int:
    """Elements of the weight a line describes (in x out, or rows x dim), 0 when it names no sizes."""
    a, b = (e.ints("in"), e.ints("out")) if e.get("in") else (e.ints("rows"), e.ints("dim"))
    return a[0] * b[0] if a and b else 0


def params_line(n_local: int, n_total: int, b_local: int, b_total: int) -> str:
    """Parameters one rank holds vs the unsharded model, in elements and bytes."""
    return (f"parameters per rank: {n_local:,} of {n_total:,} ({n_local / max(n_total, 1):.1%}), "
            f"{b_local / 2**20:.2f} of {b_total / 2**20:.2f} MiB")
