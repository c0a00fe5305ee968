"""What autotp's communication pieces cost against other ways to get the same tensor, per call.

Run inside the autotp ranks of ``side_by_side.py`` (a gloo group is up; autotp's collectives go
through shared memory unless ``AUTOTP_SHM=0``), on the model's own shapes, without autograd:

- the LM head, matmul and logits together (``collectives.gather_linear``: output features split, the
  local logits computed into shared memory and gathered) against (b)'s way, the same split with a
  zero-padded in-place gloo ``dist.all_reduce``, and against DeepSpeed's, input features split and
  the full logits summed (through autotp's own sum, to compare the split alone);
- a row layer's all-reduce (``collectives.all_reduce`` of the layer's fresh output) against an
  in-place gloo ``dist.all_reduce``, (b)'s;
- the vocabulary-sharded token embedding (autotp's ``VocabShard``: mask, lookup, all-reduce) against
  a replicated lookup (no communication, the whole table held), (b)'s.

Each row says whose way its alternative is (``ref``): the (b) rows together account for autotp − (b).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tp_systems import ModelSize


def _clock(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn`` over ``reps`` calls, the ranks released by a barrier."""
    walls, cpus = [], []
    for _ in range(reps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def _gather_by_reduce(y: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """The last-dim all-gather as one all-reduce of a zeroed buffer holding this rank's slice (exact)."""
    n = y.shape[-1]
    out = y.new_zeros((*y.shape[:-1], tp * n))
    out[..., rank * n:(rank + 1) * n] = y
    dist.all_reduce(out)
    return out


def measure(size: ModelSize, model: nn.Module, reps: int) -> list[dict]:
    """Rows ``piece, calls, autotp (wall, cpu), alternative (wall, cpu), alt_name, ref`` for this rank."""
    from autotp.runtime import collectives

    group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(size.seed)
    x = torch.randn(size.batch, size.seq, size.hidden, generator=g)
    w_col = torch.randn(size.vocab // tp, size.hidden, generator=g) * 0.02  # this rank's vocabulary rows
    w_row = torch.randn(size.vocab, size.hidden // tp, generator=g) * 0.02  # this rank's input features
    x_row = x[..., rank * size.hidden // tp:(rank + 1) * size.hidden // tp].contiguous()
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    embed = model.get_input_embeddings()
    table = torch.randn(size.vocab, size.hidden, generator=g)
    rows = []
    def lm_head() -> torch.Tensor:  # what autotp's LM head layer runs without autograd
        fused = collectives.gather_linear(x, w_col, None, False, group, tp)
        return fused if fused is not None else collectives.all_gather_last(F.linear(x, w_col), group, tp)

    with torch.no_grad():
        if not torch.equal(lm_head(), _gather_by_reduce(F.linear(x, w_col), rank, tp)):
            raise RuntimeError("the zero-padded all-reduce does not reproduce autotp's LM head gather")
        head = f"LM head {tuple(x.shape)} → vocab {size.vocab}, matmul and logits"
        autotp_head = _clock(lm_head, reps)
        rows.append(dict(piece=head, calls=1, autotp=autotp_head, ref="b",
                         alt=_clock(lambda: _gather_by_reduce(F.linear(x, w_col), rank, tp), reps),
                         alt_name="same split, zero-padded in-place gloo `dist.all_reduce`"))
        rows.append(dict(piece=head, calls=1, autotp=autotp_head, ref="e",
                         alt=_clock(lambda: collectives.all_reduce(F.linear(x_row, w_row), group, "forward",
                                                                   owned=True), reps),
                         alt_name="input features split, full logits summed (DeepSpeed's split)"))
        fresh = x.clone()  # summed in place again and again: its values grow, its cost does not
        rows.append(dict(piece=f"row-layer all-reduce {tuple(x.shape)}", calls=2 * size.layers, ref="b",
                         autotp=_clock(lambda: collectives.all_reduce(fresh, group, "forward", owned=True), reps),
                         alt=_clock(lambda: dist.all_reduce(fresh), reps),
                         alt_name="in-place gloo `dist.all_reduce`"))
        rows.append(dict(piece="token embedding lookup (vocabulary-sharded)", calls=1, ref="b",
                         autotp=_clock(lambda: embed(ids), reps),
                         alt=_clock(lambda: F.embedding(ids, table), reps),
                         alt_name="replicated table (no communication)"))
    return rows
