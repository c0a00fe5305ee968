"""A sum over the ranks of one host through shared memory, for CPU process groups (opt-in).

gloo sums over TCP loopback even when every rank runs on the same machine. With ``AUTOTP_SHM=1``,
``parallelize`` maps one file under ``/dev/shm`` into every rank of such a group: a slot per rank and
a flag per rank and phase. A sum copies this rank's tensor into its slot, raises its flag, waits for
every rank's flag, adds the slots in rank order (so every rank gets the same bits) and waits again
before anyone reuses a slot; a gather copies the slots out side by side. Tensors larger than a slot
go in pieces.

Waiting spins briefly, then sleeps; while it waits it checks that the other ranks' processes are
alive, so a rank that died makes the others raise ``RankError`` at once, and one that hangs makes
them raise after ``timeout`` seconds, never wait forever. Only on x86-64, whose stores are seen by
other cores in program order (the flag is written after the data); elsewhere gloo is kept.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import time
import uuid

import torch
import torch.distributed as dist

from .errors import RankError

log = logging.getLogger(__name__)

SLOT_BYTES = int(os.environ.get("AUTOTP_SHM_BYTES", 32 << 20))  # per rank; larger tensors go in pieces
_LINE = 8  # int64s per flag: one cache line each, so ranks do not write to the same line


def wanted() -> bool:
    return os.environ.get("AUTOTP_SHM") == "1"


class ShmSum:
    """In-place sum of a tensor over the ranks of ``group``, all on this host (see the module doc)."""

    def __init__(self, group, *, slot_bytes: int = SLOT_BYTES, timeout: float = 300.0):
        group = group if group is not None else dist.group.WORLD
        self.rank, self.world, self.timeout = dist.get_rank(group), dist.get_world_size(group), timeout
        info: list = [None] * self.world
        dist.all_gather_object(info, (socket.gethostname(), os.getpid()), group=group)
        self.pids = [pid for _, pid in info]
        name = [f"/dev/shm/autotp_{uuid.uuid4().hex[:16]}" if self.rank == 0 else None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        self.slot, path = slot_bytes, name[0]
        size = self.world * slot_bytes + 2 * self.world * _LINE * 8
        if self.rank == 0:
            with open(path, "wb") as f:
                f.truncate(size)
        dist.barrier(group=group)
        buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(path)  # the name goes now; the mappings stay until every rank exits
        self.data = buf[: self.world * slot_bytes].view(self.world, slot_bytes)
        flags = buf[self.world * slot_bytes:].view(torch.int64).view(2, self.world, _LINE)
        self.flags = [flags[0, :, 0], flags[1, :, 0]]  # arrived, done reading
        self.seq = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (contiguous, on the CPU) over the ranks, in place; returns ``x``."""
        flat = x.view(-1)
        per = self.slot // x.element_size()
        for off in range(0, flat.numel(), per):
            part = flat[off:off + per]
            n = part.numel() * x.element_size()
            self.seq += 1
            self.data[self.rank, :n].view(x.dtype).copy_(part)
            self._wait(0)
            torch.sum(self.data[:, :n].view(x.dtype), dim=0, out=part)  # (world, n) -> (n,), rank order
            self._wait(1)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dim, in rank order (an LM head's logits)."""
        n = x.shape[-1]
        rows = x.reshape(-1, n)  # (R, n)
        out = x.new_empty((rows.shape[0], n * self.world))
        per = max(1, self.slot // (n * x.element_size()))
        for r0 in range(0, rows.shape[0], per):
            part = rows[r0:r0 + per]
            k = part.numel() * x.element_size()
            self.seq += 1
            self.data[self.rank, :k].view(x.dtype).view(part.shape).copy_(part)
            self._wait(0)
            dst = out[r0:r0 + part.shape[0]].view(part.shape[0], self.world, n)
            dst.copy_(self.data[:, :k].view(x.dtype).view(self.world, part.shape[0], n).transpose(0, 1))
            self._wait(1)
        return out.view(*x.shape[:-1], n * self.world)

    def _wait(self, phase: int) -> None:
        f, seq = self.flags[phase], self.seq
        f[self.rank] = seq
        spins, start = 0, None
        while bool((f < seq).any()):
            spins += 1
            if spins < 2000:
                continue
            start = start or time.monotonic()
            time.sleep(0 if spins < 20000 else 0.0005)
            if spins % 500 == 0:
                self._check(f, seq, time.monotonic() - start)

    def _check(self, f: torch.Tensor, seq: int, waited: float) -> None:
        late = [r for r in range(self.world) if int(f[r]) < seq]
        for r in late:
            if not _alive(self.pids[r]):
                raise RankError(f"rank {r} (pid {self.pids[r]}) exited before shared-memory all-reduce "
                                f"{seq}; this rank {self.rank} stops instead of waiting")
        if waited > self.timeout:
            raise RankError(f"ranks {late} did not reach shared-memory all-reduce {seq} within {self.timeout:.0f} s")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an exited one whose parent has not reaped it counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


def setup(group) -> ShmSum | None:
    """A ShmSum for ``group`` if it is a gloo group whose ranks share this host (else None, gloo stays).
    Every rank of the group must call it (it is collective)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.isdir("/dev/shm"):
        return None
    if str(dist.get_backend(group)) != "gloo":
        return None
    hosts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) != 1:
        return None
    s = ShmSum(group)
    if s.rank == 0:
        log.info("autotp: all-reduces of this %d-rank group go through shared memory", s.world)
    return s
