"""Rules of ops that attention and MLP code written in other styles reaches (``planner/rules/along.py``):
``reshape_as``/``view_as``, ``mT``/``swapaxes``/``movedim``, ``cumsum``, ``flip``, ``roll``, ``tril``, ``topk``,
``sort``, ``cummax``, ``max.dim``, ``logsumexp``, ``repeat``/``tile``, ``repeat_interleave``, ``pad``, ``narrow``,
``index_select``, ``unfold``, ``diff``, ``view_as_complex``/``view_as_real``, ``F.normalize`` (``expand_as``),
``masked_fill``/``where`` with a mask made in forward, ``ones_like``/``zeros_like``/``full_like``.

Along a dim that is not the sharded one each is sharded and exact at tp=2 (outputs and every gradient); along
the sharded dim the layers around it stay replicated, and the plan's reason names the op.
"""
import copy
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autotp
from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))


class Attn(nn.Module):
    """Causal self-attention; ``style`` picks how one of its steps is written."""

    def __init__(self, style: str = "", d: int = 32, heads: int = 4, kv_heads: int = 4, seq: int = 6):
        super().__init__()
        self.style, self.heads, self.kv_heads = style, heads, kv_heads
        hd = d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv_heads * hd), nn.Linear(d, kv_heads * hd)
        self.o = nn.Linear(d, d)
        t, f = torch.arange(seq).float(), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
        self.register_buffer("freqs_cis", torch.polar(torch.ones(seq, hd // 2), torch.outer(t, f)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        H, D, s = self.heads, C // self.heads, self.style
        q0 = self.q(x)
        q, k, v = q0.view(B, T, H, D), self.k(x).view(B, T, self.kv_heads, D), self.v(x).view(B, T, self.kv_heads, D)
        if s == "complex_rotary":  # Meta's reference Llama: rotary embeddings as complex products
            fc = self.freqs_cis[:T].view(1, T, 1, D // 2)
            q = torch.view_as_real(torch.view_as_complex(q.float().reshape(B, T, H, -1, 2)) * fc).flatten(3)
            k = torch.view_as_real(torch.view_as_complex(k.float().reshape(B, T, H, -1, 2)) * fc).flatten(3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if s == "repeat_interleave":  # grouped-query attention, each KV head repeated in place
            k, v = k.repeat_interleave(H // self.kv_heads, dim=1), v.repeat_interleave(H // self.kv_heads, dim=1)
        if s == "normalize":  # q/k normalized per head (F.normalize: a norm, expand_as, div)
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        att = (q @ k.mT if s == "mT" else q @ k.transpose(-2, -1)) / math.sqrt(D)
        future = torch.arange(T)[None, :] > torch.arange(T)[:, None]  # made in forward, replicated
        if s == "where":
            att = torch.where(future, torch.full_like(att, -1e9), att)
        elif s == "where_scalar":
            att = torch.where(future, float("-inf"), att)
        elif s == "tril":
            att = att.masked_fill(torch.ones_like(att).tril() == 0, float("-inf"))
        else:
            att = att.masked_fill(future, float("-inf"))
        if s == "topk":  # keep each query's two best keys
            att = att.masked_fill(att < att.topk(2, dim=-1).values[..., -1:], float("-inf"))
        if s == "logsumexp":
            p = (att - att.logsumexp(-1, keepdim=True)).exp()
        elif s == "max":
            p = (att - att.max(-1, keepdim=True).values).exp()
            p = p / p.sum(-1, keepdim=True)
        else:
            p = att.softmax(-1)
        y = p @ v
        if s == "reshape_as":
            y = y.transpose(1, 2).reshape_as(q0)
        elif s == "view_as":
            y = y.transpose(1, 2).contiguous().view_as(q0)
        elif s == "swapaxes":
            y = y.swapaxes(1, 2).reshape(B, T, C)
        elif s == "movedim":
            y = y.movedim(1, 2).reshape(B, T, C)
        else:
            y = y.transpose(1, 2).reshape(B, T, C)
        return x + self.o(y)


class MLP(nn.Module):
    """up -> gelu -> one op along ``style``'s dim -> down, with a residual."""

    def __init__(self, style: str = "", d: int = 32, hidden: int = 64, seq: int = 6):
        super().__init__()
        self.style, self.up, self.down = style, nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.register_buffer("order", torch.arange(seq).flip(0), persistent=False)

    def forward(self, x):
        h, T, s = F.gelu(self.up(x)), x.shape[1], self.style
        if s == "cumsum":  # a running mean over time
            h = h.cumsum(1) / torch.arange(1, T + 1, dtype=h.dtype)[:, None]
        elif s == "cumprod":
            h = torch.sigmoid(h).cumprod(1)
        elif s == "flip":
            h = h + h.flip(1)
        elif s == "roll":
            h = h + torch.roll(h, 1, dims=1)
        elif s == "pad":  # shift by one step in time: pad at the front, drop the last
            h = h + F.pad(h, (0, 0, 1, 0))[:, :-1]
        elif s == "narrow":
            h = torch.cat([h.narrow(1, 1, T - 1), h.narrow(1, 0, 1)], dim=1) * 0.5 + h
        elif s == "sort":
            h = h.sort(dim=1).values
        elif s == "cummax":
            h = h.cummax(1).values - h
        elif s == "repeat":
            h = h.repeat(1, 2, 1)[:, 1:T + 1]
        elif s == "tile":
            h = h.tile((2, 1))[:, 1:T + 1] + torch.zeros_like(h)
        elif s == "index_select":
            h = h + h.index_select(1, self.order[:T])
        elif s == "unfold":  # windows of two steps, averaged, padded back to T
            h = F.pad(h.unfold(1, 2, 1).mean(-1), (0, 0, 0, 1))
        elif s == "diff":
            h = F.pad(torch.diff(h, dim=1), (0, 0, 1, 0)) + h
        # along the sharded (features) dim: refused
        elif s == "cumsum_features":
            h = h.cumsum(-1)
        elif s == "flip_features":
            h = h.flip(-1)
        elif s == "roll_features":
            h = torch.roll(h, 1, dims=-1)
        elif s == "sort_features":
            h = h.sort(dim=-1).values
        elif s == "pad_features":
            h = F.pad(h, (1, 0))[..., :-1]
        elif s == "tril_features":
            h = h.tril()
        elif s == "repeat_features":
            h = h.repeat(1, 1, 2)[..., ::2]
        return x + self.down(h)


class RepeatHeads(nn.Module):
    """JetMoE's attention: k and v repeated along the heads dim (``repeat``, not ``repeat_interleave``) for q's
    top_k times as many heads."""

    def __init__(self, d: int = 32, heads: int = 4, top_k: int = 2):
        super().__init__()
        self.heads, self.top_k = heads, top_k
        self.q, self.kv, self.o = nn.Linear(d, top_k * d), nn.Linear(d, 2 * d), nn.Linear(top_k * d, d)

    def forward(self, x):
        B, T, C = x.shape
        D = C // self.heads
        q = self.q(x).view(B, T, -1, D).transpose(1, 2)
        k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
        k, v = k.repeat(1, self.top_k, 1, 1), v.repeat(1, self.top_k, 1, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(B, T, -1))


# (attention style, MLP style): each model exercises two rules
SHARDED = [("reshape_as", "cumsum"), ("view_as", "cumprod"), ("mT", "flip"), ("swapaxes", "roll"),
           ("movedim", "pad"), ("where", "narrow"), ("where_scalar", "sort"), ("tril", "cummax"),
           ("topk", "repeat"), ("logsumexp", "tile"), ("max", "index_select"), ("normalize", "unfold"),
           ("complex_rotary", "diff"), ("repeat_interleave", "")]
REFUSED = {"cumsum_features": "aten.cumsum", "flip_features": "aten.flip", "roll_features": "aten.roll",
           "sort_features": "aten.sort", "pad_features": "aten.pad", "tril_features": "aten.tril",
           "repeat_features": "aten.repeat"}


def build(attn: str, mlp: str):
    torch.manual_seed(0)
    kv = 2 if attn == "repeat_interleave" else 4
    return nn.Sequential(Attn(attn, kv_heads=kv), MLP(mlp)), torch.randn(3, 6, 32)


def sharded(rank: int, world: int) -> dict:
    from cases import measure

    out = {}
    for attn, mlp in SHARDED:
        model, x = build(attn, mlp)
        dense = copy.deepcopy(model)
        plan = autotp.make_plan(model, world, example_inputs=(x,))
        model = autotp.parallelize(model, world, plan=plan, example_inputs=(x,), check=False)
        x_ref, x = x.clone().requires_grad_(), x.clone().requires_grad_()
        r = measure(rank, world, model, dense, plan, lambda m: m(x if m is model else x_ref))
        r["grad_diff"] = max(r["grad_diff"], (x.grad - x_ref.grad).abs().max().item())
        out[f"{attn}+{mlp}"] = dict(r, plan=plan.to_text())
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(sharded, 2, timeout=500)


def _line(plan: str, module: str) -> str:
    return next(line for line in plan.splitlines() if line.split() and line.split()[0] == module)


@pytest.mark.parametrize("attn,mlp", SHARDED, ids=[f"{a}+{m}" for a, m in SHARDED])
def test_sharded_and_exact(results, attn, mlp):
    for rank, res in enumerate(results):
        r = res[f"{attn}+{mlp}"]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (rank, r["out_diff"], r["plan"])
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (rank, r["grad_diff"], r["plan"])
        assert r["param_diff"] == 0.0 and r["fwd"] == 2 and r["rows"] == 2, r["plan"]
        assert r["local_params"] == r["ideal_params"] < r["total_params"]
        plan = r["plan"]
        for m, style in [("0.q", "colwise"), ("0.v", "colwise"), ("0.o", "rowwise"), ("1.up", "colwise"),
                         ("1.down", "rowwise")]:
            assert _line(plan, m).split()[1] == style, plan


@pytest.mark.parametrize("style", sorted(REFUSED))
def test_along_the_sharded_dim_is_replicated_with_the_op_named(style):
    torch.manual_seed(0)
    model = nn.Sequential(Attn(), MLP(style))
    plan = autotp.make_plan(model, 2, example_inputs=(torch.randn(3, 6, 32),)).to_text()
    for m in ("1.up", "1.down"):
        assert _line(plan, m).split()[1] == "replicate", plan
    assert REFUSED[style] in _line(plan, "1.up") and "the sharded dim 2" in _line(plan, "1.up"), plan
    assert _line(plan, "0.q").split()[1] == "colwise", plan  # the attention beside it is still sharded


def test_repeat_of_the_heads_dim_is_replicated_with_the_op_named():
    torch.manual_seed(0)
    plan = autotp.make_plan(RepeatHeads(), 2, example_inputs=(torch.randn(3, 6, 32),)).to_text()
    for m in ("q", "kv", "o"):
        assert _line(plan, m).split()[1] == "replicate", plan
    assert "aten.repeat in '<root>' repeats the sharded dim 1 2 times" in _line(plan, "q"), plan


# ---------------------------------------------------------------- torch's attention and a tied masked LM


class MHABlock(nn.Module):
    """nn.MultiheadAttention called by hand (sequence first unless ``batch_first``), a mask, then an MLP."""

    def __init__(self, batch_first: bool, d: int = 32, heads: int = 4):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.mlp = MLP()

    def forward(self, x):
        T = x.shape[1] if self.batch_first else x.shape[0]
        mask = torch.triu(torch.full((T, T), float("-inf")), 1)
        y = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return self.mlp(y if self.batch_first else y.transpose(0, 1))


class Encoder(nn.Module):
    def __init__(self, batch_first: bool, d: int = 32, heads: int = 4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x):
        T = x.shape[1] if self.encoder.layers[0].self_attn.batch_first else x.shape[0]
        return self.encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True)


OTHERS = ["mha_block", "mha_block_seq_first", "encoder_causal", "encoder_causal_seq_first", "xlm_roberta_tied"]


def build_other(name: str):
    torch.manual_seed(0)
    if name == "xlm_roberta_tied":  # tied embeddings: the head and its table both sharded by vocabulary
        transformers = pytest.importorskip("transformers")
        from hf_zoo import config

        transformers.logging.set_verbosity_error()
        cfg = config("xlm-roberta")
        cfg.tie_word_embeddings = True
        model = transformers.XLMRobertaForMaskedLM(cfg).eval()
        return model, torch.randint(3, 256, (2, 8)), lambda m, x: m(x).logits
    first = not name.endswith("seq_first")
    x = torch.randn(3, 6, 32) if first else torch.randn(6, 3, 32)
    model = MHABlock(first) if name.startswith("mha") else Encoder(first)
    return model, x, lambda m, x: m(x)


def others(rank: int, world: int) -> dict:
    from cases import measure

    out = {}
    for name in OTHERS:
        model, x, call = build_other(name)
        dense = copy.deepcopy(model)
        model = autotp.parallelize(model, world, example_inputs=(x,))  # planned, proven and checked
        plan = model._autotp_plan
        out[name] = dict(measure(rank, world, model, dense, plan, lambda m: call(m, x)), plan=plan.to_text())
    return out


@pytest.fixture(scope="module")
def other_results():
    return run_ranks(others, 2, timeout=500)


@pytest.mark.parametrize("name", OTHERS)
def test_torch_attention_and_tied_lm_exact(other_results, name):
    for r in other_results:
        r = r[name]
        plan = r["plan"]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (r["out_diff"], plan)
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (r["grad_diff"], plan)
        assert r["param_diff"] == 0.0 and r["local_params"] < r["total_params"], plan
        if name == "xlm_roberta_tied":
            assert r["vocab"] == r["heads"] == 1, plan
            assert _line(plan, "roberta.encoder.layer.*.output.dense").split()[1] == "rowwise", plan
            assert _line(plan, "lm_head.decoder").split()[1:2] == ["colwise"] and "gather=1" in plan, plan
            assert _line(plan, "roberta.embeddings.word_embeddings").split()[1] == "vocab", plan
        assert r["local_params"] == r["ideal_params"], plan
        if name == "xlm_roberta_tied":  # the rest is of nn.MultiheadAttention models
            continue
        attn, mlp = ("attn", "mlp") if name.startswith("mha") else ("encoder.layers.*.self_attn", "encoder.layers.*")
        assert r["rows"] == (1 if name.startswith("mha") else 2), plan  # the MLPs sharded
        up = "mlp.up" if name.startswith("mha") else f"{mlp}.linear1"
        assert _line(plan, up).split()[1] == "colwise", plan
        # nn.MultiheadAttention applies its own in_proj_weight and out_proj's weight: kept whole, with why
        assert "its weight in_proj_weight is a parameter of the module, not a linear layer's weight/bias" in \
            _line(plan, attn), plan
        assert f"its weight is applied by '{attn}' itself, not by calling '{attn}.out_proj'" in \
            _line(plan, f"{attn}.out_proj"), plan
