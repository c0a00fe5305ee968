"""Which replicated values need their gradient whole: the backward half of the layouts.

A value is replicated on every rank, but if an op combines it with a sharded value and gives a sharded
output, each rank's backward sees only its shard of the output's gradient: the replicated operand's
gradient is then a partial sum on each rank (a broadcast over the sharded dim, or a contraction with
another sharded operand over it). Nothing sums it afterwards, so whatever computed that operand (layers
before it, the model's input) would get wrong gradients.

Parameters alone are the planner's ``sum_grad`` lines (``sites.partial_grads``: one all-reduce in
backward). A value computed from the model's activations that needs a gradient is refused here; values
that need none (masks and positions from integer inputs, buffers, constants) are free to meet sharded ones.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.capture.export import Captured

aten = torch.ops.aten
# ops whose output carries no gradient to their inputs
NO_GRAD = {aten.detach.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
           aten.full_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
           aten.new_full.default, aten.sign.default, aten.floor.default, aten.ceil.default, aten.round.default,
           aten.lift_fresh_copy.default, aten.scalar_tensor.default, aten.arange.default, aten.arange.start,
           aten.arange.start_step, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _floating(c: Captured, n: fx.Node) -> bool:
    v = n.meta.get("val")
    vs = v if isinstance(v, (list, tuple)) else [v]
    return any(isinstance(x, torch.Tensor) and x.is_floating_point() for x in vs)


def activation_grads(c: Captured) -> set[fx.Node]:
    """Nodes whose gradient flows back into the model's activations or inputs (not only into parameters).

    Forward over the graph: a floating-point model input needs a gradient (a caller may ask for it); an op's
    floating output needs one if any input does, or if it mixes a parameter with other values (a linear
    layer's or a lookup's output: its gradient reaches the parameter through the activation path). Values
    computed from parameters alone are left to ``sum_grad``.
    """
    cached = getattr(c, "_activation_grads", None)
    if cached is not None:
        return cached
    params: set[fx.Node] = set()  # computed from parameters alone
    acts: set[fx.Node] = set()
    for n in c.graph.nodes:
        if n.op == "placeholder":
            if c.param_name(n) is not None:
                params.add(n)
            elif n.name in c.user_inputs and _floating(c, n):
                acts.add(n)
            continue
        if n.op != "call_function" or n.target in NO_GRAD:
            continue
        ins: list = []
        fx.node.map_arg((n.args, n.kwargs), ins.append)
        tensors = [a for a in ins if isinstance(a, fx.Node) and c.shape(a) is not None]
        if not _floating(c, n) and not any(a in acts for a in tensors):
            continue
        if tensors and all(a in params or a.op in ("placeholder", "get_attr") and a not in acts for a in tensors) \
                and any(a in params for a in tensors):
            params.add(n)  # w + 1, w.to(dtype): still the parameter's business
        elif any(a in acts or a in params for a in tensors) and _floating(c, n):
            acts.add(n)
    c._activation_grads = acts
    return acts
