"""What checking every shared-memory message costs: a 16 KB sum (a decode step's activations) at tp=2.

    python bench/shm_check.py [--kb 16] [--blocks 201] [--calls 200]

Two spawned gloo ranks on this host time ``ShmSum.__call__`` (each rank's words written beside its flag and
compared with every rank's after the second wait, ``autotp/runtime/transports/shm.py``) against the same
protocol without them (copy into the slot, wait, add, wait: the sum as it was before the check), side by
side in one run: blocks of ``--calls`` sums, the two ways alternating block by block, the ranks released
together by a barrier before each block. Prints each way's median microseconds per sum over the blocks, their
ratio, and the median over the pairs of neighbouring blocks of their difference (what the check adds to a sum,
steadier than the difference of the medians on a loaded machine), for rank 0 and rank 1.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _unchecked(s, x):
    """The sum without its words: what ``ShmSum.__call__`` did before every message was checked."""
    import torch

    flat = x.view(-1)
    slots = s._slots(flat.numel() * x.element_size(), x.dtype)
    s.seq += 1
    slots[s.rank].copy_(flat)
    s._wait(0)
    if s.world == 2:
        torch.add(slots[0], slots[1], out=flat)
    else:
        torch.sum(slots, dim=0, out=flat)
    s._wait(1)
    return x


def measure(rank: int, world: int, kb: int, blocks: int, calls: int) -> dict:
    import torch
    import torch.distributed as dist

    from autotp.runtime import collectives
    from autotp.runtime.transports.shm import ShmSum

    s = ShmSum(None, epoch=collectives.epoch_of(None))
    x = torch.zeros(kb * 1024 // 4)  # zeros stay zeros, however often they are summed
    ways = {"checked": s, "unchecked": lambda t: _unchecked(s, t)}
    for fn in ways.values():
        for _ in range(calls):
            fn(x)
    per_call: dict[str, list[float]] = {k: [] for k in ways}
    for b in range(blocks):
        for name in (("checked", "unchecked") if b % 2 else ("unchecked", "checked")):
            fn = ways[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(x)
            per_call[name].append((time.perf_counter() - t0) / calls * 1e6)
    out = {k: statistics.median(v) for k, v in per_call.items()}
    out["cost"] = statistics.median(c - u for c, u in zip(per_call["checked"], per_call["unchecked"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kb", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=201)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    from autotp.tools.launch import run_ranks

    results = run_ranks(measure, 2, a.kb, a.blocks, a.calls, timeout=600)
    print(f"{a.kb} KB float32 sum through shared memory, tp=2, median of {a.blocks} blocks of {a.calls} sums each:")
    for rank, r in enumerate(results):
        print(f"  rank {rank}: checked {r['checked']:.2f} us, unchecked {r['unchecked']:.2f} us, "
              f"ratio {r['checked'] / r['unchecked']:.3f}; the check costs {r['cost']:+.2f} us per sum "
              f"(median of the {a.blocks} pairs of blocks)")


if __name__ == "__main__":
    main()
