"""``autotp profile``: one rank builds MODEL, shards it and profiles it (``autotp.profile``)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from autotp.api import parallelize
from autotp.capture import inputs as hf
from autotp.errors import AutoTPError
from autotp.plan import Plan
from autotp.runtime.profile import profile
from autotp.tools import zoo


def sized_inputs(model: nn.Module, inputs: Any, batch: int | None = None, seq: int | None = None) -> Any:
    """``inputs`` with ``batch`` rows and ``seq`` positions (None: as they are).

    A Hugging Face model gets new inputs from its config; otherwise each tensor's first dim is
    tiled or cut to ``batch`` and its second to ``seq``, so token ids stay valid ids.
    """
    if batch is None and seq is None:
        return inputs
    if hf.is_hf(model):
        return hf.example_inputs(model, batch or hf.BATCH, seq or hf.SEQ)

    def fit(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        for dim, n in ((0, batch), (1, seq)):
            if n is not None and dim < x.dim():
                x = torch.cat([x] * math.ceil(n / x.shape[dim]), dim).narrow(dim, 0, n)
        return x

    if isinstance(inputs, dict):
        return {k: fit(v) for k, v in inputs.items()}
    return tuple(fit(x) for x in (inputs if isinstance(inputs, tuple) else (inputs,)))


def profile_rank(rank: int, world: int, spec: str, batch: int | None, seq: int | None, reps: int, warmup: int,
                 backward: bool, seed: int, plan_text: str | None = None) -> dict:
    """One rank of ``autotp profile``: MODEL built with ``seed``, sharded at tp=``world`` (by ``plan_text``, made
    before the ranks started, else by ``make_plan``), profiled."""
    try:
        loaded = zoo.load(spec, weights=True, seed=seed)
        inputs = sized_inputs(loaded.model, loaded.example_inputs, batch, seq)
        plan = Plan.from_text(plan_text, source="the profile's plan") if plan_text else None
        model = parallelize(loaded.model, world, plan=plan, example_inputs=inputs)
        return {"profile": profile(model, inputs, reps=reps, warmup=warmup, backward=backward)}
    except AutoTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
