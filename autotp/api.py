"""Public entry points: make_plan and parallelize."""
from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from . import blocks, collectives, shm
from .errors import CaptureError, GroupError, PlanMismatchError, RewriteError
from .hf import default_inputs
from .localize import install, trace_localized
from .plan import Entry, Plan, compress, glob_of, glob_regex, load_plan, summarize
from .planner import Analysis, plan_graph
from .ranks import all_ranks, group_size
from .rewrite import apply_patches, resolve, slice_inputs, sum_grads, swap_layers
from .trace import Captured, capture, meta_copy

log = logging.getLogger(__name__)

AGREE_S = 600.0  # how long a rank that finished parallelize waits for the others to finish theirs


def make_plan(model: nn.Module, tp: int, *, example_inputs: Any = None, strict: bool = True,
              reuse_blocks: bool = True) -> Plan:
    """Analyse ``model`` (no process group, no weights touched; meta models work) and return its Plan.

    ``reuse_blocks``: plan repeated blocks once (see ``autotp.blocks``); the plan is the same as
    planning every block, in a fraction of the time for deep models.

    >>> plan = make_plan(MyModel(cfg), 2, example_inputs=(torch.randint(0, 100, (2, 16)),))  # doctest: +SKIP
    >>> plan.save("my_model.tp2.plan")  # doctest: +SKIP
    """
    cuts = blocks.find_cuts(model) if reuse_blocks else []
    if cuts:
        plan = _plan_cut(model, tp, cuts, example_inputs=example_inputs, strict=strict)
        if plan is not None:
            return plan
    return analyse(model, tp, example_inputs=example_inputs, strict=strict).plan


def _plan_cut(model: nn.Module, tp: int, cuts: list[blocks.Cut], *, example_inputs: Any, strict: bool) -> Plan | None:
    """Plan ``model`` cut to the block prefixes of ``cuts`` and extend the plan; None if that is not sound."""
    with blocks.cut(model, cuts) as short:
        try:
            a = analyse(short, tp, example_inputs=example_inputs, strict=strict)
        except CaptureError as e:
            log.info("autotp: planning every block (the model cut to %s cannot be captured: %s)",
                     [f"{c.path}[:{c.keep}]" for c in cuts], str(e)[:200])
            return None
    why = blocks.consistent(a.entries, cuts)
    if why is not None:
        log.info("autotp: planning every block (%s)", why)
        return None
    entries = blocks.extend(a.entries, cuts)

    def weight(path: str) -> int:
        return max([c.weight(i) for c in cuts if (i := c.block_of(path)) is not None] or [1])

    groups = sum(weight(cols[0].module) for cols, _ in a.groups)
    summary = summarize(groups, sum(1 for e in entries if e.style == "rowwise"),
                        sum(1 for e in entries if e.style == "vocab"),
                        sum(1 for e in entries if e.style == "colwise" and e.get("gather") == "1"),
                        sum(len(e.get("p").split(",")) for e in entries if e.style == "sum_grad"))
    return replace(a.plan, entries=tuple(compress(entries)), summary=summary)


def analyse(model: nn.Module, tp: int, *, example_inputs: Any = None, strict: bool = True) -> Analysis:
    """make_plan, keeping the analysis (layouts per node) for checks and tests."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    example_inputs = default_inputs(model, example_inputs)
    c = capture(model, example_inputs)
    a = plan_graph(c, tp, model=type(model).__name__, strict=strict)
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


def verify(model: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> list[tuple[str | None, str]]:
    """Rewrite a meta copy at local shapes, capture it again and compare every shape with the plan."""
    m = meta_copy(model)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # a failing candidate logs a traceback there
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return _verify(model, m, a, c, example_inputs)
    finally:
        quiet.setLevel(level)


def _verify(model: nn.Module, m: nn.Module, a: Analysis, c: Captured, example_inputs: Any) -> list:
    with collectives.dry_run():
        try:
            _apply(m, a.plan, rank=0, tp=a.plan.tp, group=None, example_inputs=example_inputs)
            c2 = capture(m, example_inputs)
        except (CaptureError, RewriteError, RuntimeError, TypeError) as e:
            return [(None, str(e).splitlines()[0][:300])]
    swapped = {s.module for s in a.sites.values()} | {lk.module for lk in a.lookups}
    sliced = [glob_regex(e.path) for e in a.plan.entries if e.style == "slice"]
    return _compare(c, c2, a.layouts, swapped, a.plan.tp, sliced)


# ops a capture may drop when they do nothing at local shapes (e.g. contiguous() of one head)
_MAYBE_NOOP = {torch.ops.aten.contiguous.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default,
               torch.ops.aten.detach.default}


def _compare(c: Captured, c2: Captured, layouts: dict, swapped: set[str], tp: int,
             sliced: list | None = None) -> list[tuple[str, str]]:
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
            problems.append((owner, f"module '{owner}' runs different ops after sharding"))
            continue
        for n, m in pairs:
            want = list(c.shape(n))
            lay = layouts.get(n)
            if lay is not None and not isinstance(lay, list):
                want = lay.local(want, tp)
            if list(c2.shape(m)) != want:
                problems.append((owner, f"{n.format_node()} in '{owner}': local shape {list(c2.shape(m))}, "
                                        f"expected {want}"))
    return problems


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
    import difflib

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


def _apply(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any, example_inputs: Any) -> nn.Module:
    resolved = resolve(model, plan)
    local_paths = [p for p, e in resolved.items() if e.style == "localize"]
    inputs = {}
    if local_paths:
        if example_inputs is None:
            raise PlanMismatchError(f"the plan rewrites the forward of {local_paths} (localize), which needs "
                                    f"example_inputs: pass parallelize(..., example_inputs=(x,))")
        dense = meta_copy(model)
        inputs = _module_inputs(dense, local_paths, example_inputs)
    swap_layers(model, resolved, rank=rank, tp=tp, group=group)
    slice_inputs(model, plan, rank=rank, tp=tp, group=group)
    apply_patches(model, resolved)
    sum_grads(model, resolved, group)
    for p in local_paths:
        mod = model.get_submodule(p)
        local = meta_copy(mod)
        graphs = {}
        for mode in (True, False):
            was = mod.training
            for x in (mod, local, dense.get_submodule(p)):
                x.train(mode)
            try:
                graphs[mode], _ = trace_localized(mod, dense.get_submodule(p), local, *inputs[p], tp)
            finally:
                for x in (mod, local, dense.get_submodule(p)):
                    x.train(was)
        install(mod, graphs)
    return model


def _module_inputs(dense_meta: nn.Module, paths: list[str], example_inputs: Any) -> dict[str, tuple]:
    got: dict[str, tuple] = {}
    hooks = [dense_meta.get_submodule(p).register_forward_pre_hook(
        (lambda p: lambda m, a, k: got.setdefault(p, _concrete_meta((a, k))))(p), with_kwargs=True) for p in paths]
    try:  # inside a capture, so model code that branches on values sees a tracer, not a meta tensor
        capture(dense_meta, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p in paths if p not in got]
    if missing:
        raise RewriteError(f"modules {missing} were not called by the model's forward on example_inputs")
    return got


def _concrete_meta(x: Any) -> Any:
    """Tensors seen during a capture (fake) as plain meta tensors of the same shape."""
    if isinstance(x, torch.Tensor):
        return torch.empty(tuple(int(d) for d in x.shape), dtype=x.dtype, device="meta")
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_concrete_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _concrete_meta(v) for k, v in x.items()}
    return x


def _check_given(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    """A plan passed in (edited, imported) is checked against the model's graph before any weight is
    touched; a model that cannot be captured gets it unchecked (the documented way around capture)."""
    from .validate import check_plan  # validate uses verify from this module

    try:
        check_plan(model, plan, example_inputs=example_inputs)
    except CaptureError as e:
        log.warning("autotp: applying the plan unchecked: %s", str(e).splitlines()[0][:300])


def parallelize(model: nn.Module, tp: int | None = None, *, plan: Plan | str | Path | None = None,
                example_inputs: Any = None, group: Any = None) -> nn.Module:
    """Shard ``model`` in place over ``group`` (default: the world) and return it.

    A ``plan`` passed in is checked first (``autotp.validate.check_plan``): one that would change
    the model's numbers is refused with PlanMismatchError, naming each wrong line and the fix.

    >>> model = autotp.parallelize(model, tp=2, example_inputs=(x,))  # doctest: +SKIP
    >>> y = model(x)  # same numbers as the unsharded model, on every rank  # doctest: +SKIP
    """
    if not dist.is_available() or not dist.is_initialized():
        if tp == 1 or (isinstance(plan, Plan) and plan.tp == 1):
            return model
        raise GroupError("no process group is initialized: call torch.distributed.init_process_group("
                         "'gloo' or 'nccl') first (torchrun sets the environment), or pass tp=1")
    group, tp = group_size(group, tp)
    rank = dist.get_rank(group)
    with all_ranks(group if tp > 1 else None, "parallelize", AGREE_S):  # an error on one rank stops every rank
        example_inputs = default_inputs(model, example_inputs)
        if isinstance(plan, (str, Path)):
            plan = load_plan(plan)
        given = plan is not None
        if plan is None:
            plan = make_plan(model, tp, example_inputs=example_inputs)
        if plan.tp != tp:
            raise PlanMismatchError(f"the plan is for tp={plan.tp}, the group has {tp} ranks; "
                                    f"make a plan for tp={tp} with autotp.make_plan(model, {tp})")
        if given and tp > 1:
            _check_given(model, plan, example_inputs)
        if tp > 1:
            _apply(model, plan, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
    if tp > 1 and shm.wanted():
        collectives.use_shared_memory(group)
    model._autotp_plan = plan  # what autotp.save_sharded writes beside the local weights
    if rank == 0:
        n = sum(1 for e in plan.entries if e.style in ("colwise", "rowwise"))
        log.info("autotp: %s parallelized at tp=%d (%d plan lines shard modules; %s)", type(model).__name__, tp, n,
                 "; ".join(plan.summary))
    return model
