"""Training a parallelized model safely: every rank starts from the same model, and gradient clipping sees the
whole gradient.

``fingerprint`` sums each parameter before it is sharded and ``check_same`` compares the sums, which travel in
``parallelize``'s one agreement all-reduce: ranks that built the model with different seeds would otherwise
each take their slice of another model. ``clip_grad_norm_`` is torch's, with the norm taken over the
tensor-parallel group: each sharded parameter's slices are counted once over the ranks (a block held by ``rep``
ranks once, not ``rep`` times), each replicated parameter once, so every rank clips by the same factor and replicated parameters stay equal.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.errors import GroupError, RankError
from autotp.split import split_of_names


def fingerprinted(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters ``fingerprint`` covers: all but those on the meta device (shard-on-load fills them later
    from one checkpoint)."""
    return [(n, p) for n, p in model.named_parameters() if p.device.type != "meta"]


def fingerprint(named: list[tuple[str, nn.Parameter]]) -> torch.Tensor:
    """Two float64 numbers per parameter, its sum and its sum of squares: what ``parallelize`` shares in its
    agreement step (before the model is sharded) for ``check_same``."""
    if not named:
        return torch.zeros(0, dtype=torch.float64)
    with torch.no_grad():
        return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                            for _, p in named]).reshape(-1)


def check_same(named: list[tuple[str, nn.Parameter]], rows: torch.Tensor, rank: int) -> None:
    """Raise RankError (the same on every rank) naming the first parameter whose fingerprint (``rows[r]``: rank
    ``r``'s) differs between the ranks: ranks that built the model with different seeds would otherwise each
    take their slice of another model."""
    if not named:
        return
    fp = rows.reshape(rows.shape[0], -1, 2)
    tol = 1e-12 * fp.abs().amax(dim=0).clamp_min(1.0)
    differ = ((fp - fp[0]).abs() > tol).any(dim=2)  # (rank, parameter)
    if not differ.any():
        return
    i = int(differ.any(dim=0).nonzero()[0])
    name, p = named[i]
    others = [r for r in range(fp.shape[0]) if differ[r, i]]
    raise RankError(
        f"rank {rank}: parameter '{name}' {list(p.shape)} differs between the ranks (its sum is "
        f"{float(fp[0, i, 0]):.6g} "
        f"on rank 0, {float(fp[others[0], i, 0]):.6g} on rank {others[0]}; ranks {others} differ from rank 0 in "
        f"{int(differ.any(dim=0).sum())} of {len(named)} parameters). Every rank must hold the same model before it "
        f"is sharded: seed identically before building it (torch.manual_seed(0) on every rank), or load the same "
        f"weights (autotp.from_pretrained).")


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0, *, group: Any = None,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of a parallelized ``model`` in place by their total norm over the whole model.

    The same as ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` on the unsharded model: the norm
    counts each sharded parameter's slices on all ranks once and each replicated parameter once, so every
    rank scales by the same factor. Returns the total norm (the same on every rank).

    >>> loss.backward()  # doctest: +SKIP
    >>> autotp.clip_grad_norm_(model, 1.0)  # doctest: +SKIP
    >>> optimizer.step()  # doctest: +SKIP
    """
    plan = getattr(model, "_autotp_plan", None)
    if plan is None:
        raise GroupError("autotp.clip_grad_norm_ takes a model returned by autotp.parallelize (or from_pretrained); "
                         "for an unsharded model use torch.nn.utils.clip_grad_norm_")
    norm_type = float(norm_type)
    sharded, whole = _grads_by_split(model, plan)
    grads = [g for g, _ in sharded] + whole
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    if math.isinf(norm_type):
        local = torch.stack([g.detach().abs().max().float() for g in grads]).max() if grads else torch.zeros(())
        total = local.to(device)
        if plan.tp > 1 and dist.is_initialized():
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
    else:
        zero = torch.zeros((), device=device)
        part = sum((g.detach().float().abs().pow(norm_type).sum() / rep for g, rep in sharded), zero)
        total = part.clone()
        if plan.tp > 1 and dist.is_initialized():
            dist.all_reduce(total, group=group)  # the sharded parameters' share of every rank
        total = total + sum((g.detach().float().abs().pow(norm_type).sum() for g in whole), zero)
        total = total.pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot be "
                           f"clipped; pass error_if_nonfinite=False to clip anyway")
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


def _grads_by_split(model: nn.Module, plan) -> tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]:
    """(sharded gradients with the number of ranks holding each block, replicated gradients); a tied
    parameter once."""
    lines = plan.resolve(dict(model.named_modules()).keys(), type(model).__name__)
    sharded: list[tuple[torch.Tensor, int]] = []
    whole: list[torch.Tensor] = []
    names: dict[int, list[str]] = {}  # a tensor under several names: split by the line that shards it
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for _, p in _unique(model.named_parameters()):
        if p.grad is None:
            continue
        split = split_of_names(names[id(p)], lines, plan.tp)
        if split.dim is None:
            whole.append(p.grad)
        else:
            sharded.append((p.grad, split.rep))
    return sharded, whole


def _unique(named: Iterable[tuple[str, nn.Parameter]]) -> Iterable[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    for n, p in named:
        if id(p) not in seen:
            seen.add(id(p))
            yield n, p
