"""Sharded vs unsharded, inside spawned ranks: the work of ``autotp check`` and ``autotp demo``.

Each rank builds the model with the same seed, keeps an unsharded copy, parallelizes the model and
runs both. A sharded parameter's gradient is compared with the slice of the unsharded gradient that
the rank holds, found from the shapes and the plan line (``seg`` fused segments, ``rep`` holders).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from autotp.api import make_plan, parallelize
from autotp.capture.inputs import call, main_tensor
from autotp.errors import AutoTPError
from autotp.plan import Entry, Plan
from autotp.planner.resolve import resolve
from autotp.split import split_of
from autotp.tools import report, zoo

if TYPE_CHECKING:
    from autotp.runtime.profile import Profile


def local_part(dense: torch.Tensor, shape: torch.Size, e: Entry | None, rank: int, tp: int,
               leaf: str = "") -> torch.Tensor | None:
    """The part of ``dense`` (parameter ``leaf`` of the module of line ``e``) that ``rank`` holds, by the
    plan line (``autotp.split``); None if that is not a tensor of ``shape``."""
    try:
        part = split_of(e, leaf, tp).take(dense, rank)
    except ValueError:
        return None
    return part if part.shape == shape else None


def check_rank(rank: int, world: int, spec: str, plan_text: str | None, seed: int) -> dict:
    """One rank of ``autotp check``: largest differences of output and gradients, or the error met."""
    try:
        return _check(rank, world, spec, plan_text, seed)
    except AutoTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _check(rank: int, world: int, spec: str, plan_text: str | None, seed: int) -> dict:
    loaded = zoo.load(spec, weights=True, seed=seed)
    model, inputs = loaded.model, loaded.example_inputs
    dense = copy.deepcopy(model)
    if plan_text:
        plan = Plan.from_text(plan_text, source="--plan")
    else:
        plan = make_plan(model, world, example_inputs=inputs)
    lines = resolve(dense, plan)
    parallelize(model, world, plan=plan, example_inputs=inputs)
    y_ref, y = main_tensor(call(dense, inputs)), main_tensor(call(model, inputs))
    for out in (y_ref, y):
        out.float().pow(2).mean().backward()
    grad_diff, problems = _grad_diff(model, dense, lines, rank, world)
    grads = [p.grad.abs().max().item() for p in dense.parameters() if p.grad is not None]
    return dict(model=type(dense).__name__, out_diff=(y.detach() - y_ref.detach()).abs().max().item(),
                out_scale=y_ref.detach().abs().max().item(), grad_diff=grad_diff, grad_scale=max(grads, default=0.0),
                problems=problems, params=_params(model, dense))


def _grad_diff(model: nn.Module, dense: nn.Module, lines: dict[str, Entry], rank: int,
               tp: int) -> tuple[float, list[str]]:
    """Largest gradient difference over the parameters this rank holds, and what could not be compared."""
    ref = dict(dense.named_parameters())
    worst, problems = 0.0, []
    for name, p in model.named_parameters():
        r = ref.get(name)
        if r is None or (p.grad is None) != (r.grad is None):
            problems.append(f"parameter {name}: " + ("not in the unsharded model" if r is None else
                                                     "a gradient on one side only"))
            continue
        if p.grad is None:
            continue
        path, _, leaf = name.rpartition(".")
        want = local_part(r.grad, p.grad.shape, lines.get(path), rank, tp, leaf)
        if want is None:
            problems.append(f"parameter {name}: local shape {list(p.shape)} is no slice of {list(r.shape)}")
            continue
        worst = max(worst, (p.grad - want).abs().max().item())
    return worst, problems


def _params(model: nn.Module, dense: nn.Module) -> str:
    """The parameters this rank holds vs the unsharded model, as ``autotp show`` prints its estimate."""
    mine, full = list(model.parameters()), list(dense.parameters())
    return report.params_line(sum(p.numel() for p in mine), sum(p.numel() for p in full),
                              sum(p.numel() * p.element_size() for p in mine),
                              sum(p.numel() * p.element_size() for p in full))


def demo_rank(rank: int, world: int, model_dir: str, sentences: list[str], reps: int, batch: int,
              plan_text: str | None = None) -> dict:
    """One rank of ``autotp demo``: sentence embeddings (mean pooling) of both models, and their forward
    times on ``sentences`` and on ``batch`` rows of them repeated, and the sharded forward's profile.
    ``plan_text``: the plan (made before the ranks started), else ``make_plan``'s."""
    from autotp.runtime.profile import profile  # it imports this module

    tok = zoo.transformers_module().AutoTokenizer.from_pretrained(model_dir)
    model = zoo.load(model_dir, weights=True).model
    dense = copy.deepcopy(model)
    small = dict(tok(sentences, padding=True, return_tensors="pt"))
    large = dict(tok((sentences * batch)[:batch], padding=True, return_tensors="pt"))
    plan = Plan.from_text(plan_text, source="the demo's plan") if plan_text else make_plan(model, world)
    table = report.with_model(plan, dense, resolve(dense, plan), width=140) if rank == 0 else ""
    parallelize(model, world, plan=plan)
    with torch.no_grad():
        emb = {key: _embed(m, small) for key, m in (("dense", dense), ("sharded", model))}
        times = [_side_by_side(dense, model, b, reps) for b in (small, large)]
    split = _split(profile(model, large, reps=reps, warmup=1))
    return dict(table=table, dense=emb["dense"].tolist(), sharded=emb["sharded"].tolist(),  # tensors would not
                params=_params(model, dense), times=times, split=split)  # outlive this process in the queue


def _split(prof: Profile) -> list[str]:
    """Two lines: the sharded forward's compute/communication split, and its range over the groups."""
    groups = prof.forward.groups
    lines = [prof.summary()]
    if groups:
        lines.append(f"  {len(groups)} groups, each {min(g.compute_s for g in groups) * 1e3:.2f}-"
                     f"{max(g.compute_s for g in groups) * 1e3:.2f} ms compute and "
                     f"{min(g.comm_s for g in groups) * 1e3:.2f}-{max(g.comm_s for g in groups) * 1e3:.2f} ms "
                     f"in its all-reduce")
    return lines


def _embed(model: nn.Module, batch: dict) -> torch.Tensor:
    h = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def _side_by_side(dense: nn.Module, model: nn.Module, batch: dict, reps: int) -> tuple[int, float, float]:
    """(rows, unsharded s, sharded s): median forward wall times, the two models alternating, after a warm-up."""
    t: dict[nn.Module, list[float]] = {dense: [], model: []}
    for i in range(reps + 1):
        for m in (dense, model):
            start = time.perf_counter()
            m(**batch)
            if i:
                t[m].append(time.perf_counter() - start)
    return len(batch["input_ids"]), statistics.median(t[dense]), statistics.median(t[model])
