"""Generated transformer-like modules (``fuzz_models``), at tp 2 and 4: every example is exact (outputs, the
input's gradient, every parameter's gradient slice) or refused with autotp's own error (or left replicated with
the reason in the plan, by the proofs or by the numerical check); never a wrong number, never an internal error. Hypothesis draws the choices; one process group runs every example.

CI runs a bounded number (``AUTOTP_FUZZ`` examples per tp, 4 by default); run more by hand:
``AUTOTP_FUZZ=200 python -m pytest tests/test_fuzz.py``.
"""
import os
import sys

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from fuzz_models import CHOICES  # noqa: E402

N = int(os.environ.get("AUTOTP_FUZZ", "4"))
choice = st.fixed_dictionaries({k: st.sampled_from(v) for k, v in CHOICES.items()})


def run_examples(rank: int, world: int, examples: list) -> list:
    import copy
    import traceback

    from fuzz_models import build

    import autotp
    from autotp.split import split_of

    out = []
    for ch in examples:
        model, x = build(ch)
        dense = copy.deepcopy(model)
        try:
            model = autotp.parallelize(model, world, example_inputs=(x,))  # planned, proven and tried
            plan = model._autotp_plan
        except autotp.AutoTPError as e:
            out.append(dict(refused=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        except Exception as e:  # noqa: BLE001 - an internal error is a finding
            out.append(dict(internal=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
            continue
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = model(x1), dense(x2)
        y.pow(2).mean().backward()
        y_ref.pow(2).mean().backward()
        lines = plan.resolve(dict(dense.named_modules()).keys())
        ref = dict(dense.named_parameters())
        gdiff = 0.0
        for n, p in model.named_parameters():
            if p.grad is None and ref[n].grad is None:
                continue
            want = split_of(lines.get(n.rpartition(".")[0]), n.rpartition(".")[2], world).take(ref[n].grad, rank)
            gdiff = max(gdiff, (p.grad - want).abs().max().item())
        out.append(dict(out=(y - y_ref).abs().max().item(), out_scale=y_ref.abs().max().item(),
                        x_grad=(x1.grad - x2.grad).abs().max().item(), grad=gdiff,
                        grad_scale=max(p.grad.abs().max().item() for p in dense.parameters() if p.grad is not None),
                        sharded=sum(1 for e in plan.entries if e.style in ("colwise", "rowwise")),
                        tried=sum(1 for e in plan.entries if e.reason.startswith("numerical check")),
                        dtensor=sum(1 for e in plan.entries if e.style == "global")))
    return out


def draw(n: int, seed: int | None = None) -> list[dict]:
    """``n`` distinct choices drawn by hypothesis (reproducible unless ``seed`` is given). They run in one spawned
    process group afterwards, so hypothesis generates but does not shrink: a failure prints its choices."""
    got: list[dict] = []

    @settings(max_examples=4 * n, derandomize=seed is None, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(choice)
    def collect(ch):
        if ch not in got and len(got) < n:
            got.append(ch)

    if seed is not None:
        collect = hypothesis_seed(seed)(collect)
    collect()
    return got


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_generated_models_are_exact_or_refused(tp):
    examples = draw(N, int(os.environ["AUTOTP_FUZZ_SEED"]) if "AUTOTP_FUZZ_SEED" in os.environ else None)
    assert len(examples) == N
    results = run_ranks(run_examples, tp, examples, timeout=120 + 30 * N)
    bad, sharded = [], 0
    for rank, res in enumerate(results):
        for ch, r in zip(examples, res):
            if "internal" in r:
                bad.append(("internal error", rank, ch, r["internal"]))
            elif "out" in r:
                sharded += rank == 0 and r["sharded"] > 0
                scale = max(1.0, r["out_scale"])
                if r["out"] > 1e-5 * scale or r["x_grad"] > 1e-5 * scale or \
                        r["grad"] > 1e-5 * max(1.0, r["grad_scale"]):
                    bad.append(("wrong numbers", rank, ch, r))
    assert not bad, bad
    assert sharded > 0, "no generated example was sharded at all"
