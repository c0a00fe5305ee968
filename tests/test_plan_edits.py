"""Plan files as an interface: a user's edit is applied exactly, a wrong edit is refused before any
weight is touched, naming the line and the fix. One spawned group (2 ranks) for the edits that run."""
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import autotp
from autotp import check_plan
from autotp.plan import Plan
from autotp.tools import cli
from autotp.tools.launch import run_ranks

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from cases import build as build_toy  # noqa: E402
from cases import measure
from hf_zoo import build  # noqa: E402

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def edit(text: str, path: str, body: str | None) -> str:
    """The plan text with the line for ``path`` replaced by ``path  body`` (None: the line dropped)."""
    lines, hit = [], False
    for line in text.splitlines():
        if line.split("#")[0].split()[:1] == [path]:
            hit = True
            if body is not None:
                lines.append(f"{path}  {body}")
            continue
        lines.append(line)
    assert hit, f"no line for {path}"
    return "\n".join(lines) + "\n"


def line_of(text: str, path: str) -> int:
    """The line number of ``path``'s line in a plan text."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.split("#")[0].split()[:1] == [path])


def stored(name: str) -> str:
    """The plan file under plans/ (byte-identical to a fresh plan: tests/test_hf.py checks it)."""
    return (Path(__file__).resolve().parent.parent / "plans" / f"{name}.tp2.plan").read_text()


def whole_attention_in_layer0(text: str) -> str:
    """The attention group narrowed to layer 1: layer 0's projections kept whole (both sides of the group)."""
    for p in ATTN:
        glob = f"model.layers.*.self_attn.{p}"
        body = re.search(rf"^{re.escape(glob)}\s+(\S.*?)\s*#", text, re.M).group(1)
        text = edit(text, glob, None) + f"model.layers.1.self_attn.{p}  {body}\n"
    return text


def replicated_mlp(text: str) -> str:
    for p in ("gate_proj", "up_proj", "down_proj"):
        text = edit(text, f"model.layers.*.mlp.{p}", "replicate")
    return text


EDITS = {  # name -> edit of Llama's fresh plan; each must still give the unsharded numbers
    "attention of layer 0 kept whole": whole_attention_in_layer0,
    "MLP groups replicated": replicated_mlp,
    "vocabulary kept whole": lambda t: edit(edit(t, "lm_head", "replicate"), "model.embed_tokens", "replicate"),
}


def edited_ranks(rank: int, world: int) -> dict:
    """Each edit applied by parallelize and measured against the unsharded model; a wrong edit refused."""
    import copy

    from autotp.capture.inputs import main_tensor

    transformers.logging.set_verbosity_error()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    out, text = {}, stored("llama")
    for name, fn in EDITS.items():
        model = build("llama")
        dense = copy.deepcopy(model)
        plan = Plan.from_text(fn(text), source="edited.plan")
        model = autotp.parallelize(model, world, plan=plan)
        out[name] = measure(rank, world, model, dense, plan, lambda m: main_tensor(m(input_ids=ids, use_cache=False)))
    model = build("llama")
    wrong = Plan.from_text(edit(text, "model.layers.*.self_attn.q_proj", "replicate"), "edited.plan")
    try:
        autotp.parallelize(model, world, plan=wrong)
        out["wrong"] = "applied"
    except autotp.PlanMismatchError as e:
        out["wrong"] = str(e)
    out["untouched"] = not any(isinstance(m, autotp.ColumnParallelLinear) for m in model.modules())
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(edited_ranks, 2, timeout=300)


@pytest.mark.parametrize("name", list(EDITS))
def test_edit_is_applied_exactly(ranks, name):
    full = ranks[0]["MLP groups replicated"]
    for res in ranks:
        r = res[name]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]), (name, r)
        assert r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, r)
        assert r["param_diff"] == 0.0 and r["local_params"] == r["ideal_params"], (name, r)
        assert r["fwd"] == r["rows"] + r["vocab"], (name, r)  # one all-reduce per group left, per sharded table
    assert ranks[0]["attention of layer 0 kept whole"]["rows"] == 3  # 2 MLP groups + layer 1's attention
    assert full["rows"] == 2 and full["local_params"] > ranks[0]["attention of layer 0 kept whole"]["local_params"]
    assert ranks[0]["vocabulary kept whole"]["vocab"] == 0 and ranks[0]["vocabulary kept whole"]["gathers"] == 0


def test_parallelize_refuses_a_wrong_edit_before_touching_weights(ranks):
    for res in ranks:
        assert "make 'model.layers.*.self_attn.q_proj' colwise too" in res["wrong"], res["wrong"]
        assert res["untouched"]


# ------------------------------------------------------------------ refused edits, one process


@pytest.fixture(scope="module")
def llama():
    return build("llama"), stored("llama")


def refusal(model, text: str, example_inputs=None) -> str:
    with pytest.raises(autotp.PlanMismatchError) as e:
        check_plan(model, Plan.from_text(text, source="edited.plan"), example_inputs=example_inputs)
    return str(e.value)


@pytest.mark.parametrize("path,body,words", [
    # one side of a group replicated: its partner's shards meet whole values
    ("model.layers.*.self_attn.o_proj", "replicate",
     ["('model.layers.*.self_attn.o_proj' replicate)", "kept whole but reads the output of line",
      "'model.layers.*.self_attn.q_proj' colwise", "make it rowwise"]),
    ("model.layers.*.mlp.up_proj", "replicate",
     ["aten.mul in 'model.layers.*.mlp'", "make 'model.layers.*.mlp.up_proj' colwise too"]),
    ("model.layers.*.mlp.down_proj", "colwise in=128 out=64 w=out_in",
     ["('model.layers.*.mlp.down_proj' colwise)", "is colwise but reads the output of"]),
    # the head's gather dropped: the logits would be sharded
    ("lm_head", "colwise in=64 out=256 w=out_in",
     ["line {line} ('lm_head' colwise) reaches the model's output", "add gather=1"]),
])
def test_one_sided_edit_is_refused(llama, path, body, words):
    model, text = llama
    msg = refusal(model, edit(text, path, body))
    assert all(w.format(line=line_of(text, path)) in msg for w in words), msg


def test_glob_narrowed_on_one_side_is_refused(llama):
    model, text = llama
    q = re.search(r"^model\.layers\.\*\.self_attn\.q_proj\s+(\S.*?)\s*#", text, re.M).group(1)
    text = edit(text, "model.layers.*.self_attn.q_proj", None) + f"model.layers.0.self_attn.q_proj  {q}\n"
    msg = refusal(model, text)
    assert "meets a replicated value at aten.scaled_dot_product_attention" in msg, msg
    assert "make 'model.layers.*.self_attn.q_proj' colwise too" in msg, msg


def test_fused_segments_sum_grad_and_patch_edits_are_refused():
    gpt2 = build("gpt2")
    text = stored("gpt2")
    msg = refusal(gpt2, text.replace(" seg=64,64,64", ""))
    assert "the model splits its output into [64, 64, 64]" in msg and "write seg=64,64,64" in msg, msg

    qwen3 = build("qwen3")
    text = stored("qwen3")
    msg = refusal(qwen3, edit(text, "model.layers.*.self_attn.q_norm", None))
    assert "add the line 'model.layers.*.self_attn.q_norm  sum_grad p=weight'" in msg, msg
    msg = refusal(qwen3, text + "model.layers.*.input_layernorm  sum_grad p=weight\n")
    assert "never meets a sharded value" in msg and "multiply it by tp" in msg, msg

    opt = build("opt")
    text = stored("opt")
    msg = refusal(opt, edit(text, "model.decoder.layers.*.self_attn", None))
    assert "needs a 'patch' or 'localize' line" in msg, msg


def test_slice_lines_are_checked():
    """Bloom's ALiBi (batch * heads) and MPT's position bias are sliced as they enter each block."""
    bloom, text = build("bloom"), stored("bloom")
    assert re.search(r"^transformer\.h\.\*\s+slice arg=alibi dim=0 size=4 merged=1\s", text, re.M), text
    msg = refusal(bloom, edit(text, "transformer.h.*", None))  # dropped: whole biases would meet sharded heads
    assert "aten.baddbmm in 'transformer.h.*.self_attention'" in msg, msg
    msg = refusal(bloom, text.replace("arg=alibi", "arg=alibii"))
    assert "receives no tensor argument 'alibii'" in msg and "correct or drop the line" in msg, msg
    msg = refusal(bloom, text.replace("size=4 merged=1", "size=3 merged=1"))
    assert "with 3 along dim 0" in msg, msg
    mpt, text = build("mpt"), stored("mpt")
    msg = refusal(mpt, edit(text, "transformer.blocks.*", None))
    assert "aten.add in 'transformer.blocks.*.attn'" in msg, msg
    check_plan(mpt, Plan.from_text(text))  # as planned: accepted


def test_sharding_before_a_norm_is_refused():
    model, x = build_toy("trap_norm")
    text = autotp.make_plan(model, 2, example_inputs=(x,)).to_text()
    text = edit(edit(text, "fc1", "colwise in=16 out=32 w=out_in"), "fc2", "rowwise in=32 out=16 w=out_in")
    msg = refusal(model, text, example_inputs=(x,))
    assert "line 8 ('fc1' colwise)" in msg and "aten.layer_norm in 'ln'" in msg, msg


@pytest.mark.parametrize("body,words", [
    ("colwsie in=64 out=64 w=out_in", ["edited.plan:{line}", "unknown style 'colwsie' (did you mean 'colwise'?)"]),
    ("colwise in=64 out=64 w=out_in gahter=1", ["edited.plan:{line}", "(did you mean 'gather=1'?)"]),
    ("colwise in=64 out=64 w=in_out", ["line {line} ", "Fix: write w=out_in"]),  # a square weight: same shape
])
def test_typo_names_the_line_and_the_fix(llama, body, words):
    model, text = llama
    q = "model.layers.*.self_attn.q_proj"
    with pytest.raises(autotp.AutoTPError) as e:
        check_plan(model, Plan.from_text(edit(text, q, body), source="edited.plan"))
    assert all(w.format(line=line_of(text, q)) in str(e.value) for w in words), str(e.value)


def test_path_typo_names_the_closest_module(llama):
    model, text = llama
    text = text.replace("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.gate_prj")
    with pytest.raises(autotp.PlanMismatchError, match=r"line \d+: 'model.layers.\*.mlp.gate_prj' matches no module .*"
                                                       r"closest: 'model.layers.\*.mlp.gate_proj'"):
        check_plan(model, Plan.from_text(text, source="edited.plan"))


def test_cli_check_refuses_a_wrong_plan_before_spawning(llama, tmp_path, capsys):
    _, text = llama
    path = tmp_path / "edited.plan"
    path.write_text(edit(text, "model.layers.*.mlp.down_proj", "replicate"))
    code = cli.main(["check", "llama", "--tp", "2", "--plan", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "'model.layers.*.mlp.down_proj' replicate" in err and "Traceback" not in err, err


def test_tied_head_line_deleted_is_refused():
    """A tied head without its line would compute with the table's vocabulary slice (logits vocab/tp wide)."""
    from hf_zoo import config

    cfg = config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = transformers.LlamaForCausalLM(cfg).eval()
    text = autotp.make_plan(tied, 2).to_text()
    check_plan(tied, Plan.from_text(text))  # the plan make_plan writes passes
    msg = refusal(tied, edit(text, "lm_head", None))
    for words in ("module 'lm_head' (no plan line) computes with", "tied to 'model.embed_tokens.weight'",
                  "('model.embed_tokens' vocab) shards that tensor", "'colwise ... gather=1'"):
        assert words in msg, msg


@pytest.mark.parametrize("patch,words", [
    ("__class__._version=7", ["has no integer attribute '__class__._version' of its own", "patchable: ["]),
    ("layer_idx=0", ["has layer_idx=1", "only sets a size to this rank's part"]),  # shape-neutral: breaks the cache
    ("config.num_attention_heads=3", ["has config.num_attention_heads=4", "which 3 is not"]),
    ("config.hidden_size=64", ["has config.hidden_size=64", "which 64 is not"]),
])
def test_patch_sets_only_what_the_planner_could_have(llama, patch, words):
    model, text = llama
    with pytest.raises(autotp.PlanMismatchError) as e:
        check_plan(model, Plan.from_text(text + f"model.layers.1.self_attn  patch {patch}\n", source="edited.plan"))
    for w in words:
        assert w in str(e.value), str(e.value)
    assert f"plan line {len(text.splitlines()) + 1} " in str(e.value)
