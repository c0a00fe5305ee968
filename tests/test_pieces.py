"""Models that ``torch.export`` cannot capture whole: planned module by module (``autotp.pieces``), exact at tp=2
(outputs and every gradient), with what stays whole named in the plan. Models from other libraries (torch's own
``nn.Transformer``, transformers' JetMoE and GraniteMoe) and reference-style code of our own: a mask made in
forward on the default device, minGPT's mask buffer sliced to the sequence, a data-dependent branch in one
module, a cache object in the outputs."""
import os
import sys

import pytest
import torch
import torch.nn as nn

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
transformers = pytest.importorskip("transformers")


class Branchy(nn.Module):
    """A block whose forward branches on a value (export refuses), inside an otherwise ordinary model."""

    def __init__(self, d=32):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        if x.abs().sum() > 0:  # data-dependent control flow
            return torch.relu(self.fc(x))
        return x


class MLP(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class BranchyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.odd, self.b = MLP(), Branchy(), MLP()

    def forward(self, x):
        return self.b(self.odd(self.a(x)))


class MaskInForward(nn.Module):
    """Reference-style attention: the causal mask made with ``torch.ones(T, T)`` (the default device)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (C // self.heads) ** 0.5
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        return x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


class MinGPTAttention(nn.Module):
    """minGPT's classic attention: the causal mask a buffer sliced to the sequence, ``self.bias[:, :, :T, :T]``."""

    def __init__(self, n_embd=32, n_head=4, block_size=16):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return x + self.c_proj((att.softmax(-1) @ v).transpose(1, 2).contiguous().view(B, T, C))


def build(name: str):
    torch.manual_seed(0)
    if name == "mingpt_mask_buffer":
        return nn.Sequential(MinGPTAttention(), MinGPTAttention()), (torch.randn(2, 6, 32),)
    if name == "nn.Transformer":
        m = nn.Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                           batch_first=True, dropout=0.0).eval()
        mask = nn.Transformer.generate_square_subsequent_mask(4)
        return m, (torch.randn(2, 5, 32), torch.randn(2, 4, 32), None, mask)
    if name == "branchy":
        return BranchyNet(), (torch.randn(2, 5, 32),)
    if name == "mask_in_forward":
        return nn.Sequential(MaskInForward(), MaskInForward()), (torch.randn(2, 6, 32),)
    from hf_zoo import config

    transformers.logging.set_verbosity_error()
    cfg = config(name)
    for k, v in dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=16).items():
        setattr(cfg, k, v)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval(), None


NAMES = ["nn.Transformer", "branchy", "mask_in_forward", "mingpt_mask_buffer", "jetmoe", "granitemoe"]


def pieces(rank: int, world: int) -> dict:
    from cases import parallelize_and_measure

    out = {}
    for name in NAMES:
        model, x = build(name)
        r = parallelize_and_measure(rank, world, model, x)
        if "error" in r:
            out[name] = r
            continue
        plan = r["plan"]
        out[name] = dict(out=r["out_diff"], scale=r["out_scale"], grad=r["grad_diff"] / r["grad_scale"],
                         sharded=sum(e.style in ("colwise", "rowwise", "vocab", "experts") for e in plan.entries),
                         plan=plan.to_text())
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(pieces, 2, timeout=400)


@pytest.mark.parametrize("name", NAMES)
def test_exact_or_replicated_with_reason(results, name):
    for r in results:
        got = r[name]
        assert "error" not in got, got
        assert got["out"] <= 1e-5 * max(1.0, got["scale"]) and got["grad"] <= 1e-6, {k: got[k] for k in ("out", "grad")}
        assert got["sharded"] > 0, got["plan"]


def test_what_cannot_be_captured_is_named(results):
    plan = results[0]["branchy"]["plan"]
    assert "planned by pieces: the whole model cannot be captured" in plan
    assert "odd     replicate  # its own code cannot be captured" in plan, plan
    assert "odd.fc  replicate  # kept whole: alone it has nothing to pair with, and its parent cannot be captured" \
        in plan, plan
    for p in ("a.up  ", "b.up  "):
        assert any(line.startswith(p.split()[0]) and "colwise" in line for line in plan.splitlines()), plan
    for name in ("mask_in_forward", "mingpt_mask_buffer"):  # their attention sharded, the forward localized
        plan = results[0][name]["plan"]
        assert "rowwise" in plan and "localize" in plan, plan
    plan = results[0]["nn.Transformer"]["plan"]
    assert "planned by pieces" in plan and "decoder.layers.0.linear1" in plan and "encoder.layers.*.linear1" in plan


def test_make_plan_of_a_meta_model_by_pieces():
    """A meta model cannot run; a CPU copy with arbitrary values records its modules' inputs instead."""
    import autotp

    model, x = build("nn.Transformer")
    meta = model.to("meta")
    plan = autotp.make_plan(meta, 2, example_inputs=x)
    assert "planned by pieces" in plan.to_text() and "encoder.layers.*.linear1" in plan.to_text()
