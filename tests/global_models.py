"""Models whose code computes with global sizes in ways no rewrite keeps local: the root module's own head count
and a scale from a projection's width, a branch on a size, a mask made in forward, a whole small LM in the root's
forward. The planner gives them a 'global' line (DTensor activations); see tests/test_global.py."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScaleFromWidth(nn.Module):
    """The root's forward: heads from its own attribute, the scale from the projection's width over the heads."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.ln = nn.Linear(d, 64), nn.Linear(64, d), nn.LayerNorm(d)

    def forward(self, x):
        B, T, C = x.shape
        h = self.ln(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        scale = 1 / math.sqrt(q.size(-1) / self.heads)  # global 32 / 4; at local sizes it would be 16 / 4
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) * scale).softmax(-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(x)))


class RootGPT(nn.Module):
    """nanoGPT's block written at the root: fused qkv split by the input's width, the head size from a size, a
    causal mask made in forward, a branch on T (no fx trace), an optional argument; or SDPA."""

    def __init__(self, d=32, heads=4, sdpa=False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(self.ln1(x)).split(C, dim=2)
        hs = q.size(-1) // self.heads
        q, k, v = (t.view(B, T, self.heads, hs).transpose(1, 2) for t in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.ones(T, T, device=x.device).tril().view(1, 1, T, T) if mask is None else mask
            att = att.masked_fill(causal == 0, float("-inf"))
            if T > 1:
                att = F.softmax(att, dim=-1)
            y = att @ v
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class RootGPTSdpa(RootGPT):
    def __init__(self):
        super().__init__(sdpa=True)


class RootLM(nn.Module):
    """A whole small LM in the root's forward: a table looked up by ids, attention with the root's head count and
    a scale from the input's width, a branch on T, the head tied to the table (vocabulary rows and a gathered head
    inside the global module)."""

    def __init__(self, vocab=64, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.wte, self.qkv, self.o = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        scale = (C // self.heads) ** -0.5
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if T > 1:
            x = x + self.o(y.transpose(1, 2).flatten(2))
        return self.head(self.ln(x))


def build(name: str):
    torch.manual_seed(0)
    model = globals()[name]()
    x = torch.randint(0, 64, (2, 5)) if name == "RootLM" else torch.randn(2, 5, 32)
    return model, (x,)


NAMES = ["ScaleFromWidth", "RootGPT", "RootGPTSdpa", "RootLM"]
