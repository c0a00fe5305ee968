"""Sharded linear layers, built from dense ones. The slicing math is pure (no process group).

Weights keep the orientation of the dense module: ``out_in`` is ``nn.Linear``'s
``[out, in]``; ``in_out`` is the ``[in, out]`` of GPT-2's ``Conv1D`` and of ``x @ W`` code.
State-dict keys stay ``weight``/``bias``, so checkpoints keep their names.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.runtime.collectives import NO_COMM, all_reduce, gather_linear
from autotp.runtime.fg import CopyCache, copy_to_tp, gather_from_tp, reduce_from_tp
from autotp.runtime.loss import SHARDED_LOGITS, sharded_logits
from autotp.split import Split, shard_ranges


def shard_tensor(t: torch.Tensor, dim: int, rank: int, tp: int, segments: Sequence[int] | None = None,
                 parts: Sequence[int] | None = None) -> torch.Tensor:
    """The local slice of ``t`` along ``dim`` (contiguous, a copy: the dense tensor can be freed); ``parts``: an
    uneven split (``autotp.split``)."""
    return Split(dim, tp, 1, tuple(segments) if segments else None, tuple(parts) if parts else None).take(t, rank)


def _split_repr(parts: tuple[int, ...] | None) -> str:
    return f", split={','.join(map(str, parts))}" if parts else ""


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


class _ParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, in_out: bool, group, tp: int, rank: int):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.in_out, self.group, self.tp, self.rank = in_out, group, tp, rank
        # one f per input tensor, shared by the layers of one model (``swap_layers`` hands them one cache)
        self.copies = CopyCache()
        self.in_features, self.out_features = weight.shape if in_out else (weight.shape[1], weight.shape[0])
        self.parts: tuple[int, ...] | None = None  # an uneven split: the units each rank holds (``split=``)

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.in_out:
            y = x @ self.weight  # (..., in) @ (in, out)
            return y + bias if bias is not None else y
        return F.linear(x, self.weight, bias)


class ColumnParallelLinear(_ParallelLinear):
    """Output features sharded: ``y_local = f(x) @ W_local + b_local``. No forward communication."""

    style = "colwise"

    rep = 1
    gather = False  # all-gather the output (an LM head: every rank gets the full logits)
    widths: tuple[int, ...] | None = None  # uneven split: every rank's output width, in rank order
    segments: list[int] | None = None  # fused outputs (q|k|v), each segment sharded: their global widths

    @classmethod
    def from_dense(cls, weight: nn.Parameter, bias: nn.Parameter | None, *, in_out: bool, rank: int, tp: int,
                   group=None, segments: Sequence[int] | None = None, rep: int = 1,
                   parts: Sequence[int] | None = None) -> "ColumnParallelLinear":
        """``rep > 1``: fewer heads than ranks; ``rep`` neighbouring ranks hold the same block of outputs.
        ``parts``: an uneven split (``split=``): rank r holds ``parts[r]`` of ``sum(parts)`` units of each segment."""
        parts = tuple(parts) if parts else None
        if parts is not None and len(parts) != tp:
            raise ValueError(f"split {','.join(map(str, parts))} names {len(parts)} ranks, not tp={tp}")
        blocks, block = tp // rep, rank // rep
        dim, seg = 1 if in_out else 0, tuple(segments) if segments else None
        if parts is not None and rep > 1:  # uneven, a block (KV head) held by every rank with units in it
            w = Split(dim, tp, rep, seg, parts).take(weight.detach(), rank)
            b = Split(0, tp, rep, seg, parts).take(bias.detach(), rank) if bias is not None else None
        else:
            w = shard_tensor(weight.detach(), dim, block, blocks, seg, parts)
            b = shard_tensor(bias.detach(), 0, block, blocks, seg, parts) if bias is not None else None
        layer = cls(_param(w, weight), _param(b, bias) if b is not None else None,
                    in_out=in_out, group=group, tp=tp, rank=rank)
        layer.segments = list(seg) if seg else None
        if parts is not None:
            split, size = Split(0, tp, rep, seg, parts), weight.shape[dim]
            layer.parts = parts
            layer._ranges = [split.ranges(size, r) for r in range(tp)]
            layer._full = size
            layer.widths = tuple(sum(e - a for a, e in split.ranges(size, r)) for r in range(tp))
        if rep > 1:
            layer.rep = rep
            for p in (layer.weight, layer.bias):
                if p is not None and p.requires_grad:  # each holder saw only its own heads' share
                    p.register_hook(lambda g, layer=layer: layer._sum_over_holders(g))
        return layer

    def _sum_over_holders(self, g: torch.Tensor) -> torch.Tensor:
        """Sum a gradient over the ranks holding the same block: one all-reduce over a [blocks, ...] buffer (an
        uneven split: over a buffer of the full size, each rank's rows at their place)."""
        if self.group is NO_COMM:
            return g
        if self.parts is not None:
            d = 1 if self.in_out and g.dim() == 2 else 0
            full = g.new_zeros((*g.shape[:d], self._full, *g.shape[d + 1:]))
            mine, at = [], 0
            for a, b in self._ranges[self.rank]:
                full.narrow(d, a, b - a).copy_(g.narrow(d, at, b - a))
                mine.append((a, b))
                at += b - a
            full = all_reduce(full, self.group, "backward", owned=True)
            return torch.cat([full.narrow(d, a, b - a) for a, b in mine], d)
        buf = g.new_zeros((self.tp // self.rep, *g.shape))
        buf[self.rank // self.rep] = g
        return all_reduce(buf, self.group, "backward", owned=True)[self.rank // self.rep]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gather:
            if SHARDED_LOGITS[0] and self.tp > 1 and self.group is not NO_COMM:  # loss_parallel(): kept sharded
                return sharded_logits(self._linear(copy_to_tp(x, self.group, self.copies), self.bias), self.group,
                                      self.rank, self.tp, self.widths)
            if self.tp > 1 and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
                y = gather_linear(x, self.weight, self.bias, self.in_out, self.group, self.tp, self.widths)
                if y is not None:
                    return y
            y = self._linear(copy_to_tp(x, self.group) if self.tp > 1 and self.group is not NO_COMM else x, self.bias)
            return gather_from_tp(y, self.group, self.rank, self.tp, self.widths) if self.tp > 1 else y  # (..., out)
        if self.tp > 1 and self.group is not NO_COMM:
            x = copy_to_tp(x, self.group, self.copies)
        return self._linear(x, self.bias)  # (..., out/tp)

    def extra_repr(self) -> str:
        extra = ((f", rep={self.rep}" if self.rep > 1 else "") + _split_repr(self.parts)
                 + (", gather" if self.gather else ""))
        return f"in={self.in_features}, out_local={self.out_features}, tp={self.tp}, rank={self.rank}{extra}"


class RowParallelLinear(_ParallelLinear):
    """Input features sharded: ``y = g(x_local @ W_local) + b``; the bias is added once, after the sum."""

    style = "rowwise"

    @classmethod
    def from_dense(cls, weight: nn.Parameter, bias: nn.Parameter | None, *, in_out: bool, rank: int, tp: int,
                   group=None, segments: Sequence[int] | None = None,
                   parts: Sequence[int] | None = None) -> "RowParallelLinear":
        """``parts``: an uneven split of the inputs (``split=``), matching the column layers that feed it."""
        parts = tuple(parts) if parts else None
        w = shard_tensor(weight.detach(), 0 if in_out else 1, rank, tp, segments, parts)
        layer = cls(_param(w, weight), bias, in_out=in_out, group=group, tp=tp, rank=rank)
        layer.parts = parts
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in/tp)
        self.copies.clear()  # the group is closing: its input will not be read by its columns again
        y = self._linear(x, None)
        if self.tp > 1 and self.group is not NO_COMM:
            y = reduce_from_tp(y, self.group, owned=True)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_local={self.in_features}, out={self.out_features}, tp={self.tp}, rank={self.rank}"
                + _split_repr(self.parts))


class VocabShard:
    """Shards an embedding module's table by rows, in place: the module keeps its class and forward.

    Before the forward, ids outside the table raise IndexError as the dense lookup does (eager only: a
    compiled forward skips the check), and ids outside this rank's rows ``[start, end)`` become row 0 of the local
    table; after it, their outputs are zeroed and the ranks' outputs all-reduced (one per forward;
    backward needs none: each rank's rows get exactly their tokens' gradient). The module's forward
    may scale the lookup (``embed_scale``): the planner checked it computes nothing else.
    """

    def __init__(self, module: nn.Module, *, rank: int, tp: int, group, weight: nn.Parameter | None = None,
                 parts: Sequence[int] | None = None):
        """``parts``: an uneven split of the rows (``split=``): rank r holds ``parts[r]`` of ``sum(parts)`` units."""
        w = module.weight
        rows = w.shape[0]
        parts = tuple(parts) if parts else None
        if parts is None and rows % tp:
            raise ValueError(f"{rows} rows are not divisible by tp={tp}")
        (self.start, self.end), = shard_ranges(rows, rank, tp, None, parts)
        self.rows, self.group, self.tp = rows, group, tp
        module.weight = weight if weight is not None else _param(shard_tensor(w.detach(), 0, rank, tp, None, parts), w)
        pad = getattr(module, "padding_idx", None)
        if isinstance(pad, int):  # only the rank holding the padding row keeps it gradient-free
            module.padding_idx = pad - self.start if self.start <= pad < self.end else None
        if hasattr(module, "num_embeddings"):
            module.num_embeddings = self.end - self.start
        module._autotp_vocab = (self.start, self.end)
        self._mask: list[torch.Tensor] = []
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after)
        module._autotp_sharded = True  # its parameters are this rank's slices (a global module leaves them be)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if args:
            ids, rest = args[0], ("args", args[1:])
        else:
            keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            if len(keys) != 1:
                raise TypeError(f"{type(module).__name__}: a vocabulary-sharded lookup takes one tensor of ids, "
                                f"got keyword tensors {keys}")
            ids, rest = kwargs[keys[0]], ("kw", keys[0])
        if not torch.compiler.is_compiling() and ids.numel() and _outside(ids, self.rows):
            bad = ids[(ids < 0) | (ids >= self.rows)]
            raise IndexError(f"index out of range in self: {type(module).__name__} has {self.rows} rows (sharded over "
                             f"{self.tp} ranks), but the ids include {bad[:4].tolist()}; the unsharded model raises "
                             f"this IndexError too. Check the tokenizer and the model's vocabulary size")
        keep = (ids >= self.start) & (ids < self.end)
        self._mask.append(keep)
        local = torch.where(keep, ids - self.start, torch.zeros_like(ids))
        if rest[0] == "args":
            return (local, *rest[1]), kwargs
        return args, {**kwargs, rest[1]: local}

    def _after(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        keep = self._mask.pop()
        out = out * keep.unsqueeze(-1).to(out.dtype)
        return reduce_from_tp(out, self.group, owned=True) if self.tp > 1 and self.group is not NO_COMM else out


def _outside(ids: torch.Tensor, rows: int) -> bool:
    lo, hi = torch.aminmax(ids)
    return bool(lo < 0) or bool(hi >= rows)


class _CopyManyToTP(torch.autograd.Function):
    """f for several tensors at once: identity forward; backward, one all-reduce of all their gradients."""

    @staticmethod
    def forward(ctx, group, *xs):
        ctx.group = group
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        live = [g for g in grads if g is not None]
        if not live:
            return (None, *grads)
        flat = all_reduce(torch.cat([g.reshape(-1) for g in live]), ctx.group, "backward", owned=True)
        out, off = [], 0
        for g in grads:
            if g is None:
                out.append(None)
                continue
            out.append(flat[off:off + g.numel()].view_as(g))
            off += g.numel()
        return (None, *out)


class ExpertsShard:
    """Shards an experts module's 3-D weights in place; the module keeps its class and forward.

    ``col`` weights (``[experts, out, in]``, or ``[experts, in, out]`` for ``w=in_out``) keep this
    rank's slice of every expert's outputs (per fused segment), ``row`` weights the matching slice
    of their inputs, so the module's output is a partial sum: it is all-reduced after the forward
    (g). Its floating inputs pass through one f (their gradients are partial on each rank; the
    planner checked that), so backward costs one all-reduce too.
    """

    def __init__(self, module: nn.Module, *, col: list[str], row: list[str], in_out: bool,
                 segments: Sequence[int] | None, rank: int, tp: int, group):
        out_dim, in_dim = (2, 1) if in_out else (1, 2)
        sliced = {}  # parameter name -> (dim, segments): how this rank's slice was cut
        for names, dim, seg in ((col, out_dim, segments), (row, in_dim, None)):
            for name in names:
                w = getattr(module, name)
                setattr(module, name, _param(shard_tensor(w.detach(), dim, rank, tp, seg), w))
                sliced[name] = (dim, list(seg) if seg else None)
        self.group, self.tp = group, tp
        module._autotp_experts = sliced
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after)
        module._autotp_sharded = True  # its parameters are this rank's slices (a global module leaves them be)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.tp == 1 or self.group is NO_COMM:
            return None
        flat = list(args) + list(kwargs.values())
        idx = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not idx:
            return None
        for i, y in zip(idx, _CopyManyToTP.apply(self.group, *[flat[i] for i in idx])):
            flat[i] = y
        return tuple(flat[:len(args)]), dict(zip(kwargs, flat[len(args):]))

    def _after(self, module: nn.Module, args: tuple, out):
        if self.tp == 1 or self.group is NO_COMM:
            return out
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{type(module).__name__}: an experts module sharded in place must return one tensor "
                            f"(its output is all-reduced), got {type(out).__name__}")
        return reduce_from_tp(out, self.group)


class InputSlice:
    """A replicated argument of a module sliced along ``dim`` as it enters (a per-head bias such as
    ALiBi meeting heads that are sharded inside the module): each rank keeps its ``size // tp``.

    The argument goes through f first, so a gradient that reaches it (a learned bias) is summed
    over the ranks in backward.
    """

    def __init__(self, module: nn.Module, *, arg: str, dim: int, size: int, rank: int, tp: int, group,
                 merged: bool = False):
        from autotp.capture.export import positional_names

        if size % tp:
            raise ValueError(f"{size} is not divisible by tp={tp}")
        self.arg, self.dim, self.size, self.rank, self.tp, self.group = arg, dim, size, rank, tp, group
        self.merged = merged  # dim is (-1, size): slice each block of size (batch * heads)
        names = positional_names(module)
        self.pos = int(arg) if arg.isdigit() else (names.index(arg) if arg in names else None)
        self.where = f"{type(module).__name__} argument '{arg}'"
        module.register_forward_pre_hook(self._before, with_kwargs=True)

    def _slice(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        d, n = self.dim, self.size // self.tp
        if x.dim() <= d or (x.shape[d] % self.size if self.merged else x.shape[d] != self.size):
            raise RuntimeError(f"{self.where}: the plan slices dim {d} {'in blocks ' if self.merged else ''}of "
                               f"size {self.size}, got shape {list(x.shape)}; make a plan for these inputs "
                               f"(autotp.make_plan)")
        if self.tp > 1 and self.group is not NO_COMM:
            x = copy_to_tp(x, self.group)
        if self.merged:  # (..., outer * size, ...) -> (..., outer, size, ...): this rank's n of every block
            return x.unflatten(d, (-1, self.size)).narrow(d + 1, self.rank * n, n).flatten(d, d + 1)
        return x.narrow(d, self.rank * n, n)

    def _before(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.arg in kwargs:
            return args, {**kwargs, self.arg: self._slice(kwargs[self.arg])}
        if self.pos is not None and self.pos < len(args):
            return (*args[:self.pos], self._slice(args[self.pos]), *args[self.pos + 1:]), kwargs
        return None  # not passed (None by default): nothing to slice

