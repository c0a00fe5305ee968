"""Hugging Face models built from their config, without weights. transformers is imported lazily, and nothing
here changes the process's environment or transformers' logging (the command line does that for itself)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from autotp.errors import AutoTPError, CheckpointError


def transformers_module():
    """transformers, or an error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise AutoTPError("this is a Hugging Face model and transformers is not installed: "
                          "pip install 'autotp[hf]'") from None
    return transformers


def model_classes(cfg) -> list:
    """The class named by the config's ``architectures``, then causal LM, seq2seq LM, masked LM, base."""
    T = transformers_module()
    named = [getattr(T, a) for a in (getattr(cfg, "architectures", None) or [])[:1] if hasattr(T, a)]
    auto = [T.AutoModelForCausalLM, T.AutoModelForSeq2SeqLM, T.AutoModelForMaskedLM, T.AutoModel]
    if getattr(cfg, "is_encoder_decoder", False):
        auto = auto[1:]  # an encoder-decoder's ForCausalLM is its decoder alone
    return named + auto


def build_empty(path: Path, dtype_of: Callable[[Any], Any], hf_kwargs: dict) -> nn.Module:
    """The model of ``path/config.json`` in eval mode, parameters on the meta device, buffers real.

    ``dtype_of(config)`` gives the dtype to build in. accelerate's ``init_empty_weights(include_buffers=False)``
    keeps the buffers a model computes as it is built (rotary frequencies) real; building under
    ``torch.device("meta")`` would make them meta too, and ``to_empty`` would leave them uninitialized.
    """
    from accelerate import init_empty_weights

    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path}' has no config.json: autotp builds the model from it (write it with "
                              f"model.config.save_pretrained(dir))")
    config = transformers_module().AutoConfig.from_pretrained(str(path), **hf_kwargs)
    dtype = dtype_of(config)
    for cls in model_classes(config):
        make = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto*: public
        try:
            with init_empty_weights(include_buffers=False):
                model = make(config, dtype=dtype)
        except ValueError:
            continue
        model.tie_weights()  # init_empty_weights registers parameters anew, which unties them
        return model.eval()
    raise CheckpointError(f"no transformers model class accepts the {type(config).__name__} of '{path}'")
