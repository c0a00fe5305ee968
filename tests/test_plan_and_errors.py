"""Single-process tests: plan text, golden plans, slicing math, and every bad input."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import autotp
from autotp.plan import Plan
from autotp.planner.resolve import resolve
from autotp.runtime.layers import shard_tensor
from autotp.split import shard_ranges

sys.path.insert(0, os.path.dirname(__file__))
from cases import build  # noqa: E402
from models import HeadsModel  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_CASES = [(name, tp) for name in ("nanogpt", "llama_gqa", "llama_kv2", "einsum", "mlp", "alibi", "alibi_merged",
                                         "trap_norm", "trap_residual",
                                         "trap_twice", "trap_reduce") for tp in (2, 4)]


@pytest.mark.parametrize("name,tp", GOLDEN_CASES)
def test_golden_plan_is_byte_identical(name, tp):
    model, x = build(name)
    text = autotp.make_plan(model, tp, example_inputs=(x,)).to_text()
    path = GOLDEN / f"{name}.tp{tp}.plan"
    if os.environ.get("AUTOTP_REGEN"):
        path.write_text(text)
    assert path.read_text() == text, f"plan for {name} changed; regenerate with AUTOTP_REGEN=1 if intended"
    assert autotp.load_plan(path) == Plan.from_text(text)
    model2, _ = build(name)
    assert autotp.make_plan(model2, tp, example_inputs=(x,)).to_text() == text  # deterministic


def test_plan_round_trip(tmp_path):
    model, x = build("nanogpt")
    plan = autotp.make_plan(model, 2, example_inputs=(x,))
    plan.save(tmp_path / "p.plan")
    assert autotp.load_plan(tmp_path / "p.plan") == plan
    assert "transformer.h.*.attn.c_attn  colwise in=32 out=96 w=out_in seg=32,32,32" in plan.to_text()


def test_make_plan_on_meta_model():
    with torch.device("meta"):
        model, _ = build("llama_gqa")
    plan = autotp.make_plan(model, 4, example_inputs=(torch.randint(0, 80, (2, 8)),))
    styles = {e.path: e.style for e in plan.entries}
    assert styles["layers.*.attn.k_proj"] == "colwise" and styles["layers.*.mlp.down"] == "rowwise"


def test_slicing_math():
    assert shard_ranges(12, 1, 2, [4, 4, 4]) == [(2, 4), (6, 8), (10, 12)]
    t = torch.arange(12.0)
    assert shard_tensor(t, 0, 1, 2, [4, 4, 4]).tolist() == [2, 3, 6, 7, 10, 11]
    assert shard_tensor(t, 0, 0, 3).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="not divisible by tp=5"):
        shard_ranges(12, 0, 5)


# ---------------------------------------------------------------- bad input


def test_heads_not_divisible_lists_working_tp():
    """9 heads: tp=10 cannot give every rank a head, even unevenly; the error lists the tp values that work for every
    size involved and the non-strict way out."""
    with pytest.raises(autotp.ShardingError) as e:
        autotp.make_plan(HeadsModel(), 10, example_inputs=(torch.randn(2, 5, 36),))
    msg = str(e.value)
    assert "attn.qkv.*" in msg and "tp=10" in msg and "tp values that divide them all: [1, 3, 9]" in msg and "strict=False" in msg, msg
    plan = autotp.make_plan(HeadsModel(), 10, example_inputs=(torch.randn(2, 5, 36),), strict=False)
    assert all(e.style == "replicate" for e in plan.entries), plan.to_text()
    autotp.make_plan(HeadsModel(), 3, example_inputs=(torch.randn(2, 5, 36),))  # tp=3 works


def test_no_process_group():
    model, x = build("mlp")
    with pytest.raises(autotp.GroupError, match="init_process_group"):
        autotp.parallelize(model, 2, example_inputs=(x,))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = _DataDependent()

    def forward(self, x):
        return self.inner(self.fc(x))


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on data
            return x * 2
        return x


def test_untraceable_model_is_planned_by_pieces_naming_the_module():
    plan = autotp.make_plan(Untraceable(), 2, example_inputs=(torch.randn(2, 4),)).to_text()
    assert "# planned by pieces: the whole model cannot be captured" in plan and "in module 'inner'" in plan, plan
    assert "fc  replicate  # kept whole: alone it has nothing to pair with" in plan, plan


def test_untraceable_without_example_inputs_names_the_fix():
    with pytest.raises(autotp.CaptureError, match="no example_inputs: pass example_inputs="):
        autotp.make_plan(Untraceable(), 2)


def test_plan_for_another_model():
    plan = make_plan_for("nanogpt", 2)
    other, _ = build("llama_gqa")
    with pytest.raises(autotp.PlanMismatchError, match="matches no module of TinyLlama"):
        resolve(other, plan)


def test_plan_shape_mismatch():
    model, x = build("mlp")
    text = autotp.make_plan(model, 2, example_inputs=(x,)).to_text().replace("in=32 out=64", "in=32 out=48")
    with pytest.raises(autotp.PlanMismatchError, match=r"weight is \[64, 32\], the plan expects \[48, 32\]"):
        resolve(model, Plan.from_text(text))


@pytest.mark.parametrize("bad,match", [
    ("net.0  colwize in=32", "unknown style 'colwize'"),
    ("net.0  colwise in=x", "in=x must be a whole number"),
    ("net.0  colwise zz=1", "bad parameter 'zz=1'"),
    ("net.0  colwise in=32 out=64 w=out_in seg=30,30", "seg sizes add up to 60, not out=64"),
])
def test_malformed_plan_names_the_line(bad, match):
    text = "autotp-plan 1\ntp 2\n" + bad + "\n"
    with pytest.raises(autotp.PlanFormatError, match=match) as e:
        Plan.from_text(text, source="my.plan")
    assert "my.plan:3" in str(e.value)


def test_not_a_plan_file(tmp_path):
    (tmp_path / "x.plan").write_text("hello\n")
    with pytest.raises(autotp.PlanFormatError, match="not an autotp plan"):
        autotp.load_plan(tmp_path / "x.plan")


def make_plan_for(name, tp):
    model, x = build(name)
    return autotp.make_plan(model, tp, example_inputs=(x,))


# ---------------------------------------------------------------- vocabulary: tied tables, edited plans


def _tied_gpt_plan_text():
    model, x = build("nanogpt")  # its token embedding and LM head share one table
    return model, autotp.make_plan(model, 2, example_inputs=(x,)).to_text()


def test_tied_table_is_sliced_once_and_stays_tied():
    from autotp.runtime.apply import swap_layers

    model, text = _tied_gpt_plan_text()
    assert "transformer.wte              vocab rows=96 dim=32" in text and "gather=1" in text
    dense = model.transformer.wte.weight.detach().clone()
    swap_layers(model, resolve(model, Plan.from_text(text)), rank=1, tp=2, group=None)
    assert model.lm_head.weight is model.transformer.wte.weight  # still one parameter
    assert torch.equal(model.lm_head.weight, dense[48:])  # rank 1 holds rows 48..95
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build("nanogpt")[0].parameters())


def test_edit_that_unties_a_table_is_refused():
    from autotp.runtime.apply import swap_layers

    model, text = _tied_gpt_plan_text()
    text = text.replace("transformer.wte              vocab", "transformer.wte              replicate")
    with pytest.raises(autotp.PlanMismatchError, match="tied parameters must be sharded the same way"):
        swap_layers(model, resolve(model, Plan.from_text(text)), rank=0, tp=2, group=None)


def test_vocab_line_checked_against_the_table():
    model, text = _tied_gpt_plan_text()
    with pytest.raises(autotp.PlanMismatchError, match=r"no 'weight' table of shape \[100, 32\]"):
        resolve(model, Plan.from_text(text.replace("vocab rows=96", "vocab rows=100")))
    with pytest.raises(autotp.PlanMismatchError, match=r"no 'weight' table"):
        resolve(model, Plan.from_text(text.replace("transformer.wte              vocab",
                                                   "transformer.ln_f             vocab")))
    with pytest.raises(autotp.ShardingError, match="96 rows are not divisible by tp=5"):
        resolve(model, Plan.from_text("autotp-plan 1\ntp 5\ntransformer.wte  vocab rows=96 dim=32\n"))


def test_hf_heads_not_divisible_lists_working_tp():
    """Real HF modeling code: 6 heads (3 KV heads) at tp=7 is refused (more ranks than heads), naming the sizes and
    the tp that work; at tp=4 the queries are spread 2,2,1,1, the last KV head on both its queries' ranks"""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=6,
                                   num_key_value_heads=3, head_dim=16, vocab_size=240)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(autotp.ShardingError) as e:
        autotp.make_plan(model, 7)
    msg = str(e.value)
    assert "tp=7" in msg and "self_attn.q_proj" in msg and "[3, 6, 48, 96]" in msg and "divide them all: [1, 3]" in msg, msg
    assert "rep=2 group=model.layers.*.self_attn split=2,2,1,1" in autotp.make_plan(model, 4).to_text()
    assert "colwise" in autotp.make_plan(model, 3).to_text()  # tp=3 divides 6 heads and 3 KV heads


def test_binary_file_or_directory_is_not_a_plan(tmp_path):
    (tmp_path / "x.plan").write_bytes(bytes(range(256)))
    with pytest.raises(autotp.PlanFormatError, match="is not a plan file: it is not text"):
        autotp.load_plan(tmp_path / "x.plan")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.tp2.plan").write_text("autotp-plan 1\ntp 2\n")
    with pytest.raises(autotp.PlanFormatError, match=r"is a directory, not a plan file \(it holds \['a.tp2.plan'\]\)"):
        autotp.load_plan(tmp_path / "sub")
