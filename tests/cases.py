"""Parity cases run inside spawned ranks: dense reference vs parallelized copy, same seed."""
from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

import autotp
from autotp import collectives
from autotp.layers import ColumnParallelLinear, RowParallelLinear, shard_ranges
from models import (GPT, AlibiNet, EinsumNet, GPTConfig, MLPStack, NormTrap, ReduceTrap, ResidualTrap, TinyLlama,
                    TwiceTrap)


def build(name: str):
    torch.manual_seed(0)
    if name == "nanogpt":
        return GPT(GPTConfig(n_head=4, n_embd=32)), torch.randint(0, 96, (3, 12))
    if name == "llama_gqa":
        return TinyLlama(n_heads=8, n_kv_heads=4, dim=64, hidden=128), torch.randint(0, 80, (3, 10))
    if name == "llama_kv2":  # 2 KV heads: at tp=4 each is held by 2 ranks
        return TinyLlama(n_heads=8, n_kv_heads=2, dim=64, hidden=128), torch.randint(0, 80, (3, 10))
    if name == "einsum":
        return EinsumNet(dim=32, n_heads=4), torch.randn(3, 10, 32)
    if name == "mlp":
        return MLPStack(), torch.randn(3, 7, 32)
    if name in ("alibi", "alibi_merged"):  # a per-head bias sliced on its way into each block
        return AlibiNet(merged=name == "alibi_merged"), torch.randn(3, 9, 32)
    traps = {"trap_norm": NormTrap, "trap_residual": ResidualTrap, "trap_twice": TwiceTrap,
             "trap_reduce": ReduceTrap}
    return traps[name](), torch.randn(3, 5, 16)


CASES = ["nanogpt", "llama_gqa", "llama_kv2", "einsum", "mlp", "alibi", "alibi_merged", "trap_norm", "trap_residual", "trap_twice", "trap_reduce"]


def _local_slice(dense_p: torch.Tensor, mod, name: str, rank: int, tp: int, seg) -> torch.Tensor:
    """The slice of a dense tensor this rank should hold for parameter ``name`` of ``mod``."""
    if getattr(mod, "_autotp_vocab", None) and name == "weight":  # a table sharded by rows
        a, b = mod._autotp_vocab
        return dense_p[a:b]
    if name in getattr(mod, "_autotp_experts", {}):  # an expert weight sliced in place
        dim, seg = mod._autotp_experts[name]
        return torch.cat([dense_p.narrow(dim, a, b - a) for a, b in shard_ranges(dense_p.shape[dim], rank, tp, seg)],
                         dim)
    if isinstance(mod, ColumnParallelLinear):
        dim = (1 if mod.in_out else 0) if name == "weight" else 0
    elif isinstance(mod, RowParallelLinear) and name == "weight":
        dim = 0 if mod.in_out else 1
    else:
        return dense_p
    rep = getattr(mod, "rep", 1)  # fewer heads than ranks: rep ranks hold the same block
    ranges = shard_ranges(dense_p.shape[dim], rank // rep, tp // rep, seg)
    return torch.cat([dense_p.narrow(dim, a, b - a) for a, b in ranges], dim)


def _holders(model) -> dict[int, tuple[str, str]]:
    """Parameter id -> (module path, name) of the holder that says how it is sliced (tied tables have several)."""
    out: dict[int, tuple[str, str]] = {}
    mods = dict(model.named_modules())
    for name, p in model.named_parameters(remove_duplicate=False):
        path, _, leaf = name.rpartition(".")
        m = mods[path]
        if id(p) not in out or isinstance(m, (ColumnParallelLinear, RowParallelLinear)) or \
                getattr(m, "_autotp_vocab", None):
            out[id(p)] = (path, leaf)
    return out


def parity(rank: int, world: int, names=CASES) -> dict:
    """For each case: max diffs of outputs and grads, collective counts, per-rank parameter bytes."""
    out = {}
    for name in names:
        model, x = build(name)
        dense = copy.deepcopy(model)
        plan = autotp.make_plan(model, world, example_inputs=(x,))
        model = autotp.parallelize(model, world, plan=plan, example_inputs=(x,))
        x_ref = x.clone().requires_grad_() if x.is_floating_point() else x
        x = x.clone().requires_grad_() if x.is_floating_point() else x
        out[name] = measure(rank, world, model, dense, plan, lambda m: m(x if m is model else x_ref))
        if x.is_floating_point():
            out[name]["grad_diff"] = max(out[name]["grad_diff"], (x.grad - x_ref.grad).abs().max().item())
    return out


def measure(rank: int, world: int, model, dense, plan, run) -> dict:
    """Run ``run(dense)`` and ``run(model)`` forward and backward; compare outputs, grads, params, counts."""
    seg_of = {path: e.ints("seg") for path, e in plan.resolve(dict(model.named_modules()).keys()).items()}
    y_ref = run(dense)
    y_ref.float().pow(2).mean().backward()
    collectives.reset_counts()
    y = run(model)
    fwd = collectives.COUNTS["all_reduce.forward"]
    gathers = collectives.COUNTS["all_gather.forward"]
    y.float().pow(2).mean().backward()
    bwd = collectives.COUNTS["all_reduce.backward"]
    dense_params = dict(dense.named_parameters())
    gdiff, pdiff = 0.0, 0.0
    mods = dict(model.named_modules())
    holder = _holders(model)
    for pname, p in model.named_parameters():
        mpath, leaf = holder[id(p)]
        ref = dense_params[pname]
        want_p = _local_slice(ref.detach(), mods[mpath], leaf, rank, world, seg_of.get(mpath))
        pdiff = max(pdiff, (p.detach() - want_p).abs().max().item())
        if ref.grad is not None or p.grad is not None:
            want_g = _local_slice(ref.grad, mods[mpath], leaf, rank, world, seg_of.get(mpath))
            gdiff = max(gdiff, (p.grad - want_g).abs().max().item())
    total = sum(p.numel() for p in dense.parameters())
    ideal = total  # replicated + shardable / tp (a block held by rep ranks counts rep / tp)
    local_of = dict(model.named_parameters())
    for n, p in dense.named_parameters():
        m = mods.get(holder[id(local_of[n])][0])
        if isinstance(m, ColumnParallelLinear) or (isinstance(m, RowParallelLinear) and n.endswith("weight")) or \
                getattr(m, "_autotp_vocab", None) and n.endswith("weight") or \
                n.rpartition(".")[2] in getattr(m, "_autotp_experts", {}):
            ideal -= p.numel() - p.numel() * getattr(m, "rep", 1) // world
    local = sum(p.numel() for p in model.parameters())
    allsame = torch.tensor([y.detach().double().sum().item()])  # every rank holds the same full output
    dist.all_reduce(allsame)
    return dict(
        out_diff=(y - y_ref).abs().max().item(), out_scale=y_ref.abs().max().item(),
        grad_diff=gdiff, grad_scale=max(p.grad.abs().max().item() for p in dense.parameters() if p.grad is not None),
        param_diff=pdiff, fwd=fwd, bwd=bwd, local_params=local, ideal_params=ideal,
        total_params=total, shards=sum(1 for e in plan.entries if e.style in ("colwise", "rowwise")),
        rows=sum(1 for m in model.modules()  # layers with an all-reduce after them (experts modules too)
                 if isinstance(m, RowParallelLinear) or getattr(m, "_autotp_experts", None)),
        vocab=sum(1 for m in model.modules() if getattr(m, "_autotp_vocab", None)), gathers=gathers,
        heads=sum(1 for m in model.modules() if getattr(m, "gather", False) is True),
        shared_heads=sum(1 for m in model.modules() if getattr(m, "rep", 1) > 1),
        same_on_all=abs(allsame.item() / world - y.detach().double().sum().item()),
        classes=type(model).__name__)


def bad_group_inputs(rank: int, world: int) -> dict:
    """Errors that need a live process group: tp != group size, a plan for another tp."""
    model, x = build("mlp")
    out = {}
    for key, call in [("tp", lambda: autotp.parallelize(model, world * 2, example_inputs=(x,))),
                      ("plan_tp", lambda: autotp.parallelize(
                          model, plan=autotp.make_plan(model, world * 2, example_inputs=(x,)), example_inputs=(x,)))]:
        try:
            call()
            out[key] = None
        except autotp.AutoTPError as e:
            out[key] = f"{type(e).__name__}: {e}"
    other, ids = build("nanogpt")  # rank 1 alone passes the plan of another model: it fails, rank 0 is told
    wrong = autotp.make_plan(other, world, example_inputs=(ids,)) if rank == 1 else None
    t0 = time.monotonic()
    try:
        autotp.parallelize(model, world, plan=wrong, example_inputs=(x,))
        out["one_rank"] = None
    except autotp.AutoTPError as e:
        out["one_rank"] = f"{type(e).__name__}: {e}"
    out["one_rank_s"] = time.monotonic() - t0
    return out
