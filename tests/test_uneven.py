"""Uneven shards: tp that does not divide a head count, a KV-group count, an MLP width or a vocabulary.

The planner cuts such a group into whole units (heads, KV groups with their queries, blocks of features, rows) and
gives rank r ``split[r]`` of them; every layer, the lookups, the gathered logits and the patches follow. Each case:
outputs and every gradient equal to the unsharded model, all-reduces per forward at the plan's count, and each
rank holding exactly its planned share of the parameters.
"""
import os
import sys

import pytest
import torch

import autotp
from autotp.tools.launch import run_ranks

sys.path.insert(0, os.path.dirname(__file__))
transformers = pytest.importorskip("transformers")


def llama(heads=9, kv=3, hidden=160, vocab=101, tie=False):
    """A Llama whose sizes tp rarely divides: 9 heads in 3 KV groups, MLP width 160, 101 vocabulary rows."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=heads * 8, intermediate_size=hidden, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, vocab_size=vocab,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(heads=12, vocab=101):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=heads * 4, n_head=heads, n_layer=2, vocab_size=vocab, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def nanogpt(heads=6):
    from models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_head=heads, n_embd=heads * 8, vocab_size=97))


def lines(plan):
    return {e.path: e for e in plan.entries}


# ---------------------------------------------------------------- plans (no ranks)


def test_heads_split_with_their_kv_groups():
    """9 heads in 3 KV groups at tp=2: 3 units (a KV head and its 3 queries) held 2,1; the MLP splits evenly; the
    101-row vocabulary and its head split by rows, 51,50."""
    got = lines(autotp.make_plan(llama(), 2))
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        e = got[f"model.layers.*.self_attn.{leaf}"]
        assert e.get("split") == "2,1", e
    assert "tp=2 does not divide 9" in got["model.layers.*.self_attn.q_proj"].reason
    assert got["model.layers.*.mlp.up_proj"].get("split") is None
    assert got["model.embed_tokens"].get("split") == "51,50" and got["model.embed_tokens"].style == "vocab"
    assert got["lm_head"].get("split") == "51,50" and got["lm_head"].get("gather") == "1"


def test_mlp_width_split_in_blocks_of_features():
    """Width 160 at tp=3: blocks of 8 features (no multiple of 64 divides 160), 20 blocks held 7,7,6."""
    got = lines(autotp.make_plan(llama(), 3))
    assert got["model.layers.*.mlp.down_proj"].get("split") == "7,7,6", got["model.layers.*.mlp.down_proj"]
    assert got["model.layers.*.self_attn.q_proj"].get("split") is None  # 9 heads, 3 KV heads: even at tp=3


def test_kv_heads_fewer_than_ranks():
    """9 heads in 3 KV groups at tp=4 (SmolLM2's layout): a group's queries stay on ranks of their own, its KV
    head held by each of them (rep=3 units per head); the per-rank KV group size patched."""
    got = lines(autotp.make_plan(llama(), 4))
    assert got["model.layers.*.self_attn.q_proj"].get("split") == "2,1,3,3"
    k = got["model.layers.*.self_attn.k_proj"]
    assert (k.get("split"), k.get("rep")) == ("2,1,3,3", "3"), k
    assert got["model.layers.*.self_attn"].params == (("num_key_value_groups", "2,1,3,3"),)
    q = lines(autotp.make_plan(llama(heads=14, kv=2), 4))  # Qwen2.5-0.5B's layout
    assert q["model.layers.*.self_attn.v_proj"].get("split") == "4,3,4,3", q["model.layers.*.self_attn.v_proj"]


def test_twelve_heads_at_tp5():
    got = lines(autotp.make_plan(gpt2(), 5))
    assert got["transformer.h.*.attn.c_attn"].get("split") == "3,3,2,2,2", got["transformer.h.*.attn.c_attn"]
    assert got["transformer.h.*.attn.c_proj"].get("split") == "3,3,2,2,2"


def test_gpt2_vocabulary_50257_is_split_not_replicated():
    """GPT-2's 50257 rows at tp=2: the table and its tied head split 25129,25128, so each rank holds about half the
    parameters (planned on the meta device, counted from the plan's own split of every parameter)."""
    from autotp.split import split_of

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=50257, n_positions=64)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    plan = autotp.make_plan(model, 2)
    got = lines(plan)
    assert got["transformer.wte"].get("split") == "25129,25128" and got["transformer.wte"].style == "vocab", got
    where = plan.resolve(dict(model.named_modules()).keys())
    total = sum(p.numel() for p in model.parameters())
    for rank in (0, 1):
        held = sum(torch.Size(split_of(where.get(n.rpartition(".")[0]), n.rpartition(".")[2], 2)
                              .local_shape(p.shape, rank)).numel() for n, p in model.named_parameters())
        assert 0.49 < held / total < 0.52, (rank, held / total)


def test_edited_split_is_checked():
    """A split the group does not share, or one naming another number of ranks, is refused naming the line."""
    model = llama()
    text = autotp.make_plan(model, 2).to_text()
    odd = text.replace("o_proj  rowwise in=72 out=72 w=out_in group=model.layers.*.self_attn split=2,1",
                       "o_proj  rowwise in=72 out=72 w=out_in group=model.layers.*.self_attn split=1,2")
    assert odd != text
    with pytest.raises(autotp.PlanMismatchError, match=r"split=2,1, the line says split=1,2"):
        autotp.check_plan(model, autotp.Plan.from_text(odd))
    three = text.replace("split=51,50", "split=34,34,33")
    with pytest.raises(autotp.PlanMismatchError, match=r"names 3 ranks, the plan is for tp=2"):
        autotp.check_plan(model, autotp.Plan.from_text(three))
    with pytest.raises(autotp.PlanFormatError, match=r"split=5,x must be"):
        autotp.Plan.from_text(text.replace("split=51,50", "split=5,x", 1))


# ---------------------------------------------------------------- numbers (spawned ranks)


def _cases(world: int) -> list[str]:
    return {2: ["llama", "llama_tied", "nanogpt"], 3: ["llama", "mlp_wide"], 4: ["llama", "qwen"]}[world]


def _build(name: str):
    if name == "llama":
        return llama(), None
    if name == "llama_tied":
        return llama(tie=True), None
    if name == "qwen":  # Qwen2.5-0.5B's layout: 14 heads, 2 KV heads; at tp=4 each KV head on 2 ranks, queries 4,3
        return llama(heads=14, kv=2, vocab=131), None
    if name == "nanogpt":  # 5 heads; the reference code's own reshapes (C // n_head) localized at each rank's share
        return nanogpt(5), (torch.randint(0, 97, (3, 12)),)
    if name == "mlp_wide":  # a width of 1000 (no block of 64 divides it; 125 blocks of 8)
        from models import MLPStack

        torch.manual_seed(0)
        return MLPStack(dim=32, hidden=1000), (torch.randn(3, 7, 32),)
    raise KeyError(name)


def uneven(rank: int, world: int) -> dict:
    import copy

    from cases import parallelize_and_measure

    out = {}
    for name in _cases(world):
        model, x = _build(name)
        dense = copy.deepcopy(model)
        r = parallelize_and_measure(rank, world, model, x)
        if "error" in r:
            out[name] = r
            continue
        plan = r.pop("plan")
        r["split_lines"] = sum(1 for e in plan.entries if e.get("split"))
        r["replicated"] = [f"{e.path}: {e.reason}" for e in plan.entries if e.style == "replicate"]
        if hasattr(model, "generate"):
            ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = dense.generate(ids, max_new_tokens=6, do_sample=False)
                got = model.generate(ids, max_new_tokens=6, do_sample=False)
            r["generate_same"] = bool(torch.equal(ref, got))
        out[name] = r
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_uneven_numerics(tp):
    ranks = run_ranks(uneven, tp, timeout=400)
    for name in _cases(tp):
        for rank, res in enumerate(ranks):
            r = res[name]
            assert "error" not in r, (name, rank, r)
            assert r["split_lines"] > 0 and not r["replicated"], (name, r["replicated"])
            assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (name, rank, r["out_diff"])
            assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, rank, r["grad_diff"])
            assert r["param_diff"] == 0.0, (name, rank)
            assert r["fwd"] == r["rows"] + r["vocab"] and r["gathers"] == r["heads"], (name, rank, r)
            assert r["bwd"] == r["bwd_optimum"], (name, rank, r["bwd"], r["bwd_optimum"])
            assert r["local_params"] == r["ideal_params"] < r["total_params"], (name, rank, r)
            assert r.get("generate_same", True), (name, rank)
        shares = [res[name]["local_params"] for res in ranks]
        assert len(set(shares)) > 1, (name, shares)  # the split is uneven: rank 0 holds more
