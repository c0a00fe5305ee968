"""Sharding propagation: one small pure rule per op family.

A value's layout is ``None`` (replicated, R) or ``Shard(dim)``. A rule maps the layouts
of a node's inputs to its output layout, or raises:
  * ``Need(value, Shard(d))``: the rule works if ``value`` (now R) were sharded on ``d``
    (the planner then looks for a column projection that produces it);
  * ``NoRule(reason)``: this op cannot take a sharded input here; the value must be R.
Partial sums never leave a row projection (it all-reduces), so they are not a layout here.
Layouts live in ``planner.layouts``; the rules by op family in ``shapes`` (views, data movement), ``pointwise``
(elementwise ops, reductions, norms), ``along`` (scans, flips, sorts, repeats, pads: ops along given dims) and
``contract`` (matmuls, einsum, attention); this module holds the table.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from autotp.planner.layouts import Ctx
from autotp.planner.rules import along
from autotp.planner.rules.contract import baddbmm, bmm, einsum, linear_act, matmul, sdpa
from autotp.planner.rules.pointwise import elementwise, norm, reduction, softmax, unary
from autotp.planner.rules.shapes import (
    cat,
    expand,
    flatten,
    getitem,
    permute,
    reshape,
    select,
    slice_,
    split,
    squeeze,
    stack,
    transpose,
    unsqueeze,
)

aten = torch.ops.aten


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
RULES.update(dict.fromkeys((aten.dropout.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
                             aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
                             aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
                             aten.feature_dropout.default, aten.alpha_dropout.default), unary))
RULES.update(dict.fromkeys((aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.ScalarOther,
                             aten.where.ScalarSelf, aten.where.Scalar), elementwise))  # pointwise, not tagged so
RULES.update({
    aten.reshape_as.default: along.reshape_as, aten.view_as.default: along.reshape_as,
    aten.expand_as.default: elementwise,  # broadcast to another tensor's (local) shape
    aten.cumsum.default: along.scan, aten.cumprod.default: along.scan, aten.logcumsumexp.default: along.scan,
    aten.flip.default: along.flip, aten.roll.default: along.roll,
    aten.tril.default: along.triangle, aten.triu.default: along.triangle,
    aten.sort.default: along.sorted_along, aten.sort.stable: along.sorted_along, aten.topk.default: along.sorted_along,
    aten.cummax.default: along.sorted_along, aten.cummin.default: along.sorted_along,
    aten.max.dim: along.reduce_pick, aten.min.dim: along.reduce_pick,
    aten.argmax.default: along.reduce_pick, aten.argmin.default: along.reduce_pick,
    aten.logsumexp.default: reduction, aten.prod.dim_int: reduction, aten.any.dim: reduction,
    aten.all.dim: reduction, aten.any.dims: reduction, aten.max.default: reduction, aten.min.default: reduction,
    aten.repeat.default: along.repeat, aten.tile.default: along.repeat,
    aten.repeat_interleave.self_int: along.repeat_interleave,
    aten.pad.default: along.pad, aten.constant_pad_nd.default: along.pad,
    aten.narrow.default: along.narrow, aten.index_select.default: along.index_select,
    aten.unfold.default: along.per_dim, aten.diff.default: along.per_dim,
    aten.view_as_complex.default: along.complex_view, aten.view_as_real.default: along.complex_view,
    aten.mT.default: along.transposes, aten.mH.default: along.transposes, aten.adjoint.default: along.transposes,
    aten.swapaxes.default: along.transposes, aten.swapdims.default: along.transposes,
    aten.movedim.int: along.transposes, aten.movedim.intlist: along.transposes,
    aten.moveaxis.int: along.transposes, aten.moveaxis.intlist: along.transposes,
    aten.masked_fill_.Scalar: elementwise, aten.masked_fill_.Tensor: elementwise,
    aten.zeros_like.default: unary, aten.ones_like.default: unary, aten.full_like.default: unary,
    aten.empty_like.default: unary,  # the input's (local) shape, none of its values
    aten.new_zeros.default: along.fresh, aten.new_ones.default: along.fresh, aten.new_full.default: along.fresh,
    aten.new_empty.default: along.fresh,
})
RULES.update(dict.fromkeys((aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                             aten._assert_tensor_metadata.default),
                            lambda ctx, node: None))  # an int (eager code reads local sizes itself), a dtype assert


def rule_for(target: Any) -> Callable[[Ctx, fx.Node], Any] | None:
    """The rule for an op: the table, else any ATen op tagged pointwise is elementwise."""
    r = RULES.get(target)
    if r is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return elementwise
    return r
