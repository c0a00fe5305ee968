"""Shared-memory sums and gathers (on by default for gloo groups on one host; AUTOTP_SHM=0 keeps gloo): same
numbers as gloo, pieces larger than a slot, an LM head computed into its slot, every rank falling back
together, a dead rank; messages that differ between the ranks (sizes, dtypes, kinds, a rank out of step) and a
serving loop that survives a failed request; a rank killed or exiting during the setup, leaving nothing behind."""
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


def mismatches(rank: int, world: int) -> dict:
    """Each case: (the RankError this rank raised, or None; the next sum's and gather's max diff from gloo's)."""
    import torch
    import torch.distributed as dist

    from autotp.errors import RankError
    from autotp.runtime import collectives
    from autotp.runtime.transports.shm import ShmSum

    epoch = collectives.epoch_of(None)  # what a parallelized model's root forward counts
    s = ShmSum(None, slot_bytes=4096, epoch=epoch)  # 1024 floats a piece
    g = torch.Generator().manual_seed(rank)

    def attempt(call) -> str | None:
        try:
            call()
        except RankError as e:
            return str(e)
        return None

    def next_sum() -> float:
        x = torch.randn(3000, generator=g)
        ref = x.clone()
        dist.all_reduce(ref)
        return (s(x) - ref).abs().max().item()

    def next_gather() -> float:
        x = torch.randn(700, 3, generator=g)
        ref = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(ref, x)
        return (s.gather_last(x) - torch.cat(ref, -1)).abs().max().item()

    mine = rank == 0
    cases = {  # the same collective on every rank, with different tensors
        "sizes": lambda: s(torch.ones(4096 if mine else 2048)),
        "pieces": lambda: s(torch.ones(1024 if mine else 2048)),  # one piece of a slot against two
        "dtype": lambda: s(torch.ones(1000) if mine else torch.ones(2000, dtype=torch.bfloat16)),  # same bytes
        "kind": lambda: s(torch.ones(24)) if mine else s.gather_last(torch.ones(4, 6)),
        "gather": lambda: s.gather_last(torch.ones((4, 6) if mine else (6, 4))),
        "computed": lambda: s.gather_computed(lambda a, b, slot: slot.fill_(1.0), 3 if mine else 5, 8, torch.float32),
        "empty": lambda: s(torch.ones(0 if mine else 4)),
    }
    out = {name: (attempt(call), next_sum(), next_gather()) for name, call in cases.items()}
    x = torch.full((256,), float(rank + 1))

    def forward() -> None:  # what each parallelized model's root forward does first
        epoch(None, ())

    forward()  # rank 1 drops this forward after its first sum (it caught an exception) and goes on to the next
    s(x.clone())
    if mine:
        out["skipped"] = attempt(lambda: s(x.clone()))
    forward()
    total = [world * (world + 1) / 2] * 256
    out["after_skip"] = s(x.clone()).tolist() == total
    forward()
    if not mine:  # rank 1 drops two forwards before their first collective
        forward()
        forward()
    errors = []
    for _ in range(3 if mine else 1):
        errors.append(attempt(lambda: out.__setitem__("after_two", s(x.clone()).tolist() == total)))
        if errors[-1] is not None:
            forward()
    out["two_dropped"] = [e is not None for e in errors]
    forward()
    if not mine:  # the computation of an LM head's logits raises on rank 1
        try:
            s.gather_computed(lambda a, b, slot: 1 / 0, 3, 8, torch.float32)
        except ZeroDivisionError:
            forward()
    else:
        out["computed_raised"] = attempt(lambda: s.gather_last(torch.ones(3, 8)))
        forward()
    want = torch.arange(float(world)).repeat_interleave(8).expand(3, 8 * world)
    out["after_computed"] = (s.gather_last(torch.full((3, 8), float(rank))) == want).all().item()
    out["last"] = next_sum()
    return out


def test_mismatched_collectives_raise_on_every_rank_and_the_next_runs():
    r0, r1 = run_ranks(mismatches, 2, timeout=120)
    for name in ("sizes", "pieces", "dtype", "kind", "gather", "computed", "empty"):
        for r in (r0, r1):
            err, next_sum, next_gather = r[name]
            assert err is not None and "the ranks send different tensors" in err, (name, err)
            assert "different shapes" in err and "Every rank raises this" in err, (name, err)
            assert next_sum == next_gather == 0.0, (name, r[name])
        assert r0[name][0] == r1[name][0], name  # every rank read the same words
    sizes = r0["sizes"][0]
    assert "rank 0 sums 16384 bytes of float32, rank 1 sums 8192 bytes of float32" in sizes, sizes
    assert "rank 0 sums 4000 bytes of float32, rank 1 sums 4000 bytes of bfloat16" in r0["dtype"][0], r0
    assert "rank 0 sums 96 bytes of float32, rank 1 gathers 4 rows of 6 float32 (96 bytes)" in r0["kind"][0], r0
    assert "rank 0 gathers 4 rows of 6 float32 (96 bytes), rank 1 gathers 6 rows of 4" in r0["gather"][0], r0
    assert "rank 1 computes in place (an LM head) and gathers 5 rows of 8 float32" in r0["computed"][0], r0
    skipped = r0["skipped"]  # rank 0 drops the forward rank 1 dropped; rank 1's next sum waited for it
    assert skipped is not None and "out of step, ranks [1] are further on" in skipped, skipped
    assert "collective 2 of forward 1" in skipped and "collective 1 of forward 2" in skipped, skipped
    assert "rank 0 sums 1024 bytes of float32" in skipped and "drops its forward 1" in skipped, skipped
    assert r0["after_skip"] and r1["after_skip"]
    assert r0["two_dropped"] == [True, True, False] and r1["two_dropped"] == [False], (r0, r1)
    assert r0["after_two"] and r1["after_two"]
    assert r0["computed_raised"] is not None and "further on" in r0["computed_raised"], r0["computed_raised"]
    assert r0["after_computed"] and r1["after_computed"]
    assert r0["last"] == r1["last"] == 0.0


def serving(rank: int, world: int) -> list:
    """A serving loop over 5 requests: rank 1's forward raises midway through request 1 (it goes on to the next
    request), rank 1 gets another batch size at request 3. What each rank answered each request."""
    import copy

    import torch
    from cases import build

    import autotp
    from autotp.errors import RankError

    model, ids = build("nanogpt")
    dense = copy.deepcopy(model)
    autotp.parallelize(model, world, example_inputs=(ids,))
    model.eval(), dense.eval()
    g = torch.Generator().manual_seed(0)
    requests = [torch.randint(0, 96, (3, 12), generator=g) for _ in range(5)]
    if rank == 1:
        requests[3] = requests[3][:2]
    fail = []

    def bad_request(module, args):
        if fail:
            fail.pop()
            raise ValueError("this request fails on rank 1")

    model.transformer.h[1].register_forward_pre_hook(bad_request)
    answers = []
    for i, ids in enumerate(requests):
        fail[:] = [True] if rank == 1 and i == 1 else []
        try:
            with torch.no_grad():
                y = model(ids)
                answers.append((y - dense(ids)).abs().max().item())
        except (RankError, ValueError) as e:
            answers.append(f"{type(e).__name__}: {e}")
    return answers


@pytest.mark.slow  # a model planned and parallelized, as test_parity_through_shared_memory
def test_a_serving_loop_survives_a_failed_request_on_one_rank():
    r0, r1 = run_ranks(serving, 2, timeout=180)
    for i in (0, 2, 4):  # answered right on every rank
        assert isinstance(r0[i], float) and isinstance(r1[i], float) and max(r0[i], r1[i]) < 1e-4, (i, r0, r1)
    assert r1[1].startswith("ValueError: this request fails on rank 1"), r1[1]
    assert r0[1].startswith("RankError") and "ranks [1] are further on" in r0[1], r0[1]
    for r in (r0, r1):  # another batch size on rank 1
        assert r[3].startswith("RankError") and "the ranks send different tensors" in r[3], r[3]


def interrupted_setup(rank: int, world: int, case: str, note: str) -> str:
    """Set up shared memory (as ``parallelize`` does) with one rank killed or exiting during it: what happened."""
    import signal

    from autotp.errors import RankError
    from autotp.runtime.transports import shm

    if case == "file" and rank == 0:
        del os.memfd_create  # this rank cannot make a memory file: a named file under /dev/shm instead
    if case in ("memfd", "file") and rank == 0:
        def killed(where: str) -> None:
            with open(note, "w") as f:
                f.write(where)
            os.kill(os.getpid(), signal.SIGKILL)

        shm._after_create = killed
    if case == "exits" and rank == 1:
        shm._attach = lambda *a: os._exit(3)
    t0 = time.monotonic()
    try:
        s = shm.setup(None)
    except RankError as e:
        return f"RankError after {time.monotonic() - t0:.1f} s: {e}"
    return "fell back to gloo" if s is None else "set up"


def _groups_with_a_dying_rank(cases: dict[str, str], timeout: float) -> dict[str, list]:
    """``interrupted_setup`` on a 2-rank group per case, all at once: each rank's result, or its exit code."""
    import datetime
    import multiprocessing as mp

    import torch.distributed as dist

    from autotp.tools import launch

    ctx = mp.get_context("spawn")
    runs = {}
    for case, note in cases.items():
        q = ctx.Queue()
        store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout))
        procs = [ctx.Process(target=launch._worker, daemon=True,
                             args=(interrupted_setup, r, 2, store.port, (case, note), q, timeout / 2)) for r in (0, 1)]
        for p in procs:
            p.start()
        runs[case] = (q, store, procs)
    out = {}
    deadline = time.monotonic() + timeout
    for case, (q, store, procs) in runs.items():
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        got = {}
        while not q.empty():
            rank, status, value = q.get()
            got[rank] = value if status == "ok" else f"failed: {value}"
        out[case] = [got.get(r, f"exit code {p.exitcode}") for r, p in enumerate(procs)]
        for p in procs:
            if p.is_alive():
                p.kill()
    return out


def test_a_rank_killed_or_exiting_during_setup_stops_every_rank_and_leaves_nothing(tmp_path):
    cases = {c: str(tmp_path / c) for c in ("memfd", "file", "exits")}
    out = _groups_with_a_dying_rank(cases, timeout=120)
    for case in ("memfd", "file"):  # rank 0 SIGKILLed as soon as the shared memory exists
        (r0, r1), where = out[case], open(cases[case]).read()
        assert r0 == "exit code -9", out
        assert r1.startswith("RankError") and "setting up shared memory" in r1 and "another rank exited" in r1, out
        assert float(r1.split()[2]) < 10, out
        pid = where.split("/")[2] if case == "memfd" else where.split("_")[1]
        assert where.startswith("/proc/" if case == "memfd" else "/dev/shm/autotp_"), where
        assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"autotp_{pid}_")], (case, where)
    r0, r1 = out["exits"]  # rank 1 exits while it maps the memory: rank 0 stops, it does not fall back to gloo
    assert r1 == "exit code 3", out
    assert r0.startswith("RankError") and "another rank exited" in r0 and float(r0.split()[2]) < 10, out
