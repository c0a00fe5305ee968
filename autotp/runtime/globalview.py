"""Run a module's own forward on global shapes: its activations are DTensors.

Code that computes with global sizes — a head count read from the root module's own attribute, a scale from
``q.size(-1)``, ``x.shape`` unpacked in Python, a branch on ``T > 1`` — cannot be rewritten to local sizes op by
op. A ``global`` plan line runs such a module's forward unchanged on DTensor activations instead, so every size
its Python reads is the global one and torch's DTensor propagation decides, op by op, what each rank computes
(redistributing where an op cannot work on shards):

- each sharded layer inside it keeps its local weights: a column layer's output becomes
  ``DTensor.from_local(y, mesh, [Shard(-1)])`` (fused segments: one DTensor per segment, concatenated), a row
  layer takes its input as ``Shard(-1)`` and ``.to_local()``; what a layer returns replicated (a row layer, a
  gathered head, a lookup) is a replicated DTensor;
- the module's other parameters and its floating inputs enter as replicated DTensors (``from_local``, so a
  partial gradient is summed over the group on its way back); tensors made in forward are replicated implicitly;
- its outputs leave as plain tensors, every rank holding the whole (``full_tensor``).

The numbers are the unsharded module's by construction (DTensor's rules are torch's own); the cost is DTensor's
dispatch per op and whatever redistribution its rules choose. On a group that communicates nothing (the plan's
shape check on meta copies) the layers' outputs are tiled to global shapes instead, so the module sees the
shapes it will see.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map, tree_map_only

from autotp.runtime.collectives import DTENSOR_MODULES, NO_COMM, mesh_of


def sharded_children(module: nn.Module) -> dict[str, nn.Module]:
    """The sharded layers inside ``module`` (swapped layers, tables and experts sharded in place)."""
    from autotp.runtime.layers import ColumnParallelLinear, RowParallelLinear

    return {n: m for n, m in module.named_modules() if n and (isinstance(m, (ColumnParallelLinear, RowParallelLinear))
                                                              or getattr(m, "_autotp_sharded", False))}


class GlobalView:
    """Installed on ``module``: its forward runs on DTensor activations over ``group`` (see the module's doc)."""

    def __init__(self, module: nn.Module, *, group: Any, rank: int, tp: int):
        self.module, self.group, self.rank, self.tp = module, group, rank, tp
        self.inner = sharded_children(module)
        owned = {id(p) for m in self.inner.values() for p in m.parameters()}
        self.params = [n for n, p in module.named_parameters(remove_duplicate=False) if id(p) not in owned]
        self.active = False
        self.depth = 0  # inside a sharded layer: its own local tensors
        self.locals: dict[int, tuple] = {}  # replicated DTensor -> its local tensor: the columns reading it share f
        for m in self.inner.values():
            m.register_forward_pre_hook(self._enter_layer, prepend=True)
            m.register_forward_hook(self._leave_layer)
        forward = module.forward

        def run(mod, *args, **kwargs):
            return self.run(forward, args, kwargs)

        module.forward = types.MethodType(run, module)
        module._autotp_global = True
        if group is not NO_COMM:
            DTENSOR_MODULES.append(type(module).__name__)

    # ------------------------------------------------------------------ the layers inside
    def _enter_layer(self, layer: nn.Module, args: tuple) -> tuple | None:
        if not self.active:
            return None
        style = getattr(layer, "style", None)
        self.depth += 1
        if style == "rowwise":  # a group closes: the columns that read a tensor have taken it
            self.locals.clear()
        return tuple(self._to_local(a, style == "rowwise") for a in args)

    def _to_local(self, x: Any, sharded: bool) -> Any:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(x, DTensor) and not (self.group is NO_COMM and isinstance(x, torch.Tensor)):
            return x
        if self.group is NO_COMM:  # tiled copies: this rank's part is the first
            if not sharded:
                return x
            d = x.shape[-1] // self.tp
            return x.narrow(-1, 0, d)
        if sharded:
            return x.redistribute(placements=[Shard(x.dim() - 1)]).to_local()
        held = self.locals.get(id(x))
        if held is None or held[0] is not x:  # (the DTensor is held too: its id cannot be reused meanwhile)
            held = self.locals[id(x)] = (x, x.redistribute(placements=[Replicate()]).to_local())
        return held[1]

    def _leave_layer(self, layer: nn.Module, args: tuple, out: Any) -> Any:
        if not self.active:
            return None
        self.depth -= 1
        seg = getattr(layer, "segments", None)
        sharded = getattr(layer, "style", None) == "colwise" and not getattr(layer, "gather", False)
        return tree_map_only(torch.Tensor, lambda t: self._to_global(t, sharded, seg), out)

    def _to_global(self, y: torch.Tensor, sharded: bool, seg: list[int] | None) -> torch.Tensor:
        if self.group is NO_COMM:
            return torch.cat([y] * self.tp, -1) if sharded else y
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = mesh_of(self.group)
        if not sharded:
            return DTensor.from_local(y, mesh, [Replicate()], run_check=False)
        if seg and len(seg) > 1:  # [q_r, k_r, v_r]: one sharded DTensor per segment, in the global order
            pieces = y.split([s // self.tp for s in seg], -1)
            return torch.cat([DTensor.from_local(p, mesh, [Shard(p.dim() - 1)], run_check=False) for p in pieces], -1)
        return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)

    # ------------------------------------------------------------------ the module itself
    def run(self, forward, args: tuple, kwargs: dict) -> Any:
        if self.active or self.tp == 1:
            return forward(*args, **kwargs)
        if self.group is NO_COMM:
            self.active = True
            try:
                return forward(*args, **kwargs)
            finally:
                self.active = False
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor.experimental import implicit_replication
        from torch.nn.attention import SDPBackend, sdpa_kernel

        mesh = mesh_of(self.group)

        def rep(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and t.is_floating_point():
                return DTensor.from_local(t, mesh, [Replicate()], run_check=False)
            return t

        def pack(t: torch.Tensor) -> torch.Tensor:
            """A plain tensor saved for backward outside the layers (a mask made in forward) meets DTensor
            gradients there, where implicit replication is off: saved as the replicated DTensor it stood for."""
            if self.depth or isinstance(t, DTensor):
                return t
            with torch.no_grad():
                return DTensor.from_local(t, mesh, [Replicate()], run_check=False)

        named = dict(self.module.named_parameters(remove_duplicate=False))
        swapped = {n: rep(named[n]) for n in self.params}
        self.active, self.locals, self.depth = True, {}, 0
        try:  # the math attention: DTensor has rules for its ops, not for the CPU's fused kernel
            with implicit_replication(), sdpa_kernel([SDPBackend.MATH]), _swapped(self.module, swapped), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = forward(*tree_map(rep, args), **tree_map(rep, kwargs))
        finally:
            self.active, self.locals, self.depth = False, {}, 0
        return tree_map_only(DTensor, lambda t: t.full_tensor(), out)


@contextlib.contextmanager
def _swapped(module: nn.Module, tensors: dict[str, torch.Tensor]):
    """Parameters of ``module`` replaced by other tensors (replicated DTensors of them) for one call."""
    saved = []
    for name, t in tensors.items():
        path, _, leaf = name.rpartition(".")
        holder = module.get_submodule(path) if path else module
        saved.append((holder, leaf, holder._parameters[leaf]))
        holder._parameters[leaf] = t
    try:
        yield
    finally:
        for holder, leaf, p in saved:
            holder._parameters[leaf] = p
