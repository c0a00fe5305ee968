"""Side-by-side forward latency of tensor-parallel systems on one Llama model, at tp=2 on local gloo ranks.

    python bench/side_by_side.py                 # full size; writes docs/benchmarks.md
    python bench/side_by_side.py --quick         # small smoke run; prints the table only
    python bench/side_by_side.py --seq 32 --new-tokens 32   # greedy generate(); docs/benchmarks_generate.md

Systems: autotp, a hand-written Megatron module swap (the speed reference), PyTorch
``parallelize_module`` (DTensor) with the same plan, transformers' own TP, DeepSpeed AutoTP, and the
unsharded model in one process (1 thread; and 2 threads, for reference). Each system runs in its own
ranks (its own processes and gloo group on 127.0.0.1), so imports, global patches and peak RSS stay
apart. Every system's logits are compared with the unsharded model's before it is timed; a wrong one
is reported and not timed. Timing interleaves the systems (rep loop outside, system loop inside).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing as mp
import os
import resource
import shlex
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from sbs_report import (
    TOLERANCE,
    TP,
    TP_SYSTEMS,
    Result,
    Spec,
    cost_reading,
    cost_table,
    document,
    first_line,
    fmt_counts,
    reading,
    table,
)
from tp_systems import SYSTEMS, ModelSize, build_inputs, build_model, count_collectives, generating, param_bytes

ROOT = Path(__file__).resolve().parent.parent
QUICK = ModelSize(hidden=256, layers=2, heads=8, kv_heads=4, intermediate=704, vocab=4000, batch=2, seq=64)


# ---------------------------------------------------------------- worker side (one process per rank)

def _rss_mb() -> float:
    """Current resident set size of this process, in MB (Linux)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """One rank of one system: builds, shards and warms up the model, then serves the driver's commands."""

    def __init__(self, spec: Spec, rank: int, size: ModelSize, warmup: int):
        self.spec, self.rank, self.world, self.size = spec, rank, spec.world, size
        self.ids = build_inputs(size)
        t0 = time.perf_counter()
        self.prepared = SYSTEMS[spec.system](build_model(size), rank, spec.world)
        if size.new_tokens:
            self.prepared = generating(self.prepared, size.new_tokens)
        self.setup_s = time.perf_counter() - t0
        with torch.no_grad():
            for _ in range(warmup):
                self.prepared.forward(self.ids)

    def reference(self, path: str) -> float:
        """Save this (unsharded) model's logits for the others to compare with."""
        with torch.no_grad():
            logits = self.prepared.forward(self.ids)
        torch.save(logits, path)
        return logits.abs().max().item()

    def check(self, path: str) -> float:
        """Max |difference| between this system's logits and the saved unsharded ones."""
        ref = torch.load(path)
        with torch.no_grad():
            got = self.prepared.forward(self.ids)
        if got.shape != ref.shape:
            return float("inf")
        return (got - ref).abs().max().item()

    def count(self, _: Any) -> dict[str, Any]:
        """Collectives of one forward (profiler), and for autotp its own counters to compare with."""
        mine = self.spec.system.startswith("autotp")
        from autotp.runtime import collectives

        with torch.no_grad(), collectives.counting() as ours:
            counts, comm_ms = count_collectives(self.prepared.forward, self.ids)
        own = {k.split(".")[0]: v for k, v in ours.items()
               if k.endswith(".forward") and not k.startswith("bytes")} if mine else None
        if own and "all_gather" in own and dist.get_backend() == "gloo" and not collectives._SHM:
            own["all_reduce"] = own.get("all_reduce", 0) + own.pop("all_gather")  # gloo: a zero-padded all-reduce
        return dict(counts=counts, comm_ms=comm_ms, own=own)

    def time(self, _: Any) -> tuple[float, float]:
        """Wall and CPU seconds of one forward (CPU: this process, all its threads), the ranks released
        together by a barrier."""
        if self.world > 1:
            dist.barrier()
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            out = self.prepared.forward(self.ids)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
        del out
        return dt, dc

    def breakdown(self, reps: int) -> list[dict]:
        """autotp only: its communication pieces against the cheapest alternatives found (autotp_costs)."""
        from autotp_costs import measure

        return measure(self.size, self.prepared.module, reps)

    def stats(self, _: Any) -> dict[str, float]:
        return dict(param_mb=param_bytes(self.prepared.module) / 2**20, peak_rss_mb=_peak_rss_mb(),
                    rss_mb=_rss_mb())


def _serve(spec: Spec, rank: int, port: int, size: ModelSize, warmup: int, log_path: str, conn) -> None:
    """Process entry point: set up one rank (output to ``log_path``), then answer commands until 'quit'."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(spec.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(spec.world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(spec.world))
    try:
        if spec.world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=spec.world, timeout=datetime.timedelta(seconds=600))
        w = Worker(spec, rank, size, warmup)
        conn.send(("ok", w.setup_s))
        while True:
            cmd, arg = conn.recv()
            if cmd == "quit":
                break
            conn.send(("ok", getattr(w, cmd)(arg)))
    except BaseException:  # noqa: BLE001 - reported to the driver
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- driver side

def _free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """The processes of one system, one pipe per rank."""

    def __init__(self, spec: Spec, size: ModelSize, warmup: int, logdir: Path):
        ctx = mp.get_context("spawn")
        self.spec, self.port = spec, _free_port()
        self.log = logdir / f"{spec.name}.log"
        self.conns, self.procs = [], []
        for r in range(spec.world):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(spec, r, self.port, size, warmup, str(self.log), theirs),
                            daemon=True)
            p.start()
            self.conns.append(mine)
            self.procs.append(p)

    def wait(self, timeout: float) -> list[Any]:
        """Every rank's answer; RuntimeError with the failing rank's traceback (or a timeout)."""
        out = []
        for r, c in enumerate(self.conns):
            if not c.poll(timeout):
                raise RuntimeError(f"rank {r} gave no answer within {timeout:.0f} s")
            status, value = c.recv()
            if status == "error":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            out.append(value)
        return out

    def ask(self, cmd: str, arg: Any = None, timeout: float = 600.0) -> list[Any]:
        for c in self.conns:
            c.send((cmd, arg))
        return self.wait(timeout)

    def close(self) -> None:
        """Stop the ranks (politely, then by force) and remove DeepSpeed's shared-memory segments."""
        for c in self.conns:
            try:
                c.send(("quit", None))
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        for r in range(self.spec.world):  # named by DeepSpeed's shm all-reduce: uid, address, port, rank
            Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{self.port}_{r}").unlink(
                missing_ok=True)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def run(specs: list[Spec], size: ModelSize, reps: int, warmup: int, say, *,
        together: bool = False) -> tuple[list[Result], list[dict]]:
    """Set every system up, check it against the unsharded logits, count its collectives, time it;
    then break autotp's communication costs down (``autotp_costs``; empty without autotp).

    ``together``: start every system's processes at once (small models); otherwise one system at a
    time, since each rank builds the whole dense model before sharding it.
    """
    results = {s.name: Result(s) for s in specs}
    groups: dict[str, Group] = {}
    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        ref = str(Path(tmp) / "reference.pt")

        def settle(g: Group) -> None:
            name = g.spec.name
            try:
                results[name].setup_s = max(g.wait(900))
                say(f"  {name} ready (build and shard {results[name].setup_s:.1f} s)")
                if g.spec.system == "dense" and not Path(ref).exists():
                    g.ask("reference", ref)
                groups[name] = g
            except RuntimeError as e:
                results[name].error = f"{e}\n{g.log_tail()}"
                say(f"  {name} failed: {first_line(str(e))}")
                g.close()

        try:
            started = []
            for spec in specs:
                say(f"setting up {spec.name} ({spec.world} rank(s), {spec.threads} thread(s) each)...")
                started.append(Group(spec, size, warmup, Path(tmp)))
                if not together:
                    settle(started.pop())
            for g in started:
                settle(g)
            if not Path(ref).exists():
                raise RuntimeError("the unsharded reference did not run; nothing to compare with")
            for name, g in list(groups.items()):
                try:
                    _check(results[name], g, ref, say)
                except RuntimeError as e:
                    results[name].error = f"{e}\n{g.log_tail()}"
                    say(f"  {name} failed: {first_line(str(e))}")
                    groups.pop(name).close()
            timed = [g for n, g in groups.items() if not results[n].wrong]
            for rep in range(reps):
                k = rep % len(timed)
                for g in timed[k:] + timed[:k]:  # rotate the order so no system always runs first
                    walls, cpus = zip(*g.ask("time"))
                    results[g.spec.name].times.append(max(walls))
                    results[g.spec.name].cpu_times.append(max(cpus))
                say(f"rep {rep + 1}/{reps}: " + ", ".join(
                    f"{g.spec.name} {results[g.spec.name].times[-1] * 1e3:.0f}" for g in timed) + " ms")
            for name, g in groups.items():
                st = g.ask("stats")
                r = results[name]
                r.param_mb = max(s["param_mb"] for s in st)
                r.peak_rss_mb = max(s["peak_rss_mb"] for s in st)
                r.rss_mb = max(s["rss_mb"] for s in st)
            costs = []
            if "autotp" in groups and not results["autotp"].wrong and not size.new_tokens:  # forward shapes
                say("breaking autotp's communication costs down...")
                costs = _merge_ranks(groups["autotp"].ask("breakdown", max(3, reps // 2)))
        finally:
            for g in groups.values():
                g.close()
    return [results[s.name] for s in specs], costs


def _check(r: Result, g: Group, ref: str, say) -> None:
    """Compare a system's logits with the reference and count its collectives."""
    r.diff = max(g.ask("check", ref))
    c = g.ask("count")
    r.counts, r.comm_ms = c[0]["counts"], max(x["comm_ms"] for x in c)
    if c[0]["own"] is not None:
        r.count_check = ("agrees with autotp.count_collectives()" if r.counts == c[0]["own"]
                         else f"DISAGREES with autotp.count_collectives() {c[0]['own']}")
    say(f"  {r.spec.name}: max |diff| {r.diff:.2e}, collectives {fmt_counts(r.counts)} {r.count_check}")
    if r.wrong:
        say(f"  {r.spec.name} is WRONG (max |diff| {r.diff:.3g} > {TOLERANCE}); it will not be timed")


def _merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """One row per piece, each time the slower rank's."""
    rows = []
    for same in zip(*per_rank):
        row = dict(same[0])
        for k in ("autotp", "alt"):
            row[k] = tuple(max(r[k][i] for r in same) for i in range(2))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    d = ModelSize()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(ModelSize):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None,
                        help=f"default {getattr(d, f.name)} ({getattr(QUICK, f.name)} with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="timed forwards per system (default 15, 5 with --quick)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per system before anything else")
    ap.add_argument("--systems", nargs="+", choices=TP_SYSTEMS, default=list(TP_SYSTEMS))
    ap.add_argument("--no-threads-row", action="store_true", help="skip the unsharded 2-thread reference")
    ap.add_argument("--quick", action="store_true", help="small model and few reps: a smoke run")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown report to write (default docs/benchmarks.md; none with --quick)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = QUICK if args.quick else ModelSize()
    size = dataclasses.replace(base, **{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelSize)
                                        if getattr(args, f.name) is not None})
    args.reps = args.reps or (5 if args.quick else 15)
    doc = "benchmarks_generate.md" if size.new_tokens else "benchmarks.md"
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs" / doc)
    specs = [Spec("dense", "dense", 1, 1)] + [Spec(s, s, TP) for s in args.systems]
    if not args.no_threads_row:
        specs.append(Spec("dense2", "dense", 1, TP))
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    results, costs = run(specs, size, args.reps, args.warmup,
                  lambda s: print(f"[{time.perf_counter() - t0:4.0f} s] {s}", flush=True), together=args.quick)
    args.load = (load, os.getloadavg()[0])
    print()
    print(table(results))
    print()
    for s in reading(results, TP):
        print("-", s)
    if costs:
        print()
        print(cost_table(costs))
        for s in cost_reading(costs, results):
            print("-", s)
    for r in results:
        if r.error:
            print(f"\n{r.spec.name} failed:\n{r.error}", file=sys.stderr)
    if out is not None:
        command = "python bench/side_by_side.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
        out.write_text(document(results, costs, size, args, command) + "\n")
        print(f"\nwrote {out}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 1 if any(r.wrong for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
