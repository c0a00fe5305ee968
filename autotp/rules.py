"""Sharding propagation: one small pure rule per op family.

A value's layout is ``None`` (replicated, R) or ``Shard(dim)``. A rule maps the layouts
of a node's inputs to its output layout, or raises:
  * ``Need(value, Shard(d))``: the rule works if ``value`` (now R) were sharded on ``d``
    (the planner then looks for a column projection that produces it);
  * ``NoRule(reason)``: this op cannot take a sharded input here; the value must be R.
Partial sums never leave a row projection (it all-reduces), so they are not a layout here.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

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

    def local(self, shape: tuple[int, ...] | list[int], tp: int) -> list[int]:
        s = list(shape)
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


# ---------------------------------------------------------------- elementwise


def elementwise(ctx: Ctx, node: fx.Node) -> Shard:
    out_nd = len(ctx.shape(node))
    ts = tensor_args(ctx, node)
    sharded = [(a, ctx.layout(a)) for a in ts if ctx.layout(a) is not None]
    dims = {lay.dim + out_nd - len(ctx.shape(a)) for a, lay in sharded}
    reps = {(lay.rep, lay.spread is None) for _, lay in sharded}
    if len(dims) != 1 or len(reps) > 1:
        raise NoRule(f"{node.name} ({node.target}) mixes operands sharded on different dims")
    _plain(sharded[0][1], node)
    od = dims.pop()
    for a in ts:
        if ctx.layout(a) is None:
            s = ctx.shape(a)
            ad = od - (out_nd - len(s))
            if ad >= 0 and s[ad] != 1:  # a full-size replicated operand along the sharded dim
                if sharded[0][1].rep > 1:
                    raise NoRule(f"{node.name}: a replicated operand meets a KV head held by several ranks")
                raise Need(a, Shard(ad))
    roots = {lay.root for _, lay in sharded}
    return Shard(od, roots.pop() if len(roots) == 1 and len(sharded) == 1 else None, sharded[0][1].rep)


def unary(ctx: Ctx, node: fx.Node) -> Shard:
    """Ops whose output has the first argument's layout (copies, casts, dropout)."""
    return ctx.layout(node.args[0])


# ---------------------------------------------------------------- shape ops


def map_reshape(in_s: tuple[int, ...], out_s: tuple[int, ...], d: int) -> int:
    """Where dim ``d`` of ``in_s`` lands in ``out_s`` if a contiguous shard of it stays contiguous.

    >>> map_reshape((2, 5, 768), (2, 5, 12, 64), 2)
    2
    >>> map_reshape((2, 5, 12, 64), (2, 5, 768), 2)
    2
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
        if i0 <= d < i:
            first_in = next(k for k in range(i0, i) if in_s[k] != 1)
            if d != first_in:
                raise NoRule(f"reshape {tuple(in_s)} -> {tuple(out_s)} moves sharded dim {d} inside a merged dim")
            return next(k for k in range(j0, j) if out_s[k] != 1)
    raise NoRule(f"reshape {tuple(in_s)} -> {tuple(out_s)}: sharded dim {d} not found")


def reshape(ctx: Ctx, node: fx.Node) -> Shard:
    x = node.args[0]
    lay, in_s, out_s = ctx.layout(x), ctx.shape(x), ctx.shape(node)
    j = map_reshape(in_s, out_s, lay.dim)
    sizes = node.args[1] if len(node.args) > 1 else None
    if lay.spread is not None:  # repeat_kv: (kv heads on rep ranks) x (copies split by rep) -> plain heads
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


# ---------------------------------------------------------------- reductions and normalizations


def softmax(ctx: Ctx, node: fx.Node) -> Shard:
    lay, nd = ctx.layout(node.args[0]), len(ctx.shape(node))
    if _norm(node.args[1], nd) == lay.dim:
        raise NoRule(f"{node.name} normalizes over the sharded dim {lay.dim}")
    _plain(lay, node)
    return Shard(lay.dim, rep=lay.rep)


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
    labels, reps = set(), {}
    for a, labs in operands:
        lay = ctx.layout(a)
        if lay is not None:
            _plain(lay, node)
            labels.add(labs[lay.dim])
            reps[ctx.shape(a)[lay.dim]] = reps.get(ctx.shape(a)[lay.dim], set()) | {lay.rep}
    if len(labels) != 1 or any(len(r) > 1 for r in reps.values()):
        raise NoRule(f"{node.name} ({node.target}) has operands sharded on different dims")
    lab = labels.pop()
    if lab not in out_labels:
        raise NoRule(f"{node.name} ({node.target}) contracts over the sharded dim: the sum would be partial")
    for a, labs in operands:
        if ctx.layout(a) is None and lab in labs:
            k = labs.index(lab)
            if ctx.shape(a)[k] != 1:
                raise Need(a, Shard(k))
    o = out_labels.index(lab)
    # grouped-query attention: q heads and (fewer) KV heads share a label; the output has q's count
    size = ctx.shape(node)[o] if ctx.shape(node) is not None else None
    rep = reps.get(size, {1})
    if len(reps) > 1 and size not in reps:
        raise NoRule(f"{node.name} ({node.target}): sharded sizes {sorted(reps)} do not match the output")
    return Shard(o, rep=next(iter(rep)))


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
    aten.matmul.default: matmul, aten.mm.default: matmul, aten.bmm.default: bmm,
    aten.einsum.default: einsum, aten.scaled_dot_product_attention.default: sdpa,
    aten.linear.default: linear_act,
}
for _op in (aten.dropout.default, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
            aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default, aten.alias.default,
            aten.detach.default, aten.lift_fresh_copy.default, aten.feature_dropout.default,
            aten.alpha_dropout.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
    RULES[_op] = elementwise if _op in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) else unary
for _op in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_tensor_metadata.default):
    RULES[_op] = lambda ctx, node: None  # an int (eager code reads local sizes by itself), or a dtype assert


def rule_for(target: Any) -> Callable[[Ctx, fx.Node], Any] | None:
    """The rule for an op: the table, else any ATen op tagged pointwise is elementwise."""
    r = RULES.get(target)
    if r is None and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return elementwise
    return r
