"""Rules of contractions: matmul, einsum, attention, batched matmuls (one labelled-dims rule for all)."""
from __future__ import annotations

import torch
import torch.fx as fx

from autotp.planner.layouts import Ctx, Need, NoRule, Shard, _plain

aten = torch.ops.aten


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
