"""Parity cases run inside spawned ranks: dense reference vs parallelized copy, same seed."""
from __future__ import annotations

import copy
import inspect
import time

import torch
import torch.distributed as dist
from models import (GPT, AlibiNet, EinsumNet, GateTrap, GPTConfig, HeadsLastAttention, LastBlockDiffers, MHAViT,
                    MLPStack, Nested, NormTrap, ReduceTrap, ResidualTrap, RootHeads, ScaleFromSize, TinyLlama,
                    TorchEncoder, TwiceTrap)

import autotp
from autotp.runtime import collectives
from autotp.runtime.layers import ColumnParallelLinear, RowParallelLinear
from autotp.split import split_of_names


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
    if name == "torch_encoder":  # nn.TransformerEncoder: its MLPs sharded, nn.MultiheadAttention kept whole
        return TorchEncoder(), torch.randn(3, 7, 32)
    if name == "mha_vit":
        return MHAViT(), torch.randn(3, 6, 48)
    if name == "last_block_differs":  # the parent's loop reads the last block's up itself: that block replicated
        return LastBlockDiffers(), torch.randn(3, 5, 32)
    if name == "root_heads":  # the root's own attribute in its reshape: the root patched
        return RootHeads(), torch.randn(3, 5, 32)
    if name == "scale_from_size":  # a Python scale from a sharded size: the module runs on DTensors ('global')
        return Nested(ScaleFromSize()), torch.randn(3, 5, 32)
    if name == "heads_last":  # heads laid out last: v alone could be sharded, but the probabilities need grads
        return HeadsLastAttention(), torch.randn(3, 5, 32)
    traps = {"trap_norm": NormTrap, "trap_residual": ResidualTrap, "trap_twice": TwiceTrap,
             "trap_reduce": ReduceTrap, "trap_gate": GateTrap}
    return traps[name](), torch.randn(3, 5, 16)


CASES = ["nanogpt", "llama_gqa", "llama_kv2", "einsum", "mlp", "alibi", "alibi_merged", "trap_norm", "trap_residual",
         "trap_twice", "trap_reduce", "torch_encoder", "mha_vit", "last_block_differs",
         "heads_last", "trap_gate", "root_heads", "scale_from_size"]


def _held_fraction(e, leaf: str, tp: int, rank: int = 0) -> tuple[int, int]:
    """(numerator, denominator) of a parameter's elements a rank holds, read from its plan line's text alone:
    colwise weights and biases, rowwise weights, vocab tables and the named expert weights are divided among
    tp / rep blocks (``split=``: rank r holds split[r] of sum(split) units); everything else is held whole."""
    if e is None:
        return 1, 1
    named = (e.get("col") or "").split(",") + (e.get("row") or "").split(",")
    sharded = (e.style == "colwise" and leaf in ("weight", "bias") or e.style in ("rowwise", "vocab") and leaf == "weight"
               or e.style == "experts" and leaf in named)
    if sharded and e.get("split"):  # uneven: this rank's blocks (with rep=, a KV head may be held by several)
        from autotp.split import held

        _, n, total = held([int(x) for x in e.get("split").split(",")], int(e.get("rep", "1")), rank)
        return n, total
    return (int(e.get("rep", "1")), tp) if sharded else (1, 1)


class _OptimalBackward:
    """The fewest backward all-reduces the forward it watches allows, counted from what the layers read.

    A group's column layers that read one replicated tensor need one all-reduce of its gradient between them
    (the optimum: one per distinct tensor a group reads, e.g. 1 per block's attention or MLP, 2 for a
    cross-attention, whose q reads the decoder and k/v the encoder); an experts module, a head whose logits
    are gathered, a layer whose heads are held by several ranks and a sliced argument that needs a gradient
    cost one each; a ``sum_grad`` parameter one.
    """

    def __init__(self, model, plan):
        self.events: list[tuple[str, int | None]] = []
        self.hooks = []
        slices = plan.resolve(dict(model.named_modules()).keys(), slices=True)
        lines = plan.resolve(dict(model.named_modules()).keys())
        # per backward, one all-reduce per parameter hooked: sum_grad parameters, and those of heads on several ranks
        self.per_param = sum(len(e.get("p").split(",")) for e in lines.values() if e.style == "sum_grad") + \
            sum(1 for m in model.modules() if isinstance(m, ColumnParallelLinear) and m.rep > 1
                for q in (m.weight, m.bias) if q is not None and q.requires_grad)
        for path, m in model.named_modules():
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) or getattr(m, "_autotp_experts", None):
                self.hooks.append(m.register_forward_pre_hook(self._layer))
        for key, e in slices.items():
            m = model.get_submodule(key.rpartition(":")[0])
            self.hooks.append(m.register_forward_pre_hook(self._slice(e.get("arg"), m), with_kwargs=True))

    def _layer(self, m, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        grad = x is not None and x.requires_grad and torch.is_grad_enabled()
        if isinstance(m, RowParallelLinear):
            self.events.append(("row", None))
        elif isinstance(m, ColumnParallelLinear):
            if grad:
                self.events.append(("gather" if m.gather else "col", id(x)))
        else:  # an experts module: one f for its inputs, one all-reduce after it
            self.events.append(("experts", None))

    def _slice(self, arg: str, m):
        names = list(inspect.signature(m.forward).parameters)

        def hook(mod, args, kwargs):
            x = kwargs.get(arg) if arg in kwargs else args[names.index(arg)] if arg in names and \
                names.index(arg) < len(args) else args[int(arg)] if arg.isdigit() and int(arg) < len(args) else None
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                self.events.append(("slice", None))
        return hook

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def optimum(self) -> int:
        n, read = 0, set()
        for kind, x in self.events:
            if kind == "row":
                read = set()  # the group closes: the next columns open another
            elif kind == "col":
                n += x not in read
                read.add(x)
            else:
                n += 1
        return n + self.per_param


def parity(rank: int, world: int, names=CASES) -> dict:
    """For each case: max diffs of outputs and grads, collective counts, per-rank parameter bytes."""
    out = {}
    for name in names:
        model, x = build(name)
        dense = copy.deepcopy(model)
        plan = autotp.make_plan(model, world, example_inputs=(x,))
        # check=False: measured against the dense model below, outputs and every gradient
        model = autotp.parallelize(model, world, plan=plan, example_inputs=(x,), check=False)
        x_ref = x.clone().requires_grad_() if x.is_floating_point() else x
        x = x.clone().requires_grad_() if x.is_floating_point() else x
        out[name] = measure(rank, world, model, dense, plan, lambda m: m(x if m is model else x_ref))
        if x.is_floating_point():
            out[name]["grad_diff"] = max(out[name]["grad_diff"], (x.grad - x_ref.grad).abs().max().item())
        model.eval(), dense.eval()
        with torch.no_grad():  # inference, where torch may take fused paths (nn.TransformerEncoderLayer)
            out[name]["nograd_diff"] = (model(x) - dense(x_ref)).abs().max().item()
    return out


def error_of(fn) -> str:
    """``TypeName: message`` of what ``fn()`` raised, or ``no error``."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test compares the type and message
        return f"{type(e).__name__}: {e}"
    return "no error"


def measure(rank: int, world: int, model, dense, plan, run) -> dict:
    """Run ``run(dense)`` and ``run(model)`` forward and backward; compare outputs, grads, params, counts."""
    lines = plan.resolve(dict(dense.named_modules()).keys())  # module path -> its plan line
    y_ref = run(dense)
    y_ref.float().pow(2).mean().backward()
    watch = _OptimalBackward(model, plan)
    with collectives.counting() as counts:
        y = run(model)
    watch.remove()
    fwd, gathers = counts["all_reduce.forward"], counts["all_gather.forward"]
    with collectives.counting() as counts:
        y.float().pow(2).mean().backward()
    bwd = counts["all_reduce.backward"]
    dense_params = dict(dense.named_parameters())
    names: dict[int, list[str]] = {}  # a tensor under several names (tied): split by the line that shards it
    for pname, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(pname)
    gdiff, pdiff = 0.0, 0.0
    for pname, p in model.named_parameters():  # each rank holds the slice autotp.split says, of weights and grads
        ref, split = dense_params[pname], split_of_names(names[id(p)], lines, world)
        pdiff = max(pdiff, (p.detach() - split.take(ref.detach(), rank)).abs().max().item())
        if ref.grad is not None or p.grad is not None:
            gdiff = max(gdiff, (p.grad - split.take(ref.grad, rank)).abs().max().item())
    total = sum(p.numel() for p in dense.parameters())
    ideal = 0  # from the dense shapes and the plan text: what each rank should hold
    for ns in names.values():  # a tied tensor: held as the line that shards it says
        p = dense_params[ns[0]]
        num, den = min((_held_fraction(lines.get(n.rpartition(".")[0]), n.rpartition(".")[2], world, rank)
                        for n in ns), key=lambda f: f[0] / f[1])
        ideal += p.numel() * num // den
    local = sum(p.numel() for p in model.parameters())
    allsame = torch.tensor([y.detach().double().sum().item()])  # every rank holds the same full output
    dist.all_reduce(allsame)
    return dict(
        out_diff=(y - y_ref).abs().max().item(), out_scale=y_ref.abs().max().item(),
        grad_diff=gdiff, grad_scale=max(p.grad.abs().max().item() for p in dense.parameters() if p.grad is not None),
        param_diff=pdiff, fwd=fwd, bwd=bwd, bwd_optimum=watch.optimum(), local_params=local, ideal_params=ideal,
        total_params=total, shards=sum(1 for e in plan.entries if e.style in ("colwise", "rowwise")),
        rows=sum(1 for m in model.modules()  # layers with an all-reduce after them (experts modules too)
                 if isinstance(m, RowParallelLinear) or getattr(m, "_autotp_experts", None)),
        vocab=sum(1 for m in model.modules() if getattr(m, "_autotp_vocab", None)), gathers=gathers,
        heads=sum(1 for m in model.modules() if getattr(m, "gather", False) is True),
        shared_heads=sum(1 for m in model.modules() if getattr(m, "rep", 1) > 1),
        same_on_all=abs(allsame.item() / world - y.detach().double().sum().item()),
        classes=type(model).__name__)


def parallelize_and_measure(rank: int, world: int, model, x) -> dict:
    """``parallelize(model, world)`` planned, proven and checked as a user calls it, then ``measure`` against a
    dense copy on the capture inputs ``x`` (None: an HF model's own); its plan under "plan", or {"error": ...}."""
    from autotp.capture.inputs import call, default_inputs, main_tensor

    dense = copy.deepcopy(model)
    try:
        autotp.parallelize(model, world, example_inputs=x)
    except autotp.AutoTPError as e:
        return dict(error=f"{type(e).__name__}: {e}")
    x = default_inputs(dense, x)
    plan = model._autotp_plan
    return dict(measure(rank, world, model, dense, plan, lambda m: main_tensor(call(m, x))), plan=plan)


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
