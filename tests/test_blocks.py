"""Repeated blocks planned once: the plan equals planning every block, and reuse is refused when unsound."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn

import autotp
from autotp.api import analyse
from autotp.planner import blocks
from autotp.planner.resolve import resolve

sys.path.insert(0, os.path.dirname(__file__))
from models import GPT, GPTConfig, TinyLlama  # noqa: E402

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
BASE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def llama(layers: int = 7):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**BASE, num_hidden_layers=layers))


def odd_llama():
    """Seven Llama blocks; block 3's MLP is narrower (its own structural class, planned on its own)."""
    m = llama()
    cfg = copy.deepcopy(m.config)
    cfg.intermediate_size = 96
    m.model.layers[3].mlp = type(m.model.layers[3].mlp)(cfg)
    return m


class MLPBlock(nn.Module):
    """A residual MLP block."""

    def __init__(self, d=32):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class PositionDependent(nn.Module):
    """Identical blocks, but the loop treats block 2 differently (a cumsum over its features, which cannot be
    sharded): the prefix's copies disagree, so every block is planned."""

    def __init__(self, n=6, d=32):
        super().__init__()
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(n)])

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            h = b.up(x)
            x = x + b.down(h.cumsum(-1) if i == 2 else torch.relu(h))
        return x


CASES = {
    "llama7": (llama, None),
    "llama7_odd_block": (odd_llama, None),
    "gemma2_alternating": (lambda: transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(**BASE, head_dim=16, num_hidden_layers=7)), None),
    "t5_first_block_differs": (lambda: transformers.T5ForConditionalGeneration(
        transformers.T5Config(d_model=64, d_ff=128, num_layers=6, num_heads=4, d_kv=16, vocab_size=256)), None),
    "opt_patched": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=6, num_attention_heads=4, vocab_size=256,
        word_embed_proj_dim=64)), None),
    "nanogpt_localized": (lambda: GPT(GPTConfig(n_layer=6, n_head=4, n_embd=32)),
                          (torch.randint(0, 96, (2, 12)),)),
    "position_dependent": (PositionDependent, (torch.randn(2, 5, 32),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_reused_plan_equals_planning_every_block(name):
    build, x = CASES[name]
    model = build()
    fast = autotp.make_plan(model, 2, example_inputs=x, reuse_blocks=True)
    full = analyse(model, 2, example_inputs=x).plan
    assert fast.to_text() == full.to_text()  # lines, order, reasons and the summary's counts
    assert len(dict(model.named_modules())) == len(dict(build().named_modules()))  # the cut was undone


def test_cuts_of_a_deep_llama():
    (cut,) = blocks.find_cuts(llama(7))
    assert (cut.path, cut.keep, cut.total, cut.pairs) == ("model.layers", 3, 7, [(1, 2)])
    assert cut.twin == {3: 2, 4: 2, 5: 2, 6: 2} and cut.weight(2) == 5 and cut.weight(0) == 1
    (cut,) = blocks.find_cuts(odd_llama())  # the odd block 3 must be in the prefix: planned itself
    assert cut.keep == 4 and 3 not in cut.twin and cut.twin == {4: 2, 5: 2, 6: 2}


def test_no_cut_when_blocks_share_parameters_or_are_few():
    m = llama(7)
    m.model.layers[5].mlp.up_proj.weight = m.model.layers[1].mlp.up_proj.weight
    assert blocks.find_cuts(m) == []
    assert blocks.find_cuts(llama(3)) == []
    assert blocks.find_cuts(TinyLlama(n_layers=3)) == []


def test_position_counters_are_ignored_other_attributes_are_not():
    m = llama(7)
    assert all(layer.self_attn.layer_idx == i for i, layer in enumerate(m.model.layers))  # differs, ignored
    assert blocks.find_cuts(m)[0].keep == 3
    m.model.layers[5].self_attn.scaling = 0.5  # a real difference: block 5 is its own class
    (cut,) = blocks.find_cuts(m)
    assert cut.keep == 6 and 5 not in cut.twin


def test_deep_meta_model_plans_from_a_prefix():
    """A 24-layer model on meta plans from 3 blocks; the plan covers all 24 and counts them."""
    with torch.device("meta"):
        m = llama(24)
    plan = autotp.make_plan(m, 2, reuse_blocks=True)
    assert "48 groups; all-reduces per forward: 49 (1 for vocabulary lookups); all-gathers: 1" in plan.summary
    resolved = resolve(m, plan)
    assert sum(e.style == "rowwise" for e in resolved.values()) == 48
    assert resolved["model.layers.23.mlp.down_proj"].style == "rowwise"


def test_a_parent_that_treats_a_later_block_differently_gets_every_block_planned():
    """The loop reads block 4's ``up`` itself (``if i == self.last``): planned on blocks 0-2 and extended, block 4
    would be sharded under a value the parent reduces. make_plan proves the extended plan on the whole graph,
    finds that, and plans every block."""
    from models import LastBlockDiffers

    model, x = LastBlockDiffers(), torch.randn(2, 3, 32)
    plan = autotp.make_plan(model, 2, example_inputs=(x,), reuse_blocks=True)
    assert plan.to_text() == autotp.make_plan(model, 2, example_inputs=(x,)).to_text()
    lines = plan.resolve(dict(model.named_modules()).keys())
    assert [lines[f"blocks.{i}.up"].style for i in range(5)] == ["colwise"] * 4 + ["replicate"], plan.to_text()
    autotp.check_plan(model, plan, example_inputs=(x,))
