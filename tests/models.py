"""Unmodified-style user models for the tests: nothing here knows about autotp."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- nanoGPT (fused c_attn, tied lm_head)
@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

    def forward(self, idx):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------- SwiGLU + GQA with SDPA and rotary
class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class GQAAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = GQAAttention(dim, n_heads, n_kv_heads)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class TinyLlama(nn.Module):
    def __init__(self, vocab=80, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        hd = dim // n_heads
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=idx.device), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, hd)
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(self.norm(x))


# ---------------------------------------------------------------- einsum attention
class EinsumAttention(nn.Module):
    def __init__(self, dim=32, n_heads=4):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.ModuleList([nn.Linear(dim, dim) for _ in range(3)])
        self.out = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln(x)
        q, k, v = (p(h).reshape(B, T, self.n_heads, -1) for p in self.qkv)  # (B, T, H, hd)
        att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, -1)
        return x + self.out(y)


class EinsumNet(nn.Module):
    def __init__(self, dim=32, n_heads=4, n_layers=2):
        super().__init__()
        self.blocks = nn.Sequential(*[EinsumAttention(dim, n_heads) for _ in range(n_layers)])

    def forward(self, x):
        return self.blocks(x)


# ---------------------------------------------------------------- a per-head position bias built outside the blocks
class AlibiAttention(nn.Module):
    """Attention with a per-head bias passed in, as Bloom and MPT do. ``merged``: heads merged with the
    batch dim and the bias added by ``baddbmm`` (Bloom's layout)."""

    def __init__(self, dim=32, n_heads=4, merged=False):
        super().__init__()
        self.n_heads, self.merged = n_heads, merged
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.proj = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)

    def forward(self, x, bias):  # bias: (H, T, T), or (B*H, T, T) when merged
        B, T, _ = x.shape
        h = self.ln(x)
        q, k, v = (p(h).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, T, hd)
        hd = q.shape[-1]
        if self.merged:
            q, k, v = (t.reshape(B * self.n_heads, T, hd) for t in (q, k, v))  # (B*H, T, hd)
            att = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=1 / math.sqrt(hd)).softmax(-1)
            y = torch.bmm(att, v).view(B, self.n_heads, T, hd)
        else:
            y = (q @ k.transpose(-1, -2) / math.sqrt(hd) + bias).softmax(-1) @ v  # (B, H, T, hd)
        return x + self.proj(y.transpose(1, 2).reshape(B, T, -1))


class AlibiNet(nn.Module):
    """Learned per-head slopes times relative positions, computed once and passed to every block."""

    def __init__(self, dim=32, n_heads=4, n_layers=2, merged=False):
        super().__init__()
        self.merged = merged
        self.slopes = nn.Parameter(torch.linspace(-1.0, -0.1, n_heads))
        self.blocks = nn.ModuleList([AlibiAttention(dim, n_heads, merged) for _ in range(n_layers)])

    def forward(self, x):
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device, dtype=x.dtype)
        bias = self.slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])  # (H, T, T)
        if self.merged:
            bias = bias.repeat(B, 1, 1)  # (B*H, T, T), batch-major as Bloom builds it
        for blk in self.blocks:
            x = blk(x, bias)
        return x


# ---------------------------------------------------------------- plain MLP stack
class MLPStack(nn.Module):
    def __init__(self, dim=32, hidden=64, depth=4):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Linear(dim if i % 2 == 0 else hidden, hidden if i % 2 == 0 else dim), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


# ---------------------------------------------------------------- traps: sharding would be silently wrong
class NormTrap(nn.Module):
    """fc1's output is normalized over its own features: fc1 must not be column-sharded."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.ln(self.fc1(x)))


class ResidualTrap(nn.Module):
    """The residual reads fc1's (would-be-sharded) output after fc2."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h)) + h


class TwiceTrap(nn.Module):
    """The same module applied twice."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


class ReduceTrap(nn.Module):
    """A reduction over the (would-be-sharded) features before the row layer."""

    def __init__(self, dim=16, hidden=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h / (h.sum(-1, keepdim=True) + 1.0))


class HeadsModel(nn.Module):
    """9 heads: tp=2 cannot shard its attention."""

    def __init__(self):
        super().__init__()
        self.attn = EinsumAttention(dim=36, n_heads=9)

    def forward(self, x):
        return self.attn(x)


class TorchEncoder(nn.Module):
    """``torch.nn.TransformerEncoder`` as users build it: ``nn.MultiheadAttention`` (its fused ``in_proj_weight``
    stays replicated: not a linear layer's weight) and a Linear MLP; without gradients torch runs its fused
    encoder kernel unless a submodule has hooks."""

    def __init__(self, dim: int = 32, heads: int = 4, ff: int = 64, layers: int = 2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):  # (B, T, dim)
        return self.encoder(x)


class ViTBlock(nn.Module):
    """torchvision's ViT encoder block: pre-norm ``nn.MultiheadAttention`` and a GELU MLP, residuals."""

    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class MHAViT(nn.Module):
    """A ViT in torchvision's style on flattened patches: class token, learned positions, a classifier head."""

    def __init__(self, patch_dim: int = 48, dim: int = 32, heads: int = 4, mlp: int = 64, layers: int = 2,
                 patches: int = 6, classes: int = 10):
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.layers = nn.ModuleList([ViTBlock(dim, heads, mlp) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (B, patches, patch_dim)
        x = self.proj(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])


class MLPBlock(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.ln(x))))


class LastBlockDiffers(nn.Module):
    """Identical blocks, but the parent's loop does more for the last one (it reads that block's ``up`` itself):
    a plan made for the first blocks and extended to the rest would shard a value the parent reduces."""

    def __init__(self, dim: int = 32, blocks: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList([MLPBlock(dim) for _ in range(blocks)])
        self.last = blocks - 1  # from the config, as reference code writes n_layers - 1

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == self.last:
                x = x + b.up(b.ln(x)).mean(-1, keepdim=True)
        return x


class _Attention(nn.Module):
    """A pre-norm residual attention with separate q, k, v, o; subclasses write the forward in their style."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))


class HeadsLastAttention(_Attention):
    """Heads laid out last (``view(B, T, -1, heads)``): column sharding splits each head's features, q.k^T then
    contracts over the sharded dim, so q and k stay whole; the replicated attention probabilities meet the
    sharded v, and in backward each rank would get only part of their gradient."""

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln(x)
        q, k, v = (f(h).view(B, T, -1, self.heads).permute(0, 3, 1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)).softmax(-1)
        y = (att @ v).permute(0, 2, 3, 1).reshape(B, T, C)  # (B, T, head_dim, heads) -> (B, T, C)
        return x + self.o(y)


class GateTrap(nn.Module):
    """A replicated gate computed from the input scales a sharded hidden layer (broadcast over its features):
    the gate's gradient would be partial on each rank."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.gate = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, 1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) * torch.sigmoid(self.gate(x)))


class RootHeads(_Attention):
    """Attention written in the root module's own forward, its head count an attribute of the root."""

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln(x)
        q, k, v = (f(h).reshape(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)
        return x + self.o(y)


class ScaleFromSize(nn.Module):
    """The attention scale computed in Python from a projection's size: ``1 / sqrt(q.size(-1) / heads)``."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.n_heads = heads
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        scale = 1 / math.sqrt(q.size(-1) / self.n_heads)
        q, k, v = (t.view(B, T, -1, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1) * scale).softmax(-1)
        return x + self.o((att @ v).transpose(1, 2).reshape(B, T, C))


class Nested(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)
