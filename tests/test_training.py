"""Training a parallelized model: 8 AdamW steps with gradient clipping equal the unsharded run (losses and
final parameters), and ranks that built different models are refused before anything is sharded."""
import copy
import os
import sys

import pytest

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))

STEPS, MAX_NORM = 8, 0.05  # a small max_norm: every step clips, by the same factor on every rank


def _train(model, batches, clip):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)  # built after parallelize
    losses, norms = [], []
    for ids in batches:
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(clip(model)))
        opt.step()
        losses.append(loss.item())
    return losses, norms


def training(rank: int, world: int, names: list) -> dict:
    import torch
    from cases import build

    import autotp
    from autotp.split import split_of

    out = {}
    for name in names:
        model, ids = build(name)
        dense = copy.deepcopy(model)
        model = autotp.parallelize(model, world, example_inputs=(ids,))
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 80, ids.shape, generator=g) for _ in range(STEPS)]
        want, want_norms = _train(dense, batches, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM))
        got, got_norms = _train(model, batches, lambda m: autotp.clip_grad_norm_(m, MAX_NORM))
        lines = model._autotp_plan.resolve(dict(dense.named_modules()).keys())
        ref = dict(dense.named_parameters())
        pdiff = max((p.detach() - split_of(lines.get(n.rpartition(".")[0]), n.rpartition(".")[2], world)
                     .take(ref[n].detach(), rank)).abs().max().item() for n, p in model.named_parameters())
        out[name] = dict(loss=max(abs(a - b) / abs(b) for a, b in zip(got, want)), norms=(got_norms, want_norms),
                         param_diff=pdiff, scale=max(p.abs().max().item() for p in dense.parameters()))
    return out


def seeds_differ(rank: int, world: int) -> str:
    import torch
    from models import MLPStack

    import autotp

    torch.manual_seed(rank)  # the mistake: every rank builds another model
    try:
        autotp.parallelize(MLPStack(), world, example_inputs=(torch.randn(2, 3, 32),))
    except autotp.RankError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("tp", [2, 4], ids=["tp2", "tp4"])
def test_adamw_with_clipping_equals_unsharded(tp):
    names = ["nanogpt", "llama_kv2"]  # tied vocabulary table + gathered head; KV heads on 2 ranks at tp=4
    for r in run_ranks(training, tp, names, timeout=400):
        for name in names:
            res = r[name]
            got, want = res["norms"]
            assert all(n > MAX_NORM for n in want), (name, want)  # clipping was active at every step
            assert max(abs(a - b) / b for a, b in zip(got, want)) < 1e-5, (tp, name, got, want)
            assert res["loss"] < 1e-5, (tp, name, res)
            assert res["param_diff"] <= 1e-5 * max(1.0, res["scale"]), (tp, name, res)


def test_ranks_that_built_different_models_are_refused():
    for msg in run_ranks(seeds_differ, 2, timeout=120):
        assert "differs between the ranks" in msg and "net.0.weight" in msg and "torch.manual_seed" in msg, msg
