"""Planning time and memory against model depth: a Llama-3-70B-shaped model on the meta device, tp=8.

    python bench/plan_scale.py [--layers 8 32 80] [--tp 8] [--no-every-block]

Each depth and each way of planning runs in its own process (peak RSS is per process). Two ways:
repeated blocks planned once and the plan proven on the whole model (``reuse_blocks=True``, see
``autotp.planner.blocks``) and every block captured and planned (``make_plan``'s default). Prints seconds,
seconds per layer and peak RSS, and checks that both ways give the same plan.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time


def plan_once(layers: int, tp: int, reuse: bool, q) -> None:
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
    plan = autotp.make_plan(model, tp, reuse_blocks=reuse)
    t2 = time.perf_counter()
    q.put(dict(layers=layers, build_s=t1 - t0, plan_s=t2 - t1, base_mb=base,
               peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               params_b=sum(p.numel() for p in model.parameters()) / 1e9, lines=len(plan.entries),
               summary=plan.summary[0], text=plan.to_text()))


def run(layers: int, tp: int, reuse: bool) -> dict:
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=plan_once, args=(layers, tp, reuse, q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32, 80])
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--no-every-block", action="store_true", help="skip planning every block (the slow way)")
    args = ap.parse_args()
    rows = []
    for n in args.layers:
        fast = run(n, args.tp, True)
        full = None if args.no_every_block else run(n, args.tp, False)
        if full is not None and full["text"] != fast["text"]:
            raise SystemExit(f"{n} layers: the plan from reused blocks differs from planning every block")
        rows.append((n, fast, full))
    print(f"{'layers':>6} {'params':>8} | {'reused: s':>9} {'s/layer':>8} {'RSS MB':>7} | "
          f"{'every block: s':>14} {'s/layer':>8} {'RSS MB':>7} | {'speed-up':>8}")
    for n, r, f in rows:
        line = (f"{n:>6} {r['params_b']:>7.1f}B | {r['plan_s']:>9.2f} {r['plan_s'] / n:>8.3f} {r['peak_mb']:>7.0f} | ")
        if f is not None:
            line += f"{f['plan_s']:>14.2f} {f['plan_s'] / n:>8.3f} {f['peak_mb']:>7.0f} | {f['plan_s'] / r['plan_s']:>7.1f}x"
        print(line)
    print(f"imports: {rows[-1][1]['base_mb']:.0f} MB RSS; same plan both ways: {not args.no_every_block}")
    print(json.dumps(rows[-1][1]["summary"]))


if __name__ == "__main__":
    main()
