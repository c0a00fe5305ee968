"""What a 'global' module costs: the same model at tp=2 planned with a ``global`` line (DTensor activations)
against the same code with a branch removed, which the planner rewrites to local sizes (``localize``), and
against tp=1, side by side.

    python bench/global_cost.py [--reps 20] [--d 512] [--layers 4]

Two spawned gloo ranks on 127.0.0.1, one thread each (tp=1 runs on one thread). The model is nanoGPT's block
written in the root's forward (``tests/global_models.py``'s ``RootGPT``, stacked ``--layers`` times): a prefill
forward (batch 4, 64 tokens) and a one-token forward (batch 1), ``--reps`` interleaved repetitions, medians.
Prints a table and writes docs/benchmarks_global.md.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path


def build(d: int, layers: int, branch: bool):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = d // 64
            self.c_attn = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
            self.c_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
            self.fc = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
            self.proj = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
            self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2 * layers))

        def forward(self, x):
            B, T, C = x.size()
            for i in range(layers):
                q, k, v = self.c_attn[i](self.ln[2 * i](x)).split(C, dim=2)
                q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
                if branch and T > 0:  # a branch on a size: no fx trace, so the planner gives the root 'global'
                    att = F.softmax(att, dim=-1)
                elif not branch:
                    att = F.softmax(att, dim=-1)
                x = x + self.c_proj[i]((att @ v).transpose(1, 2).contiguous().view(B, T, C))
                x = x + self.proj[i](F.gelu(self.fc[i](self.ln[2 * i + 1](x))))
            return x

    torch.manual_seed(0)
    return Stack().eval()


def _time(fn, x) -> float:
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        fn(x)
        return time.perf_counter() - t0


def measure(rank: int, world: int, d: int, layers: int, reps: int) -> dict:
    import torch

    import autotp

    torch.set_num_threads(1)
    torch.manual_seed(1)  # the same inputs on every rank
    shapes = {"prefill (4 x 64 tokens)": torch.randn(4, 64, d), "one token (1 x 1)": torch.randn(1, 1, d)}
    models, styles = {}, {}
    for name, branch in (("global", True), ("localize", False)):
        m = build(d, layers, branch)
        autotp.parallelize(m, world, example_inputs=(shapes["prefill (4 x 64 tokens)"],), check=False)
        models[name] = m
        styles[name] = sorted({e.style for e in m._autotp_plan.entries})
    dense = build(d, layers, False)
    out = {}
    for shape, x in shapes.items():
        for m in [*models.values(), dense]:
            _time(m, x)  # warm up
        times = {k: [] for k in (*models, "tp=1")}
        for _ in range(reps):
            for k, m in models.items():
                times[k].append(_time(m, x))
            if rank == 0:
                times["tp=1"].append(_time(dense, x))
        out[shape] = {k: statistics.median(v) for k, v in times.items() if v}
    diff = (models["global"](shapes["one token (1 x 1)"]) - dense(shapes["one token (1 x 1)"])).abs().max().item()
    return dict(times=out, styles=styles, diff=diff)


def main() -> None:
    from autotp.tools.launch import run_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    r = run_ranks(measure, 2, a.d, a.layers, a.reps, timeout=1200)[0]
    lines = ["# What a 'global' module costs", "",
             f"`python bench/global_cost.py --reps {a.reps} --d {a.d} --layers {a.layers}`: nanoGPT blocks written in "
             f"the root's forward (hidden {a.d}, {a.d // 64} heads, {a.layers} layers), tp=2 on two gloo ranks with "
             "one thread each, against tp=1 on one thread; medians of interleaved repetitions. 'global': the root "
             "runs on DTensor activations (a branch on a size keeps fx from tracing it); 'localize': the same code "
             "without the branch, rewritten to local sizes.", "",
             f"Plan styles: global {r['styles']['global']}; localize {r['styles']['localize']}. "
             f"max |global - tp=1| on one token: {r['diff']:.2e}.", "",
             "| forward | tp=1 ms | tp=2 localize ms | tp=2 global ms | global / localize | global / tp=1 |",
             "|---|---|---|---|---|---|"]
    for shape, t in r["times"].items():
        lines.append(f"| {shape} | {t['tp=1'] * 1e3:.2f} | {t['localize'] * 1e3:.2f} | {t['global'] * 1e3:.2f} | "
                     f"{t['global'] / t['localize']:.2f}x | {t['global'] / t['tp=1']:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(__file__).resolve().parents[1].joinpath("docs", "benchmarks_global.md").write_text(text)


if __name__ == "__main__":
    main()
