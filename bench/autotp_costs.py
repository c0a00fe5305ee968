"""What autotp's communication pieces cost against the cheapest way found to do the same, per call.

Run inside the autotp ranks of ``side_by_side.py`` (a gloo group is up), on the model's own shapes:

- the logits all-gather (``collectives.all_gather_last``, functional all-gather along the last dim)
  against a zero-padded in-place ``dist.all_reduce`` that yields the same tensor;
- a row layer's all-reduce (``collectives.all_reduce``, functional: a new output tensor) against an
  in-place ``dist.all_reduce`` of the layer's fresh output;
- the vocabulary-sharded token embedding (autotp's ``VocabShard``: mask, lookup, all-reduce) against
  a replicated lookup (no communication, the whole table held).
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
    """Rows ``piece, calls, autotp (wall, cpu), alternative (wall, cpu), alternative name`` for this rank."""
    from autotp import collectives

    group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(size.seed)
    logits = torch.randn(size.batch, size.seq, size.vocab // tp, generator=g)
    hidden = torch.randn(size.batch, size.seq, size.hidden, generator=g)
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)
    if not torch.equal(collectives.all_gather_last(logits, group, tp), _gather_by_reduce(logits, rank, tp)):
        raise RuntimeError("the zero-padded all-reduce does not reproduce autotp's all-gather")
    embed = model.get_input_embeddings()
    table = torch.randn(size.vocab, size.hidden, generator=g)
    fresh = hidden.clone()  # reduced in place again and again: its values grow, its cost does not
    rows = []
    with torch.no_grad():
        rows.append(dict(piece=f"logits all-gather {tuple(logits.shape)} → vocab {size.vocab}", calls=1,
                         autotp=_clock(lambda: collectives.all_gather_last(logits, group, tp), reps),
                         alt=_clock(lambda: _gather_by_reduce(logits, rank, tp), reps),
                         alt_name="zero-padded in-place `dist.all_reduce`"))
        rows.append(dict(piece=f"row-layer all-reduce {tuple(hidden.shape)}", calls=2 * size.layers,
                         autotp=_clock(lambda: collectives.all_reduce(hidden, group, "forward"), reps),
                         alt=_clock(lambda: dist.all_reduce(fresh), reps),
                         alt_name="in-place `dist.all_reduce` of the layer's own output"))
        rows.append(dict(piece="token embedding lookup (vocabulary-sharded)", calls=1,
                         autotp=_clock(lambda: embed(ids), reps),
                         alt=_clock(lambda: F.embedding(ids, table), reps),
                         alt_name="replicated table (no communication)"))
    return rows
