"""Transformer-like modules generated from a dict of choices, in the styles people write attention in.

Nothing here knows autotp. ``build(choices)`` returns ``(model, x)``; the same choices and seed give the
same model on every rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

CHOICES = {
    "fused": [False, True],            # one q|k|v projection then split, or three
    "heads_last": [False, True],       # view(B, T, heads, -1) or view(B, T, -1, heads)
    "sizes": ["minus1", "attr", "shape", "literal"],  # how the head split is written
    "scale": ["head_dim", "sdpa", "from_flat"],        # 1/sqrt(head_dim), SDPA's own, or from the flat size
    "norm": ["layer", "rms", "none"],
    "qk_norm": [False, True],          # a norm over each head's features (its weight's gradient is partial)
    "gate": [False, True],             # a replicated gate scales the MLP's hidden features
    "gated_mlp": [False, True],        # up * silu(gate) or one up projection
    "root": [False, True],             # the block is the model itself, or nested in a loop of blocks
    "reuse": [False, True],            # the loop applies one block twice
    "last_differs": [False, True],     # the loop reads the last block's up projection itself
    "causal": [False, True],           # a mask made in forward
    "custom_grad": [False, True],      # the MLP's hidden features pass a Function whose backward mixes them
    "branch": [False, True],           # the mask only where T > 1: a Python branch on a size (no fx trace)
}


class MixGrad(torch.autograd.Function):
    """Identity forward; a hand-written backward that mixes the features (as a fused kernel's may). The captured
    graph shows the forward only, so no rule sees the mixing: the numerical check must."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(-1, keepdim=True)


class RMS(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


def _norm(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d) if kind == "layer" else RMS(d) if kind == "rms" else nn.Identity()


class FuzzBlock(nn.Module):
    def __init__(self, ch: dict, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.ch, self.dim, self.n_head, self.head_dim = ch, dim, heads, dim // heads
        self.norm1, self.norm2 = _norm(ch["norm"], dim), _norm(ch["norm"], dim)
        if ch["fused"]:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        if ch["qk_norm"]:
            self.q_norm, self.k_norm = RMS(self.head_dim), RMS(self.head_dim)
        self.up = nn.Linear(dim, hidden)
        if ch["gated_mlp"]:
            self.gate_proj = nn.Linear(dim, hidden)
        if ch["gate"]:
            self.gate = nn.Linear(dim, 1)
        self.down = nn.Linear(hidden, dim)

    def _split_heads(self, t, B, T):
        sizes = self.ch["sizes"]
        if sizes == "minus1":
            shape = (B, T, -1, self.head_dim) if not self.ch["heads_last"] else (B, T, self.head_dim, -1)
        elif sizes == "attr":
            shape = (B, T, self.n_head, -1) if not self.ch["heads_last"] else (B, T, -1, self.n_head)
        elif sizes == "shape":
            shape = (B, T, t.shape[-1] // self.head_dim, self.head_dim) if not self.ch["heads_last"] else \
                (B, T, self.head_dim, t.shape[-1] // self.head_dim)
        else:
            shape = (B, T, 4, 8) if not self.ch["heads_last"] else (B, T, 8, 4)
        t = t.reshape(shape)
        return t.transpose(1, 2) if not self.ch["heads_last"] else t.permute(0, 3, 1, 2)  # (B, H, T, hd)

    def attention(self, h):
        B, T, C = h.shape
        if self.ch["fused"]:
            q, k, v = self.qkv(h).split(self.dim, dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        flat = q.size(-1)
        q, k, v = (self._split_heads(t, B, T) for t in (q, k, v))
        if self.ch["qk_norm"]:
            q, k = self.q_norm(q), self.k_norm(k)
        causal = self.ch["causal"] and (T > 1 if self.ch.get("branch") else True)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril() if causal else None
        if self.ch["scale"] == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scale = 1 / math.sqrt(q.size(-1) if self.ch["scale"] == "head_dim" else flat / self.n_head)
            att = q @ k.transpose(-2, -1) * scale
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            y = att.softmax(-1) @ v
        y = y.transpose(1, 2) if not self.ch["heads_last"] else y.permute(0, 2, 3, 1)  # (B, T, H, hd) or (B, T, hd, H)
        y = y.reshape(B, T, -1)
        return self.o(y)

    def mlp(self, h):
        u = self.up(h)
        u = u * F.silu(self.gate_proj(h)) if self.ch["gated_mlp"] else F.gelu(u)
        if self.ch["gate"]:
            u = u * torch.sigmoid(self.gate(h))
        if self.ch.get("custom_grad"):
            u = MixGrad.apply(u)
        return self.down(u)

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FuzzNet(nn.Module):
    def __init__(self, ch: dict, layers: int = 4):
        super().__init__()
        self.ch = ch
        self.blocks = nn.ModuleList([FuzzBlock(ch) for _ in range(layers)])
        self.last = layers - 1

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if self.ch["reuse"] and i == 0:
                x = b(x)  # the same block applied twice
            if self.ch["last_differs"] and i == self.last:
                x = x + b.up(x).mean(-1, keepdim=True)
        return x


def build(ch: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = FuzzBlock(ch) if ch["root"] else FuzzNet(ch)
    return model, torch.randn(3, 6, 32)
