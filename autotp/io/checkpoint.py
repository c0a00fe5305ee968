"""Sharded checkpoints: each rank's local state as safetensors, with the plan and the config beside them.

    save_sharded(model, dir)    every rank writes rank{r}-of-{tp}.safetensors; rank 0 the plan and config.json
    load_sharded(dir)           the same number of ranks rebuilds the model, without the original checkpoint
    consolidate(dir, out_dir)   one process (no process group) merges the shards into a standard Hugging Face
                                safetensors checkpoint that ``from_pretrained`` loads

A tied weight is stored once, under its first state-dict name, as ``save_pretrained`` does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from autotp.capture.inputs import is_hf
from autotp.errors import CheckpointError
from autotp.io.hf_model import build_empty
from autotp.io.load import (
    INDEX,
    SINGLE,
    TIMEOUT_S,
    Read,
    Stored,
    apply_plan,
    connect,
    dtype_for,
    finish,
    match_keys,
    read_all,
    read_headers,
    tensor_names,
)
from autotp.plan import Plan, load_plan
from autotp.runtime.ranks import all_ranks, ranks
from autotp.split import SHARDING, Split, split_of

PLAN_FILE = "autotp.plan"
MAX_SHARD_BYTES = 5 << 30  # consolidate writes files of at most this size (and an index when there are several)


def shard_name(rank: int, tp: int) -> str:
    """The file holding ``rank``'s local state: ``rank00001-of-00002.safetensors``."""
    return f"rank{rank:05d}-of-{tp:05d}.safetensors"


def save_sharded(model: nn.Module, directory: str | Path, *, group: Any = None, timeout: float = TIMEOUT_S) -> None:
    """Write this rank's local weights, and on rank 0 the plan and config; call it on every rank.

    >>> autotp.save_sharded(model, "ckpt/llama-tp2")  # doctest: +SKIP
    """
    group, rank, tp = ranks(group, None)
    with all_ranks(group, f"saving '{directory}'", timeout):
        plan = getattr(model, "_autotp_plan", None) or (Plan(1, (), type(model).__name__) if tp == 1 else None)
        if plan is None or plan.tp != tp:
            raise CheckpointError(f"{type(model).__name__} was not parallelized by autotp at tp={tp} (its plan: "
                                  f"{'none' if plan is None else f'tp={plan.tp}'}); shard it with autotp.parallelize "
                                  f"or autotp.from_pretrained on these {tp} ranks first")
        if not is_hf(model):
            raise CheckpointError(f"{type(model).__name__} is not a Hugging Face model: load_sharded rebuilds the "
                                  f"model from its config.json, which only a PreTrainedModel has")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            plan.save(d / PLAN_FILE)
            model.config.save_pretrained(str(d))
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(str(d))
        state = {names[0]: t.detach().contiguous() for t, names in tensor_names(model)}
        from safetensors.torch import save_file

        save_file(state, str(d / shard_name(rank, tp)), metadata={"format": "pt"})


def load_sharded(directory: str | Path, group: Any = None, *, timeout: float = TIMEOUT_S) -> nn.Module:
    """Rebuild a model written by ``save_sharded`` on as many ranks as saved it; each reads its own file.

    >>> model = autotp.load_sharded("ckpt/llama-tp2")  # on the same 2 ranks  # doctest: +SKIP
    """
    group, rank, world = ranks(group, None)
    d = Path(directory)
    with all_ranks(group, f"loading '{d}'", timeout):
        plan = saved_plan(d)
        if plan.tp != world:
            raise CheckpointError(f"'{d}' was saved at tp={plan.tp}; this process group has {world} rank"
                                  f"{'s' if world > 1 else ''}. Load it on {plan.tp} ranks, or merge it with "
                                  f"autotp.consolidate('{d}', out_dir) and load that with "
                                  f"autotp.from_pretrained(out_dir, tp={world})")
        file = _shard_files(d, plan.tp)[rank]
        index = read_headers([file])
        model = build_empty(d, lambda cfg: dtype_for(None, cfg, index), {})
        apply_plan(model, world, group, plan)
        keys = match_keys(model, index, f"'{file}'", rank)
        reads = [Read(t, names, keys[names[0]], index[keys[names[0]]], Split(), rank)
                 for t, names in tensor_names(model) if names[0] in keys]
        read_all(model, reads, f"{d.name} rank {rank}", progress=rank == 0)
        finish(model, d)
    connect(group, world)
    return model


def consolidate(directory: str | Path, out_dir: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Merge a ``save_sharded`` directory into a Hugging Face checkpoint (``model.safetensors``, or files of at
    most ``max_shard_bytes`` and ``model.safetensors.index.json``) plus its config. No process group needed.

    >>> autotp.consolidate("ckpt/llama-tp2", "ckpt/llama")  # doctest: +SKIP
    >>> transformers.AutoModelForCausalLM.from_pretrained("ckpt/llama")  # doctest: +SKIP
    """
    d, out = Path(directory), Path(out_dir)
    plan = saved_plan(d)
    files = _shard_files(d, plan.tp)
    held = [read_headers([f]) for f in files]
    # on the meta device: the full shapes to check against
    model = build_empty(d, lambda cfg: dtype_for(None, cfg, held[0]), {})
    splits = _full_shapes(plan, held, {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()})
    out.mkdir(parents=True, exist_ok=True)
    parts = _pack([(n, _nbytes(shape, held[0][n])) for n, (_, shape) in splits.items()], max_shard_bytes)
    names = [SINGLE] if len(parts) == 1 else [f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                                              for i in range(1, len(parts) + 1)]
    from safetensors.torch import save_file

    for name, part in zip(names, parts):  # one output file in memory at a time
        save_file({n: _merge(n, *splits[n], files, held) for n in part}, str(out / name), metadata={"format": "pt"})
    if len(parts) > 1:
        weight_map = {n: name for name, part in zip(names, parts) for n in part}
        total = sum(_nbytes(shape, held[0][n]) for n, (_, shape) in splits.items())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for extra in ("config.json", "generation_config.json"):
        if (d / extra).is_file():
            shutil.copyfile(d / extra, out / extra)


def saved_plan(d: Path) -> Plan:
    """The plan ``save_sharded`` wrote into ``d``."""
    if not (d / PLAN_FILE).is_file():
        raise CheckpointError(f"'{d}' is not a sharded autotp checkpoint (no {PLAN_FILE}): write one with "
                              f"autotp.save_sharded(model, dir), or load a Hugging Face directory with "
                              f"autotp.from_pretrained")
    return load_plan(d / PLAN_FILE)


def _shard_files(d: Path, tp: int) -> list[Path]:
    files = [d / shard_name(r, tp) for r in range(tp)]
    gone = [f.name for f in files if not f.is_file()]
    if gone:
        raise CheckpointError(f"'{d}' was saved at tp={tp} but lacks {gone}: every rank's file is needed; "
                              f"save again with autotp.save_sharded on all {tp} ranks")
    return files


def _full_shapes(plan: Plan, held: list[dict[str, Stored]], dense: dict[str, tuple[int, ...]]
                 ) -> dict[str, tuple[Split, tuple[int, ...]]]:
    """Each stored tensor's split (from its module's plan line) and full shape, checked on every rank's file
    and against ``dense``, the shapes of the model config.json describes."""
    names = list(held[0])
    for r, h in enumerate(held[1:], 1):
        if set(h) != set(names):
            diff = sorted(set(h) ^ set(names))
            raise CheckpointError(f"rank {r}'s file holds other tensors than rank 0's (e.g. '{diff[0]}'); the files "
                                  f"come from different saves")
    modules = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    sharding = plan.with_entries(e for e in plan.entries if e.style in SHARDING)
    lines = sharding.resolve(modules, plan.model or "the saved model")
    out = {}
    for n in names:
        owner, _, leaf = n.rpartition(".")
        split = split_of(lines.get(owner), leaf, plan.tp)
        shape = split.full_shape(held[0][n].shape)
        if dense.get(n) != shape:
            raise CheckpointError(f"tensor '{n}': merged by its plan line it would be {list(shape)}, but the model of "
                                  f"config.json has {list(dense[n]) if n in dense else 'no such tensor'}; the plan "
                                  f"file or config.json does not belong to these shards")
        try:
            if split.dim is not None:
                split.ranges(shape[split.dim], 0)
        except ValueError as e:
            raise CheckpointError(f"tensor '{n}' ({list(shape)}) cannot be split by its plan line ({e}); the plan "
                                  f"file does not belong to these shards") from None
        for r, h in enumerate(held):
            if h[n].shape != split.local_shape(shape) or h[n].dtype != held[0][n].dtype:
                raise CheckpointError(f"tensor '{n}': rank {r} holds {list(h[n].shape)} {h[n].dtype}, expected "
                                      f"{list(split.local_shape(shape))} {held[0][n].dtype} of {list(shape)}; the "
                                      f"files come from different saves")
        out[n] = (split, shape)
    return out


def _merge(name: str, split: Split, shape: tuple[int, ...], files: list[Path], held: list[dict[str, Stored]]
           ) -> torch.Tensor:
    """The full tensor ``name``: each block from the first rank holding it (rank 0's copy when replicated)."""
    from safetensors import safe_open

    full = torch.empty(shape, dtype=held[0][name].dtype)
    holders = [0] if split.dim is None else range(0, split.tp, split.rep)
    for r in holders:
        with safe_open(str(files[r]), framework="pt") as f:
            local = f.get_tensor(name)
        if split.dim is None:
            full.copy_(local)
            continue
        at = 0
        for a, b in split.ranges(shape[split.dim], r):
            full.narrow(split.dim, a, b - a).copy_(local.narrow(split.dim, at, b - a))
            at += b - a
    return full


def _nbytes(shape: tuple[int, ...], s: Stored) -> int:
    return int(torch.Size(shape).numel()) * s.dtype.itemsize


def _pack(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names in order, cut into runs of at most ``limit`` bytes (a larger tensor gets a run of its own)."""
    parts: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if parts[-1] and used + n > limit:
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += n
    return parts
