"""Sharding rules of views and data movement: reshapes, transposes, slices, splits, joins.

Each maps the layout of its input to its output's (see ``layouts``); sizes baked into the op
along a sharded dim are reported to the planner as shape constants.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.planner.layouts import Ctx, Need, NoRule, Rep, Shard, _divisible, _norm, _plain

aten = torch.ops.aten


def map_reshape(in_s: tuple[int, ...], out_s: tuple[int, ...], d: int) -> int:
    """Where dim ``d`` of ``in_s`` lands in ``out_s`` if a contiguous shard of it stays contiguous.

    >>> map_reshape((2, 5, 768), (2, 5, 12, 64), 2)
    2
    >>> map_reshape((2, 5, 12, 64), (2, 5, 768), 2)
    2
    """
    j, outer = map_merged(in_s, out_s, d)
    if outer is not None:
        raise NoRule(f"shape {tuple(in_s)} -> {tuple(out_s)} moves sharded dim {d} inside a merged dim")
    return j


def map_merged(in_s: tuple[int, ...], out_s: tuple[int, ...], d: int, outer: int | None = None
               ) -> tuple[int, int | None]:
    """``map_reshape`` for a sharded dim that is (or becomes) merged after leading dims: the output dim and
    the total size merged before the sharded part (None: a plain shard).

    >>> map_merged((2, 4, 8, 16), (8, 8, 16), 1)    # Bloom: (batch, heads) -> batch * heads
    (0, 2)
    >>> map_merged((8, 8, 8), (2, 4, 8, 8), 0, 2)   # and back
    (1, None)
    """
    i = j = 0
    while i < len(in_s) and j < len(out_s):
        i0, j0, pi, pj = i, j, in_s[i], out_s[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_s[i]
                i += 1
            else:
                pj *= out_s[j]
                j += 1
        if not i0 <= d < i:
            continue
        pre = (outer or 1) * _prod(in_s[i0:d])  # what comes before the sharded part inside this group
        if pre == 1:
            return next(k for k in range(j0, j) if out_s[k] != 1), None
        for k in range(j0, j):
            if _prod(out_s[j0:k]) == pre and out_s[k] != 1:
                return k, None  # the leading dims come apart again: a plain shard of dim k
        nonunit = [k for k in range(j0, j) if out_s[k] != 1]
        if len(nonunit) == 1:
            return nonunit[0], pre
        break
    raise NoRule(f"shape {tuple(in_s)} -> {tuple(out_s)} moves sharded dim {d} inside a merged dim")


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def reshape(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, in_s, out_s = ctx.layout(x), ctx.shape(x), ctx.shape(node)
    j, outer = map_merged(in_s, out_s, lay.dim, lay.outer)
    sizes = node.args[1] if len(node.args) > 1 else None
    if (outer is not None or lay.outer is not None) and (lay.rep > 1 or lay.spread is not None):
        raise NoRule(f"{node.name}: heads merged with the batch dim are held by several ranks")
    if outer is not None:  # (batch, heads) merged into one dim: each rank holds its heads of every batch row
        _divisible(ctx, out_s[j] // outer, node, f"the heads in dim {j} of reshape {out_s}")
        out = Shard(j, outer=outer)
    elif lay.outer is not None:
        _divisible(ctx, out_s[j], node, f"dim {j} of reshape {out_s}")
        out = Shard(j)
    elif lay.spread is not None:  # repeat_kv: (kv heads on rep ranks) x (copies split by rep) -> plain heads
        if lay.spread != lay.dim + 1 or out_s[j] != in_s[lay.dim] * in_s[lay.spread]:
            raise NoRule(f"{node.name}: reshape {in_s} -> {out_s} does not merge repeated KV heads into heads")
        out = Shard(j)
    elif _fused_view(ctx, lay, in_s, out_s, j):  # (..., 3*H*D) -> (..., 3, H, D): q|k|v as segments, heads sharded
        ctx.segments(lay.root, [in_s[lay.dim] // out_s[j]] * out_s[j], node)
        j += 1
        _divisible(ctx, out_s[j], node, f"dim {j} of reshape {out_s}")
        out = Shard(j)
    else:
        if out_s[j] % (ctx.tp // lay.rep) and lay.rep == 1 and lay.root and ctx.tp % out_s[j] == 0 \
                and out_s[j] != in_s[lay.dim]:
            raise Rep(lay.root, ctx.tp // out_s[j])  # fewer heads than ranks: each head on several ranks
        _divisible(ctx, out_s[j], node, f"dim {j} of reshape {out_s}", lay.rep)
        out = Shard(j, lay.root if out_s[j] == in_s[lay.dim] else None, lay.rep)
    if isinstance(sizes, (list, tuple)) and len(sizes) == len(out_s) and isinstance(sizes[j], int) and sizes[j] != -1:
        ctx.shape_const(node, j, sizes[j], out.local(out_s, ctx.tp)[j])
    return out


def _fused_view(ctx: Ctx, lay: Shard, in_s, out_s, j: int) -> bool:
    """A fused projection's output viewed with its pieces as a leading dim that tp does not divide."""
    return (lay.root is not None and lay.rep == 1 and out_s[j] % ctx.tp != 0 and j + 2 < len(out_s)
            and out_s[j] > 1 and out_s[j + 1] % ctx.tp == 0
            and out_s[j] * out_s[j + 1] * out_s[j + 2] == in_s[lay.dim])  # (pieces, heads, head_dim)


def flatten(ctx: Ctx, node: fx.Node) -> Shard:
    """flatten/unflatten: a reshape read from the shapes (unflatten's literal sizes are shape constants)."""
    x = node.args[0]
    lay, in_s, out_s = ctx.layout(x), ctx.shape(x), ctx.shape(node)
    _plain(lay, node)
    j = map_reshape(in_s, out_s, lay.dim)
    _divisible(ctx, out_s[j], node, f"dim {j} of {out_s}", lay.rep)
    out = Shard(j, lay.root if out_s[j] == in_s[lay.dim] else None, lay.rep)
    if node.target is aten.unflatten.int:
        d, sizes = _norm(node.args[1], len(in_s)), node.args[2]
        if d <= j < d + len(sizes) and isinstance(sizes[j - d], int) and sizes[j - d] != -1:
            ctx.shape_const(node, j, sizes[j - d], out.local(out_s, ctx.tp)[j])
    return out


def transpose(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = ctx.layout(node.args[0]), len(ctx.shape(node))
    a, b = (_norm(node.args[1], nd), _norm(node.args[2], nd)) if len(node.args) > 2 else (0, 1)
    if lay.outer is not None and lay.dim not in (a, b) and lay.spread is None:
        return lay  # batch * heads stays where it is
    _plain(lay, node)
    d = b if lay.dim == a else a if lay.dim == b else lay.dim
    return Shard(d, lay.root if d == nd - 1 and lay.dim == nd - 1 else None, lay.rep)


def permute(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = ctx.layout(node.args[0]), len(ctx.shape(node))
    dims = [_norm(d, nd) for d in node.args[1]] if len(node.args) > 1 else list(range(nd))[::-1]  # numpy_T
    _plain(lay, node)
    return Shard(dims.index(lay.dim), rep=lay.rep)


def unsqueeze(ctx: Ctx, node: fx.Node) -> Shard:
    lay = ctx.layout(node.args[0])
    _plain(lay, node)
    d = _norm(node.args[1], len(ctx.shape(node)))
    return Shard(lay.dim + 1 if d <= lay.dim else lay.dim, rep=lay.rep)


def squeeze(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, in_s = ctx.layout(x), ctx.shape(x)
    dims = node.args[1] if len(node.args) > 1 else list(range(len(in_s)))
    dims = [dims] if isinstance(dims, int) else dims
    gone = [_norm(d, len(in_s)) for d in dims if in_s[_norm(d, len(in_s))] == 1]
    _plain(lay, node)
    return Shard(lay.dim - sum(1 for d in gone if d < lay.dim), rep=lay.rep)


def expand(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, in_nd, sizes = ctx.layout(x), len(ctx.shape(x)), node.args[1]
    _plain(lay, node)
    in_s, out_s = ctx.shape(x), ctx.shape(node)
    d = lay.dim + len(sizes) - in_nd
    out = Shard(d, rep=lay.rep)
    if lay.rep > 1 and d + 1 < len(out_s) and in_s[lay.dim + 1] == 1 and out_s[d + 1] > 1:
        if out_s[d + 1] % lay.rep:
            raise NoRule(f"{node.name}: {out_s[d + 1]} copies of a KV head cannot be split over {lay.rep} ranks")
        out = Shard(d, rep=lay.rep, spread=d + 1)  # repeat_kv: the ranks sharing a KV head split its copies
        if isinstance(sizes[d + 1], int):
            ctx.shape_const(node, d + 1, sizes[d + 1], sizes[d + 1] // lay.rep)
    if isinstance(sizes[d], int) and sizes[d] != -1:
        ctx.shape_const(node, d, sizes[d], out.local(out_s, ctx.tp)[d])
    return out


def slice_(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, in_s = ctx.layout(x), ctx.shape(x)
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(in_s))
    if dim == lay.dim and ctx.shape(node)[dim] != in_s[dim]:
        start, end, step = (list(node.args[2:5]) + [None, None, None])[:3]
        start = 0 if start is None else start + in_s[dim] if start < 0 else min(start, in_s[dim])
        end = in_s[dim] if end is None else end + in_s[dim] if end < 0 else min(end, in_s[dim])
        if lay.root is None or step not in (None, 1) or not all(isinstance(v, int) for v in (start, end)):
            raise NoRule(f"{node.name} slices along the sharded dim {dim}")
        if lay.rep > 1:
            raise NoRule(f"{node.name} slices a fused projection whose heads are fewer than tp")
        ctx.piece(lay.root, in_s[dim], start, end, node)  # one piece of a fused q|k|v: each piece is sharded
        _divisible(ctx, end - start, node, f"slice [{start}:{end}]")
        ctx.shape_const(node, dim, start, start // ctx.tp) if start else None
        ctx.shape_const(node, dim, end, end // ctx.tp) if end != in_s[dim] else None
        return Shard(lay.dim)
    _plain(lay, node)
    return Shard(lay.dim, lay.root if dim != lay.dim else None, lay.rep)


def select(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = ctx.layout(node.args[0]), len(ctx.shape(node.args[0]))
    dim = _norm(node.args[1], nd)
    if dim == lay.dim:
        raise NoRule(f"{node.name} selects along the sharded dim {dim}")
    _plain(lay, node)
    return Shard(lay.dim - (1 if dim < lay.dim else 0), rep=lay.rep)


def split(ctx: Ctx, node: fx.Node) -> list[Shard]:
    x = node.args[0]
    lay, in_s = ctx.layout(x), ctx.shape(x)
    outs = node.meta.get("val")
    sizes = [int(t.shape[_norm(_split_dim(node), len(in_s))]) for t in outs]
    dim = _norm(_split_dim(node), len(in_s))
    _plain(lay, node)
    if node.target is aten.unbind.int:
        if dim == lay.dim:
            raise NoRule(f"{node.name} unbinds the sharded dim")
        return [Shard(lay.dim - (1 if dim < lay.dim else 0), rep=lay.rep)] * len(outs)
    if dim != lay.dim:
        return [Shard(lay.dim, rep=lay.rep)] * len(outs)
    if lay.root is None or lay.rep > 1:
        raise NoRule(f"{node.name} splits sharded dim {dim} of a value that is not a projection's whole output")
    for s in sizes:
        _divisible(ctx, s, node, f"segment {sizes}")
    ctx.segments(lay.root, sizes, node)
    given = node.args[1] if node.target in (aten.split.Tensor, aten.split_with_sizes.default) else None
    for g in sorted({given} if isinstance(given, int) else set(given) if isinstance(given, (list, tuple)) else set()):
        if isinstance(g, int):  # a literal split size: the local code must split at local sizes
            ctx.shape_const(node, dim, g, g // ctx.tp)
    return [Shard(dim)] * len(outs)


def _split_dim(node: fx.Node) -> int:
    if node.target is aten.unbind.int:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)


def _joined(ctx: Ctx, node: fx.Node, *, along_ok: bool) -> tuple[int, int, int]:
    """cat/stack: the operands, the join dim, the one sharded dim they share and its rep."""
    ts = list(node.args[0])
    dim = _norm(node.args[1] if len(node.args) > 1 else 0, len(ctx.shape(node)))
    lays = [ctx.layout(t) for t in ts if ctx.layout(t) is not None]
    if any(x.spread is not None for x in lays) or len({x.rep for x in lays}) > 1:
        raise NoRule(f"{node.name} joins KV heads held by several ranks with other values")
    sharded = {x.dim for x in lays}
    if len(sharded) != 1:
        raise NoRule(f"{node.name} joins values sharded on different dims")
    d = sharded.pop()
    if d == dim and not along_ok:
        raise NoRule(f"{node.name} concatenates along the sharded dim {dim}")
    for t in ts:
        if ctx.layout(t) is None:
            raise Need(t, Shard(d))
    return dim, d, lays[0].rep


def stack(ctx: Ctx, node: fx.Node) -> Shard:
    dim, d, r = _joined(ctx, node, along_ok=True)  # stacking adds a new dim: never the sharded one
    return Shard(d + 1 if dim <= d else d, rep=r)


def getitem(ctx: Ctx, node: fx.Node) -> Shard | None:
    src, i = node.args
    lays = ctx.layout(src)
    return lays[i] if isinstance(lays, list) else None


def cat(ctx: Ctx, node: fx.Node) -> Shard:
    _, d, r = _joined(ctx, node, along_ok=False)
    return Shard(d, rep=r)
