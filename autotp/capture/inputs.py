"""Hugging Face glue: capture inputs built from a model's config. transformers is imported lazily.

Nothing here knows an architecture: the inputs come from the config's generic fields
(``vocab_size``, ``is_encoder_decoder``) and the forward's signature.
"""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
import torch.nn as nn

from autotp.errors import CaptureError

BATCH, SEQ = 2, 8


def is_hf(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers if it is not loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def example_inputs(model: nn.Module, batch: int = BATCH, seq: int = SEQ) -> dict[str, Any]:
    """Keyword inputs for capturing ``model``: token ids in its vocabulary, no KV cache.

    >>> example_inputs(LlamaForCausalLM(cfg))  # doctest: +SKIP
    {'input_ids': tensor([[...]]), 'use_cache': False}
    """
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(text_cfg, "vocab_size", None)
    if "input_ids" not in params or not vocab:
        raise CaptureError(f"cannot build capture inputs for {type(model).__name__} from its config (its forward "
                           f"takes {list(params)[:4]}, not token ids): pass example_inputs=... with the inputs "
                           f"you call it with")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)  # 0 is often the padding id
    out: dict[str, Any] = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        out["decoder_input_ids"] = torch.randint(1, vocab, (batch, seq // 2), generator=g)
    if "use_cache" in params:
        out["use_cache"] = False  # the KV cache is runtime state, not part of the dataflow to plan
    return out


def default_inputs(model: nn.Module, example_inputs_: Any) -> Any:
    """The given inputs, or for a Hugging Face model ones built from its config."""
    if example_inputs_ is None and is_hf(model):
        return example_inputs(model)
    return example_inputs_


def call(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def main_tensor(out: Any) -> torch.Tensor:
    """The output to compare: a tensor, ``logits``/``last_hidden_state``, else the first floating tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if isinstance(getattr(out, key, None), torch.Tensor):
            return getattr(out, key)
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise CaptureError(f"the model returned {type(out).__name__} with no floating-point tensor to compare")
