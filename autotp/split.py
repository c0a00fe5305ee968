"""Which slice of each tensor a rank holds: the one place that says it.

A plan line divides its module's parameters among ranks (``split_of``); the sharded layers slice with
it, shard-on-load reads exactly those index ranges, sharded checkpoints are merged with it, and the parity
checks compare each rank's parameters and gradients with that slice of the dense ones. Pure: sizes and
``Entry``s in, index ranges out (``Split.take`` applies them to a tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from autotp.plan import Entry

SHARDING = ("colwise", "rowwise", "vocab", "experts")  # the styles whose lines split parameters


def balanced(units: int, tp: int) -> tuple[int, ...]:
    """``units`` whole units (heads, KV groups, blocks of features, rows) over ``tp`` ranks, as evenly as they go:
    the first ``units % tp`` ranks hold one more.

    >>> balanced(9, 2), balanced(3, 2), balanced(12, 5)
    ((5, 4), (2, 1), (3, 3, 2, 2, 2))
    """
    if units < tp:
        raise ValueError(f"{units} units cannot be spread over {tp} ranks")
    return tuple(units // tp + (1 if r < units % tp else 0) for r in range(tp))


def shard_ranges(size: int, rank: int, tp: int, segments: Sequence[int] | None = None,
                 parts: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Index ranges along one dim that ``rank`` keeps.

    Each segment (a fused projection's q|k|v parts; one segment by default) is split
    into ``tp`` equal contiguous pieces and rank ``r`` keeps piece ``r`` of every segment.
    ``parts`` (an uneven split, ``split=`` on a plan line): each segment is cut into ``sum(parts)`` equal units
    and rank ``r`` keeps ``parts[r]`` of them, after those of the ranks before it.

    >>> shard_ranges(12, 1, 2, [4, 4, 4])
    [(2, 4), (6, 8), (10, 12)]
    >>> shard_ranges(18, 1, 2, [9, 3, 6], parts=(2, 1))
    [(6, 9), (11, 12), (16, 18)]
    """
    segments = list(segments) if segments else [size]
    if sum(segments) != size:
        raise ValueError(f"segments {segments} do not add up to size {size}")
    if parts is not None and len(parts) != tp:
        raise ValueError(f"split {','.join(map(str, parts))} names {len(parts)} ranks, not tp={tp}")
    units = sum(parts) if parts is not None else tp
    first = sum(parts[:rank]) if parts is not None else rank
    mine = parts[rank] if parts is not None else 1
    out, off = [], 0
    for seg in segments:
        if seg % units:
            raise ValueError(f"segment of size {seg} is not divisible by "
                             + (f"the {units} units of split {','.join(map(str, parts))}" if parts else f"tp={tp}"))
        step = seg // units
        out.append((off + first * step, off + (first + mine) * step))
        off += seg
    return out


def held(parts: Sequence[int], rep: int, rank: int) -> tuple[int, int, int]:
    """(first, count, of how many) of the blocks ``rank`` holds under an uneven split: with ``rep == 1`` the
    split's units themselves; with ``rep > 1`` every ``rep`` consecutive units share one block (a KV head and its
    query heads), and a rank holds each block any of its units lie in (several ranks may hold one block).

    >>> held((2, 1, 3, 3), 3, 1), held((2, 1, 3, 3), 3, 2), held((6, 3), 3, 0)
    ((0, 1, 3), (1, 1, 3), (0, 2, 3))
    """
    a = sum(parts[:rank])
    b = a + parts[rank]
    if rep == 1:
        return a, parts[rank], sum(parts)
    return a // rep, -(-b // rep) - a // rep, sum(parts) // rep


def aligned(parts: Sequence[int], rep: int) -> bool:
    """Every rank's units lie inside one block of ``rep`` units, or cover whole blocks."""
    a = 0
    for p in parts:
        b = a + p
        if not (a // rep == (b - 1) // rep or (a % rep == 0 and b % rep == 0)):
            return False
        a = b
    return True


def grouped(units: int, rep: int, tp: int) -> tuple[int, ...] | None:
    """An uneven split of ``units`` over ``tp`` ranks that keeps every block of ``rep`` units (a KV group) on ranks
    of its own: whole blocks per rank where there are at least tp blocks, else each block's units spread over the
    ranks given to it. None if a block would need more ranks than it has units.

    >>> grouped(9, 3, 4), grouped(14, 7, 4), grouped(9, 3, 2)
    ((2, 1, 3, 3), (4, 3, 4, 3), (6, 3))
    """
    blocks = units // rep
    if blocks >= tp:
        return tuple(p * rep for p in balanced(blocks, tp))
    out: list[int] = []
    for ranks in balanced(tp, blocks):
        if ranks > rep:
            return None
        out += balanced(rep, ranks)
    return tuple(out)


@dataclass(frozen=True)
class Split:
    """How a plan line divides a tensor among ranks: along ``dim`` (None: every rank holds all of it) into
    ``tp // rep`` blocks, each fused segment (``seg=``) separately; ``rep`` neighbouring ranks share a block.
    ``parts`` (``split=``): uneven blocks, rank r holding ``parts[r]`` of ``sum(parts)`` units of each segment
    (with ``rep > 1``: the blocks of ``rep`` units its units lie in, ``held``)."""

    dim: int | None = None
    tp: int = 1
    rep: int = 1
    segments: tuple[int, ...] | None = None
    parts: tuple[int, ...] | None = None

    def ranges(self, size: int, rank: int) -> list[tuple[int, int]]:
        """Index ranges along ``dim`` of a full tensor (``size`` long there) that ``rank`` holds."""
        if self.parts is not None and self.rep > 1:
            first, n, total = held(self.parts, self.rep, rank)
            out = []
            for a, b in _seg_ranges(size, self.segments or (size,)):
                if (b - a) % total:
                    raise ValueError(f"segment of size {b - a} is not divisible by the {total} blocks of split "
                                     f"{','.join(map(str, self.parts))} with rep={self.rep}")
                step = (b - a) // total
                out.append((a + first * step, a + (first + n) * step))
            return out
        return shard_ranges(size, rank // self.rep, self.tp // self.rep, self.segments, self.parts)

    def take(self, full: torch.Tensor, rank: int) -> torch.Tensor:
        """The part of ``full`` that ``rank`` holds: a contiguous copy (the full tensor can be freed), or
        ``full`` itself when nothing is split."""
        if self.dim is None:
            return full
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges(full.shape[self.dim], rank)]
        if len(parts) == 1:  # a copy, so the full storage is not kept alive by a view
            return parts[0].clone(memory_format=torch.contiguous_format)
        return torch.cat(parts, self.dim)

    def local_shape(self, shape: Sequence[int], rank: int = 0) -> tuple[int, ...]:
        """The shape ``rank`` holds of a full tensor of ``shape`` (the same on every rank unless ``parts``)."""
        if self.dim is None:
            return tuple(shape)
        n, d = self._share(rank)
        return tuple(s * n // d if i == self.dim else s for i, s in enumerate(shape))

    def full_shape(self, local: Sequence[int], rank: int = 0) -> tuple[int, ...]:
        """The shape of the full tensor of which ``rank`` holds ``local``."""
        if self.dim is None:
            return tuple(local)
        n, d = self._share(rank)
        return tuple(s * d // n if i == self.dim else s for i, s in enumerate(local))

    def _share(self, rank: int) -> tuple[int, int]:
        """``rank``'s share of the split dim as a fraction (numerator, denominator)."""
        if self.parts is not None:
            _, n, total = held(self.parts, self.rep, rank)
            return n, total
        return 1, self.tp // self.rep


def _seg_ranges(size: int, segments: Sequence[int]) -> list[tuple[int, int]]:
    out, off = [], 0
    for seg in segments:
        out.append((off, off + seg))
        off += seg
    if off != size:
        raise ValueError(f"segments {list(segments)} do not add up to size {size}")
    return out


def parts_of(entry: Entry | None) -> tuple[int, ...] | None:
    """A line's uneven split (``split=5,4``: the units each rank holds), or None for an even one."""
    p = entry.ints("split") if entry is not None else None
    return tuple(p) if p else None


def split_of(entry: Entry | None, leaf: str, tp: int) -> Split:
    """The split of parameter ``leaf`` of a module planned by ``entry``, as ``runtime.layers`` slices it.

    colwise: the output dim (dim 1 of an ``in_out`` weight, else 0; a bias: 0), with ``seg=`` and ``rep=``;
    rowwise: the weight's input dim (the bias is added once, whole); vocab: the table's rows; experts: the
    ``col=`` weights' output dim (with ``seg=``), the ``row=`` weights' input dim, of every expert.

    >>> split_of(Entry("attn.c_attn", "colwise", (("w", "in_out"), ("seg", "4,4,4"))), "weight", 2).ranges(12, 1)
    [(2, 4), (6, 8), (10, 12)]
    """
    if entry is None or tp == 1:
        return Split()
    in_out = entry.get("w") == "in_out"
    if entry.style == "colwise" and leaf in ("weight", "bias"):
        seg = entry.ints("seg")
        dim = 1 if in_out and leaf == "weight" else 0
        return Split(dim, tp, int(entry.get("rep", "1")), tuple(seg) if seg else None, parts_of(entry))
    if entry.style == "rowwise" and leaf == "weight":
        return Split(0 if in_out else 1, tp, parts=parts_of(entry))
    if entry.style == "vocab" and leaf == "weight":
        return Split(0, tp, parts=parts_of(entry))
    if entry.style == "experts":  # [experts, out, in] weights, or [experts, in, out] for w=in_out
        seg = entry.ints("seg")
        if leaf in (entry.get("col") or "").split(","):
            return Split(2 if in_out else 1, tp, 1, tuple(seg) if seg else None)
        if leaf in (entry.get("row") or "").split(","):
            return Split(1 if in_out else 2, tp)
    return Split()


def split_of_names(names: Sequence[str], lines: dict[str, Entry], tp: int) -> Split:
    """The split of one tensor held under several names (a tied weight, a bias two modules hold): that of the
    first name whose module's plan line shards it; every rank holds all of it where none does.

    >>> lines = {"lm_head.decoder": Entry("lm_head.decoder", "colwise")}
    >>> split_of_names(["lm_head.bias", "lm_head.decoder.bias"], lines, 2).dim
    0
    """
    for n in names:
        path, _, leaf = n.rpartition(".")
        s = split_of(lines.get(path), leaf, tp)
        if s.dim is not None:
            return s
    return Split()
