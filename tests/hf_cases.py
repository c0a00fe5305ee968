"""Hugging Face coverage, run inside spawned ranks: one group loops over the architectures."""
from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import torch
from cases import measure
from hf_zoo import build, optimum

import autotp
from autotp.capture.inputs import main_tensor

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
    """``parallelize`` plans the model itself (every rank, side by side); its plan must be byte-identical to the
    one stored under plans/ (AUTOTP_REGEN=1: rank 0 writes it instead)."""
    model = build(name)
    dense = copy.deepcopy(model)
    path = plan_path(name, world)
    regen = bool(os.environ.get("AUTOTP_REGEN"))
    t0 = time.perf_counter()
    model = autotp.parallelize(model, world, check=False)  # measured against the dense model below
    plan_s = time.perf_counter() - t0
    plan = model._autotp_plan
    if rank == 0 and regen:
        plan.save(path)
    kw = _inputs(model, batch=3, seq=11, seed=1)  # other shapes than the capture's (2 x 8)
    r = measure(rank, world, model, dense, plan, lambda m: main_tensor(m(**kw, use_cache=False)))
    # a missing plan file fails the test: write it with AUTOTP_REGEN=1
    r["plan_same"] = regen or path.exists() and plan.to_text() == path.read_text()
    r["plan_s"] = plan_s
    r["optimum"] = optimum(model)
    r["sum_grad"] = sum(len(e.get("p").split(",")) for e in plan.resolve(dict(model.named_modules())).values()
                        if e.style == "sum_grad")
    r["model_class"] = type(model).__name__
    r["patches"] = sorted({f"{k}" for e in plan.entries if e.style == "patch" for k, _ in e.params})
    r["replicated"] = [f"{e.path}: {e.reason}" for e in plan.entries if e.style == "replicate"]
    if hasattr(model, "generate") and model.can_generate():
        prompt = _inputs(model, batch=2, seq=5, seed=2)
        with torch.no_grad():
            ref = dense.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
            got = model.generate(**prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        r["generate_same"] = bool(torch.equal(ref, got))
        r["generated"] = ref.shape[-1]
    return r
