"""The side-by-side benchmark's results and their report: the tables, the reading and docs/benchmarks.md.

``bench/side_by_side.py`` runs the systems and fills ``Result``s; this module only turns them into text.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field

from tp_systems import ModelSize

TP = 2  # ranks of every sharded system
TP_SYSTEMS = ("autotp", "autotp_gloo", "hand", "hand_textbook", "dtensor", "transformers", "deepspeed")
LABELS = {
    "autotp": "(a) autotp `parallelize(model, tp=2)`",
    "autotp_gloo": "(a-) autotp, `AUTOTP_SHM=0` (every collective on gloo)",
    "hand": "(b) hand-written Megatron swap (logits: zero-padded all-reduce)",
    "hand_textbook": "(b0) hand-written Megatron swap (logits: all_gather)",
    "dtensor": "(c) PyTorch `parallelize_module` (DTensor)",
    "transformers": "(d) transformers TP (`DistributedConfig`)",
    "deepspeed": "(e) DeepSpeed AutoTP (`init_inference`)",
    "dense": "unsharded, 1 process, 1 thread (tp=1)",
    "dense2": f"unsharded, 1 process, {TP} threads",
}
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
            lines.append(f"| {label} | not run: {first_line(r.error)[:120]} |" + " |" * 12)
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
    lines = ["| piece | calls / forward | autotp, ms per call (wall / CPU) | alternative (whose) | alternative, ms per "
             "call (wall / CPU) | autotp − alternative, ms per forward (wall / CPU) |", "|---|---|---|---|---|---|"]
    for c in costs:
        (aw, ac), (bw, bc), n = c["autotp"], c["alt"], c["calls"]
        lines.append(f"| {c['piece']} | {n} | {aw:.1f} / {ac:.1f} | {c['alt_name']} ({c['ref']}) | {bw:.1f} / {bc:.1f} "
                     f"| {n * (aw - bw):.1f} / {n * (ac - bc):.1f} |")
    return "\n".join(lines)


def cost_reading(costs: list[dict], results: list[Result]) -> list[str]:
    """How much of the autotp − (b) gap the (b) pieces account for; what DeepSpeed's head split would cost."""
    by = {r.spec.name: r for r in results if r.median_ms is not None}
    out = []
    mine = [c for c in costs if c["ref"] == "b"]
    if mine and "autotp" in by and "hand" in by:
        wall = sum(c["calls"] * (c["autotp"][0] - c["alt"][0]) for c in mine)
        cpu = sum(c["calls"] * (c["autotp"][1] - c["alt"][1]) for c in mine)
        a, b = by["autotp"], by["hand"]
        out.append(f"Together the (b) rows come to {wall:+.0f} ms wall ({cpu:+.0f} ms CPU) per forward for autotp "
                   f"against (b)'s ways (negative: autotp's are faster); the measured gap between autotp and (b) is "
                   f"{a.median_ms - b.median_ms:+.0f} ms wall (median), {a.cpu_ms - b.cpu_ms:+.0f} ms CPU.")
    for c in costs:
        if c["ref"] == "e":
            d = c["autotp"][0] - c["alt"][0]
            out.append(f"Splitting the LM head by input features and summing the full logits, as DeepSpeed does, "
                       f"would take {abs(d):.0f} ms {'less' if d > 0 else 'more'} per forward than autotp's split "
                       f"(wall, same transport).")
    return out


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
            out.append(f"{_label(r.spec.name)} could not be run: `{first_line(r.error)}`.")
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
                   f"split: its all-reduces run through its own shared-memory kernel, (b)'s through gloo "
                   f"over TCP loopback.")
    if a and "autotp_gloo" in by:
        g = by["autotp_gloo"]
        out.append(f"autotp's shared-memory transport (on by default for ranks on one host) takes "
                   f"{a.median_ms / g.median_ms:.3f}× the time of the same plan with every collective on gloo "
                   f"(`AUTOTP_SHM=0`).")
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
  (one all-reduce), LM head column-sharded with its logits all-gathered. The ranks share this host,
  so its collectives go through a buffer in `/dev/shm` that they map (`autotp/runtime/transports/shm.py`, the default for
  gloo groups on one host), and without autograd the LM head computes its local logits straight
  into that buffer, its output's memory reused once the previous logits are dropped (`runtime/transports/buffers.py`).
- **(a-) autotp with `AUTOTP_SHM=0`**: the same plan with every collective on gloo over TCP
  loopback (the logits gathered by a zero-padded all-reduce).
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
        "# Side-by-side: tensor-parallel systems on one Llama model" + (", generating" if size.new_tokens else ""),
        "",
        f"Generated by `bench/side_by_side.py` on {datetime.date.today().isoformat()}.",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Command: `{command}`",
        f"- Model: `LlamaForCausalLM`, hidden {size.hidden}, {size.layers} layers, {size.heads} heads, "
        f"{size.kv_heads} KV heads, intermediate {size.intermediate}, vocabulary {size.vocab}, fp32, seed {size.seed}",
        f"- Input: batch {size.batch} × {size.seq} tokens; {args.warmup} warm-up forwards, {args.reps} timed reps"
        + (f"; each timed call is greedy `generate()` of {size.new_tokens} new tokens with a KV cache (so "
           f"\"forward\" below means one such call, and the difference column compares token ids)"
           if size.new_tokens else ""),
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
        cost_table(costs) if costs else ("(not measured when timing generate(): the pieces are measured on one "
                                         "forward's shapes, in docs/benchmarks.md)" if size.new_tokens
                                         else "(not measured: autotp did not run)"),
        "",
        *[f"- {s}" for s in cost_reading(costs, results)],
        "",
        "## Method",
        "",
        SETUP_NOTES,
    ]
    return "\n".join(lines)


def first_line(err: str) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else err
