"""transformers' tp_plan dicts: autotp plans exported for transformers' own tensor parallelism (on
architectures it has no plan for), transformers' plans imported into autotp. One spawned group."""
import copy
import json
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import autotp
from autotp.io.hf_plan import from_hf_tp_plan, hf_key, to_hf_tp_plan
from autotp.plan import Plan
from autotp.tools import cli
from autotp.tools.launch import run_ranks

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from cases import measure  # noqa: E402
from hf_zoo import build  # noqa: E402

PLANS = Path(__file__).resolve().parent.parent / "plans"

# BERT and BART: transformers has no plan for them; GLM: its fused gate|up exported as packed_colwise
EXPORTED = ["bert", "bart", "glm"]


def stored(name: str, tp: int = 2) -> Plan:
    """The plan under plans/ (byte-identical to a fresh plan: tests/test_hf.py checks it)."""
    return autotp.load_plan(PLANS / f"{name}.tp{tp}.plan")


def _inputs(model) -> dict:
    g = torch.Generator().manual_seed(1)
    kw = {"input_ids": torch.randint(3, 256, (2, 9), generator=g)}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.randint(3, 256, (2, 5), generator=g)
    return kw


def transformers_tp(model, tp_plan: dict, tp: int):
    """Shard ``model`` with transformers' own tensor parallelism driven by ``tp_plan``, as
    ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=tp, tp_plan=tp_plan))`` does."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.utils import initialize_distributed_mesh

    cfg = DistributedConfig(tp_size=tp, tp_plan=tp_plan)
    _, mesh = initialize_distributed_mesh(cfg)
    return type(model).maybe_distribute_model(model, cfg, mesh)


def hf_plan_ranks(rank: int, world: int, names: list[str], checkpoint: str) -> dict:
    """Exported plans run by transformers (also loading ``checkpoint``, a BERT, with from_pretrained);
    Llama's transformers plan run by autotp."""
    from transformers.distributed import DistributedConfig

    from autotp.capture.inputs import main_tensor

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out = {}
    for name in names:
        model = build(name)
        dense = copy.deepcopy(model)
        tp_plan = to_hf_tp_plan(stored(name), model)
        model = transformers_tp(model, tp_plan, world)
        kw = _inputs(model)
        with torch.no_grad():
            ref, fast = dense(**kw).logits, model(**kw).logits  # no_grad: transformers' local-tensor path
        grad_path = model(**kw).logits  # with autograd: its DTensor path
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
        out[name] = dict(diff=max((fast - ref).abs().max().item(), (grad_path - ref).abs().max().item()),
                         scale=ref.abs().max().item(), local=local, total=sum(p.numel() for p in dense.parameters()),
                         sharded=sum(1 for p in model.parameters() if hasattr(p, "to_local")))
    dense = build("bert")
    cfg = DistributedConfig(tp_size=world, tp_plan=to_hf_tp_plan(stored("bert"), dense))
    model = type(dense).from_pretrained(checkpoint, distributed_config=cfg).eval()
    with torch.no_grad():
        ref, got = dense(**_inputs(dense)).logits, model(**_inputs(dense)).logits
    out["bert from_pretrained"] = dict(diff=(got - ref).abs().max().item(), scale=ref.abs().max().item(),
                                       sharded=sum(1 for p in model.parameters() if hasattr(p, "to_local")))
    model = build("llama")
    dense = copy.deepcopy(model)
    plan = from_hf_tp_plan(model, model.tp_plan, world)
    model = autotp.parallelize(model, world, plan=plan)
    ids = _inputs(model)["input_ids"]
    out["llama"] = measure(rank, world, model, dense, plan, lambda m: main_tensor(m(input_ids=ids, use_cache=False)))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("bert")
    build("bert").save_pretrained(checkpoint)  # the same seeded weights the ranks build
    return run_ranks(hf_plan_ranks, 2, EXPORTED, str(checkpoint), timeout=400)


@pytest.mark.parametrize("name", EXPORTED)
def test_exported_plan_runs_in_transformers_tp(ranks, name):
    if name != "glm":
        assert not build(name).tp_plan, f"transformers now has a plan for {name}: pick another architecture"
    for res in ranks:
        r = res[name]
        assert r["diff"] <= 1e-5 * max(1.0, r["scale"]), (name, r)
        assert r["sharded"] > 0 and r["local"] < 0.6 * r["total"], (name, r)  # weights really sharded by transformers


def test_exported_plan_loads_with_from_pretrained(ranks):
    for res in ranks:
        r = res["bert from_pretrained"]
        assert r["diff"] <= 1e-5 * max(1.0, r["scale"]) and r["sharded"] > 0, r


def test_llama_transformers_plan_imported_and_run_by_autotp(ranks):
    for res in ranks:
        r = res["llama"]
        assert r["out_diff"] <= 1e-5 * max(1.0, r["out_scale"]) and r["grad_diff"] <= 1e-5 * max(1.0, r["grad_scale"])
        assert r["param_diff"] == 0.0 and r["local_params"] == r["ideal_params"], r
        assert (r["fwd"], r["gathers"]) == (5, 1), r  # 2 all-reduces per block + the vocabulary; logits gathered


# ------------------------------------------------------------------ import, one process


def rows(plan: Plan) -> dict:
    """Each line's style and parameters; group= is autotp's name for a column -> row pairing, which
    transformers' plans do not carry."""
    return {e.path: (e.style, tuple(kv for kv in e.params if kv[0] != "group")) for e in plan.entries}


def test_llama_import_agrees_with_our_plan():
    model = build("llama")
    imported = from_hf_tp_plan(model, model.tp_plan, 2)
    assert rows(imported) == rows(stored("llama"))
    assert "transformers tp_plan 'model.layers.*.self_attn.q_proj': 'colwise'" in imported.to_text()
    base = from_hf_tp_plan(model, model.config.base_model_tp_plan, 2)  # keys inside the base model
    assert {e.path for e in base.entries} == {p for p in rows(imported) if p.startswith("model.layers.")}


def test_import_maps_gathers_and_keeps_unknown_styles_whole():
    phi3 = build("phi3")
    got = rows(from_hf_tp_plan(phi3, phi3.tp_plan, 2))
    assert got["model.layers.*.self_attn.qkv_proj"] == ("colwise", (("in", "64"), ("out", "192"), ("w", "out_in"),
                                                                    ("gather", "1")))
    assert got["model.layers.*.self_attn.o_proj"][0] == "replicate"  # rowwise_split_input: same numbers, whole
    mixtral = build("mixtral")
    with pytest.warns(UserWarning, match=r"keeps these whole.*'model.layers.\*.mlp.experts': 'moe_tp_experts'"):
        got = rows(from_hf_tp_plan(mixtral, mixtral.tp_plan, 2))
    assert got["model.layers.*.mlp.experts"][0] == "replicate"
    assert got["model.layers.*.self_attn.o_proj"][0] == "rowwise"
    qwen3 = build("qwen3")
    got = rows(from_hf_tp_plan(qwen3, qwen3.tp_plan, 2))
    assert got["model.layers.*.self_attn.q_norm"] == ("sum_grad", (("p", "weight"),))


def test_import_refuses_unknown_styles_keys_and_wrong_plans():
    model = build("llama")
    plan = dict(model.tp_plan)
    with pytest.raises(autotp.PlanMismatchError) as e:
        typos = {"model.layers.*.mlp.up_proj": "colwize", "model.layers.*.mlp.upproj": "colwise"}
        from_hf_tp_plan(model, {**plan, **typos}, 2)
    msg = str(e.value)
    assert "'colwize' is not a transformers tensor-parallel style" in msg and "colwise_gather_output" in msg, msg
    assert "'model.layers.*.mlp.upproj' matches no module" in msg and "closest: 'model.layers.*.mlp.up_proj'" in msg
    del plan["model.layers.*.self_attn.o_proj"]  # q/k/v sharded, nothing closes their group
    with pytest.raises(autotp.PlanMismatchError, match=r"'model.layers.\*.self_attn.o_proj' has no plan line \(kept "
                                                       r"whole\) but reads the output of"):
        from_hf_tp_plan(model, plan, 2)


# ------------------------------------------------------------------ export, one process


def test_export_for_base_model_and_sum_grad():
    bert = build("bert")
    plan = stored("bert")
    full = to_hf_tp_plan(plan, bert)
    assert full["bert.encoder.layer.*.attention.self.query"] == "colwise"
    assert full["cls.predictions.decoder"] == "colwise_gather_output"
    assert full["bert.embeddings.word_embeddings"] == "embedding_rowwise"
    with pytest.warns(UserWarning, match="left out of base_model_tp_plan.*cls.predictions.decoder"):
        base = to_hf_tp_plan(plan, bert, base_model=True)
    assert base == {k.removeprefix("bert."): v for k, v in full.items() if k.startswith("bert.")}
    qwen3 = build("qwen3")
    got = to_hf_tp_plan(stored("qwen3"), qwen3)
    assert got["model.layers.*.self_attn.q_norm"] == "replicated_with_grad_allreduce"
    assert {k: v for k, v in got.items() if k in qwen3.tp_plan} == {k: v for k, v in qwen3.tp_plan.items() if k in got}


def test_export_refuses_what_transformers_cannot_express():
    gpt2 = build("gpt2")
    with pytest.raises(autotp.PlanMismatchError) as e:
        to_hf_tp_plan(stored("gpt2"), gpt2)
    msg = str(e.value)
    assert "('transformer.h.*.attn.c_attn' colwise seg=64,64,64)" in msg and "stored [in, out]" in msg, msg
    assert "patch split_size=32" in msg and "reshape with the global sizes" in msg, msg
    phi3 = build("phi3")
    with pytest.raises(autotp.PlanMismatchError, match=r"3 parts \[64, 64, 64\].*packed_colwise shards exactly 2"):
        to_hf_tp_plan(stored("phi3"), phi3)
    gqa = build("llama_gqa")  # 2 KV heads at tp=4: each held by 2 ranks
    with pytest.raises(autotp.PlanMismatchError, match="held by 2 ranks"):
        to_hf_tp_plan(stored("llama_gqa", 4), gqa)
    mpt = build("mpt")  # ALiBi sliced on its way into each block: transformers would add all of it
    with pytest.raises(autotp.PlanMismatchError, match="'position_bias' is sliced to this rank's heads"):
        to_hf_tp_plan(stored("mpt"), mpt)


def test_export_keeps_experts_whole_with_a_warning():
    mixtral = build("mixtral")
    experts = "model.layers.*.mlp.experts  experts n=4 col=gate_up_proj row=down_proj w=out_in seg=128,128\n"
    text = "".join(line + "\n" for line in stored("mixtral").to_text().splitlines()
                   if not line.startswith("model.layers.*.mlp.experts"))
    with pytest.warns(UserWarning, match=r"keeps these whole.*'model.layers.\*.mlp.experts' experts"):
        got = to_hf_tp_plan(Plan.from_text(text + experts), mixtral)
    assert not any("experts" in k for k in got) and got["model.layers.*.self_attn.o_proj"] == "rowwise"


def test_export_refuses_layers_planned_differently():
    model = build("llama")
    text = stored("llama").to_text()
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):  # layer 0's attention kept whole: exact, not expressible
        text += f"model.layers.0.self_attn.{p}  replicate\n"
    plan = Plan.from_text(text)
    with pytest.raises(autotp.PlanMismatchError) as e:
        to_hf_tp_plan(plan, model)
    msg = str(e.value)
    assert "'model.layers.*.self_attn.q_proj': its layers are planned differently" in msg, msg
    assert "kept whole: model.layers.0.self_attn.q_proj" in msg and "colwise: model.layers.1.self_attn.q_proj" in msg
    with pytest.raises(autotp.PlanMismatchError, match="'model.layers.0.self_attn.q_proj' names one layer"):
        to_hf_tp_plan(Plan(2, tuple(replace(e, path=e.path.replace("*", "0")) for e in stored("llama").entries)))
    assert hf_key("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"


# ------------------------------------------------------------------ command line


def test_cli_plan_format_hf_and_json_plans(tmp_path, capsys):
    assert cli.main(["plan", "llama", "--tp", "2", "--format", "hf"]) == 0
    exported = json.loads(capsys.readouterr().out)
    model = build("llama")
    assert exported == to_hf_tp_plan(stored("llama"), model)
    assert sorted(exported.items()) == sorted(model.tp_plan.items())  # what transformers' own Llama plan says
    path = tmp_path / "tp_plan.json"
    path.write_text(json.dumps(model.config.base_model_tp_plan))
    assert cli.main(["plan", "llama", "--tp", "2", "--plan", str(path)]) == 0
    assert Plan.from_text(capsys.readouterr().out) == from_hf_tp_plan(model, model.config.base_model_tp_plan, 2)
    assert cli.main(["show", "llama", "--tp", "2", "--plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "transformers tp_plan 'layers.*.mlp.down_proj': 'rowwise'" in out and "parameters per rank" in out, out
    path.write_text(json.dumps({"layers.*.self_attn.q_proj": "colwise"}))
    assert cli.main(["check", "llama", "--tp", "2", "--plan", str(path)]) == 2  # refused before any rank starts
    err = capsys.readouterr().err
    assert "meets a replicated value at aten.scaled_dot_product_attention" in err, err
    assert "make 'model.layers.*.self_attn.k_proj' colwise too" in err, err
    assert cli.main(["plan", "gpt2", "--tp", "2", "--plan", str(PLANS / "gpt2.tp2.plan"), "--format", "hf"]) == 2
    assert "cannot be written as a transformers tp_plan" in capsys.readouterr().err
