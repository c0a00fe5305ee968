"""Public entry points: make_plan and parallelize."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.nn as nn

from autotp import pieces
from autotp.capture.export import capture
from autotp.capture.inputs import default_inputs
from autotp.errors import AutoTPError, CaptureError, GroupError, PlanMismatchError, report
from autotp.plan import Plan, compress, glob_of, line_path, load_plan, summarize
from autotp.planner import blocks
from autotp.planner.check import check_graph, needs_translation_check
from autotp.planner.groups import Analysis, plan_graph
from autotp.planner.resolve import resolve, resolve_slices
from autotp.runtime import backstop, collectives
from autotp.runtime.apply import apply_plan
from autotp.runtime.fixups import Unproven, fix_sizes, unproven_layers
from autotp.runtime.ranks import all_ranks, check_tp, group_size
from autotp.runtime.training import check_same, fingerprint, fingerprinted
from autotp.runtime.transports import shm
from autotp.runtime.verify import verify

SHOWN = 8  # problems listed in one error

log = logging.getLogger(__name__)

AGREE_S = 600.0  # how long a rank that finished parallelize waits for the others to finish theirs


def make_plan(model: nn.Module, tp: int, *, example_inputs: Any = None, strict: bool = True,
              reuse_blocks: bool = False) -> Plan:
    """Analyse ``model`` (no process group, no weights touched; meta models work) and return its Plan.

    ``reuse_blocks``: plan repeated blocks once (see ``autotp.planner.blocks``) and extend the plan to the
    rest; the extended plan is then proven on the whole model's graph (``check_plan``), and where the model
    treats a later block differently (a parent loop that does more for its last block) every block is planned.
    Off by default: the proof needs the whole model's graph, and costs about as much as planning every block
    (``bench/plan_scale.py``).

    >>> plan = make_plan(MyModel(cfg), 2, example_inputs=(torch.randint(0, 100, (2, 16)),))  # doctest: +SKIP
    >>> plan.save("my_model.tp2.plan")  # doctest: +SKIP
    """
    _check_args(model, tp, "make_plan")
    example_inputs = default_inputs(model, example_inputs)
    cuts = blocks.find_cuts(model) if reuse_blocks and tp > 1 else []
    plan = _plan_cut(model, tp, cuts, example_inputs=example_inputs, strict=strict) if cuts else None
    if plan is not None:
        try:
            check_plan(model, plan, example_inputs=example_inputs)
            return plan
        except PlanMismatchError as e:
            log.info("autotp: planning every block (the plan of the repeated blocks does not hold for the whole "
                     "model: %s)", str(e).replace("\n", " ")[:300])
        except CaptureError as e:
            log.warning("autotp: the plan of the repeated blocks is unchecked (the whole model cannot be "
                        "captured: %s)", str(e).splitlines()[0][:300])
            return plan
    return plan_all(model, tp, example_inputs=example_inputs, strict=strict)


def plan_all(model: nn.Module, tp: int, *, example_inputs: Any, strict: bool = True,
             blocked: dict[str, str] | None = None) -> Plan:
    """``analyse``'s plan, or where the model cannot be captured whole, the plan put together from its
    capturable modules (``autotp.pieces``); ``blocked``: modules to keep whole, with the reason."""
    blocked = blocked or {}
    try:
        return analyse(model, tp, example_inputs=example_inputs, strict=strict, blocked=blocked).plan
    except CaptureError as e:
        if tp == 1 or not pieces.possible(model, e):
            raise

        def within(path: str) -> dict[str, str]:
            return {k[len(path) + 1:]: v for k, v in blocked.items() if k.startswith(path + ".")}

        return pieces.plan_by_pieces(model, tp, example_inputs, e, reuse=lambda path: tuple(sorted(within(path))),
                                     plan_one=lambda m, inputs, path: analyse(m, tp, example_inputs=inputs,
                                                                              strict=strict, blocked=within(path)).plan)


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
    return replace(a.plan, entries=tuple(compress(entries, [n for n, _ in model.named_modules()])), summary=summary)


def analyse(model: nn.Module, tp: int, *, example_inputs: Any = None, strict: bool = True,
            blocked: dict[str, str] | None = None) -> Analysis:
    """make_plan, keeping the analysis (layouts per node) for checks and tests. ``blocked``: modules to keep
    whole, with the reason the plan gives."""
    _check_args(model, tp, "make_plan")
    example_inputs = default_inputs(model, example_inputs)
    c = capture(model, example_inputs)
    blocked = dict(blocked or {})
    while True:  # each round replicates the groups the translation check refused, with its reason
        try:
            a = plan_graph(c, tp, model=type(model).__name__, strict=strict, blocked=blocked,
                           modules=[n for n, _ in model.named_modules()])
        except AutoTPError:
            raise
        except Exception as e:  # noqa: BLE001 - the planner reads a graph: anything else is a bug in it
            raise report(f"planning {type(model).__name__} at tp={tp} failed", e, model=model,
                         graph=c.graph) from e
        try:
            return fix_sizes(model, a, c, example_inputs)
        except Unproven as e:
            more = {k: v for k, v in unproven_layers(a, e.problems).items() if k not in blocked}
            if not more:
                raise report(f"the sharded {type(model).__name__} would compute other numbers, and no group is "
                             f"left to replicate: {str(e)[:400]}", None, plan=a.plan.to_text(), model=model) from None
            log.info("autotp: replicating %d layers the translation check refused: %s", len(more),
                     next(iter(more.values())))
            blocked.update(more)


def check_plan(model: nn.Module, plan: Plan | str | Path, *, example_inputs: Any = None) -> Analysis:
    """Refuse ``plan`` if sharding ``model`` with it would change the model's numbers.

    Raises PlanMismatchError listing each offending line, why and the fix; returns the analysis
    (layouts per node) of a plan that passes. Needs a capturable model (meta models work).

    >>> check_plan(model, autotp.load_plan("edited.plan"))  # doctest: +SKIP
    """
    _check_args(model, 1, "check_plan")
    plan = load_plan(plan) if isinstance(plan, (str, Path)) else plan
    example_inputs = default_inputs(model, example_inputs)
    resolved = resolve(model, plan)
    c = capture(model, example_inputs)
    try:
        a, problems = check_graph(c, plan, resolved, resolve_slices(model, plan))
    except AutoTPError:
        raise
    except Exception as e:  # noqa: BLE001 - the checker reads a graph: anything else is a bug in it
        raise report(f"checking a plan against {type(model).__name__} failed", e, plan=plan.to_text(), model=model,
                     graph=c.graph) from e
    if not problems and needs_translation_check(plan):
        for owner, msg, _ in verify(model, a, c, example_inputs):
            what = f"module '{line_path(glob_of(owner))}': {msg}" if owner is not None else \
                f"the sharded model does not run: {msg.split(' Fix:')[0].rstrip('.')}"
            problems.append(f"{what}. Its code uses global sizes along a sharded dim: the plan needs a 'patch' or "
                            f"'localize' line for it, or that group replicated (autotp.make_plan does either)")
    if problems:
        probs = list(dict.fromkeys(problems))
        more = f"\n  ... and {len(probs) - SHOWN} more" if len(probs) > SHOWN else ""
        raise PlanMismatchError(f"this plan would not give the unsharded numbers on {type(model).__name__} at "
                                f"tp={plan.tp}:\n  " + "\n  ".join(probs[:SHOWN]) + more)
    return a


def _check_args(model: Any, tp: Any, fn: str) -> None:
    """A model that is an ``nn.Module`` and a tp that is a positive int (``parallelize`` also takes None)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"{fn}: model is {type(model).__name__}, not a torch.nn.Module. Fix: pass the module "
                           f"(wrap a function in an nn.Module whose forward calls it)")
    if tp is None and fn != "parallelize":
        raise GroupError(f"{fn} needs tp, the number of ranks to plan for (e.g. {fn}(model, 2, ...))")
    check_tp(tp)


def _check_given(model: nn.Module, plan: Plan, example_inputs: Any) -> None:
    """A plan passed in (edited, imported) is checked against the model's graph before any weight is
    touched; a model that cannot be captured gets it unchecked (the documented way around capture)."""
    try:
        check_plan(model, plan, example_inputs=example_inputs)
    except CaptureError as e:
        log.warning("autotp: applying the plan unchecked: %s", str(e).splitlines()[0][:300])


def parallelize(model: nn.Module, tp: int | None = None, *, plan: Plan | str | Path | None = None,
                example_inputs: Any = None, group: Any = None, check: bool | None = None) -> nn.Module:
    """Shard ``model`` in place over ``group`` (default: the world) and return it.

    Every plan is proven on the whole model's graph before any weight is touched: ``make_plan``'s (which
    checks a plan extended from repeated blocks), and one passed in (``check_plan``): one that would change the
    model's numbers is refused with PlanMismatchError, naming each wrong line and the fix.

    ``check``: also try the plan's numbers before sharding (``runtime.backstop``): one forward and backward of
    the model and of a sharded copy on the capture inputs, outputs and every gradient compared. A group that
    disagrees is replicated with the reason in the plan (a plan passed in is refused instead). Default (None):
    on for models with real parameters of at most 512 MB; True/False force it.

    >>> model = autotp.parallelize(model, tp=2, example_inputs=(x,))  # doctest: +SKIP
    >>> y = model(x)  # same numbers as the unsharded model, on every rank  # doctest: +SKIP
    """
    _check_args(model, tp, "parallelize")
    done = getattr(model, "_autotp_plan", None)
    if done is not None and done.tp > 1:
        raise PlanMismatchError(f"{type(model).__name__} is already parallelized (at tp={done.tp}): its layers hold "
                                f"this rank's slices. Fix: use it as it is, or parallelize a fresh unsharded copy "
                                f"(built, or loaded, before any parallelize)")
    if not dist.is_available() or not dist.is_initialized():
        if tp == 1 or (isinstance(plan, Plan) and plan.tp == 1):
            return model
        raise GroupError("no process group is initialized: call torch.distributed.init_process_group("
                         "'gloo' or 'nccl') first (torchrun sets the environment), or pass tp=1")
    group, tp = group_size(group, tp)
    rank = dist.get_rank(group)
    agree = group if tp > 1 else None  # an error on one rank stops every rank, at the end of each step
    named = fingerprinted(model) if tp > 1 else []
    with all_ranks(agree, "parallelize (planning)", AGREE_S, width=2 * len(named)) as step:
        step.share = fingerprint(named)  # compared before any weight is touched
        given = plan is not None
        plan, example_inputs = plan_for(model, tp, plan, example_inputs)
    check_same(named, step.rows, rank)
    if tp > 1 and backstop.wanted(model, check):
        with all_ranks(agree, "parallelize (numerical check)", AGREE_S):
            plan = _tried(model, plan, given=given, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
    with all_ranks(agree, "parallelize (sharding)", AGREE_S):
        shard(model, plan, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
    if tp > 1 and shm.wanted():
        collectives.use_shared_memory(group)
    return model


def _tried(model: nn.Module, plan: Plan, *, given: bool, rank: int, tp: int, group: Any, example_inputs: Any) -> Plan:
    """``plan`` once the numerical check passes: groups it blames are replicated and the model planned again
    (collective; every rank decides alike). A plan passed in that fails is refused."""
    blocked: dict[str, str] = {}
    while True:
        try:
            backstop.check(model, plan, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
            return plan
        except backstop.Mismatch as e:
            if not given and (not e.modules or all(m in blocked for m in e.modules)):  # autotp's own plan
                raise report(f"the plan autotp made would not give the unsharded numbers on {type(model).__name__}: "
                             f"{e.why}; parallelize(check=False) skips this check", None, plan=plan.to_text(),
                             model=model) from None
            if given:
                raise PlanMismatchError(f"the plan would not give the unsharded numbers on {type(model).__name__}: "
                                        f"{e.why}. Fix: replicate that group (make its lines 'replicate'), or let "
                                        f"autotp.make_plan choose; parallelize(check=False) skips this check") from None
            if rank == 0:
                log.warning("autotp: replicating %d layers: %s", len(e.modules), e.why)
            blocked.update(e.modules)
            plan = plan_all(model, tp, example_inputs=example_inputs, blocked=blocked)


def plan_for(model: nn.Module, tp: int, plan: Plan | str | Path | None, example_inputs: Any) -> tuple[Plan, Any]:
    """(the plan ``parallelize`` applies, the capture inputs): ``make_plan``'s, or the given one, checked. Local
    to this rank: the callers agree (``runtime.ranks.all_ranks``) around it."""
    example_inputs = default_inputs(model, example_inputs)
    if isinstance(plan, (str, Path)):
        plan = load_plan(plan)
    given = plan is not None
    if plan is None:
        plan = make_plan(model, tp, example_inputs=example_inputs)  # proven on the whole model's graph
    if plan.tp != tp:
        raise PlanMismatchError(f"the plan is for tp={plan.tp}, the group has {tp} ranks; "
                                f"make a plan for tp={tp} with autotp.make_plan(model, {tp})")
    if given and tp > 1:
        _check_given(model, plan, example_inputs)
    return plan, example_inputs


def shard(model: nn.Module, plan: Plan, *, rank: int, tp: int, group: Any, example_inputs: Any) -> None:
    """Swap ``model``'s layers by ``plan`` on this rank (local: the callers agree around it)."""
    if tp > 1:
        apply_plan(model, plan, rank=rank, tp=tp, group=group, example_inputs=example_inputs)
    model._autotp_plan = plan  # what autotp.save_sharded writes beside the local weights
    if rank == 0:
        n = sum(1 for e in plan.entries if e.style in ("colwise", "rowwise"))
        log.info("autotp: %s parallelized at tp=%d (%d plan lines shard modules; %s)", type(model).__name__, tp, n,
                 "; ".join(plan.summary))
