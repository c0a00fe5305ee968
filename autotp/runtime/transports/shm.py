"""Sums and gathers over the ranks of one host through shared memory, for CPU process groups.

gloo sums over TCP loopback even when every rank runs on the same machine. When a gloo group's
ranks can all map one piece of shared memory (``parallelize`` tries it unless ``AUTOTP_SHM=0``),
they communicate through it instead: a slot per rank and a flag per rank and phase. A sum copies
this rank's tensor into its slot, raises its flag, waits for every rank's flag, adds the slots in
rank order (so every rank gets the same bits) and waits again before anyone reuses a slot; a gather
copies the slots out side by side, and an LM head computes its local logits straight into its slot
(:meth:`ShmSum.gather_computed`). Tensors larger than a slot go in pieces.

Beside its first flag each rank writes what it sends (sum, gather or computed gather, the tensor's bytes and
dtype, a gather's row width; pieces of different widths: the full width and a digest of them, ``transports.words``)
and which collective it is: the forward of the group's parallelized models and the
place in it (``collectives.Epoch``). After the second wait, before anything is returned, every rank reads all
ranks' words, the same ones. The same collective with other tensors (inputs of different shapes): every rank
raises ``RankError`` naming what each sent; the next collective runs in step. A rank further on (it caught an
exception in a forward and went on to the next): the ranks behind raise ``RankError`` (they drop that forward too)
and the ranks ahead wait for them, so ranks that catch it and go on drop the same requests. Ranks that run as many
forwards of the same shapes on different requests look alike.

Setting up is agreed by all ranks. Rank 0 creates an anonymous memory file (``memfd_create``), reserves its pages
and writes a random token; the others open it through ``/proc/<pid>/fd/<fd>``, map it and check the token. It has
no name, so nothing is left behind however the ranks end. Where the ranks do not share a pid namespace (or cannot
open it) a named file under ``/dev/shm`` is used instead, whose name every rank knows in advance, unlinked once
every rank mapped it (by the ranks left if the setup fails): only all ranks killed in that moment leave it behind.
Either is sized by ``/dev/shm``'s free space. If any rank cannot use it (other hosts, not x86-64, too little
``/dev/shm``, memory a rank does not see), every rank keeps gloo; a rank that exits or fails during the setup (its
gloo collectives fail) makes every rank raise ``RankError``.

Waiting spins briefly, then sleeps; while it waits it checks that the other ranks' processes are
alive, so a rank that died makes the others raise ``RankError`` at once, and one that hangs makes
them raise after the group's timeout, never wait forever. Only on x86-64, whose stores are seen by
other cores in program order (the flag is written after the data, and the interpreter takes a lock
between the two); elsewhere gloo is kept.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import secrets
import socket
import time
import types
from typing import Callable

import torch
import torch.distributed as dist

from autotp.errors import RankError
from autotp.runtime.ranks import group_timeout
from autotp.runtime.transports import buffers
from autotp.runtime.transports.words import COMPUTED, GATHER, MASK, SUM, UNEVEN, first, uneven, what, where

log = logging.getLogger(__name__)

SLOT_BYTES = 32 << 20  # per rank (AUTOTP_SHM_BYTES, read at setup, overrides it); larger tensors go in pieces
MIN_SLOT_BYTES = 1 << 20  # less /dev/shm than this per rank: gloo is kept
_PAGE = 4096
_LINE = 8  # int64s per flag: one cache line each, so ranks do not write to the same line
_TOKEN = 16  # bytes of the file's first page that prove every rank mapped the same file
# what a message is: ``transports.words``, in words 1-3 (odd seqs: 4-6) of its rank's first flag line
_after_create: Callable[[str], object] | None = None  # tests: called on rank 0 once the memory exists, with its path


class NoSharedMemory(RuntimeError):
    """Every rank of the group agreed that it cannot use shared memory (``setup`` keeps gloo)."""


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


def _attach(path: str, size: int, token: bytes) -> mmap.mmap | None:
    """The file mapped shared, or None if this rank does not see the file rank 0 made."""
    try:
        with open(path, "r+b") as f:
            if os.fstat(f.fileno()).st_size != size or f.read(_TOKEN) != token:
                return None
            return mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class ShmSum:
    """In-place sum, and gathers, of tensors over the ranks of ``group``, all on this host (see the module doc).
    Collective: every rank of the group constructs it; all raise :class:`NoSharedMemory` (a RuntimeError) together
    if any rank cannot map the memory, ``RankError`` if a rank fails or exits meanwhile. ``epoch``: the group's
    ``collectives.Epoch``."""

    def __init__(self, group, *, slot_bytes: int | None = None, timeout: float | None = None, epoch=None):
        slot_bytes = slot_bytes if slot_bytes is not None else int(os.environ.get("AUTOTP_SHM_BYTES", SLOT_BYTES))
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.timeout = timeout if timeout is not None else group_timeout(self.group)
        # which forward, and which collective in it, this rank is at (``collectives.Epoch``; default: its own)
        self.epoch = epoch if epoch is not None else types.SimpleNamespace(forwards=0, calls=0)
        info: list = [None] * self.world
        usable = platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir("/dev/shm")
        mine = (socket.gethostname(), os.getpid(), _pid_namespace(), usable, hasattr(os, "memfd_create"),
                secrets.token_hex(8))
        self._setup_step(dist.all_gather_object, info, mine)
        why = [] if len({i[0] for i in info}) == 1 else ["its ranks run on different hosts"]
        why += [] if all(i[3] for i in info) else ["needs x86-64 and /dev/shm on every rank"]
        self.pids = [i[1] for i in info]
        self.check_pids = len({i[2] for i in info}) == 1 and info[0][2] is not None  # same pid namespace
        self.spin = 2000 if self.world <= len(os.sched_getaffinity(0)) else 20  # fewer cores than ranks: yield soon
        name = f"/dev/shm/autotp_{self.pids[0]}_{info[0][5]}"  # every rank knows it before rank 0 makes it
        buf, ways = None, (("memfd",) if self.check_pids and info[0][4] else ()) + ("file",)  # memfd: one pid space
        for way in () if why else ways:
            buf, slot, reason = self._connect(way, name, slot_bytes)
            if buf is not None:
                break
            why.append(reason)
        if buf is None:
            raise NoSharedMemory(f"shared memory for this {self.world}-rank group: {'; '.join(why)}")
        start, self.slot, self._map = _layout(self.world, slot)[0], slot, buf
        self.data = torch.frombuffer(buf, dtype=torch.uint8, count=self.world * slot, offset=start).view(self.world, -1)
        self._flags = memoryview(buf)[_PAGE:start].cast("q")  # [phase][rank] at one line each: cheap to poll
        self._others = [r * _LINE for r in range(self.world) if r != self.rank]  # their lines, at phase 0
        self.seq = 0
        self.pool = buffers.Pool()  # gathered outputs handed out again once free
        self._views: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def _setup_step(self, op: Callable, *args, **kwargs) -> None:
        """One gloo collective of the setup; a rank that exited or failed makes every other raise RankError."""
        try:
            op(*args, group=self.group, **kwargs)
        except RuntimeError as e:  # gloo: "Connection closed by peer" at once, or a timeout
            raise RankError(f"rank {self.rank}: setting up shared memory for this {self.world}-rank group: another "
                            f"rank exited, or did not answer within {self.timeout:.0f} s ({str(e).split('. ')[0][:300]}"
                            f"). Every rank stops; the cause is in the other ranks' output.") from e

    def _connect(self, way: str, name: str, want: int) -> tuple[mmap.mmap | None, int, str | None]:
        """One try, agreed by every rank: (the mapping, slot bytes, None), or (None, 0, why not) on every rank."""
        made, fd, buf, done = [None], None, None, False
        try:
            if self.rank == 0:
                made[0], fd = self._make(way, name, want)
                if made[0][0] and _after_create is not None:
                    _after_create(made[0][0])
            self._setup_step(dist.broadcast_object_list, made, src=dist.get_global_rank(self.group, 0))
            where, slot, token, why = made[0]
            size = _layout(self.world, slot)[1]
            buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED) if fd is not None else (
                _attach(where, size, token) if where else None)
            ok: list = [None] * self.world
            self._setup_step(dist.all_gather_object, ok, buf is not None)
            done = True
        finally:
            if fd is not None:
                os.close(fd)  # every rank has mapped it (or given up): the mappings hold it from now on
            if way == "file" and (self.rank == 0 or not done):  # the name goes now (the mappings stay); if the
                with contextlib.suppress(FileNotFoundError):  # setup failed, rank 0 may be gone: the others remove it
                    os.unlink(name)
        if not all(ok):  # (this rank's mapping, if any, goes with ``buf``)
            return None, 0, why or f"ranks {[r for r, o in enumerate(ok) if not o]} cannot map rank 0's {where}"
        return buf, slot, None

    def _make(self, way: str, name: str, want: int) -> tuple[tuple[str | None, int, bytes, str | None], int | None]:
        """Rank 0: the memory made, its pages reserved (ENOSPC now, not SIGBUS mid-forward) and the token written:
        ((where the ranks open it, slot bytes, token, why not), the memory file's fd, open until all ranks map it)."""
        fd = None
        try:
            st = os.statvfs("/dev/shm")
            free, token = st.f_bavail * st.f_frsize, secrets.token_bytes(_TOKEN)
            slot = slot_size(want, free, self.world)
            if not slot:
                return (None, 0, b"", f"/dev/shm has {free >> 20} MB free, too little"), None
            fd = os.memfd_create("autotp_shm", os.MFD_CLOEXEC) if way == "memfd" else os.open(
                name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, _layout(self.world, slot)[1])
            os.pwrite(fd, token, 0)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            return (None, 0, b"", f"cannot create {'a memory file' if way == 'memfd' else name}: {e}"), None
        if way == "file":
            os.close(fd)
            return (name, slot, token, None), None
        return (f"/proc/{os.getpid()}/fd/{fd}", slot, token, None), fd

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

    def _describe(self, kind: int, nbytes: int, dtype: torch.dtype, n: int = 0) -> tuple[int, int, int]:
        """This rank's words for its next collective (``transports.words``), which it counts."""
        e = self.epoch
        e.calls += 1
        return first(kind, dtype, n), nbytes, (e.forwards & MASK) << 32 | e.calls & MASK

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (contiguous, on the CPU) over the ranks, in place; returns ``x``."""
        flat = x.view(-1)
        size = x.element_size()
        per = self.slot // size
        words = self._describe(SUM, flat.numel() * size, x.dtype)
        for off in range(0, max(1, flat.numel()), per):  # an empty tensor too: the ranks compare their words
            part = flat[off:off + per] if flat.numel() > per else flat
            slots = self._slots(part.numel() * size, x.dtype)
            self.seq += 1
            slots[self.rank].copy_(part)
            while True:  # more than once only on a rank further on than others: it waits for them here
                self._wait(0, words)
                if self.world == 2:
                    torch.add(slots[0], slots[1], out=part)
                else:
                    torch.sum(slots, dim=0, out=part)  # (world, n) -> (n,), rank order
                if self._wait(1, words):
                    break
                self._differ(words)
        return x

    def gather_last(self, x: torch.Tensor, widths: tuple[int, ...] | None = None) -> torch.Tensor:
        """The ranks' ``x`` concatenated along the last dim, in rank order (``widths``: their last-dim sizes when
        they differ)."""
        n = x.shape[-1]
        rows = x.reshape(-1, n)
        out = self._gather(lambda a, b, slot: slot.copy_(rows[a:b]), rows.shape[0], n, x.dtype, GATHER, widths)
        return out.view(*x.shape[:-1], out.shape[-1])

    def gather_computed(self, compute: Callable[[int, int, torch.Tensor], object], rows: int, n: int,
                        dtype: torch.dtype, widths: tuple[int, ...] | None = None) -> torch.Tensor:
        """A ``(rows, n * world)`` tensor whose columns ``[r*n, (r+1)*n)`` rank ``r`` computed:
        ``compute(a, b, slot)`` writes this rank's rows ``a:b`` into ``slot`` (``(b - a, n)``, in shared
        memory), so an LM head's local logits never exist outside it. ``widths``: the ranks' ``n`` when they
        differ (rank r's columns follow those of the ranks before it; the output is ``sum(widths)`` wide)."""
        return self._gather(compute, rows, n, dtype, COMPUTED, widths)

    def _gather(self, compute: Callable[[int, int, torch.Tensor], object], rows: int, n: int, dtype: torch.dtype,
                kind: int, widths: tuple[int, ...] | None = None) -> torch.Tensor:
        size = dtype.itemsize
        if widths is not None and (len(widths) != self.world or widths[self.rank] != n):
            raise ValueError(f"rank {self.rank} gathers a piece of width {n} over {self.world} ranks, but the widths "
                             f"{list(widths)} give it {widths[self.rank] if self.rank < len(widths) else 'none'}")
        total, wide = (sum(widths), max(widths)) if widths is not None else (n * self.world, n)
        out = self.pool.empty((rows, total), dtype)
        per = max(1, self.slot // (wide * size))
        if per * wide * size > self.slot:
            raise ValueError(f"one row of {wide} {dtype} values does not fit a {self.slot}-byte shared-memory slot; "
                             f"set AUTOTP_SHM_BYTES higher or AUTOTP_SHM=0")
        words = self._describe(kind, rows * n * size, dtype, n) if widths is None else \
            self._describe(kind | UNEVEN, rows * total * size, dtype, uneven(widths))
        for a in range(0, max(1, rows), per):
            k = min(per, rows - a)
            slots = self._slots(k * n * size, dtype).view(self.world, k, n)
            self.seq += 1
            try:
                compute(a, a + k, slots[self.rank])
            except BaseException:  # this rank sends nothing: the others meet its next collective instead
                self.seq, self.epoch.calls = self.seq - 1, self.epoch.calls - (a == 0)
                raise
            while True:
                self._wait(0, words)
                part = out[a:a + k] if k < rows else out
                if widths is None:
                    part.view(k, self.world, n).copy_(slots.transpose(0, 1))
                else:  # each rank's piece, as wide as it is, at its offset
                    off = 0
                    for r, w in enumerate(widths):
                        part[:, off:off + w].copy_(self._slots(k * w * size, dtype)[r].view(k, w))
                        off += w
                if self._wait(1, words):
                    break
                self._differ(words)
        return out

    def _wait(self, phase: int, words: tuple[int, int, int] | None = None) -> bool:
        """Raise this rank's flag and wait for every rank's. ``words``, at phase 0: written beside the flag, before it;
        at phase 1: compared with every rank's, off the other ranks' way (a seq's words go in the bank of its parity,
        which no rank writes again before this one's next flag). Whether every rank wrote the same words."""
        seq, flags, base, bank = self.seq, self._flags, phase * self.world * _LINE, 1 + 3 * (self.seq & 1)
        if words is not None and not phase:
            i = self.rank * _LINE + bank
            flags[i], flags[i + 1], flags[i + 2] = words
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
        if words is not None and phase:
            a, b, c = words
            for i in self._others:
                i += bank
                if flags[i] != a or flags[i + 1] != b or flags[i + 2] != c:
                    return False
        return True

    def _differ(self, words: tuple[int, int, int]) -> None:
        """Some rank wrote other words (every rank read the same ones): raise, or, on a rank further on than some
        others, go on to the next seq, where they will come to this collective (they raise at this one)."""
        bank = 1 + 3 * (self.seq & 1)
        sent = [tuple(self._flags[r * _LINE + bank:r * _LINE + bank + 3]) for r in range(self.world)]
        ids = [w[2] for w in sent]
        if len(set(ids)) == 1:
            each = ", ".join(f"rank {r} {what(w)}" for r, w in enumerate(sent))
            raise RankError(f"shared-memory collective {self.seq} ({where(ids[0])} on every rank): the ranks send "
                            f"different tensors: {each}. Most likely the ranks gave the model inputs of different "
                            f"shapes: every rank must run the same forward on the same shapes (batch, sequence "
                            f"length). Every rank raises this; the next collective runs in step.")
        ahead = [r for r, i in enumerate(ids) if i == max(ids)]
        if self.rank not in ahead:
            each = ", ".join(f"rank {r} {what(w)} ({where(w[2])})" for r, w in enumerate(sent))
            raise RankError(f"rank {self.rank}: shared-memory collective {self.seq}: the ranks are out of step, ranks "
                            f"{ahead} are further on: {each}. A rank that caught an exception in a forward and went on "
                            f"to the next skips the rest of that forward (the exception is in its output), or the "
                            f"ranks' code differs: every rank must run the same forwards. This rank drops its forward "
                            f"{ids[self.rank] >> 32} here; ranks {ahead} wait in their collective until it reaches it.")
        behind = [r for r in range(self.world) if r not in ahead]
        log.warning("autotp: rank %d waits in shared-memory collective %d (%s) for ranks %s, behind: they raise "
                    "RankError and come to it", self.rank, self.seq, where(words[2]), behind)
        self.seq += 1

    def _check(self, phase: int, seq: int, waited: float) -> None:
        late = [r for r in range(self.world) if self._flags[(phase * self.world + r) * _LINE] < seq]
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


def setup(group, epoch=None) -> ShmSum | None:
    """A ShmSum for ``group`` if it is a gloo group whose ranks all map one piece of shared memory (else None,
    gloo stays). Every rank of the group must call it (it is collective); a rank that fails or exits during it
    makes every rank raise RankError."""
    if str(dist.get_backend(group)) != "gloo":
        return None
    try:
        s = ShmSum(group, epoch=epoch)
    except NoSharedMemory as e:
        if dist.get_rank(group) == 0:
            log.warning("autotp: %s; the group's sums stay on gloo", e)
        return None
    if s.rank == 0:
        log.info("autotp: sums and gathers of this %d-rank group go through shared memory", s.world)
    return s
