"""Side-by-side forward latency of tensor-parallel systems on one Llama model, at tp=2 on local gloo ranks.

    python bench/side_by_side.py                 # full size; writes docs/benchmarks.md
    python bench/side_by_side.py --quick         # small smoke run; prints the table only

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
import platform
import resource
import shlex
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tp_systems import ModelSize, build_inputs, build_model, count_collectives, param_bytes, SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
TP = 2  # ranks of every sharded system
TP_SYSTEMS = ("autotp", "autotp_shm", "hand", "hand_textbook", "dtensor", "transformers", "deepspeed")
LABELS = {
    "autotp": "(a) autotp `parallelize(model, tp=2)`",
    "autotp_shm": "(a+) autotp, `AUTOTP_SHM=1` (shared-memory all-reduce)",
    "hand": "(b) hand-written Megatron swap (logits: zero-padded all-reduce)",
    "hand_textbook": "(b0) hand-written Megatron swap (logits: all_gather)",
    "dtensor": "(c) PyTorch `parallelize_module` (DTensor)",
    "transformers": "(d) transformers TP (`DistributedConfig`)",
    "deepspeed": "(e) DeepSpeed AutoTP (`init_inference`)",
    "dense": "unsharded, 1 process, 1 thread (tp=1)",
    "dense2": f"unsharded, 1 process, {TP} threads",
}
QUICK = ModelSize(hidden=256, layers=2, heads=8, kv_heads=4, intermediate=704, vocab=4000, batch=2, seq=64)
TOLERANCE = 1e-3  # max |logit difference| accepted as "the same model" (fp32, reordered sums)


@dataclass
class Spec:
    """One system to run: which setup, on how many ranks, with how many threads each."""

    name: str
    system: str
    world: int
    threads: int = 1


@dataclass
class Result:
    """What was measured for one system (``error`` set when it could not be run)."""

    spec: Spec
    error: str | None = None
    setup_s: float = 0.0
    diff: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    comm_ms: float = 0.0
    count_check: str = ""
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    param_mb: float = 0.0
    peak_rss_mb: float = 0.0
    rss_mb: float = 0.0

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None

    @property
    def cpu_ms(self) -> float | None:
        return statistics.median(self.cpu_times) * 1e3 if self.cpu_times else None

    @property
    def iqr_ms(self) -> float:
        """Spread of the wall times: third quartile minus first."""
        if len(self.times) < 2:
            return 0.0
        q = statistics.quantiles(self.times, n=4)
        return (q[2] - q[0]) * 1e3

    @property
    def wrong(self) -> bool:
        return self.diff is not None and not self.diff <= TOLERANCE


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
        if mine:
            from autotp import collectives

            collectives.reset_counts()
        with torch.no_grad():
            counts, comm_ms = count_collectives(self.prepared.forward, self.ids)
        own = {k.split(".")[0]: v for k, v in collectives.COUNTS.items()
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


def _first_line(err: str) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else err


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
                say(f"  {name} failed: {_first_line(str(e))}")
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
                    say(f"  {name} failed: {_first_line(str(e))}")
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
            if "autotp" in groups and not results["autotp"].wrong:
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
        r.count_check = ("agrees with autotp.collectives.COUNTS" if r.counts == c[0]["own"]
                         else f"DISAGREES with autotp.collectives.COUNTS {c[0]['own']}")
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

def fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none"


def table(results: list[Result]) -> str:
    """The Markdown table of every system."""
    by = {r.spec.name: r for r in results}
    hand, dense = by.get("hand"), by.get("dense")
    head = ("| system | ranks × threads | median ms | min ms | IQR ms | ratio to (b) | ratio to tp=1 | CPU ms / rank "
            "| collectives / forward "
            "| ms in collectives | param MB / rank | peak RSS MB / rank | RSS after setup MB / rank "
            "| max \\|diff\\| vs unsharded |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        label = f"{_label(r.spec.name)} | {r.spec.world} × {r.spec.threads}"
        if r.error:
            lines.append(f"| {label} | not run: {_first_line(r.error)[:120]} |" + " |" * 12)
            continue
        med = r.median_ms
        diff = f"{r.diff:.1e}" + (" **WRONG**" if r.wrong else "")
        if med is None:
            cells = ["not timed", "", "", "", "", ""]
        else:
            cells = [f"{med:.1f}", f"{min(r.times) * 1e3:.1f}", f"{r.iqr_ms:.1f}", _ratio(med, hand),
                     _ratio(med, dense), f"{r.cpu_ms:.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells + [
            fmt_counts(r.counts), f"{r.comm_ms:.1f}", f"{r.param_mb:.1f}", f"{r.peak_rss_mb:.0f}",
            f"{r.rss_mb:.0f}", diff]) + " |")
    return "\n".join(lines)


def cost_table(costs: list[dict]) -> str:
    """autotp's communication pieces against the alternatives (wall / CPU ms, slower rank, medians)."""
    lines = ["| piece | calls / forward | autotp, ms per call (wall / CPU) | alternative | alternative, ms per call "
             "(wall / CPU) | autotp − alternative, ms per forward (wall / CPU) |", "|---|---|---|---|---|---|"]
    for c in costs:
        (aw, ac), (bw, bc), n = c["autotp"], c["alt"], c["calls"]
        lines.append(f"| {c['piece']} | {n} | {aw:.1f} / {ac:.1f} | {c['alt_name']} | {bw:.1f} / {bc:.1f} "
                     f"| {n * (aw - bw):.1f} / {n * (ac - bc):.1f} |")
    return "\n".join(lines)


def cost_reading(costs: list[dict], results: list[Result]) -> list[str]:
    """How much of the autotp − (b) gap the pieces account for."""
    by = {r.spec.name: r for r in results if r.median_ms is not None}
    if not costs or "autotp" not in by or "hand" not in by:
        return []
    wall = sum(c["calls"] * (c["autotp"][0] - c["alt"][0]) for c in costs)
    cpu = sum(c["calls"] * (c["autotp"][1] - c["alt"][1]) for c in costs)
    a, b = by["autotp"], by["hand"]
    return [f"Together these pieces cost autotp {wall:.0f} ms wall ({cpu:.0f} ms CPU) per forward more than the "
            f"alternatives; the measured gap between autotp and (b) is {a.median_ms - b.median_ms:.0f} ms wall "
            f"(median), {a.cpu_ms - b.cpu_ms:.0f} ms CPU."]


def _ratio(ms: float, base: Result | None) -> str:
    return f"{ms / base.median_ms:.3f}" if base is not None and base.median_ms else "n/a"


def _label(name: str, tag: bool = True) -> str:
    """A system's label; ``tag=False`` drops its leading ``(a)``."""
    label = LABELS.get(name, name)
    return label if tag or not label.startswith("(") else label.split(" ", 1)[1]


def reading(results: list[Result], tp: int) -> list[str]:
    """Plain sentences read off the numbers (no judgement the numbers do not carry)."""
    by = {r.spec.name: r for r in results if r.median_ms is not None}
    out = []
    for r in results:
        if r.error:
            out.append(f"{_label(r.spec.name)} could not be run: `{_first_line(r.error)}`.")
        elif r.wrong:
            out.append(f"{_label(r.spec.name)} is **wrong**: its logits differ from the unsharded model's by up to "
                       f"{r.diff:.3g}; it was not timed.")
    a, b, one = by.get("autotp"), by.get("hand"), by.get("dense")
    if a and b:
        ratio = a.median_ms / b.median_ms
        verdict = "within" if ratio <= 1.05 else "outside"
        fastest = min(a.times) / min(b.times)
        out.append(f"autotp takes {a.median_ms:.1f} ms against {b.median_ms:.1f} ms for the hand-written swap: "
                   f"{ratio:.3f}×, {verdict} the 1.05× target (fastest forwards: {fastest:.3f}×; "
                   f"CPU time per rank: {a.cpu_ms / b.cpu_ms:.3f}×). The wall times' interquartile ranges are "
                   f"{a.iqr_ms:.0f} and {b.iqr_ms:.0f} ms: differences smaller than these are noise.")
        others = [(n, by[n].median_ms / a.median_ms) for n in ("hand_textbook", "dtensor", "transformers", "deepspeed")
                  if n in by]
        if others:
            out.append("Against the other systems autotp's time is " + "; ".join(
                f"{1 / x:.3f}× that of {_label(n, tag=False)}" for n, x in others)
                + " (below 1: autotp is faster).")
    for n in ("hand", "autotp"):
        if n in by and one:
            t = by[n]
            out.append(f"{_label(n, tag=False)} at tp={tp} takes {t.median_ms / one.median_ms:.2f}× the time of "
                       f"one single-threaded process (speed-up {one.median_ms / t.median_ms:.2f}, scaling "
                       f"efficiency {one.median_ms / (tp * t.median_ms):.0%}).")
    sharded = [by[n] for n in TP_SYSTEMS if n in by]
    if "dense2" in by and one and sharded:
        best = min(sharded, key=lambda r: r.median_ms)
        out.append(f"The unsharded model with {tp} threads in one process takes "
                   f"{by['dense2'].median_ms / one.median_ms:.2f}× the time it takes with one thread, and "
                   f"{by['dense2'].median_ms / best.median_ms:.2f}× the time of the fastest tp={tp} system "
                   f"({_label(best.spec.name, tag=False)}): on {os.cpu_count()} cores, intra-op threads need no "
                   f"communication at all.")
    ds = by.get("deepspeed")
    if ds and b and ds.median_ms < b.median_ms and ds.counts.get("all_reduce", 0) >= sum(b.counts.values()):
        out.append(f"DeepSpeed beats (b) with as many collectives ({fmt_counts(ds.counts)}) and the same layer "
                   f"split: its all-reduces run through its own shared-memory kernel, the others' through gloo "
                   f"over TCP loopback.")
    return out


def machine() -> str:
    """CPU model, the vector/matrix extensions that set GEMM speed, and the core count."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model, flags = info.get("model name", model), set(info.get("flags", "").split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return (f"{model}" + (f" ({', '.join(isa)})" if isa else "") + f", {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}")


def versions() -> str:
    import importlib.metadata as md

    got = []
    for pkg in ("torch", "transformers", "deepspeed", "accelerate"):
        try:
            got.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            got.append(f"{pkg} not installed")
    return f"Python {platform.python_version()}, " + ", ".join(got)


SETUP_NOTES = """\
How each system is set up (all from the same seeded dense model, fp32, `torch.no_grad()`):

- **(a) autotp**: `autotp.parallelize(model, tp=2)`, nothing else. Its plan (derived from the graph):
  q/k/v/gate/up column, o/down row (one all-reduce each), token embedding sharded by vocabulary rows
  (one all-reduce), LM head column-sharded with its logits all-gathered (on gloo: a zero-padded
  all-reduce).
- **(a+) autotp with `AUTOTP_SHM=1`**: the same plan; its all-reduces go through a buffer in
  `/dev/shm` that the two ranks share (`autotp.shm`) instead of gloo over TCP loopback.
- **(b) hand-written Megatron swap**, the speed reference: `nn.Linear` modules replaced by sliced
  copies: q/k/v/gate/up by output rows, o/down by input columns followed by an in-place
  `torch.distributed.all_reduce`; the LM head sliced by vocabulary rows, each rank writing its logits
  into a zeroed full-vocabulary buffer that the ranks all-reduce (exact, since the other terms are
  zero: on gloo this is several times faster than an all-gather of the same bytes); the token
  embedding **replicated** (no communication; it costs memory, not time). No attribute patches
  (Llama reshapes with `-1`).
- **(b0) the same swap, textbook gather**: the logits gathered with one `all_gather_into_tensor` and
  reordered into vocabulary order (what Megatron, DTensor and transformers do).
- **(c) DTensor**: `parallelize_module` on `init_device_mesh("cpu", (2,))` with the same plan as (b):
  `ColwiseParallel` for q/k/v/gate/up, `RowwiseParallel` for o/down, `ColwiseParallel(output_layouts=Replicate())`
  for the LM head, embedding replicated.
- **(d) transformers**: `initialize_distributed_mesh(DistributedConfig(tp_size=2))` then
  `LlamaForCausalLM.maybe_distribute_model(...)`, i.e. Llama's own `base_model_tp_plan` (the same
  layer plan) and `lm_head: colwise_gather_output`; it adds `embed_tokens: embedding_rowwise` on its
  own, so like autotp it shards the token embedding by vocabulary (one all-reduce).
- **(e) DeepSpeed AutoTP**: `deepspeed.init_inference(model, tensor_parallel={"tp_size": 2},
  replace_with_kernel_inject=False)` with `LOCAL_SIZE=2`; its all-reduces use its shared-memory kernel
  (not gloo), and its LM head is split by input features with the full logits all-reduced.
- **tp=1**: the unsharded model in one process with one thread (and, for reference, two threads).

Each system runs in its own ranks (processes, gloo group on 127.0.0.1, one thread per rank). Forward
latency is the median over the reps, the systems interleaved within each rep (order rotated per rep),
the ranks of a system released together by a barrier, a forward's time the slower rank's. Collectives
are counted from `torch.profiler` events on the calling thread (nested c10d/gloo events of one
collective count once); "ms in collectives" is the time inside them in that profiled forward
(waiting for the other rank included). "CPU ms / rank" is the CPU time of the rank's process (all
threads) over the timed forward, median, slower rank: less disturbed than wall time by other work on
the machine; gloo sleeps while it waits, DeepSpeed's shared-memory all-reduce spins. Parameter MB
count what a rank holds (`to_local()` for DTensors); peak RSS includes building the dense model
before sharding it, as every system here does.
"""


def document(results: list[Result], costs: list[dict], size: ModelSize, args: argparse.Namespace,
             command: str) -> str:
    """The whole of docs/benchmarks.md."""
    lines = [
        "# Side-by-side: tensor-parallel systems on one Llama model",
        "",
        f"Generated by `bench/side_by_side.py` on {datetime.date.today().isoformat()}.",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
        f"- Model: `LlamaForCausalLM`, hidden {size.hidden}, {size.layers} layers, {size.heads} heads, "
        f"{size.kv_heads} KV heads, intermediate {size.intermediate}, vocabulary {size.vocab}, fp32, seed {size.seed}",
        f"- Input: batch {size.batch} × {size.seq} tokens; {args.warmup} warm-up forwards, {args.reps} timed reps",
        f"- Load average (1 min) at the start and end of the run: {args.load[0]:.1f}, {args.load[1]:.1f} "
        f"(other work on the machine shares its cores)",
        "",
        table(results),
        "",
        "## Reading",
        "",
        *[f"- {s}" for s in reading(results, TP)],
        "",
        "## Where autotp's time goes",
        "",
        "Measured in the same run, inside autotp's ranks, on the model's shapes (`bench/autotp_costs.py`): each",
        "piece of autotp's communication against the cheapest way found to get the same tensor.",
        "",
        cost_table(costs) if costs else "(not measured: autotp did not run)",
        "",
        *[f"- {s}" for s in cost_reading(costs, results)],
        "",
        "## Method",
        "",
        SETUP_NOTES,
    ]
    return "\n".join(lines)


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
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs" / "benchmarks.md")
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
