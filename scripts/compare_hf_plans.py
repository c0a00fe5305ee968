"""Regenerate docs/hf_plan_comparison.md: our plans/<arch>.tp2.plan against transformers' own tensor-parallel plans.

    python scripts/compare_hf_plans.py    # about 10 s: builds each tiny model of tests/hf_zoo.py, runs nothing
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hf_zoo import ARCHS, build  # noqa: E402

from autotp.plan import glob_of, load_plan  # noqa: E402

# Both vocabularies mapped to one: what each rank holds of the module and what it does with the output.
HF_ROLE = {"colwise": "column", "packed_colwise": "column", "colwise_gather_output": "column+gather",
           "colwise_rep": "column+gather", "rowwise": "row", "rowwise_split_input": "row", "rowwise_rep": "row",
           "embedding_rowwise": "embedding-vocab", "embedding_colwise": "embedding-hidden", "replicate": "replicate",
           "replicated_with_grad_allreduce": "replicate+grad-sum", "moe_tp_experts": "experts-sliced"}
OUR_ROLE = {"colwise": "column", "rowwise": "row", "replicate": "replicate", "sum_grad": "replicate+grad-sum",
            "vocab": "embedding-vocab"}
NOT_SHARDED = {"replicate", "replicate+grad-sum"}
AUX = {"patch", "localize"}  # adjust a module's forward to local sizes; no sharding decision of their own

WHY = {
    ("embedding-vocab", "replicate"):
        "transformers shards the input embedding by vocabulary rows (`embedding_rowwise`: each rank looks up its "
        "slice of the vocabulary, the partial lookups are summed by one all-reduce); our plans keep it "
        "replicated. transformers' plan is richer here: each rank holds 1/tp of the table. transformers adds "
        "this rule itself for any base model with a plan and an `embed_tokens` attribute, so GPT-NeoX "
        "(`embed_in`) gets none.",
    ("column+gather", "replicate"):
        "transformers shards the projection column-wise and all-gathers its output (`colwise_gather_output`), so "
        "every rank continues with the full tensor; we replicate it. On `lm_head` our reason is 'the model's "
        "output would be sharded' (the logits are the model's output); on OLMo-2/OLMoE attention it is the "
        "q/k norms that reduce over all heads. transformers' plan is richer here: the weights are sharded, at "
        "the cost of an all-gather per projection; the computation after the gather is still done in full on "
        "every rank.",
    ("row", "replicate"):
        "the row half of the gathered attention above (`rowwise_split_input`: the gathered input is sliced "
        "locally, the partial products all-reduced); we replicate it, so transformers shards weights we keep "
        "whole.",
    ("column+gather", "column"):
        "transformers gathers the output of a fused projection (`qkv_proj`, `gate_up_proj`) and lets the next "
        "`rowwise_split_input` slice it again: a column shard of a packed q|k|v or gate|up output would hand each "
        "rank a mix of segments. We shard each segment (`seg=`), keep the output sharded and patch the head "
        "counts where needed, so attention and the activation run on local features and the pair costs one "
        "all-reduce instead of an all-gather plus an all-reduce. Our plan is richer here.",
    ("experts-sliced", "replicate"):
        "transformers shards every expert (`moe_tp_experts` on the experts module, `packed_colwise` on its 3-D "
        "`gate_up_proj` parameter, `rowwise` on its `down_proj`; the experts' partial outputs are all-reduced); our "
        "plans keep expert weights stored as 3-D parameters replicated. transformers' plan is richer here "
        "(with ep_size > 1 transformers dispatches experts to ranks instead).",
    ("replicate", "replicate+grad-sum"):
        "we all-reduce the gradient of a replicated parameter applied to sharded features. On HunYuan this "
        "follows from sharding attention that transformers' plan leaves whole (its q/k norms then see local "
        "heads only). On Apertus transformers shards `up_proj` column-wise too, but has no rule for the xIELU "
        "activation after it: its scalar `alpha_p`/`alpha_n` see only the local features, so under that plan "
        "each rank keeps a partial gradient that nothing sums. Our plan is more complete here.",
}
ONLY_WE = ("**Only we shard.** No rule in transformers' plan matches these modules, so it keeps them replicated; "
           "our plans shard them: everything we shard in the architectures without a transformers plan, the whole "
           "decoder of HunYuan (its class has only the `lm_head` rule and its config no `base_model_tp_plan`), "
           "and Qwen2-MoE's `shared_expert` (transformers' rules name `mlp.gate_proj`, which exists only in dense "
           "layers).")
AGREE = ("**Counted as agreement.** `colwise`/`rowwise` on both sides; `packed_colwise` and our `colwise seg=`; "
         "`replicated_with_grad_allreduce` and our `sum_grad` (both keep a norm weight that scales sharded heads "
         "replicated and all-reduce its gradient, e.g. Qwen3's `q_norm`/`k_norm`); a module we replicate "
         "explicitly that transformers' plan leaves out (e.g. MoE routers); once our plans write them, `vocab` "
         "and `embedding_rowwise`, and `colwise gather=1` and `colwise_gather_output`. Our `patch`/`localize` "
         "lines are left out of the comparison: they set the local sizes a sharded module's forward needs.")


def our_role(e) -> str:
    return "column+gather" if e.style == "colwise" and e.get("gather") == "1" else OUR_ROLE.get(e.style, e.style)


def compare(name: str):
    """The model, whether transformers has a plan for it, and {glob: (HF role, our role)} over what either names."""
    model = build(name)
    hf_plan = model.tp_plan or {}
    plan = load_plan(ROOT / "plans" / f"{name}.tp2.plan")
    modules = [m for m, _ in model.named_modules() if m]
    ours = plan.with_entries(e for e in plan.entries if e.style not in AUX).resolve(modules, type(model).__name__)
    # a rule on a parameter counts on its own unless its module has a rule too (MoE experts: one row)
    names = modules + [p for p, _ in model.named_parameters()
                       if glob_of(p) in hf_plan and glob_of(p.rpartition(".")[0]) not in hf_plan]
    roles = {}
    for m in names:
        hf, us = hf_plan.get(glob_of(m)), ours.get(m)
        if hf or us:
            roles[glob_of(m)] = (HF_ROLE.get(hf, hf) if hf else "replicate", our_role(us) if us else "replicate")
    return model, bool(hf_plan), roles


def short(glob: str, prefix: str) -> str:
    return glob.rpartition("*.")[2].removeprefix(prefix + ".")


def main() -> None:
    import torch
    import transformers

    rows, counts, shared = [], defaultdict(int), []
    kinds: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for name in ARCHS:
        model, has_hf, roles = compare(name)
        pre = model.base_model_prefix
        agree = [g for g, (hf, us) in roles.items() if hf == us]
        only = sorted({short(g, pre) for g, (hf, us) in roles.items() if hf in NOT_SHARDED and us not in NOT_SHARDED})
        diff = {(short(g, pre), hf, us) for g, (hf, us) in roles.items()
                if has_hf and hf != us and not (hf in NOT_SHARDED and us not in NOT_SHARDED)}
        shared += [hf == us for hf, us in roles.values() if has_hf and {hf, us}.isdisjoint(NOT_SHARDED)]
        for s, hf, us in diff:
            kinds[hf, us][s].append(name)
        verdict = "no HF plan" if not has_hf else "differ" if diff or only else "agree fully"
        counts[verdict] += 1
        listed = "; ".join(f"`{s}` (HF {hf}, we {us})" for s, hf, us in sorted(diff)) or ("" if has_hf else "n/a")
        only_cell = f"{len(only)}" + (f": {', '.join(f'`{s}`' for s in only)}" if only and has_hf else "")
        rows.append(f"| {name} | {'yes' if has_hf else 'no'} ({type(model).__name__}) | "
                    f"{len(agree) if has_hf else 'n/a'} | {listed} | {only_cell} |")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("agree fully", "differ", "no HF plan"))
    lines = ["# Our plans against transformers' tensor-parallel plans", "",
             f"Generated by `python scripts/compare_hf_plans.py` from `plans/<arch>.tp2.plan` and the plan "
             f"transformers {transformers.__version__} (HF below) applies to the same model "
             f"(torch {torch.__version__}): "
             "the task class's `_tp_plan`, the config's `base_model_tp_plan` under the base-model prefix, and the "
             "vocabulary-sharded `embed_tokens` rule it adds for base models with a plan (`model.tp_plan`). Both "
             "plans are resolved against the modules and parameters of the tiny model from `tests/hf_zoo.py`; "
             "counts are of module patterns (one per layer kind, `*` for the layer index).", "",
             "Roles: **column** (output features sharded), **row** (input features sharded, all-reduced after), "
             "**column+gather** (column, output all-gathered), **embedding-vocab** (rows of the table sharded), "
             "**replicate**, **replicate+grad-sum** (replicated, gradient all-reduced), **experts-sliced** (every "
             "expert sharded, outputs all-reduced). A module neither plan names is replicated by both and not "
             "counted.", "", f"Summary: {len(ARCHS)} architectures: {summary}. Where both plans shard a module, "
             f"they give it the same role in {sum(shared)} of {len(shared)} module patterns.", "",
             "| architecture | transformers has a plan? | both agree | where we differ (HF role, our role) "
             "| only we shard |", "| --- | --- | --- | --- | --- |", *rows, "", "## Where we differ, and why", "",
             AGREE, "", ONLY_WE, ""]
    with_plan = counts["agree fully"] + counts["differ"]
    for (hf, us), where in sorted(kinds.items(), key=lambda kv: -sum(map(len, kv[1].values()))):
        seen = "; ".join(f"`{s}` in " + (f"all {with_plan} architectures with a plan" if len(a) == with_plan
                                          else ", ".join(sorted(a, key=ARCHS.index))) for s, a in sorted(where.items()))
        lines += [f"**HF {hf}, we {us}** ({seen}): " + WHY.get((hf, us), "no explanation recorded yet."), ""]
    lines += [f"**No transformers plan** ({counts['no HF plan']}): neither the task class nor the config "
              "defines one, so transformers refuses `tp_size > 1` for these models unless a plan is passed in; our "
              "plans are generated from the model's graph alone."]
    out = ROOT / "docs" / "hf_plan_comparison.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(ARCHS)} architectures, {summary}")


if __name__ == "__main__":
    main()
