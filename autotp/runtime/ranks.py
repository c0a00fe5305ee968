"""Ranks working together: which group and tp, and one bounded agreement that every rank succeeded.

``parallelize``, ``from_pretrained`` and the sharded checkpoints use these so that a bad input raises
on every rank before anyone waits in a collective, and a rank that failed or exited makes the
others raise ``RankError`` instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
from typing import Any, Iterator

import torch
import torch.distributed as dist

from autotp.errors import GroupError, RankError


def group_size(group: Any, tp: int | None) -> tuple[Any, int]:
    """(group, its size) for an initialized process group (default: the world), checking ``tp`` against it."""
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if tp is not None and tp != world:
        raise GroupError(f"tp={tp} but the process group has {world} ranks; tp must equal the group size "
                         f"(use tp={world}, or pass group=dist.new_group(ranks) with {tp} ranks)")
    return group, world


def ranks(group: Any, tp: int | None) -> tuple[Any, int, int]:
    """(group, this rank, tp): the default group when one is initialized, else one process at tp=1."""
    if not dist.is_available() or not dist.is_initialized():
        if tp in (None, 1):
            return None, 0, 1
        raise GroupError(f"tp={tp} but no process group is initialized: call torch.distributed.init_process_group("
                         f"'gloo' or 'nccl') first (torchrun sets the environment), or pass tp=1")
    group, world = group_size(group, tp)
    return group, dist.get_rank(group), world


@contextlib.contextmanager
def all_ranks(group: Any, what: str, timeout: float) -> Iterator[None]:
    """Run the body on every rank, then agree in one bounded all-reduce that all ranks succeeded.

    A rank whose body raised re-raises its error after the all-reduce; the others raise ``RankError``
    naming it. A rank that exited (gloo: connection closed) or did not arrive within ``timeout`` seconds
    makes the others raise ``RankError``. Without a group the body's error is raised as it is.
    """
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        error = e
    if group is None:
        if error is not None:
            raise error
        return
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    failed = torch.zeros(world, dtype=torch.int32, device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    failed[rank] = error is not None
    try:
        dist.all_reduce(failed, group=group, async_op=True).wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:  # gloo: "Connection closed by peer" at once, or "Operation timed out"
        raise RankError(f"rank {rank}: {what}: another rank exited or did not finish within {timeout:.0f} s "
                        f"({str(e).split('. ')[0][:300]}). Every rank stops; the cause is in the other ranks' "
                        f"output.") from (error or e)
    if error is not None:
        raise error
    bad = [r for r in range(world) if failed[r]]
    if bad:
        raise RankError(f"rank {rank}: {what} failed on rank{'s' if len(bad) > 1 else ''} {bad} (the error is raised "
                        f"there); this rank's part is fine, but the model would be incomplete")
