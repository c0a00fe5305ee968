"""Uneven shards at runtime: plan lines with ``split=`` (tp does not divide a width, a head count, a vocabulary), on
hand-written plans applied with ``runtime.apply.apply_plan``. Outputs and every gradient equal the dense model's
(each rank's parameter gradient equals its ``Split.take`` slice of the dense one), on gloo and on shared memory;
a gathered head counts one all-gather per forward, of the full logits' bytes; per-rank patch values; the
shared-memory transport tells a real mismatch of uneven pieces from an agreed one."""
import os
import platform
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.errors import PlanMismatchError
from autotp.plan import Plan
from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))

X86 = platform.machine().lower() in ("x86_64", "amd64")
HEAD = "autotp-plan 1\ntp {tp}\n"


class XW(nn.Module):
    """``x @ W + b`` with an ``[in, out]`` weight (GPT-2's Conv1D)."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(i, o) * 0.2), nn.Parameter(torch.randn(o) * 0.2)

    def forward(self, x):
        return x @ self.weight + self.bias


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, in_out: bool = False):
        super().__init__()
        layer = XW if in_out else nn.Linear
        self.up, self.down = layer(dim, hidden), layer(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class TwoMLPs(nn.Module):
    """Two residual MLPs: one of ``nn.Linear``s (``[out, in]``), one of ``[in, out]`` weights."""

    def __init__(self, dim: int = 16, hidden: int = 96):
        super().__init__()
        self.a, self.b = MLP(dim, hidden), MLP(dim, hidden, in_out=True)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class Heads(nn.Module):
    """Attention with separate q, k, v, o and a head count the forward reads (patched to this rank's heads)."""

    def __init__(self, dim: int = 24, n_head: int = 3):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.n_head, self.head_dim = n_head, dim // n_head

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class Wrap(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return x + self.attn(x)


class Vocab(nn.Module):
    """A 7-row table (padding row 5) and a head of width 7, untied or tied to the table."""

    def __init__(self, rows: int = 7, dim: int = 8, tied: bool = False):
        super().__init__()
        self.wte, self.head = nn.Embedding(rows, dim, padding_idx=None if tied else 5), nn.Linear(dim, rows)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids)))


def _apply(model, text: str, rank: int, world: int, example):
    import torch.distributed as dist

    from autotp.runtime import apply

    plan = Plan.from_text(text)
    return plan, apply.apply_plan(model, plan, rank=rank, tp=world, group=dist.group.WORLD, example_inputs=(example,))


def _parity(rank: int, world: int, model, text: str, x) -> dict:
    """``cases.measure`` (outputs, every parameter and gradient against its slice of the dense one, counts) on a
    hand-written plan, the input's gradient too, and the sharded layers' descriptions."""
    import copy

    from cases import measure

    dense = copy.deepcopy(model)
    plan, model = _apply(model, text, rank, world, x)
    x_ref, xs = (x.clone().requires_grad_(), x.clone().requires_grad_()) if x.is_floating_point() else (x, x)
    out = measure(rank, world, model, dense, plan, lambda m: m(xs if m is model else x_ref))
    if x.is_floating_point():
        out["grad_diff"] = max(out["grad_diff"], (xs.grad - x_ref.grad).abs().max().item())
    out["layers"] = {n: m.extra_repr() for n, m in model.named_modules() if hasattr(m, "parts")}
    out["shapes"] = {n: list(p.shape) for n, p in model.named_parameters()}
    with torch.no_grad():
        out["nograd_diff"] = (model(x) - dense(x)).abs().max().item()
    return out, model, dense


def mlps(rank: int, world: int, hidden: int, split: str) -> dict:
    torch.manual_seed(0)
    model, x = TwoMLPs(16, hidden), torch.randn(3, 5, 16)
    text = HEAD.format(tp=world) + "".join(
        f"{m}.up colwise in=16 out={hidden} w={w} split={split}\n{m}.down rowwise in={hidden} out=16 w={w} "
        f"split={split}\n" for m, w in (("a", "out_in"), ("b", "in_out")))
    return _parity(rank, world, model, text, x)[0]


@pytest.mark.parametrize("world,hidden,split", [(2, 96, "2,1"), (3, 160, "2,2,1")])  # units of 32
def test_uneven_mlps_equal_dense(world, hidden, split):
    parts = [int(p) for p in split.split(",")]
    unit = hidden // sum(parts)
    for rank, r in enumerate(run_ranks(mlps, world, hidden, split, timeout=240)):
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), r
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), r
        assert r["param_diff"] == 0.0 and r["nograd_diff"] <= 1e-5 * max(1.0, r["out_scale"]), r
        assert r["same_on_all"] <= 1e-5 * max(1.0, r["out_scale"]), r
        assert (r["fwd"], r["bwd"], r["gathers"]) == (2, 2, 0), r  # one all-reduce per MLP each way
        width = parts[rank] * unit
        assert r["shapes"]["a.up.weight"] == [width, 16] and r["shapes"]["b.up.weight"] == [16, width], r["shapes"]
        assert r["shapes"]["a.down.weight"] == [16, width] and r["shapes"]["b.down.bias"] == [16], r["shapes"]
        assert f"out_local={width}, tp={world}, rank={rank}, split={split}" in r["layers"]["a.up"], r["layers"]
        assert f"in_local={width}, out=16, tp={world}, rank={rank}, split={split}" in r["layers"]["b.down"], r
        print(f"tp={world} hidden={hidden} split={split} rank {rank}: out {r['out_diff']:.2e} (scale "
              f"{r['out_scale']:.2f}), grads {r['grad_diff']:.2e}, no_grad {r['nograd_diff']:.2e}")


def attention(rank: int, world: int) -> dict:
    from models import CausalSelfAttention, GPTConfig

    torch.manual_seed(0)
    x = torch.randn(2, 6, 24)
    heads = HEAD.format(tp=2) + "".join(f"attn.{m} colwise in=24 out=24 w=out_in split=2,1\n" for m in "qkv") + \
        "attn.o rowwise in=24 out=24 w=out_in split=2,1\nattn patch n_head=2,1\n"
    out = {"patched": _parity(rank, world, Wrap(Heads(24, 3)), heads, x)}
    out["n_head"] = out["patched"][1].attn.n_head
    out["patched"] = out["patched"][0]
    torch.manual_seed(0)  # nanoGPT's: a fused q|k|v split per segment, sizes in its reshapes localized
    fused = HEAD.format(tp=2) + ("attn.c_attn colwise in=24 out=72 w=out_in seg=24,24,24 split=2,1\n"
                                 "attn.c_proj rowwise in=24 out=24 w=out_in split=2,1\nattn localize split=2,1\n")
    out["localized"] = _parity(rank, world, Wrap(CausalSelfAttention(GPTConfig(n_head=3, n_embd=24))), fused, x)[0]
    return out


def test_uneven_attention_heads_equal_dense():
    for rank, r in enumerate(run_ranks(attention, 2, timeout=240)):
        assert r["n_head"] == (2, 1)[rank], r["n_head"]
        for name in ("patched", "localized"):
            x = r[name]
            assert x["out_diff"] <= 1e-5 * max(1.0, x["out_scale"]), (name, x)
            assert x["grad_diff"] <= 1e-5 * max(1.0, x["grad_scale"]), (name, x)
            assert x["param_diff"] == 0.0 and x["nograd_diff"] <= 1e-5 * max(1.0, x["out_scale"]), (name, x)
            assert (x["fwd"], x["bwd"]) == (1, 1), (name, x)
            print(f"attention {name} rank {rank}: out {x['out_diff']:.2e}, grads {x['grad_diff']:.2e}")
        assert r["localized"]["shapes"]["attn.c_attn.weight"] == [(48, 24)[rank], 24], r["localized"]["shapes"]
        assert r["patched"]["shapes"]["attn.q.weight"] == [(16, 8)[rank], 24], r["patched"]["shapes"]


VOCAB_SPLIT = {2: "4,3", 3: "3,2,2"}


def vocab(rank: int, world: int) -> dict:
    from cases import error_of

    import autotp
    from autotp.runtime import collectives

    out = {}
    for transport in ("gloo", "shm"):
        if transport == "shm":
            out["shm"] = collectives.use_shared_memory(None)
        torch.manual_seed(0)
        ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [6, 5, 5, 3, 0, 2, 1], [4, 4, 6, 1, 0, 3, 2]])
        s = VOCAB_SPLIT[world]
        text = HEAD.format(tp=world) + f"wte vocab rows=7 dim=8 split={s}\nhead colwise in=8 out=7 w=out_in " \
            f"gather=1 split={s}\n"
        r, model, dense = _parity(rank, world, Vocab(), text, ids)
        with autotp.count_collectives() as counts:
            model(ids).sum().backward()
        r["grad_counts"] = dict(counts)
        shm, fused = collectives.shared_memory_of(None), []
        if shm is not None:  # which way the head's logits go: computed into shared memory, or gathered after
            shm.gather_computed = lambda *a, real=shm.gather_computed: fused.append(a[1:3]) or real(*a)
        with torch.no_grad(), autotp.count_collectives() as counts:  # on shared memory: the head's fused path
            r["nograd_diff"] = (model(ids) - dense(ids)).abs().max().item()
        r["nograd_counts"], r["fused"] = dict(counts), fused
        if shm is not None:
            del shm.gather_computed
        r["rows"] = model.wte._autotp_vocab, model.wte.padding_idx, model.wte.num_embeddings
        r["widths"] = model.head.widths
        r["out_of_range"] = error_of(lambda: model(torch.tensor([[1, 7]])))
        out[transport] = r
    torch.manual_seed(0)  # the head tied to the table: one slice of it, looked up and multiplied by
    out["tied"] = _parity(rank, world, Vocab(tied=True), text, ids)[0]
    torch.manual_seed(0)
    other = text.replace(f"gather=1 split={s}", "gather=1 split=" + ",".join(["1"] * (world - 1) + [str(8 - world)]))
    out["tied_other_split"] = error_of(lambda: _apply(Vocab(tied=True), other, rank, world, ids))
    return out


@pytest.mark.skipif(not X86, reason="the shared-memory transport is x86-64 only")
@pytest.mark.parametrize("world", [2, 3])
def test_uneven_vocabulary_and_gathered_head(world):
    parts = [int(p) for p in VOCAB_SPLIT[world].split(",")]
    starts = [sum(parts[:r]) for r in range(world)]
    rows = 3 * 7  # tokens per forward
    for rank, r in enumerate(run_ranks(vocab, world, timeout=240)):
        assert r["shm"], r
        x = r["tied"]
        assert x["out_diff"] <= 1e-5 * max(1.0, x["out_scale"]) and x["param_diff"] == 0.0, x
        assert x["grad_diff"] <= 1e-5 * max(1.0, x["grad_scale"]) and (x["fwd"], x["gathers"]) == (1, 1), x
        assert x["shapes"]["wte.weight"] == [parts[rank], 8] and "head.weight" not in x["shapes"], x["shapes"]
        assert "PlanMismatchError: plan line 4: 'head' colwise split=" in r["tied_other_split"], r["tied_other_split"]
        assert "its weight is shared with a module split otherwise" in r["tied_other_split"], r["tied_other_split"]
        print(f"vocab tp={world} tied rank {rank}: out {x['out_diff']:.2e}, grads {x['grad_diff']:.2e}")
        for transport in ("gloo", "shm"):
            x = r[transport]
            assert x["out_diff"] <= 1e-5 * max(1.0, x["out_scale"]), (transport, x)
            assert x["grad_diff"] <= 1e-5 * max(1.0, x["grad_scale"]), (transport, x)
            assert x["param_diff"] == 0.0 and x["nograd_diff"] <= 1e-5 * max(1.0, x["out_scale"]), (transport, x)
            assert x["same_on_all"] <= 1e-5 * max(1.0, x["out_scale"]), (transport, x)
            assert (x["fwd"], x["gathers"]) == (1, 1), (transport, x)  # the lookup's all-reduce, the head's gather
            want = {"all_reduce.forward": 1, "all_gather.forward": 1, "bytes.forward": rows * 8 * 4 + rows * 7 * 4}
            assert x["nograd_counts"] == want, (transport, x["nograd_counts"])
            assert {k: v for k, v in x["grad_counts"].items() if k.endswith("forward")} == want, (transport, x)
            lo, hi = starts[rank], starts[rank] + parts[rank]
            pad = 5 - lo if lo <= 5 < hi else None
            assert x["rows"] == ((lo, hi), pad, hi - lo), (transport, x["rows"])
            assert x["widths"] == tuple(parts), x["widths"]
            assert x["fused"] == ([(rows, parts[rank])] if transport == "shm" else []), (transport, x["fused"])
            assert x["shapes"]["wte.weight"] == [parts[rank], 8] and x["shapes"]["head.bias"] == [parts[rank]], x
            assert x["out_of_range"].startswith("IndexError: index out of range in self: Embedding has 7 rows"), x
            print(f"vocab tp={world} {transport} rank {rank}: out {x['out_diff']:.2e}, grads {x['grad_diff']:.2e}, "
                  f"no_grad {x['nograd_diff']:.2e}; counted {x['nograd_counts']}")


def compiled(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [6, 5, 5, 3, 0, 2, 1]])
    text = HEAD.format(tp=2) + "wte vocab rows=7 dim=8 split=4,3\nhead colwise in=8 out=7 w=out_in gather=1 " \
        "split=4,3\n"
    _, model = _apply(Vocab(), text, rank, world, ids)
    y_ref = model(ids)
    y_ref.pow(2).mean().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    y = torch.compile(model, backend="aot_eager", fullgraph=True)(ids)  # the gather through functional collectives
    y.pow(2).mean().backward()
    return dict(out_diff=(y - y_ref).abs().max().item(), shape=list(y.shape),
                grad_diff=max((p.grad - g_ref[n]).abs().max().item() for n, p in model.named_parameters()))


def test_uneven_gather_compiled():
    for r in run_ranks(compiled, 2, timeout=300):
        assert r["shape"] == [2, 7, 7] and r["out_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6, r


def shm_uneven(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from autotp.errors import RankError
    from autotp.runtime.transports.shm import ShmSum

    s = ShmSum(None, slot_bytes=4096)  # 1024 floats a slot: 700 rows of up to 5 go in pieces of 204
    widths = (5, 2, 3)[:world]

    def attempt(call):
        try:
            call()
        except RankError as e:
            return str(e)
        return None

    out = {}
    for rows in (1, 700):
        x = torch.randn(rows, widths[rank], generator=torch.Generator().manual_seed(rank))
        pieces = [torch.empty(rows, max(widths)) for _ in range(world)]  # gloo's all-gather of padded pieces
        dist.all_gather(pieces, F.pad(x, (0, max(widths) - widths[rank])).contiguous())
        ref = torch.cat([p[:, :w] for p, w in zip(pieces, widths)], -1)
        out[f"gather{rows}"] = (s.gather_last(x, widths) - ref).abs().max().item()
        out[f"computed{rows}"] = (s.gather_computed(lambda a, b, slot: slot.copy_(x[a:b]), rows, widths[rank],
                                                    torch.float32, widths) - ref).abs().max().item()
    mine = rank == 0
    out["swapped"] = attempt(lambda: s.gather_last(torch.ones(3, 4), (4, 3) if mine else (3, 4)))
    out["rows"] = attempt(lambda: s.gather_last(torch.ones(3 if mine else 4, 2), (2, 2)))
    out["even_vs_uneven"] = attempt(lambda: s.gather_last(torch.ones(3, 2), (2, 2) if mine else None))
    x = torch.full((2, widths[rank]), float(rank))
    want = torch.cat([torch.full((2, w), float(r)) for r, w in enumerate(widths)], -1)
    out["after"] = bool((s.gather_last(x, widths) == want).all())
    return out


@pytest.mark.skipif(not X86, reason="the shared-memory transport is x86-64 only")
def test_shared_memory_uneven_gathers_and_their_mismatches():
    r0, r1 = run_ranks(shm_uneven, 2, timeout=120)
    for r in (r0, r1):
        assert r["gather1"] == r["gather700"] == r["computed1"] == r["computed700"] == 0.0, r
        assert r["after"], r  # the next gather runs in step
        for name in ("swapped", "rows", "even_vs_uneven"):
            assert r[name] is not None and "the ranks send different tensors" in r[name], (name, r[name])
            assert r[name] == r0[name], name  # every rank read the same words
    assert "rank 0 gathers 3 rows of 7 float32 in pieces of uneven widths" in r0["swapped"], r0["swapped"]
    assert "rank 0 gathers 3 rows of 4 float32 in pieces of uneven widths" in r0["rows"], r0["rows"]
    assert "rank 1 gathers 4 rows of 4 float32 in pieces of uneven widths" in r0["rows"], r0["rows"]
    assert "rank 1 gathers 3 rows of 2 float32 (24 bytes)" in r0["even_vs_uneven"], r0["even_vs_uneven"]


def test_layers_and_gathers_without_a_group():
    from autotp.runtime import collectives, fg
    from autotp.runtime.layers import ColumnParallelLinear, RowParallelLinear
    from autotp.runtime.transports.words import uneven

    dense = nn.Linear(4, 7)
    col = ColumnParallelLinear.from_dense(dense.weight, dense.bias, in_out=False, rank=1, tp=2, parts=(4, 3))
    assert col.widths == (4, 3) and torch.equal(col.weight, dense.weight[4:]) and torch.equal(col.bias, dense.bias[4:])
    assert col.extra_repr() == "in=4, out_local=3, tp=2, rank=1, split=4,3", col.extra_repr()
    fused = nn.Linear(4, 18)  # three segments of 6, each in 3 units of 2: rank 0 holds 2 units of each
    col = ColumnParallelLinear.from_dense(fused.weight, None, in_out=False, rank=0, tp=2, segments=(6, 6, 6),
                                          parts=(2, 1))
    assert torch.equal(col.weight, fused.weight[[0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15]]) and col.widths == (12, 6)
    row = RowParallelLinear.from_dense(fused.weight.t(), None, in_out=False, rank=1, tp=2, parts=(5, 4))
    assert torch.equal(row.weight, fused.weight.t()[:, 10:]) and row.extra_repr().endswith("split=5,4")
    with pytest.raises(ValueError, match=r"split 2,1 names 2 ranks, not tp=4"):
        ColumnParallelLinear.from_dense(dense.weight, None, in_out=False, rank=0, tp=4, rep=2, parts=(2, 1))
    with pytest.raises(ValueError, match="segment of size 7 is not divisible by the 3 units of split 2,1"):
        ColumnParallelLinear.from_dense(dense.weight, None, in_out=False, rank=0, tp=2, parts=(2, 1))
    meta = torch.empty(2, 5, 4, device="meta")  # shape checks: the full width, no data
    assert collectives.all_gather_last(meta, collectives.NO_COMM, 2, (4, 3)).shape == (2, 5, 7)
    assert fg.gather_from_tp(meta, collectives.NO_COMM, 0, 2, (4, 3)).shape == (2, 5, 7)
    with pytest.raises(ValueError, match=r"rank 1 of 2 gathers a piece of width 4, but the widths \[4, 3\] give it 3"):
        collectives.check_widths((4, 3), 4, 1, 2)
    with pytest.raises(ValueError, match=r"widths \[4, 2, 1\] name 3 ranks"):
        collectives.check_widths((4, 2, 1), 4, 0, 2)
    assert uneven((4, 3)) & 0xFFFFFF == 7 and uneven((4, 3)) != uneven((3, 4))


def test_per_rank_patch_values():
    from autotp.runtime.apply import apply_patches, apply_plan
    from autotp.runtime.collectives import NO_COMM

    for rank, want in ((0, 2), (1, 1)):
        model = Wrap(Heads(24, 3))
        plan = Plan.from_text(HEAD.format(tp=2) + "attn patch n_head=2,1\n")
        apply_patches(model, plan.resolve(dict(model.named_modules()).keys()), rank=rank, tp=2)
        assert model.attn.n_head == want
    model = Wrap(Heads(24, 3))
    bad = Plan.from_text(HEAD.format(tp=2) + "attn.q colwise in=24 out=24 w=out_in split=2,1\n"
                         "attn patch n_head=1,1,1  # one value too many\n")
    with pytest.raises(PlanMismatchError) as e:
        apply_plan(model, bad, rank=0, tp=2, group=NO_COMM, example_inputs=None)
    msg = str(e.value)
    assert "plan line 4" in msg and "module 'attn' (Heads)" in msg and "n_head=1,1,1 gives 3 values" in msg, msg
    assert "tp=2" in msg, msg
