"""Ranks working together: which group and tp, and one bounded agreement that every rank succeeded.

``parallelize``, ``from_pretrained`` and the sharded checkpoints use these so that a bad input raises
on every rank before anyone waits in a collective, and a rank that failed or exited makes the
others raise ``RankError`` instead of hanging.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Any, Iterator

import torch
import torch.distributed as dist

from autotp.errors import GroupError, RankError


def check_tp(tp: Any) -> None:
    """``tp`` is None or a positive int (a string from a command line, a float or a bool is refused)."""
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
        raise GroupError(f"tp={tp!r} ({type(tp).__name__}): tp is the number of ranks, a positive int "
                         f"(e.g. tp=2{f', not the string {tp!r}: int({tp!r})' if isinstance(tp, str) else ''})")


def group_size(group: Any, tp: int | None) -> tuple[Any, int]:
    """(group, its size) for an initialized process group (default: the world), checking ``tp`` against it."""
    check_tp(tp)
    group = group if group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    if world < 1:  # torch answers -1 on a process that is not in the group
        members = dist.get_process_group_ranks(group)
        raise GroupError(f"this process (global rank {dist.get_rank()}) is not in the group passed as group= (its "
                         f"global ranks: {members}); call it only on the group's ranks, or pass this rank's group")
    if tp is not None and tp != world:
        raise GroupError(f"tp={tp} but the process group has {world} ranks; tp must equal the group size "
                         f"(use tp={world}, or pass group=dist.new_group(ranks) with {tp} ranks)")
    return group, world


def ranks(group: Any, tp: int | None) -> tuple[Any, int, int]:
    """(group, this rank, tp): the default group when one is initialized, else one process at tp=1."""
    check_tp(tp)
    if not dist.is_available() or not dist.is_initialized():
        if tp in (None, 1):
            return None, 0, 1
        raise GroupError(f"tp={tp} but no process group is initialized: call torch.distributed.init_process_group("
                         f"'gloo' or 'nccl') first (torchrun sets the environment), or pass tp=1")
    group, world = group_size(group, tp)
    return group, dist.get_rank(group), world


@dataclasses.dataclass
class Step:
    """One agreement step: the body may set ``share`` (``width`` numbers, float64) before it ends; afterwards
    ``rows[r]`` holds what rank ``r`` shared (zeros where a rank's body failed before sharing)."""
    width: int = 0
    share: Any = None
    rows: torch.Tensor | None = None


def group_timeout(group: Any) -> float:
    """The seconds the group's backend waits in a collective before it gives up (gloo's default if unknown)."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except Exception:  # an older torch or another backend
        return 1800.0


@contextlib.contextmanager
def all_ranks(group: Any, what: str, timeout: float, *, width: int = 0) -> Iterator[Step]:
    """Run the body on every rank, then agree in one bounded all-reduce that all ranks succeeded.

    The one agreement protocol: every entry point (parallelize, from_pretrained, the checkpoints) runs its
    work as a sequence of these steps, never one inside another, so the ranks stay in step whichever rank
    fails. A rank whose body raised re-raises its error after the all-reduce; the others raise ``RankError``
    naming it. A rank that exited (gloo: connection closed) or did not arrive within the time allowed
    (``timeout`` seconds, or the group's own timeout if shorter) makes the others raise ``RankError``.
    The same all-reduce carries ``width`` numbers from each rank (``Step.share``) to every rank
    (``Step.rows``). Without a group the body's error is raised as it is.
    """
    step = Step(width)
    error: Exception | None = None
    try:
        yield step
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        error = e
    if group is None:
        if error is not None:
            raise error
        step.rows = _row(step, error).unsqueeze(0)[:, 1:]
        return
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = torch.zeros(world, 1 + width, dtype=torch.float64)
    rows[rank] = _row(step, error)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    rows = rows.to(device)
    allowed = min(timeout, group_timeout(group))
    try:
        dist.all_reduce(rows, group=group, async_op=True).wait(timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:  # gloo: "Connection closed by peer" at once, or "Operation timed out"
        raise RankError(f"rank {rank}: {what}: another rank exited, or did not finish within {allowed:.0f} s "
                        f"({str(e).split('. ')[0][:300]}). Every rank stops; the cause is in the other ranks' "
                        f"output.") from (error or e)
    if error is not None:
        raise error
    rows = rows.cpu()
    bad = [r for r in range(world) if rows[r, 0]]
    if bad:
        raise RankError(f"rank {rank}: {what} failed on rank{'s' if len(bad) > 1 else ''} {bad} (the error is raised "
                        f"there); this rank's part is fine, but the ranks cannot go on without it")
    step.rows = rows[:, 1:]


def _row(step: Step, error: Exception | None) -> torch.Tensor:
    """[failed, what this rank shares]; a share of the wrong size is a bug of the caller, raised as such."""
    row = torch.zeros(1 + step.width, dtype=torch.float64)
    row[0] = error is not None
    if error is None and step.share is not None:
        share = torch.as_tensor(step.share, dtype=torch.float64).reshape(-1)
        if share.numel() != step.width:
            raise ValueError(f"an agreement step shares {share.numel()} numbers, declared {step.width}")
        row[1:] = share
    return row
