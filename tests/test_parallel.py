"""Multi-rank parity: outputs and gradients equal to the unsharded model, exact collective counts."""
import os
import sys

import pytest

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
from cases import CASES, parity  # noqa: E402

# expected groups (= all-reduces per forward and per backward) per model at any tp that divides it
EXPECTED = {"nanogpt": 4, "llama_gqa": 4, "llama_kv2": 4, "einsum": 2, "mlp": 2, "alibi": 2, "alibi_merged": 2,
            "trap_norm": 0, "trap_residual": 0, "trap_twice": 0, "trap_reduce": 0, "torch_encoder": 2, "mha_vit": 2,
            "last_block_differs": 4, "heads_last": 0, "trap_gate": 0,
            "root_heads": 1, "scale_from_size": 1}


LM = {"nanogpt", "llama_gqa", "llama_kv2"}  # token embedding + LM head: vocabulary-sharded
# backward all-reduces of a sliced argument that needs a gradient (the learned slopes): one per block
SLICED_GRADS = {"alibi": 2, "alibi_merged": 2}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def results(request):
    return request.param, run_ranks(parity, request.param, CASES, timeout=400)


@pytest.mark.parametrize("name", CASES)
def test_parity(results, name):
    tp, ranks = results
    for rank, res in enumerate(ranks):
        r = res[name]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (tp, rank, name, r)
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (tp, rank, name, r)
        assert r["param_diff"] == 0.0, (tp, rank, name, r)
        assert r["nograd_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (tp, rank, name, r)  # eval, no autograd
        assert r["same_on_all"] <= 1e-5 * max(1.0, r["out_scale"]), (tp, rank, name, r)


@pytest.mark.parametrize("name", CASES)
def test_collectives_and_memory(results, name):
    tp, ranks = results
    for res in ranks:
        r = res[name]
        # one all-reduce per group, + one per vocabulary-sharded lookup (token embedding); logits all-gathered
        assert r["rows"] == EXPECTED[name] and r["fwd"] == EXPECTED[name] + r["vocab"], (tp, name, r)
        assert r["vocab"] == r["gathers"] == r["heads"] == (1 if name in LM else 0), (tp, name, r)
        # + one gradient sum per layer whose KV heads are held by several ranks (llama_kv2 at tp=4),
        # + the input gradient of each all-gathered head
        assert r["bwd"] == EXPECTED[name] + r["shared_heads"] + r["heads"] + SLICED_GRADS.get(name, 0), (tp, name, r)
        assert r["bwd"] == r["bwd_optimum"], (tp, name, r)  # one per distinct tensor a group reads, counted
        assert r["shared_heads"] == (4 if name == "llama_kv2" and tp == 4 else 0), (tp, name, r)
        assert r["local_params"] == r["ideal_params"], (tp, name, r)
        if EXPECTED[name]:
            assert r["local_params"] < r["total_params"]


def test_tp_must_equal_group_size():
    from cases import bad_group_inputs

    r0, r1 = run_ranks(bad_group_inputs, 2, timeout=120)
    for res in (r0, r1):
        assert res["tp"].startswith("GroupError") and "tp=4" in res["tp"] and "2 ranks" in res["tp"], res
        assert res["plan_tp"].startswith("PlanMismatchError") and "tp=4" in res["plan_tp"], res
    # an error on one rank only: that rank raises it, the other is told at once instead of waiting in a collective
    assert r1["one_rank"].startswith("PlanMismatchError"), r1["one_rank"]
    assert r0["one_rank"].startswith("RankError") and "parallelize (planning) failed on rank [1]" in r0["one_rank"], r0["one_rank"]
    assert r0["one_rank_s"] < 60, r0


def dies_silently(rank: int, world: int) -> None:
    import time

    if rank == 1:
        os._exit(3)  # no result, no traceback: a segfault or an OOM kill looks like this
    time.sleep(120)


def test_a_rank_that_dies_without_a_result_fails_the_run_at_once():
    import time

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited \\(code 3\\) without a result"):
        run_ranks(dies_silently, 2, timeout=300)
    assert time.monotonic() - t0 < 60  # not the 300 s timeout
