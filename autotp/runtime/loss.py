"""Vocabulary-parallel cross-entropy: the logits stay sharded by vocabulary, never gathered.

Inside :func:`loss_parallel`, a head the plan all-gathers (``colwise ... gather=1``) returns its rank's slice of
the logits as a DTensor sharded on the last dim instead of B x T x V gathered on every rank. Then

- :func:`cross_entropy` (``autotp.cross_entropy``) computes the loss from the slices with one all-gather of
  four numbers per row (each rank's max, sum of exponentials, target logit and sum of logits), on autotp's own
  transports and counted; backward needs no communication (each rank's slice of the softmax from the global
  log-sum-exp);
- ``torch.nn.functional.cross_entropy`` on such logits (transformers' own loss when ``labels=`` is passed) runs
  under torch's ``loss_parallel``, DTensor's vocabulary-parallel loss.

Both give torch's ``cross_entropy`` numbers: ``ignore_index``, ``label_smoothing``, ``reduction``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from autotp.runtime.collectives import NO_COMM, all_gather_last, mesh_of

SHARDED_LOGITS = [False]  # inside loss_parallel(): gathered heads return their slice as a DTensor


@contextlib.contextmanager
def loss_parallel() -> Iterator[None]:
    """Logits of gathered heads stay sharded by vocabulary inside the block (forward and backward belong inside).

    >>> with autotp.loss_parallel():  # doctest: +SKIP
    ...     loss = autotp.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten())
    ...     loss.backward()
    """
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

    was, SHARDED_LOGITS[0] = SHARDED_LOGITS[0], True
    try:
        with torch_loss_parallel():
            yield
    finally:
        SHARDED_LOGITS[0] = was


def sharded_logits(y: torch.Tensor, group: Any, rank: int, tp: int, widths: tuple[int, ...] | None) -> Any:
    """A head's local logits as the DTensor they are a slice of (``Shard(-1)``)."""
    from torch.distributed.tensor import DTensor, Shard

    full = (*y.shape[:-1], sum(widths) if widths else y.shape[-1] * tp)
    if widths is not None and list(widths) != [t.shape[-1] for t in torch.empty(full[-1], device="meta").chunk(tp)]:
        raise ValueError(f"loss_parallel: this head's vocabulary is split {list(widths)}, which DTensor's shards "
                         f"(torch.chunk's) cannot express; plan at a tp that divides the vocabulary ({full[-1]}), "
                         f"or compute the loss outside loss_parallel()")
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(y, mesh_of(group), [Shard(y.dim() - 1)], run_check=False, shape=torch.Size(full),
                              stride=stride)


def cross_entropy(logits: Any, target: torch.Tensor, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    """``torch.nn.functional.cross_entropy(logits, target, ...)`` for logits of shape (N, V), sharded by
    vocabulary (inside :func:`loss_parallel`) or whole. Returns a plain tensor, the same on every rank."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits, DTensor):
        return F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                               reduction=reduction)
    if logits.dim() != 2 or list(logits.placements) != [Shard(1)]:
        raise ValueError(f"autotp.cross_entropy takes (N, V) logits sharded by vocabulary; got shape "
                         f"{list(logits.shape)} with placements {list(logits.placements)}: flatten the positions "
                         f"first, logits.flatten(0, -2)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}: use 'mean', 'sum' or 'none', as torch's cross_entropy")
    group = logits.device_mesh.get_group()
    tp, rank = logits.device_mesh.size(), logits.device_mesh.get_local_rank()
    local = logits.to_local()
    sizes = [t.shape[-1] for t in torch.empty(logits.shape[-1], device="meta").chunk(tp)]
    start = sum(sizes[:rank])
    loss = _VocabCE.apply(local, target, group, tp, start, logits.shape[-1], ignore_index, label_smoothing)
    keep = target != ignore_index
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / keep.sum()


class _VocabCE(torch.autograd.Function):
    """Per-row loss from each rank's (N, V_r) slice: one all-gather of (max, sum exp, target logit, sum) per row."""

    @staticmethod
    def forward(ctx, z, target, group, tp, start, vocab, ignore_index, eps):
        dtype, z = z.dtype, z.float()
        m = z.max(-1, keepdim=True).values
        e = (z - m).exp()
        s = e.sum(-1, keepdim=True)
        keep = target != ignore_index
        t = (target - start).clamp(0, z.shape[-1] - 1)
        mine = keep & (target >= start) & (target < start + z.shape[-1])
        zt = z.gather(-1, t.unsqueeze(-1)) * mine.unsqueeze(-1)
        stats = torch.cat([m, s, zt, z.sum(-1, keepdim=True)], -1)  # (N, 4)
        every = all_gather_last(stats, group, tp) if group is not NO_COMM and tp > 1 else stats
        every = every.unflatten(-1, (tp, 4))
        ms, ss = every[..., 0], every[..., 1]
        big = ms.max(-1, keepdim=True).values
        lse = big.squeeze(-1) + (ss * (ms - big).exp()).sum(-1).log()
        target_logit, total = every[..., 2].sum(-1), every[..., 3].sum(-1)
        loss = (1 - eps) * (lse - target_logit) + eps * (lse - total / vocab)
        loss = loss * keep
        ctx.save_for_backward(z, lse, t, mine, keep)
        ctx.eps, ctx.vocab, ctx.dtype = eps, vocab, dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        z, lse, t, mine, keep = ctx.saved_tensors
        grad = (z - lse.unsqueeze(-1)).exp()  # this rank's slice of the softmax
        grad = grad - ctx.eps / ctx.vocab
        grad.scatter_add_(-1, t.unsqueeze(-1), -(1 - ctx.eps) * mine.unsqueeze(-1).to(grad.dtype))
        grad = grad * (g * keep).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None, None, None
