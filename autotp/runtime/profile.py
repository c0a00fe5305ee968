"""Where a sharded model's forward (and backward) spends its time: computing, or in collectives.

``profile(model, inputs)`` runs a model parallelized by ``autotp.parallelize`` (or any model: one at
tp=1 has no collectives) and splits this rank's wall time per *unit*:

- a group: the column layers plus the row layer closing them (one all-reduce forward, one backward).
  Its forward runs from the call of its first column layer to the end of its row layer, so attention
  or an activation between them is the group's compute; its backward runs from the gradient of the
  row layer's output to the gradient of the column layers' input (the f all-reduce included);
- a vocabulary-sharded lookup, an all-gathered head, and an experts module sharded in place: each a
  unit of its own;
- ``other``: everything outside the units (norms, residuals, replicated layers).

Hooks sit on the sharded layers only while ``profile`` runs, and collectives are timed through
``collectives.timed``: a model that is not being profiled pays nothing for it. Collectives are
synchronous, so their time includes waiting for slower ranks; each call starts after a barrier.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.capture.inputs import call, main_tensor
from autotp.plan import common_path
from autotp.runtime import collectives
from autotp.runtime.layers import ColumnParallelLinear, RowParallelLinear

PHASES = ("forward", "backward")


@dataclass(frozen=True)
class Row:
    """One unit's cost per call in one phase: compute and collective seconds, collectives, payload bytes.

    ``bytes`` is the size of the tensors reduced, and of the gathered outputs (not the wire traffic).
    """

    name: str
    kind: str  # 'group', 'vocab', 'gather', 'experts', 'other' or 'total'
    layers: tuple[str, ...]
    compute_s: float
    comm_s: float
    collectives: int
    bytes: int

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def comm_share(self) -> float:
        """The fraction of this row's time spent in collectives."""
        return self.comm_s / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class Pass:
    """The forward or the backward of a profile: the wall time per call and its rows (units, then 'other')."""

    phase: str
    wall_s: float
    rows: tuple[Row, ...]

    @property
    def total(self) -> Row:
        """All rows together: compute is the wall time less the collectives."""
        comm = sum(r.comm_s for r in self.rows)
        return Row("total", "total", (), self.wall_s - comm, comm, sum(r.collectives for r in self.rows),
                   sum(r.bytes for r in self.rows))

    @property
    def groups(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if r.kind == "group")

    def row(self, name: str) -> Row:
        """The row of the unit ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no unit '{name}' in the {self.phase} profile; units: {[r.name for r in self.rows]}")


@dataclass(frozen=True)
class Profile:
    """What ``profile`` measured on this rank, per call (the mean over ``reps`` calls)."""

    model: str
    tp: int
    rank: int
    reps: int
    forward: Pass
    backward: Pass | None = None

    @property
    def passes(self) -> tuple[Pass, ...]:
        return (self.forward,) if self.backward is None else (self.forward, self.backward)

    def summary(self) -> str:
        """One line per pass: compute, communication, collectives, bytes and the communication share."""
        return "\n".join(
            f"{p.phase} at tp={self.tp} (rank {self.rank}, mean of {self.reps}): {p.total.compute_s * 1e3:.2f} ms "
            f"compute, {p.total.comm_s * 1e3:.2f} ms in {_count(p.total.collectives, 'collective')} "
            f"({_size(p.total.bytes)}): {p.total.comm_share:.1%} communication" for p in self.passes)

    def __str__(self) -> str:
        lines = [f"profile of {self.model} at tp={self.tp}, rank {self.rank}: per call, mean of {self.reps}"]
        for p in self.passes:
            lines += ["", *_table(p)]
        return "\n".join(lines)


def _table(p: Pass) -> list[str]:
    """One pass as aligned columns: a line per unit, then 'other' and 'total'."""
    width = max([len(p.phase.upper())] + [len(r.name) for r in p.rows])
    head = (f"{p.phase.upper():{width}}  {'KIND':7}  {'LAYERS':>6}  {'COMPUTE ms':>10}  {'COMM ms':>8}  "
            f"{'COMM %':>6}  {'COLLECTIVES':>11}  {'BYTES':>10}")
    out = [head]
    for r in (*p.rows, p.total):
        kind = r.kind if r.kind not in ("other", "total") else ""
        out.append(f"{r.name:{width}}  {kind:7}  {len(r.layers) or '':>6}  {r.compute_s * 1e3:10.3f}  "
                   f"{r.comm_s * 1e3:8.3f}  {r.comm_share:6.1%}  {r.collectives:11d}  {_size(r.bytes):>10}")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _size(n: int) -> str:
    """Bytes in B, KiB or MiB."""
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass
class _Unit:
    key: str  # the row layer of a group; the module of a vocabulary lookup or a gathered head
    kind: str
    layers: tuple[str, ...]


@dataclass
class _Span:
    """One forward run of a unit in progress; the key of a group is known once its row layer runs."""

    start: float
    layers: list[str] = field(default_factory=list)
    key: str | None = None


class _Recorder:
    """Forward and tensor hooks on the sharded layers: regions per unit, and the label of collectives."""

    def __init__(self, device: torch.device):
        self.device = device
        self.units: dict[str, _Unit] = {}  # in the order they first ran
        self.region: Counter = Counter()  # (key, phase) -> seconds
        self.wall: Counter = Counter()  # phase -> seconds
        self.group: _Span | None = None  # a group whose column layers ran, its row layer not yet
        self.single: _Span | None = None
        self.back: tuple[str, float] | None = None  # the unit whose backward is running, since when

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        """Hooks on every sharded layer of ``model`` for the duration."""
        handles = []
        for path, mod in model.named_modules():
            kind = _kind(mod)
            if kind == "column":
                handles.append(mod.register_forward_pre_hook(self._column(path)))
            elif kind == "row":
                handles += [mod.register_forward_pre_hook(self._row_before(path)),
                            mod.register_forward_hook(self._row_after())]
            elif kind is not None:
                handles += [mod.register_forward_pre_hook(self._single_before(path), prepend=True, with_kwargs=True),
                            mod.register_forward_hook(self._single_after(kind))]
        old = collectives.set_label(None)
        try:
            yield
        finally:
            collectives.set_label(old)
            for h in handles:
                h.remove()

    def step(self, model: nn.Module, inputs: tuple | dict, backward: bool) -> None:
        """One timed forward (and backward of the mean square of its output)."""
        with torch.set_grad_enabled(backward):
            t0 = self.now()
            out = call(model, inputs)
            self.wall["forward"] += self.now() - t0
        if backward:
            loss = main_tensor(out).float().pow(2).mean()
            t0 = self.now()
            loss.backward()
            t1 = self.now()
            self._end_back(t1)
            self.wall["backward"] += t1 - t0

    def _column(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if self.group is None:
                self.group = _Span(self.now())
            self.group.layers.append(path)
            self._end_on_grad(args, self.group)
        return hook

    def _row_before(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if self.group is None:  # a row layer closing no column layer (a plan written by hand)
                self.group = _Span(self.now())
            self.group.layers.append(path)
            self.group.key = path
            collectives.set_label(path)
        return hook

    def _row_after(self) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            span, self.group = self.group, None
            self._close(span, "group", out)
            collectives.set_label(None)
        return hook

    def _single_before(self, path: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self.single = _Span(self.now(), [path], path)
            self._end_on_grad((*args, *kwargs.values()), self.single)
            collectives.set_label(path)
        return hook

    def _single_after(self, kind: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            self._close(self.single, kind, out)
            collectives.set_label(self.group.key if self.group is not None else None)
        return hook

    def _close(self, span: _Span, kind: str, out: Any) -> None:
        """The end of a unit's forward; its backward starts at the gradient of ``out``."""
        self.region[(span.key, "forward")] += self.now() - span.start
        self.units.setdefault(span.key, _Unit(span.key, kind, tuple(span.layers)))
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad, key=span.key: self._start_back(key))

    def _start_back(self, key: str) -> None:
        t = self.now()
        self._end_back(t)  # a unit whose input gradient never came (its input needs none) ends here
        self.back = (key, t)
        collectives.set_label(key)

    def _end_on_grad(self, args: tuple, span: _Span) -> None:
        """End the unit's backward when the gradient of its input is complete (after the f all-reduce)."""
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad and torch.is_grad_enabled():
                a.register_hook(lambda grad: self._end_back(self.now(), span.key))

    def _end_back(self, t: float, key: str | None = None) -> None:
        if self.back is None or (key is not None and self.back[0] != key):
            return
        running, since = self.back
        self.region[(running, "backward")] += t - since
        self.back = None
        collectives.set_label(None)


def _kind(mod: nn.Module) -> str | None:
    """'column' (opens a group), 'row' (closes it), 'gather', 'vocab', 'experts', or None (not sharded)."""
    if isinstance(mod, RowParallelLinear) and mod.tp > 1:
        return "row"
    if isinstance(mod, ColumnParallelLinear) and mod.tp > 1:
        return "gather" if mod.gather else "column"
    if getattr(mod, "_autotp_experts", None):
        return "experts"
    return "vocab" if getattr(mod, "_autotp_vocab", None) else None


def profile(model: nn.Module, inputs: Any, *, reps: int = 10, warmup: int = 2, backward: bool = False) -> Profile:
    """Time ``model(*inputs)`` (``**inputs`` for a dict) ``reps`` times after ``warmup`` calls, per unit.

    ``backward``: also time the backward of the mean square of the output (gradients are accumulated
    during the runs and restored afterwards). Without it the forwards run under ``torch.no_grad()``.
    Every rank must call it (the collectives pair up); each gets its own measurements.

    >>> print(autotp.profile(autotp.parallelize(model, tp=2, example_inputs=(x,)), (x,)))  # doctest: +SKIP
    """
    if reps < 1 or warmup < 0:
        raise ValueError(f"profile needs reps >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    inputs = inputs if isinstance(inputs, (tuple, dict)) else (inputs,)
    sharded = [m for m in model.modules() if _kind(m) is not None]
    linear = [m for m in sharded if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    group = linear[0].group if linear else None
    tp = linear[0].tp if linear else dist.get_world_size() if sharded else 1
    param = next(model.parameters(), None)
    rec = _Recorder(param.device if param is not None else torch.device("cpu"))
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        for _ in range(warmup):
            rec.step(model, inputs, backward)
        rec.wall.clear()
        with rec.attached(model), collectives.timed() as tally:
            for _ in range(reps):
                if tp > 1:
                    dist.barrier(group)
                rec.step(model, inputs, backward)
    finally:
        for p, g in grads:
            p.grad = g
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    passes = [_pass(phase, rec, tally, reps) for phase in PHASES[: 1 + backward]]
    return Profile(type(model).__name__, tp, rank, reps, *passes)


def _pass(phase: str, rec: _Recorder, tally: collectives.Tallies, reps: int) -> Pass:
    """The rows of one phase, per call: units in the order they ran, then what ran outside them."""
    names = _names(rec.units)
    rows, in_units = [], 0.0
    for key, unit in rec.units.items():
        t = tally.get((key, phase), collectives.Tally())
        region = rec.region.get((key, phase), 0.0)
        if region or t.calls:
            rows.append(Row(names[key], unit.kind, unit.layers, (region - t.seconds) / reps, t.seconds / reps,
                            t.calls // reps, t.bytes // reps))
        in_units += region
    rest = [t for (label, ph), t in tally.items() if ph == phase and label not in rec.units]
    comm = sum(t.seconds for t in rest)
    rows.append(Row("other", "other", (), (rec.wall[phase] - in_units - comm) / reps, comm / reps,
                    sum(t.calls for t in rest) // reps, sum(t.bytes for t in rest) // reps))
    return Pass(phase, rec.wall[phase] / reps, tuple(rows))


def _names(units: dict[str, _Unit]) -> dict[str, str]:
    """A group is named by the module holding all its layers (``h.0.attn``), or by its row layer when that
    module holds several groups or is the model itself; other units by their module."""
    holder = {k: common_path([p.rpartition('.')[0] for p in u.layers]) for k, u in units.items() if u.kind == "group"}
    taken = Counter(holder.values())
    return {k: holder[k] if holder.get(k) and taken[holder[k]] == 1 else k for k in units}
