"""Bad input and faults between ranks: each is refused with a clear error on every rank, and the ranks stay in
step, so a later valid call works. One spawned 2-rank group runs every case in order."""
import os
import sys

import pytest

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
transformers = pytest.importorskip("transformers")


def faults(rank: int, world: int, hf_dir: str) -> dict:
    import datetime
    import time

    import torch
    import torch.distributed as dist
    from cases import build, error_of

    import autotp
    from autotp.runtime.ranks import all_ranks

    out = {}
    model, _ = build("nanogpt")
    out["tp_str"] = error_of(lambda: autotp.parallelize(model, tp="2"))
    out["tp_zero"] = error_of(lambda: autotp.parallelize(model, tp=0))
    only0 = dist.new_group([0])  # every rank creates it; rank 1 is not in it
    out["outside"] = error_of(lambda: autotp.parallelize(model, group=only0)) if rank == 1 else ""

    # ids outside the vocabulary: IndexError on every rank, as the dense model raises; the next call works
    dense, ids = build("nanogpt")
    out["dense_oob"] = error_of(lambda: dense(torch.full((1, 4), 96)))
    model, _ = build("nanogpt")
    autotp.parallelize(model, tp=world, example_inputs=(ids,))
    out["oob"] = error_of(lambda: model(torch.tensor([[1, 2, 96, 3]])))
    out["negative"] = error_of(lambda: model(torch.tensor([[1, -1]])))
    with torch.no_grad():
        out["after_oob"] = float((model(ids) - dense(ids)).abs().max())

    # one rank fails early in from_pretrained: both raise, naming the rank; the next valid call works on both
    bad = hf_dir if rank == 0 else hf_dir + "-missing"
    out["load_one_bad"] = error_of(lambda: autotp.from_pretrained(bad, tp=world))
    out["load_again"] = error_of(lambda: autotp.from_pretrained(hf_dir, tp=world))
    out["plan_one_bad"] = error_of(lambda: autotp.parallelize(build("nanogpt")[0], tp=world, example_inputs=(ids,),
                                                            plan=None if rank == 0 else "/nonexistent.plan"))
    m2, _ = build("nanogpt")
    autotp.parallelize(m2, tp=world, example_inputs=(ids,))
    with torch.no_grad():
        out["after_plan"] = float((m2(ids) - dense(ids)).abs().max())

    # a rank late beyond the group's own timeout (2 s here): the message gives that timeout, not the 600 s allowed
    short = dist.new_group(timeout=datetime.timedelta(seconds=2))
    t0 = time.monotonic()

    def late():
        with all_ranks(short, "a test step", 600.0):
            if rank == 1:
                time.sleep(3.5)
    out["late"] = error_of(late)
    out["late_s"] = time.monotonic() - t0
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from hf_zoo import build

    d = str(tmp_path_factory.mktemp("hf") / "llama")
    build("llama").save_pretrained(d)
    return run_ranks(faults, 2, d, timeout=240)


def test_tp_must_be_a_positive_int(ranks):
    for r in ranks:
        assert r["tp_str"].startswith("GroupError: tp='2' (str)") and "int('2')" in r["tp_str"], r["tp_str"]
        assert r["tp_zero"].startswith("GroupError: tp=0 (int)"), r["tp_zero"]


def test_a_rank_outside_the_group_is_told_so(ranks):
    msg = ranks[1]["outside"]
    assert msg.startswith("GroupError: this process (global rank 1) is not in the group passed as group=") and \
        "global ranks: [0]" in msg, msg


def test_out_of_range_ids_raise_as_the_dense_model_does(ranks):
    for r in ranks:
        assert r["dense_oob"].startswith("IndexError: index out of range in self"), r["dense_oob"]
        assert r["oob"].startswith("IndexError: index out of range in self") and "96 rows" in r["oob"] and \
            "[96]" in r["oob"], r["oob"]
        assert r["negative"].startswith("IndexError") and "[-1]" in r["negative"], r["negative"]
        assert r["after_oob"] < 1e-5, r  # the ranks stayed in step


def test_agreement_is_one_protocol(ranks):
    r0, r1 = ranks
    assert r1["load_one_bad"].startswith("CheckpointError") and "-missing" in r1["load_one_bad"], r1
    assert r0["load_one_bad"].startswith("RankError: rank 0: loading"), r0
    assert "failed on rank [1]" in r0["load_one_bad"], r0
    assert r0["load_again"] == r1["load_again"] == "no error", (r0["load_again"], r1["load_again"])
    assert r1["plan_one_bad"].startswith("PlanFormatError") and "/nonexistent.plan" in r1["plan_one_bad"], r1
    assert "parallelize (planning) failed on rank [1]" in r0["plan_one_bad"], r0
    assert r0["after_plan"] < 1e-5 and r1["after_plan"] < 1e-5


def test_rank_error_names_the_timeout_that_fired(ranks):
    r0, r1 = ranks
    assert r0["late"].startswith("RankError: rank 0: a test step: another rank exited, or did not finish within 2 s"), \
        r0["late"]
    assert r1["late"].startswith("RankError"), r1["late"]
    assert r0["late_s"] < 30 and r1["late_s"] < 30
