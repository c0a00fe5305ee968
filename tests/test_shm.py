"""Shared-memory sums and gathers (on by default for gloo groups on one host; AUTOTP_SHM=0 keeps gloo): same
numbers as gloo, pieces larger than a slot, an LM head computed into its slot, every rank falling back
together, a dead rank."""
import os
import platform
import sys
import time

import pytest

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                                reason="shared-memory sums are x86-64 only")


def sums(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from autotp.runtime import collectives
    from autotp.runtime.transports.shm import ShmSum

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
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 200, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    full = torch.nn.functional.linear(x, w, b)  # rank r holds output columns 6r..6r+5
    wr, br = w[6 * rank:6 * rank + 6], b[6 * rank:6 * rank + 6]
    collectives._SHM[dist.group.WORLD] = s  # 400 rows of 6 floats, computed into the slot 170 rows at a time
    try:
        with collectives.counting() as counts:
            out["linear"] = (collectives.gather_linear(x, wr, br, False, None, world) - full).abs().max().item()
            out["linear_in_out"] = (collectives.gather_linear(x, wr.t().contiguous(), None, True, None, world)
                                    - (full - b)).abs().max().item()
        out["counted"] = counts["all_gather.forward"]
    finally:
        del collectives._SHM[dist.group.WORLD]
    assert collectives.use_shared_memory(None)
    return out


def test_sums_equal_gloo():
    for r in run_ranks(sums, 2, timeout=120):
        assert r[1] == r[1000] == r[1024] == r[5000] == 0.0, r
        assert r["bf16"] == 21.0, r
        assert r["gather(2, 3, 5)"] == r["gather(700, 3)"] == 0.0, r
        assert max(r["linear"], r["linear_in_out"]) < 1e-5, r
        assert r["counted"] == 2, r  # one all-gather per LM-head forward, fused or not


def parity(rank: int, world: int) -> dict:
    import copy

    import torch
    from cases import CASES, build
    from cases import parity as run

    import autotp
    from autotp.runtime import collectives

    out = run(rank, world, [c for c in CASES if c in ("nanogpt", "alibi")])  # AUTOTP_SHM unset: the default
    out["shm"] = bool(collectives._SHM)
    model, ids = build("nanogpt")  # inference: the LM head computes its logits straight into shared memory
    dense = copy.deepcopy(model)
    autotp.parallelize(model, world, example_inputs=(ids,))
    with torch.no_grad(), collectives.counting() as counts:
        got = model(ids)
    with torch.no_grad():
        want = dense(ids)
    out["no_grad"] = (got - want).abs().max().item(), want.abs().max().item()
    out["no_grad_gathers"] = counts["all_gather.forward"]
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
        diff, scale = r["no_grad"]
        assert diff <= 1e-5 * max(1.0, scale), r["no_grad"]
        assert r["no_grad_gathers"] == 1, r


def opted_out_and_fallback(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from cases import build

    import autotp
    from autotp.runtime import collectives
    from autotp.runtime.transports import shm

    os.environ["AUTOTP_SHM"] = "0"
    model, ids = build("nanogpt")
    autotp.parallelize(model, world, example_inputs=(ids,))
    out = {"opted_out": not collectives._SHM}
    if rank == 1:
        shm._attach = lambda *a: None  # this rank sees another /dev/shm (another container's, say)
    group = dist.new_group([0, 1])
    t0 = time.monotonic()
    out["fell_back"] = shm.setup(group) is None  # on every rank together: nobody waits on a missing peer
    x = torch.full((5,), float(rank + 1))
    out["sum"] = collectives.all_reduce(x, group, "forward").tolist()
    out["seconds"] = time.monotonic() - t0
    return out


def test_opt_out_and_every_rank_falls_back_together():
    for r in run_ranks(opted_out_and_fallback, 2, timeout=120):
        assert r["opted_out"] and r["fell_back"], r
        assert r["sum"] == [3.0] * 5 and r["seconds"] < 30, r


def test_slot_size_from_free_space():
    from autotp.runtime.transports.shm import slot_size

    assert slot_size(32 << 20, 64 << 20, 2) == 16 << 20  # a container's default 64 MB /dev/shm: half of it
    assert slot_size(32 << 20, 24 << 30, 2) == 32 << 20
    assert slot_size(32 << 20, 3 << 20, 2) == 0  # under 1 MB a slot: gloo stays
    assert slot_size(4096, 1 << 30, 4) == 4096


def dead_peer(rank: int, world: int) -> str:
    import torch

    from autotp.errors import RankError
    from autotp.runtime.transports.shm import ShmSum

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
    assert "rank 1" in r0 and "exited before shared-memory collective 1" in r0, r0
    assert float(r0.split()[0]) < 10, r0
