"""Plans in transformers' vocabulary: export an autotp Plan as a ``tp_plan`` dict, import one.

transformers (``transformers.distributed.tensor_parallel``) shards a model by a dict from module
path to style name, where ``*`` stands for a layer index: the config's ``base_model_tp_plan``
(paths inside the base model, e.g. ``layers.*.self_attn.q_proj``), the task class's ``_tp_plan``
(``lm_head``), both merged under the base-model prefix into ``model.tp_plan`` (paths from the
model's root), which is also what ``DistributedConfig(tp_plan=...)`` takes. The styles that
correspond to autotp's exactly:

    colwise                 colwise                 (nn.Linear [out, in] weight; output sharded)
    colwise_gather_output   colwise gather=1        (output all-gathered)
    packed_colwise          colwise seg=n,n         (2 equal fused parts, e.g. gate|up; no bias)
    rowwise                 rowwise                 (input sharded, output all-reduced)
    embedding_rowwise       vocab                   (table sharded by vocabulary rows)
    replicated_with_grad_allreduce  sum_grad p=...  (every parameter of the module)
    (no rule)               replicate

Exporting refuses lines transformers would run wrongly ([in, out] weights of GPT-2's Conv1D, ``seg=``
other than 2 equal parts, ``rep=``, uneven ``split=``, ``patch``, ``localize``, layers planned differently
under one key) and keeps ``experts`` lines whole with a warning (the same numbers, expert weights not sharded).
Importing maps transformers styles that gather or slice a replicated value (``rowwise_split_input``,
``embedding_colwise``, ``colwise_rep``/``rowwise_rep``) to the same numbers without sharding the
weights, keeps modules whose styles have no autotp counterpart (MoE experts, sequence parallel)
whole with a warning, and checks the result with ``check_plan``. transformers is imported lazily.
"""
from __future__ import annotations

import difflib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from autotp.errors import PlanFormatError, PlanMismatchError
from autotp.plan import Entry, Plan, load_plan

# transformers style -> (autotp style, extra parameters, why the import keeps it whole (None: exact match))
IMPORT = {
    "colwise": ("colwise", (), None),
    "colwise_gather_output": ("colwise", (("gather", "1"),), None),
    "colwise_rep": ("colwise", (("gather", "1"),), None),
    "packed_colwise": ("colwise", (), None),  # seg= from the weight: two equal parts
    "rowwise": ("rowwise", (), None),
    "rowwise_split_input": ("replicate", (), "transformers slices its gathered input and all-reduces the parts: "
                                             "the same numbers as keeping it whole"),
    "rowwise_rep": ("replicate", (), "transformers slices its replicated input and all-reduces the parts: "
                                     "the same numbers as keeping it whole"),
    "embedding_rowwise": ("vocab", (), None),
    "embedding_colwise": ("replicate", (), "transformers shards the embedding dim and all-gathers it: the same "
                                           "numbers as keeping it whole"),
    "replicated_with_grad_allreduce": ("sum_grad", (), None),
    "replicate": ("replicate", (), None),
}
PREFIX_HELP = ("keys are module paths from the model's root (as in model.tp_plan) or inside the base model "
               "(as in config.base_model_tp_plan), with '*' for layer indices")


def hf_key(path: str) -> str:
    """The key transformers looks a module up by: each layer index (a number between dots) becomes ``*``.

    >>> hf_key("model.layers.3.mlp.up_proj")
    'model.layers.*.mlp.up_proj'
    """
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), path)  # transformers' replace_layer_number_by_wildcard


# ---------------------------------------------------------------------------------------------- export


def to_hf_tp_plan(plan: Plan, model: nn.Module | None = None, *, base_model: bool = False) -> dict[str, str]:
    """The transformers ``tp_plan`` that shards like ``plan``, keys from the model's root.

    Use it as ``DistributedConfig(tp_size=N, tp_plan=d)`` (``from_pretrained`` / ``maybe_distribute_model``)
    or ``model.tp_plan = d``. ``base_model=True`` gives keys inside the base model, for a config's
    ``base_model_tp_plan`` (lines outside it, such as ``lm_head``, are left out with a warning).
    ``model`` lets each line be checked against its modules (linear layers, biases, every layer alike);
    without it, fused ``seg=`` lines cannot be exported. Lines transformers cannot express raise
    PlanMismatchError listing them.

    >>> tp_plan = to_hf_tp_plan(autotp.make_plan(model, 2), model)  # doctest: +SKIP
    """
    problems: list[str] = []
    whole: list[str] = []
    styles = {e.path: _export_style(e, model, problems, whole) for e in plan.entries}
    if model is None:
        rules = {p: s for p, s in styles.items() if s}
        problems += [f"'{p}' names one layer: transformers' keys stand for every layer (it writes '*' for each "
                     f"index). Pass model= to check every layer is sharded alike, or write the line as a glob"
                     for p in rules if hf_key(p) != p]
    else:
        rules = _by_hf_key(plan, styles, model, problems)
    if problems:
        uneven = sum(1 for e in plan.entries if e.get("split"))
        fix = (f"Fix: the {uneven} split= line(s) come from a tp={plan.tp} that does not divide the model's sizes: "
               f"plan at a tp that divides them (autotp plan MODEL --tp N --format hf), or shard with "
               f"autotp.parallelize, which runs this plan; a transformers tp_plan is not available for it"
               if uneven else "Fix: edit the plan to replicate these modules and their groups (check it with autotp "
               "check MODEL --plan FILE), or shard with autotp.parallelize, which runs these lines")
        raise PlanMismatchError(f"{len(problems)} plan line(s) cannot be written as a transformers tp_plan:\n  "
                                + "\n  ".join(problems) + f"\n{fix}")
    if whole:
        warnings.warn(f"transformers keeps these whole (no style of its own is known to do the same): "
                      f"{'; '.join(whole)}", stacklevel=2)
    if not base_model:
        return rules
    if model is None:
        raise PlanMismatchError("base_model=True needs the model (its base_model_prefix); pass model=")
    return _inside_base(rules, model)


def _export_style(e: Entry, model: nn.Module | None, problems: list[str], whole: list[str]) -> str | None:
    """transformers' style for one line (None: keep whole, no rule). A line whose sharding transformers
    cannot reproduce is a problem when keeping the module whole would break it (sizes baked into its
    code), else it goes to ``whole`` (the same numbers, weights not sharded: e.g. MoE experts)."""
    head = f"line {e.line} " if e.line else ""
    shown = "".join(f" {k}={v}" for k, v in e.params if k not in ("in", "out", "w", "group"))
    where = f"{head}('{e.path}' {e.style}{shown})"
    why = None
    if e.get("split"):
        parts = e.ints("split")
        why = (f"an uneven split: its sizes are cut into {sum(parts)} units, of which the ranks hold "
               f"{', '.join(map(str, parts))}; transformers' tensor-parallel styles split every size evenly into tp "
               f"parts")
    elif e.style in ("colwise", "rowwise") and e.get("w") == "in_out":
        why = ("its weight is stored [in, out] (GPT-2's Conv1D, x @ W): transformers' colwise/rowwise shard an "
               "nn.Linear's [out, in] weight and need its in_features/out_features")
    elif e.style == "colwise" and int(e.get("rep", "1")) > 1:
        why = f"each of its heads is held by {e.get('rep')} ranks (fewer heads than tp): transformers has no such style"
    elif e.style == "colwise" and e.get("seg"):
        seg = e.ints("seg")
        if len(seg) != 2 or seg[0] != seg[1]:
            why = (f"its fused output is {len(seg)} parts {seg}, each sharded: transformers' packed_colwise "
                   f"shards exactly 2 equal parts (gate|up)")
        elif model is None:
            why = "packed_colwise shards a bias contiguously, not per part: pass model= to check it has none"
        else:
            return "packed_colwise"
    elif e.style == "patch":
        why = (f"it sets {', '.join(k for k, _ in e.params)} to local values; transformers runs the module's code "
               f"unchanged, which would reshape with the global sizes")
    elif e.style == "localize":
        why = "its forward is rewritten to local sizes; transformers runs the module's code unchanged"
    elif e.style == "slice":
        why = (f"its argument '{e.get('arg')}' is sliced to this rank's heads on the way in; transformers has no "
               f"such style and would add the whole of it to sharded heads")
    if why:
        problems.append(f"{where}: {why}")
        return None
    if e.style == "colwise":
        return "colwise_gather_output" if e.get("gather") == "1" else "colwise"
    exact = {"rowwise": "rowwise", "vocab": "embedding_rowwise", "sum_grad": "replicated_with_grad_allreduce"}
    if e.style not in exact and e.style != "replicate":
        whole.append(where)
    return exact.get(e.style)


def _by_hf_key(plan: Plan, styles: dict[str, str | None], model: nn.Module, problems: list[str]) -> dict[str, str]:
    """Resolve the plan against the model, then group its modules by transformers' key: one style each."""
    modules = dict(model.named_modules())
    resolved = plan.resolve(modules.keys(), type(model).__name__)
    keys: dict[str, dict[str, list[str]]] = {}  # hf key -> style -> modules
    for path in modules:
        if path:
            e = resolved.get(path)
            keys.setdefault(hf_key(path), {}).setdefault(styles.get(e.path) if e else None, []).append(path)
    rules = {}
    for key, by_style in keys.items():
        named = [s for s in by_style if s]
        if named and len(by_style) > 1:
            shown = "; ".join(f"{s or 'kept whole'}: {', '.join(ms[:3])}{' ...' if len(ms) > 3 else ''}"
                              for s, ms in by_style.items())
            problems.append(f"'{key}': its layers are planned differently ({shown}); transformers' key covers every "
                            f"layer alike. Fix: give every layer the same line")
        elif named:
            why = _module_problem(named[0], modules[by_style[named[0]][0]], resolved[by_style[named[0]][0]])
            if why:
                problems.append(f"'{key}' ({named[0]}): {why}")
            else:
                rules[key] = named[0]
    return rules


def _module_problem(style: str, mod: nn.Module, e: Entry) -> str | None:
    """Why transformers' ``style`` would not do what plan line ``e`` does on ``mod`` (None: it would)."""
    if style.startswith("colwise") or style in ("rowwise", "packed_colwise"):
        need = "in_features" if style == "rowwise" else "out_features"
        if not hasattr(mod, need):
            return f"transformers' {style} needs a linear layer with {need}; '{type(mod).__name__}' has none"
    if style == "packed_colwise" and getattr(mod, "bias", None) is not None:
        return "it has a bias, which transformers' packed_colwise shards contiguously instead of per fused part"
    if style == "replicated_with_grad_allreduce":
        own = sorted(n for n, p in mod.named_parameters(recurse=False) if p.requires_grad)
        if own != sorted(e.get("p", "").split(",")):
            return (f"transformers sums the gradients of all its parameters ({', '.join(own)}), the line only of "
                    f"p={e.get('p')}")
    return None


def _inside_base(rules: dict[str, str], model: nn.Module) -> dict[str, str]:
    """``rules`` with keys inside the base model; the others are left out with a warning."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, "base_model", model)
    if not prefix or base is model:
        return dict(rules)
    inside = {k[len(prefix) + 1:]: s for k, s in rules.items() if k.startswith(prefix + ".")}
    outside = {k: s for k, s in rules.items() if not k.startswith(prefix + ".")}
    if outside:
        warnings.warn(f"left out of base_model_tp_plan (outside '{prefix}'): {outside}; transformers takes them from "
                      f"the task class's _tp_plan or from DistributedConfig(tp_plan=...)", stacklevel=3)
    return inside


# ---------------------------------------------------------------------------------------------- import


def from_hf_tp_plan(model: nn.Module, tp_plan: dict[str, str], tp: int, *, example_inputs: Any = None) -> Plan:
    """An autotp Plan doing what transformers' ``tp_plan`` asks, checked by ``check_plan``.

    ``tp_plan``: e.g. ``model.tp_plan`` (what transformers applies to this model) or
    ``model.config.base_model_tp_plan``. Styles that only gather or slice a replicated value become
    ``replicate`` (same numbers, weights whole); styles autotp has no counterpart for are kept whole
    with a warning. Raises PlanMismatchError for unknown styles or keys and for a plan that would
    not give the unsharded numbers.

    >>> plan = from_hf_tp_plan(model, model.tp_plan, 2)  # doctest: +SKIP
    >>> model = autotp.parallelize(model, plan=plan)  # doctest: +SKIP
    """
    from autotp.api import check_plan

    modules = {hf_key(p): m for p, m in model.named_modules() if p}
    params = {hf_key(p) for p, _ in model.named_parameters()}
    prefix = getattr(model, "base_model_prefix", "")
    entries: dict[str, Entry] = {}
    problems, whole = [], []
    for key, style in tp_plan.items():
        path = next((k for k in (key, f"{prefix}.{key}" if prefix else key) if k in modules or k in params), None)
        if path is None:
            near = difflib.get_close_matches(key, list(modules), n=1, cutoff=0.6)
            problems.append(f"'{key}' matches no module or parameter of {type(model).__name__}"
                            + (f" (closest: '{near[0]}')" if near else ""))
        elif style not in IMPORT and style not in _known_styles():
            problems.append(f"'{key}': '{style}' is not a transformers tensor-parallel style (known: "
                            f"{', '.join(sorted(_known_styles() | set(IMPORT)))})")
        elif style not in IMPORT or path not in modules:
            what = "a parameter" if path not in modules else f"'{type(modules[path]).__name__}'"
            whole.append(f"'{key}': '{style}' on {what}")
            if path in modules and path not in entries:
                entries[path] = Entry(path, "replicate", (), f"transformers tp_plan '{key}': '{style}'; no autotp "
                                      f"counterpart: kept whole")
        else:
            e = _import_entry(path, key, style, modules[path], problems)
            if e is not None and path in entries and entries[path].style != e.style:
                problems.append(f"'{key}': '{style}' and another key name the same module '{path}'")
            elif e is not None:
                entries[path] = e
    if problems:
        raise PlanMismatchError("cannot import this tp_plan:\n  " + "\n  ".join(problems) + f"\n({PREFIX_HELP})")
    if whole:
        warnings.warn(f"autotp keeps these whole (no counterpart of their transformers style): {'; '.join(whole)}",
                      stacklevel=2)
    plan = Plan(tp, tuple(entries.values()), type(model).__name__, (f"imported from a transformers tp_plan of "
                                                                    f"{len(tp_plan)} rules",))
    check_plan(model, plan, example_inputs=example_inputs)
    return plan


def _known_styles() -> set[str]:
    """The style names transformers registers (empty when it is not installed)."""
    try:
        import transformers.distributed.expert_parallel  # noqa: F401 - registers the expert-parallel styles
        from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    except ImportError:
        return set()
    return set(ALL_PARALLEL_STYLES.keys())


def _import_entry(path: str, key: str, style: str, mod: nn.Module, problems: list[str]) -> Entry | None:
    """The plan line for one transformers rule (None and a problem when the module does not fit it)."""
    ours, extra, note = IMPORT[style]
    reason = f"transformers tp_plan '{key}': '{style}'" + (f"; {note}" if note else "")
    w = getattr(mod, "weight", None)
    if ours == "sum_grad":
        names = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
        return Entry(path, ours, (("p", ",".join(names)),), reason) if names else None
    if ours in ("colwise", "rowwise", "vocab") and (not isinstance(w, nn.Parameter) or w.dim() != 2):
        problems.append(f"'{key}': '{style}' needs a module with a 2-D weight; '{type(mod).__name__}' has "
                        f"{list(w.shape) if isinstance(w, nn.Parameter) else 'none'}")
        return None
    if ours == "vocab" or (ours == "replicate" and style == "embedding_colwise"):
        return Entry(path, ours, (("rows", str(w.shape[0])), ("dim", str(w.shape[1]))), reason)
    if not isinstance(w, nn.Parameter) or w.dim() != 2:  # replicate on a module that is not a linear layer
        return Entry(path, ours, (), reason)
    params = (("in", str(w.shape[1])), ("out", str(w.shape[0])), ("w", "out_in")) + extra
    if style == "packed_colwise":
        params += (("seg", f"{w.shape[0] // 2},{w.shape[0] // 2}"),)
    return Entry(path, ours, params, reason)


# ---------------------------------------------------------------------------------------------- files


def read_plan(path: str | Path, model: nn.Module, tp: int, *, example_inputs: Any = None) -> Plan:
    """A plan file: autotp's text format, or a transformers ``tp_plan`` as JSON (``{"path": "style"}``)."""
    p = Path(path)
    if p.suffix != ".json":
        return load_plan(p)
    if not p.exists():
        raise PlanFormatError(f"plan file '{path}' does not exist")
    try:
        rules = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise PlanFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a transformers tp_plan is one object "
                              f"{{\"module.path.*\": \"style\"}}") from None
    if not isinstance(rules, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in rules.items()):
        raise PlanFormatError(f"{path}: a transformers tp_plan is one JSON object of strings "
                              f"{{\"module.path.*\": \"style\"}}; this one is a {type(rules).__name__}")
    return from_hf_tp_plan(model, rules, tp, example_inputs=example_inputs)
