"""The shared-memory all-reduce (AUTOTP_SHM=1): same numbers as gloo, pieces larger than a slot, a dead rank."""
import os
import platform
import sys
import time

import pytest

from autotp.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="shared-memory sums are x86-64 only")


def sums(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from autotp import collectives
    from autotp.shm import ShmSum

    s = ShmSum(None, slot_bytes=4096)  # 1024 floats a piece: the larger tensors go in several
    out = {}
    for n in (1, 1000, 1024, 5000):
        x = torch.arange(n, dtype=torch.float32) * (rank + 1) + 0.25
        ref = x.clone()
        dist.all_reduce(ref)
        out[n] = (s(x) - ref).abs().max().item()
    x = torch.full((3, 7), float(rank), dtype=torch.bfloat16)
    out["bf16"] = s(x).float().sum().item()
    for shape in ((2, 3, 5), (700, 3)):  # 2 x 3 rows of 5 in one piece; 700 rows of 3 in pieces of 341
        x = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
        ref = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(ref, x)
        out[f"gather{shape}"] = (s.gather_last(x) - torch.cat(ref, -1)).abs().max().item()
    assert collectives.use_shared_memory(None)
    return out


def test_sums_equal_gloo():
    for r in run_ranks(sums, 2, timeout=120):
        assert r[1] == r[1000] == r[1024] == r[5000] == 0.0, r
        assert r["bf16"] == 21.0, r
        assert r["gather(2, 3, 5)"] == r["gather(700, 3)"] == 0.0, r


def parity(rank: int, world: int) -> dict:
    from cases import CASES, parity as run

    os.environ["AUTOTP_SHM"] = "1"
    from autotp import collectives

    out = run(rank, world, [c for c in CASES if c in ("nanogpt", "alibi")])
    out["shm"] = bool(collectives._SHM)
    return out


def test_parity_through_shared_memory():
    for r in run_ranks(parity, 2, timeout=300):
        assert r["shm"]
        for name in ("nanogpt", "alibi"):
            x = r[name]
            assert x["out_diff"] <= 1e-5 * max(1.0, x["out_scale"]), (name, x)
            assert x["grad_diff"] <= 1e-5 * max(1.0, x["grad_scale"]), (name, x)
            assert x["same_on_all"] <= 1e-5 * max(1.0, x["out_scale"]), (name, x)
            assert x["fwd"] > 0, (name, x)  # counted as before: the sums are the same calls


def dead_peer(rank: int, world: int) -> str:
    import torch

    from autotp.errors import RankError
    from autotp.shm import ShmSum

    s = ShmSum(None)
    if rank == 1:
        return "left"  # and its process exits, never joining the sum
    t0 = time.monotonic()
    try:
        s(torch.ones(4))
    except RankError as e:
        return f"{time.monotonic() - t0:.1f} s: {e}"
    return "no error"


def test_dead_rank_makes_the_other_raise_fast():
    r0, r1 = run_ranks(dead_peer, 2, timeout=120)
    assert r1 == "left"
    assert "rank 1" in r0 and "exited before shared-memory all-reduce 1" in r0, r0
    assert float(r0.split()[0]) < 10, r0
