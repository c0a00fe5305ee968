"""Communication vs computation of a sharded transformer against hidden size, tp and transport, on local ranks.

    python bench/profile_split.py [--sizes 256 512 1024 2048] [--tp 1 2 4] [--batch 4 --seq 64] [--reps 3]

A nanoGPT-style model (the plain copy in tests/models.py: 2 blocks, 64-wide heads, a vocabulary of
4 x hidden so that every part grows with the hidden size; its LM head is sharded and gathered) is
built at each size, parallelized by autotp and profiled with ``autotp.profile`` on rank 0: forward
wall time, its compute and collective parts, collectives per forward and bytes moved. Each tp > 1
runs twice, with autotp's collectives through shared memory (the default for ranks on one host) and
on gloo over TCP loopback (``AUTOTP_SHM=0``), each in one set of spawned ranks (one CPU thread each)
that loops over the sizes. Prints a Markdown table and writes a plot (default docs/profile_split.png;
needs matplotlib).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def measure(rank: int, world: int, sizes: list[int], batch: int, seq: int, reps: int, transport: str) -> list[dict]:
    """One tp and transport ('shm', 'gloo'; '-' at tp=1): every hidden size, profiled; rank 0's numbers."""
    os.environ["AUTOTP_SHM"] = "0" if transport == "gloo" else "1"
    import torch
    from models import GPT, GPTConfig

    import autotp

    rows = []
    for d in sizes:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=seq, vocab_size=4 * d, n_layer=2, n_head=d // 64, n_embd=d))
        x = torch.randint(0, 4 * d, (batch, seq))
        model = autotp.parallelize(model, world, example_inputs=(x,))
        forward = autotp.profile(model, (x,), reps=reps, warmup=1).forward
        total = forward.total
        rows.append(dict(tp=world, transport=transport, d=d, wall_ms=forward.wall_s * 1e3,
                         compute_ms=total.compute_s * 1e3, comm_ms=total.comm_s * 1e3, share=total.comm_share,
                         collectives=total.collectives, mib=total.bytes / 2**20))
        del model
    return rows


def table(rows: list[dict]) -> list[str]:
    """The measurements as a Markdown table."""
    out = ["| tp | transport | hidden | forward ms | compute ms | comm ms | comm share | collectives | MiB moved |",
           "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['tp']} | {r['transport']} | {r['d']} | {r['wall_ms']:.1f} | {r['compute_ms']:.1f} | {r['comm_ms']:.1f} | "
                   f"{r['share']:.1%} | {r['collectives']} | {r['mib']:.2f} |")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Compute and communication time, and the communication share, against hidden size, one line per tp."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tp in sorted({r["tp"] for r in rows}):
        mine = [r for r in rows if r["tp"] == tp and r["transport"] in ("-", "shm")]
        d = [r["d"] for r in mine]
        line, = left.plot(d, [r["compute_ms"] for r in mine], marker="o", label=f"tp={tp} compute")
        for transport, style in (("shm", "--"), ("gloo", ":")):
            these = [r for r in rows if r["tp"] == tp and r["transport"] == transport]
            if not these:
                continue
            d = [r["d"] for r in these]
            left.plot(d, [r["comm_ms"] for r in these], marker="s", ls=style, color=line.get_color(),
                      label=f"tp={tp} communication, {transport}")
            right.plot(d, [100 * r["share"] for r in these], marker="o", ls=style, color=line.get_color(),
                       label=f"tp={tp}, {transport}")
    left.set(xscale="log", yscale="log", xlabel="hidden size", ylabel="ms per forward (rank 0)",
             title="forward: compute vs collectives")
    right.set(xscale="log", xlabel="hidden size", ylabel="% of the forward in collectives",
              title="communication share", ylim=(0, 100))
    for ax in (left, right):
        ax.minorticks_off()
        ax.set_xticks(sorted({r["d"] for r in rows}), labels=[str(v) for v in sorted({r["d"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("autotp, one CPU thread per rank, collectives through shared memory (shm) or gloo over "
                 "loopback (nanoGPT-style, 2 blocks)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "profile_split.png")
    args = ap.parse_args()
    bad = [d for d in args.sizes if d % 64 or any((d // 64) % tp for tp in args.tp)]
    if bad:
        ap.error(f"hidden sizes {bad}: each must be a multiple of 64 whose head count (d / 64) every --tp divides")
    from autotp.tools.launch import run_ranks

    load = os.getloadavg()[0]
    rows = []
    for tp in args.tp:
        for transport in ("shm", "gloo") if tp > 1 else ("-",):
            rows += run_ranks(measure, tp, args.sizes, args.batch, args.seq, args.reps, transport, timeout=1800)[0]
    print(f"{args.batch}x{args.seq} tokens, float32, mean of {args.reps} forwards after 1 warm-up, rank 0; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, one thread per rank; "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(table(rows)))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
