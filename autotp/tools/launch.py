"""Run a function on N local ranks (gloo on 127.0.0.1), bounded in time; a rank that dies fails all."""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Callable


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, q: Any, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    try:
        wait = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=wait)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


GRACE_S = 3.0  # after a rank exited without a result: how long the others may take to report their error


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned ranks; returns each rank's result.

    ``fn`` must be importable (defined at module level). Raises RuntimeError with the first
    failing rank's traceback, or after ``timeout`` seconds, killing every rank.
    """
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    # the parent hosts the ranks' store on a port the OS picks and keeps bound: no port to race for
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    port = store.port
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, args, q, timeout / 2), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, value = q.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - queue.Empty: is every rank still there?
                gone = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if gone:
                    exited = f"rank {gone[0]} exited (code {procs[gone[0]].exitcode}) without a result"
                    try:  # a result it put just before exiting, or another rank's error about it, is on its way
                        rank, status, value = q.get(timeout=GRACE_S)
                    except Exception:  # noqa: BLE001 - queue.Empty
                        raise RuntimeError(exited) from None
                    if status == "error":
                        raise RuntimeError(f"rank {rank} failed ({exited}):\n{value}")
                    results[rank] = value
                    continue
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {sorted(set(range(world)) - set(results))} gave no result within "
                                       f"{timeout:.0f} s") from None
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        del store
    return [results[r] for r in range(world)]
