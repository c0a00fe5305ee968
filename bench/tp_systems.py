"""The tensor-parallel systems compared by ``side_by_side.py``, each applied to the same Llama model.

Every ``setup_*`` function takes a freshly built dense model (identical on every rank: same seed)
and returns a callable ``forward(ids) -> logits`` whose logits are the full (unsharded) ones on every
rank, plus the module whose parameters that rank now holds. Heavy imports stay inside the functions,
so a process only loads the system it runs (DeepSpeed patches global state when imported).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]

# the Megatron plan written by hand for a Llama: module suffix -> style
COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class ModelSize:
    """The Llama shape and the input batch every system runs."""

    hidden: int = 1024
    layers: int = 4
    heads: int = 16
    kv_heads: int = 8
    intermediate: int = 2816
    vocab: int = 32000
    batch: int = 4
    seq: int = 256
    seed: int = 0
    new_tokens: int = 0  # 0: one forward's logits, no KV cache; N: greedy generate() of N tokens with one


def generating(prepared: "Prepared", new_tokens: int) -> "Prepared":
    """The same system timed on greedy ``generate()`` of ``new_tokens`` tokens (KV cache, no early stop):
    its output is the token ids, prompt included. Every system here holds a Hugging Face model in
    ``module`` whose forward it has swapped, so its ``generate`` runs the sharded layers."""
    def run(ids: torch.Tensor) -> torch.Tensor:
        return prepared.module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    return Prepared(run, prepared.module)


@dataclass
class Prepared:
    """A system ready to run: its forward and the module holding this rank's parameters."""

    forward: Forward
    module: nn.Module


def build_model(size: ModelSize) -> nn.Module:
    """A seeded, randomly initialised fp32 ``LlamaForCausalLM`` in eval mode (untied head)."""
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(
        hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=size.vocab,
        max_position_embeddings=max(2048, size.seq), tie_word_embeddings=False)
    torch.manual_seed(size.seed)
    return transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()


def build_inputs(size: ModelSize) -> torch.Tensor:
    """Seeded token ids of shape ``(batch, seq)``."""
    g = torch.Generator().manual_seed(size.seed + 1)
    return torch.randint(0, size.vocab, (size.batch, size.seq), generator=g)


def hf_forward(model: nn.Module) -> Forward:
    """Logits of a Hugging Face causal LM, without a KV cache."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def setup_dense(model: nn.Module, rank: int, tp: int) -> Prepared:
    """The unsharded model (tp=1)."""
    return Prepared(hf_forward(model), model)


def setup_autotp(model: nn.Module, rank: int, tp: int) -> Prepared:
    """autotp: the plan is derived from the captured graph; no model-specific input."""
    import autotp

    autotp.parallelize(model, tp=tp)
    return Prepared(hf_forward(model), model)


def setup_autotp_gloo(model: nn.Module, rank: int, tp: int) -> Prepared:
    """autotp with its shared-memory transport turned off (AUTOTP_SHM=0): every collective on gloo."""
    import os

    os.environ["AUTOTP_SHM"] = "0"
    return setup_autotp(model, rank, tp)


class HandColumn(nn.Module):
    """Output rows ``rank`` of ``tp``: ``y_local = x @ W_local.T (+ b_local)``; no communication."""

    def __init__(self, dense: nn.Linear, rank: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach().chunk(tp, 0)[rank].clone(), requires_grad=False)
        b = dense.bias
        self.bias = None if b is None else nn.Parameter(b.detach().chunk(tp, 0)[rank].clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HandRow(nn.Module):
    """Input columns ``rank`` of ``tp``: ``y = all_reduce(x_local @ W_local.T) (+ b)``, reduced in place."""

    def __init__(self, dense: nn.Linear, rank: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(dense.weight.detach().chunk(tp, 1)[rank].clone(), requires_grad=False)
        self.bias = dense.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class HandGatherHead(HandColumn):
    """A column-sharded LM head whose logits are gathered into the full vocabulary on every rank.

    ``by_reduce=False``: one ``all_gather_into_tensor`` (textbook Megatron), then a copy into the
    vocabulary order. ``by_reduce=True``: each rank writes its slice into a zeroed full-size buffer
    and the ranks all-reduce it (exact: every other term is zero); gloo's all-reduce is several times
    faster than its all-gather of the same bytes, and the result needs no reordering.
    """

    def __init__(self, dense: nn.Linear, rank: int, tp: int, *, by_reduce: bool):
        super().__init__(dense, rank, tp)
        self.rank, self.tp, self.by_reduce = rank, tp, by_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        n = y.shape[-1]
        if self.by_reduce:
            out = y.new_zeros((*y.shape[:-1], self.tp * n))
            out[..., self.rank * n:(self.rank + 1) * n] = y
            dist.all_reduce(out)
            return out
        parts = y.new_empty((self.tp * y.shape[0], *y.shape[1:]))  # the ranks' outputs stacked on dim 0
        dist.all_gather_into_tensor(parts, y)
        return parts.view(self.tp, *y.shape).movedim(0, -2).reshape(*y.shape[:-1], self.tp * n)


def _swap_hand(model: nn.Module, rank: int, tp: int, *, by_reduce: bool) -> Prepared:
    """Hand-written Megatron module swap: q/k/v/gate/up by rows, o/down by columns, the LM head by
    vocabulary rows with its logits gathered; token embeddings replicated (no communication)."""
    for name, mod in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if name.endswith(COLUMN):
            setattr(model.get_submodule(parent), child, HandColumn(mod, rank, tp))
        elif name.endswith(ROW):
            setattr(model.get_submodule(parent), child, HandRow(mod, rank, tp))
    model.lm_head = HandGatherHead(model.lm_head, rank, tp, by_reduce=by_reduce)
    return Prepared(hf_forward(model), model)


def setup_hand(model: nn.Module, rank: int, tp: int) -> Prepared:
    """The hand swap at its fastest here: logits gathered by a zero-padded all-reduce."""
    return _swap_hand(model, rank, tp, by_reduce=True)


def setup_hand_textbook(model: nn.Module, rank: int, tp: int) -> Prepared:
    """The hand swap with the textbook all-gather of the logits."""
    return _swap_hand(model, rank, tp, by_reduce=False)


def setup_dtensor(model: nn.Module, rank: int, tp: int) -> Prepared:
    """PyTorch ``parallelize_module`` (DTensor) with the hand plan above."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (tp,))
    plan: dict = {}
    for name, _ in model.named_modules():
        if name.endswith(COLUMN):
            plan[name] = ColwiseParallel()
        elif name.endswith(ROW):
            plan[name] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(model, mesh, plan)
    return Prepared(hf_forward(model), model)


def setup_transformers(model: nn.Module, rank: int, tp: int) -> Prepared:
    """transformers' own TP, applied to a built model as ``from_pretrained(distributed_config=...)`` does."""
    from transformers import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    cfg = DistributedConfig(tp_size=tp)
    _, mesh = initialize_distributed_mesh(cfg)
    model = type(model).maybe_distribute_model(model, cfg, mesh)
    return Prepared(hf_forward(model), model)


def setup_deepspeed(model: nn.Module, rank: int, tp: int) -> Prepared:
    """DeepSpeed AutoTP (inference engine, module swap by name heuristics, no kernel injection)."""
    if int(os.environ.get("LOCAL_SIZE", "0")) != tp:
        raise RuntimeError(f"DeepSpeed on CPU needs LOCAL_SIZE={tp} (the local world size); its first forward "
                           "crashes otherwise")
    import deepspeed

    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=torch.float32,
                                      replace_with_kernel_inject=False)
    return Prepared(lambda ids: engine(input_ids=ids, use_cache=False).logits, engine.module)


SYSTEMS: dict[str, Callable[[nn.Module, int, int], Prepared]] = {
    "autotp": setup_autotp,
    "autotp_gloo": setup_autotp_gloo,
    "hand": setup_hand,
    "hand_textbook": setup_hand_textbook,
    "dtensor": setup_dtensor,
    "transformers": setup_transformers,
    "deepspeed": setup_deepspeed,
    "dense": setup_dense,
}


def param_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds (a DTensor counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


_MARK = "side_by_side.forward"
_COLLECTIVE = re.compile(r"all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all", re.IGNORECASE)


def collective_kind(name: str) -> str | None:
    """``all_reduce`` / ``all_gather`` / ... for a profiler event that is a collective, else None."""
    m = _COLLECTIVE.search(name)
    if m is None:
        return None
    return re.sub(r"(all|reduce|to)_?", r"\1_", m.group(0).lower()).rstrip("_")


def count_collectives(forward: Forward, ids: torch.Tensor) -> tuple[dict[str, int], float]:
    """Collectives one forward issues, by kind, and the milliseconds spent in them (profiler op events).

    Only events on the thread that runs the forward count (gloo runs the transfer on its own
    threads), and nested events (``_c10d_functional::all_reduce`` calling ``c10d::allreduce_``)
    are one collective: an event inside another collective event is skipped. Matmuls inside one
    (autotp's LM head computes its logits into shared memory within its gather) are not its time.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(_MARK):
            forward(ids)
    evs = prof.events()
    caller = next(e.thread for e in evs if e.name == _MARK)
    events = sorted((e for e in evs if e.thread == caller and collective_kind(e.name)),
                    key=lambda e: (e.time_range.start, -e.time_range.end))
    matmuls = [e for e in evs if e.thread == caller and e.name in ("aten::mm", "aten::addmm")]
    counts: dict[str, int] = {}
    open_until, us = -1.0, 0.0
    for e in events:
        if e.time_range.start < open_until:
            continue
        open_until = e.time_range.end
        us += e.time_range.elapsed_us() - sum(m.time_range.elapsed_us() for m in matmuls if
                                              e.time_range.start <= m.time_range.start < e.time_range.end)
        kind = collective_kind(e.name)
        counts[kind] = counts.get(kind, 0) + 1
    return counts, us / 1e3
