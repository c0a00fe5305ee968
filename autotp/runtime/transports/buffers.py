"""Large CPU outputs (gathered logits) whose memory is handed out again once nothing references it.

The allocator returns a buffer of more than 32 MB to the kernel when it is freed, so the next one is
mapped page by page as it is first written. For the full logits of a Llama forward at batch 4 x 256
(131 MB) that mapping cost four times the copy that fills the buffer. The last such buffer is kept
here, and its memory is handed out again only when no tensor but this cache references its storage
(the storage's use count): logits a caller still holds, a view of them, or a tensor autograd saved
are never written over.
"""
from __future__ import annotations

import math

import torch

MIN_BYTES = 32 << 20  # smaller buffers come from the allocator's heap, already mapped
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # absent: no reuse, plain torch.empty


class Pool:
    """The kept buffers of one transport (a group's shared memory, or its gloo gather): one per dtype."""

    def __init__(self) -> None:
        self._kept: dict[torch.dtype, torch.Tensor] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor of ``shape``; large ones reuse the kept buffer when it is free."""
        numel = math.prod(shape)
        if numel * dtype.itemsize < MIN_BYTES or _use_count is None:
            return torch.empty(shape, dtype=dtype)
        kept = self._kept.get(dtype)
        if kept is None or kept.numel() < numel or not _free(kept):
            kept = self._kept[dtype] = torch.empty(numel, dtype=dtype)
        return kept[:numel].view(shape)

    def release(self) -> None:
        """Drop the kept buffers (their memory goes back once their last user lets go)."""
        self._kept.clear()


def _free(t: torch.Tensor) -> bool:
    """Whether only ``t`` itself references its storage (2: ``t`` and the storage object asked)."""
    return _use_count(t.untyped_storage()._cdata) == 2
