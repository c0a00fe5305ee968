"""Rules of elementwise ops, reductions and normalizations."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.planner.layouts import Ctx, Need, NoRule, Shard, _norm, _plain, tensor_args

aten = torch.ops.aten


# ---------------------------------------------------------------- elementwise


def elementwise(ctx: Ctx, node: fx.Node) -> Shard:
    out_nd = len(ctx.shape(node))
    ts = tensor_args(ctx, node)
    sharded = [(a, ctx.layout(a)) for a in ts if ctx.layout(a) is not None]
    dims = {lay.dim + out_nd - len(ctx.shape(a)) for a, lay in sharded}
    reps = {(lay.rep, lay.spread is None, lay.outer) for _, lay in sharded}
    if len(dims) != 1 or len(reps) > 1:
        raise NoRule(f"{node.name} ({node.target}) mixes operands sharded on different dims")
    outer = sharded[0][1].outer
    if sharded[0][1].spread is not None:
        _plain(sharded[0][1], node)
    od = dims.pop()
    for a in ts:
        if ctx.layout(a) is None:
            s = ctx.shape(a)
            ad = od - (out_nd - len(s))
            if ad >= 0 and s[ad] != 1:  # a full-size replicated operand along the sharded dim
                if sharded[0][1].rep > 1:
                    raise NoRule(f"{node.name}: a replicated operand meets a KV head held by several ranks")
                raise Need(a, Shard(ad, outer=outer))
    roots = {lay.root for _, lay in sharded}
    return Shard(od, roots.pop() if len(roots) == 1 and len(sharded) == 1 else None, sharded[0][1].rep,
                 outer=outer)


def unary(ctx: Ctx, node: fx.Node) -> Shard:
    """Ops whose output has the first argument's layout (copies, casts, dropout)."""
    return ctx.layout(node.args[0])


# ---------------------------------------------------------------- reductions and normalizations


def softmax(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = ctx.layout(node.args[0]), len(ctx.shape(node))
    if _norm(node.args[1], nd) == lay.dim:
        raise NoRule(f"{node.name} normalizes over the sharded dim {lay.dim}")
    if lay.outer is None:
        _plain(lay, node)
    return Shard(lay.dim, rep=lay.rep, outer=lay.outer)


def reduction(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, nd = ctx.layout(x), len(ctx.shape(x))
    i = 2 if node.target is aten.linalg_vector_norm.default else 1  # linalg_vector_norm(x, ord, dim, keepdim)
    dims = node.args[i] if len(node.args) > i else node.kwargs.get("dim")
    if dims is None or dims == []:
        raise NoRule(f"{node.name} ({node.target}) reduces over every dim, including the sharded one")
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [_norm(d, nd) for d in dims]
    if lay.dim in dims:
        raise NoRule(f"{node.name} ({node.target}) reduces over the sharded dim {lay.dim}")
    keep = len(ctx.shape(node)) == nd
    _plain(lay, node)
    return Shard(lay.dim if keep else lay.dim - sum(1 for d in dims if d < lay.dim), rep=lay.rep)


def norm(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, nd = ctx.layout(x), len(ctx.shape(x))
    if lay is None:
        raise NoRule(f"{node.name} ({node.target}) has a sharded weight")
    k = len(node.args[1])
    if lay.dim >= nd - k:
        raise NoRule(f"{node.name} ({node.target}) normalizes over the sharded features (dim {lay.dim})")
    _plain(lay, node)
    return Shard(lay.dim, rep=lay.rep)
