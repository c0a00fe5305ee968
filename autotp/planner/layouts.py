"""Layouts and what a rule may raise: the vocabulary shared by the rule tables.

A value's layout is ``None`` (replicated, R) or ``Shard(dim)``. A rule maps the layouts
of a node's inputs to its output layout, or raises ``Need`` / ``NoRule`` / ``Rep``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class Shard:
    """Sharded along ``dim``: ``tp // rep`` blocks, rank r holds block ``r // rep``.

    ``rep > 1`` when there are fewer blocks (KV heads) than ranks: each block lives on ``rep``
    ranks. ``spread``: a broadcast dim (expanded from 1, e.g. repeat_kv's copies) that the
    ``rep`` ranks of a block split among themselves; merging it with ``dim`` gives a plain shard.
    """

    dim: int  # non-negative
    root: str | None = None  # column node whose whole output this is (for fused q|k|v splits)
    rep: int = 1
    spread: int | None = None
    # ``dim`` merges leading dims of this total size with the sharded one (Bloom's batch * heads): it is
    # (outer, sharded) in row-major order, and each rank holds its block of the sharded part for every outer index
    outer: int | None = None
    # an uneven split (``split=`` on the group's lines): ``dim`` is cut into ``sum(parts)`` whole units and rank r
    # holds ``parts[r]`` of them; the rules see ``ctx.tp == sum(parts)`` for values of such a group
    parts: tuple[int, ...] | None = None

    def local(self, shape: tuple[int, ...] | list[int], tp: int, rank: int = 0) -> list[int]:
        s = list(shape)
        if self.parts is not None:
            s[self.dim] = s[self.dim] * self.parts[rank] // sum(self.parts)
            return s
        s[self.dim] = s[self.dim] * self.rep // tp
        if self.spread is not None:
            s[self.spread] //= self.rep
        return s


class Rep(Exception):
    """Fewer heads than ranks: restart the group with column ``root`` giving each block to ``rep`` ranks."""

    def __init__(self, root: str, rep: int) -> None:
        super().__init__(f"{root}: {rep} ranks per block")
        self.root, self.rep = root, rep


class NoRule(Exception):
    """The op cannot take this sharded input; ``indivisible`` marks a tp that does not divide a size."""

    def __init__(self, reason: str, *, sizes: tuple[int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason, self.sizes = reason, sizes


class Need(Exception):
    def __init__(self, value: fx.Node, layout: Shard) -> None:
        super().__init__(f"{value.name} must be sharded on dim {layout.dim}")
        self.value, self.layout = value, layout


class Ctx:
    """What a rule may ask of the planner (implemented there)."""

    tp: int

    def layout(self, n: Any) -> Shard | None: ...
    def shape(self, n: Any) -> tuple[int, ...] | None: ...
    def segments(self, root: str, sizes: list[int], node: fx.Node) -> None: ...
    def piece(self, root: str, total: int, start: int, end: int, node: fx.Node) -> None: ...
    def shape_const(self, node: fx.Node, pos: int, global_: int, local: int) -> None: ...


def tensor_args(ctx: Ctx, node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if ctx.shape(a) is not None else None)
    return out


def _norm(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _divisible(ctx: Ctx, size: int, node: fx.Node, what: str, rep: int = 1) -> None:
    if size % (ctx.tp // rep):
        raise NoRule(f"{what} of size {size} at {node.name} is not divisible by tp={ctx.tp}", sizes=(size,))


def _plain(lay: Shard, node: fx.Node) -> None:
    if lay.spread is not None:
        raise NoRule(f"{node.name}: a repeated KV head must be merged into the head dim first")
    if lay.outer is not None:
        raise NoRule(f"{node.name} ({node.target}) reads heads merged with the batch dim")
