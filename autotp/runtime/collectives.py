"""Megatron's f/g pair as autograd functions over torch.distributed collectives.

Eager code sums in place (on the layer's own output when it owns it): through the group's shared
memory (``runtime.transports.shm``, ranks on one host) or ``dist.all_reduce``. Code compiled by
``torch.compile`` uses the functional collectives, which dynamo traces.

``copy_to_tp``   (f): identity forward, all-reduce of the gradient backward.
``reduce_from_tp`` (g): all-reduce forward, identity backward.
``gather_from_tp``: all-gather of the last dim forward, this rank's slice of the gradient backward.

Every collective goes through :func:`all_reduce`, :func:`all_gather_last` or :func:`gather_linear`
(an LM head's matmul and gather in one, on shared memory without autograd). Inside :func:`counting`
(``autotp.count_collectives``) they count calls and bytes, whatever the transport (in eager mode: not inside
``torch.compile``d code), so tests can assert exactly how much communication a forward/backward costs.
A layer built with the group :data:`NO_COMM` communicates nothing (the plan's shape check on meta copies).
Inside :func:`timed` (the profiler) each one is also timed and tallied under the label set by
:func:`set_label`; outside it, a collective pays one flag check for this. Each parallelized model's root
forward counts itself on its group's :class:`Epoch`, which the shared-memory transport sends with every
message, so that ranks out of step raise instead of mixing up their messages.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.utils._python_dispatch import TorchDispatchMode

from autotp.runtime.transports import buffers

_COUNTING: list[Counter] = []  # the counters of the active counting() blocks, innermost last


class _NoComm:
    """A stand-in group whose collectives do nothing: layers built with it run at local shapes on meta copies
    (the plan's shape check) without a process group, and without touching any other model's collectives."""

    def __repr__(self) -> str:
        return "NO_COMM"


NO_COMM = _NoComm()


@dataclass
class Tally:
    """Collectives issued under one (label, phase): how many, their payload bytes, their wall time."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


Tallies = dict[tuple[str | None, str], Tally]
_TALLY: list[Tallies | None] = [None]  # set inside timed()
_LABEL: list[str | None] = [None]


@contextlib.contextmanager
def counting() -> Iterator[Counter]:
    """Count the collectives issued inside the block, on every transport (eager code; compiled graphs keep no
    Python side effects): ``all_reduce.forward``, ``all_reduce.backward``, ``all_gather.forward`` and the payload
    ``bytes.forward`` / ``bytes.backward``. Nested blocks each count what runs inside them.

    >>> with counting() as n:  # doctest: +SKIP
    ...     model(x).sum().backward()
    >>> n["all_reduce.forward"], n["all_reduce.backward"]  # doctest: +SKIP
    (4, 4)
    """
    c: Counter = Counter()
    _COUNTING.append(c)
    try:
        with _FunctionalCounts() if DTENSOR_MODULES and len(_COUNTING) == 1 else contextlib.nullcontext():
            yield c
    finally:
        _COUNTING.remove(c)


_MESHES: dict[int, Any] = {}


def mesh_of(group: Any):
    """The one-dimensional DeviceMesh of ``group`` (for DTensors over it), made once per group."""
    from torch.distributed.device_mesh import DeviceMesh

    if id(group) not in _MESHES:
        _MESHES[id(group)] = DeviceMesh.from_group(group, "cpu")
    return _MESHES[id(group)]


DTENSOR_MODULES: list[Any] = []  # 'global' modules installed in this process: their DTensors communicate too
_FUNCTIONAL = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
               "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}


class _FunctionalCounts(TorchDispatchMode):
    """Counts the functional collectives DTensor issues for a 'global' module's redistributions (in forward and,
    inside the autograd engine, in backward), beside autotp's own, which never take this path in eager code."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = _FUNCTIONAL.get(func._opname) if func.namespace == "_c10d_functional" else None
        if kind is not None and isinstance(out, torch.Tensor):
            phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            _count(kind, phase, out.numel() * out.element_size())
        return out


def _count(kind: str, phase: str, nbytes: int) -> None:
    for c in _COUNTING:
        c[f"{kind}.{phase}"] += 1
        c[f"bytes.{phase}"] += nbytes


@contextlib.contextmanager
def timed() -> Iterator[Tallies]:
    """Time every collective (synchronously) into the yielded dict, keyed by ``(label, phase)``.

    The label is whatever :func:`set_label` set last (None: no unit of the model claimed it).
    """
    tally: Tallies = {}
    old, _TALLY[0] = _TALLY[0], tally
    try:
        yield tally
    finally:
        _TALLY[0] = old


def set_label(label: str | None) -> str | None:
    """Attribute the collectives timed from now on to ``label``; returns the previous label."""
    old, _LABEL[0] = _LABEL[0], label
    return old


def _timed(op: Callable[..., torch.Tensor], x: torch.Tensor, *args, phase: str, nbytes: int) -> torch.Tensor:
    """``op(x, *args)`` (a collective) run to completion and added to the current tally."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    out = op(x, *args)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    t = _TALLY[0].setdefault((_LABEL[0], phase), Tally())
    t.calls, t.bytes, t.seconds = t.calls + 1, t.bytes + nbytes, t.seconds + time.perf_counter() - t0
    return out


def _reduce(x: torch.Tensor, group, owned: bool) -> torch.Tensor:
    """Eager: one in-place ``dist.all_reduce`` (of ``x`` itself when the caller owns it, else of a copy).
    Compiled: the functional collective, which dynamo traces."""
    if torch.compiler.is_compiling():
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))
    y = x if owned and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    return _sum(y, group)


_SHM: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> its transports.shm.ShmSum, if it has one


class Epoch:
    """Where this rank is in the forwards of a group's parallelized models: ``forwards`` counts their root forwards
    (``runtime.apply.apply_plan`` registers the group's Epoch as a forward pre-hook on each), ``calls`` the
    collectives issued since the last one began (the shared-memory transport adds them). Collectives in backward,
    in a ``generate()``'s forwards or in a submodule called directly are numbered the same way on every rank that
    runs the same code, so the pair names a collective alike on ranks in step, and differently on a rank that
    abandoned a forward (caught an exception) and went on to the next one. Compiled code counts nothing."""

    __slots__ = ("forwards", "calls")

    def __init__(self) -> None:
        self.forwards = self.calls = 0

    def __call__(self, module: Any, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.forwards += 1
            self.calls = 0


_EPOCHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> its Epoch


def epoch_of(group) -> Epoch:
    """The process-wide :class:`Epoch` of ``group`` (None: the world), made on first use."""
    key = group if group is not None else dist.group.WORLD
    e = _EPOCHS.get(key)
    if e is None:
        e = _EPOCHS[key] = Epoch()
    return e


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> buffers.Pool of its gloo gathers


def _pool(group) -> buffers.Pool:
    key = group if group is not None else dist.group.WORLD
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = buffers.Pool()
    return pool


def shared_memory_of(group) -> Any:
    """The ``autotp.runtime.transports.shm.ShmSum`` that ``group`` (None: the world) communicates through, or None."""
    try:
        return _SHM.get(group if group is not None else dist.group.WORLD)
    except TypeError:  # not a group object (no process group initialized)
        return None


def use_shared_memory(group) -> bool:
    """Sum over ``group`` through shared memory from now on, if its ranks share this host (collective:
    every rank calls it). See ``runtime.transports.shm``; ``parallelize`` calls it unless ``AUTOTP_SHM=0``."""
    from autotp.runtime.transports.shm import setup

    group = group if group is not None else dist.group.WORLD
    if group not in _SHM:
        s = setup(group, epoch_of(group))
        if s is None:
            return False
        _SHM[group] = s
    return True


def _span(name: str) -> contextlib.AbstractContextManager:
    """A named torch.profiler span while a profiler records (shared-memory collectives have no op of
    their own to show); nothing otherwise, since opening one costs more than a decode step's sum."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def _sum(y: torch.Tensor, group) -> torch.Tensor:
    """``y`` summed over ``group`` in place (eager)."""
    s = shared_memory_of(group)
    if s is None or y.device.type != "cpu":
        dist.all_reduce(y, group=group)
        return y
    with _span("autotp::shm_all_reduce"):
        return s(y)


def _gather(x: torch.Tensor, group, widths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Eager: into one preallocated output. On gloo, whose all-gather is slower than its all-reduce of
    the same bytes, each rank writes its slice into a zeroed full-width buffer and the ranks all-reduce
    it (exact: every other term is zero). With a shared-memory group (``transports.shm``): copied side by side.
    ``widths``: the ranks' last-dim sizes when they differ (an uneven split), in rank order; where a collective
    takes equal pieces (compiled, NCCL), each is padded to the widest and the gathered ones trimmed."""
    n = x.shape[-1]
    wide = max(widths) if widths is not None else n
    if torch.compiler.is_compiling():
        full = funcol.wait_tensor(funcol.all_gather_single(_padded(x, wide), x.dim() - 1, group))
        return full if widths is None else torch.cat([p[..., :w] for p, w in zip(full.split(wide, -1), widths)], -1)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    check_widths(widths, n, rank, tp)
    s = shared_memory_of(group)
    if s is not None and x.device.type == "cpu":
        with _span("autotp::shm_all_gather"):
            return s.gather_last(x.contiguous(), widths)
    if str(dist.get_backend(group)) == "gloo":
        total, off = (sum(widths), sum(widths[:rank])) if widths is not None else (n * tp, rank * n)
        shape = (*x.shape[:-1], total)
        full = (_pool(group).empty(shape, x.dtype) if x.device.type == "cpu" else x.new_empty(shape)).zero_()
        full[..., off:off + n] = x
        return _sum(full, group)
    out = x.new_empty((tp, *x.shape[:-1], wide))
    dist.all_gather_into_tensor(out, _padded(x, wide), group=group)
    if widths is None:
        return out.movedim(0, -2).reshape(*x.shape[:-1], n * tp)  # (tp, ..., n) -> (..., tp * n)
    return torch.cat([out[r, ..., :w] for r, w in enumerate(widths)], -1)


def _padded(x: torch.Tensor, wide: int) -> torch.Tensor:
    return (x if x.shape[-1] == wide else torch.nn.functional.pad(x, (0, wide - x.shape[-1]))).contiguous()


def check_widths(widths: tuple[int, ...] | None, n: int, rank: int, tp: int) -> None:
    """An uneven gather's ``widths`` name every rank, and this rank's piece is as wide as they say."""
    if widths is not None and (len(widths) != tp or widths[rank] != n):
        raise ValueError(f"rank {rank} of {tp} gathers a piece of width {n}, but the widths {list(widths)} "
                         + (f"give it {widths[rank]}" if len(widths) == tp else f"name {len(widths)} ranks"))


def all_reduce(x: torch.Tensor, group, phase: str, *, owned: bool = False) -> torch.Tensor:
    """Sum ``x`` over ``group``; ``phase`` ('forward'/'backward') is what gets counted.

    ``owned``: the caller made ``x`` and reads it nowhere else, so it may be summed in place.
    """
    if group is NO_COMM or x.device.type == "meta":
        return x
    nbytes = x.numel() * x.element_size()
    if _COUNTING and not torch.compiler.is_compiling():  # compiled graphs keep no Python side effects
        _count("all_reduce", phase, nbytes)
    if _TALLY[0] is not None:
        return _timed(_reduce, x, group, owned, phase=phase, nbytes=nbytes)
    return _reduce(x, group, owned)


def all_gather_last(x: torch.Tensor, group, tp: int, widths: tuple[int, ...] | None = None) -> torch.Tensor:
    """Concatenate the ``tp`` ranks' ``x`` along its last dim (rank order); counted bytes are the gathered size.
    ``widths``: the ranks' sizes of that dim, in rank order, when they differ (a layer split unevenly)."""
    if group is NO_COMM or x.device.type == "meta":  # shape checks: the gathered shape, no data
        return x.repeat(*([1] * (x.dim() - 1)), tp) if widths is None else x.new_zeros((*x.shape[:-1], sum(widths)))
    nbytes = x.numel() * x.element_size() * tp if widths is None else \
        x.numel() // x.shape[-1] * sum(widths) * x.element_size()
    if _COUNTING and not torch.compiler.is_compiling():
        _count("all_gather", "forward", nbytes)
    if _TALLY[0] is not None:
        return _timed(_gather, x, group, widths, phase="forward", nbytes=nbytes)
    return _gather(x, group, widths)


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_out: bool, group,
                  tp: int, widths: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """The all-gathered output of a column-split linear (an LM head), for forwards without autograd,
    computed on a shared-memory group: each piece of rows goes straight into this rank's slot, so the
    local logits are never a tensor of their own and are copied once, into the full-width output.
    Counted as one all-gather. None where that does not apply (no shared memory, not on the CPU,
    compiled, dry, or profiling, which times the matmul and the gather apart): the caller runs its
    linear and :func:`all_gather_last` instead. ``widths``: the ranks' output widths when they differ.
    """
    s = None if torch.compiler.is_compiling() or group is NO_COMM else shared_memory_of(group)
    if s is None or x.device.type != "cpu" or _TALLY[0] is not None or x.dtype != weight.dtype:
        return None
    w = weight if in_out else weight.t()  # (in, n)
    rows, n = x.reshape(-1, x.shape[-1]), w.shape[1]
    total = sum(widths) if widths is not None else n * tp
    if _COUNTING:
        _count("all_gather", "forward", rows.shape[0] * total * x.element_size())

    def compute(a: int, b: int, out: torch.Tensor) -> None:
        if bias is None:
            torch.mm(rows[a:b], w, out=out)
        else:
            torch.addmm(bias, rows[a:b], w, out=out)

    with _span("autotp::shm_linear_all_gather"):
        out = s.gather_computed(compute, rows.shape[0], n, x.dtype, widths)
    return out.view(*x.shape[:-1], total)


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)
