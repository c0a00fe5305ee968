"""Where parameters meet activations: linear-like sites and embedding lookups. Pure graph reading.

A *site* multiplies an activation by a 2-D parameter (``linear``, GPT-2's ``addmm``, ``x @ W``);
a *lookup* picks rows of a 2-D table by integer ids (``embedding``). A table tied to a linear
(input embeddings shared with the LM head) is one parameter read by both; both must then slice
it the same way: by rows (vocabulary). A replicated parameter applied to sharded values gets a
partial gradient on each rank (``partial_grads``).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.fx as fx

from autotp.capture import source
from autotp.capture.export import Captured
from autotp.errors import ShardingError
from autotp.plan import glob_of, line_path

aten = torch.ops.aten
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, aten.mT.default,
              aten.swapaxes.default, aten.swapdims.default, aten.adjoint.default}
SHAPE_ONLY = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.sym_size.int,
              aten._assert_tensor_metadata.default}
# ops that keep a partial sum partial, position by position: what may sit between a lookup and its module's output
_PARTIAL_SAFE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten._to_copy.default,
                 aten.to.dtype, aten.alias.default, aten.clone.default, aten.contiguous.default, aten.detach.default,
                 aten.type_as.default, aten._assert_tensor_metadata.default}
_ID_PATH = SHAPE_ONLY | {aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.clone.default,
                         aten.contiguous.default, aten.unsqueeze.default, aten.flatten.using_ints}


@dataclass
class Site:
    """A node that multiplies an activation by a parameter (``linear``, ``addmm``, ``x @ W``)."""

    node: fx.Node
    x: fx.Node
    weight: str
    bias: str | None
    in_out: bool  # weight stored [in, out] (Conv1D, x @ W) rather than [out, in]
    module: str
    in_features: int
    out_features: int
    blocker: str | None = None  # why this module cannot be swapped for a sharded layer
    tied: bool = False  # its weight is also an embedding table: only output (row-of-W) sharding is consistent
    experts: int = 0  # a grouped projection: one [experts, ...] 3-D weight, rows of x routed to their expert


@dataclass
class Lookup:
    """``embedding(W, ids)``: rows of W picked by ids. ``from_input``: the ids are a model input (tokens)."""

    node: fx.Node
    weight: str
    module: str
    rows: int
    dim: int
    from_input: bool
    blocker: str | None = None
    tied: Site | None = None


def find_sites(c: Captured) -> dict[fx.Node, Site]:
    sites: dict[fx.Node, Site] = {}
    for n in c.graph.nodes:
        s = _site(c, n)
        if s is not None:
            sites[n] = s
    lookups = {n for n in c.graph.nodes if n.target is aten.embedding.default}
    by_weight: dict[str, list[Site]] = {}
    for s in sites.values():
        by_weight.setdefault(_param_key(c, s.weight), []).append(s)
    uses_of = _param_uses(c)  # every use of each weight, not only linear-like ones
    for key, ss in by_weight.items():
        phs, uses = uses_of.get(key, ((), []))
        rest = [u for u in uses if u not in lookups or u.args[0] not in phs]
        if len(rest) == 1 and len(uses) > 1 and all(not s.in_out for s in ss):
            for s in ss:
                s.tied = True  # an embedding table applied as a linear: shardable by its rows only
        elif len(uses) > 1:
            for s in ss:
                s.blocker = f"its weight {key} is used by {len(uses)} ops (shared/tied or applied twice)"
    owned: dict[str, list[fx.Node]] = {}  # module -> its ops, built once (checking each site by a scan is quadratic)
    for n in c.graph.nodes:
        if n.op == "call_function":
            owned.setdefault(c.owner(n), []).append(n)
    for s in sites.values():
        s.blocker = s.blocker or _purity(c, s, owned.get(s.module, []))
    return sites


def _param_key(c: Captured, name: str) -> str:
    """One name per parameter: its first name (a tied parameter has several, and may reach the graph as several
    placeholders, one per name)."""
    return c.aliases.get(name, (name,))[0]


def _param_uses(c: Captured) -> dict[str, tuple[tuple[fx.Node, ...], list[fx.Node]]]:
    """Parameter (``_param_key``) -> (its placeholders, every op reading it through any of them)."""
    out: dict[str, tuple[tuple[fx.Node, ...], list[fx.Node]]] = {}
    for n in c.graph.nodes:
        name = c.param_name(n)
        if name is not None:
            phs, uses = out.get(_param_key(c, name), ((), []))
            out[_param_key(c, name)] = (phs + (n,), uses + _uses(n))
    return out


def find_lookups(c: Captured, sites: dict[fx.Node, Site]) -> list[Lookup]:
    """Every embedding lookup of a parameter table, with why it could not be vocabulary-sharded."""
    tied = {_param_key(c, s.weight): s for s in sites.values() if s.tied}
    out = []
    for n in c.graph.nodes:
        if n.target is not aten.embedding.default or not c.param_name(n.args[0]):
            continue
        w = c.param_name(n.args[0])
        shape = c.shape(n.args[0])
        if shape is None or len(shape) != 2:
            continue
        module = c.owner(n)
        lk = Lookup(n, w, module, shape[0], shape[1], _from_input(c, n.args[1]), tied=tied.get(_param_key(c, w)))
        lk.blocker = _lookup_purity(c, lk)
        out.append(lk)
    by_w: dict[str, list[Lookup]] = {}
    for lk in out:
        by_w.setdefault(lk.weight, []).append(lk)
    uses_of = _param_uses(c)
    for w, lks in by_w.items():
        uses = [u for u in uses_of[_param_key(c, w)][1] if u.target is not aten.embedding.default]
        if len(uses) > (1 if _param_key(c, w) in tied else 0):
            for lk in lks:
                lk.blocker = lk.blocker or f"its table {w} is also used by {uses[0].name}"
    return out


def _from_input(c: Captured, ids: fx.Node) -> bool:
    while isinstance(ids, fx.Node) and ids.op == "call_function" and ids.target in _ID_PATH:
        ids = ids.args[0]
    return isinstance(ids, fx.Node) and ids.op == "placeholder" and ids.name in c.user_inputs


def _lookup_purity(c: Captured, lk: Lookup) -> str | None:
    """The module's output must be the lookup, scaled at most: a per-rank partial sum reduced at its boundary."""
    n = lk.node
    if any(bool(a) for a in n.args[3:5]):
        return "it scales gradients by frequency or has sparse gradients"
    if not lk.module or c.alias_in(lk.weight, lk.module) != lk.module + ".weight":
        return f"its table {lk.weight} is not the 'weight' of the module that looks it up ('{lk.module}')"
    mine = {c.alias_in(v, lk.module) for v in c.params.values()} - {None, lk.module + ".weight"}
    if mine:
        return f"module '{lk.module}' has other parameters ({', '.join(sorted(mine))})"
    stack, seen = [n], set()
    while stack:
        for u in stack.pop().users:
            if u in seen or c.owner(u) != lk.module and not c.owner(u).startswith(lk.module + "."):
                continue
            seen.add(u)
            if u.target not in _PARTIAL_SAFE or u.target in (aten.mul.Tensor, aten.div.Tensor) and \
                    any(a in seen or a is n for a in u.args[1:2]) or c.shape(u) != c.shape(n):
                return f"module '{lk.module}' computes more than a scaled lookup ({op_name(u)})"
            stack.append(u)
    return None


def partial_grads(c: Captured, layouts: dict, swapped: set[str]) -> dict[str, list[str]]:
    """Replicated parameters that meet sharded values (a q/k norm's weight, an activation's slope).

    Each rank back-propagates only its shard, so such a parameter's gradient is a partial sum:
    it must be all-reduced. A parameter that is also used on replicated activations would get
    a mix of full and partial terms that no single reduction fixes: that is refused.
    """
    def sharded(n: fx.Node) -> bool:
        ins: list = []
        fx.node.map_arg((n.args, n.kwargs), ins.append)
        return layouts.get(n) is not None or any(layouts.get(a) is not None for a in ins)

    out: dict[str, list[str]] = {}
    for ph in c.graph.nodes:
        name = c.param_name(ph)
        if name is None or name in swapped:
            continue
        derived, stack, meets, plain = {ph}, [ph], [], []
        while stack:
            for u in stack.pop().users:
                if u in derived or u.op == "output":
                    continue
                ins: list = []
                fx.node.map_arg((u.args, u.kwargs), ins.append)
                if sharded(u):
                    meets.append(u)
                elif all(a in derived or c.shape(a) is None or a.op == "get_attr"
                         or a.op == "placeholder" and (c.param_name(a) or a.name in c.buffers) for a in ins):
                    derived.add(u)  # a computation on parameters alone (w + 1, w.to(dtype))
                    stack.append(u)
                else:
                    plain.append(u)
        if meets and plain:
            raise ShardingError(f"parameter {name} is used both on sharded values (by {op_name(meets[0])} in "
                                f"'{line_path(glob_of(Captured.owner(meets[0])))}'{source.at(source.of_node(meets[0]))})"
                                f" and on replicated ones (by {op_name(plain[0])} in "
                                f"'{line_path(glob_of(Captured.owner(plain[0])))}'{source.at(source.of_node(plain[0]))})"
                                f"; its gradient cannot be made exact. Fix: "
                                f"edit the plan to replicate the layers around '{Captured.owner(meets[0])}'.")
        if meets:
            mod, _, leaf = name.rpartition(".")
            out.setdefault(mod, []).append(leaf)
    return out


def _uses(p: fx.Node) -> list[fx.Node]:
    out = []
    for u in p.users:
        out.extend(_uses(u) if u.target in TRANSPOSES else [u])
    return out


def is_grouped_mm(n: fx.Node) -> bool:
    """``grouped_mm(x, W, offsets)``: x's rows, sorted by expert, each multiplied by its expert's W[e]."""
    t = n.target
    return n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and \
        t._overloadpacket.__name__ in ("_grouped_mm", "grouped_mm_fallback") and len(n.args) >= 3


def _grouped_site(c: Captured, n: fx.Node) -> Site | None:
    x, w = n.args[0], n.args[1]
    in_out = True
    if isinstance(w, fx.Node) and w.target is aten.transpose.int and c.param_name(w.args[0]) and \
            sorted(d % 3 for d in w.args[1:3]) == [1, 2]:
        w, in_out = w.args[0], False
    ws = c.shape(w)
    if not c.param_name(w) or ws is None or len(ws) != 3:
        return None
    wname = c.alias_in(c.param_name(w), c.owner(n)) or c.param_name(w)
    in_f, out_f = (ws[1], ws[2]) if in_out else (ws[2], ws[1])
    return Site(n, x, wname, None, in_out, c.owner(n), in_f, out_f, experts=ws[0])


def _site(c: Captured, n: fx.Node) -> Site | None:
    if n.op != "call_function":
        return None
    if is_grouped_mm(n):
        return _grouped_site(c, n)
    bias, in_out = None, False
    if n.target is aten.linear.default and c.param_name(n.args[1]):
        x, w = n.args[0], n.args[1]
        bias = n.args[2] if len(n.args) > 2 else None
    elif n.target is aten.addmm.default and c.param_name(n.args[2]):
        bias, x, w, in_out = n.args[0], n.args[1], n.args[2], True
    elif n.target in (aten.matmul.default, aten.mm.default):
        x, w = n.args[0], n.args[1]
        if c.param_name(w):
            in_out = True
        elif isinstance(w, fx.Node) and w.target in TRANSPOSES and c.param_name(w.args[0]):
            w = w.args[0]
        else:
            return None
        adds = [u for u in n.users if u.target is aten.add.Tensor and c.param_name(u.args[1])
                and c.owner(u) == c.owner(n)]
        bias = adds[0].args[1] if len(adds) == 1 else None
    else:
        return None
    ws = c.shape(w)
    if ws is None or len(ws) != 2:
        return None
    wname = c.alias_in(c.param_name(w), c.owner(n)) or c.param_name(w)  # a tied weight: this module's name for it
    bname = c.param_name(bias) if bias is not None else None
    bname = (c.alias_in(bname, c.owner(n)) or bname) if bname else None
    in_f, out_f = (ws[0], ws[1]) if in_out else (ws[1], ws[0])
    return Site(n, x, wname, bname, in_out, wname.rpartition(".")[0], in_f, out_f)


def _purity(c: Captured, s: Site, own: list[fx.Node]) -> str | None:
    """A module is swappable if it is exactly one linear: weight (+bias) and shape-only ops.

    An experts module is sharded in place instead: its parameters must be its grouped weights only.
    """
    if s.experts:
        grouped = {g.weight for n in own if is_grouped_mm(n) and (g := _grouped_site(c, n)) is not None}
        mine = {a for v in c.params.values() for a in c.aliases.get(v, (v,)) if a.rpartition(".")[0] == s.module}
        if mine - grouped:
            return f"experts module '{s.module}' has parameters besides its grouped weights " \
                   f"({', '.join(sorted(mine - grouped))})"
        return None
    if not s.weight.endswith(".weight") or (s.bias and s.bias != s.module + ".bias"):
        more = [n for n in own if n is not s.node and n.target not in SHAPE_ONLY | TRANSPOSES]
        also = f", and the module computes more than that linear ({op_name(more[0])})" if more else ""
        return (f"its weight {s.weight.rpartition('.')[2]} is a parameter of the module, not a linear layer's "
                f"weight/bias{also}: no sharded layer can stand in for the module")
    if c.owner(s.node) != s.module:
        return (f"its weight is applied by '{line_path(glob_of(c.owner(s.node)))}' itself, not by calling "
                f"'{glob_of(s.module)}': a sharded layer swapped in for it would not run")
    extra = [n for n in own if n is not s.node and n.target not in SHAPE_ONLY | TRANSPOSES
             and not (n.target is aten.add.Tensor and n.args[0] is s.node)]
    if extra:
        return f"module '{glob_of(s.module)}' computes more than one linear ({op_name(extra[0])})"
    mine = {a for v in c.params.values() for a in c.aliases.get(v, (v,)) if a.rpartition(".")[0] == s.module}
    if mine - {s.weight, s.bias}:
        return f"module '{s.module}' has other parameters ({', '.join(sorted(mine - {s.weight, s.bias}))})"
    return None


# ops linear in one operand: a per-rank partial sum stays one through them (the others must be replicated)
_LINEAR_IN_ARG0 = SHAPE_ONLY | TRANSPOSES | {
    aten.index.Tensor, aten.unsqueeze.default, aten.squeeze.dim, aten.sum.dim_IntList, aten.sum.default,
    aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.clone.default, aten.contiguous.default}
_ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}


def experts_boundary(c: Captured, cols: list[Site], row: Site) -> str | None:
    """Why an experts module cannot be sharded in place with f at its inputs and g at its output; None if it can.

    In place means: each rank computes its slice of every expert's hidden features, so the down
    projection's result is a per-rank partial sum. Every op from there to the module's output
    must keep it one (index, reshape, sum, multiply by a replicated routing weight...), so that
    one all-reduce of the output makes it whole. Backward, every floating input's gradient must
    be partial on each rank too (it reaches only the column projections, or multiplies a partial
    value), so that one all-reduce of the inputs' gradients (f) makes them whole.
    """
    mod = row.module
    if any(x.module != mod for x in cols):
        return f"the group mixes experts module '{mod}' with other layers"

    def inside(n: fx.Node) -> bool:
        o = c.owner(n)
        return n.op == "call_function" and (o == mod or o.startswith(mod + "."))

    partial, heap, exits = {row.node}, [(c.order[row.node], row.node)], set()
    while heap:  # in graph order, so both operands of an add are known when it is reached
        _, p = heapq.heappop(heap)
        for u in p.users:
            if not inside(u):
                exits.add(p)
                continue
            if u in partial or u.target is aten._assert_tensor_metadata.default:
                continue
            if not _keeps_partial(u, p, partial):
                return f"{op_name(u)} in '{mod}' does not keep the experts' partial sums partial"
            partial.add(u)
            heapq.heappush(heap, (c.order[u], u))
    if len(exits) != 1:
        return f"experts module '{mod}' has {len(exits)} outputs; one is needed for its all-reduce"
    xs = {x.node: x.x for x in cols}
    inputs = {a for n in c.graph.nodes if inside(n) for a in n.all_input_nodes if not inside(a)}
    for v in inputs:
        val = v.meta.get("val")
        if c.param_name(v) or not isinstance(val, torch.Tensor) or not val.dtype.is_floating_point:
            continue
        stack, seen = [v], set()
        while stack:
            p = stack.pop()
            for u in p.users:
                if not inside(u) or u in seen or u.target is aten._assert_tensor_metadata.default:
                    continue
                seen.add(u)
                if xs.get(u) is p or u.target is aten.mul.Tensor and any(a in partial for a in u.args[:2]):
                    continue  # reaches a column projection's input, or scales a partial sum
                if u.target in _LINEAR_IN_ARG0 and u.args[0] is p:
                    stack.append(u)
                    continue
                return (f"input {_name(c, v)} of experts module '{mod}' is also used by {op_name(u)} on replicated "
                        f"values: its gradient would mix partial and whole terms")
    return None


def _keeps_partial(u: fx.Node, p: fx.Node, partial: set[fx.Node]) -> bool:
    """``u`` reading the partial sum ``p`` is linear in it (its other operands replicated)."""
    others = [a for a in u.all_input_nodes if a is not p]
    if u.target is aten.add.Tensor:
        return all(isinstance(a, fx.Node) and a in partial for a in u.args[:2])
    if any(a in partial for a in others):
        return False
    if u.target in _LINEAR_IN_ARG0 or u.target is aten.div.Tensor:
        return u.args[0] is p
    if u.target in (aten.index_add.default, aten.index_add_.default):
        zeros = u.args[0]
        return u.args[3] is p and isinstance(zeros, fx.Node) and zeros.target in _ZEROS
    return u.target is aten.mul.Tensor


def _name(c: Captured, n: fx.Node) -> str:
    return f"'{n.target}'" if n.op == "placeholder" else f"({op_name(n)} in '{line_path(c.owner(n))}')"


def op_name(n: fx.Node) -> str:
    t = n.target
    return f"aten.{t._overloadpacket.__name__}" if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))
