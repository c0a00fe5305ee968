"""Megatron's f/g pair as autograd functions over functional collectives.

``copy_to_tp``   (f): identity forward, all-reduce of the gradient backward.
``reduce_from_tp`` (g): all-reduce forward, identity backward.
``gather_from_tp``: all-gather of the last dim forward, this rank's slice of the gradient backward.

Every collective goes through :func:`all_reduce`, which counts calls so tests and the
profiler can assert exactly how much communication a forward/backward costs.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

COUNTS: Counter = Counter()
TIMES: Counter = Counter()
_DRY = [False]
_TIMING = [False]


@contextlib.contextmanager
def dry_run():
    """Skip every collective (shape checks on meta/fake tensors)."""
    old, _DRY[0] = _DRY[0], True
    try:
        yield
    finally:
        _DRY[0] = old


@contextlib.contextmanager
def timed():
    """Record wall time spent in collectives into ``TIMES`` (synchronous; for profiling)."""
    old, _TIMING[0] = _TIMING[0], True
    try:
        yield
    finally:
        _TIMING[0] = old


def is_dry() -> bool:
    return _DRY[0]


def reset_counts() -> None:
    COUNTS.clear()
    TIMES.clear()


def all_reduce(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """Sum ``x`` over ``group``; ``phase`` ('forward'/'backward') is what gets counted."""
    if _DRY[0] or x.device.type == "meta":
        return x
    COUNTS[f"all_reduce.{phase}"] += 1
    COUNTS[f"bytes.{phase}"] += x.numel() * x.element_size()
    t0 = time.perf_counter() if _TIMING[0] else 0.0
    out = funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))
    if _TIMING[0]:
        TIMES[phase] += time.perf_counter() - t0
    return out


def all_gather_last(x: torch.Tensor, group, tp: int) -> torch.Tensor:
    """Concatenate the ``tp`` ranks' ``x`` along its last dim (rank order)."""
    if _DRY[0] or x.device.type == "meta":  # shape checks: the gathered shape, no data
        return x.repeat(*([1] * (x.dim() - 1)), tp)
    COUNTS["all_gather.forward"] += 1
    COUNTS["bytes.forward"] += x.numel() * x.element_size() * tp
    t0 = time.perf_counter() if _TIMING[0] else 0.0
    out = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), x.dim() - 1, group))
    if _TIMING[0]:
        TIMES["forward"] += time.perf_counter() - t0
    return out


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank, tp):
        ctx.n, ctx.rank = x.shape[-1], rank
        return all_gather_last(x, group, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.n, ctx.n), None, None, None


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group, "backward"), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class CopyCache:
    """One f per input tensor: column layers that read the same tensor share its f.

    q, k and v (or gate and up) all read one normalized hidden state; autograd sums
    their partial input-gradients into the shared f's output before f's backward runs,
    so a group costs one backward all-reduce, not one per column layer.
    """

    def __init__(self) -> None:
        self._src: weakref.ref | None = None
        self._out: torch.Tensor | None = None  # held until the group's row layer clears it
        self._group = None

    def get(self, x: torch.Tensor, group) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x
        src = self._src() if self._src is not None else None
        if src is x and self._out is not None and self._group is group:
            return self._out
        out = _CopyToTP.apply(x, group)
        self._src, self._out, self._group = weakref.ref(x), out, group
        return out

    def clear(self) -> None:
        self._src = self._out = None


def copy_to_tp(x: torch.Tensor, group, cache: CopyCache | None = None) -> torch.Tensor:
    if cache is not None:
        return cache.get(x, group)
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReduceFromTP.apply(x, group)
    return all_reduce(x, group, "forward")


def gather_from_tp(x: torch.Tensor, group, rank: int, tp: int) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherFromTP.apply(x, group, rank, tp)
    return all_gather_last(x, group, tp)


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)
