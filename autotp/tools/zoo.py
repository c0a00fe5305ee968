"""Models named on the command line: a Hugging Face directory, config file or ``model_type``, or a factory.

transformers is imported only when a name needs it. Forms of MODEL, tried in this order:

- ``package.module:factory``: ``factory()`` returns ``(model, example_inputs)`` (a tuple of positional
  arguments, a dict of keyword arguments, or one tensor), or just the model when it is a Hugging Face
  model (its inputs are then built from its config);
- a directory with ``config.json`` (weights are loaded when present and wanted);
- a ``.json`` file with a Hugging Face config (it names its ``model_type``);
- a transformers ``model_type`` such as ``llama``, ``gpt2``, ``bert``: its config with ``SMALL`` sizes.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autotp.capture.inputs import is_hf
from autotp.errors import AutoTPError
from autotp.io import hf_model

log = logging.getLogger(__name__)

FORMS = ("a local Hugging Face model directory (with config.json), a Hugging Face config .json file, "
         "a transformers model_type (e.g. llama, gpt2, bert), or package.module:factory")

# small sizes for a bare model_type, each applied only where the config has that attribute
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             head_dim=16, vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False, n_inner=128, ffn_dim=128, word_embed_proj_dim=64, num_kv_heads=4,
             d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_decoder_layers=2, encoder_layers=2,
             decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
             decoder_ffn_dim=128, decoder_start_token_id=2, dim=64, hidden_dim=128, n_heads=4, n_layers=2,
             expansion_ratio=2, rotary_dim=8)
WEIGHT_FILES = ("*.safetensors",)  # never pickles


class ModelSpecError(AutoTPError):
    """A MODEL argument that names no model autotp can build."""


@dataclass
class Loaded:
    """A model built from a MODEL argument, with the inputs to capture and check it with."""

    model: nn.Module
    example_inputs: Any


def load(spec: str, *, meta: bool = False, weights: bool = False, seed: int = 0) -> Loaded:
    """Build the model named by ``spec`` (see the module docstring), seeded, in eval mode.

    ``meta``: a Hugging Face model's parameters on the meta device (planning only: no memory, no
    weights read); a factory's model is built as the factory builds it.
    ``weights``: load the weights of a model directory that has them (otherwise random, seeded).
    """
    path = Path(spec)
    if ":" in spec and not path.exists():
        loaded = _from_factory(spec, seed)
    elif path.is_dir():
        loaded = _from_dir(path, meta, weights, seed)
    elif path.is_file():
        loaded = _hf_loaded(_config_file(path), meta, seed)
    elif re.fullmatch(r"[A-Za-z0-9_-]+", spec):
        loaded = _hf_loaded(small_config(spec), meta, seed)
    else:
        raise ModelSpecError(f"MODEL '{spec}': no such file or directory. MODEL is {FORMS}")
    loaded.model.eval()
    return loaded


def transformers_module():
    """transformers, imported on first use. The command line is offline (every model it names is local) and keeps
    transformers quiet unless -v: settings of this process, made here and never by the library."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        T = hf_model.transformers_module()
    except AutoTPError as e:
        raise ModelSpecError(str(e)) from None
    if not log.isEnabledFor(logging.INFO):
        T.logging.set_verbosity_error()
        T.utils.logging.disable_progress_bar()
    return T


def small_config(model_type: str):
    """The config of ``model_type`` with ``SMALL`` sizes wherever it has those attributes."""
    T = transformers_module()
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ModelSpecError(f"MODEL '{model_type}' is not a file, a directory or a transformers model_type{hint}. "
                             f"MODEL is {FORMS}")
    cfg = T.AutoConfig.for_model(model_type)
    for k, v in SMALL.items():
        if hasattr(cfg, k):
            with contextlib.suppress(AttributeError, ValueError, TypeError):
                setattr(cfg, k, v)
    if isinstance(getattr(cfg, "layer_types", None), (list, tuple)):
        cfg.layer_types = list(cfg.layer_types)[: cfg.num_hidden_layers]
    return cfg


def _config_file(path: Path):
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"MODEL '{path}' is a file but not a JSON config ({e}). MODEL is {FORMS}") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ModelSpecError(f"config file '{path}' has no \"model_type\"; add one (e.g. \"llama\")")
    T = transformers_module()
    try:
        return T.AutoConfig.for_model(d.pop("model_type"), **d)
    except ValueError as e:
        raise ModelSpecError(f"config file '{path}': {str(e).splitlines()[0][:300]}") from None


def _from_dir(path: Path, meta: bool, weights: bool, seed: int) -> Loaded:
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"directory '{path}' has no config.json, so it is not a Hugging Face model. "
                             f"MODEL is {FORMS}")
    cfg = transformers_module().AutoConfig.from_pretrained(str(path))
    has_weights = any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)
    if weights and has_weights and not meta:
        cls = hf_model.model_classes(cfg)[0]
        log.info("loading %s weights from %s", cls.__name__, path)
        return _hf_inputs(cls.from_pretrained(str(path), use_safetensors=True))
    return _hf_loaded(cfg, meta, seed)


def _hf_loaded(cfg, meta: bool, seed: int) -> Loaded:
    """The first model class that accepts ``cfg``, built from it (random weights, seeded)."""
    for cls in hf_model.model_classes(cfg):
        torch.manual_seed(seed)
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = cls.from_config(cfg) if hasattr(cls, "from_config") else cls._from_config(cfg)  # Auto*: public
        except ValueError:
            continue
        return _hf_inputs(model)
    raise ModelSpecError(f"no transformers model class accepts a {type(cfg).__name__}")


def _hf_inputs(model: nn.Module) -> Loaded:
    from autotp.capture.inputs import example_inputs

    return Loaded(model, example_inputs(model))


def _from_factory(spec: str, seed: int) -> Loaded:
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # as with `python -m`: modules next to where the command runs
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelSpecError(f"MODEL '{spec}': cannot import module '{mod_name}' ({e}). MODEL is {FORMS}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelSpecError(f"MODEL '{spec}': module '{mod_name}' has no callable '{attr}'")
    torch.manual_seed(seed)
    made = factory()
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"MODEL '{spec}': {attr}() returned {type(model).__name__}, not an nn.Module "
                             f"(or a (model, example_inputs) pair)")
    if inputs is None and is_hf(model):
        return _hf_inputs(model)
    if inputs is None:
        raise ModelSpecError(f"MODEL '{spec}': {attr}() returned a model without example inputs; return "
                             f"(model, example_inputs) with example_inputs a tuple of positional arguments "
                             f"or a dict of keyword arguments")
    return Loaded(model, inputs if isinstance(inputs, (tuple, dict)) else (inputs,))
