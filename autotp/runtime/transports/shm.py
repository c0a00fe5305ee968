"""Sums and gathers over the ranks of one host through shared memory, for CPU process groups.

gloo sums over TCP loopback even when every rank runs on the same machine. When a gloo group's
ranks can all map one file under ``/dev/shm`` (``parallelize`` tries it unless ``AUTOTP_SHM=0``),
they communicate through it instead: a slot per rank and a flag per rank and phase. A sum copies
this rank's tensor into its slot, raises its flag, waits for every rank's flag, adds the slots in
rank order (so every rank gets the same bits) and waits again before anyone reuses a slot; a gather
copies the slots out side by side, and an LM head computes its local logits straight into its slot
(:meth:`ShmSum.gather_computed`). Tensors larger than a slot go in pieces.

Setting up is agreed by all ranks: rank 0 creates the file, reserves its pages (so a full
``/dev/shm`` is an error now, not a crash later) and writes a random token; every rank maps it and
checks the token. If any rank cannot (another container's ``/dev/shm``, too little space), every
rank keeps gloo.

Waiting spins briefly, then sleeps; while it waits it checks that the other ranks' processes are
alive, so a rank that died makes the others raise ``RankError`` at once, and one that hangs makes
them raise after the group's timeout, never wait forever. Only on x86-64, whose stores are seen by
other cores in program order (the flag is written after the data, and the interpreter takes a lock
between the two); elsewhere gloo is kept.
"""
from __future__ import annotations

import logging
import mmap
import os
import platform
import secrets
import socket
import time
from typing import Callable

import torch
import torch.distributed as dist

from autotp.errors import RankError
from autotp.runtime.ranks import group_timeout
from autotp.runtime.transports import buffers

log = logging.getLogger(__name__)

SLOT_BYTES = 32 << 20  # per rank (AUTOTP_SHM_BYTES, read at setup, overrides it); larger tensors go in pieces
MIN_SLOT_BYTES = 1 << 20  # less /dev/shm than this per rank: gloo is kept
_PAGE = 4096
_LINE = 8  # int64s per flag: one cache line each, so ranks do not write to the same line
_TOKEN = 16  # bytes of the file's first page that prove every rank mapped the same file


def wanted() -> bool:
    """Whether ``parallelize`` should try shared memory (on unless ``AUTOTP_SHM=0``)."""
    return os.environ.get("AUTOTP_SHM", "1") != "0"


def slot_size(want: int, free: int, world: int) -> int:
    """Bytes per rank's slot: ``want``, or what half of ``free`` bytes allows (pages; 0 if under 1 MB).

    >>> slot_size(32 << 20, 64 << 20, 2) == 16 << 20   # a 64 MB /dev/shm (a container's default)
    True
    """
    slot = min(want, free // 2 // world) // _PAGE * _PAGE
    return slot if slot >= min(want, MIN_SLOT_BYTES) else 0


def _layout(world: int, slot: int) -> tuple[int, int]:
    """(offset of the slots, file size): a token page, then the flags, then the slots, page-aligned."""
    flags = -(-2 * world * _LINE * 8 // _PAGE) * _PAGE
    return _PAGE + flags, _PAGE + flags + world * slot


def _create(path: str, size: int, token: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)  # the pages now, or ENOSPC now (not SIGBUS mid-forward)
        os.pwrite(fd, token, 0)
    finally:
        os.close(fd)


def _attach(path: str, size: int, token: bytes) -> mmap.mmap | None:
    """The file mapped shared, or None if this rank does not see the file rank 0 made."""
    try:
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size != size or f.read(_TOKEN) != token:
                return None
            return mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
    except OSError:
        return None


def _usable() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class ShmSum:
    """In-place sum, and gathers, of tensors over the ranks of ``group``, all on this host (see the
    module doc). Collective: every rank of the group constructs it; all raise RuntimeError together
    if any rank cannot map the file."""

    def __init__(self, group, *, slot_bytes: int | None = None, timeout: float | None = None):
        slot_bytes = slot_bytes if slot_bytes is not None else int(os.environ.get("AUTOTP_SHM_BYTES", SLOT_BYTES))
        group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.timeout = timeout if timeout is not None else group_timeout(group)
        info: list = [None] * self.world
        dist.all_gather_object(info, (socket.gethostname(), os.getpid(), _pid_namespace(), _usable()), group=group)
        if len({host for host, *_ in info}) != 1:
            raise RuntimeError(f"shared memory for this {self.world}-rank group: its ranks run on different hosts")
        if not all(usable for *_, usable in info):
            raise RuntimeError(f"shared memory for this {self.world}-rank group: needs x86-64 and /dev/shm on every rank")
        self.pids = [pid for _, pid, _, _ in info]
        self.check_pids = len({ns for _, _, ns, _ in info}) == 1 and info[0][2] is not None  # same pid namespace
        self.spin = 2000 if self.world <= len(os.sched_getaffinity(0)) else 20  # fewer cores than ranks: yield soon
        made: list = [self._make(slot_bytes) if self.rank == 0 else None]
        try:
            dist.broadcast_object_list(made, src=dist.get_global_rank(group, 0), group=group)
            path, slot, token, why = made[0]
            buf = _attach(path, _layout(self.world, slot)[1], token) if path else None
            ok: list = [None] * self.world
            dist.all_gather_object(ok, buf is not None, group=group)
        finally:
            if self.rank == 0 and made[0][0]:
                os.unlink(made[0][0])  # the name goes now (or on an error); the mappings stay until every rank exits
        if not all(ok):
            why = why or f"ranks {[r for r, o in enumerate(ok) if not o]} cannot map rank 0's file {path}"
            raise RuntimeError(f"shared memory for this {self.world}-rank group: {why}")
        start, _ = _layout(self.world, slot)
        self.slot, self._map = slot, buf
        self.data = torch.frombuffer(buf, dtype=torch.uint8, count=self.world * slot, offset=start).view(self.world, slot)
        self._flags = memoryview(buf)[_PAGE:start].cast("q")  # [phase][rank] at one line each: cheap to poll
        self.seq = 0
        self.pool = buffers.Pool()  # gathered outputs handed out again once free
        self._views: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _make(self, want: int) -> tuple[str | None, int, bytes, str | None]:
        """Rank 0: create the file. (path, slot bytes, token, why not)."""
        try:
            st = os.statvfs("/dev/shm")
        except OSError as e:
            return None, 0, b"", f"cannot read /dev/shm: {e}"
        slot = slot_size(want, st.f_bavail * st.f_frsize, self.world)
        if not slot:
            return None, 0, b"", f"/dev/shm has {st.f_bavail * st.f_frsize >> 20} MB free, too little"
        path, token = f"/dev/shm/autotp_{secrets.token_hex(8)}", secrets.token_bytes(_TOKEN)
        try:
            _create(path, _layout(self.world, slot)[1], token)
        except OSError as e:
            if os.path.exists(path):
                os.unlink(path)
            return None, 0, b"", f"cannot create {path}: {e}"
        return path, slot, token, None

    def _slots(self, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``nbytes`` of every rank's slot as ``dtype``, ``(world, nbytes / size)``; cached per size,
        since building the views costs more than summing a decode step's activations."""
        key = (nbytes, dtype)
        v = self._views.get(key)
        if v is None:
            if len(self._views) > 256:
                self._views.clear()
            v = self._views[key] = self.data[:, :nbytes].view(dtype)
        return v

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (contiguous, on the CPU) over the ranks, in place; returns ``x``."""
        flat = x.view(-1)
        size = x.element_size()
        per = self.slot // size
        for off in range(0, flat.numel(), per):
            part = flat[off:off + per] if flat.numel() > per else flat
            slots = self._slots(part.numel() * size, x.dtype)
            self.seq += 1
            slots[self.rank].copy_(part)
            self._wait(0)
            if self.world == 2:
                torch.add(slots[0], slots[1], out=part)
            else:
                torch.sum(slots, dim=0, out=part)  # (world, n) -> (n,), rank order
            self._wait(1)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dim, in rank order."""
        n = x.shape[-1]
        rows = x.reshape(-1, n)
        out = self.gather_computed(lambda a, b, slot: slot.copy_(rows[a:b]), rows.shape[0], n, x.dtype)
        return out.view(*x.shape[:-1], n * self.world)

    def gather_computed(self, compute: Callable[[int, int, torch.Tensor], object], rows: int, n: int,
                        dtype: torch.dtype) -> torch.Tensor:
        """A ``(rows, n * world)`` tensor whose columns ``[r*n, (r+1)*n)`` rank ``r`` computed:
        ``compute(a, b, slot)`` writes this rank's rows ``a:b`` into ``slot`` (``(b - a, n)``, in shared
        memory), so an LM head's local logits never exist outside it."""
        size = dtype.itemsize
        out = self.pool.empty((rows, n * self.world), dtype)
        per = max(1, self.slot // (n * size))
        if per * n * size > self.slot:
            raise ValueError(f"one row of {n} {dtype} values does not fit a {self.slot}-byte shared-memory slot; "
                             f"set AUTOTP_SHM_BYTES higher or AUTOTP_SHM=0")
        for a in range(0, rows, per):
            k = min(per, rows - a)
            slots = self._slots(k * n * size, dtype).view(self.world, k, n)
            self.seq += 1
            compute(a, a + k, slots[self.rank])
            self._wait(0)
            (out[a:a + k] if k < rows else out).view(k, self.world, n).copy_(slots.transpose(0, 1))
            self._wait(1)
        return out

    def _flag(self, phase: int, rank: int) -> int:
        return self._flags[(phase * self.world + rank) * _LINE]

    def _wait(self, phase: int) -> None:
        seq, flags, base = self.seq, self._flags, phase * self.world * _LINE
        flags[base + self.rank * _LINE] = seq
        spins, start = 0, None
        while min(flags[base:base + self.world * _LINE:_LINE]) < seq:
            spins += 1
            if spins < self.spin:
                continue
            start = start or time.monotonic()
            time.sleep(0 if spins < self.spin + 20000 else 0.0005)
            if spins % 500 == 0:
                self._check(phase, seq, time.monotonic() - start)

    def _check(self, phase: int, seq: int, waited: float) -> None:
        late = [r for r in range(self.world) if self._flag(phase, r) < seq]
        for r in late if self.check_pids else ():
            if not _alive(self.pids[r]):
                raise RankError(f"rank {r} (pid {self.pids[r]}) exited before shared-memory collective "
                                f"{seq}; this rank {self.rank} stops instead of waiting")
        if waited > self.timeout:
            raise RankError(f"ranks {late} did not reach shared-memory collective {seq} within {self.timeout:.0f} s "
                            f"(the process group's timeout)")


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
    """A ShmSum for ``group`` if it is a gloo group whose ranks all map one shared file (else None,
    gloo stays). Every rank of the group must call it (it is collective)."""
    if str(dist.get_backend(group)) != "gloo":
        return None
    try:
        s = ShmSum(group)
    except RuntimeError as e:
        if dist.get_rank(group) == 0:
            log.warning("autotp: %s; the group's sums stay on gloo", e)
        return None
    if s.rank == 0:
        log.info("autotp: sums and gathers of this %d-rank group go through shared memory", s.world)
    return s
