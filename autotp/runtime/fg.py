"""The f and g of Megatron's column -> row groups, as autograd functions over ``collectives``: f (identity forward,
all-reduce of the gradient backward; one per input tensor a group reads, ``CopyCache``), g (all-reduce forward,
identity backward), and the all-gather of a gathered head (this rank's slice of the gradient backward)."""
from __future__ import annotations

import weakref

import torch

from autotp.runtime.collectives import all_gather_last, all_reduce


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, rank, tp, widths):
        ctx.n, ctx.offset = x.shape[-1], sum(widths[:rank]) if widths is not None else rank * x.shape[-1]
        return all_gather_last(x, group, tp, widths)

    @staticmethod
    def backward(ctx, grad):  # this rank's piece: at its offset, its width
        return grad.narrow(-1, ctx.offset, ctx.n), None, None, None, None


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
    def forward(ctx, x, group, owned):
        y = all_reduce(x, group, "forward", owned=owned)
        if y is x:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


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


def reduce_from_tp(x: torch.Tensor, group, *, owned: bool = False) -> torch.Tensor:
    """g: all-reduce forward, identity backward. ``owned``: ``x`` is the caller's fresh tensor (a layer's
    own matmul output), summed in place."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ReduceFromTP.apply(x, group, owned)
    return all_reduce(x, group, "forward", owned=owned)


def gather_from_tp(x: torch.Tensor, group, rank: int, tp: int, widths: tuple[int, ...] | None = None) -> torch.Tensor:
    """:func:`all_gather_last` forward, this rank's slice of the gradient backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _GatherFromTP.apply(x, group, rank, tp, widths)
    return all_gather_last(x, group, tp, widths)
