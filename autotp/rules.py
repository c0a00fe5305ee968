"""Sharding propagation: one small pure rule per op family.

A value's layout is ``None`` (replicated, R) or ``Shard(dim)``. A rule maps the layouts
of a node's inputs to its output layout, or raises:
  * ``Need(value, Shard(d))``: the rule works if ``value`` (now R) were sharded on ``d``
    (the planner then looks for a column projection that produces it);
  * ``NoRule(reason)``: this op cannot take a sharded input here; the value must be R.
Partial sums never leave a row projection (it all-reduces), so they are not a layout here.
Layouts live in ``layouts``; the rules of views and data movement in ``shape_rules``; this module
holds elementwise ops, reductions, contractions and the table.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from .layouts import Ctx, Need, NoRule, Shard, _norm, _plain, tensor_args
from .shape_rules import (cat, expand, flatten, getitem, permute, reshape, select, slice_, split, squeeze, stack,
                          transpose, unsqueeze)

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
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
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


# ---------------------------------------------------------------- contractions


def contract(ctx: Ctx, node: fx.Node, operands: list[tuple[fx.Node, str]], out_labels: str) -> Shard:
    """Shared rule for matmul/einsum/sdpa: operands are labelled dims (aligned from the right)."""
    labels, reps, outers = set(), {}, set()
    for a, labs in operands:
        lay = ctx.layout(a)
        if lay is not None:
            if lay.outer is None or lay.spread is not None:
                _plain(lay, node)
            outers.add(lay.outer)
            labels.add(labs[lay.dim])
            reps[ctx.shape(a)[lay.dim]] = reps.get(ctx.shape(a)[lay.dim], set()) | {lay.rep}
    if len(labels) != 1 or any(len(r) > 1 for r in reps.values()) or len(outers) != 1:
        raise NoRule(f"{node.name} ({node.target}) has operands sharded on different dims")
    lab, outer = labels.pop(), outers.pop()
    if outer is not None and any(r != {1} for r in reps.values()):
        raise NoRule(f"{node.name} ({node.target}) reads heads merged with the batch dim, held by several ranks")
    if lab not in out_labels:
        raise NoRule(f"{node.name} ({node.target}) contracts over the sharded dim: the sum would be partial")
    for a, labs in operands:
        if ctx.layout(a) is None and lab in labs:
            k = labs.index(lab)
            if ctx.shape(a)[k] != 1:
                raise Need(a, Shard(k, outer=outer))
    o = out_labels.index(lab)
    # grouped-query attention: q heads and (fewer) KV heads share a label; the output has q's count
    size = ctx.shape(node)[o] if ctx.shape(node) is not None else None
    rep = reps.get(size, {1})
    if len(reps) > 1 and size not in reps:
        raise NoRule(f"{node.name} ({node.target}): sharded sizes {sorted(reps)} do not match the output")
    return Shard(o, rep=next(iter(rep)), outer=outer)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def matmul(ctx: Ctx, node: fx.Node) -> Shard:
    a, b = node.args[0], node.args[1]
    sa, sb = ctx.shape(a), ctx.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        raise NoRule(f"{node.name}: matmul of a 1-D operand with a sharded input")
    nb = max(len(sa), len(sb)) - 2
    batch = _LETTERS[:nb]
    la = batch[nb - (len(sa) - 2):] + "NK"
    lb = batch[nb - (len(sb) - 2):] + "KM"
    return contract(ctx, node, [(a, la), (b, lb)], batch + "NM")


def linear_act(ctx: Ctx, node: fx.Node) -> Shard:
    """``linear`` whose weight is not a parameter (or a replicated linear fed a batch-sharded input)."""
    x, w = node.args[0], node.args[1]
    nd = len(ctx.shape(x))
    lx = _LETTERS[: nd - 1] + "K"
    ops = [(x, lx), (w, "MK")]
    if len(node.args) > 2 and node.args[2] is not None:
        ops.append((node.args[2], "M"))
    return contract(ctx, node, ops, _LETTERS[: nd - 1] + "M")


def einsum(ctx: Ctx, node: fx.Node) -> Shard:
    eq, ops = node.args[0], node.args[1]
    if "..." in eq:
        raise NoRule(f"{node.name}: einsum with '...' on a sharded input")
    lhs, out = eq.replace(" ", "").split("->")
    return contract(ctx, node, list(zip(ops, lhs.split(","))), out)


def sdpa(ctx: Ctx, node: fx.Node) -> Shard:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    nb = len(ctx.shape(q)) - 3
    batch = _LETTERS[:nb]
    ops = [(q, batch + "HLE"), (k, batch + "HSE"), (v, batch + "HSV")]
    if mask is not None and ctx.shape(mask) is not None:
        full = batch + "HLS"
        ops.append((mask, full[len(full) - len(ctx.shape(mask)):]))
    return contract(ctx, node, ops, batch + "HLV")


def bmm(ctx: Ctx, node: fx.Node) -> Shard:
    return contract(ctx, node, [(node.args[0], "bNK"), (node.args[1], "bKM")], "bNM")


def baddbmm(ctx: Ctx, node: fx.Node) -> Shard:
    """``input + b1 @ b2`` (Bloom adds ALiBi this way): the added input is labelled like the output."""
    bias = node.args[0]
    nb = len(ctx.shape(bias)) if ctx.shape(bias) is not None else 0
    return contract(ctx, node, [(node.args[1], "bNK"), (node.args[2], "bKM"), (bias, "bNM"[3 - nb:])], "bNM")


# ---------------------------------------------------------------- the table

RULES: dict[Any, Callable[[Ctx, fx.Node], Any]] = {
    aten.view.default: reshape, aten.reshape.default: reshape, aten._unsafe_view.default: reshape,
    aten.flatten.using_ints: flatten, aten.unflatten.int: flatten,
    aten.transpose.int: transpose, aten.t.default: transpose, aten.permute.default: permute, aten.numpy_T.default: permute,
    aten.unsqueeze.default: unsqueeze, aten.squeeze.dim: squeeze, aten.squeeze.dims: squeeze,
    aten.squeeze.default: squeeze, aten.expand.default: expand,
    aten.slice.Tensor: slice_, aten.select.int: select,
    aten.split.Tensor: split, aten.split_with_sizes.default: split, aten.chunk.default: split,
    aten.unbind.int: split, operator.getitem: getitem, aten.cat.default: cat, aten.stack.default: stack,
    aten.softmax.int: softmax, aten._softmax.default: softmax, aten.log_softmax.int: softmax,
    aten._log_softmax.default: softmax,
    aten.sum.dim_IntList: reduction, aten.mean.dim: reduction, aten.amax.default: reduction,
    aten.amin.default: reduction, aten.var.correction: reduction, aten.std.correction: reduction,
    aten.sum.default: reduction, aten.mean.default: reduction, aten.linalg_vector_norm.default: reduction,
    aten.layer_norm.default: norm, aten.rms_norm.default: norm,
    aten.matmul.default: matmul, aten.mm.default: matmul, aten.bmm.default: bmm, aten.baddbmm.default: baddbmm,
    aten.einsum.default: einsum, aten.scaled_dot_product_attention.default: sdpa,
    aten.linear.default: linear_act,
}
for _op in (aten.dropout.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
            aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.alias.default,
            aten.detach.default, aten.lift_fresh_copy.default, aten.feature_dropout.default,
            aten.alpha_dropout.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
    RULES[_op] = elementwise if _op in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) else unary
for _op in (aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):  # pointwise, but not tagged so
    RULES[_op] = elementwise
for _op in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_tensor_metadata.default):
    RULES[_op] = lambda ctx, node: None  # an int (eager code reads local sizes by itself), or a dtype assert


def rule_for(target: Any) -> Callable[[Ctx, fx.Node], Any] | None:
    """The rule for an op: the table, else any ATen op tagged pointwise is elementwise."""
    r = RULES.get(target)
    if r is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return elementwise
    return r
