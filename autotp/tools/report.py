"""A plan as a readable table, with the totals it implies: groups, collectives, per-rank parameters.

With the model, globs are resolved against its modules (counts are per forward of that model) and
parameter bytes come from its shapes, rank by rank (an uneven ``split=`` line gives each rank its own share,
``autotp.split``), with each rank's FLOPs per token in its sharded linear layers; without it, only what the
plan lines say on their own.
"""
from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch.nn as nn

from autotp.plan import Entry, Plan, glob_regex
from autotp.split import split_of


def communication(e: Entry) -> str:
    """What a plan line costs in collectives."""
    if e.style in ("rowwise", "vocab", "experts"):
        return "all-reduce"
    if e.style == "colwise" and e.get("gather") == "1":
        return "all-gather"
    if e.style == "sum_grad" or (e.style == "colwise" and int(e.get("rep", "1")) > 1):
        return "bwd all-reduce"
    return ""


def local_numel(e: Entry | None, leaf: str, shape: Sequence[int], tp: int, rank: int = 0) -> int:
    """Elements of a parameter of ``shape`` (``leaf`` of the module planned by ``e``) that ``rank`` holds: its
    plan line's split (``autotp.split``), an uneven ``split=`` line giving each rank its own share."""
    return math.prod(split_of(e, leaf, tp).local_shape(tuple(shape), rank))


@dataclass(frozen=True)
class Held:
    """What one rank holds of a model planned by a plan: parameters, and the FLOPs of its sharded linear layers."""

    numel: int
    nbytes: int
    flops: int  # per token: 2 x the elements of its part of each colwise/rowwise weight (2 * in * out_local)


FLOPS_FORMULA = ("2 x in x out of this rank's part of each colwise/rowwise weight (a multiply and an add per "
                 "weight element; replicated layers not counted)")


def held(model: nn.Module, resolved: dict[str, Entry], tp: int, rank: int = 0) -> Held:
    """What ``rank`` holds; a tied tensor counts once, whole when any module holding it keeps it replicated."""
    parts: dict[int, tuple[nn.Parameter, int]] = {}
    flops = 0
    for path, mod in model.named_modules():
        e = resolved.get(path)
        for leaf, p in mod.named_parameters(recurse=False):
            n = local_numel(e, leaf, p.shape, tp, rank)
            _, before = parts.get(id(p), (p, 0))
            parts[id(p)] = (p, max(before, n))
            if e is not None and e.style in ("colwise", "rowwise") and leaf == "weight" and p.dim() == 2:
                flops += 2 * n
    return Held(sum(n for _, n in parts.values()), sum(n * p.element_size() for p, n in parts.values()), flops)


def dense(model: nn.Module, resolved: dict[str, Entry]) -> Held:
    """The unsharded model, counted as ``held`` counts a rank (the same linear layers)."""
    return held(model, resolved, 1)


def param_bytes(model: nn.Module, resolved: dict[str, Entry], tp: int, rank: int = 0) -> tuple[int, int, int, int]:
    """(local bytes, total bytes, local elements, total elements) of ``rank``."""
    mine, full = held(model, resolved, tp, rank), dense(model, resolved)
    return mine.nbytes, full.nbytes, mine.numel, full.numel


def per_rank(ranks: list[Held], full: Held) -> list[str]:
    """One row per rank (runs of ranks holding the same written once): elements, MiB, linear FLOPs per token, and
    how far the largest rank is from the mean."""
    rows = [f"per rank   {'parameters':>24}  {'MiB':>9}  {'linear FLOPs/token':>20}"]  # the columns below
    r = 0
    while r < len(ranks):
        end = r
        while end + 1 < len(ranks) and ranks[end + 1] == ranks[r]:
            end += 1
        h = ranks[r]
        who = f"rank {r}" if end == r else f"ranks {r}-{end}"
        rows.append(f"  {who:<9}{h.numel:>15,} ({h.numel / max(full.numel, 1):6.1%})  {h.nbytes / 2**20:9.2f}  "
                    f"{h.flops:>20,}")
        r = end + 1
    rows.append(f"  {'unsharded':<9}{full.numel:>15,} {'':8}  {full.nbytes / 2**20:9.2f}  {full.flops:>20,}")
    mean = sum(h.nbytes for h in ranks) / len(ranks)
    fmean = sum(h.flops for h in ranks) / len(ranks)
    rows += [f"largest rank vs the mean: parameters {max(h.nbytes for h in ranks) / max(mean, 1):.3f}x, linear "
             f"FLOPs {max(h.flops for h in ranks) / max(fmean, 1):.3f}x",
             f"linear FLOPs/token, of the sharded linear layers: {FLOPS_FORMULA}"]
    return rows


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
    ranks = [held(model, resolved, plan.tp, r) for r in range(plan.tp)]
    full = dense(model, resolved)
    lines = [f"plan for {plan.model or type(model).__name__} at tp={plan.tp}: {len(plan.entries)} lines, "
             f"{len(resolved)} modules", *table(plan, counts, width), "",
             f"groups: {len(groups)}",
             f"all-reduces per forward: {comm['all-reduce']}{_parts(styles)}",
             f"all-gathers per forward: {comm['all-gather']}",
             _params_summary(ranks, full),
             *(per_rank(ranks, full) if plan.tp > 1 else [])]
    return "\n".join(lines)


def _params_summary(ranks: list[Held], full: Held) -> str:
    """``params_line`` of every rank when they hold alike, else of the largest one, naming it."""
    big = max(range(len(ranks)), key=lambda r: (ranks[r].nbytes, -r))
    line = params_line(ranks[big].numel, full.numel, ranks[big].nbytes, full.nbytes)
    if all(h == ranks[0] for h in ranks):
        return line
    return line.replace("parameters per rank:", f"parameters per rank, at most (rank {big}):", 1) + \
        f"; at least {min(h.numel for h in ranks):,} (uneven split= lines)"


def plan_only(plan: Plan, width: int | None = None) -> str:
    """The table and what the plan says without a model: counts per matched module, not per forward."""
    by_style = Counter(e.style for e in plan.entries)
    patterns = sorted({g for e in plan.entries if (g := group_of(e, e.path))})
    comm = Counter(communication(e) for e in plan.entries)
    full = sum(math.prod(_weight_shape(e)) for e in plan.entries)
    local = [sum(local_numel(e, "weight", _weight_shape(e), plan.tp, r) for e in plan.entries) for r in range(plan.tp)]
    lines = [f"plan for {plan.model or 'a model'} at tp={plan.tp}: {len(plan.entries)} lines "
             f"({', '.join(f'{n} {s}' for s, n in sorted(by_style.items()))})", *table(plan, None, width), "",
             f"group patterns: {len(patterns)} ({', '.join(patterns) or 'none'})",
             f"lines with a forward all-reduce: {comm['all-reduce']}, all-gather: {comm['all-gather']} "
             f"(each once per module it matches)",
             f"planned weights per rank, one module per line: " + (
                 f"{local[0]:,}" if len(set(local)) == 1 else ", ".join(f"rank {r} {n:,}" for r, n in enumerate(local)))
             + f" of {full:,} elements ({max(local) / max(full, 1):.1%}" + ("" if len(set(local)) == 1 else
                                                                            " on the largest rank") + ")",
             "pass --model MODEL to count per forward and per-rank parameter bytes"]
    return "\n".join(lines)


def _parts(styles: Counter) -> str:
    """Where the all-reduces come from, e.g. `` (4 after rowwise layers, 1 after vocabulary lookups)``."""
    whats = (("rowwise", "rowwise layers"), ("vocab", "vocabulary lookups"), ("experts", "experts modules"))
    parts = [f"{styles[s]} after {what}" for s, what in whats if styles[s]]
    return f" ({', '.join(parts)})" if parts else ""


def _weight_shape(e: Entry) -> tuple[int, ...]:
    """The weight a line describes, by its own sizes: [out, in] (``w=in_out``: [in, out]) or [rows, dim]; () when
    it names none (counted as 0 elements)."""
    if e.get("in") and e.get("out"):
        io = (e.ints("in")[0], e.ints("out")[0])
        return io if e.get("w") == "in_out" else io[::-1]
    if e.get("rows") and e.get("dim"):
        return e.ints("rows")[0], e.ints("dim")[0]
    return (0,)


def params_line(n_local: int, n_total: int, b_local: int, b_total: int) -> str:
    """Parameters one rank holds vs the unsharded model, in elements and bytes."""
    return (f"parameters per rank: {n_local:,} of {n_total:,} ({n_local / max(n_total, 1):.1%}), "
            f"{b_local / 2**20:.2f} of {b_total / 2**20:.2f} MiB")
