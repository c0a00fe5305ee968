"""'global' modules: code that computes with global sizes runs on DTensor activations, whatever its Python looks
like. Exact (outputs and every gradient) at tp 2 and 4, forward at the optimum (one all-reduce per group and
lookup), every collective counted, DTensor's included; several AdamW steps equal to the unsharded run; plans
with a global line saved and applied again; lines a global module would do twice refused."""
import copy
import os
import sys

import pytest
import torch

import autotp
from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from global_models import NAMES, build  # noqa: E402


def one(rank: int, world: int) -> dict:
    from cases import parallelize_and_measure

    from autotp.runtime import collectives

    out = {}
    for name in NAMES:
        model, x = build(name)
        r = parallelize_and_measure(rank, world, model, x)
        with collectives.counting() as n:
            model(*x).float().pow(2).mean().backward()
        r["counts"], r["plan"] = dict(n), r["plan"].to_text()
        out[name] = r
    model, x = build("RootGPT")  # training: 4 AdamW steps with clipping, losses and parameters against unsharded
    dense = copy.deepcopy(model)
    autotp.parallelize(model, world, example_inputs=x)
    losses = []
    for m in (dense, model):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        got = []
        for _ in range(4):
            loss = m(*x).pow(2).mean()
            loss.backward()
            (torch.nn.utils.clip_grad_norm_ if m is dense else autotp.clip_grad_norm_)(m.parameters() if m is dense
                                                                                        else m, 1.0)
            opt.step()
            opt.zero_grad()
            got.append(loss.item())
        losses.append(got)
    out["train"] = losses
    out["trained"] = max((model(*x) - dense(*x)).abs().max().item(), 0.0)
    again, x = build("RootGPT")  # the plan's text, read back and applied
    ref = copy.deepcopy(again)
    autotp.parallelize(again, world, plan=autotp.Plan.from_text(out["RootGPT"]["plan"]), example_inputs=x)
    out["reapplied"] = (again(*x) - ref(*x)).abs().max().item()
    return out


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return request.param, run_ranks(one, request.param, timeout=400)


@pytest.mark.parametrize("name", NAMES)
def test_exact_and_counted(results, name):
    tp, ranks = results
    for r in ranks:
        got = r[name]
        assert "error" not in got, got["error"]
        assert got["out_diff"] <= 1e-5 * max(1.0, got["out_scale"]), got
        assert got["grad_diff"] <= 1e-5 * max(1.0, got["grad_scale"]) and got["param_diff"] == 0, got
        assert got["fwd"] == got["rows"] + got["vocab"], got  # forward: one all-reduce per group and lookup
        assert got["local_params"] == got["ideal_params"] < got["total_params"], got
        assert got["counts"]["all_reduce.forward"] == got["fwd"], got["counts"]
    plan = ranks[0][name]["plan"]
    assert any(line.startswith("<root>") and " global " in line + " " for line in plan.splitlines()), plan
    assert "runs on DTensor activations" in plan, plan


def test_training_steps(results):
    _, ranks = results
    for r in ranks:
        dense, sharded = r["train"]
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(dense, sharded)), (dense, sharded)
        assert r["trained"] <= 1e-4, r["trained"]
        assert r["reapplied"] <= 1e-5, r["reapplied"]


def test_plan_lines_inside_a_global_module_are_refused():
    model, x = build("RootGPT")
    plan = autotp.make_plan(model, 2, example_inputs=x)
    assert "<root>  global" in plan.to_text()
    again = autotp.Plan.from_text(plan.to_text())
    assert again == plan  # the root's path reads back
    edited = autotp.Plan.from_text(plan.to_text() + "ln1  sum_grad p=weight\n")
    with pytest.raises(autotp.PlanMismatchError) as e:
        autotp.check_plan(model, edited, example_inputs=x)
    assert "'ln1' sum_grad lies inside '<root>', a global module" in str(e.value), str(e.value)
    assert "drop the line" in str(e.value), str(e.value)
