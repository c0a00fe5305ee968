"""Hugging Face coverage: real transformers modeling code, tiny seeded configs, spawned gloo ranks.

Per architecture: logits and gradients equal to the unsharded model, all-reduces per forward
as planned (at the optimum for the fully sharded ones), per-rank parameters = ideal, greedy
generate() with the KV cache token-identical, and the stored plan under plans/ byte-identical
to a fresh one (AUTOTP_REGEN=1 rewrites them). At tp=3 no size of the configs divides: every group is split
unevenly.
"""
import os
import sys

import pytest

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from hf_cases import coverage  # noqa: E402
from hf_zoo import ARCHS, ARCHS_TP3, ARCHS_TP4, OPTIMAL  # noqa: E402


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["tp2", "tp3", "tp4"])
def sweep(request):
    tp = request.param
    names = {2: ARCHS, 3: ARCHS_TP3, 4: ARCHS_TP4}[tp]
    return tp, names, run_ranks(coverage, tp, names, timeout=900)


def test_numerics_collectives_generate(sweep):
    tp, names, ranks = sweep
    bad = []
    for name in names:
        for rank, res in enumerate(ranks):
            r = res[name]
            if "error" in r:
                bad.append((name, rank, r["error"]))
                continue
            checks = {
                "out": r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]),
                "grad": r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]),
                "params sliced exactly": r["param_diff"] == 0.0,
                "same output on every rank": r["same_on_all"] <= 1e-5 * max(1.0, r["out_scale"]),
                "all-reduces = row layers + vocabulary lookups": r["fwd"] == r["rows"] + r["vocab"],
                "all-gathers = gathered heads": r["gathers"] == r["heads"],
                "backward at the optimum (one per distinct tensor a group reads, + heads, sums)":
                    r["bwd"] == r["bwd_optimum"],
                "per-rank params ideal": r["local_params"] == r["ideal_params"],
                "optimum": name not in OPTIMAL or (r["fwd"], r["gathers"]) == r["optimum"],
                "generate": r.get("generate_same", True),
                "plan file byte-identical": r.get("plan_same", True),
            }
            failed = [k for k, ok in checks.items() if not ok]
            if failed:
                bad.append((name, rank, failed, {k: r[k] for k in ("out_diff", "grad_diff", "fwd", "rows", "optimum", "bwd", "bwd_optimum")}))
    assert not bad, bad


def test_every_architecture_is_sharded(sweep):
    tp, names, ranks = sweep
    r0 = ranks[0]
    unsharded = [n for n in names if "error" not in r0[n] and r0[n]["rows"] == 0 and n not in ("albert", "olmoe")]
    assert not unsharded, unsharded
    assert len(names) >= {2: 40, 3: 6, 4: 8}[tp]
