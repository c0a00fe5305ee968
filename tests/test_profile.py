"""The profiler: collectives counted and timed per group, bytes from the activation sizes, times adding up.

One process group (tp=2) runs every case; the command line spawns its own.
"""
import os
import re
import sys

import pytest
import torch

import autotp
from autotp.planner.resolve import resolve
from autotp.runtime import collectives
from autotp.tools import cli, report
from autotp.tools.launch import run_ranks
from autotp.tools.profile import sized_inputs

sys.path.insert(0, os.path.dirname(__file__))
from models import GPT, GPTConfig, MLPStack, TinyLlama  # noqa: E402

B, T, C, V, LAYERS = 3, 12, 32, 96, 2  # nanoGPT: batch, positions, width, vocabulary, blocks
FLOAT = 4


def tiny_gpt():
    """MODEL 'test_profile:tiny_gpt' for the command line."""
    return GPT(GPTConfig(n_head=4, n_embd=C, vocab_size=V, n_layer=LAYERS)), (torch.randint(0, V, (B, T)),)


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def profile_cases(rank: int, world: int) -> dict:
    """nanoGPT forward+backward and TinyLlama forward at tp=``world``, with what the tests compare them to."""
    torch.manual_seed(0)
    gpt, (x,) = tiny_gpt()
    plan = autotp.make_plan(gpt, world, example_inputs=(x,))
    planned = {g for path, e in resolve(gpt, plan).items() if (g := report.group_of(e, path))}
    gpt = autotp.parallelize(gpt, world, plan=plan, example_inputs=(x,))
    hooks = _hooks(gpt)
    gpt_prof = autotp.profile(gpt, (x,), reps=3, warmup=1, backward=True)
    after = dict(hooks=_hooks(gpt), tally=collectives._TALLY[0], label=collectives._LABEL[0],
                 grads=sum(p.grad is not None for p in gpt.parameters()))
    llama, ids = TinyLlama(n_heads=8, n_kv_heads=4, dim=64, hidden=128), torch.randint(0, 80, (2, 10))
    llama = autotp.parallelize(llama, world, example_inputs=(ids,))
    llama_prof = autotp.profile(llama, ids, reps=5, warmup=1)
    return dict(gpt=gpt_prof, llama=llama_prof, hooks=hooks, after=after, planned=planned)


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(profile_cases, 2, timeout=300)


def test_collectives_per_group_and_in_total(ranks):
    for r in ranks:
        fwd, bwd = r["gpt"].forward, r["gpt"].backward
        blocks = {f"transformer.h.{i}.{m}" for i in range(LAYERS) for m in ("attn", "mlp")}
        assert {g.name for g in fwd.groups} == r["planned"] == blocks, fwd.rows  # report.group_of's names
        for g in (*fwd.groups, *bwd.groups):  # one all-reduce of the block's activations, each way
            assert g.collectives == 1 and g.bytes == B * T * C * FLOAT, g
        assert [g.layers for g in fwd.groups[:2]] == [("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"),
                                                      ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj")]
        vocab, head = fwd.row("transformer.wte"), fwd.row("lm_head")
        assert (vocab.kind, vocab.collectives, vocab.bytes) == ("vocab", 1, B * T * C * FLOAT), vocab
        assert (head.kind, head.collectives, head.bytes) == ("gather", 1, B * T * V * FLOAT), head  # gathered logits
        assert bwd.row("lm_head").bytes == B * T * C * FLOAT and bwd.row("transformer.wte").collectives == 0
        assert fwd.total.collectives == 2 * LAYERS + 2 and bwd.total.collectives == 2 * LAYERS + 1
        assert fwd.row("other").collectives == bwd.row("other").collectives == 0
        assert fwd.total.bytes == (2 * LAYERS + 1) * B * T * C * FLOAT + B * T * V * FLOAT


def test_every_group_has_compute_and_communication(ranks):
    for r in ranks:
        for p in (*r["gpt"].passes, *r["llama"].passes):
            for g in p.groups:
                assert g.compute_s > 0 and g.comm_s > 0 and 0 < g.comm_share < 1, (p.phase, g)
            assert p.row("other").compute_s >= 0, p.rows  # the units' regions do not overlap


def test_llama_groups_and_forward_only(ranks):
    p = ranks[0]["llama"]
    assert p.backward is None and p.tp == 2 and p.rank == 0 and p.reps == 5
    assert [(g.name, len(g.layers)) for g in p.forward.groups] == [
        ("layers.0.attn", 4), ("layers.0.mlp", 3), ("layers.1.attn", 4), ("layers.1.mlp", 3)]
    assert all(g.bytes == 2 * 10 * 64 * FLOAT for g in p.forward.groups)
    assert ranks[1]["llama"].rank == 1


def test_nothing_left_behind(ranks):
    for r in ranks:
        assert r["after"] == dict(hooks=r["hooks"], tally=None, label=None, grads=0), r["after"]


def test_table_and_summary(ranks):
    text = str(ranks[0]["gpt"])
    assert text.startswith("profile of GPT at tp=2, rank 0: per call, mean of 3"), text
    row = r"^transformer\.h\.1\.mlp\s+group\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+%\s+1\s+4\.5 KiB$"
    assert re.search(row, text, re.M), text
    assert re.search(r"^FORWARD .*^total\s+[\d.]+\s+[\d.]+\s+[\d.]+%\s+6\s.*^BACKWARD .*^total\s+[\d.]+\s+[\d.]+\s+"
                     r"[\d.]+%\s+5\s", text, re.M | re.S), text
    lines = ranks[0]["gpt"].summary().splitlines()
    assert len(lines) == 2 and lines[0].startswith("forward at tp=2 (rank 0, mean of 3): "), lines
    assert "in 6 collectives" in lines[0] and "communication" in lines[0]


def test_unsharded_model_has_no_collectives():
    model, x = MLPStack(), torch.randn(2, 5, 32)
    p = autotp.profile(autotp.parallelize(model, tp=1), x, reps=2, warmup=0, backward=True)
    assert p.tp == 1 and [r.name for r in p.forward.rows] == ["other"]
    for phase in p.passes:
        assert phase.total.collectives == 0 and phase.total.comm_s == 0 and phase.total.compute_s > 0
    with pytest.raises(ValueError, match="reps >= 1"):
        autotp.profile(model, x, reps=0)


def test_sized_inputs_tile_and_cut():
    ids = torch.arange(6).reshape(2, 3)
    (out,) = sized_inputs(MLPStack(), (ids,), batch=3, seq=5)
    assert out.tolist() == [[0, 1, 2, 0, 1], [3, 4, 5, 3, 4], [0, 1, 2, 0, 1]]
    assert sized_inputs(MLPStack(), {"x": ids}, batch=1)["x"].tolist() == [[0, 1, 2]]


def test_cli_profile(capsys):
    code = cli.main(["profile", "test_profile:tiny_gpt", "--tp", "2", "--batch", "2", "--seq", "8", "--reps", "2",
                     "--warmup", "1", "--backward"])
    out, err = capsys.readouterr()
    assert code == 0, (out, err)
    assert re.search(r"^transformer\.h\.0\.attn\s+group\s+2\s.*\s1\s+2\.0 KiB$", out, re.M), out  # 2 x 8 x 32 floats
    assert re.search(r"^forward at tp=2 \(rank 0, mean of 2\): .* in 6 collectives", out, re.M), out
    assert re.search(r"^backward at tp=2 \(rank 0, mean of 2\): .* in 5 collectives", out, re.M), out
