"""Hugging Face coverage, run inside spawned ranks: one group loops over the architectures."""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch

import autotp
from cases import measure
from hf_zoo import build

PLANS = Path(__file__).resolve().parent.parent / "plans"


def plan_path(name: str, tp: int) -> Path:
    return PLANS / f"{name}.tp{tp}.plan"


def _inputs(model, batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    kw = {"input_ids": torch.randint(3, vocab, (batch, seq), generator=g)}
    if model.config.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.randint(3, vocab, (batch, seq - 3), generator=g)
    return kw


def _main_output(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def coverage(rank: int, world: int, names: list[str]) -> dict:
    """For each architecture: numerics, collectives, parameter share, and greedy generate()."""
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out = {}
    for name in names:
        try:
            out[name] = _one(rank, world, name)
        except Exception as e:  # noqa: BLE001 - reported per architecture, the sweep goes on
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    return out


def _one(rank: int, world: int, name: str) -> dict:
    model = build(name)
    dense = copy.deepcopy(model)
    path = plan_path(name, world)
    plan = autotp.load_plan(path) if path.exists() and not os.environ.get("AUTOTP_REPLAN") else autotp.make_plan(model, world)
    model = autotp.parallelize(model, world, plan=plan)
    kw = _inputs(model, batch=3, seq=11, seed=1)  # other shapes than the capture's (2 x 8)
    r = measure(rank, world, model, dense, plan, lambda m: _main_output(m(**kw, use_cache=False)))
    r["groups"] = sum(1 for e in plan.entries if e.style == "rowwise")
    r["layers"] = model.config.get_text_config().num_hidden_layers
    r["model_class"] = type(model).__name__
    if hasattr(model, "generate") and model.can_generate():
        prompt = _inputs(model, batch=2, seq=5, seed=2)
        with torch.no_grad():
            ref = dense.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
            got = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        r["generate_same"] = bool(torch.equal(ref, got))
        r["generated"] = ref.shape[-1]
    return r
