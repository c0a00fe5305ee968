"""Rules of ops that act along given dims: scans, flips, rolls, sorts, repeats, pads, per-dim picks.

Each is exact on a sharded input when it acts along other dims than the sharded one (each rank's block
is transformed as the whole would be); along the sharded dim its result would mix or miss the other
ranks' blocks, so the value must stay replicated. Ops that read another tensor's shape (``reshape_as``,
``expand_as``) need that tensor sharded alike: its local shape is what they read.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from autotp.planner.layouts import Ctx, Need, NoRule, Shard, _norm, _plain
from autotp.planner.rules.shapes import reshape

aten = torch.ops.aten


def _input(ctx: Ctx, node: fx.Node) -> Shard:
    """The layout of the op's first argument; the op's other tensor arguments must be replicated."""
    lay = ctx.layout(node.args[0])
    if lay is None:
        raise NoRule(f"{node.name} ({node.target}) reads a sharded value as its index or shape argument")
    return lay


def _refuse_along(lay: Shard, dims: list[int], node: fx.Node, what: str) -> None:
    """NoRule if the op acts along the sharded dim (or along the copies a KV head's ranks split)."""
    for d in dims:
        if d == lay.dim or d == lay.spread:
            raise NoRule(f"{node.name} ({node.target}) {what} along the sharded dim {d}: each rank would see "
                         f"only its block of it")


def _arg(node: fx.Node, i: int, name: str, default):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dims(node: fx.Node, i: int, name: str, default, nd: int) -> list[int]:
    d = _arg(node, i, name, default)
    d = [d] if isinstance(d, int) else list(d or [])
    return [_norm(x, nd) for x in d]


# ---------------------------------------------------------------- same shape out


def scan(ctx: Ctx, node: fx.Node) -> Shard:
    """cumsum/cumprod/logcumsumexp(x, dim): a running op along ``dim``."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    _refuse_along(lay, _dims(node, 1, "dim", 0, nd), node, "accumulates")
    return lay


def flip(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    _refuse_along(lay, _dims(node, 1, "dims", [], nd), node, "reverses")
    return lay


def roll(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    dims = _dims(node, 2, "dims", [], nd)
    if not dims:
        raise NoRule(f"{node.name} ({node.target}) rolls the flattened value, the sharded dim included")
    _refuse_along(lay, dims, node, "rolls")
    return lay


def triangle(ctx: Ctx, node: fx.Node) -> Shard:
    """tril/triu: a mask over the last two dims, placed by global row and column indices."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    _refuse_along(lay, [nd - 2, nd - 1], node, "masks by index")
    return lay


def sorted_along(ctx: Ctx, node: fx.Node) -> list[Shard]:
    """sort/topk/cummax/cummin: (values, indices), both laid out like the input along other dims."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    if node.target is aten.topk.default:
        dims = _dims(node, 2, "dim", -1, nd)
    elif node.target in (aten.cummax.default, aten.cummin.default):
        dims = _dims(node, 1, "dim", 0, nd)
    else:
        dims = _dims(node, 1, "dim", -1, nd)
    _refuse_along(lay, dims, node, "orders")
    return [replace(lay, root=None)] * 2


# ---------------------------------------------------------------- reductions with indices


def reduce_pick(ctx: Ctx, node: fx.Node) -> Shard | list[Shard]:
    """max.dim/min.dim (values, indices) and argmax/argmin: a reduction over one dim."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    dim = _arg(node, 1, "dim", None)
    if dim is None:
        raise NoRule(f"{node.name} ({node.target}) reduces over every dim, including the sharded one")
    d = _norm(dim, nd)
    _refuse_along(lay, [d], node, "reduces")
    _plain(lay, node)
    keep = bool(_arg(node, 2, "keepdim", False))
    out = Shard(lay.dim if keep or d > lay.dim else lay.dim - 1, rep=lay.rep)
    return [out, out] if node.target in (aten.max.dim, aten.min.dim) else out


# ---------------------------------------------------------------- shape changes along other dims


def repeat(ctx: Ctx, node: fx.Node) -> Shard:
    """repeat/tile: the whole tensor copied along each dim; the sharded dim may be copied once only (repeating
    it would repeat each rank's block, where the whole should be repeated)."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    reps = list(node.args[1])
    if node.target is aten.tile.default and len(reps) < nd:
        reps = [1] * (nd - len(reps)) + reps
    extra = len(reps) - nd
    for d in (lay.dim, lay.spread):
        if d is not None and reps[d + extra] != 1:
            raise NoRule(f"{node.name} ({node.target}) repeats the sharded dim {d} {reps[d + extra]} times: each "
                         f"rank would copy its own block, not the whole")
    return replace(lay, dim=lay.dim + extra, root=None,
                   spread=None if lay.spread is None else lay.spread + extra)


def repeat_interleave(ctx: Ctx, node: fx.Node) -> Shard:
    """Each element repeated in place: along the sharded dim too, a block of the result is the result of the
    block (as repeat_kv does for KV heads), unless heads are held by several ranks."""
    lay, in_s = _input(ctx, node), ctx.shape(node.args[0])
    dim = _arg(node, 2, "dim", None)
    if dim is None:
        raise NoRule(f"{node.name} ({node.target}) flattens the value, the sharded dim included")
    d = _norm(dim, len(in_s))
    if d == lay.dim:
        if lay.rep > 1 or lay.spread is not None or lay.outer is not None:
            raise NoRule(f"{node.name} ({node.target}) repeats heads held by several ranks")
        if _arg(node, 3, "output_size", None) is not None:
            raise NoRule(f"{node.name} ({node.target}) gives a literal output size along the sharded dim {d}")
        if not isinstance(node.args[1], int):
            raise NoRule(f"{node.name} ({node.target}) repeats by a tensor of counts along the sharded dim {d}")
        return Shard(d)
    _refuse_along(lay, [d], node, "repeats")
    return replace(lay, root=None)


def pad(ctx: Ctx, node: fx.Node) -> Shard:
    """pad/constant_pad_nd: sizes (before, after) per dim from the last; the sharded dim must not grow."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    p = list(node.args[1])
    padded = [nd - 1 - i // 2 for i in range(len(p)) if p[i]]
    _refuse_along(lay, padded, node, "pads")
    return replace(lay, root=None)


def narrow(ctx: Ctx, node: fx.Node) -> Shard:
    """narrow(x, dim, start, length): a slice along ``dim``, never a part of the sharded dim."""
    lay, in_s = _input(ctx, node), ctx.shape(node.args[0])
    d = _norm(node.args[1], len(in_s))
    if ctx.shape(node)[d] != in_s[d]:
        _refuse_along(lay, [d], node, "slices")
    _plain(lay, node)
    return Shard(lay.dim, lay.root, lay.rep)


def index_select(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    _refuse_along(lay, [_norm(node.args[1], nd)], node, "picks by index")
    if ctx.layout(node.args[2]) is not None:
        raise NoRule(f"{node.name} ({node.target}) picks by a sharded index")
    return replace(lay, root=None)


def per_dim(ctx: Ctx, node: fx.Node) -> Shard:
    """unfold(x, dim, size, step) (windows along dim, as a new last dim) and diff(x, n, dim): along ``dim``."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    if node.target is aten.unfold.default:
        dims = [_norm(node.args[1], nd)]
    else:
        dims = _dims(node, 2, "dim", -1, nd)
        if _arg(node, 3, "prepend", None) is not None or _arg(node, 4, "append", None) is not None:
            raise NoRule(f"{node.name} ({node.target}) joins other values to a sharded one")
    _refuse_along(lay, dims, node, "differences" if node.target is aten.diff.default else "windows")
    return replace(lay, root=None)


def complex_view(ctx: Ctx, node: fx.Node) -> Shard:
    """view_as_complex drops a last dim of 2 (real, imaginary); view_as_real adds it back."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    if node.target is aten.view_as_complex.default:
        _refuse_along(lay, [nd - 1], node, "pairs values")
    return replace(lay, root=None)


def transposes(ctx: Ctx, node: fx.Node) -> Shard:
    """mT/swapaxes/swapdims/movedim/moveaxis: a permutation of the dims."""
    lay, nd = _input(ctx, node), len(ctx.shape(node.args[0]))
    perm = list(range(nd))  # output dim i is input dim perm[i]
    t = node.target
    if t in (aten.mT.default, aten.mH.default, aten.adjoint.default):
        perm[-2], perm[-1] = perm[-1], perm[-2]
    elif t in (aten.swapaxes.default, aten.swapdims.default):
        a, b = _norm(node.args[1], nd), _norm(node.args[2], nd)
        perm[a], perm[b] = perm[b], perm[a]
    else:  # movedim: sources go to destinations, the rest keep their order
        src, dst = node.args[1], node.args[2]
        src = [_norm(d, nd) for d in ([src] if isinstance(src, int) else src)]
        dst = [_norm(d, nd) for d in ([dst] if isinstance(dst, int) else dst)]
        rest = iter(d for d in range(nd) if d not in src)
        moved = dict(zip(dst, src))
        perm = [moved[i] if i in moved else next(rest) for i in range(nd)]
    if lay.outer is not None and perm[lay.dim] == lay.dim and lay.spread is None:
        return lay  # batch * heads stays where it is
    _plain(lay, node)
    d = perm.index(lay.dim)
    return Shard(d, lay.root if d == nd - 1 and lay.dim == nd - 1 else None, lay.rep)


# ---------------------------------------------------------------- another tensor's shape


def reshape_as(ctx: Ctx, node: fx.Node) -> Shard:
    """reshape_as/view_as(x, y): a reshape to y's shape, which each rank reads locally: y must be sharded as
    the result is."""
    x, y = node.args[0], node.args[1]
    if ctx.layout(x) is None:
        raise NoRule(f"{node.name} ({node.target}) reshapes a replicated value to the shape of a sharded one")
    out = reshape(ctx, node)
    ly = ctx.layout(y)
    if ly is None:
        raise Need(y, Shard(out.dim, outer=out.outer))
    if (ly.dim, ly.rep, ly.spread, ly.outer) != (out.dim, out.rep, out.spread, out.outer):
        raise NoRule(f"{node.name} ({node.target}) reshapes to the shape of a value sharded on another dim")
    return out


def fresh(ctx: Ctx, node: fx.Node) -> None:
    """new_zeros/new_ones/new_full/new_empty: a replicated tensor of literal sizes (only the dtype is read)."""
    return None
