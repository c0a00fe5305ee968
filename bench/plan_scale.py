"""Planning time and memory against model depth: a Llama-3-70B-shaped model on the meta device, tp=8.

    python bench/plan_scale.py [--layers 8 32 80] [--tp 8]

Each depth runs in its own process (peak RSS is per process). Prints seconds and peak RSS per depth,
and the time per layer, so growth with depth can be read off directly.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def plan_once(layers: int, tp: int, q) -> None:
    import torch
    import transformers

    import autotp

    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                                   num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rope_theta=500000.0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    t1 = time.perf_counter()
    plan = autotp.make_plan(model, tp)
    t2 = time.perf_counter()
    q.put(dict(layers=layers, build_s=t1 - t0, plan_s=t2 - t1, base_mb=base,
               peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               params_b=sum(p.numel() for p in model.parameters()) / 1e9, lines=len(plan.entries),
               summary=plan.summary[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32, 80])
    ap.add_argument("--tp", type=int, default=8)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.layers:
        q = ctx.Queue()
        p = ctx.Process(target=plan_once, args=(n, args.tp, q))
        p.start()
        rows.append(q.get(timeout=1800))
        p.join()
    print(f"{'layers':>6} {'params':>8} {'plan s':>8} {'s/layer':>8} {'peak RSS MB':>12} {'after import MB':>16}")
    for r in rows:
        print(f"{r['layers']:>6} {r['params_b']:>7.1f}B {r['plan_s']:>8.2f} {r['plan_s'] / r['layers']:>8.3f} "
              f"{r['peak_mb']:>12.0f} {r['base_mb']:>16.0f}")
    print(json.dumps(rows[-1]["summary"]))


if __name__ == "__main__":
    main()
