"""Activation checkpointing on a parallelized model: a user's ``torch.utils.checkpoint`` around blocks gives the
unsharded model's losses over AdamW steps and its first step's gradients at tp 2; the recomputed forward issues
its all-reduces again in backward (counted)."""
import copy
import os
import sys

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
STEPS = 3


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Checkpointed(nn.Module):
    """A user's model that checkpoints each block itself (in training only, as is usual)."""

    def __init__(self, d: int = 16, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 8)

    def forward(self, x):
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.training else b(x)
        return self.head(x)


def _train(model, batches, loss_of, counts=None):
    import autotp

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for i, b in enumerate(batches):
        opt.zero_grad()
        with autotp.count_collectives() as n:
            loss = loss_of(model, b)
            fwd = dict(n)
            loss.backward()
        if i == 0:
            model._first_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        if counts is not None and i == 0:
            counts.update(forward=fwd.get("all_reduce.forward", 0), total=n["all_reduce.forward"],
                          backward=n["all_reduce.backward"])
        opt.step()
        losses.append(loss.item())
    return losses


def _worst(dense_grads, model, rank, world) -> float:
    """The largest relative difference of the first step's gradients (this rank's slices)."""
    from autotp.split import split_of_names

    lines = model._autotp_plan.resolve(dense_grads["names"])
    worst = 0.0
    for n, g in model._first_grads.items():
        want = split_of_names([n], lines, world).take(dense_grads[n], rank)
        worst = max(worst, ((g - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    return worst


def user(rank: int, world: int) -> dict:
    import autotp

    torch.manual_seed(0)
    model = Checkpointed()
    dense = copy.deepcopy(model)
    batches = [torch.randn(4, 5, 16) for _ in range(STEPS)]
    model.eval()  # captured as it runs in inference; trained below with its checkpoints
    autotp.parallelize(model, world, example_inputs=(batches[0],))
    model.train()
    dense.train()

    def loss_of(m, x):
        return m(x).pow(2).mean()

    calls = [0]
    model.blocks[0].up.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    out = {"want": _train(dense, batches, loss_of)}
    names = list(dict(dense.named_modules()))
    counts: dict = {}
    out["got"] = _train(model, batches, loss_of, counts)
    out["counts"] = counts
    out["runs"] = calls[0]
    out["grads"] = _worst({"names": names, **dense._first_grads}, model, rank, world)
    return out


def _close(res):
    for r in res:
        for a, b in zip(r["want"], r["got"]):
            assert abs(a - b) <= 1e-5 * abs(a), (r["want"], r["got"])
        assert r["grads"] <= 1e-5, r["grads"]


def test_user_checkpoint_around_blocks():
    res = run_ranks(user, 2)
    _close(res)
    c = res[0]["counts"]
    assert res[0]["runs"] == 2 * STEPS  # each step's backward ran the block's column layer again
    # torch's checkpoint stops recomputing once it has what backward saved: before the row layer's all-reduce,
    # so checkpointing costs no communication here: 3 all-reduces forward, 3 backward
    assert c["forward"] == 3 and c["total"] == 3 and c["backward"] == 3, c
