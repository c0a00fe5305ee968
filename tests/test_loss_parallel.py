"""Vocabulary-parallel cross-entropy: inside ``autotp.loss_parallel()`` the LM head's logits stay sharded by
vocabulary; ``autotp.cross_entropy`` and transformers' own loss (``labels=``) give torch's loss and gradients,
with one all-gather of four numbers per position instead of the B x T x V logits. tp 2 and 4."""
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
transformers = pytest.importorskip("transformers")

CASES = [dict(), dict(ignore_index=-100), dict(label_smoothing=0.1), dict(reduction="sum"),
         dict(ignore_index=7, label_smoothing=0.2)]


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one(rank: int, world: int) -> dict:
    from hf_zoo import config

    import autotp
    from autotp.split import split_of_names

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config("llama"))
    dense = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    autotp.parallelize(model, world, example_inputs=dict(input_ids=ids))
    lines = model._autotp_plan.resolve(dict(dense.named_modules()).keys())
    out = {"cases": []}

    def compare(ref_grads, got_grads) -> float:
        worst = 0.0
        for n, g in got_grads.items():
            want = split_of_names([n], lines, world).take(ref_grads[n], rank)
            worst = max(worst, ((g - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
        return worst

    for kw in CASES:
        target = labels.clone()
        if kw.get("ignore_index", -100) != -100:  # another ignored id: -100 is then a class of its own
            target[target == -100] = 0
            target[1, 2:4] = kw["ignore_index"]
        dense.zero_grad()
        model.zero_grad()
        ref = F.cross_entropy(dense(input_ids=ids).logits.flatten(0, 1), target.flatten(), **kw)
        ref.backward()
        with autotp.count_collectives() as n, autotp.loss_parallel():
            logits = model(input_ids=ids).logits
            loss = autotp.cross_entropy(logits.flatten(0, 1), target.flatten(), **kw)
            loss.backward()
        out["cases"].append(dict(kw=kw, ref=ref.item(), got=loss.item(), grad=compare(_grads(dense), _grads(model)),
                                 counts=dict(n), sharded=type(logits).__name__))
    dense.zero_grad()
    model.zero_grad()  # transformers' own loss, labels= passed
    ref = dense(input_ids=ids, labels=labels).loss
    ref.backward()
    with autotp.loss_parallel():
        got = model(input_ids=ids, labels=labels).loss
        got.backward()
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    out["hf"] = dict(ref=ref.item(), got=got.item(), grad=compare(_grads(dense), _grads(model)))
    with torch.no_grad():  # outside the block, the logits are whole again
        out["after"] = (model(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max().item()
    out["vocab"], out["rows"] = model.config.vocab_size, ids.numel()
    return out


@pytest.fixture(scope="module", params=[2, 4])
def results(request):
    return request.param, run_ranks(one, request.param, timeout=300)


def test_autotp_cross_entropy_equals_torch(results):
    tp, ranks = results
    for r in ranks:
        for c in r["cases"]:
            assert c["sharded"] == "DTensor", c
            assert abs(c["got"] - c["ref"]) <= 1e-5 * abs(c["ref"]), c
            assert c["grad"] <= 1e-5, c
            # the head's gather replaced by one all-gather of 4 numbers per position: 4 * rows * tp floats
            assert c["counts"]["all_gather.forward"] == 1, c["counts"]
            assert c["counts"]["bytes.forward"] < r["rows"] * r["vocab"] * 4, c["counts"]


def test_transformers_loss_with_labels(results):
    _, ranks = results
    for r in ranks:
        h = r["hf"]
        assert abs(h["got"] - h["ref"]) <= 1e-5 * abs(h["ref"]) and h["grad"] <= 1e-5, h
        assert r["after"] <= 1e-5, r["after"]
